"""Ranged, parallel downloads of one Telegram document into a staged file.

:func:`download_document` fetches a document in chunks of 1 MiB (offsets and
limits are multiples of 4 KiB, never more than 1 MiB, never crossing a 1 MiB
boundary: Telegram's ``upload.getFile`` rules) with ``window`` requests in
flight, through a :class:`RangePort` (normally :class:`AccountRangePort`, asks
to one AccountActor; the Telegram client is never touched here).

- **Memory bound.** Each chunk holds a BudgetActor byte lease (kind "part",
  the same global byte budget and per-account slots as upload parts) from
  before its request is sent until its bytes are hashed; the lease is the
  only buffer accounting there is.
- **Written where it belongs.** A chunk is written at its offset into the
  staged file (preallocated, sparse) as soon as it arrives; every 16 chunks
  (and when the download ends, also by an error) the file is fdatasync'ed and
  then those chunks are recorded in the :class:`ChunkJournal` (a sidecar file
  ``<staged>.chunks``): a journaled chunk is on disk, a crash loses at most
  the unsynced ones (downloaded again).
- **Streamed sha256.** Chunks are hashed in file order while downloading: a
  chunk that arrives early waits (in memory, under its lease, holding its
  window slot) until the prefix before it is hashed.  No second pass over the
  file; only chunks already on disk from an earlier, interrupted download are
  read back, once, when the hash reaches them.
- **Resume.** After a crash the journal says which chunks are on disk; only the
  others are requested.  A journal for another document, size or chunk size is
  discarded with the staged file.  A finished download records its digest in
  the journal, so asking again costs nothing (unless ``extra_hashers`` need
  the bytes, e.g. the sha256 of a whole multi-part set).
- **Size check.** Every chunk must have exactly the length the document size
  implies; anything else is a :class:`SizeMismatchError` (nothing is recorded
  for that chunk).

Failures per chunk: a FloodWait (or a local cool-down) waits until its end
and asks the same account again (never another account); a connection error or
other RPC error is retried with backoff up to ``max_attempts``;
``FILE_REFERENCE_EXPIRED`` calls ``refresh`` for a fresh DocumentInfo.
Anything else ends the download with the error; what was written stays
journaled for the next attempt.
"""
from __future__ import annotations

import asyncio
import hashlib
import os
import struct
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Awaitable, Callable, Iterable, Protocol

import pykka
from loguru import logger

from actors.account_messages import DocumentInfo, DownloadRange
from actors.asking import ask_async
from actors.faults import fault_point
from actors.telegram.errors import CoolingDownError, FloodWaitError, RpcError

__all__ = [
    "CHUNK_SIZE", "ALIGN", "DownloadError", "SizeMismatchError", "DownloadResult", "ChunkJournal",
    "RangePort", "AccountRangePort", "download_document", "ask_on_loop", "journal_path",
]

CHUNK_SIZE = 1024 * 1024
ALIGN = 4096
JOURNAL_SUFFIX = ".chunks"
_MAGIC = b"SJ1\n"
_HEADER = struct.Struct("<qqI")  # document id, size, chunk size
_RECORD = struct.Struct("<I")
_DONE = 0xFFFFFFFF
JOURNAL_BATCH = 16  # chunks written between two fdatasync + journal appends
_REFERENCE_ERRORS = ("FILE_REFERENCE_EXPIRED", "FILE_REFERENCE_INVALID")

log = logger.bind(actor="download")


class DownloadError(Exception):
    """A document could not be downloaded (the message says why)."""


class SizeMismatchError(DownloadError):
    """A chunk's length does not match the document size."""

    def __init__(self, document_id: int, offset: int, expected: int, got: int):
        self.document_id, self.offset, self.expected, self.got = document_id, offset, expected, got
        super().__init__(f"document {document_id}: {got} bytes at offset {offset}, "
                         f"expected {expected} (size mismatch)")


@dataclass(frozen=True)
class DownloadResult:
    path: Path
    size: int
    sha256: str
    chunks: int
    resumed_chunks: int      # chunks found on disk from an earlier attempt
    downloaded_bytes: int    # bytes requested from Telegram by this call
    seconds: float


# ------------------------------------------------------------------ the journal


def journal_path(staged: Path) -> Path:
    return staged.with_name(staged.name + JOURNAL_SUFFIX)


class ChunkJournal:
    """Which chunks of one staged file are on disk: ``<staged>.chunks``.

    A header (document id, size, chunk size), then one 4-byte record per chunk
    written (appended after the chunk's bytes were written), then, when done,
    a done record and the file's sha256.  A torn last record is ignored.
    """

    def __init__(self, staged: Path, document_id: int, size: int, chunk_size: int):
        self.path = journal_path(Path(staged))
        self.document_id, self.size, self.chunk_size = document_id, size, chunk_size
        self.chunks: set[int] = set()
        self.digest: str | None = None
        self._fd = -1

    def open(self) -> bool:
        """Load the journal, or start one; True when started (nothing is known on disk)."""
        header = _MAGIC + _HEADER.pack(self.document_id, self.size, self.chunk_size)
        fresh = True
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            data = b""
        if data.startswith(header):
            body = data[len(header):]
            i = 0
            while i + _RECORD.size <= len(body):
                (index,) = _RECORD.unpack_from(body, i)
                i += _RECORD.size
                if index == _DONE:
                    if len(body) - i >= 32:
                        self.digest = body[i:i + 32].hex()
                    break
                self.chunks.add(index)
            fresh = False
            if self.digest is None and (len(body) - i) % _RECORD.size:
                with open(self.path, "r+b") as f:  # a torn last record: cut it off
                    f.truncate(len(header) + i)
        elif data:
            log.warning("{}: journal of another document or layout, starting over", self.path)
        if fresh:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "wb") as f:
                f.write(header)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
        return fresh

    def record(self, index: int) -> None:
        os.write(self._fd, _RECORD.pack(index))
        self.chunks.add(index)

    def finish(self, digest: str) -> None:
        os.write(self._fd, _RECORD.pack(_DONE) + bytes.fromhex(digest))
        self.digest = digest

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def remove(self) -> None:
        self.close()
        self.path.unlink(missing_ok=True)


# ------------------------------------------------------------------ asking an actor from a loop

#: Kept importable under its old name: the one helper is actors.asking.ask_async.
ask_on_loop = ask_async


# ------------------------------------------------------------------ ports


class RangePort(Protocol):
    async def read(self, document: DocumentInfo, offset: int, limit: int) -> bytes: ...


class AccountRangePort:
    """RangePort over one AccountActor (DownloadRange asks)."""

    def __init__(self, account_ref: Any, *, timeout: float = 120.0):
        self.ref, self.timeout = account_ref, timeout

    async def read(self, document: DocumentInfo, offset: int, limit: int) -> bytes:
        return await ask_async(self.ref, DownloadRange(document, offset, limit), self.timeout)


class BudgetPort(Protocol):
    async def acquire(self, nbytes: int) -> Any: ...
    def release(self, lease: Any) -> None: ...


# ------------------------------------------------------------------ the download


def check_chunk_size(chunk_size: int) -> None:
    if chunk_size <= 0 or chunk_size % ALIGN or CHUNK_SIZE % chunk_size:
        raise ValueError(f"chunk size {chunk_size}: a multiple of 4096 that divides 1 MiB")


async def download_document(
    port: RangePort,
    document: DocumentInfo,
    path: str | os.PathLike,
    *,
    budget: BudgetPort | None = None,
    window: int = 8,
    chunk_size: int = CHUNK_SIZE,
    extra_hashers: Iterable[Any] = (),
    refresh: Callable[[], Awaitable[DocumentInfo]] | None = None,
    on_progress: Callable[[int], None] | None = None,
    clock: Callable[[], float] = time.time,
    sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
    max_attempts: int = 5,
    backoff_seconds: float = 1.0,
) -> DownloadResult:
    """Download ``document`` into ``path`` (see the module doc); returns its sha256.

    ``extra_hashers`` (hashlib objects) are fed the same bytes in order, e.g. a
    set's hasher that has already seen the set's earlier parts.
    ``on_progress(nbytes)`` is called for every chunk received from Telegram.
    """
    check_chunk_size(chunk_size)
    if window < 1:
        raise ValueError("window must be >= 1")
    started = time.monotonic()
    path = Path(path)
    size = document.size
    count = -(-size // chunk_size) if size else 0
    extra = list(extra_hashers)
    journal = ChunkJournal(path, document.id, size, chunk_size)
    path.parent.mkdir(parents=True, exist_ok=True)
    if journal.open():
        path.unlink(missing_ok=True)  # chunks of an unknown journal cannot be trusted
        journal.chunks.clear()
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        if os.fstat(fd).st_size != size:
            if journal.chunks:  # a journal without its bytes: start over
                log.warning("{}: staged file has the wrong size, starting over", path)
                os.ftruncate(fd, 0)
                journal.remove()
                journal = ChunkJournal(path, document.id, size, chunk_size)
                journal.open()
            os.ftruncate(fd, size)
        resumed = len(journal.chunks)
        if journal.digest is not None and not extra and resumed == count:
            return DownloadResult(path, size, journal.digest, count, resumed, 0,
                                  time.monotonic() - started)
        run = _Run(port, document, fd, journal, count, size, chunk_size, budget, window, extra,
                   refresh, on_progress, clock, sleep, max_attempts, backoff_seconds)
        digest = await run.go()
        if journal.digest is None:
            journal.finish(digest)
        elif journal.digest != digest:
            raise DownloadError(f"{path}: sha256 {digest} differs from the recorded {journal.digest}")
        return DownloadResult(path, size, digest, count, resumed, run.downloaded,
                              time.monotonic() - started)
    finally:
        os.close(fd)
        journal.close()


class _Run:
    """One call of download_document: the window, the hash pointer, the chunks."""

    def __init__(self, port, document, fd, journal, count, size, chunk_size, budget, window, extra,
                 refresh, on_progress, clock, sleep, max_attempts, backoff_seconds):
        self.port, self.document, self.fd, self.journal = port, document, fd, journal
        self.count, self.size, self.chunk_size = count, size, chunk_size
        self.budget, self.window, self.refresh = budget, window, refresh
        self.on_progress, self.clock, self.sleep = on_progress, clock, sleep
        self.max_attempts, self.backoff_seconds = max_attempts, backoff_seconds
        self.hasher = hashlib.sha256()
        self.hashers = [self.hasher, *extra]
        self.next_hash = 0
        self.ready: dict[int, tuple[bytes, Any]] = {}
        self.downloaded = 0
        self.slots = asyncio.Semaphore(window)
        self.unsynced: list[int] = []
        self._refreshing: asyncio.Future | None = None

    def length(self, index: int) -> int:
        return min(self.chunk_size, self.size - index * self.chunk_size)

    async def go(self) -> str:
        loop = asyncio.get_running_loop()
        # chunks already on disk at the start: hash that prefix off the loop thread
        prefix = 0
        while prefix < self.count and prefix in self.journal.chunks:
            prefix += 1
        if prefix:
            await loop.run_in_executor(None, self._hash_from_disk, 0, prefix)
            self.next_hash = prefix
        todo = [i for i in range(self.next_hash, self.count) if i not in self.journal.chunks]
        tasks: set[asyncio.Task] = set()
        failure: list[BaseException] = []
        try:
            for index in todo:
                await self.slots.acquire()
                if failure:
                    self.slots.release()
                    break
                task = loop.create_task(self._fetch(index))
                tasks.add(task)
                task.add_done_callback(lambda t: self._done(t, tasks, failure))
            while tasks:
                await asyncio.wait(set(tasks))
        finally:
            for task in tasks:
                task.cancel()
            if tasks:
                await asyncio.gather(*tasks, return_exceptions=True)
            for _data, lease in self.ready.values():
                self._release(lease)
            self.ready.clear()
            self.sync()
        if failure:
            raise failure[0]
        self._advance()  # journaled chunks after the last fetched one
        if self.next_hash != self.count:
            raise DownloadError(f"document {self.document.id}: chunk {self.next_hash} never arrived")
        return self.hasher.hexdigest()

    def _done(self, task: asyncio.Task, tasks: set, failure: list) -> None:
        tasks.discard(task)
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            if not failure:
                failure.append(exc)
            for other in list(tasks):
                other.cancel()
            self.slots.release()  # wake the scheduler so it sees the failure

    async def _fetch(self, index: int) -> None:
        expected = self.length(index)
        offset = index * self.chunk_size
        lease = await self.budget.acquire(expected) if self.budget is not None else None
        try:
            data = await self._read(offset)
            if len(data) != expected:
                raise SizeMismatchError(self.document.id, offset, expected, len(data))
            self.downloaded += len(data)
            if self.on_progress is not None:
                self.on_progress(len(data))
            _pwrite_all(self.fd, data, offset)
            self.unsynced.append(index)
            if len(self.unsynced) >= JOURNAL_BATCH:
                self.sync()
        except BaseException:
            self._release(lease)
            raise
        self.ready[index] = (data, lease)
        self._advance()

    def sync(self) -> None:
        """Journal the chunks written since the last sync, after their bytes are on disk."""
        if self.unsynced:
            os.fdatasync(self.fd)
            for index in self.unsynced:
                self.journal.record(index)
            self.unsynced.clear()
            fault_point("ingest_after_download_chunk")

    def _advance(self) -> None:
        """Hash every chunk the prefix now reaches; free their leases and slots."""
        while self.next_hash < self.count:
            index = self.next_hash
            if index in self.ready:
                data, lease = self.ready.pop(index)
                self._feed(data)
                self._release(lease)
                self.slots.release()
            elif index in self.journal.chunks or index in self.unsynced:  # on disk already
                self._hash_from_disk(index, index + 1)
            else:
                return
            self.next_hash += 1

    def _hash_from_disk(self, first: int, end: int) -> None:
        for index in range(first, end):
            self._feed(os.pread(self.fd, self.length(index), index * self.chunk_size))

    def _feed(self, data: bytes) -> None:
        for h in self.hashers:
            h.update(data)

    def _release(self, lease: Any) -> None:
        if lease is not None and self.budget is not None:
            self.budget.release(lease)

    async def _read(self, offset: int) -> bytes:
        attempt = 0
        while True:
            try:
                return await self.port.read(self.document, offset, self.chunk_size)
            except (FloodWaitError, CoolingDownError) as exc:  # same account, after the wait
                await self.sleep(max(0.0, exc.until - self.clock()))
            except RpcError as exc:
                if exc.message in _REFERENCE_ERRORS and self.refresh is not None:
                    await self._refresh_document()
                    attempt += 1
                    if attempt >= self.max_attempts:
                        raise
                    continue
                attempt += 1
                if attempt >= self.max_attempts or (exc.code is not None and exc.code < 500
                                                    and "connection" not in exc.message):
                    raise
                await self.sleep(self.backoff_seconds * 2 ** (attempt - 1))
            except (pykka.Timeout, asyncio.TimeoutError) as exc:
                attempt += 1
                if attempt >= self.max_attempts:
                    raise DownloadError(f"document {self.document.id}: chunk at {offset} timed out "
                                        f"{attempt} times") from exc
                await self.sleep(self.backoff_seconds * 2 ** (attempt - 1))

    async def _refresh_document(self) -> None:
        """One refresh for every chunk that hit an expired file reference at once."""
        if self._refreshing is None or self._refreshing.done():
            old = self.document

            async def fetch() -> None:
                fresh = await self.refresh()
                if fresh.id != old.id or fresh.size != old.size:
                    raise DownloadError(f"document {old.id} changed under its message "
                                        f"(now {fresh.id}, {fresh.size} bytes)")
                self.document = replace(old, file_reference=fresh.file_reference,
                                        access_hash=fresh.access_hash, dc_id=fresh.dc_id)
            self._refreshing = asyncio.ensure_future(fetch())
        await asyncio.shield(self._refreshing)


def _pwrite_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n
