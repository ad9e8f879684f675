"""SetRecorder and SetWorker on the simulated Telegram with real storage (SQLite and
PostgreSQL): sets recorded from scanned pages, de-duplication by Telegram document id
before any byte and by sha256 after the download, too large and incomplete sets."""
from __future__ import annotations

import asyncio
import hashlib
import io
import os
import zipfile

import pytest
from prometheus_client import CollectorRegistry

from actors.account_messages import GetHistory
from actors.ingest.pipeline import IngestAccountPort, Phase2, SetRecorder, SetWorker
from actors.ingest.scan import Page, Target
from actors.metrics import Metrics
from actors.transfers import TransferPlanner
from ingest_sim import MIB, SimEnv
from storage.manifest import read_manifest

pytestmark = pytest.mark.timeout(60)


def zip_bytes(n_files: int = 3, size: int = 200_000, seed: bytes = b"") -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        for i in range(n_files):
            zf.writestr(f"dir/file{i}.bin", seed + os.urandom(size))
    return buf.getvalue()


class Rig:
    def __init__(self, env: SimEnv, *, max_archive_bytes: int = 8 * 1024 ** 3, settle: float = 3600.0):
        self.env = env
        self.storage = env.storage
        self.planner = TransferPlanner(env.storage, env.settings, env.clock, node="node-1")
        self.recorder = SetRecorder(env.storage, max_archive_bytes=max_archive_bytes, clock=env.clock,
                                    settle_seconds=settle)
        self.worker = SetWorker(env.storage, self.planner, env.settings, node="node-1",
                                staging_dir=env.tmp / "staging", window=4, clock=env.clock)
        self.worker.max_bytes = max_archive_bytes

    def scan(self, account: str, channel: str, channel_id: int, topic_id=None, since: int = 0):
        msgs = self.env.refs[account].ask(GetHistory(channel, topic_id, since), timeout=20).messages
        target = Target(channel, channel_id, topic_id)
        page = Page(msgs, max((m.id for m in msgs), default=since))
        out = self.recorder.record_page(target, page, account=account)
        for key in out.set_keys:
            self.recorder.refresh_set(key, at_present=True, account=account, outcome=out)
        return out

    def ingest_ready(self, account: str, channel_id: int):
        owner = self.worker.set_owner(account)
        port = IngestAccountPort(self.env.refs[account], timeout=20)
        outcomes, tried = [], set()
        while claimed := self.storage.claim_ready_sets(owner, 1, 600, channel_id=channel_id,
                                                       states=("ready", "downloading")):
            if claimed[0].set_key in tried:  # as the IngestActor does: once per round
                self.storage.release_set_lease(claimed[0].set_key, owner)
                break
            tried.add(claimed[0].set_key)
            outcomes.append(asyncio.run(self.worker.process(claimed[0], port, account=account)))
        return outcomes

    def pretend_uploaded(self, transfer_id: str) -> None:
        """Phase 1 as the uploader records it (the upload itself is the uploader's test)."""
        for p in self.storage.list_parts(transfer_id):
            self.storage.record_part_sent(transfer_id, p.index, message_id=1000 + p.index,
                                          document_id=None, account="alice")
        self.storage.mark_transfer_uploaded(transfer_id)


@pytest.fixture
def env(tmp_path, db_url):
    e = SimEnv(tmp_path, db_url)
    yield e
    e.close()


def test_page_records_archives_once_and_sets_become_ready(env):
    rig = Rig(env)
    env.post("one.zip", zip_bytes())
    env.post("notes.txt", b"hello")                  # not an archive: not recorded
    env.post("two.7z.001", os.urandom(3000))          # a byte split set, part 2 not seen yet
    out = rig.scan("alice", "sim_source_a", env.source_a)
    assert (out.seen, out.known, out.others) == (2, 0, 1)
    states = {s.base_name: s.state for s in env.storage.list_archive_sets()}
    assert states == {"one": "ready", "two": "waiting"}
    again = rig.scan("bob", "sim_source_a", env.source_a)  # the other account: nothing new to it
    assert (again.seen, again.known) == (0, 2)


def test_forward_is_skipped_before_any_byte_and_same_bytes_after_download(env):
    rig = Rig(env)
    data = zip_bytes()
    original = env.post("pack.zip", data)
    rig.scan("alice", "sim_source_a", env.source_a)
    [queued] = rig.ingest_ready("alice", env.source_a)
    assert queued.result == "queued" and queued.sha256 == hashlib.sha256(data).hexdigest()
    assert queued.downloaded_bytes == len(data)
    t = env.storage.get_transfer(queued.transfer_id)
    assert t.state == "planned" and t.sha256 == queued.sha256 and t.delete_original
    assert env.storage.get_package_meta(queued.sha256).index_state == "pending"

    # a forward of it in another channel (same Telegram document): skipped with no download
    env.forward(env.source_a, original, env.source_b)
    gets = env.count("bob", "GetFileRequest")
    rig.scan("bob", "sim_source_b", env.source_b)
    [dup] = rig.ingest_ready("bob", env.source_b)
    assert (dup.result, dup.transfer_id, dup.detail) == ("duplicate", queued.transfer_id, "document id")
    assert env.count("bob", "GetFileRequest") == gets
    [skip] = env.storage.list_skips(channel_id=env.source_b)
    assert skip.reason == "duplicate"

    # the same bytes posted again as a new document: downloaded, then the sha256 claim says
    # "stored already" once the first one is uploaded
    rig.pretend_uploaded(queued.transfer_id)
    env.post("pack-again.zip", data, channel=env.source_b)
    rig.scan("bob", "sim_source_b", env.source_b)
    [dup2] = rig.ingest_ready("bob", env.source_b)
    assert (dup2.result, dup2.transfer_id, dup2.detail) == ("duplicate", queued.transfer_id, "sha256")
    assert dup2.downloaded_bytes == len(data)
    assert env.storage.transfer_for_sha256(queued.sha256) == [env.storage.get_transfer(queued.transfer_id)]
    assert not list((env.tmp / "staging").glob("*pack-again*/*"))  # its staged copy is gone


@pytest.mark.parametrize("resolve", ["next round", "phase 2"])
def test_same_bytes_while_the_first_is_still_uploading_waits(env, resolve):
    rig = Rig(env)
    data = zip_bytes()
    env.post("a.zip", data)
    env.post("b.zip", data, channel=env.source_b)
    rig.scan("alice", "sim_source_a", env.source_a)
    [first] = rig.ingest_ready("alice", env.source_a)
    rig.scan("alice", "sim_source_b", env.source_b)
    [busy] = rig.ingest_ready("alice", env.source_b)
    assert busy.result == "busy" and "content claimed by" in busy.detail
    [s] = env.storage.list_archive_sets(channel_id=env.source_b)
    assert s.state == "downloading" and s.lease_owner is None  # claimable again later
    assert s.sha256 == first.sha256
    rig.pretend_uploaded(first.transfer_id)
    gets = env.count("alice", "GetFileRequest")
    if resolve == "next round":
        [dup] = rig.ingest_ready("alice", env.source_b)
        assert dup.result == "duplicate" and dup.transfer_id == first.transfer_id
    else:  # phase 2 settles it without asking Telegram anything
        phase2 = Phase2(env.storage, node="node-1", clock=env.clock, staging_dir=env.tmp / "staging")
        assert phase2.follow_uploads().skipped == {"duplicate": 1}
    assert env.count("alice", "GetFileRequest") == gets  # no bytes again
    [s] = env.storage.list_archive_sets(channel_id=env.source_b)
    assert (s.state, s.reason, s.transfer_id) == ("skipped", "duplicate", first.transfer_id)
    assert not [p for p in (env.tmp / "staging").rglob("*") if p.is_file() and "b.zip" in p.name]


def test_too_large_and_incomplete_sets_are_reported(env):
    rig = Rig(env, max_archive_bytes=100_000, settle=600)
    env.post("big.zip", os.urandom(150_000))
    env.post("half.zip.002", os.urandom(4096))  # part 1 never came
    out = rig.scan("alice", "sim_source_a", env.source_a)  # reaches the present: reported
    assert out.skipped == {"too_large": 1, "incomplete_set": 1}
    assert {s.base_name: s.state for s in env.storage.list_archive_sets()} == \
        {"big": "skipped", "half": "waiting"}
    env.clock.now += 601  # a later scan: still waiting, reported once only
    out = rig.scan("alice", "sim_source_a", env.source_a, since=10_000)
    rig.recorder.refresh_waiting(env.source_a, at_present=True, account="alice", outcome=out)
    assert out.skipped == {}
    assert env.storage.skips_by_reason(channel_id=env.source_a) == {"too_large": 1, "incomplete_set": 1}
    [half] = env.storage.list_archive_sets("waiting")
    assert half.base_name == "half"
    assert rig.ingest_ready("alice", env.source_a) == []  # nothing ready: no download at all
    assert env.count("alice", "GetFileRequest") == 0


def _ingest_then_lose(env, rig, data: bytes, *, remove_staged: bool = False):
    """``data`` posted to source A, ingested, uploaded and followed by phase 2, then lost after
    cleanup as the verifier's on_lost leaves it: its transfer failed, its set back to "ready"
    for a re-fetch (with ``remove_staged``, its staged files removed at cleanup first).
    Returns (the source message, the ingest outcome, the requeued set key, phase 2)."""
    original = env.post("pack.zip", data)
    rig.scan("alice", "sim_source_a", env.source_a)
    [first] = rig.ingest_ready("alice", env.source_a)
    rig.pretend_uploaded(first.transfer_id)
    phase2 = Phase2(env.storage, node="node-1", clock=env.clock)
    assert phase2.follow_uploads().ingested == 1
    if remove_staged:
        for src in read_manifest(env.storage.get_transfer(first.transfer_id).manifest_path).sources:
            os.unlink(src.path)
    env.storage.set_transfer_state(first.transfer_id, "failed", reason="lost after cleanup: part 1")
    [key] = env.storage.requeue_lost_package(first.transfer_id, reason="fetching again")
    return original, first, key, phase2


def test_a_lost_package_does_not_hold_its_content_for_dedup(env):
    """A package lost after cleanup (transfer failed, its set queued for a re-fetch) is no
    reason to skip another copy of its content: a forward of it is downloaded and uploaded
    and holds the content; the re-fetch then finds it stored again and fetches nothing."""
    rig = Rig(env)
    data = zip_bytes()
    original, first, key, phase2 = _ingest_then_lose(env, rig, data)

    env.forward(env.source_a, original, env.source_b)      # the same Telegram document
    rig.scan("bob", "sim_source_b", env.source_b)
    [copy] = rig.ingest_ready("bob", env.source_b)
    assert copy.result == "queued" and copy.transfer_id != first.transfer_id
    assert (copy.sha256, copy.downloaded_bytes) == (first.sha256, len(data))
    rig.pretend_uploaded(copy.transfer_id)
    assert env.storage.find_package(first.sha256).transfer_id == copy.transfer_id
    assert phase2.follow_uploads().ingested == 1

    gets = env.count("alice", "GetFileRequest")
    [again] = rig.ingest_ready("alice", env.source_a)        # the re-fetch of the lost one
    assert (again.result, again.transfer_id, again.detail) == (
        "duplicate", copy.transfer_id, "stored again")
    assert env.count("alice", "GetFileRequest") == gets     # nothing downloaded
    s = env.storage.get_archive_set(key)
    assert (s.state, s.reason, s.transfer_id) == ("skipped", "duplicate", copy.transfer_id)
    lost = env.storage.get_transfer(first.transfer_id)
    assert lost.state == "failed" and f"stored again as transfer {copy.transfer_id}" in lost.reason
    assert env.storage.find_ingested_document(
        env.storage.set_messages(key)[0].document_id).transfer_id == copy.transfer_id

def test_a_refetch_finds_the_content_stored_again_only_after_its_download(env):
    """No other copy when the re-fetch starts, but one is stored while it downloads (a
    local upload of the same archive): the claim after the download finds it, the files
    fetched again are removed, the set is skipped as that copy's duplicate and the lost
    transfer stays failed -- nothing is uploaded twice, result="stored_again"."""
    rig = Rig(env)
    registry = CollectorRegistry()
    rig.worker.metrics = Metrics(registry).add_ingest_metrics()
    data = zip_bytes()
    env.post("pack.zip", data)
    rig.scan("alice", "sim_source_a", env.source_a)
    [first] = rig.ingest_ready("alice", env.source_a)
    rig.pretend_uploaded(first.transfer_id)
    assert Phase2(env.storage, node="node-1", clock=env.clock).follow_uploads().ingested == 1
    lost = env.storage.get_transfer(first.transfer_id)
    for src in read_manifest(lost.manifest_path).sources:    # removed at its cleanup
        os.unlink(src.path)
    env.storage.set_transfer_state(lost.id, "failed", reason="lost after cleanup: part 1")
    [key] = env.storage.requeue_lost_package(lost.id, reason="fetching again")

    download = rig.worker._download

    async def download_while_a_copy_is_stored(*args, **kwargs):
        got = await download(*args, **kwargs)
        assert env.storage.find_package(lost.sha256) is None  # none before the download
        env.storage.create_transfer(
            "copy", source_path="/up/pack.zip", size=len(data), sha256=lost.sha256,
            destination=lost.destination, manifest_path="/m/copy", delete_original=False,
            parts=[(0, 0, len(data), lost.sha256, "pack.zip", 1)])
        rig.pretend_uploaded("copy")
        return got

    rig.worker._download = download_while_a_copy_is_stored
    gets = env.count("alice", "GetFileRequest")
    [again] = rig.ingest_ready("alice", env.source_a)
    assert (again.result, again.transfer_id, again.detail, again.downloaded_bytes) == (
        "duplicate", "copy", "stored again", len(data))
    assert env.count("alice", "GetFileRequest") > gets        # fetched, then not needed
    assert not [p for p in rig.worker.staged_dir(key).glob("*") if p.name.startswith("pack")]
    s = env.storage.get_archive_set(key)
    assert (s.state, s.reason, s.transfer_id) == ("skipped", "duplicate", "copy")
    lost = env.storage.get_transfer(lost.id)
    assert lost.state == "failed" and "stored again as transfer copy" in lost.reason
    assert env.storage.find_package(lost.sha256).transfer_id == "copy"
    assert not env.storage.release_claim(lost.sha256, f"node-1/{lost.id}")  # no claim left
    assert registry.get_sample_value("stashd_ingest_refetch_total",
                                     {"result": "stored_again"}) == 1


def test_a_new_copy_of_a_lost_package_is_indexed_from_its_own_files(env):
    """The lost package was never indexed and its staged files went at its cleanup: the
    copy of its content ingested again (a forward) takes the metadata over -- its transfer,
    its source -- and phase 2 indexes the copy's staged files instead of giving up."""
    rig = Rig(env)
    original, first, _key, phase2 = _ingest_then_lose(env, rig, zip_bytes(n_files=3), remove_staged=True)

    env.forward(env.source_a, original, env.source_b)
    rig.scan("bob", "sim_source_b", env.source_b)
    [copy] = rig.ingest_ready("bob", env.source_b)
    assert copy.result == "queued" and copy.sha256 == first.sha256
    rig.pretend_uploaded(copy.transfer_id)
    meta = env.storage.get_package_meta(first.sha256)
    assert (meta.transfer_id, meta.source_channel_id, meta.index_state) == (
        copy.transfer_id, env.storage.get_archive_set(copy.set_key).channel_id, "pending")
    assert asyncio.run(phase2.index_pending()).indexed == {"ok": 1}
    assert [e.path for e in env.storage.package_entries(first.sha256)] == \
        [f"dir/file{i}.bin" for i in range(3)]


def test_phase2_follows_the_upload_and_indexes_the_archive(env):
    rig = Rig(env)
    data = zip_bytes(n_files=4)
    env.post("idx.zip", data)
    rig.scan("alice", "sim_source_a", env.source_a)
    [queued] = rig.ingest_ready("alice", env.source_a)
    phase2 = Phase2(env.storage, node="node-1", clock=env.clock)
    assert phase2.follow_uploads().ingested == 0  # still planned
    assert asyncio.run(phase2.index_pending()).indexed == {}  # nothing uploaded: nothing to index
    rig.pretend_uploaded(queued.transfer_id)
    assert phase2.follow_uploads().ingested == 1
    [s] = env.storage.list_archive_sets()
    assert s.state == "ingested" and s.transfer_id == queued.transfer_id
    assert asyncio.run(phase2.index_pending()).indexed == {"ok": 1}
    meta = env.storage.get_package_meta(queued.sha256)
    assert meta.index_state == "ok" and meta.archive_format == "zip"
    assert [e.path for e in env.storage.package_entries(queued.sha256)] == \
        [f"dir/file{i}.bin" for i in range(4)]


@pytest.mark.parametrize("limit,names", [
    (2 * MIB, ["kit.zip.001", "kit.zip.002"]),           # each volume fits: one document per volume
    (MIB // 2, ["kit.zip.001", "kit.zip.002", "kit.zip.003"]),  # a volume is over: re-split
])
def test_sets_are_split_at_the_limit_the_node_gives(env, limit, names):
    data = zip_bytes(n_files=2, size=650_000)           # ~1.3 MB, cut into two volumes
    first, second = data[: len(data) * 6 // 10], data[len(data) * 6 // 10:]
    env.post("kit.zip.001", first)
    env.post("kit.zip.002", second)
    rig = Rig(env)
    rig.worker.limit_for = lambda: limit
    rig.scan("alice", "sim_source_a", env.source_a)
    [queued] = rig.ingest_ready("alice", env.source_a)
    assert queued.result == "queued" and queued.sha256 == hashlib.sha256(data).hexdigest()
    parts = env.storage.list_parts(queued.transfer_id)
    assert [p.file_name for p in parts] == names
    assert sum(p.length for p in parts) == len(data)
    if len(names) == 2:
        assert [p.length for p in parts] == [len(first), len(second)]
