"""Client side of the standalone simulated Telegram (``stashd sim serve``).

Frames on the Unix socket are a 4-byte big-endian length followed by a msgpack
map.  ``RemoteTransport`` is the async transport ``SimSender`` talks to: many
``invoke`` calls share one connection, matched to their replies by ``id`` by a
single reader task.  ``SimControl`` is a small blocking client for the control
operations (seed, inspect, delete, fault, post, ping) used by the CLI, the demo
and tests.
"""
from __future__ import annotations

import asyncio
import itertools
import socket
import struct
from pathlib import Path
from typing import Any

import msgpack

from actors.telegram.sim.errors import SimRpcError

HEADER = struct.Struct(">I")
# Uploads carry parts of at most 512 KiB and downloads at most 1 MiB; control
# "post" may carry a whole sample document, hence the generous cap.
MAX_FRAME_BYTES = 256 * 1024 * 1024


class SimControlError(RuntimeError):
    """A control operation failed on the server (bad channel name, ...)."""


class FrameError(ConnectionError):
    """The peer sent a frame we cannot read (too large, not a msgpack map)."""


def encode_frame(message: dict) -> bytes:
    body = msgpack.packb(message, use_bin_type=True)
    return HEADER.pack(len(body)) + body


def decode_body(body: bytes) -> dict:
    try:
        message = msgpack.unpackb(body, raw=False, strict_map_key=False)
    except Exception as exc:  # msgpack raises several unrelated types
        raise FrameError(f"undecodable frame: {exc}") from None
    if not isinstance(message, dict):
        raise FrameError("frame is not a map")
    return message


async def read_frame(reader: asyncio.StreamReader, max_bytes: int = MAX_FRAME_BYTES) -> dict | None:
    """The next frame from ``reader``; ``None`` on a clean end of stream."""
    try:
        header = await reader.readexactly(HEADER.size)
    except asyncio.IncompleteReadError as exc:
        if exc.partial:
            raise FrameError("truncated frame header") from None
        return None
    (length,) = HEADER.unpack(header)
    if length > max_bytes:
        raise FrameError(f"frame of {length} bytes exceeds the {max_bytes} byte cap")
    try:
        body = await reader.readexactly(length)
    except asyncio.IncompleteReadError:
        raise FrameError("truncated frame") from None
    return decode_body(body)


SEND_BUFFER_BYTES = 4 * 1024 * 1024


def _widen_send_buffer(writer: asyncio.StreamWriter) -> None:
    """Let a whole 512 KiB part frame go out in one send (the default Unix socket
    buffer of ~208 KiB splits it into several sends and wake-ups); best effort,
    the kernel caps it at net.core.wmem_max."""
    sock = writer.get_extra_info("socket")
    if sock is None:
        return
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER_BYTES)
    except OSError:
        pass


class RemoteTransport:
    """Async transport to a ``SimServer``: ``await invoke(key, name, data) -> bytes``.

    Connects lazily on the first ``invoke`` (and again after a failure).  A
    refused or lost connection raises ``ConnectionError`` in every pending
    call, which is what makes Telethon reconnect.  Must be used from one event
    loop (the one owning the Telethon client).
    """

    def __init__(self, socket_path: str | Path, *, max_frame_bytes: int = MAX_FRAME_BYTES):
        self.socket_path = Path(socket_path)
        self.max_frame_bytes = max_frame_bytes
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future] = {}
        self._writer: asyncio.StreamWriter | None = None
        self._reader_task: asyncio.Task | None = None
        self._connecting: asyncio.Lock | None = None
        self._write_lock: asyncio.Lock | None = None
        self._closed = False

    @property
    def connected(self) -> bool:
        return self._writer is not None and not self._writer.is_closing()

    async def _ensure_connected(self) -> asyncio.StreamWriter:
        if self._closed:
            raise ConnectionError("transport closed")
        if self.connected:
            return self._writer
        if self._connecting is None:
            self._connecting = asyncio.Lock()
        async with self._connecting:
            if self.connected:
                return self._writer
            try:
                reader, writer = await asyncio.open_unix_connection(str(self.socket_path))
            except (FileNotFoundError, ConnectionError, OSError) as exc:
                raise ConnectionError(f"sim server at {self.socket_path} unreachable: {exc}") from None
            _widen_send_buffer(writer)
            self._writer = writer
            self._reader_task = asyncio.get_running_loop().create_task(
                self._read_loop(reader, writer), name="sim-remote-reader")
            return writer

    async def _read_loop(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        error: Exception = ConnectionError("sim server closed the connection")
        try:
            while True:
                message = await read_frame(reader, self.max_frame_bytes)
                if message is None:
                    break
                future = self._pending.pop(message.get("id"), None)
                if future is None or future.done():
                    continue
                if message.get("ok"):
                    future.set_result(message.get("data", b""))
                else:
                    future.set_exception(SimRpcError(int(message.get("code", 500)),
                                                     str(message.get("message", "INTERNAL"))))
        except (ConnectionError, OSError) as exc:
            error = exc if isinstance(exc, ConnectionError) else ConnectionError(str(exc))
        except asyncio.CancelledError:
            error = ConnectionError("transport closed")
            raise
        finally:
            self._drop_connection(writer, error)

    def _drop_connection(self, writer: asyncio.StreamWriter, error: Exception) -> None:
        if self._writer is writer:
            self._writer = None
            self._reader_task = None
        writer.close()
        pending, self._pending = self._pending, {}
        for future in pending.values():
            if not future.done():
                future.set_exception(ConnectionError(str(error)))

    async def invoke(self, auth_key_id: int, request_name: str, data: bytes) -> bytes:
        writer = await self._ensure_connected()
        request_id = next(self._ids)
        future = asyncio.get_running_loop().create_future()
        self._pending[request_id] = future
        body = msgpack.packb({"op": "invoke", "id": request_id, "key": auth_key_id,
                              "name": request_name, "data": bytes(data)}, use_bin_type=True)
        if self._write_lock is None:
            self._write_lock = asyncio.Lock()
        try:
            # One frame at a time into the transport: concurrent invokes writing
            # 512 KiB frames at once pile megabytes into asyncio's write buffer,
            # which (3.11) memmoves what is left after every partial send, so
            # the cost grew with the window (16 in flight: 3x slower than 1).
            async with self._write_lock:
                writer.write(HEADER.pack(len(body)))   # two writes: no header+body copy of 512 KiB
                writer.write(body)
                await writer.drain()
        except (ConnectionError, OSError) as exc:
            self._pending.pop(request_id, None)
            self._drop_connection(writer, exc)
            raise ConnectionError(f"sim server connection lost: {exc}") from None
        try:
            return await future
        finally:
            self._pending.pop(request_id, None)

    async def close(self) -> None:
        """Close the connection; a later ``invoke`` connects again."""
        writer, task = self._writer, self._reader_task
        if task is not None:
            task.cancel()
            try:
                await task
            except (asyncio.CancelledError, Exception):
                pass
        if writer is not None:
            self._drop_connection(writer, ConnectionError("transport closed"))
            try:
                await writer.wait_closed()
            except (ConnectionError, OSError):
                pass


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    chunks, got = [], 0
    while got < n:
        chunk = sock.recv(min(n - got, 1 << 20))
        if not chunk:
            raise ConnectionError("sim server closed the connection")
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


class SimControl:
    """Blocking client for the control operations of a running ``SimServer``.

    Every method opens its own short connection, so one instance may be used
    from any thread.  Server-side failures raise ``SimControlError``; an
    unreachable server raises ``ConnectionError``.
    """

    def __init__(self, socket_path: str | Path, *, timeout: float = 60.0):
        self.socket_path = Path(socket_path)
        self.timeout = timeout

    def call(self, op: str, **args: Any) -> Any:
        message = {"op": op, "id": 1, **args}
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(self.timeout)
                sock.connect(str(self.socket_path))
                sock.sendall(encode_frame(message))
                (length,) = HEADER.unpack(_recv_exactly(sock, HEADER.size))
                reply = decode_body(_recv_exactly(sock, length))
        except FileNotFoundError:
            raise ConnectionError(f"no sim server socket at {self.socket_path}") from None
        except socket.timeout:
            raise ConnectionError(f"sim server at {self.socket_path} did not answer "
                                  f"within {self.timeout:g}s") from None
        except OSError as exc:
            if isinstance(exc, ConnectionError):
                raise
            raise ConnectionError(f"sim server at {self.socket_path}: {exc}") from None
        if not reply.get("ok"):
            raise SimControlError(str(reply.get("message") or reply.get("error") or "failed"))
        return reply.get("result")

    def is_running(self) -> bool:
        """True when a server answers ``ping`` on the socket."""
        try:
            self.call("ping")
        except (ConnectionError, SimControlError):
            return False
        return True

    def ping(self) -> dict:
        return self.call("ping")

    def seed(self, sessions_dir: str | Path, *, size_scale: float = 1.0) -> dict:
        return self.call("seed", sessions_dir=str(Path(sessions_dir).resolve()), size_scale=size_scale)

    def inspect(self, channel: str | None = None) -> dict:
        return self.call("inspect", channel=channel)

    def delete(self, channel: str | int, ids: list[int]) -> int:
        return self.call("delete", channel=str(channel), ids=[int(i) for i in ids])

    def set_fault(self, kind: str, **fields: Any) -> dict:
        return self.call("fault", action="set", fault={"kind": kind, **fields})

    def clear_faults(self) -> dict:
        return self.call("fault", action="clear")

    def post(self, channel: str | int, *, file_name: str | None = None, data: bytes | None = None,
             path: str | Path | None = None, text: str | None = None, caption: str = "",
             topic: str | int | None = None, sender: str | None = None, photo: bool = False,
             grouped_id: int | None = None) -> int:
        extra = {"photo": True} if photo else {}
        if grouped_id is not None:
            extra["grouped_id"] = int(grouped_id)
        return self.call("post", channel=str(channel), file_name=file_name, data=data,
                         path=None if path is None else str(Path(path).resolve()),
                         text=text, caption=caption, topic=None if topic is None else str(topic),
                         sender=sender, **extra)
