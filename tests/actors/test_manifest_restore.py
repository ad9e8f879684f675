"""actors.manifest_restore.nothing_to_upload_from: what stashctl retry asks before a retry
that must upload -- real files and manifests, plain records, no threads."""
from __future__ import annotations

import dataclasses

from actors.manifest_restore import nothing_to_upload_from
from storage.manifest import write_manifest
from tests.ingest.test_refetch import KIB, MIB, build, files, stored

TID = "6c1b9d7e-0a4e-4d0b-9a0e-2f3c4d5e6f70"


def test_the_manifest_or_a_sent_transfers_original_will_do(tmp_path):
    [path] = files(tmp_path, [300 * KIB])
    m = build([path], MIB, TID)
    t, parts = stored(m, tid=TID)      # every part sent
    t = dataclasses.replace(t, manifest_path=str(tmp_path / "t.manifest"))
    unsent = [dataclasses.replace(p, message_id=None) for p in parts]
    write_manifest(m, t.manifest_path)
    assert nothing_to_upload_from(t, parts) is None
    assert nothing_to_upload_from(t, unsent) is None
    (tmp_path / "t.manifest").unlink()
    # sent: the verifier plans the manifest again from the original
    assert nothing_to_upload_from(t, parts) is None
    # not sent: the uploader needs the manifest itself
    why = nothing_to_upload_from(t, unsent)
    assert "manifest" in why and "is gone" in why and "upload it again as a new transfer" in why
    path.write_bytes(b"shorter")
    assert "changed (size 7" in nothing_to_upload_from(t, parts)
    path.unlink()
    why = nothing_to_upload_from(t, parts)
    assert why == f"its manifest {t.manifest_path} is gone and its original {path} is gone"
    assert nothing_to_upload_from(t, unsent) == why


def test_a_manifest_of_other_content_does_not_count(tmp_path):
    [a, b] = files(tmp_path, [100 * KIB, 120 * KIB])
    t, parts = stored(build([a], MIB, TID), tid=TID)
    t = dataclasses.replace(t, manifest_path=str(tmp_path / "t.manifest"))
    write_manifest(build([b], MIB, TID), t.manifest_path)
    a.unlink()
    assert "is not of this content" in nothing_to_upload_from(t, parts)
