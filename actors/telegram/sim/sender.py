"""SimSender: Telethon's MTProtoSender answered by a simulated server.

It keeps MTProtoSender's public face (connect/disconnect/is_connected/send,
the ``disconnected`` future, keep-alive pings, the auth-key callback) so
TelegramClient's own connect(), _call() (flood-wait handling, entity caching),
update loop and upload/download code run unchanged. Each request is serialized
with ``bytes(request)``, handed to a transport (``await transport.invoke(
auth_key_id, request_name, data) -> bytes``; a transport with
``accepts_chunks`` gets a save-part request as chunks, its part not copied into
one buffer with the TL header) and its answer parsed back with
``request.read_result``. Server errors go through Telethon's own
``rpc_message_to_error``. A ConnectionError from the transport behaves like a
dropped TCP connection: the sender reconnects (new transport) in the
background and re-sends the requests that were in flight, as MTProtoSender does.
A list of requests (``client([...])``) goes to a transport with ``invoke_many``
in one write, as MTProtoSender packs what is queued together.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from typing import Callable

from telethon import helpers, utils
from telethon.errors import rpc_message_to_error
from telethon.extensions import BinaryReader
from telethon.helpers import retry_range
from telethon.network.mtprotosender import MTProtoSender
from telethon.tl.functions import PingRequest
from telethon.tl.types import RpcError

from .errors import SimRpcError
from .handlers import unwrap
from .handlers_upload import part_request_chunks

MAX_RESENDS = 10
_LOST = (ConnectionError, OSError, asyncio.IncompleteReadError)   # the connection, not the request


def serialized(request) -> tuple:
    """``bytes(request)`` as a tuple of chunks (a save-part request's part stays its own chunk)."""
    return part_request_chunks(request) or (bytes(request),)


def request_name(request) -> str:
    """The innermost request's class name (InvokeWithLayer etc. unwrapped)."""
    return type(unwrap(request)).__name__


class SimSender(MTProtoSender):
    def __init__(self, auth_key, *, loggers, transport_factory: Callable[[], object], **kwargs):
        super().__init__(auth_key, loggers=loggers, **kwargs)
        self._transport_factory = transport_factory
        self._transport = None
        self._ready = asyncio.Event()
        self._inflight: dict[asyncio.Task, list[asyncio.Future]] = {}

    @property
    def auth_key_id(self) -> int:
        return self.auth_key.key_id

    # -- connection lifecycle -------------------------------------------------------
    async def connect(self, connection):
        async with self._connect_lock:
            if self._user_connected:
                return False
            self._connection = connection  # never opened; kept for code that looks at it
            for _attempt in retry_range(self._retries):
                try:
                    await self._open()
                    break
                except (OSError, asyncio.TimeoutError) as e:
                    self._log.warning("Simulated connect failed: %s: %s", type(e).__name__, e)
                    await asyncio.sleep(self._delay)
            else:
                raise ConnectionError(f"Connection to Telegram failed {self._retries} time(s)")
            self._user_connected = True
            self._ready.set()
            return True

    async def _open(self):
        if not self.auth_key:
            # No key in the session: "generate" one, as the DH exchange would.
            self.auth_key.key = os.urandom(256)
            if self._auth_key_callback:
                await self._auth_key_callback(self.auth_key)
        self._transport = self._transport_factory()
        if self._disconnected.done():
            self._MTProtoSender__disconnected = helpers.get_running_loop().create_future()

    def _transport_connected(self):
        return self._user_connected and not self._reconnecting and self._transport is not None

    async def disconnect(self):
        if self._reconnect_task:
            self._reconnect_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reconnect_task
        await self._disconnect()

    async def _disconnect(self, error=None):
        if not self._user_connected and self._transport is None:
            return
        self._user_connected = False
        self._ready.set()  # wake waiters so they see we are gone
        inflight, self._inflight = self._inflight, {}
        for futures in inflight.values():
            for future in futures:
                if error and not future.done():
                    future.set_exception(error)
                else:
                    future.cancel()
        tasks = list(inflight)
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(BaseException):
                await task
        await self._close_transport()
        if not self._disconnected.done():
            if error:
                self._disconnected.set_exception(error)
            else:
                self._disconnected.set_result(None)

    async def _close_transport(self):
        transport, self._transport = self._transport, None
        if transport is not None:
            with contextlib.suppress(Exception):
                await transport.close()

    def _start_reconnect(self, error):
        if self._user_connected and not self._reconnecting:
            self._reconnecting = True
            self._ready.clear()
            self._reconnect_task = helpers.get_running_loop().create_task(self._reconnect(error))

    async def _reconnect(self, last_error):
        self._log.info("Simulated connection dropped (%s); reconnecting", type(last_error).__name__)
        await self._close_transport()
        retries = self._retries if self._auto_reconnect else 0
        ok = False
        for _attempt in retry_range(retries, force_retry=False):
            if not self._user_connected:
                break
            try:
                await self._open()
            except (OSError, asyncio.TimeoutError) as e:
                last_error = e
                await asyncio.sleep(self._delay)
            else:
                ok = True
                break
        self._reconnecting = False
        if ok:
            self._ready.set()
            if self._auto_reconnect_callback:
                helpers.get_running_loop().create_task(self._auto_reconnect_callback())
        else:
            error = last_error.with_traceback(None) if last_error else None
            await self._disconnect(error=error)

    def _keepalive_ping(self, rnd_id):
        future = self.send(PingRequest(rnd_id))
        future.add_done_callback(lambda f: f.cancelled() or f.exception())

    # -- requests ---------------------------------------------------------------------
    def send(self, request, ordered=False):
        if not self._user_connected:
            raise ConnectionError("Cannot send requests while disconnected")
        loop = helpers.get_running_loop()
        if not utils.is_list_like(request):
            future = loop.create_future()
            self._spawn(self._run(request, serialized(request), future), [future])
            return future
        items = [(r, serialized(r), loop.create_future()) for r in request]
        if ordered:
            self._spawn(self._run_ordered(items), [f for _r, _d, f in items])
        elif len(items) > 1 and hasattr(self._transport, "invoke_many"):
            self._spawn(self._run_many(items), [f for _r, _d, f in items])
        else:
            for item in items:
                self._spawn(self._run(*item), [item[2]])
        return [future for _r, _d, future in items]

    def _spawn(self, coro, futures: list[asyncio.Future]):
        task = helpers.get_running_loop().create_task(coro)
        self._inflight[task] = futures
        task.add_done_callback(lambda t: self._inflight.pop(t, None))

    async def _run_ordered(self, items):
        for request, data, future in items:
            await self._run(request, data, future)

    async def _run_many(self, items):
        """Requests sent together (``client([...])``, e.g. an uploader's group of parts):
        one write for all of them; what a lost connection interrupts goes on one by one
        through ``_run``, with its resends."""
        try:
            await self._ready.wait()
            transport = self._transport
            if self._user_connected and transport is not None:
                calls = [(request_name(r), chunks) for r, chunks, _future in items]
                try:
                    outcomes = await transport.invoke_many(self.auth_key_id, calls)
                except _LOST as e:
                    outcomes = [e] * len(items)
                lost = [o for o in outcomes if isinstance(o, _LOST)]
                if lost:
                    self._start_reconnect(lost[0])
                for (request, _chunks, future), outcome in zip(items, outcomes):
                    if not isinstance(outcome, _LOST):
                        self._settle(request, future, outcome)
                items = [item for item, outcome in zip(items, outcomes) if isinstance(outcome, _LOST)]
            await asyncio.gather(*(self._run(*item) for item in items))
        except asyncio.CancelledError:
            for _r, _c, future in items:
                future.cancel()
            raise

    async def _run(self, request, chunks: tuple, future: asyncio.Future):
        name = request_name(request)
        joined = None
        try:
            for _ in range(MAX_RESENDS):
                await self._ready.wait()
                transport = self._transport
                if not self._user_connected or transport is None:
                    break
                if getattr(transport, "accepts_chunks", False):
                    data = chunks
                else:
                    data = joined = joined if joined is not None else b"".join(chunks)
                try:
                    body = await transport.invoke(self.auth_key_id, name, data)
                except _LOST as e:
                    self._start_reconnect(e)
                    continue
                except Exception as e:  # SimRpcError, or a transport bug: the caller sees it
                    body = e
                self._settle(request, future, body)
                return
            _set(future, exception=ConnectionError(f"{name}: connection to the simulated Telegram lost"))
        except asyncio.CancelledError:
            future.cancel()
            raise

    def _settle(self, request, future: asyncio.Future, outcome) -> None:
        """A request's answer (reply bytes, or the exception it ended with) into its future."""
        if isinstance(outcome, SimRpcError):
            _set(future, exception=rpc_message_to_error(RpcError(outcome.code, outcome.message), request))
            return
        if isinstance(outcome, BaseException):
            _set(future, exception=outcome)
            return
        try:
            with BinaryReader(outcome) as reader:
                result = request.read_result(reader)
        except Exception as e:  # e.g. TypeNotFoundError: the caller should see it
            _set(future, exception=e)
            return
        self._store_own_updates(result)
        _set(future, result=result)


def _set(future: asyncio.Future, *, result=None, exception=None) -> None:
    if future.done():
        return
    if exception is not None:
        future.set_exception(exception)
    else:
        future.set_result(result)
