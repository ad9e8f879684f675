"""StorageJournal writes acknowledged chunks in batches (real SQLite/PostgreSQL),
and ask_async answers a coroutine without parking a thread."""

from __future__ import annotations

import asyncio
import threading

import pykka
import pytest

from actors.uploader import StorageJournal, ask_async
from actors.uploader_core import MemoryJournal, upload_document
from storage.database import open_storage
from storage.manifest import PartPlan

TID = "00000000-0000-4000-8000-000000000001"


class Clock:
    def __init__(self, now: float = 1000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def storage(db_url):
    store = open_storage(db_url)
    store.create_transfer(TID, source_path="/x", size=10 * 1024 * 1024, sha256="0" * 64,
                          destination="d", manifest_path="/x.m", delete_original=False,
                          parts=[(0, 0, 10 * 1024 * 1024, "0" * 64, "x", 1)])
    yield store
    store.close()


def journaled(storage):
    return storage.journaled_chunks(TID, 0, account="alice")


def test_chunks_are_written_per_batch_per_interval_and_on_flush(storage):
    clock = Clock()
    journal = StorageJournal(storage, TID, 0, "alice", batch=3, interval=5.0, clock=clock)
    journal.record(0)
    journal.record(1)
    assert journaled(storage) == set()           # buffered
    journal.record(2)
    assert journaled(storage) == {0, 1, 2}       # the batch is full
    journal.record(3)
    clock.now += 5.0
    journal.record(4)
    assert journaled(storage) == {0, 1, 2, 3, 4}  # the interval passed
    journal.record(5)
    journal.flush()
    journal.flush()                              # nothing left: no write, no error
    assert journaled(storage) == set(range(6))
    assert journal.acked() == set(range(6))


class Port:
    """An UploadPort that acks every chunk and records what the journal held at send time."""

    def __init__(self, storage):
        self.storage, self.journaled_at_send = storage, None

    async def upload_part(self, file_id, index, total, data, big):
        return True

    async def send_document(self, **kw):
        self.journaled_at_send = journaled(self.storage)
        return "sent"


def test_upload_document_flushes_the_journal_before_sending(storage):
    plan = PartPlan(index=0, offset=0, length=5 * 512 * 1024, sha256="0" * 64, file_name="x",
                    file_id=7, random_id=1, caption="c", chunk_hashes=())
    journal = StorageJournal(storage, TID, 0, "alice", batch=64, interval=3600.0, clock=Clock())
    port = Port(storage)
    result = asyncio.run(upload_document(port, plan, lambda off, n: b"\0" * n, window=2, journal=journal))
    assert result == "sent" and port.journaled_at_send == set(range(5))


def test_upload_document_flushes_what_was_acked_when_it_fails(storage):
    plan = PartPlan(index=0, offset=0, length=4 * 512 * 1024, sha256="0" * 64, file_name="x",
                    file_id=7, random_id=1, caption="c", chunk_hashes=())
    journal = StorageJournal(storage, TID, 0, "alice", batch=64, interval=3600.0, clock=Clock())

    class Failing(Port):
        async def upload_part(self, file_id, index, total, data, big):
            if index == 3:
                raise ValueError("permanent")
            return True

    with pytest.raises(ValueError):
        asyncio.run(upload_document(Failing(storage), plan, lambda off, n: b"\0" * n, window=1,
                                    journal=journal))
    assert journaled(storage) == {0, 1, 2}       # acked before the failure: journaled, nothing else


def test_memory_journal_needs_no_flush():
    plan = PartPlan(index=0, offset=0, length=512 * 1024, sha256="0" * 64, file_name="x",
                    file_id=7, random_id=1, caption="c", chunk_hashes=())

    class P:
        async def upload_part(self, *a):
            return True

        async def send_document(self, **kw):
            return "ok"

    journal = MemoryJournal()
    assert asyncio.run(upload_document(P(), plan, lambda off, n: b"\0" * n, journal=journal)) == "ok"
    assert journal.records == [0]


class Echo(pykka.ThreadingActor):
    def on_receive(self, message):
        if message == "boom":
            raise KeyError("boom")
        if isinstance(message, threading.Event):
            message.wait(5)
            return "late"
        return (message, threading.current_thread().name)


def test_ask_async_replies_errors_timeouts_and_dead_actors():
    ref = Echo.start()

    async def main():
        answers = await asyncio.gather(*(ask_async(ref, i, 5) for i in range(50)))
        assert [a[0] for a in answers] == list(range(50))
        assert {a[1] for a in answers} != {threading.current_thread().name}
        with pytest.raises(KeyError):
            await ask_async(ref, "boom", 5)
        release = threading.Event()
        with pytest.raises(pykka.Timeout):
            await ask_async(ref, release, 0.05)
        release.set()
        assert await ask_async(ref, "after", 5) == ("after", answers[0][1])

    asyncio.run(main())
    ref.stop()

    async def dead():
        with pytest.raises(pykka.ActorDeadError):
            await ask_async(ref, 1, 5)

    asyncio.run(dead())
