"""download_document over a fake RangePort: parallel window, order of hashing,
resume from a partial staged file, size checks, budget bound, FloodWait."""
from __future__ import annotations

import asyncio
import hashlib
import os

import pytest

from actors.account_messages import DocumentInfo
from actors.ingest.download import (
    ChunkJournal, SizeMismatchError, download_document, journal_path,
)
from actors.telegram.errors import FloodWaitError, RpcError

KIB, MIB = 1024, 1024 * 1024


def doc(blob: bytes, doc_id: int = 77, ref: bytes = b"ref1") -> DocumentInfo:
    return DocumentInfo(id=doc_id, access_hash=5, file_reference=ref, size=len(blob),
                        file_name="a.zip", mime_type="application/zip", dc_id=2)


class FakePort:
    """Serves ``blob``; checks Telegram's range rules; ``gate(offset)`` may hold a reply."""

    def __init__(self, blob: bytes, *, truncate_at: int | None = None):
        self.blob = blob
        self.truncate_at = truncate_at
        self.calls: list[int] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self.gates: dict[int, asyncio.Event] = {}
        self.fail: dict[int, list[BaseException]] = {}
        self.references: list[bytes] = []

    async def read(self, document, offset, limit):
        assert offset % 4096 == 0 and limit % 4096 == 0 and limit <= MIB and MIB % limit == 0
        assert offset // MIB == (offset + limit - 1) // MIB
        self.calls.append(offset)
        self.references.append(document.file_reference)
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            await asyncio.sleep(0)
            gate = self.gates.get(offset)
            if gate is not None:
                await gate.wait()
            errors = self.fail.get(offset)
            if errors:
                raise errors.pop(0)
            end = len(self.blob) if self.truncate_at is None else self.truncate_at
            return self.blob[offset:min(offset + limit, end)]
        finally:
            self.in_flight -= 1


class FakeBudget:
    def __init__(self, limit: int):
        self.limit, self.reserved, self.peak = limit, 0, 0
        self.released = asyncio.Event()
        self.grants = 0

    async def acquire(self, nbytes):
        while self.reserved + nbytes > self.limit:
            self.released.clear()
            await self.released.wait()
        self.reserved += nbytes
        self.peak = max(self.peak, self.reserved)
        self.grants += 1
        return nbytes

    def release(self, lease):
        self.reserved -= lease
        self.released.set()


def run(coro):
    return asyncio.run(coro)


def test_parallel_download_is_byte_exact_and_hashes_in_order(tmp_path):
    blob = os.urandom(5 * MIB + 12345)
    port = FakePort(blob)

    async def go():  # hold chunk 0 until 4 requests went out: the hash must still be in file order
        port.gates[0] = asyncio.Event()

        async def open_gate():
            while len(port.calls) < 4:
                await asyncio.sleep(0)
            port.gates[0].set()
        opener = asyncio.ensure_future(open_gate())
        result = await download_document(port, doc(blob), tmp_path / "a.zip", window=4)
        await opener
        return result

    result = run(go())
    assert (tmp_path / "a.zip").read_bytes() == blob
    assert result.sha256 == hashlib.sha256(blob).hexdigest()
    assert result.size == len(blob) and result.chunks == 6 and result.resumed_chunks == 0
    assert result.downloaded_bytes == len(blob)
    assert port.max_in_flight == 4  # the window was used
    assert sorted(port.calls) == [i * MIB for i in range(6)]


def test_window_of_one_is_sequential(tmp_path):
    blob = os.urandom(3 * MIB)
    port = FakePort(blob)
    run(download_document(port, doc(blob), tmp_path / "a.zip", window=1))
    assert port.max_in_flight == 1 and port.calls == [0, MIB, 2 * MIB]


def test_resume_requests_only_missing_chunks_and_hash_covers_the_whole_file(tmp_path):
    blob = os.urandom(4 * MIB + 100)
    path = tmp_path / "a.zip"
    port = FakePort(blob)
    port.fail[2 * MIB] = [RpcError("GetFileRequest", 400, "SOMETHING_BAD")]
    with pytest.raises(RpcError):
        run(download_document(port, doc(blob), path, window=1))
    assert port.calls == [0, MIB, 2 * MIB]
    journal = ChunkJournal(path, 77, len(blob), MIB)
    journal.open()
    assert journal.chunks == {0, 1} and journal.digest is None
    journal.close()
    # the process "crashed": a fresh call resumes from the staged file
    port2 = FakePort(blob)
    result = run(download_document(port2, doc(blob), path, window=3))
    assert port2.calls and sorted(port2.calls) == [2 * MIB, 3 * MIB, 4 * MIB]
    assert result.resumed_chunks == 2 and result.downloaded_bytes == len(blob) - 2 * MIB
    assert result.sha256 == hashlib.sha256(blob).hexdigest()
    assert path.read_bytes() == blob
    # done: asking again costs no request at all
    port3 = FakePort(blob)
    again = run(download_document(port3, doc(blob), path))
    assert port3.calls == [] and again.sha256 == result.sha256 and again.downloaded_bytes == 0


def test_resume_with_a_hole_in_the_middle(tmp_path):
    """Chunks 0 and 2 on disk, 1 and 3 missing (out-of-order arrival before a crash)."""
    blob = os.urandom(4 * MIB)
    path = tmp_path / "a.zip"
    journal = ChunkJournal(path, 77, len(blob), MIB)
    journal.open()
    with open(path, "wb") as f:
        f.truncate(len(blob))
        for i in (0, 2):
            f.seek(i * MIB)
            f.write(blob[i * MIB:(i + 1) * MIB])
            journal.record(i)
    journal.close()
    port = FakePort(blob)
    result = run(download_document(port, doc(blob), path, window=2))
    assert sorted(port.calls) == [MIB, 3 * MIB]
    assert result.sha256 == hashlib.sha256(blob).hexdigest() and path.read_bytes() == blob


def test_a_journal_of_another_document_starts_over(tmp_path):
    blob = os.urandom(2 * MIB)
    path = tmp_path / "a.zip"
    run(download_document(FakePort(blob), doc(blob, doc_id=1), path))
    other = os.urandom(2 * MIB)
    port = FakePort(other)
    result = run(download_document(port, doc(other, doc_id=2), path))
    assert sorted(port.calls) == [0, MIB] and path.read_bytes() == other
    assert result.sha256 == hashlib.sha256(other).hexdigest()


def test_journal_without_its_staged_file_starts_over(tmp_path):
    blob = os.urandom(2 * MIB)
    path = tmp_path / "a.zip"
    run(download_document(FakePort(blob), doc(blob), path))
    path.unlink()
    port = FakePort(blob)
    result = run(download_document(port, doc(blob), path))
    assert sorted(port.calls) == [0, MIB] and result.sha256 == hashlib.sha256(blob).hexdigest()


def test_short_chunk_is_a_size_mismatch_and_is_not_journaled(tmp_path):
    blob = os.urandom(3 * MIB)
    port = FakePort(blob, truncate_at=2 * MIB + 10)  # Telegram has fewer bytes than the size says
    path = tmp_path / "a.zip"
    with pytest.raises(SizeMismatchError) as info:
        run(download_document(port, doc(blob), path, window=1))
    assert (info.value.offset, info.value.expected, info.value.got) == (2 * MIB, MIB, 10)
    journal = ChunkJournal(path, 77, len(blob), MIB)
    journal.open()
    assert journal.chunks == {0, 1}
    journal.close()


def test_longer_document_than_its_size_is_a_size_mismatch(tmp_path):
    blob = os.urandom(2 * MIB)
    info = doc(blob[: MIB + 5])  # says MIB + 5 bytes, Telegram serves more
    with pytest.raises(SizeMismatchError):
        run(download_document(FakePort(blob), info, tmp_path / "a.zip"))


def test_budget_bounds_the_bytes_held(tmp_path):
    blob = os.urandom(8 * MIB)
    port = FakePort(blob)
    budget = FakeBudget(limit=3 * MIB)
    result = run(download_document(port, doc(blob), tmp_path / "a.zip", window=8, budget=budget))
    assert result.sha256 == hashlib.sha256(blob).hexdigest()
    assert budget.peak <= 3 * MIB and budget.reserved == 0 and budget.grants == 8
    assert port.max_in_flight <= 3


def test_leases_are_given_back_on_failure(tmp_path):
    blob = os.urandom(6 * MIB)
    port = FakePort(blob)
    port.fail[3 * MIB] = [RpcError("GetFileRequest", 400, "BOOM")]
    budget = FakeBudget(limit=64 * MIB)
    with pytest.raises(RpcError):
        run(download_document(port, doc(blob), tmp_path / "a.zip", window=4, budget=budget))
    assert budget.reserved == 0


def test_flood_wait_waits_and_asks_again(tmp_path):
    blob = os.urandom(2 * MIB)
    port = FakePort(blob)
    now = [1000.0]
    slept = []

    async def sleep(seconds):
        slept.append(seconds)
        now[0] += seconds

    port.fail[MIB] = [FloodWaitError("GetFileRequest", 7, 1007.0)]
    result = run(download_document(port, doc(blob), tmp_path / "a.zip", clock=lambda: now[0],
                                   sleep=sleep))
    assert slept == [7.0] and port.calls.count(MIB) == 2
    assert result.sha256 == hashlib.sha256(blob).hexdigest()


def test_connection_errors_are_retried_then_given_up(tmp_path):
    blob = os.urandom(MIB)
    port = FakePort(blob)
    port.fail[0] = [RpcError("GetFileRequest", None, "connection failed: x")] * 2
    slept = []

    async def sleep(s):
        slept.append(s)

    assert run(download_document(port, doc(blob), tmp_path / "a", sleep=sleep)).size == MIB
    assert slept == [1.0, 2.0]
    port = FakePort(blob)
    port.fail[0] = [RpcError("GetFileRequest", None, "connection failed: x")] * 9
    with pytest.raises(RpcError):
        run(download_document(port, doc(blob), tmp_path / "b", sleep=sleep, max_attempts=3))


def test_expired_file_reference_is_refreshed_once(tmp_path):
    blob = os.urandom(4 * MIB)
    port = FakePort(blob)
    for i in range(4):
        port.fail[i * MIB] = [RpcError("GetFileRequest", 400, "FILE_REFERENCE_EXPIRED")]
    refreshed = []

    async def refresh():
        refreshed.append(1)
        return doc(blob, ref=b"ref2")

    result = run(download_document(port, doc(blob), tmp_path / "a", window=4, refresh=refresh))
    assert result.sha256 == hashlib.sha256(blob).hexdigest()
    assert len(refreshed) == 1
    assert port.references[-4:] == [b"ref2"] * 4


def test_extra_hashers_see_the_bytes_in_order_also_when_resumed(tmp_path):
    a, b = os.urandom(MIB + 7), os.urandom(2 * MIB + 3)
    set_hash = hashlib.sha256()
    run(download_document(FakePort(a), doc(a, 1), tmp_path / "p1", extra_hashers=[set_hash]))
    run(download_document(FakePort(b), doc(b, 2), tmp_path / "p2", extra_hashers=[set_hash]))
    assert set_hash.hexdigest() == hashlib.sha256(a + b).hexdigest()
    # again, both complete on disk: no request, same set hash
    again = hashlib.sha256()
    port = FakePort(a)
    run(download_document(port, doc(a, 1), tmp_path / "p1", extra_hashers=[again]))
    run(download_document(FakePort(b), doc(b, 2), tmp_path / "p2", extra_hashers=[again]))
    assert port.calls == [] and again.hexdigest() == set_hash.hexdigest()


def test_small_chunks_and_bad_chunk_sizes(tmp_path):
    blob = os.urandom(300 * KIB)
    port = FakePort(blob)
    result = run(download_document(port, doc(blob), tmp_path / "a", chunk_size=64 * KIB, window=3))
    assert result.chunks == 5 and sorted(port.calls) == [i * 64 * KIB for i in range(5)]
    for bad in (1000, 3 * 4096, 2 * MIB):
        with pytest.raises(ValueError):
            run(download_document(port, doc(blob), tmp_path / "b", chunk_size=bad))


def test_journal_ignores_a_torn_record(tmp_path):
    path = tmp_path / "a"
    j = ChunkJournal(path, 1, 3 * MIB, MIB)
    j.open()
    j.record(0)
    j.record(2)
    j.close()
    with open(journal_path(path), "ab") as f:
        f.write(b"\x01\x00")  # half a record: the crash came mid-append
    j = ChunkJournal(path, 1, 3 * MIB, MIB)
    assert j.open() is False and j.chunks == {0, 2}
    j.record(1)  # lands on a record boundary again
    j.close()
    j = ChunkJournal(path, 1, 3 * MIB, MIB)
    j.open()
    assert j.chunks == {0, 1, 2}
    j.close()
