"""A set's lease and its failures (real storage, an in-memory Telegram port).

- Two workers on two Storages of one PostgreSQL (two processes, as far as the
  database can tell) and one injected clock: the worker downloading a set renews
  its lease while its download is stalled, so the other never gets the set; once
  it stops renewing (it died), the other takes the set over after the lease ran
  out and queues it; the old worker, should it wake up, finds its lease lost.
- A set that keeps failing waits a doubling backoff between tries and is
  skipped with reason "failed" and its last error at ``max_set_attempts``.
"""
from __future__ import annotations

import asyncio
import io
import os
import zipfile

import pytest

from actors.account_messages import DocumentInfo, MessageInfo, MessagesResult
from actors.ingest.actor import IngestActor, _Progress
from actors.ingest.pipeline import SetRecorder, SetWorker, set_backoff
from actors.ingest.scan import Page, Target
from actors.transfers import TransferPlanner
from config.loader import settings_from_dict
from storage.database import open_storage
from storage.ingest import SetLeaseLostError

pytestmark = pytest.mark.timeout(60)

CHANNEL = 777001
LEASE = 30.0


class Clock:
    def __init__(self, now: float = 1_700_000_000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


def zip_bytes() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr("a/file.bin", os.urandom(300_000))
    return buf.getvalue()


class MemPort:
    """messages + read over documents held in memory; ``gate`` (when set) holds every read."""

    def __init__(self, docs: dict[int, tuple[DocumentInfo, bytes]], *, gate: asyncio.Event | None = None,
                 fail: Exception | None = None):
        self.docs, self.gate, self.fail = docs, gate, fail
        self.reading = asyncio.Event()

    async def messages(self, channel, ids):
        if self.fail is not None:
            raise self.fail
        return MessagesResult(tuple(MessageInfo(i, 0.0, "", self.docs[i][0]) for i in ids))

    async def read(self, document, offset, limit):
        self.reading.set()
        if self.gate is not None:
            await self.gate.wait()
        data = next(d for info, d in self.docs.values() if info.id == document.id)
        return data[offset:offset + limit]


def settings_for(tmp_path, **ingest):
    return settings_from_dict({"daemon": {"state_dir": str(tmp_path)}, "telegram": {"mode": "simulated"},
                               "upload": {"destination": "stash_archive"},
                               "ingest": {"set_lease_seconds": LEASE, **ingest}},
                              base_dir=tmp_path, env={})


def post_set(storage, clock, data: bytes, *, message_id: int = 10, name: str = "pack.zip"):
    """Record one single-volume archive as a scan would; returns (key, docs)."""
    doc = DocumentInfo(id=5000 + message_id, access_hash=1, file_reference=b"r", size=len(data),
                       file_name=name, mime_type="application/zip", dc_id=2)
    target = Target("src", CHANNEL, None)
    recorder = SetRecorder(storage, max_archive_bytes=1 << 40, clock=clock)
    out = recorder.record_page(target, Page((MessageInfo(message_id, clock(), "", doc),), message_id),
                               account="alice")
    [key] = out.set_keys
    assert recorder.refresh_set(key, at_present=True).state == "ready"
    return key, {message_id: (doc, data)}


class Beats:
    """The heartbeat's sleep, driven by the test: one beat per ``beat()``; ``renewed``
    is set when the worker is back waiting (its renewal of the previous beat done)."""

    def __init__(self):
        self.ticks: asyncio.Queue = asyncio.Queue()
        self.waiting = asyncio.Event()

    async def sleep(self, _seconds: float) -> None:
        self.waiting.set()
        await self.ticks.get()

    async def beat(self) -> None:
        self.waiting.clear()
        self.ticks.put_nowait(None)
        await asyncio.wait_for(self.waiting.wait(), 10)


def test_a_live_worker_keeps_its_set_and_a_dead_ones_set_is_taken_over(tmp_path, pg_url):
    clock = Clock()
    settings = settings_for(tmp_path)
    store_a = open_storage(pg_url, clock=clock)
    store_b = open_storage(pg_url, clock=clock)
    try:
        key, docs = post_set(store_a, clock, zip_bytes())

        async def scenario():
            beats = Beats()
            worker_a = SetWorker(store_a, TransferPlanner(store_a, settings, clock, node="node-a"), settings,
                                 node="node-a", staging_dir=tmp_path / "a", clock=clock,
                                 set_lease_seconds=LEASE, lease_sleep=beats.sleep)
            worker_b = SetWorker(store_b, TransferPlanner(store_b, settings, clock, node="node-b"), settings,
                                 node="node-b", staging_dir=tmp_path / "b", clock=clock,
                                 set_lease_seconds=LEASE, lease_sleep=Beats().sleep)
            owner_a, owner_b = worker_a.set_owner("alice"), worker_b.set_owner("bob")
            [rec] = store_a.claim_ready_sets(owner_a, 1, LEASE, states=("ready", "downloading"))
            stalled = MemPort(docs, gate=asyncio.Event())  # node A's download hangs
            task_a = asyncio.ensure_future(worker_a.process(rec, stalled, account="alice"))
            await asyncio.wait_for(stalled.reading.wait(), 10)
            await asyncio.wait_for(beats.waiting.wait(), 10)
            # alive: three lease lengths go by, renewed every 20 s: B never gets the set
            for _ in range(4):
                clock.now += 20
                await beats.beat()
                assert store_b.claim_ready_sets(owner_b, 1, LEASE, states=("ready", "downloading")) == []
            assert store_b.get_archive_set(key).lease_owner == owner_a
            # A stops renewing (it is as good as dead): after the lease, B takes the set over
            clock.now += LEASE - 1
            assert store_b.claim_ready_sets(owner_b, 1, LEASE, states=("ready", "downloading")) == []
            clock.now += 2
            [taken] = store_b.claim_ready_sets(owner_b, 1, LEASE, states=("ready", "downloading"))
            assert (taken.set_key, taken.state, taken.lease_owner) == (key, "downloading", owner_b)
            # should A wake up, its next renewal finds the lease lost and stops its work
            beats.ticks.put_nowait(None)
            with pytest.raises(SetLeaseLostError):
                await asyncio.wait_for(task_a, 10)
            outcome = await worker_b.process(taken, MemPort(docs), account="bob")
            return outcome

        outcome = asyncio.run(scenario())
        assert outcome.result == "queued"
        s = store_a.get_archive_set(key)
        assert (s.state, s.transfer_id, s.lease_owner) == ("uploading", outcome.transfer_id, None)
        t = store_a.get_transfer(outcome.transfer_id)
        assert t is not None and str(tmp_path / "b") in t.source_path
    finally:
        store_a.close()
        store_b.close()


def test_set_backoff_doubles_up_to_its_cap():
    assert [set_backoff(n, 10, 50) for n in (1, 2, 3, 4, 5)] == [10, 20, 40, 50, 50]


def test_a_failing_set_backs_off_and_is_skipped_failed_at_the_cap(tmp_path, db_url):
    clock = Clock()
    settings = settings_for(tmp_path, max_set_attempts=3, set_backoff_initial_seconds=100,
                            set_backoff_max_seconds=150, mappings=[])
    storage = open_storage(db_url, clock=clock)
    try:
        key, docs = post_set(storage, clock, zip_bytes())
        planner = TransferPlanner(storage, settings, clock, node="node-1")
        actor = IngestActor(storage, settings, lambda name: None, planner=planner, node="node-1",
                            clock=clock)
        port = MemPort(docs, fail=RuntimeError("channel went away"))
        target = Target("src", CHANNEL, None)

        def round_() -> str:
            run = storage.start_run(mapping="alice:src", channel_id=CHANNEL, account="alice")
            asyncio.run(actor._ingest_ready("alice", None, target, port, _Progress("alice"), run.id))
            storage.finish_run(run.id)
            return run.id

        round_()
        s = storage.get_archive_set(key)
        assert (s.state, s.attempts, s.lease_owner) == ("downloading", 1, None)
        assert s.last_error == "RuntimeError: channel went away"
        assert s.next_attempt_at == clock.now + 100
        # within the backoff nobody claims it: a scan does not retry it
        clock.now += 99
        assert storage.claim_ready_sets("x", 1, 60, states=("ready", "downloading")) == []
        round_()
        assert storage.get_archive_set(key).attempts == 1
        clock.now += 1
        round_()
        s = storage.get_archive_set(key)
        assert (s.attempts, s.next_attempt_at) == (2, clock.now + 150)  # 200 capped at 150
        clock.now += 150
        run_id = round_()
        s = storage.get_archive_set(key)
        assert (s.state, s.reason, s.attempts) == ("skipped", "failed", 3)
        [skip] = storage.list_skips(reason="failed")
        assert skip.set_key == key and "channel went away" in skip.detail and "3 time" in skip.detail
        run = storage.get_run(run_id)
        assert run.skipped_by_reason == {"failed": 1} and "attempt 3/3" in run.progress
        # skipped for good: later scans leave it alone
        clock.now += 10_000
        assert storage.claim_ready_sets("x", 1, 60, states=("ready", "downloading")) == []
    finally:
        storage.close()


def test_status_lists_the_failed_sets_waiting_for_their_next_try():
    from actors.admin.ctl import format_ingest
    text = format_ingest({"sets": {"downloading": 1}, "skipped": {"failed": 2},
                          "retrying": [{"set": "pack", "attempts": 2, "next_attempt_at": 1_120.0,
                                        "last_error": "RuntimeError: channel went away"}]}, 1_000.0)
    assert "FAILED SET" in text and "channel went away" in text and "in 2m" in text
    assert "failed" in text.splitlines()[1]  # skipped: the sets that gave up
