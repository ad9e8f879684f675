"""Adapters that let :func:`actors.uploader_core.upload_document` drive real actors.

- :class:`AccountPort`: an UploadPort over an AccountActor ref (asks bridged into asyncio);
- :class:`FileReader`: ``read(offset, length)`` of a source file (``os.pread``);
- :class:`BudgetActorPort`: a BudgetPort over the BudgetActor (ReserveBudget answered by tell).
"""
from __future__ import annotations

import asyncio
import functools
import itertools
import os
import uuid
from pathlib import Path
from typing import Any

from actors.account_messages import DocumentSentResult, PartUploadedResult, SendDocument, UploadPart
from actors.budget_messages import BudgetGranted, BudgetRefused, CancelBudget, ReleaseBudget, ReserveBudget
from actors.telegram.errors import FilePartMissingError, RpcError

__all__ = ["AccountPort", "FileReader", "BudgetActorPort", "BudgetRefusedError"]


async def ask_async(ref: Any, message: Any, timeout: float) -> Any:
    """Ask a pykka actor without blocking the running loop (the wait runs in an executor)."""
    future = ref.ask(message, block=False)
    return await asyncio.get_running_loop().run_in_executor(None, functools.partial(future.get, timeout=timeout))


class AccountPort:
    """UploadPort for one AccountActor and one destination channel."""

    def __init__(self, account_ref: Any, channel: int | str, *, topic_id: int | None = None,
                 mime_type: str | None = None, timeout: float = 120.0):
        self.ref, self.channel = account_ref, channel
        self.topic_id, self.mime_type, self.timeout = topic_id, mime_type, timeout
        self._guessed: set[int] = set()

    async def upload_part(self, file_id: int, index: int, total: int, data: bytes,
                          big: bool) -> PartUploadedResult:
        return await ask_async(self.ref, UploadPart(file_id, index, total, data, big), self.timeout)

    async def send_document(self, *, file_id: int, total_parts: int, big: bool, file_name: str,
                            size: int, caption: str, random_id: int) -> DocumentSentResult:
        msg = SendDocument(self.channel, file_id, total_parts, big, file_name, size, caption,
                           random_id, topic_id=self.topic_id, mime_type=self.mime_type)
        try:
            return await ask_async(self.ref, msg, self.timeout)
        except RpcError as exc:
            # WORKAROUND (actors/account.py, owned by ACCOUNT): Telethon raises
            # FILE_PART_0_MISSING as its own FilePart0MissingError, which the account
            # returns as RpcError(400, "BAD_REQUEST"), the generic text of every known
            # 400.  Read it once per file as "part 0 missing" (the driver then re-sends
            # what may have expired); a second one is a real error.
            if exc.code == 400 and exc.message == "BAD_REQUEST" and file_id not in self._guessed:
                self._guessed.add(file_id)
                raise FilePartMissingError(exc.kind, 0) from exc
            raise


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


class BudgetRefusedError(Exception):
    """The BudgetActor refused a lease (it could never be granted)."""


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
        self._waiting: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Future]] = {}
        self._alive = True

    async def acquire(self, nbytes: int) -> Any:
        loop = asyncio.get_running_loop()
        request_id = f"{self._prefix}-{next(self._ids)}"
        future = loop.create_future()
        self._waiting[request_id] = (loop, future)
        self.budget_ref.tell(ReserveBudget(request_id, self.account, nbytes, "part", reply_to=self))
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
        loop, future = entry
        loop.call_soon_threadsafe(self._resolve, future, message)

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
