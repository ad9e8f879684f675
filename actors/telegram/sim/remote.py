"""Client side of the standalone simulated Telegram (``stashd sim serve``), and its frames.

A frame on the Unix socket is a 4-byte big-endian length, that many bytes of a
msgpack map, and - when the map holds ``"raw": n`` - n bytes of raw payload
right after it.  The payload carries the large bytes (a TL request or its
result: up to a 512 KiB part or a 1 MiB download), so neither side copies them
through msgpack: the sender hands the map and the payload to one ``sendmsg``,
the receiver ``recv_into``s the frame where it is read (``FrameReader``).
``RemoteTransport`` is the async transport ``SimSender`` talks to: many
``invoke`` calls share one connection, matched to their replies by ``id``.
``SimControl`` is a small blocking client for the control operations (seed,
inspect, delete, fault, post, ping) used by the CLI, the demo and tests.
"""
from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import socket
import struct
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import msgpack

from actors.telegram.sim.errors import SimRpcError

HEADER = struct.Struct(">I")
RAW = "raw"   # map key: the length of the raw payload that follows the map
# Uploads carry parts of at most 512 KiB and downloads at most 1 MiB; control
# "post" may carry a whole sample document, hence the generous cap (on the map
# and its payload together).
MAX_FRAME_BYTES = 256 * 1024 * 1024
SMALL_PAYLOAD = 16 * 1024      # joined to its map (one small copy) rather than sent as a piece of its own
READ_BYTES = 256 * 1024        # one recv while no large frame is pending
BUFFER_BYTES = 2 * 1024 * 1024 + READ_BYTES
READS_PER_WAKEUP = 16           # recv_into calls per readable event, while each fills what it was offered
SEND_BUFFER_BYTES = 4 * 1024 * 1024
HIGH_WATER = 8 * 1024 * 1024   # queued unsent bytes at which ``drain`` waits ...
LOW_WATER = 1024 * 1024        # ... until they are down to this
IOV_BATCH = 64                 # pieces per sendmsg (the kernel takes at most IOV_MAX = 1024)
FLUSH_TIMEOUT = 5.0


class SimControlError(RuntimeError):
    """A control operation failed on the server (bad channel name, ...)."""


class FrameError(ConnectionError):
    """The peer sent a frame we cannot read (too large, not a msgpack map, truncated)."""


def _byte_view(piece) -> memoryview:
    view = memoryview(piece)
    return view if view.format == "B" and view.ndim == 1 else view.cast("B")


def frame_pieces(message: dict, payload: Sequence = ()) -> list:
    """The buffers of one frame: header + map (+ payload pieces, not copied when large)."""
    pieces = [p if isinstance(p, bytes) else _byte_view(p) for p in payload]
    size = sum(len(p) for p in pieces)
    if size:
        message = {**message, RAW: size}
    body = msgpack.packb(message, use_bin_type=True)
    if size <= SMALL_PAYLOAD:
        return [b"".join([HEADER.pack(len(body)), body, *pieces])]
    return [HEADER.pack(len(body)) + body, *pieces]


def encode_frame(message: dict, payload: bytes = b"") -> bytes:
    """One frame as one bytes object (small frames: control calls, error replies)."""
    return b"".join(frame_pieces(message, (payload,) if payload else ()))


def decode_body(body) -> dict:
    try:
        message = msgpack.unpackb(body, raw=False, strict_map_key=False)
    except Exception as exc:  # msgpack raises several unrelated types
        raise FrameError(f"undecodable frame: {exc}") from None
    if not isinstance(message, dict):
        raise FrameError("frame is not a map")
    return message


def _payload_length(message: dict, length: int, max_bytes: int) -> int:
    raw = message.pop(RAW, 0)
    if type(raw) is not int or raw < 0:
        raise FrameError(f"bad payload length {raw!r}")
    if length + raw > max_bytes:
        raise FrameError(f"frame of {length + raw} bytes exceeds the {max_bytes} byte cap")
    return raw


class FrameReader:
    """Frames cut out of a byte stream received straight into one reused buffer.

    ``get_buffer()`` is where the next ``recv_into`` may write, ``buffer_updated(n)``
    counts what it got and ``frames()`` yields each complete frame as ``(message,
    payload)``.  ``payload`` is a memoryview into the buffer, valid only until the
    next ``get_buffer()``: use it at once or copy it.  Once a large frame's map is
    read, the rest of the frame is received exactly to its end, where it lies, so
    its payload is never moved (at most a partial small read is, to make room).
    """

    def __init__(self, max_bytes: int = MAX_FRAME_BYTES, buffer_bytes: int = BUFFER_BYTES):
        self.max_bytes = max_bytes
        self._size = buffer_bytes
        self._buf = bytearray(buffer_bytes)
        self._start = self._end = 0         # unread bytes: _buf[_start:_end]
        self._need = HEADER.size            # bytes from _start the current frame needs in all
        self._frame: tuple[dict, int, int] | None = None   # (map, header + map bytes, payload bytes)

    def get_buffer(self) -> memoryview:
        need = self._need
        if self._start + need > len(self._buf):
            self._make_room(need)
        if need > READ_BYTES:
            stop = self._start + need
        else:
            stop = min(len(self._buf), self._end + READ_BYTES)
        return memoryview(self._buf)[self._end:stop]

    def _make_room(self, need: int) -> None:
        kept = self._buf[self._start:self._end]   # a copy: the move below may overlap
        if need > len(self._buf):
            self._buf = bytearray(need)
        self._buf[:len(kept)] = kept
        self._start, self._end = 0, len(kept)

    def buffer_updated(self, nbytes: int) -> None:
        self._end += nbytes

    def frames(self) -> Iterator[tuple[dict, memoryview]]:
        while True:
            avail = self._end - self._start
            if self._frame is None:
                if avail < HEADER.size:
                    self._need = HEADER.size
                    return
                (length,) = HEADER.unpack_from(self._buf, self._start)
                if length > self.max_bytes:
                    raise FrameError(f"frame of {length} bytes exceeds the {self.max_bytes} byte cap")
                head = HEADER.size + length
                if avail < head:
                    self._need = head
                    return
                message = decode_body(memoryview(self._buf)[self._start + HEADER.size:self._start + head])
                self._frame = (message, head, _payload_length(message, length, self.max_bytes))
            message, head, raw = self._frame
            if avail < head + raw:
                self._need = head + raw
                return
            start = self._start + head
            payload = memoryview(self._buf)[start:start + raw]
            self._frame, self._start, self._need = None, start + raw, HEADER.size
            if self._start == self._end:
                self._start = self._end = 0
                if len(self._buf) > self._size:   # after an outsized frame: back to the usual size
                    self._buf = bytearray(self._size)
            yield message, payload

    def eof(self) -> None:
        """The stream ended: a ``FrameError`` when it ended inside a frame."""
        if self._frame is not None or self._end - self._start >= HEADER.size:
            raise FrameError("truncated frame")
        if self._end > self._start:
            raise FrameError("truncated frame header")


def widen_send_buffer(sock: socket.socket) -> None:
    """Let a whole 512 KiB part frame go out in one send (the default Unix socket
    buffer of ~208 KiB splits it into several sends and wake-ups); best effort,
    the kernel caps it at net.core.wmem_max."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER_BYTES)
    except OSError:
        pass


class FrameConnection:
    """Frames both ways on one connected Unix socket, driven by the running loop.

    Every complete frame received goes to ``on_frame(conn, message, payload)``
    at once (``payload`` is valid during that call only).  ``send`` passes a
    frame's pieces to one ``sendmsg`` (nothing is concatenated); what the socket
    does not take is queued as views and sent when it is writable, so frames
    never interleave.  ``on_lost(conn, exc)`` is called once when the peer ends
    the stream (``exc`` None), sends a bad frame (``FrameError``; the socket can
    still carry a last reply) or the socket fails - not after ``close()``.
    Callbacks must not raise.  One loop only.
    """

    def __init__(self, sock: socket.socket, on_frame: Callable[["FrameConnection", dict, memoryview], None],
                 on_lost: Callable[["FrameConnection", Exception | None], None], *,
                 max_frame_bytes: int = MAX_FRAME_BYTES):
        self._loop = asyncio.get_running_loop()
        sock.setblocking(False)
        widen_send_buffer(sock)
        self._sock, self._fd = sock, sock.fileno()
        self._reader = FrameReader(max_frame_bytes)
        self._on_frame, self._on_lost = on_frame, on_lost
        self._out: collections.deque = collections.deque()
        self._queued = 0
        self._drained: asyncio.Future | None = None
        self._closed = False      # no more frames in or out
        self._flushing = False    # closed, the socket still sending what was queued
        self._loop.add_reader(self._fd, self._readable)

    @property
    def closed(self) -> bool:
        return self._closed

    # -- in --------------------------------------------------------------------------
    def _readable(self) -> None:
        reader = self._reader
        try:
            for _ in range(READS_PER_WAKEUP):
                view = reader.get_buffer()
                nbytes = self._sock.recv_into(view)
                if nbytes == 0:
                    reader.eof()
                    self._lose(None)
                    return
                reader.buffer_updated(nbytes)
                for message, payload in reader.frames():
                    self._on_frame(self, message, payload)
                    if self._closed:
                        return
                if nbytes < len(view):
                    return
        except (BlockingIOError, InterruptedError):
            return
        except FrameError as exc:
            self._lose(exc)
        except OSError as exc:
            self._lose(exc)

    def _lose(self, exc: Exception | None) -> None:
        if self._closed:
            return
        self._loop.remove_reader(self._fd)
        try:
            self._on_lost(self, exc)
        finally:
            self.close(flush=isinstance(exc, FrameError))

    # -- out -------------------------------------------------------------------------
    def send(self, message: dict, payload: Sequence = ()) -> None:
        """Queue one frame; ``ConnectionError`` when the connection is closed or fails."""
        self.send_frames([(message, payload)])

    def send_frames(self, frames: Sequence[tuple[dict, Sequence]]) -> None:
        """Queue frames, in order, with one ``sendmsg``; ``ConnectionError`` as ``send``."""
        if self._closed:
            raise ConnectionError("connection closed")
        pieces = [piece for message, payload in frames for piece in frame_pieces(message, payload)]
        if not self._out:
            try:
                sent = self._sock.sendmsg(pieces)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError as exc:
                self._lose(exc)
                raise ConnectionError(f"send failed: {exc}") from None
            pieces = _unsent(pieces, sent)
            if not pieces:
                return
            self._loop.add_writer(self._fd, self._writable)
        for piece in pieces:
            self._out.append(piece)
            self._queued += len(piece)

    def _writable(self) -> None:
        try:
            sent = self._sock.sendmsg(list(itertools.islice(self._out, IOV_BATCH)))
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._out.clear()
            self._queued = 0
            if self._flushing:
                self._shut()
            else:
                self._lose(exc)
            return
        self._queued -= sent
        out = self._out
        while sent:
            if len(out[0]) <= sent:
                sent -= len(out.popleft())
            else:
                out[0] = _byte_view(out[0])[sent:]
                sent = 0
        if not out:
            self._loop.remove_writer(self._fd)
            if self._flushing:
                self._shut()
        self._wake_drainers()

    def _wake_drainers(self) -> None:
        if self._drained is not None and (self._queued <= LOW_WATER or self._closed) and not self._drained.done():
            self._drained.set_result(None)

    async def drain(self) -> None:
        """Wait while more than HIGH_WATER bytes are queued; ``ConnectionError`` if it closes."""
        while self._queued > HIGH_WATER and not self._closed:
            if self._drained is None or self._drained.done():
                self._drained = self._loop.create_future()
            await self._drained
        if self._closed and not self._flushing:
            raise ConnectionError("connection closed")

    def close(self, flush: bool = False) -> None:
        """Stop reading and close; with ``flush``, what is queued is sent first (for at most
        FLUSH_TIMEOUT seconds)."""
        if self._closed:
            return
        self._closed = True
        self._loop.remove_reader(self._fd)
        if flush and self._out:
            self._flushing = True
            self._loop.call_later(FLUSH_TIMEOUT, self._shut)
        else:
            self._shut()
        self._wake_drainers()

    def _shut(self) -> None:
        if self._sock.fileno() == -1:
            return
        self._flushing = False
        self._loop.remove_writer(self._fd)
        self._out.clear()
        self._queued = 0
        self._sock.close()


def _unsent(pieces: list, sent: int) -> list:
    for index, piece in enumerate(pieces):
        if sent < len(piece):
            rest = [_byte_view(piece)[sent:]] if sent else [piece]
            return rest + pieces[index + 1:]
        sent -= len(piece)
    return []


class RemoteTransport:
    """Async transport to a ``SimServer``: ``await invoke(key, name, data) -> bytes``.

    ``data`` is the serialized TL request, as bytes or as a sequence of byte
    chunks (``accepts_chunks``: SimSender then skips joining a 512 KiB part to
    its TL header; the chunks go to the socket as they are).  Connects lazily on
    the first ``invoke`` (and again after a failure).  A refused or lost
    connection raises ``ConnectionError`` in every pending call, which is what
    makes Telethon reconnect.  Must be used from one event loop (the one owning
    the Telethon client).
    """

    accepts_chunks = True

    def __init__(self, socket_path: str | Path, *, max_frame_bytes: int = MAX_FRAME_BYTES):
        self.socket_path = Path(socket_path)
        self.max_frame_bytes = max_frame_bytes
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future] = {}
        self._conn: FrameConnection | None = None
        self._connecting: asyncio.Lock | None = None
        self._closed = False

    @property
    def connected(self) -> bool:
        return self._conn is not None and not self._conn.closed

    async def _ensure_connected(self) -> FrameConnection:
        if self._closed:
            raise ConnectionError("transport closed")
        if self.connected:
            return self._conn
        if self._connecting is None:
            self._connecting = asyncio.Lock()
        async with self._connecting:
            if self.connected:
                return self._conn
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.setblocking(False)
            try:
                await asyncio.get_running_loop().sock_connect(sock, str(self.socket_path))
            except (FileNotFoundError, ConnectionError, OSError) as exc:
                sock.close()
                raise ConnectionError(f"sim server at {self.socket_path} unreachable: {exc}") from None
            self._conn = FrameConnection(sock, self._on_reply, self._on_lost, max_frame_bytes=self.max_frame_bytes)
            return self._conn

    def _on_reply(self, _conn: FrameConnection, message: dict, payload: memoryview) -> None:
        future = self._pending.pop(message.get("id"), None)
        if future is None or future.done():
            return
        if message.get("ok"):
            future.set_result(bytes(payload))
        else:
            future.set_exception(SimRpcError(int(message.get("code", 500)),
                                             str(message.get("message", "INTERNAL"))))

    def _on_lost(self, conn: FrameConnection, exc: Exception | None) -> None:
        if isinstance(exc, ConnectionError):
            error: Exception = exc
        elif exc is None:
            error = ConnectionError("sim server closed the connection")
        else:
            error = ConnectionError(str(exc))
        self._drop(conn, error)

    def _drop(self, conn: FrameConnection, error: Exception) -> None:
        if self._conn is conn:
            self._conn = None
        conn.close()
        pending, self._pending = self._pending, {}
        for future in pending.values():
            if not future.done():
                future.set_exception(ConnectionError(str(error)))

    def _frame(self, auth_key_id: int, request_name: str, data) -> tuple[int, tuple[dict, list]]:
        chunks = (data,) if isinstance(data, (bytes, bytearray, memoryview)) else data
        # bytes cannot change while queued; anything else is copied once
        chunks = [c if isinstance(c, bytes) else bytes(c) for c in chunks]
        request_id = next(self._ids)
        return request_id, ({"op": "invoke", "id": request_id, "key": auth_key_id, "name": request_name}, chunks)

    async def invoke_many(self, auth_key_id: int, calls: Sequence[tuple[str, object]]) -> list:
        """Several requests written at once (one ``sendmsg``): per ``(request_name, data)``
        its reply bytes, or the SimRpcError / ConnectionError it ended with, in order.
        A connection that cannot be reached or fails while writing raises ConnectionError."""
        conn = await self._ensure_connected()
        framed = [self._frame(auth_key_id, name, data) for name, data in calls]
        try:
            conn.send_frames([frame for _, frame in framed])
        except ConnectionError as exc:
            self._drop(conn, exc)
            raise ConnectionError(f"sim server connection lost: {exc}") from None
        loop = asyncio.get_running_loop()
        futures = {request_id: loop.create_future() for request_id, _ in framed}
        self._pending.update(futures)
        try:
            with contextlib.suppress(ConnectionError):
                await conn.drain()
            return list(await asyncio.gather(*futures.values(), return_exceptions=True))
        finally:
            for request_id in futures:
                self._pending.pop(request_id, None)

    async def invoke(self, auth_key_id: int, request_name: str, data) -> bytes:
        conn = await self._ensure_connected()
        request_id, (message, chunks) = self._frame(auth_key_id, request_name, data)
        try:
            conn.send(message, chunks)
        except ConnectionError as exc:
            self._drop(conn, exc)
            raise ConnectionError(f"sim server connection lost: {exc}") from None
        # registered after the send: a reply can only arrive from a later loop callback
        future = asyncio.get_running_loop().create_future()
        self._pending[request_id] = future
        try:
            with contextlib.suppress(ConnectionError):
                await conn.drain()   # a connection that closes fails the future too
            return await future
        finally:
            self._pending.pop(request_id, None)

    async def close(self) -> None:
        """Close the connection; a later ``invoke`` connects again."""
        conn = self._conn
        if conn is not None:
            self._drop(conn, ConnectionError("transport closed"))


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    chunks, got = [], 0
    while got < n:
        chunk = sock.recv(min(n - got, 1 << 20))
        if not chunk:
            raise ConnectionError("sim server closed the connection")
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def recv_frame(sock: socket.socket, max_bytes: int = MAX_FRAME_BYTES) -> tuple[dict, bytes]:
    """One frame from a blocking socket: (map, payload)."""
    (length,) = HEADER.unpack(_recv_exactly(sock, HEADER.size))
    if length > max_bytes:
        raise FrameError(f"frame of {length} bytes exceeds the {max_bytes} byte cap")
    message = decode_body(_recv_exactly(sock, length))
    raw = _payload_length(message, length, max_bytes)
    return message, _recv_exactly(sock, raw) if raw else b""


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
                reply, _payload = recv_frame(sock)
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
