"""actors.verifier_core.Verifier and actors.cleanup.Cleaner without threads: a fake
message port, real storage (SQLite file), real files and manifests, an injected clock."""
from __future__ import annotations

import dataclasses
import hashlib
import os
import random

import pytest

from actors.account_messages import DocumentInfo, MessageInfo
from actors.cleanup import Cleaner
from actors.verifier_core import (
    Verifier, batched, check_original, compute_backoff, document_mismatch, sample_blocks,
)
from config.schema import VerifySettings
from storage import open_storage
from storage.manifest import build_manifest, read_manifest, write_manifest
from storage.transfers import TransferStateError

MIB = 1024 * 1024
CHANNEL = "stash_archive"


class Clock:
    def __init__(self):
        self.now = 1_700_000_000.0

    def __call__(self):
        return self.now


class FakePort:
    """The destination channel(s) as dicts; every GetMessages call is logged."""

    def __init__(self):
        self.channels: dict[str, dict[int, MessageInfo]] = {}
        self.blobs: dict[int, bytes] = {}          # document id -> bytes (deep check)
        self.calls: list[tuple[str, str, tuple[int, ...]]] = []
        self.downloads: list[tuple[int, int, int]] = []
        self.failing: dict[str, Exception] = {}    # account -> raised on every call
        self.accounts = ["alice", "bob"]
        self.next_id = 1000

    def post(self, channel, data: bytes, file_name: str) -> MessageInfo:
        self.next_id += 1
        doc = DocumentInfo(id=self.next_id * 7, access_hash=1, file_reference=b"", size=len(data),
                           file_name=file_name, mime_type="application/octet-stream", dc_id=2)
        info = MessageInfo(id=self.next_id, date=0.0, text="", document=doc)
        self.channels.setdefault(channel, {})[info.id] = info
        self.blobs[doc.id] = data
        return info

    def delete(self, channel, message_id):
        del self.channels[channel][message_id]

    # -- MessagePort ------------------------------------------------------------------
    def readers(self, channel, preferred=()):
        return sorted(self.accounts, key=lambda a: (a not in preferred, a))

    def get_messages(self, account, channel, ids):
        self.calls.append((account, channel, tuple(ids)))
        if account in self.failing:
            raise self.failing[account]
        assert len(ids) <= 100
        msgs = self.channels.get(channel, {})
        return tuple(msgs.get(i) for i in ids)

    def download_range(self, account, document, offset, limit):
        self.downloads.append((document.id, offset, limit))
        return self.blobs[document.id][offset:offset + limit]


class Env:
    def __init__(self, tmp_path, **settings):
        self.tmp = tmp_path
        self.clock = Clock()
        self.storage = open_storage(f"sqlite:///{tmp_path / 'stashd.db'}", clock=self.clock)
        self.port = FakePort()
        base = dict(first_check_delay_seconds=60.0, interval_seconds=300.0,
                    verified_interval_seconds=86400.0, lease_seconds=120.0, batch_size=100,
                    max_attempts=3, backoff_initial_seconds=30.0, backoff_max_seconds=600.0,
                    cleanup_grace_seconds=3600.0, deep_check=False, deep_check_samples=2)
        base.update(settings)
        self.settings = VerifySettings(**base)
        self.lost: list = []
        self.verifier = self.make_verifier("node/verifier#1")
        self.n = 0

    def make_verifier(self, owner, **kw):
        return Verifier(self.storage, self.port, self.settings, owner=owner, clock=self.clock,
                        rng=random.Random(7), on_lost=lambda *a: self.lost.append(a), **kw)

    def transfer(self, size=1000, *, limit=2 * MIB, delete_original=False, channel=CHANNEL,
                 upload=True):
        """A real file, its manifest and transfer row; parts 'sent' to the fake channel."""
        self.n += 1
        path = self.tmp / f"file{self.n}.bin"
        path.write_bytes(os.urandom(size))
        m = build_manifest(path, channel, limit, caption="c")
        mpath = write_manifest(m, self.tmp / f"{m.transfer_id}.manifest")
        self.storage.create_transfer(
            m.transfer_id, source_path=str(path), size=size, sha256=m.sha256, destination=channel,
            manifest_path=str(mpath), delete_original=delete_original,
            parts=[(p.index, p.offset, p.length, p.sha256, p.file_name, p.random_id) for p in m.parts])
        if upload:
            self.upload(m.transfer_id)
        return m.transfer_id

    def bare_transfer(self, size=100, channel=CHANNEL):
        """A transfer row and its one message, no file or manifest (checks that pass never
        read them)."""
        self.n += 1
        tid = f"bare-{self.n:05d}"
        info = self.port.post(channel, b"x" * size, f"bare{self.n}.bin")
        self.storage.create_transfer(
            tid, source_path=f"/nowhere/{tid}", size=size, sha256=f"{self.n:064x}",
            destination=channel, manifest_path=f"/nowhere/{tid}.manifest", delete_original=False,
            parts=[(0, 0, size, "0" * 64, f"bare{self.n}.bin", self.n)])
        self.storage.record_part_sent(tid, 0, message_id=info.id, document_id=info.document.id,
                                      account="alice")
        self.storage.mark_transfer_uploaded(tid, first_check_delay=60)
        return tid

    def upload(self, tid, parts=None):
        """What the uploader does: send the parts without a message, mark uploaded."""
        t = self.storage.get_transfer(tid)
        m = read_manifest(t.manifest_path)
        data = open(t.source_path, "rb").read()
        self.storage.set_transfer_state(tid, "uploading") if t.state == "planned" else None
        for p in self.storage.parts_without_message(tid):
            assert parts is None or p.index in parts
            plan = m.parts[p.index]
            assert plan.random_id == p.random_id  # the manifest was rewritten first
            info = self.port.post(t.destination, data[plan.offset:plan.end], plan.file_name)
            self.storage.record_part_sent(tid, p.index, message_id=info.id,
                                          document_id=info.document.id, account="alice")
        return self.storage.mark_transfer_uploaded(
            tid, first_check_delay=self.settings.first_check_delay_seconds)

    def due(self):
        self.clock.now += self.settings.first_check_delay_seconds

    def state(self, tid):
        return self.storage.get_transfer(tid).state

    def close(self):
        self.storage.close()


@pytest.fixture
def env(tmp_path):
    e = Env(tmp_path)
    yield e
    e.close()


# -- pure helpers ----------------------------------------------------------------------------
def test_compute_backoff_doubles_and_caps():
    assert [compute_backoff(n, 30, 600) for n in range(7)] == [0, 30, 60, 120, 240, 480, 600]
    assert compute_backoff(10_000, 30, 600) == 600
    assert compute_backoff(3, 0, 600) == 0


def test_batched_never_exceeds_the_size():
    assert [len(b) for b in batched(list(range(250)), 100)] == [100, 100, 50]
    with pytest.raises(ValueError):
        list(batched([1], 0))


def test_document_mismatch_wants_size_name_and_document_id(env):
    tid = env.transfer(500)
    part = env.storage.list_parts(tid)[0]
    info = env.port.channels[CHANNEL][part.message_id]
    assert document_mismatch(part, info) is None
    assert "gone" in document_mismatch(part, None)
    assert "no document" in document_mismatch(part, dataclasses.replace(info, document=None))
    doc = info.document
    assert "size" in document_mismatch(part, dataclasses.replace(
        info, document=dataclasses.replace(doc, size=doc.size + 1)))
    assert "file name" in document_mismatch(part, dataclasses.replace(
        info, document=dataclasses.replace(doc, file_name="other.bin")))
    assert "document 1" in document_mismatch(part, dataclasses.replace(
        info, document=dataclasses.replace(doc, id=1)))


def test_sample_blocks_are_distinct_and_whole():
    assert sample_blocks(3 * MIB + 1, 8) == [0, 1, 2, 3]
    got = sample_blocks(40 * MIB, 3, random.Random(1))
    assert len(set(got)) == 3 and got == sorted(got) and all(0 <= b < 40 for b in got)


# -- checking ---------------------------------------------------------------------------------
def test_nothing_is_checked_before_the_first_check_delay(env):
    tid = env.transfer()
    assert env.verifier.run_pass() == [] and env.port.calls == []
    env.due()
    [o] = env.verifier.run_pass()
    assert (o.transfer_id, o.result, o.state) == (tid, "verified", "verified")
    t = env.storage.get_transfer(tid)
    assert t.lease_owner is None and t.last_check_at == env.clock.now
    # a verified transfer waits for the end of the cleanup grace period (< slow cycle),
    # counted from its verification ("verified since")
    assert t.next_check_at == env.clock.now + env.settings.cleanup_grace_seconds
    assert all(p.verified_at == env.clock.now and p.misses == 0 for p in env.storage.list_parts(tid))


def test_ids_are_batched_at_most_100_per_call_per_channel(env):
    ids = [env.bare_transfer() for _ in range(130)]
    ids += [env.bare_transfer(channel="other_stash") for _ in range(30)]
    ids.append(env.transfer(3 * MIB + 5, limit=MIB))  # 4 parts
    env.due()
    outcomes = env.verifier.run_pass()
    assert sorted(o.transfer_id for o in outcomes) == sorted(ids)
    assert {o.result for o in outcomes} == {"verified"}
    sizes = sorted((ch, len(ids_)) for _, ch, ids_ in env.port.calls)
    assert sizes == [("other_stash", 30), (CHANNEL, 34), (CHANNEL, 100)]
    assert env.verifier.calls == 3


def test_a_small_batch_size_is_honoured(tmp_path):
    e = Env(tmp_path, batch_size=7)
    try:
        for _ in range(20):
            e.bare_transfer()
        e.due()
        e.verifier.run_until_idle()
        assert [len(c[2]) for c in e.port.calls] == [7, 7, 6]
    finally:
        e.close()


def test_an_error_is_not_a_pass_and_backs_off(env):
    tid = env.transfer()
    env.due()
    env.port.failing = {"alice": TimeoutError("no answer"), "bob": RuntimeError("FLOOD_WAIT_30")}
    [o] = env.verifier.run_pass()
    assert o.result == "error" and "no answer" in o.detail and "FLOOD_WAIT_30" in o.detail
    t = env.storage.get_transfer(tid)
    assert t.state == "verifying" and t.lease_owner is None
    assert t.next_check_at == env.clock.now + 30
    parts = env.storage.list_parts(tid)
    assert all(p.verified_at is None and p.misses == 0 for p in parts)  # neither pass nor miss
    env.clock.now += 30
    [o] = env.verifier.run_pass()
    assert o.result == "error"
    assert env.storage.get_transfer(tid).next_check_at == env.clock.now + 60  # doubled
    # the next account answers when the first one cannot: that is a pass
    env.port.failing = {"alice": TimeoutError("no answer")}
    env.clock.now += 60
    [o] = env.verifier.run_pass()
    assert (o.result, o.state) == ("verified", "verified")
    assert [c[0] for c in env.port.calls[-2:]] == ["alice", "bob"]


def test_no_readable_account_is_an_error_too(env):
    tid = env.transfer()
    env.due()
    env.port.accounts = []
    [o] = env.verifier.run_pass()
    assert o.result == "error" and "no account can read" in o.detail
    assert env.storage.list_parts(tid)[0].verified_at is None


def test_a_missing_part_is_reuploaded_with_a_fresh_random_id(env):
    tid = env.transfer(3 * MIB + 5, limit=MIB)
    env.due()
    before = env.storage.list_parts(tid)
    env.port.delete(CHANNEL, before[2].message_id)
    [o] = env.verifier.run_pass()
    assert (o.result, o.state, o.missing) == ("reuploading", "uploading", (2,))
    t = env.storage.get_transfer(tid)
    assert t.attempts == 1 and t.account is None and t.lease_owner is None
    after = env.storage.list_parts(tid)
    assert [p.message_id for p in after] == [p.message_id for p in before[:2]] + [None, before[3].message_id]
    assert after[2].random_id != before[2].random_id and after[2].misses == 1
    manifest = read_manifest(t.manifest_path)
    assert manifest.parts[2].random_id == after[2].random_id  # manifest first, same id
    assert [p.random_id for p in manifest.parts[:2]] == [p.random_id for p in before[:2]]
    # the dispatcher/uploader resumes the part; the next check verifies it
    env.upload(tid, parts={2})
    env.due()
    [o] = env.verifier.run_pass()
    assert (o.result, o.state) == ("verified", "verified")
    assert env.storage.list_parts(tid)[2].message_id != before[2].message_id


def test_a_wrong_document_is_a_miss(env):
    tid = env.transfer(500)
    env.due()
    part = env.storage.list_parts(tid)[0]
    info = env.port.channels[CHANNEL][part.message_id]
    env.port.channels[CHANNEL][part.message_id] = dataclasses.replace(
        info, document=dataclasses.replace(info.document, size=499))
    [o] = env.verifier.run_pass()
    assert o.result == "reuploading" and "size 499" in o.detail


@pytest.fixture
def quick(tmp_path):
    e = Env(tmp_path, first_check_delay_seconds=10.0)  # sooner than the 30 s backoff
    yield e
    e.close()


def test_backoff_between_reuploads_then_max_attempts_fails_keeping_everything(quick):
    env = quick
    tid = env.transfer(800)
    src = env.storage.get_transfer(tid).source_path
    env.due()
    results = []
    for _ in range(3):  # max_attempts = 3
        env.port.delete(CHANNEL, env.storage.list_parts(tid)[0].message_id)
        [o] = env.verifier.run_pass()
        if o.result == "waiting":
            t = env.storage.get_transfer(tid)
            sent = env.storage.list_parts(tid)[0].sent_at
            assert t.state == "verifying"
            assert t.next_check_at == sent + compute_backoff(t.attempts, 30, 600)
            results.append(("waiting", t.attempts))
            env.clock.now = t.next_check_at
            [o] = env.verifier.run_pass()
        results.append((o.result, env.storage.get_transfer(tid).attempts))
        env.upload(tid)
        env.due()
    assert results == [("reuploading", 1), ("waiting", 1), ("reuploading", 2),
                       ("waiting", 2), ("reuploading", 3)]
    env.port.delete(CHANNEL, env.storage.list_parts(tid)[0].message_id)
    [o] = env.verifier.run_pass()
    t = env.storage.get_transfer(tid)
    assert (o.result, t.state) == ("failed", "failed")
    assert "missing after 3 re-upload(s)" in t.reason
    assert os.path.exists(src) and os.path.exists(t.manifest_path)
    assert env.storage.list_parts(tid)[0].misses == 6  # 4 deletions, each waiting check counts too
    env.clock.now += 10 * 86400
    assert env.verifier.run_pass() == []  # failed is left to the operator


@pytest.mark.parametrize("change", ["modified", "touched", "gone"])
def test_a_changed_original_fails_the_transfer_and_uploads_nothing(env, change):
    tid = env.transfer(3000)
    t = env.storage.get_transfer(tid)
    env.due()
    part = env.storage.list_parts(tid)[0]
    env.port.delete(CHANNEL, part.message_id)
    if change == "modified":  # same size, same mtime: only the hash tells
        st = os.stat(t.source_path)
        with open(t.source_path, "r+b") as fh:
            fh.write(b"X" * 10)
        os.utime(t.source_path, ns=(st.st_atime_ns, st.st_mtime_ns))
    elif change == "touched":
        os.utime(t.source_path, ns=(1, 1))
    else:
        os.unlink(t.source_path)
    [o] = env.verifier.run_pass()
    t = env.storage.get_transfer(tid)
    assert (o.result, t.state) == ("failed", "failed")
    expected = {"modified": "original changed: part 1 differs",
                "touched": "original changed", "gone": "original gone"}[change]
    assert t.reason.startswith(expected), t.reason
    after = env.storage.list_parts(tid)[0]
    assert (after.random_id, after.message_id) == (part.random_id, part.message_id)  # nothing queued
    assert read_manifest(t.manifest_path).parts[0].random_id == part.random_id


def test_check_original_whole_file_and_parts(env):
    tid = env.transfer(3 * MIB, limit=MIB)
    m = read_manifest(env.storage.get_transfer(tid).manifest_path)
    assert check_original(m) is None and check_original(m, [0, 2]) is None
    with open(m.sources[0].path, "r+b") as fh:
        fh.seek(2 * MIB + 5)
        fh.write(b"!")
    os.utime(m.sources[0].path, ns=(m.sources[0].mtime_ns, m.sources[0].mtime_ns))
    assert check_original(m, [0, 1]) is None
    assert "part 3 differs" in check_original(m, [2])
    assert "content differs" in check_original(m)


# -- cleanup ------------------------------------------------------------------------------------
def test_cleanup_only_after_verified_and_the_grace_period(env):
    tid = env.transfer(2000, delete_original=True)
    t = env.storage.get_transfer(tid)
    env.clock.now += 10
    assert env.verifier.run_pass() == []
    assert os.path.exists(t.source_path)  # not due, not verified: nothing touched
    env.due()
    env.port.delete(CHANNEL, env.storage.list_parts(tid)[0].message_id)
    [o] = env.verifier.run_pass()
    assert o.result == "reuploading" and os.path.exists(t.source_path)
    env.clock.now += 7200  # grace passed, but the transfer is not verified
    assert os.path.exists(t.source_path)
    env.upload(tid)
    env.due()
    [o] = env.verifier.run_pass()
    assert (o.result, o.state) == ("verified", "verified") and os.path.exists(t.source_path)
    env.clock.now = env.storage.get_transfer(tid).next_check_at  # end of the grace period
    [o] = env.verifier.run_pass()
    assert (o.result, o.state) == ("cleaned", "cleaned")
    assert not os.path.exists(t.source_path) and not os.path.exists(t.manifest_path)
    rec = env.storage.get_transfer(tid)
    assert rec.next_check_at == env.clock.now + env.settings.verified_interval_seconds
    assert all(p.message_id is not None for p in env.storage.list_parts(tid))  # compact record
    assert env.verifier.cleanups == 1


def test_cleanup_keeps_the_original_when_the_policy_says_so_or_it_changed(env):
    keep = env.transfer(100, delete_original=False)
    changed = env.transfer(100, delete_original=True)
    src = env.storage.get_transfer(changed).source_path
    os.utime(src, ns=(5, 5))  # changed after upload: never deleted by cleanup
    env.clock.now += 86400
    assert {o.result for o in env.verifier.run_pass()} == {"verified"}  # never at the first check
    env.clock.now += env.settings.cleanup_grace_seconds
    outcomes = {o.transfer_id: o for o in env.verifier.run_pass()}
    assert outcomes[keep].result == outcomes[changed].result == "cleaned"
    assert os.path.exists(env.storage.get_transfer(keep).source_path)
    # the original was kept: so is its manifest (a later loss is re-uploaded from it)
    assert os.path.exists(env.storage.get_transfer(keep).manifest_path)
    assert "manifest kept" in outcomes[keep].detail
    assert os.path.exists(src) and "changed since it was uploaded" in outcomes[changed].detail
    # a changed original is nothing to re-upload from: its manifest goes
    assert not os.path.exists(env.storage.get_transfer(changed).manifest_path)


def test_a_failed_or_unverified_transfer_is_never_cleaned(env):
    tid = env.transfer(100, delete_original=True)
    cleaner = Cleaner(env.storage, grace_seconds=0, clock=env.clock)
    t = env.storage.get_transfer(tid)
    parts = env.storage.list_parts(tid)
    with pytest.raises(TransferStateError):
        cleaner.clean(t, parts)  # uploaded, not verified
    env.storage.set_transfer_state(tid, "failed", reason="x")
    with pytest.raises(TransferStateError):
        cleaner.clean(env.storage.get_transfer(tid), parts)
    assert os.path.exists(t.source_path) and os.path.exists(t.manifest_path)


def test_a_miss_after_cleanup_is_reported_as_lost(env):
    tid = env.transfer(100, delete_original=True)
    env.clock.now += 86400
    [o] = env.verifier.run_pass()
    assert o.result == "verified"
    env.clock.now += env.settings.cleanup_grace_seconds
    [o] = env.verifier.run_pass()
    assert o.result == "cleaned"
    env.port.delete(CHANNEL, env.storage.list_parts(tid)[0].message_id)
    env.clock.now += env.settings.verified_interval_seconds  # the slow cycle
    [o] = env.verifier.run_pass()
    t = env.storage.get_transfer(tid)
    assert (o.result, t.state) == ("lost", "failed")
    assert t.reason.startswith("lost after cleanup: message")
    assert "the manifest was removed at cleanup" in t.reason
    assert len(env.lost) == 1 and env.lost[0][0].id == tid and env.lost[0][2] == [0]
    assert env.verifier.lost == 1


def cleaned(env, tid):
    """Verify ``tid`` (first check), then clean it after the grace period."""
    env.clock.now += 86400
    assert {o.result for o in env.verifier.run_pass() if o.transfer_id == tid} == {"verified"}
    env.clock.now += env.settings.cleanup_grace_seconds
    assert [o.result for o in env.verifier.run_pass() if o.transfer_id == tid] == ["cleaned"]
    assert env.state(tid) == "cleaned"


def test_a_miss_after_cleanup_with_the_original_kept_is_reuploaded(env):
    tid = env.transfer(3 * MIB + 5, limit=MIB, delete_original=False)
    cleaned(env, tid)
    t = env.storage.get_transfer(tid)
    before = env.storage.list_parts(tid)
    env.port.delete(CHANNEL, before[1].message_id)
    env.clock.now += env.settings.verified_interval_seconds
    [o] = env.verifier.run_pass()
    assert (o.result, o.state, o.missing) == ("reuploading", "uploading", (1,))
    assert env.lost == [] and env.verifier.lost == 0
    after = env.storage.list_parts(tid)
    assert after[1].message_id is None and after[1].random_id != before[1].random_id
    assert read_manifest(t.manifest_path).parts[1].random_id == after[1].random_id  # manifest first
    assert env.storage.get_transfer(tid).attempts == 1
    env.upload(tid, parts={1})   # only the lost part is sent again
    env.due()
    [o] = env.verifier.run_pass()
    assert (o.result, o.state) == ("verified", "verified")
    env.clock.now += env.settings.cleanup_grace_seconds
    [o] = env.verifier.run_pass()
    assert (o.result, o.state) == ("cleaned", "cleaned")
    assert os.path.exists(t.source_path) and os.path.exists(t.manifest_path)


@pytest.mark.parametrize("change", ["gone", "content", "content, no manifest"])
def test_a_miss_after_cleanup_with_the_original_changed_stays_lost(env, change):
    tid = env.transfer(2000, delete_original=False)
    cleaned(env, tid)
    t = env.storage.get_transfer(tid)
    if change == "gone":
        os.unlink(t.source_path)
    else:  # same size, mtime put back: only the sha256 tells
        st = os.stat(t.source_path)
        with open(t.source_path, "r+b") as fh:
            fh.write(b"\0" * 16)
        os.utime(t.source_path, ns=(st.st_atime_ns, st.st_mtime_ns))
    if change.endswith("no manifest"):  # removed by an older cleanup: a rebuild is refused
        os.unlink(t.manifest_path)
    env.port.delete(CHANNEL, env.storage.list_parts(tid)[0].message_id)
    posted = env.port.next_id
    env.clock.now += env.settings.verified_interval_seconds
    [o] = env.verifier.run_pass()
    t = env.storage.get_transfer(tid)
    assert (o.result, t.state) == ("lost", "failed")
    why = {"gone": "original gone", "content": "original changed: content differs",
           "content, no manifest": "original changed: the content differs"}[change]
    assert t.reason.startswith("lost after cleanup: message") and why in t.reason, t.reason
    assert env.storage.list_parts(tid)[0].message_id is not None  # nothing queued for upload
    assert env.port.next_id == posted and len(env.lost) == 1


def test_a_manifest_removed_by_an_older_cleanup_is_rebuilt_from_the_kept_original(env):
    tid = env.transfer(3 * MIB + 5, limit=MIB, delete_original=False)
    cleaned(env, tid)
    t = env.storage.get_transfer(tid)
    old = read_manifest(t.manifest_path)
    os.unlink(t.manifest_path)   # what cleanup did before it kept the manifest of a kept original
    before = env.storage.list_parts(tid)
    env.port.delete(CHANNEL, before[2].message_id)
    env.clock.now += env.settings.verified_interval_seconds
    [o] = env.verifier.run_pass()
    assert (o.result, o.state, o.missing) == ("reuploading", "uploading", (2,))
    m = read_manifest(t.manifest_path)
    assert m.transfer_id == tid and m.sha256 == t.sha256
    assert [(p.offset, p.length, p.sha256, p.file_name, p.chunk_hashes) for p in m.parts] == \
        [(p.offset, p.length, p.sha256, p.file_name, p.chunk_hashes) for p in old.parts]
    after = env.storage.list_parts(tid)
    assert [p.random_id for p in m.parts] == [p.random_id for p in after]  # manifest first
    assert after[2].random_id != before[2].random_id
    assert [p.random_id for p in after[:2]] == [p.random_id for p in before[:2]]
    env.upload(tid, parts={2})   # the uploader reads the rebuilt manifest
    env.due()
    [o] = env.verifier.run_pass()
    assert (o.result, o.state) == ("verified", "verified")


def test_a_manifest_rebuild_runs_off_the_pass_too(env):
    executor, done = hashed_env(env)
    tid = env.transfer(2 * MIB, limit=MIB, delete_original=False)
    cleaned(env, tid)
    os.unlink(env.storage.get_transfer(tid).manifest_path)
    env.port.delete(CHANNEL, env.storage.list_parts(tid)[0].message_id)
    env.clock.now += env.settings.verified_interval_seconds
    [o] = env.verifier.run_pass()
    assert (o.result, o.state) == ("waiting", "cleaned") and len(executor.jobs) == 1
    assert not os.path.exists(env.storage.get_transfer(tid).manifest_path)
    executor.run_all()
    env.storage.schedule_check(tid)
    [o] = env.verifier.run_pass()
    assert (o.result, o.state, o.missing) == ("reuploading", "uploading", (0,))


def test_retry_of_a_lost_transfer_reuploads_once_the_original_is_back(env, tmp_path):
    tid = env.transfer(2000, delete_original=False)
    cleaned(env, tid)
    t = env.storage.get_transfer(tid)
    away = tmp_path / "away.bin"
    os.rename(t.source_path, away)  # e.g. its disk was not mounted during the check
    env.port.delete(CHANNEL, env.storage.list_parts(tid)[0].message_id)
    env.clock.now += env.settings.verified_interval_seconds
    [o] = env.verifier.run_pass()
    assert o.result == "lost" and "original gone" in env.storage.get_transfer(tid).reason
    assert env.storage.retry_transfer(tid).state == "verifying"   # still gone: fails again
    [o] = env.verifier.run_pass()
    assert (o.result, o.state) == ("failed", "failed") and "original gone" in o.detail
    os.rename(away, t.source_path)
    env.storage.retry_transfer(tid)
    [o] = env.verifier.run_pass()
    assert (o.result, o.state, o.missing) == ("reuploading", "uploading", (0,))
    env.upload(tid)
    env.due()
    [o] = env.verifier.run_pass()
    assert (o.result, o.state) == ("verified", "verified")


def test_retry_after_the_manifest_was_removed_says_why(env):
    tid = env.transfer(2000, delete_original=True)
    cleaned(env, tid)
    env.port.delete(CHANNEL, env.storage.list_parts(tid)[0].message_id)
    env.clock.now += env.settings.verified_interval_seconds
    assert [o.result for o in env.verifier.run_pass()] == ["lost"]
    env.storage.retry_transfer(tid)
    [o] = env.verifier.run_pass()
    assert (o.result, o.state) == ("failed", "failed")
    assert "manifest not found" in o.detail and "cleanup removes the manifest" in o.detail


# -- cleanup never trusts a check it did not repeat -------------------------------------------
class DeletingPort(FakePort):
    """Deletes a message right after the ``after_call``-th GetMessages answered: a channel
    admin deleting it between a check and the cleanup of the same pass."""

    def __init__(self):
        super().__init__()
        self.victim: tuple[str, int] | None = None
        self.after_call = 1
        self.fail_from_call: int | None = None

    def get_messages(self, account, channel, ids):
        if self.fail_from_call is not None and len(self.calls) + 1 >= self.fail_from_call:
            self.calls.append((account, channel, tuple(ids)))
            raise TimeoutError("no answer")
        found = super().get_messages(account, channel, ids)
        if self.victim is not None and len(self.calls) == self.after_call:
            self.delete(*self.victim)
            self.victim = None
        return found


@pytest.fixture
def denv(tmp_path):
    e = Env(tmp_path)
    e.port = DeletingPort()
    e.verifier = e.make_verifier("node/verifier#d")
    yield e
    e.close()


def test_a_first_check_after_the_grace_never_cleans_in_the_same_pass(denv):
    """The durability bug: a transfer first checked after the grace was verified and cleaned by
    one pass, so a message deleted after that pass's GetMessages was lost with the original."""
    env = denv
    tid = env.transfer(2000, delete_original=True)
    t = env.storage.get_transfer(tid)
    msg = env.storage.list_parts(tid)[0].message_id
    env.clock.now += 86400  # the first check comes long after the grace period
    env.port.victim, env.port.after_call = (CHANNEL, msg), len(env.port.calls) + 1
    [o] = env.verifier.run_pass()
    assert (o.result, o.state) == ("verified", "verified")
    assert os.path.exists(t.source_path) and os.path.exists(t.manifest_path)
    assert msg not in env.port.channels[CHANNEL]  # deleted after the check saw it
    env.clock.now = env.storage.get_transfer(tid).next_check_at
    [o] = env.verifier.run_pass()  # the next check finds the miss: re-upload, nothing lost
    assert o.result == "reuploading" and os.path.exists(t.source_path)
    env.upload(tid)
    env.due()
    assert [o.result for o in env.verifier.run_pass()] == ["verified"]
    env.clock.now += env.settings.cleanup_grace_seconds
    assert [o.result for o in env.verifier.run_pass()] == ["cleaned"]
    new = env.storage.list_parts(tid)[0].message_id
    assert new != msg and new in env.port.channels[CHANNEL] and not os.path.exists(t.source_path)


def test_a_message_deleted_between_the_check_and_the_cleanup_is_reuploaded(denv):
    env = denv
    tid = env.transfer(3 * MIB, limit=MIB, delete_original=True)  # 3 parts
    t = env.storage.get_transfer(tid)
    env.due()
    assert [o.result for o in env.verifier.run_pass()] == ["verified"]
    env.clock.now += env.settings.cleanup_grace_seconds
    victim = env.storage.list_parts(tid)[2].message_id
    calls = len(env.port.calls)
    env.port.victim, env.port.after_call = (CHANNEL, victim), calls + 1  # after the pass's check
    [o] = env.verifier.run_pass()
    assert len(env.port.calls) == calls + 2  # the check, then the fresh look before deleting
    assert (o.result, o.state, o.missing) == ("reuploading", "uploading", (2,))
    assert os.path.exists(t.source_path) and os.path.exists(t.manifest_path)
    parts = env.storage.list_parts(tid)
    assert parts[2].message_id is None and parts[2].misses == 1
    assert env.verifier.cleanups == 0


def test_an_error_on_the_fresh_check_cleans_nothing_and_records_no_miss(denv):
    env = denv
    tid = env.transfer(2000, delete_original=True)
    t = env.storage.get_transfer(tid)
    env.due()
    env.verifier.run_pass()
    env.clock.now += env.settings.cleanup_grace_seconds
    env.port.fail_from_call = len(env.port.calls) + 2  # the check answers, the fresh look not
    [o] = env.verifier.run_pass()
    rec = env.storage.get_transfer(tid)
    assert (o.result, rec.state) == ("error", "verified") and rec.lease_owner is None
    assert os.path.exists(t.source_path) and os.path.exists(t.manifest_path)
    assert all(p.misses == 0 and p.verified_at is not None for p in env.storage.list_parts(tid))
    env.port.fail_from_call = None
    env.clock.now = rec.next_check_at
    assert [o.result for o in env.verifier.run_pass()] == ["cleaned"]
    assert not os.path.exists(t.source_path)


def test_a_duplicate_is_not_cleaned_when_its_reference_lost_a_message(denv):
    env = denv
    orig = env.transfer(300, delete_original=False)
    dup = env.transfer(300, delete_original=True, upload=False)
    env.storage.mark_transfer_duplicate(dup, orig)
    env.due()
    assert sorted(o.result for o in env.verifier.run_pass()) == ["verified", "verified"]
    env.clock.now += env.settings.cleanup_grace_seconds
    msg = env.storage.list_parts(orig)[0].message_id
    # the reference's check and cleanup (fresh look) see it, then it is deleted
    env.port.victim, env.port.after_call = (CHANNEL, msg), len(env.port.calls) + 2
    outcomes = {o.transfer_id: o for o in env.verifier.run_pass()}
    assert outcomes[orig].result == "cleaned"
    assert (outcomes[dup].result, outcomes[dup].state) == ("following", "verifying")
    assert os.path.exists(env.storage.get_transfer(dup).source_path)
    assert env.storage.get_transfer(orig).next_check_at == env.clock.now  # looked at again now
    outcomes = {o.transfer_id: o.result for o in env.verifier.run_pass()}
    assert outcomes == {orig: "reuploading"}  # its original was kept: sent again from it


def test_the_cleaner_refuses_parts_verified_less_than_the_grace_ago(env):
    tid = env.transfer(100, delete_original=True)
    env.due()
    env.verifier.run_pass()
    cleaner = Cleaner(env.storage, grace_seconds=env.settings.cleanup_grace_seconds, clock=env.clock)
    env.clock.now += env.settings.cleanup_grace_seconds - 1
    with pytest.raises(TransferStateError, match="verified less than"):
        cleaner.clean(env.storage.get_transfer(tid))
    env.clock.now += 1
    with pytest.raises(Exception, match="not cleaned: gone"):  # confirm says no: nothing deleted
        cleaner.clean(env.storage.get_transfer(tid), confirm=lambda t, parts: "gone")
    assert os.path.exists(env.storage.get_transfer(tid).source_path)
    assert cleaner.clean(env.storage.get_transfer(tid), confirm=lambda t, parts: None).deleted_original


def test_cleanup_waits_for_the_index_of_an_ingested_archive(env):
    """The phase-2 index (issue 5) reads the staged files: not deleted while it is pending."""
    tid = env.transfer(100, delete_original=True)
    t = env.storage.get_transfer(tid)
    env.storage.register_package_meta(t.sha256, tid, archive_format="zip")
    env.due()
    env.verifier.run_pass()
    env.clock.now += env.settings.cleanup_grace_seconds
    [o] = env.verifier.run_pass()
    assert (o.result, o.state) == ("verified", "verified") and "not indexed yet" in o.detail
    assert os.path.exists(t.source_path) and os.path.exists(t.manifest_path)
    rec = env.storage.get_transfer(tid)
    assert rec.lease_owner is None and rec.next_check_at == env.clock.now + env.settings.interval_seconds
    env.storage.record_package_index(t.sha256, state="ok")
    env.clock.now = rec.next_check_at
    assert [o.result for o in env.verifier.run_pass()] == ["cleaned"]
    assert not os.path.exists(t.source_path)


def test_later_passes_keep_verified_since(env):
    tid = env.transfer(100)
    env.due()
    env.verifier.run_pass()
    first = env.clock.now
    env.clock.now += 10
    env.storage.schedule_check(tid)
    env.verifier.run_pass()
    assert [p.verified_at for p in env.storage.list_parts(tid)] == [first]
    assert env.storage.get_transfer(tid).last_check_at == env.clock.now


# -- duplicates, deep check, leases -----------------------------------------------------------
def test_a_duplicate_follows_the_referenced_transfer(env):
    orig = env.transfer(300, delete_original=False)
    dup = env.transfer(300, delete_original=True, upload=False)
    env.storage.mark_transfer_duplicate(dup, orig)
    [o] = env.verifier.run_pass()  # the reference is not due for its first check yet
    assert (o.transfer_id, o.result, o.state) == (dup, "following", "uploaded")
    env.port.accounts = []  # the reference cannot be checked: the duplicate keeps following
    env.due()
    env.clock.now += 300
    outcomes = {o.transfer_id: o.result for o in env.verifier.run_pass()}
    assert outcomes == {orig: "error", dup: "following"}
    assert os.path.exists(env.storage.get_transfer(dup).source_path)
    env.port.accounts = ["alice"]
    env.clock.now += 86400
    outcomes = {o.transfer_id: o.result for o in env.verifier.run_pass()}
    assert outcomes == {orig: "verified", dup: "verified"}  # never cleaned by the first check
    assert os.path.exists(env.storage.get_transfer(dup).source_path)
    env.clock.now += env.settings.cleanup_grace_seconds
    outcomes = {o.transfer_id: o.result for o in env.verifier.run_pass()}
    assert outcomes == {orig: "cleaned", dup: "cleaned"}
    assert not os.path.exists(env.storage.get_transfer(dup).source_path)  # dup's policy
    assert os.path.exists(env.storage.get_transfer(orig).source_path)     # orig's policy


def test_a_duplicate_of_a_failed_transfer_fails(env):
    orig = env.transfer(300)
    dup = env.transfer(300, upload=False)
    env.storage.mark_transfer_duplicate(dup, orig)
    env.storage.set_transfer_state(orig, "failed", reason="original gone: /x")
    [o] = env.verifier.run_pass()
    assert o.result == "failed" and "referenced transfer" in o.detail
    assert "original gone" in env.storage.get_transfer(dup).reason


def test_deep_check_catches_a_document_that_is_not_ours(tmp_path):
    e = Env(tmp_path, deep_check=True, deep_check_samples=2)
    try:
        good = e.transfer(3 * MIB + 100, limit=4 * MIB)
        bad = e.transfer(3 * MIB + 100, limit=4 * MIB)
        doc = e.port.channels[CHANNEL][e.storage.list_parts(bad)[0].message_id].document
        e.port.blobs[doc.id] = os.urandom(3 * MIB + 100)  # same size, name, id: other bytes
        e.due()
        outcomes = {o.transfer_id: o for o in e.verifier.run_pass()}
        assert outcomes[good].result == "verified"
        assert outcomes[bad].result == "reuploading" and "not our document" in outcomes[bad].detail
        assert all(off % MIB == 0 and lim == MIB for _, off, lim in e.port.downloads)
        assert len([d for d in e.port.downloads if d[0] != doc.id]) == 2  # 2 samples of good
    finally:
        e.close()


def test_two_verifiers_never_check_the_same_transfer(env):
    ids = [env.bare_transfer() for _ in range(30)]
    env.due()
    other = env.make_verifier("node/verifier#2")
    other.claim_limit = env.verifier.claim_limit = 10
    seen: list[str] = []
    for _ in range(3):
        for v in (env.verifier, other):
            seen += [o.transfer_id for o in v.run_pass()]
    assert sorted(seen) == sorted(ids) and len(set(seen)) == len(seen)


def test_an_expired_lease_is_taken_over(env):
    tid = env.transfer(50)
    env.due()
    dead = env.storage.claim_due_transfers("node/verifier#dead", 10, 120)
    assert [t.id for t in dead] == [tid]
    assert env.verifier.run_pass() == []
    env.clock.now += 121
    [o] = env.verifier.run_pass()
    assert (o.transfer_id, o.result) == (tid, "verified")


def test_a_reupload_interrupted_before_the_state_moved_is_finished(env):
    """Crash after set_part_random_id but before "uploading": the part has no message."""
    tid = env.transfer(100)
    env.due()
    part = env.storage.list_parts(tid)[0]
    env.storage.record_check(tid, missing=[0], state="verifying")
    env.storage.set_part_random_id(tid, 0, 4242)
    [o] = env.verifier.run_pass()
    assert (o.result, o.state) == ("reuploading", "uploading")
    assert env.storage.list_parts(tid)[0].random_id == 4242  # no second new id
    assert part.message_id is not None


def test_the_adopt_hook_replaces_an_upload_but_never_with_the_lost_message(tmp_path):
    calls = []

    def adopt(transfer, parts, manifest):
        calls.append([p.index for p in parts])
        lost = parts[0].message_id
        return {0: (lost, 1, "alice")} if len(calls) == 1 else {0: (4242, 99, "bob")}

    e = Env(tmp_path)
    try:
        e.verifier = e.make_verifier("node/verifier#a", adopt=adopt)
        tid = e.transfer(100)
        e.due()
        e.port.delete(CHANNEL, e.storage.list_parts(tid)[0].message_id)
        [o] = e.verifier.run_pass()  # the hook offers the lost message itself: upload again
        assert (o.result, o.state) == ("reuploading", "uploading")
        e.upload(tid)
        e.due()
        e.port.delete(CHANNEL, e.storage.list_parts(tid)[0].message_id)
        e.clock.now += 3600
        [o] = e.verifier.run_pass()  # an orphan: recorded, nothing uploaded
        assert (o.result, o.state) == ("reuploading", "uploaded") and "adopted" in o.detail
        part = e.storage.list_parts(tid)[0]
        assert (part.message_id, part.document_id, part.account) == (4242, 99, "bob")
        assert calls == [[0], [0]]
    finally:
        e.close()


def test_verify_metrics_are_counted(tmp_path):
    from prometheus_client import CollectorRegistry

    from actors.metrics import Metrics

    metrics = Metrics(CollectorRegistry()).add_verify_metrics()
    e = Env(tmp_path)
    try:
        e.verifier = e.make_verifier("node/verifier#m", metrics=metrics)
        keep = e.transfer(100)
        gone = e.transfer(100)
        e.port.delete(CHANNEL, e.storage.list_parts(gone)[0].message_id)
        e.clock.now += 120
        e.verifier.run_pass()

        def value(name, **labels):
            return metrics.registry.get_sample_value(name, labels or None)

        assert value("stashd_verify_checks_total", result="present") == 1
        assert value("stashd_verify_checks_total", result="missing") == 1
        assert value("stashd_verify_misses_total") == 1
        assert value("stashd_verify_reuploads_total") == 1
        assert value("stashd_verify_lag_seconds") == 0
        e.clock.now += 3 * 86400  # keep: cleanup due (grace), and overdue by days
        e.storage.schedule_check(keep, at=e.clock.now - 50)
        assert e.verifier.lag_seconds() == 50
        e.verifier.run_pass()
        assert value("stashd_verify_cleanups_total") == 1
    finally:
        e.close()


def test_a_long_pass_renews_its_leases_so_nobody_takes_them_over(env):
    ids = [env.bare_transfer() for _ in range(5)]
    env.due()
    rival = []

    class SlowPort(FakePort):
        """Every GetMessages takes 50 s; a rival verifier tries to claim meanwhile."""

        def get_messages(self, account, channel, ids_):
            env.clock.now += 50
            rival.extend(t.id for t in env.storage.claim_due_transfers("node/verifier#r", 10, 120))
            return super().get_messages(account, channel, ids_)

    slow = SlowPort()
    slow.channels, slow.blobs = env.port.channels, env.port.blobs
    env.port = slow
    v = env.make_verifier("node/verifier#slow")
    v.batch_size = 1  # 5 calls: 250 s against a 120 s lease
    outcomes = v.run_pass()
    assert rival == [] and [o.result for o in outcomes] == ["verified"] * 5
    assert sorted(o.transfer_id for o in outcomes) == sorted(ids)


def test_a_disk_error_while_reuploading_is_retried_later(env, monkeypatch):
    import actors.verifier_core as core

    tid = env.transfer(100)
    env.due()
    part = env.storage.list_parts(tid)[0]
    env.port.delete(CHANNEL, part.message_id)

    def full(*a, **kw):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(core, "rewrite_part_random_id", full)
    [o] = env.verifier.run_pass()
    t = env.storage.get_transfer(tid)
    assert o.result == "error" and "No space left" in o.detail
    assert (t.state, t.lease_owner, t.next_check_at) == ("verifying", None, env.clock.now + 30)
    assert env.storage.list_parts(tid)[0].random_id == part.random_id  # nothing half-done
    monkeypatch.undo()
    env.clock.now += 30
    [o] = env.verifier.run_pass()
    assert (o.result, o.state) == ("reuploading", "uploading")


# -- the original's sha256 off the verifier's thread ------------------------------------------
class ManualExecutor:
    """An executor that runs nothing until the test says so (no threads)."""

    def __init__(self):
        self.jobs: list = []

    def submit(self, fn, *args, **kwargs):
        from concurrent.futures import Future
        future = Future()
        self.jobs.append((future, fn, args, kwargs))
        return future

    def run_all(self):
        jobs, self.jobs = self.jobs, []
        for future, fn, args, kwargs in jobs:
            if future.set_running_or_notify_cancel():
                future.set_result(fn(*args, **kwargs))
        return len(jobs)


def hashed_env(env):
    from actors.verifier_core import OriginalChecks
    executor, done = ManualExecutor(), []
    env.verifier = env.make_verifier("node/verifier#2", originals=OriginalChecks(
        executor, on_done=done.append, inline_bytes=0))
    return executor, done


def test_a_large_original_is_hashed_off_the_pass_then_reuploaded(env):
    executor, done = hashed_env(env)
    tid = env.transfer(3 * MIB + 5, limit=MIB)
    env.due()
    before = env.storage.list_parts(tid)
    env.port.delete(CHANNEL, before[1].message_id)
    [o] = env.verifier.run_pass()
    # nothing recorded but the check: the hash runs elsewhere, the lease is free
    assert (o.result, o.state, o.missing) == ("waiting", "verifying", (1,))
    assert "checking the original" in o.detail and len(executor.jobs) == 1
    t = env.storage.get_transfer(tid)
    assert t.lease_owner is None and t.next_check_at == env.clock.now + env.settings.interval_seconds
    assert [p.misses for p in env.storage.list_parts(tid)] == [0, 0, 0, 0]
    assert env.verifier.originals.running == 1
    env.storage.schedule_check(tid)
    assert [o.result for o in env.verifier.run_pass()] == ["waiting"]  # still hashing
    assert len(executor.jobs) == 1                                     # not asked twice
    assert executor.run_all() == 1 and done == [tid]
    env.storage.schedule_check(tid)   # what the actor does on OriginalChecked
    [o] = env.verifier.run_pass()
    assert (o.result, o.state, o.missing) == ("reuploading", "uploading", (1,))
    after = env.storage.list_parts(tid)
    assert after[1].misses == 1 and after[1].random_id != before[1].random_id
    assert env.verifier.originals.running == 0


def test_a_hash_that_finds_the_original_changed_fails_it(env):
    executor, done = hashed_env(env)
    tid = env.transfer(2 * MIB, limit=MIB)
    env.due()
    t = env.storage.get_transfer(tid)
    env.port.delete(CHANNEL, env.storage.list_parts(tid)[0].message_id)
    st = os.stat(t.source_path)
    with open(t.source_path, "r+b") as fh:  # same size and mtime: only the hash sees it
        fh.write(b"\0" * 8)
    os.utime(t.source_path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert [o.result for o in env.verifier.run_pass()] == ["waiting"]
    executor.run_all()
    env.storage.schedule_check(tid)
    [o] = env.verifier.run_pass()
    assert (o.result, o.state) == ("failed", "failed") and "part 1 differs" in o.detail


def test_a_cleaned_transfer_hashes_its_kept_original_off_the_pass(env):
    executor, done = hashed_env(env)
    tid = env.transfer(2 * MIB, limit=MIB, delete_original=False)
    cleaned(env, tid)
    env.port.delete(CHANNEL, env.storage.list_parts(tid)[0].message_id)
    env.clock.now += env.settings.verified_interval_seconds
    [o] = env.verifier.run_pass()
    assert (o.result, o.state) == ("waiting", "cleaned") and env.lost == []
    executor.run_all()
    env.storage.schedule_check(tid)
    [o] = env.verifier.run_pass()
    assert (o.result, o.state, o.missing) == ("reuploading", "uploading", (0,))


def test_a_gone_original_is_seen_at_once_without_hashing(env):
    executor, done = hashed_env(env)
    tid = env.transfer(2 * MIB, limit=MIB)
    env.due()
    os.unlink(env.storage.get_transfer(tid).source_path)
    env.port.delete(CHANNEL, env.storage.list_parts(tid)[0].message_id)
    [o] = env.verifier.run_pass()
    assert (o.result, o.state) == ("failed", "failed") and "original gone" in o.detail
    assert executor.jobs == []
