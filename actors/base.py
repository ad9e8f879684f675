"""LoopActor: a pykka actor whose thread runs one asyncio event loop for its whole life.

Why: a Telethon client is bound to the loop it connected on, and its keep-alive,
reconnects and update handling only progress while that loop runs.  A plain
``ThreadingActor`` blocks in ``queue.get()`` between messages, so the loop would
only run inside handlers.  Here the actor thread *is* the loop: pykka envelopes
are handed to the loop with ``call_soon_threadsafe`` and dispatched from it.

Semantics (kept from pykka):

- ``on_start``, every handler, ``on_stop`` and ``on_failure`` run on the actor
  thread.  ``on_start``/``on_stop`` and handlers may be ``async def``.
- A sync handler runs inline; an ``async def`` handler (``on_receive`` or a proxied
  method) runs as a task on the loop, so many asks may be in flight at once.  Its
  caller's future is resolved when the coroutine finishes.  Tasks start in
  message order.
- An exception in an ask'd handler goes to the caller's future; the actor keeps
  running.  An exception in a tell'd handler logs, calls ``on_failure`` and stops
  the actor (no ``on_stop``).  A failing ``on_start`` stops the actor without
  ``on_failure``.
- ``stop()`` (pykka's ``_ActorStop``): the actor unregisters, stops taking
  messages, lets in-flight handlers finish for up to ``stop_grace_seconds``,
  cancels the rest (their callers get ``ActorDeadError``), runs ``on_stop`` and
  closes the loop (``on_teardown`` runs last, also after a failure, and may be
  async).  Messages still queued get ``ActorDeadError``, as in pykka.
"""
from __future__ import annotations

import asyncio
import collections
import inspect
import logging
import sys
import threading
from typing import Any, Callable, ClassVar

import pykka
from pykka import ActorDeadError, ActorRegistry, messages

__all__ = ["LoopActor", "LoopInbox", "inbox_depth"]

_pykka_logger = logging.getLogger("pykka")


class LoopInbox:
    """Thread-safe inbox feeding an asyncio loop.

    Envelopes put before the loop exists are buffered; once ``attach`` is called,
    every put wakes the loop via ``call_soon_threadsafe``.  After ``close`` a put is
    answered with ``ActorDeadError`` at once (instead of hanging the caller).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._items: collections.deque = collections.deque()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: Callable[[], None] | None = None
        self._closed = False

    # -- pykka's ActorInbox protocol -------------------------------------------------
    def put(self, envelope: Any, /) -> None:
        with self._lock:
            closed = self._closed
            if not closed:
                self._items.append(envelope)
                loop, wake = self._loop, self._wake
        if closed:
            _fail_envelope(envelope)
            return
        if loop is not None and wake is not None:
            try:
                loop.call_soon_threadsafe(wake)
            except RuntimeError:  # loop closed between the check and the call
                pass

    def get(self) -> Any:
        with self._lock:
            return self._items.popleft()

    def empty(self) -> bool:
        with self._lock:
            return not self._items

    # -- loop side ---------------------------------------------------------------------
    def attach(self, loop: asyncio.AbstractEventLoop, wake: Callable[[], None]) -> None:
        with self._lock:
            self._loop, self._wake = loop, wake

    def pop(self) -> Any | None:
        with self._lock:
            return self._items.popleft() if self._items else None

    def close(self) -> list:
        """Refuse further puts; return what was still queued."""
        with self._lock:
            self._closed = True
            self._loop = self._wake = None
            rest = list(self._items)
            self._items.clear()
        return rest

    def depth(self) -> int:
        with self._lock:
            return len(self._items)

    __len__ = depth


def _fail_envelope(envelope: Any) -> None:
    if envelope.reply_to is None:
        return
    if isinstance(envelope.message, messages._ActorStop):  # noqa: SLF001
        envelope.reply_to.set(None)
    else:
        envelope.reply_to.set_exception(
            exc_info=(ActorDeadError, ActorDeadError("actor stopped before handling the message"), None)
        )


def inbox_depth(ref: pykka.ActorRef) -> int:
    """Queued (not yet started) messages of any pykka actor, for the inbox-depth gauge."""
    inbox = ref.actor_inbox
    if isinstance(inbox, LoopInbox):
        return inbox.depth()
    qsize = getattr(inbox, "qsize", None)
    return int(qsize()) if qsize is not None else 0


class LoopActor(pykka.ThreadingActor):
    """ThreadingActor whose thread runs an asyncio loop continuously (see module doc)."""

    actor_thread: threading.Thread | None = None
    """The actor's thread (set when it starts): the only thread running its handlers."""

    stop_grace_seconds: ClassVar[float] = 5.0
    """How long ``stop()`` lets in-flight async handlers finish before cancelling them."""

    def _create_actor_inbox(self) -> LoopInbox:  # type: ignore[override]
        return LoopInbox()

    # -- public helpers ----------------------------------------------------------------
    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The actor's event loop (only valid on the actor thread, after start)."""
        return self._loop_actor_loop

    def inbox_depth(self) -> int:
        """Messages queued and not yet started (thread-safe)."""
        return self.actor_inbox.depth()  # type: ignore[attr-defined]

    def in_flight(self) -> int:
        """Async handlers currently running (read on the actor thread or approximately)."""
        return len(getattr(self, "_loop_actor_tasks", ()))

    def on_teardown(self) -> Any:
        """Last code on the loop, however the actor ended (stop, failure, failed start).

        May be ``async def``.  Close loop-bound resources (clients, sockets) here:
        ``on_failure`` cannot await.
        """

    # -- the actor loop ----------------------------------------------------------------
    def _actor_loop(self) -> None:
        self.actor_thread = threading.current_thread()
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        self._loop_actor_loop = loop
        self._loop_actor_tasks: set[asyncio.Task] = set()
        try:
            loop.run_until_complete(self._loop_main())
        finally:
            try:
                _cancel_all(loop)
                loop.run_until_complete(loop.shutdown_asyncgens())
            finally:
                for envelope in self.actor_inbox.close():  # type: ignore[attr-defined]
                    _fail_envelope(envelope)
                asyncio.set_event_loop(None)
                loop.close()

    async def _loop_main(self) -> None:
        self._loop_wakeup = asyncio.Event()
        self.actor_inbox.attach(self._loop_actor_loop, self._loop_wakeup.set)  # type: ignore[attr-defined]
        try:
            await _maybe_await(self.on_start())
        except Exception:  # noqa: BLE001
            self._handle_failure(*sys.exc_info())
        inbox: LoopInbox = self.actor_inbox  # type: ignore[assignment]
        while not self.actor_stopped.is_set():
            envelope = inbox.pop()
            if envelope is None:
                self._loop_wakeup.clear()
                if inbox.empty() and not self.actor_stopped.is_set():
                    await self._loop_wakeup.wait()
                continue
            await self._dispatch(envelope)
        await self._cancel_in_flight()
        try:
            await _maybe_await(self.on_teardown())
        except Exception:  # noqa: BLE001
            _pykka_logger.error(f"on_teardown of {self} failed:", exc_info=sys.exc_info())

    async def _dispatch(self, envelope: Any) -> None:
        message = envelope.message
        if isinstance(message, messages._ActorStop):  # noqa: SLF001
            await self._loop_stop()
            if envelope.reply_to is not None:
                envelope.reply_to.set(None)
            return
        try:
            result = self._handle_receive(message)
        except Exception:
            self._reply_error_or_fail(envelope, sys.exc_info())
            return
        except BaseException:  # noqa: BLE001
            self._fatal(sys.exc_info())
            return
        if inspect.iscoroutine(result):
            task = self._loop_actor_loop.create_task(self._run_handler(envelope, result))
            self._loop_actor_tasks.add(task)
            task.add_done_callback(self._loop_actor_tasks.discard)
            await asyncio.sleep(0)  # let the task take its first step: handlers start in order
        elif envelope.reply_to is not None:
            envelope.reply_to.set(result)

    async def _run_handler(self, envelope: Any, coro: Any) -> None:
        try:
            value = await coro
        except asyncio.CancelledError:
            if envelope.reply_to is not None:
                envelope.reply_to.set_exception(
                    exc_info=(ActorDeadError, ActorDeadError(f"{self} stopped while handling the message"), None)
                )
            return
        except Exception:
            self._reply_error_or_fail(envelope, sys.exc_info())
        except BaseException:  # noqa: BLE001
            self._fatal(sys.exc_info())
        else:
            if envelope.reply_to is not None:
                envelope.reply_to.set(value)

    def _reply_error_or_fail(self, envelope: Any, exc_info: Any) -> None:
        if envelope.reply_to is not None:
            _pykka_logger.debug(f"Exception returned from {self} to caller:", exc_info=exc_info)
            envelope.reply_to.set_exception(exc_info)
            return
        if self.actor_stopped.is_set():  # already failed/stopping: log only
            _pykka_logger.error(f"Unhandled exception in {self}:", exc_info=exc_info)
            return
        self._handle_failure(*exc_info)
        try:
            self.on_failure(*exc_info)
        except Exception:  # noqa: BLE001
            self._handle_failure(*sys.exc_info())
        self._loop_wakeup.set()

    def _fatal(self, exc_info: Any) -> None:
        _pykka_logger.debug(f"{exc_info[1]!r} in {self}. Stopping all actors.")
        ActorRegistry.unregister(self.actor_ref)
        self.actor_stopped.set()
        self._loop_wakeup.set()
        threading.Thread(target=ActorRegistry.stop_all, name="stop-all", daemon=True).start()

    async def _loop_stop(self) -> None:
        ActorRegistry.unregister(self.actor_ref)
        self.actor_stopped.set()
        _pykka_logger.debug(f"Stopping {self}")
        tasks = set(self._loop_actor_tasks)
        if tasks and self.stop_grace_seconds > 0:
            await asyncio.wait(tasks, timeout=self.stop_grace_seconds)
        await self._cancel_in_flight()
        try:
            await _maybe_await(self.on_stop())
        except Exception:  # noqa: BLE001
            self._handle_failure(*sys.exc_info())

    async def _cancel_in_flight(self) -> None:
        tasks = [t for t in self._loop_actor_tasks if not t.done()]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)


async def _maybe_await(value: Any) -> Any:
    if inspect.isawaitable(value):
        return await value
    return value


def _cancel_all(loop: asyncio.AbstractEventLoop) -> None:
    pending = [t for t in asyncio.all_tasks(loop) if not t.done()]
    for task in pending:
        task.cancel()
    if pending:
        loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
