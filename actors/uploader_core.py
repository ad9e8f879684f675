"""The part scheduler of ONE Telegram document: plain logic, no I/O, no threads.

A document (one :class:`storage.manifest.PartPlan`) is uploaded in chunks of
512 KiB (``upload.saveFilePart``, or ``upload.saveBigFilePart`` when the
document is over 10 MiB).  :class:`PartScheduler` keeps every chunk in exactly
one of three states::

    pending --next_chunks()--> in_flight --ack()--> acked
       ^                           |                   |
       +--- flood()/failed() ------+                   |
       +--- missing() (FILE_PART_X_MISSING) -----------+

- at most ``window`` chunks are in flight;
- ``flood(index, until)`` re-queues the chunk and *parks* the document: no
  chunk is handed out before ``until`` (the chunks already in flight finish on
  their own).  Nothing restarts, nothing moves to another account;
- ``missing(index)`` is what ``FILE_PART_X_MISSING`` means: the server dropped
  that chunk.  Parts expire by age, so every chunk acknowledged no later than
  the missing one is presumed dropped too and re-queued (chunks known only
  from the journal of an earlier run are the oldest of all).  When the server
  has dropped everything, everything is re-sent, in one round, instead of one
  ``sendMedia`` round trip per chunk;
- ``done`` when every chunk is acked and nothing is in flight: the caller sends
  the document with the manifest's ``random_id``.

Time comes from the injected ``clock``.
"""
from __future__ import annotations

import asyncio
import inspect
import re
import time
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Iterable, Protocol

from actors.telegram.errors import (
    CoolingDownError,
    FilePartMissingError,
    FloodWaitError,
    RpcError,
    TelegramError,
)
from storage.manifest import UPLOAD_CHUNK_SIZE, PartPlan

__all__ = [
    "CHUNK_SIZE",
    "BIG_FILE_THRESHOLD",
    "Chunk",
    "PartScheduler",
    "TooManyPartsError",
    "is_big",
    "chunk_count",
    "missing_index",
    "flood_until",
    "is_transient",
    "UploadError",
    "BudgetRefusedError",
    "UploadPort",
    "ChunkJournal",
    "BudgetPort",
    "MemoryJournal",
    "UploadStats",
    "upload_document",
]

CHUNK_SIZE = UPLOAD_CHUNK_SIZE           # 512 KiB: Telegram's largest upload part
BIG_FILE_THRESHOLD = 10 * 1024 * 1024   # above this: saveBigFilePart + InputFileBig
_JOURNALED = float("-inf")              # ack time of chunks known only from the journal
_MISSING_RE = re.compile(r"FILE_PART_(\d+)_MISSING")
_TRANSIENT = {"RPC_CALL_FAIL", "TIMEOUT", "RPC_MCGET_FAIL", "INTERDC_CALL_ERROR",
              "INTERDC_CALL_RICH_ERROR", "WORKER_BUSY_TOO_LONG_RETRY", "MSG_WAIT_FAILED"}


class TooManyPartsError(ValueError):
    """The document needs more chunks than the account may upload for one file."""


@dataclass(frozen=True)
class Chunk:
    """One upload call: ``length`` bytes at ``offset`` of the source file."""

    index: int
    offset: int   # absolute offset in the source file
    length: int


def is_big(length: int) -> bool:
    return length > BIG_FILE_THRESHOLD


def chunk_count(length: int) -> int:
    return -(-length // CHUNK_SIZE)


# -- reading account errors -------------------------------------------------------------
def missing_index(exc: BaseException) -> int | None:
    """The part index of a FILE_PART_X_MISSING error, else None.

    Telethon maps ``FILE_PART_0_MISSING`` to its own class (not
    FilePartMissingError), so the account returns it as RpcError with that message.
    """
    if isinstance(exc, FilePartMissingError):
        return exc.index
    if isinstance(exc, RpcError):
        m = _MISSING_RE.search(exc.message or "")
        if m:
            return int(m.group(1))
    return None


def flood_until(exc: BaseException) -> float | None:
    """The end of the wait for a FloodWait (or a local cooling-down refusal)."""
    if isinstance(exc, (FloodWaitError, CoolingDownError)):
        return exc.until
    return None


def is_transient(exc: BaseException) -> bool:
    """An error worth retrying the same request for (connection, server-side)."""
    if isinstance(exc, RpcError):
        return exc.code is None or exc.code >= 500 or exc.message in _TRANSIENT
    return isinstance(exc, (ConnectionError, TimeoutError)) and not isinstance(exc, TelegramError)


# -- the scheduler ----------------------------------------------------------------------
class PartScheduler:
    """Which chunks of one document to send next.  See the module doc."""

    def __init__(
        self,
        plan: PartPlan,
        *,
        window: int,
        acked: Iterable[int] = (),
        max_parts: int | None = None,
        clock: Callable[[], float] = time.time,
        on_ack: Callable[[int], None] | None = None,
    ):
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        self.plan = plan
        self.window = window
        self.total = chunk_count(plan.length)
        if self.total < 1:
            raise ValueError("a document has at least one byte")
        if max_parts is not None and self.total > max_parts:
            raise TooManyPartsError(
                f"{plan.file_name}: {self.total} parts of 512 KiB exceed the account's cap of {max_parts}")
        self.big = is_big(plan.length)
        self._clock = clock
        self._on_ack = on_ack
        self._acked: dict[int, float] = {}      # index -> clock() at ack (-inf: from the journal)
        for index in acked:
            self._check_index(index)
            self._acked[index] = _JOURNALED
        self._in_flight: set[int] = set()
        self._pending: list[int] = [i for i in range(self.total) if i not in self._acked]
        self._attempts: dict[int, int] = {}
        self._parked_until: float | None = None
        self.resent = 0   # chunks put back because the server lost them

    # -- views ------------------------------------------------------------------------
    @property
    def file_id(self) -> int:
        return self.plan.file_id

    @property
    def acked(self) -> frozenset[int]:
        return frozenset(self._acked)

    @property
    def in_flight(self) -> frozenset[int]:
        return frozenset(self._in_flight)

    @property
    def pending(self) -> tuple[int, ...]:
        return tuple(self._pending)

    @property
    def done(self) -> bool:
        return len(self._acked) == self.total and not self._in_flight

    def parked_until(self) -> float | None:
        """When the document may send again, or None when it is not parked."""
        if self._parked_until is not None and self._clock() >= self._parked_until:
            self._parked_until = None
        return self._parked_until

    def chunk(self, index: int) -> Chunk:
        self._check_index(index)
        start = index * CHUNK_SIZE
        return Chunk(index, self.plan.offset + start, min(CHUNK_SIZE, self.plan.length - start))

    def attempts(self, index: int) -> int:
        return self._attempts.get(index, 0)

    # -- transitions ------------------------------------------------------------------
    def next_chunks(self) -> list[Chunk]:
        """Chunks to send now (moved to in flight): none while parked, never over the window."""
        if self.parked_until() is not None:
            return []
        room = self.window - len(self._in_flight)
        if room <= 0 or not self._pending:
            return []
        self._pending.sort()
        out, self._pending = self._pending[:room], self._pending[room:]
        for index in out:
            self._in_flight.add(index)
            self._attempts[index] = self._attempts.get(index, 0) + 1
        return [self.chunk(i) for i in out]

    def ack(self, index: int) -> None:
        """The server stored chunk ``index``."""
        self._take_in_flight(index, "ack")
        self._acked[index] = self._clock()
        if self._on_ack is not None:
            self._on_ack(index)

    def failed(self, index: int) -> int:
        """Sending chunk ``index`` failed (transiently): re-queue it; returns its attempts so far."""
        self._take_in_flight(index, "failed")
        self._pending.append(index)
        return self._attempts.get(index, 0)

    def flood(self, index: int, until: float) -> None:
        """Chunk ``index`` hit a FloodWait (or a cooldown) lasting until ``until``: park."""
        self._take_in_flight(index, "flood")
        self._pending.append(index)
        self._attempts[index] = max(0, self._attempts.get(index, 1) - 1)  # a wait is not a failure
        self.park(until)

    def park(self, until: float) -> None:
        """Hand out nothing before ``until`` (e.g. the document's send flooded)."""
        if until > self._clock():
            self._parked_until = max(self._parked_until or until, until)

    def missing(self, index: int) -> list[int]:
        """FILE_PART_``index``_MISSING: re-queue it and every chunk acked no later.

        Returns the indexes put back (empty when the chunk is not acked: it is
        pending or in flight already and will be sent anyway).
        """
        self._check_index(index)
        if index not in self._acked:
            return []
        horizon = self._acked[index]
        lost = sorted(i for i, t in self._acked.items() if t <= horizon)
        for i in lost:
            del self._acked[i]
            self._pending.append(i)
        self.resent += len(lost)
        return lost

    def reset(self) -> list[int]:
        """The server dropped everything: every acked chunk goes back to pending."""
        lost = sorted(self._acked)
        self._acked.clear()
        self._pending.extend(lost)
        self.resent += len(lost)
        return lost

    # -- helpers ----------------------------------------------------------------------
    def _take_in_flight(self, index: int, what: str) -> None:
        if index not in self._in_flight:
            raise ValueError(f"{what}({index}): chunk {index} is not in flight")
        self._in_flight.discard(index)

    def _check_index(self, index: int) -> None:
        if not isinstance(index, int) or not 0 <= index < self.total:
            raise ValueError(f"chunk index {index!r} outside 0..{self.total - 1}")


# -- the async driver -------------------------------------------------------------------
class UploadError(Exception):
    """The document could not be uploaded (a permanent error, or retries exhausted)."""


class BudgetRefusedError(Exception):
    """The budget refused a lease (it could never be granted under its limits)."""


class UploadPort(Protocol):
    """What the driver needs from an account (see actors.uploader.AccountPort)."""

    async def upload_part(self, file_id: int, index: int, total: int, data: bytes, big: bool) -> Any: ...

    async def send_document(self, *, file_id: int, total_parts: int, big: bool, file_name: str,
                            size: int, caption: str, random_id: int) -> Any: ...

    # optional: ``async upload_parts(file_id, total, big, parts: [(index, data), ...])``
    # returns one outcome per part, in order: a result, or the exception that part met
    # (several chunks in one call; without it they go as concurrent upload_part calls)


class ChunkJournal(Protocol):
    """Durable record of acknowledged chunks of one document (for resume)."""

    def acked(self) -> Iterable[int]: ...

    def record(self, index: int) -> None: ...

    # optional: ``flush()`` writes what ``record`` buffered (called before the
    # document is sent and when the upload stops)


class BudgetPort(Protocol):
    """Byte/slot leases for chunks in flight: acquire before reading, release after.

    ``slots`` is the number of chunks the lease covers (passed only when above 1).
    ``acquire`` raises BudgetRefusedError for a lease that can never be granted.
    """

    async def acquire(self, nbytes: int, slots: int = 1) -> Any: ...

    def release(self, lease: Any) -> None: ...


class MemoryJournal:
    """A ChunkJournal in memory (tests, or a transfer that needs no resume)."""

    def __init__(self, acked: Iterable[int] = ()):
        self.indexes: set[int] = set(acked)
        self.records: list[int] = []

    def acked(self) -> Iterable[int]:
        return set(self.indexes)

    def record(self, index: int) -> None:
        self.indexes.add(index)
        self.records.append(index)


@dataclass(frozen=True)
class UploadStats:
    chunks_sent: int      # upload calls that succeeded (re-sends included)
    chunks_resent: int    # chunks put back because the server lost them
    flood_waits: int      # FloodWait / cooldown answers waited out
    retries: int          # transient failures retried
    send_attempts: int    # sendMedia calls


async def upload_document(
    port: UploadPort,
    plan: PartPlan,
    read: Callable[[int, int], bytes | Awaitable[bytes]],
    *,
    window: int = 8,
    journal: ChunkJournal | None = None,
    budget: BudgetPort | None = None,
    clock: Callable[[], float] = time.time,
    sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
    max_parts: int | None = None,
    max_attempts: int = 5,
    backoff: float = 0.5,
    on_stats: Callable[[UploadStats], None] | None = None,
    group: int = 1,
) -> Any:
    """Upload one document (``plan``) through ``port`` and send it; returns send_document's result.

    ``read(offset, length)`` returns the chunk's bytes (sync or async); it is
    called only when that chunk is about to be sent, after its budget lease
    (if any) is granted, so at most ``window`` chunks are in memory.
    Chunks the ``journal`` lists are not sent again unless the server says it
    lost them.  Up to ``group`` chunks handed out together go in one call
    (``port.upload_parts``) under one budget lease of their bytes and chunks;
    each has its own outcome, as if sent alone.  FloodWaits are waited out (``sleep`` until the wait's end per
    ``clock``) on the same account; transient errors are retried per chunk up to
    ``max_attempts`` with exponential ``backoff``.  Anything else raises (the
    account errors of actors.telegram.errors, or UploadError).
    """
    if group < 1:
        raise ValueError(f"group must be >= 1, got {group}")
    journal = journal if journal is not None else MemoryJournal()
    sched = PartScheduler(plan, window=window, acked=journal.acked(), max_parts=max_parts,
                          clock=clock, on_ack=journal.record)
    stats = {"sent": 0, "floods": 0, "retries": 0, "sends": 0}

    async def wait_until(until: float) -> None:
        delay = until - clock()
        if delay > 0:
            await sleep(delay)

    upload_parts = getattr(port, "upload_parts", None)

    async def read_chunk(chunk: Chunk) -> bytes:
        data = read(chunk.offset, chunk.length)
        if inspect.isawaitable(data):
            data = await data
        if len(data) != chunk.length:
            raise UploadError(f"{plan.file_name}: short read at offset {chunk.offset} "
                              f"({len(data)} of {chunk.length} bytes); source changed?")
        return data

    async def send_chunks(chunks: list[Chunk]) -> list[tuple[Chunk, BaseException | None]]:
        """One lease, one call for ``chunks``; the outcome of each (None: acknowledged)."""
        nonlocal group
        lease = None
        if budget is not None:
            nbytes = sum(c.length for c in chunks)
            if len(chunks) == 1:
                lease = await budget.acquire(nbytes)
            else:
                try:
                    lease = await budget.acquire(nbytes, slots=len(chunks))
                except BudgetRefusedError:  # more than the budget's limits allow at once
                    group = 1               # one lease per chunk from now on
                    sent = await asyncio.gather(*(send_chunks([c]) for c in chunks))
                    return [outcome for one in sent for outcome in one]
        try:
            if len(chunks) == 1:
                await port.upload_part(plan.file_id, chunks[0].index, sched.total,
                                       await read_chunk(chunks[0]), sched.big)
                return [(chunks[0], None)]
            parts = [(c.index, await read_chunk(c)) for c in chunks]
            if upload_parts is not None:
                outcomes = await upload_parts(plan.file_id, sched.total, sched.big, parts)
            else:
                outcomes = await asyncio.gather(
                    *(port.upload_part(plan.file_id, i, sched.total, data, sched.big) for i, data in parts),
                    return_exceptions=True)
            del parts
            out: list[tuple[Chunk, BaseException | None]] = []
            for chunk, outcome in zip(chunks, outcomes, strict=True):
                if isinstance(outcome, (TelegramError, ConnectionError, TimeoutError)):
                    out.append((chunk, outcome))
                elif isinstance(outcome, BaseException):
                    raise outcome
                else:
                    out.append((chunk, None))
            return out
        except (TelegramError, ConnectionError, TimeoutError) as exc:
            return [(chunk, exc) for chunk in chunks]
        finally:
            if lease is not None:
                budget.release(lease)

    async def settle(chunk: Chunk, exc: BaseException | None) -> None:
        if exc is None:
            sched.ack(chunk.index)
            stats["sent"] += 1
            return
        until = flood_until(exc)
        if until is not None:
            sched.flood(chunk.index, until)
            stats["floods"] += 1
            return
        if is_transient(exc) or missing_index(exc) is not None:
            attempts = sched.failed(chunk.index)
            if attempts >= max_attempts:
                raise UploadError(f"{plan.file_name}: part {chunk.index} failed {attempts} times: {exc}") from exc
            stats["retries"] += 1
            await sleep(backoff * 2 ** (attempts - 1))
            return
        raise exc

    async def send_all_chunks() -> None:
        tasks: set[asyncio.Task] = set()
        finished: list[asyncio.Task] = []
        try:
            while not sched.done:
                chunks = sched.next_chunks()
                for start in range(0, len(chunks), group):
                    tasks.add(asyncio.ensure_future(send_chunks(chunks[start:start + group])))
                if not tasks:
                    until = sched.parked_until()
                    if until is None:  # cannot happen: not done, nothing in flight, not parked
                        raise UploadError(f"{plan.file_name}: scheduler stalled")
                    await wait_until(until)
                    continue
                done, tasks = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
                finished = sorted(done, key=id)
                while finished:
                    for chunk, exc in finished.pop().result():
                        await settle(chunk, exc)
        finally:
            for task in tasks:
                task.cancel()
            if tasks:
                await asyncio.gather(*tasks, return_exceptions=True)
            for task in finished:  # settled no more after an error: retrieve, do not warn
                task.cancelled() or task.exception()

    flush = getattr(journal, "flush", None) or (lambda: None)
    send_failures = missing_rounds = 0
    try:
        while True:
            try:
                await send_all_chunks()
            finally:
                flush()   # what was acknowledged is journaled before anything else happens
            stats["sends"] += 1
            try:
                return await port.send_document(
                    file_id=plan.file_id, total_parts=sched.total, big=sched.big,
                    file_name=plan.file_name, size=plan.length, caption=plan.caption,
                    random_id=plan.random_id,
                )
            except (TelegramError, ConnectionError, TimeoutError) as exc:
                index = missing_index(exc)
                until = flood_until(exc)
                if index is not None:
                    missing_rounds += 1
                    if missing_rounds > max_attempts:
                        raise UploadError(f"{plan.file_name}: the server keeps losing parts "
                                          f"({missing_rounds} rounds): {exc}") from exc
                    if not 0 <= index < sched.total or not sched.missing(index):
                        sched.reset()  # the server disagrees with what we know: send it all
                elif until is not None:
                    stats["floods"] += 1
                    await wait_until(until)
                elif is_transient(exc):
                    send_failures += 1
                    if send_failures >= max_attempts:
                        raise UploadError(f"{plan.file_name}: sending the document failed "
                                          f"{send_failures} times: {exc}") from exc
                    stats["retries"] += 1
                    await sleep(backoff * 2 ** (send_failures - 1))
                else:
                    raise
    finally:
        if on_stats is not None:
            on_stats(UploadStats(stats["sent"], sched.resent, stats["floods"], stats["retries"], stats["sends"]))
