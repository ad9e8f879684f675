"""TransferPlanner: roots and symlinks, directories, manifests first, de-duplication; fault points."""
from __future__ import annotations

import os

import pytest

from actors import faults
from actors.transfers import PathRefusedError, TransferPlanner, transfer_dict
from config import settings_from_dict
from storage import open_storage
from storage.manifest import read_manifest

MIB = 1024 * 1024


@pytest.fixture
def env(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    settings = settings_from_dict({
        "daemon": {"state_dir": str(tmp_path / "state")},
        "telegram": {"mode": "simulated"},
        "upload": {"roots": [str(root)], "destination": "stash_archive"},
    }, base_dir=tmp_path, env={})
    storage = open_storage(f"sqlite:///{tmp_path / 'db.sqlite'}")
    yield settings, storage, root
    storage.close()


def planner(settings, storage, **kw):
    kw.setdefault("limit_bytes", MIB)
    return TransferPlanner(storage, settings, node="test-node", **kw)


def test_refuses_every_bad_path_and_queues_nothing(env, tmp_path):
    settings, storage, root = env
    good = root / "good.bin"
    good.write_bytes(b"x" * 1000)
    outside = tmp_path / "secret.txt"
    outside.write_bytes(b"secret")
    (root / "sneaky").symlink_to(outside)             # inside the root, pointing outside
    (root / "empty.bin").write_bytes(b"")
    (root / "fifo").mkdir()
    with pytest.raises(PathRefusedError) as err:
        planner(settings, storage).plan([str(good), str(root / "sneaky"), str(outside),
                                         str(root / "missing.bin"), str(root / "empty.bin")])
    reasons = dict(err.value.refused)
    assert reasons == {str(root / "sneaky"): "outside the upload roots",
                       str(outside): "outside the upload roots",
                       str(root / "missing.bin"): "missing",
                       str(root / "empty.bin"): "empty"}
    assert storage.list_transfers() == []
    manifests = settings.upload.manifests_dir
    assert not manifests.exists() or not any(manifests.iterdir())   # refused before any hashing


def test_symlink_inside_a_directory_pointing_outside_refuses_the_directory(env, tmp_path):
    settings, storage, root = env
    d = root / "dir"
    d.mkdir()
    (d / "a.bin").write_bytes(b"a" * 10)
    (tmp_path / "outside.bin").write_bytes(b"o" * 10)
    (d / "link.bin").symlink_to(tmp_path / "outside.bin")
    with pytest.raises(PathRefusedError, match="outside the upload roots"):
        planner(settings, storage).plan([str(d)])
    assert storage.list_transfers() == []


def test_directory_becomes_one_transfer_per_file_with_relative_captions(env):
    settings, storage, root = env
    d = root / "photos"
    (d / "2024" / "may").mkdir(parents=True)
    (d / "b.bin").write_bytes(b"b" * 100)
    (d / "2024" / "a.bin").write_bytes(b"a" * 200)
    (d / "2024" / "may" / "c.bin").write_bytes(os.urandom(3 * MIB + 5))
    records = planner(settings, storage).plan([str(d)], caption="holiday")
    assert [r.source_path for r in records] == [str(d / "2024" / "a.bin"), str(d / "2024" / "may" / "c.bin"),
                                                str(d / "b.bin")]
    assert all(r.state == "planned" and r.destination == "stash_archive" for r in records)
    captions = []
    for r in records:
        m = read_manifest(r.manifest_path)   # manifest first: it exists for every row
        assert m.transfer_id == r.id and m.sha256 == r.sha256
        assert r.manifest_path == str(settings.upload.manifests_dir / f"{r.id}.stashd-manifest")
        captions.append(m.parts[0].caption.split("\n")[:2])
    assert captions == [["holiday", "2024/a.bin"], ["holiday", "2024/may/c.bin"], ["holiday", "b.bin"]]
    big = records[1]
    assert big.part_count == 4   # 3 MiB + 5 B over a 1 MiB limit
    assert [p.length for p in storage.list_parts(big.id)] == [MIB, MIB, MIB, 5]


def _uploaded_twin(env):
    """Two files of the same content; the first planned and uploaded. Returns (planner, first)."""
    settings, storage, root = env
    (root / "one.bin").write_bytes(b"same" * 1000)
    (root / "two.bin").write_bytes(b"same" * 1000)
    p = planner(settings, storage)
    [first] = p.plan([str(root / "one.bin")])
    for part in storage.list_parts(first.id):
        storage.record_part_sent(first.id, part.index, message_id=10 + part.index, document_id=None,
                                 account="alice")
    storage.mark_transfer_uploaded(first.id)
    return p, first


def test_stored_content_completes_by_reference(env):
    _settings, storage, root = env
    p, first = _uploaded_twin(env)
    [second] = p.plan([str(root / "two.bin")])
    assert second.state == "uploaded" and second.duplicate_of == first.id
    assert all(part.message_id is None for part in storage.list_parts(second.id))  # nothing uploaded
    view = transfer_dict(second, storage.list_parts(second.id))
    assert view["duplicate_of"] == first.id and view["state"] == "uploaded"


def test_content_of_a_lost_package_is_uploaded_again_not_by_reference(env):
    _settings, storage, root = env
    p, first = _uploaded_twin(env)
    storage.set_transfer_state(first.id, "failed", reason="lost after cleanup: part 1")
    [second] = p.plan([str(root / "two.bin")])
    assert second.state == "planned" and second.duplicate_of is None  # to be uploaded


def test_content_claimed_by_another_transfer_is_planned_anyway(env):
    settings, storage, root = env
    (root / "one.bin").write_bytes(b"same" * 1000)
    (root / "two.bin").write_bytes(b"same" * 1000)
    a, b = planner(settings, storage).plan([str(root / "one.bin"), str(root / "two.bin")])
    assert (a.state, b.state) == ("planned", "planned")
    assert a.sha256 == b.sha256 and a.id != b.id


def test_destination_is_required(env):
    settings, storage, root = env
    import dataclasses
    settings = dataclasses.replace(settings, upload=dataclasses.replace(settings.upload, destination=""))
    (root / "f.bin").write_bytes(b"f")
    with pytest.raises(ValueError, match="destination"):
        planner(settings, storage).plan([str(root / "f.bin")])
    assert planner(settings, storage).plan([str(root / "f.bin")], dest="other")[0].destination == "other"


def test_default_limit_is_the_smallest_ready_account_limit(env):
    settings, storage, _ = env
    storage.upsert_account("alice", upload_limit_bytes=2000 * MIB, state="ready")
    storage.upsert_account("bob", upload_limit_bytes=4000 * MIB, state="ready")
    storage.upsert_account("carol", upload_limit_bytes=100 * MIB, state="paused")
    p = TransferPlanner(storage, settings, node="n")
    assert p.default_limit() == 2000 * MIB      # account limits carry the margin already
    storage.set_account_state("alice", "error")
    storage.set_account_state("bob", "error")
    assert p.default_limit() == 2000 * MIB - settings.telegram.upload_limit_margin_bytes


def test_fault_points_parse_and_count_hits():
    faults.reset_hits()
    assert faults.parse_faults("a, b@3") == {"a": 1, "b": 3}
    with pytest.raises(ValueError):
        faults.parse_faults("a@x")
    env = {faults.ENV: "after_record@2"}
    assert [faults.should_fire("after_record", env) for _ in range(3)] == [False, True, False]
    assert not faults.should_fire("mid_part_upload", env)
    assert not faults.should_fire("after_record", {})
    faults.reset_hits()


def test_inbox_plans_only_settled_files_once(env):
    from actors.inbox import InboxScanner

    settings, storage, root = env
    inbox = root / "inbox"
    (inbox / "sub").mkdir(parents=True)
    f = inbox / "sub" / "a.bin"
    f.write_bytes(b"a" * 100)
    scanner = InboxScanner(planner(settings, storage), storage, inbox)
    assert scanner.scan() == []                      # first sight: not settled yet
    with open(f, "ab") as fh:                        # still being written
        fh.write(b"more")
    assert scanner.scan() == []
    [t] = scanner.scan()                             # unchanged since the last scan
    assert t.source_path == str(f) and t.size == 104
    assert scanner.scan() == []
    fresh = InboxScanner(planner(settings, storage), storage, inbox)   # after a restart
    fresh.scan()
    assert fresh.scan() == [] and len(storage.list_transfers()) == 1


def test_orphan_manifests_are_queued_with_the_same_plan_or_removed(env):
    """A crash at after_manifest_write leaves manifests without rows: recover_orphans."""
    import time

    from storage.manifest import build_manifest, write_manifest
    settings, storage, root = env
    p = planner(settings, storage)
    files = {n: root / f"{n}.bin" for n in ("kept", "changed", "gone", "again")}
    for name, f in files.items():
        f.write_bytes(name.encode() * (MIB // 2))
    orphans = {}
    for name, f in files.items():   # what _queue leaves when it dies before the row
        m = build_manifest(f, "stash_archive", MIB, caption=name)
        orphans[name] = (m, write_manifest(m, p.manifest_path(m.transfer_id)))
    files["changed"].write_bytes(b"different now")
    files["gone"].unlink()
    [requeued] = p.plan([str(files["again"])])        # e.g. the inbox planned it again
    garbage = p.manifest_path("not-a-manifest")
    garbage.write_bytes(b"\x00junk")

    assert p.recover_orphans(older_than=time.time() - 3600) == []   # all written "just now"
    [queued] = p.recover_orphans(older_than=time.time() + 1)
    kept, kept_path = orphans["kept"]
    assert (queued.id, queued.state, queued.manifest_path) == (kept.transfer_id, "planned", str(kept_path))
    assert [(x.index, x.random_id) for x in storage.list_parts(queued.id)] == [
        (x.index, x.random_id) for x in kept.parts]             # the manifest's plan, reused
    left = sorted(x.name for x in p.manifest_path("x").parent.iterdir())
    assert left == sorted([kept_path.name, f"{requeued.id}.stashd-manifest", garbage.name])
    assert sorted(t.id for t in storage.list_transfers()) == sorted([kept.transfer_id, requeued.id])
    assert p.recover_orphans(older_than=time.time() + 1) == []  # idempotent


def test_orphan_manifests_of_ingest_sets_are_left_to_the_ingest_pipeline(tmp_path):
    import time

    from storage.manifest import build_manifest, write_manifest
    root = tmp_path / "root"
    staging = root / "staging"
    staging.mkdir(parents=True)
    settings = settings_from_dict({
        "daemon": {"state_dir": str(tmp_path / "state")}, "telegram": {"mode": "simulated"},
        "upload": {"roots": [str(root)], "destination": "stash_archive"},
        "ingest": {"staging_dir": str(staging)}}, base_dir=tmp_path, env={})
    storage = open_storage(f"sqlite:///{tmp_path / 'db.sqlite'}")
    try:
        p = planner(settings, storage)
        (staging / "set.zip").write_bytes(b"z" * 1000)
        m = build_manifest(staging / "set.zip", "stash_archive", MIB)
        path = write_manifest(m, p.manifest_path(m.transfer_id))
        assert p.recover_orphans(older_than=time.time() + 1) == []
        assert path.exists() and storage.list_transfers() == []
    finally:
        storage.close()
