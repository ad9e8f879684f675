"""Asking a pykka actor from a coroutine: the reply resolves an asyncio future.

:func:`ask_async` is the one way LoopActor-based actors (uploaders, the ingest
engine, adoption) ask another actor: the answering thread hands the reply to
the asking loop (one wake-up per burst of answers, :class:`_LoopHandOff`), so
no executor thread is parked on ``future.get`` per ask.
(Moved here from actors.uploader, which still exports ``ask_async``;
actors.ingest.download's ``ask_on_loop`` is the same function.)
"""
from __future__ import annotations

import asyncio
import sys
import threading
import weakref
from typing import Any, Callable

import pykka
from pykka._envelope import Envelope  # pykka's own message wrapper (what ref.ask puts)

__all__ = ["ask_async"]


class _LoopHandOff:
    """Runs callables on one event loop from any thread, one wake-up per batch.

    ``loop.call_soon_threadsafe`` writes to the loop's self-pipe on every call;
    with a window of chunks in flight the answers (budget grants, part acks)
    arrive in bursts, so the first one schedules a drain and the rest ride along.
    """

    _per_loop: "weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _LoopHandOff]" = None  # set below

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self._loop = loop
        self._lock = threading.Lock()
        self._items: list[tuple[Callable[..., None], tuple]] = []
        self._scheduled = False

    @classmethod
    def of(cls, loop: asyncio.AbstractEventLoop) -> "_LoopHandOff":
        """The hand-off of ``loop`` (call on the loop's own thread)."""
        handoff = cls._per_loop.get(loop)
        if handoff is None:
            handoff = cls._per_loop[loop] = cls(loop)
        return handoff

    def put(self, fn: Callable[..., None], *args: Any) -> None:
        with self._lock:
            self._items.append((fn, args))
            if self._scheduled:
                return
            self._scheduled = True
        try:
            self._loop.call_soon_threadsafe(self._drain)
        except RuntimeError:  # the loop is closed: nobody waits any more
            with self._lock:
                self._items.clear()
                self._scheduled = False

    def _drain(self) -> None:
        with self._lock:
            items, self._items = self._items, []
            self._scheduled = False
        for fn, args in items:
            fn(*args)


_LoopHandOff._per_loop = weakref.WeakKeyDictionary()


class _LoopReply(pykka.Future):
    """The reply_to of an ask from a coroutine: the actor's answer resolves an
    asyncio future on the asking loop; no thread is parked waiting for it."""

    def __init__(self, handoff: _LoopHandOff, target: asyncio.Future):
        super().__init__()
        self._handoff, self._target = handoff, target

    def get(self, *, timeout: float | None = None) -> Any:  # nobody blocks on this future
        raise NotImplementedError("_LoopReply is awaited through ask_async")

    def set(self, value: Any = None) -> None:
        self._handoff.put(_settle, self._target, value, None)

    def set_exception(self, exc_info: Any = None) -> None:
        exc_info = exc_info or sys.exc_info()
        self._handoff.put(_settle, self._target, None,
                          exc_info[1] if exc_info[1] is not None else exc_info[0]())


def _settle(target: asyncio.Future, value: Any, exc: BaseException | None) -> None:
    if target.done():
        return
    if exc is not None:
        target.set_exception(exc)
    else:
        target.set_result(value)


async def ask_async(ref: Any, message: Any, timeout: float) -> Any:
    """Ask a pykka actor without blocking the running loop.

    The reply is handed to this loop by the answering thread (``_LoopReply``):
    no executor thread blocks in ``future.get`` per ask, which was one of the
    thread hand-offs of every uploaded chunk.  Raises ``pykka.Timeout`` after
    ``timeout`` seconds and ``pykka.ActorDeadError`` for a stopped actor, as
    ``ref.ask`` does.
    """
    loop = asyncio.get_running_loop()
    target = loop.create_future()
    if not ref.is_alive():
        raise pykka.ActorDeadError(f"{ref} not found")
    ref.actor_inbox.put(Envelope(message, reply_to=_LoopReply(_LoopHandOff.of(loop), target)))
    try:
        async with asyncio.timeout(timeout):
            return await target
    except TimeoutError:
        if target.done() and not target.cancelled():
            raise   # the actor's own answer was a TimeoutError
        raise pykka.Timeout(f"{timeout} seconds") from None
