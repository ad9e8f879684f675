"""UploaderActor, and the adapters that let upload_document drive real actors.

- :class:`AccountPort`: an UploadPort over an AccountActor ref (asks bridged into asyncio);
- :class:`FileReader`: ``read(offset, length)`` of a source file (``os.pread``);
- :class:`BudgetActorPort`: a BudgetPort over the BudgetActor (ReserveBudget answered by tell).
"""
from __future__ import annotations

import asyncio
import dataclasses
import itertools
import os
import time
import uuid
from pathlib import Path
from typing import Any, Awaitable, Callable

import pykka
from loguru import logger

from actors.adoption import adopt_orphans
from actors.asking import _LoopHandOff, ask_async  # noqa: F401 - ask_async lives there, importable here too
from actors.account_messages import (
    DocumentSentResult, PartUploadedResult, PartsUploadedResult, SendDocument, UploadPart, UploadParts,
)
from actors.budget_messages import BudgetGranted, BudgetRefused, CancelBudget, ReleaseBudget, ReserveBudget
from actors.base import LoopActor
from actors.faults import fault_point
from actors.uploader_core import BudgetRefusedError, UploadStats, upload_document
from actors.uploader_messages import PartSent, StopUpload, TransferUploadedResult, UploadTransfer
from storage.manifest import ManifestError, open_source, read_manifest

__all__ = ["AccountPort", "FileReader", "BudgetActorPort", "BudgetRefusedError", "StorageJournal",
           "UploaderActor", "UploadStoppedError"]


class AccountPort:
    """UploadPort for one AccountActor and one destination channel."""

    def __init__(self, account_ref: Any, channel: int | str, *, topic_id: int | None = None,
                 mime_type: str | None = None, timeout: float = 120.0):
        self.ref, self.channel = account_ref, channel
        self.topic_id, self.mime_type, self.timeout = topic_id, mime_type, timeout

    async def upload_part(self, file_id: int, index: int, total: int, data: bytes,
                          big: bool) -> PartUploadedResult:
        return await ask_async(self.ref, UploadPart(file_id, index, total, data, big), self.timeout)

    async def upload_parts(self, file_id: int, total: int, big: bool,
                           parts: list[tuple[int, bytes]]) -> tuple[PartUploadedResult | BaseException, ...]:
        """Several parts in one ask (one hand-off each way between the threads)."""
        msg = UploadParts(tuple(UploadPart(file_id, index, total, data, big) for index, data in parts))
        result: PartsUploadedResult = await ask_async(self.ref, msg, self.timeout)
        return result.outcomes

    async def send_document(self, *, file_id: int, total_parts: int, big: bool, file_name: str,
                            size: int, caption: str, random_id: int) -> DocumentSentResult:
        msg = SendDocument(self.channel, file_id, total_parts, big, file_name, size, caption,
                           random_id, topic_id=self.topic_id, mime_type=self.mime_type)
        return await ask_async(self.ref, msg, self.timeout)


class FileReader:
    """``reader(offset, length) -> bytes`` of one file, opened once; use as a context manager."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._fd = os.open(self.path, os.O_RDONLY)

    def __call__(self, offset: int, length: int) -> bytes:
        chunks, done = [], 0
        while done < length:
            data = os.pread(self._fd, length - done, offset + done)
            if not data:
                break
            chunks.append(data)
            done += len(data)
        return b"".join(chunks)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> FileReader:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class UploadStoppedError(Exception):
    """A StopUpload ended the transfer's upload (it stays "uploading", resumable)."""


class BudgetActorPort:
    """BudgetPort over a BudgetActor for one account's part leases.

    It is its own ``reply_to``: the BudgetActor tells it BudgetGranted or
    BudgetRefused from its thread; the answer is handed to the waiting
    coroutine's loop.  ``is_alive`` turns False after :meth:`close`, so the
    budget reaps whatever this port still held or waited for.
    """

    _ids = itertools.count(1)

    def __init__(self, budget_ref: Any, account: str):
        self.budget_ref, self.account = budget_ref, account
        self._prefix = f"upload-{uuid.uuid4().hex[:8]}"
        self._waiting: dict[str, tuple[_LoopHandOff, asyncio.Future]] = {}
        self._alive = True

    async def acquire(self, nbytes: int, slots: int = 1) -> Any:
        loop = asyncio.get_running_loop()
        request_id = f"{self._prefix}-{next(self._ids)}"
        future = loop.create_future()
        self._waiting[request_id] = (_LoopHandOff.of(loop), future)
        self.budget_ref.tell(ReserveBudget(request_id, self.account, nbytes, "part", reply_to=self,
                                           slots=slots))
        try:
            return await future
        except asyncio.CancelledError:
            self.budget_ref.tell(CancelBudget(request_id))
            raise
        finally:
            self._waiting.pop(request_id, None)

    def release(self, lease: Any) -> None:
        self.budget_ref.tell(ReleaseBudget(lease.lease_id))

    # -- reply_to protocol (called on the BudgetActor's thread) --------------------------
    def tell(self, message: Any) -> None:
        entry = self._waiting.get(getattr(message, "request_id", None))
        if entry is None:
            if isinstance(message, BudgetGranted):  # nobody waits any more: give it back
                self.budget_ref.tell(ReleaseBudget(message.lease.lease_id))
            return
        handoff, future = entry
        handoff.put(self._resolve, future, message)

    def is_alive(self) -> bool:
        return self._alive

    def close(self) -> None:
        self._alive = False

    @staticmethod
    def _resolve(future: asyncio.Future, message: Any) -> None:
        if future.done():
            return
        if isinstance(message, BudgetGranted):
            future.set_result(message.lease)
        elif isinstance(message, BudgetRefused):
            future.set_exception(BudgetRefusedError(message.reason))


# -- the journal, on storage ---------------------------------------------------------------
class StorageJournal:
    """ChunkJournal over storage.transfers (journal_chunk_many / journaled_chunks).

    Chunks are uploaded per session, so only chunks this ``account`` sent count.
    Acknowledged chunks are written in batches (one transaction per
    ``batch`` chunks or per ``interval`` seconds of ``clock``, and at
    :meth:`flush`, which upload_document calls before sending the document and
    when it stops): a transaction per 512 KiB chunk was a quarter of the
    uploader's CPU.  Only acknowledged chunks are ever journaled; a crash loses
    at most the last unflushed ones, which a restart simply sends again.
    """

    def __init__(self, storage: Any, transfer_id: str, part_index: int, account: str,
                 *, max_age: float | None = None, batch: int = 64, interval: float = 1.0,
                 clock: Callable[[], float] = time.monotonic):
        self.storage, self.transfer_id, self.part_index = storage, transfer_id, part_index
        self.account, self.max_age = account, max_age
        self.batch, self.interval, self._clock = max(1, batch), interval, clock
        self._unflushed: list[int] = []
        self._flushed_at = clock()

    def acked(self) -> set[int]:
        return self.storage.journaled_chunks(self.transfer_id, self.part_index,
                                             account=self.account, max_age=self.max_age)

    def record(self, index: int) -> None:
        self._unflushed.append(index)
        if len(self._unflushed) >= self.batch or self._clock() - self._flushed_at >= self.interval:
            self.flush()

    def flush(self) -> None:
        self._flushed_at = self._clock()
        if not self._unflushed:
            return
        indexes, self._unflushed = self._unflushed, []
        self.storage.journal_chunk_many(self.transfer_id, self.part_index, indexes, self.account)
        for _ in indexes:   # one hit per journaled chunk, as before batching
            fault_point("mid_part_upload")


# -- the actor ---------------------------------------------------------------------------------
class UploaderActor(LoopActor):
    """One transfer at a time: every part without a message, through one account.

    ``accounts`` maps account names to AccountActor refs (or is any callable
    name -> ref).  Per part: upload_document (window of chunks, journal in
    storage, budget leases when ``budget`` is given; up to ``group`` chunks,
    at most half the window, go to the AccountActor in one ask under one
    lease, so the hand-offs between the threads are paid once for them: 8
    rather than 4 moved ~10% more per second at window 16, 0 ms), then the message id is
    recorded at once (phase 1, ``record_part_sent``) and the part's journal
    cleared; when every part has its message the transfer is marked uploaded.
    An error leaves the transfer in "uploading" (resumable) and is returned in
    the caller's future; a manifest that cannot be read marks it "failed".
    """

    def __init__(self, storage: Any, accounts: Any, *, budget: Any = None, window: int = 8,
                 clock: Callable[[], float] = time.time,
                 sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
                 max_attempts: int = 5, request_timeout: float = 120.0, name: str = "uploader",
                 metrics: Any = None, first_check_delay: float = 0.0, group: int = 8):
        super().__init__()
        self._group = max(1, min(group, window // 2))  # >= 2 groups: the window keeps sliding
        self._metrics = metrics
        self._first_check_delay = first_check_delay  # [verify] first_check_delay_seconds
        self.storage, self.budget, self.window = storage, budget, window
        self._accounts = accounts if callable(accounts) else accounts.__getitem__
        self._clock, self._sleep = clock, sleep
        self._max_attempts, self._timeout = max_attempts, request_timeout
        self._lock: asyncio.Lock | None = None
        self._running: tuple[str, asyncio.Task] | None = None
        self._stopped: dict[str, str] = {}
        self._log = logger.bind(actor=name)

    def on_receive(self, message: Any) -> Any:
        if isinstance(message, UploadTransfer):
            return self._upload(message)
        if isinstance(message, StopUpload):
            return self._stop_upload(message)
        raise TypeError(f"UploaderActor does not handle {type(message).__name__}")

    async def _upload(self, msg: UploadTransfer) -> TransferUploadedResult:
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:  # one transfer at a time; later asks wait their turn
            task = asyncio.current_task()
            self._running = (msg.transfer_id, task)
            try:
                return await self._upload_one(msg)
            except asyncio.CancelledError:
                stopped = self._stopped.pop(msg.transfer_id, None)
                if stopped is None or task.cancelling() > 1:
                    raise
                task.uncancel()
                raise UploadStoppedError(f"transfer {msg.transfer_id}: upload stopped: {stopped}") from None
            finally:
                self._running = None

    def _stop_upload(self, msg: StopUpload) -> bool:
        """Cancel the running upload of msg.transfer_id (runs inline on the loop)."""
        running = getattr(self, "_running", None)
        if running is None or running[0] != msg.transfer_id:
            return False
        self._stopped[msg.transfer_id] = msg.reason or "stopped"
        self._log.bind(transfer=msg.transfer_id).warning("stopping the upload: {}", msg.reason)
        running[1].cancel()
        return True

    async def _upload_one(self, msg: UploadTransfer) -> TransferUploadedResult:
        store, tid = self.storage, msg.transfer_id
        log = self._log.bind(account=msg.account, transfer=tid)
        transfer = store.get_transfer(tid)
        if transfer is None:
            raise LookupError(f"transfer {tid} not found")
        try:
            manifest = read_manifest(transfer.manifest_path)
        except ManifestError as exc:
            store.set_transfer_state(tid, "failed", reason=str(exc))
            log.error("manifest refused, transfer marked failed: {}", exc)
            raise
        # another account started it: its unrecorded sends are adopted, not duplicated; the new
        # account is stored only after that, so a crash in between adopts again on resume
        adopt = (transfer.state == "uploading" or transfer.account) and transfer.account != msg.account
        if transfer.state == "planned":
            store.set_transfer_state(tid, "uploading", expected=("planned",),
                                     account=transfer.account if adopt else msg.account)
        elif transfer.state != "uploading":
            raise ValueError(f"transfer {tid} is {transfer.state}, not planned/uploading")
        account_ref = self._accounts(msg.account)
        if adopt:
            adopted = await adopt_orphans(store, account_ref, tid, channel=msg.channel or None,
                                          manifest=manifest, timeout=self._timeout)
            store.set_transfer_state(tid, "uploading", expected=("uploading",), account=msg.account)
            log.info("continuing transfer of {} with {} (adopted parts {})", transfer.account,
                     msg.account, [i + 1 for i in adopted])
        port = AccountPort(account_ref, msg.channel or manifest.destination,
                           timeout=self._timeout)
        budget = BudgetActorPort(self.budget, msg.account) if self.budget is not None else None
        sent: list[PartSent] = []
        try:
            # several sources (an archive set): read across them (storage.manifest)
            with (open_source(manifest) if len(manifest.sources) > 1
                  else FileReader(manifest.sources[0].path)) as reader:
                for part in store.parts_without_message(tid):
                    plan = dataclasses.replace(manifest.parts[part.index], random_id=part.random_id)
                    stats: list[UploadStats] = []
                    started = time.monotonic()
                    result = await upload_document(
                        port, plan, reader, window=self.window,
                        journal=StorageJournal(store, tid, part.index, msg.account, clock=self._clock),
                        budget=budget, clock=self._clock, sleep=self._sleep,
                        max_attempts=self._max_attempts, on_stats=stats.append, group=self._group)
                    fault_point("after_send_before_record")
                    store.record_part_sent(tid, part.index, message_id=result.message_id,
                                           document_id=result.document_id, account=msg.account)
                    fault_point("after_record")
                    if self._metrics is not None:
                        self._metrics.record_part(msg.account, part.length, time.monotonic() - started)
                    store.clear_journal(tid, part.index)
                    log.info("part {} sent as message {} ({})", part.index, result.message_id, stats[0])
                    sent.append(PartSent(part.index, result.message_id, result.document_id, stats[0]))
        finally:
            if budget is not None:
                budget.close()
        done = store.mark_transfer_uploaded(tid, first_check_delay=self._first_check_delay)
        fresh = {p.index for p in sent}
        earlier = tuple(PartSent(p.index, p.message_id, p.document_id, None)
                        for p in store.list_parts(tid) if p.index not in fresh)
        return TransferUploadedResult(tid, done.state, tuple(sorted(sent + list(earlier), key=lambda p: p.index)))
