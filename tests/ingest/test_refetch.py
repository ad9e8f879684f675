"""actors.ingest.refetch: the manifest of a lost package rebuilt from the files fetched
again must be the stored transfer's (same split, names, hashes) -- real files, real
manifests, plain records; no threads."""
from __future__ import annotations

import dataclasses
import os
import random

import pytest

from actors.ingest.pipeline import _build_set_manifest
from actors.ingest.refetch import (
    RefetchError, lost_parts, marked_reason, restored_manifest, same_split_limit, unmapped_channels,
)
from storage.manifest import UPLOAD_CHUNK_SIZE
from storage.transfers import PartRecord, TransferRecord

KIB = 1024
MIB = 1024 * KIB


def files(tmp_path, sizes, tag="a"):
    paths = []
    for i, size in enumerate(sizes):
        p = tmp_path / tag / f"set.7z.{i + 1:03d}"
        p.parent.mkdir(exist_ok=True)
        p.write_bytes(os.urandom(size))
        paths.append(p)
    return paths


def stored(m, *, verified=(), tid="t-1"):
    """The transfer and part rows as the pipeline recorded ``m`` (parts in ``verified``
    still seen by the verifier, the others lost)."""
    t = TransferRecord(id=tid, state="failed", source_path=m.sources[0].path, size=m.total_size,
                       sha256=m.sha256, destination="d", manifest_path="/m",
                       delete_original=True, account=None, reason="lost after cleanup: x",
                       attempts=0, created_at=0.0, updated_at=0.0, next_check_at=None,
                       last_check_at=None, lease_owner=None, lease_until=None,
                       duplicate_of=None, part_count=len(m.parts))
    parts = [PartRecord(tid, p.index, p.offset, p.length, p.sha256, p.file_name, p.random_id,
                        100 + p.index, 7, "alice", 1.0, 2.0 if p.index in verified else None, 1)
             for p in m.parts]
    return t, parts


def build(paths, limit, tid="t-1"):
    return _build_set_manifest(paths, "d", limit, "cap", lambda: 0.0, tid, "set.7z")


@pytest.mark.parametrize("sizes,limit", [
    ([3 * MIB + 5], MIB),                        # one file split byte-level
    ([200 * KIB], 2 * MIB),                      # one file, one part
    ([MIB, MIB, 300 * KIB], 2 * MIB),            # one document per volume
    ([3 * MIB, MIB, 77 * KIB], 2 * MIB),         # a volume over the limit: re-split
    ([700 * KIB, 700 * KIB], UPLOAD_CHUNK_SIZE * 3),
])
def test_the_stored_split_is_planned_again(tmp_path, sizes, limit):
    paths = files(tmp_path, sizes)
    original = build(paths, limit)
    t, parts = stored(original, verified={0})
    again = same_split_limit(sizes, parts)
    rebuilt = build(paths, again)
    manifest, lost = restored_manifest(t, parts, rebuilt, rng=random.Random(3))
    assert [(p.offset, p.length, p.sha256, p.file_name) for p in manifest.parts] == \
        [(p.offset, p.length, p.sha256, p.file_name) for p in original.parts]
    assert lost == [p.index for p in parts if p.index != 0]
    assert manifest.parts[0].random_id == parts[0].random_id          # keeps its message
    for i in lost:                                                      # sent again: a fresh id
        assert manifest.parts[i].random_id not in (parts[i].random_id, 0)
    assert manifest.transfer_id == t.id and t.id in manifest.parts[0].caption


def test_other_content_is_refused(tmp_path):
    paths = files(tmp_path, [MIB + 3])
    t, parts = stored(build(paths, MIB))
    other = files(tmp_path, [MIB + 3], tag="b")
    with pytest.raises(RefetchError, match="content differs"):
        restored_manifest(t, parts, build(other, same_split_limit([MIB + 3], parts)))


def test_another_split_is_refused(tmp_path):
    paths = files(tmp_path, [3 * MIB])
    t, parts = stored(build(paths, MIB))
    with pytest.raises(RefetchError, match="parts planned"):
        restored_manifest(t, parts, build(paths, 2 * MIB))
    moved = [dataclasses.replace(p, offset=p.offset + 1) for p in parts]
    with pytest.raises(RefetchError, match="no size limit"):
        same_split_limit([3 * MIB], moved)


def test_lost_parts_and_the_reason():
    t = TransferRecord(id="t", state="failed", source_path="/s", size=1, sha256="0", destination="d",
                       manifest_path="/m", delete_original=True, account=None,
                       reason="lost after cleanup: message 5 is gone", attempts=0, created_at=0.0,
                       updated_at=0.0, next_check_at=None, last_check_at=None, lease_owner=None,
                       lease_until=None, duplicate_of=None, part_count=3)
    parts = [PartRecord("t", 0, 0, 1, "0", "a", 1, 5, 1, "a", 1.0, 2.0, 0),
             PartRecord("t", 1, 1, 1, "0", "a", 2, 6, 1, "a", 1.0, None, 1),
             PartRecord("t", 2, 2, 1, "0", "a", 3, None, None, None, None, None, 0)]
    assert lost_parts(parts) == [1, 2]
    once = marked_reason(t, "SOURCE GONE: x")
    assert once == "lost after cleanup: message 5 is gone; re-fetch: SOURCE GONE: x"
    assert marked_reason(dataclasses.replace(t, reason=once), "y").endswith("; re-fetch: y")


def test_unmapped_channels_only_once_every_mapping_is_resolved():
    resolved = {"alice:a": {1}, "bob:b": {2, 3}}
    assert unmapped_channels({1, 3, 4, 5}, resolved) == {4, 5}
    assert unmapped_channels({1, 2}, resolved) == set()
    # a mapping not resolved yet may scan any of them: none is declared unmapped
    assert unmapped_channels({4}, {**resolved, "carol:c": None}) == set()
    assert unmapped_channels({4}, {}) == {4}          # no mapping at all
