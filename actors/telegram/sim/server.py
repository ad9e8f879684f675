"""The standalone simulated Telegram: ``SimWorld(state_dir)`` behind a Unix socket.

Protocol (see ``remote.py``): frames of a 4-byte big-endian length, a msgpack
map and an optional raw payload.  ``{"op": "invoke", "id", "key", "name"}`` with
the serialized TL request as payload runs it through ``SimWorld.handle_bytes``
and is answered by ``{"id", "ok": True}`` with the TL result as payload, or
``{"id", "ok": False, "code", "message"}``.
Control ops (``seed``, ``inspect``, ``delete``, ``fault``, ``post``, ``ping``)
are answered by ``{"id", "ok": True, "result"}`` or ``{"id", "ok": False,
"message"}``.  Requests on one connection run concurrently and may be answered
out of order.  Control calls run in worker threads so the loop stays responsive;
per-request latency and bandwidth faults are ``asyncio.sleep``s, so requests of
many connections overlap while each one still takes its simulated time.  TL
requests themselves run on the loop (``inline_invokes``; they are short), as
soon as their frame is received and on the receive buffer itself (a 512 KiB part
goes from the socket to its file with no copy in between), control operations
in worker threads.
"""
from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

from loguru import logger

from actors.telegram.sim.errors import SimRpcError
from actors.telegram.sim.remote import MAX_FRAME_BYTES, FrameConnection, FrameError, SimControl

SOCKET_NAME = "sim.sock"
PID_NAME = "sim.pid"


class SimServerError(RuntimeError):
    """The server cannot start (another one runs, bad socket path, ...)."""


def default_socket_path(state_dir: str | Path) -> Path:
    return Path(state_dir) / SOCKET_NAME


def _open_world(state_dir: Path):
    from actors.telegram.sim.world import SimWorld

    return SimWorld(state_dir)


def _field(record: dict, *names: str, default: Any = None) -> Any:
    """The first of ``names`` present in an ``inspect()`` record."""
    for name in names:
        if name in record:
            return record[name]
    return default


def channel_id_of(record: dict) -> int:
    return int(_field(record, "channel_id", "id"))


def user_id_of(record: dict) -> int:
    return int(_field(record, "user_id", "id"))


def find_channel(snapshot: dict, name: str | int) -> dict:
    """The channel of ``inspect()`` named by id, @username, username or title."""
    wanted = str(name).strip()
    bare = wanted.lstrip("@").lower()
    channels = snapshot.get("channels", [])
    for channel in channels:
        if wanted.lstrip("-").isdigit() and channel_id_of(channel) in (
                int(wanted), abs(int(wanted)) - 1_000_000_000_000):  # plain or -100-marked id
            return channel
    for channel in channels:
        if (channel.get("username") or "").lower() == bare:
            return channel
    for channel in channels:
        if (channel.get("title") or "").lower() == wanted.lower():
            return channel
    known = ", ".join(sorted(c.get("username") or c.get("title") or "?" for c in channels)) or "none"
    raise LookupError(f"no channel {wanted!r} (known: {known})")


def find_user(snapshot: dict, name: str | int) -> dict:
    wanted = str(name).strip().lstrip("@").lower()
    for user in snapshot.get("users", []):
        if wanted.isdigit() and int(wanted) == user_id_of(user):
            return user
        if (user.get("username") or "").lower() == wanted:
            return user
    raise LookupError(f"no user {name!r}")


def find_topic(snapshot: dict, channel_id: int, name: str | int) -> dict:
    wanted = str(name).strip()
    for topic in snapshot.get("topics", []):
        if int(topic.get("channel_id", channel_id)) != channel_id:
            continue
        topic_id = int(_field(topic, "topic_id", "id"))
        if (wanted.isdigit() and int(wanted) == topic_id) or (topic.get("title") or "") == wanted:
            return topic
    raise LookupError(f"no topic {wanted!r} in channel {channel_id}")


def present_message(message: dict) -> dict:
    """An ``inspect()`` message with ``file_name``, ``size`` and ``caption`` at top level."""
    document = message.get("document") or {}
    shown = dict(message)
    shown.setdefault("file_name", document.get("file_name"))
    shown.setdefault("size", document.get("size"))
    shown.setdefault("caption", message.get("text", "") if document else None)
    return shown


def filter_snapshot(snapshot: dict, channel: str | int | None) -> dict:
    """``inspect()`` narrowed to one channel (its topics and messages)."""
    snapshot = dict(snapshot)
    snapshot["messages"] = [present_message(m) for m in snapshot.get("messages", [])]
    if channel is None:
        return snapshot
    cid = channel_id_of(find_channel(snapshot, channel))
    narrowed = dict(snapshot)
    narrowed["channels"] = [c for c in snapshot.get("channels", []) if channel_id_of(c) == cid]
    for key in ("topics", "messages"):
        if key in snapshot:
            narrowed[key] = [r for r in snapshot[key] if int(r.get("channel_id", cid)) == cid]
    return narrowed


class WorldControl:
    """The control operations, applied directly to a ``SimWorld``.

    The server runs them for ``SimControl`` clients; the CLI uses this class
    itself when no server is running.  Method names and arguments match
    ``SimControl``.
    """

    def __init__(self, world: Any):
        self.world = world

    def call(self, op: str, args: dict) -> Any:
        method = {"ping": self.ping, "seed": self.seed, "inspect": self.inspect,
                  "delete": self.delete, "fault": self._fault, "post": self.post}.get(op)
        if method is None:
            raise ValueError(f"unknown op {op!r}")
        return method(**args)

    def ping(self) -> dict:
        return {"pid": os.getpid()}

    def seed(self, sessions_dir: str, *, size_scale: float = 1.0) -> dict:
        from actors.telegram.sim.seed import seed_world

        return seed_world(self.world, Path(sessions_dir), size_scale=size_scale)

    def inspect(self, channel: str | None = None) -> dict:
        return filter_snapshot(self.world.inspect(), channel)

    def delete(self, channel: str | int, ids: list[int]) -> int:
        cid = channel_id_of(find_channel(self.world.inspect(), channel))
        return int(self.world.delete_messages(cid, [int(i) for i in ids]))

    def _fault(self, action: str, fault: dict | None = None) -> dict:
        if action == "clear":
            return self.clear_faults()
        if action == "set":
            fault = dict(fault or {})
            return self.set_fault(fault.pop("kind"), **fault)
        raise ValueError(f"unknown fault action {action!r}")

    def set_fault(self, kind: str, **fields: Any) -> dict:
        from actors.telegram.sim.world import Fault

        account = fields.pop("account", None)
        if account is not None:
            fields["account"] = user_id_of(find_user(self.world.inspect(), account))
        fields = {k: v for k, v in fields.items() if v is not None}
        self.world.set_fault(Fault(kind=kind, **fields))
        return {"kind": kind, **fields}

    def clear_faults(self) -> dict:
        self.world.clear_faults()
        return {"cleared": True}

    def post(self, channel: str | int, *, file_name: str | None = None, data: bytes | None = None,
             path: str | None = None, text: str | None = None, caption: str = "",
             topic: str | int | None = None, sender: str | None = None, photo: bool = False,
             grouped_id: int | None = None) -> int:
        """A text, a document, or (``photo``) a photo message; ``grouped_id`` puts a
        document or photo in an album."""
        snapshot = self.world.inspect()
        cid = channel_id_of(find_channel(snapshot, channel))
        topic_id = None if topic is None else int(_field(find_topic(snapshot, cid, topic), "topic_id", "id"))
        sender_id = self._sender_for(snapshot, cid, sender)
        if text is not None and file_name is None and data is None and path is None:
            return int(self.world.post_text(cid, sender_id, text, topic_id=topic_id))
        content = Path(path) if path is not None else data
        if content is None:
            raise ValueError("post needs text, data or path")
        name = file_name or (Path(path).name if path else "file.bin")
        if photo:
            blob = content.read_bytes() if isinstance(content, Path) else bytes(content)
            return int(self.world.post_photo(cid, sender_id, blob, caption=caption, topic_id=topic_id,
                                             grouped_id=grouped_id, label=name))
        return int(self.world.post_document(cid, sender_id, name, content, caption=caption,
                                            topic_id=topic_id, grouped_id=grouped_id))

    def _sender_for(self, snapshot: dict, channel_id: int, sender: str | None) -> int:
        if sender is not None:
            return user_id_of(find_user(snapshot, sender))
        from actors.telegram.sim.seed import PUBLISHER

        try:
            return user_id_of(find_user(snapshot, PUBLISHER.username))
        except LookupError:
            users = snapshot.get("users", [])
            if not users:
                raise LookupError("no users in the world: seed it first") from None
            return user_id_of(users[0])


class SimServer:
    """Serve one ``SimWorld`` on a Unix socket (mode 0600).

    Use ``run()`` to block in the current thread (signals stop it), or
    ``start_in_thread()`` / ``stop_thread()`` in tests.
    """

    def __init__(self, state_dir: str | Path, socket_path: str | Path | None = None, *,
                 world: Any = None, max_frame_bytes: int = MAX_FRAME_BYTES, workers: int = 8,
                 inline_invokes: bool = True):
        self.state_dir = Path(state_dir).resolve()
        self.socket_path = Path(socket_path).resolve() if socket_path else default_socket_path(self.state_dir)
        self.pid_path = self.state_dir / PID_NAME
        self.max_frame_bytes = max_frame_bytes
        self._world = world
        self._owns_world = world is None
        self._workers = workers
        # TL requests run on the loop thread itself: each takes well under a
        # millisecond (a part is one pwrite, sendMedia a hard link), and the
        # hand-off to a worker thread and back cost more CPU than the request.
        # Control ops (seed, inspect, post, ...) still run in worker threads.
        self.inline_invokes = inline_invokes
        self._executor: ThreadPoolExecutor | None = None
        self._listener: socket.socket | None = None
        self._accepting: asyncio.Task | None = None
        self._socket_inode: int | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._connections: dict[FrameConnection, set[asyncio.Task]] = {}   # -> its requests in flight
        self._busy_until: dict[Any, float] = {}
        # replies of this loop pass, sent once the part rows they acknowledge are committed
        self._outbox: dict[FrameConnection, list[tuple[dict, tuple]]] = {}
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._thread_error: BaseException | None = None
        self.control: WorldControl | None = None

    @property
    def world(self):
        return self._world

    # -- lifecycle ---------------------------------------------------------

    async def start(self) -> None:
        """Open the world, bind the socket and write the pid file."""
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        self.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        await self._refuse_if_running()
        self._executor = ThreadPoolExecutor(self._workers, thread_name_prefix="sim-world")
        if self._world is None:
            self._world = await self._loop.run_in_executor(self._executor, _open_world, self.state_dir)
        self.control = WorldControl(self._world)
        if self.inline_invokes and hasattr(self._world, "defer_part_rows"):
            self._world.defer_part_rows()   # this (the loop's) thread: see _release
        self._listener = self._bind_socket()
        self._listener.listen(128)
        self._listener.setblocking(False)
        self._accepting = self._loop.create_task(self._accept(), name="sim-accept")
        self.pid_path.write_text(f"{os.getpid()}\n")
        logger.bind(actor="sim").info("simulated Telegram serving {} on {}", self.state_dir, self.socket_path)

    async def _refuse_if_running(self) -> None:
        if not self.socket_path.exists() and not self.socket_path.is_symlink():
            return
        control = SimControl(self.socket_path, timeout=3.0)
        running = await asyncio.get_running_loop().run_in_executor(None, control.is_running)
        if running:
            pid = self.pid_path.read_text().strip() if self.pid_path.exists() else "?"
            raise SimServerError(f"another sim server (pid {pid}) already answers on {self.socket_path}")
        self.socket_path.unlink()  # stale socket of a server that died

    def _bind_socket(self) -> socket.socket:
        """Bind under a temporary name, chmod 0600, then move into place: never world-accessible."""
        tmp = self.socket_path.with_name(f".{self.socket_path.name}.{os.getpid()}.tmp")
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(str(tmp))
            os.chmod(tmp, 0o600)
            os.rename(tmp, self.socket_path)
        except OSError as exc:
            sock.close()
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            raise SimServerError(f"cannot bind {self.socket_path}: {exc}") from None
        self._socket_inode = self.socket_path.stat().st_ino
        return sock

    async def serve_until_stopped(self) -> None:
        await self._stop.wait()
        await self.aclose()

    def request_stop(self) -> None:
        """Ask the server to stop; safe from any thread and from signal handlers."""
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)

    async def aclose(self) -> None:
        if self._accepting is not None:
            self._accepting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._accepting
            self._accepting = None
        if self._listener is not None:
            self._listener.close()
            self._listener = None
            self._remove_socket()
        if self._outbox:
            self._release()
        tasks = []
        for conn in list(self._connections):
            tasks.extend(self._close_connection(conn))
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=False)
            self._executor = None
        if self._owns_world and self._world is not None and hasattr(self._world, "close"):
            self._world.close()
        with contextlib.suppress(FileNotFoundError):
            if self.pid_path.read_text().strip() == str(os.getpid()):
                self.pid_path.unlink()
        logger.bind(actor="sim").info("simulated Telegram stopped")

    def _remove_socket(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            if self.socket_path.stat().st_ino == self._socket_inode:
                self.socket_path.unlink()

    def run(self, *, install_signals: bool = True) -> None:
        """Serve until SIGTERM/SIGINT (or ``request_stop``); blocks."""
        async def main() -> None:
            await self.start()
            if install_signals:
                loop = asyncio.get_running_loop()
                for sig in (signal.SIGTERM, signal.SIGINT):
                    loop.add_signal_handler(sig, self._stop.set)
            self._ready.set()
            await self.serve_until_stopped()

        asyncio.run(main())

    def start_in_thread(self, timeout: float = 30.0) -> "SimServer":
        """Run the server on its own thread and loop; returns once it listens."""
        def target() -> None:
            try:
                self.run(install_signals=False)
            except BaseException as exc:  # reported to the starting thread
                self._thread_error = exc
                self._ready.set()

        self._thread = threading.Thread(target=target, name="sim-server", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            raise SimServerError("sim server did not start in time")
        if self._thread_error is not None:
            raise self._thread_error
        return self

    def stop_thread(self, timeout: float = 30.0) -> None:
        self.request_stop()
        if self._thread is not None:
            self._thread.join(timeout)

    # -- connections -------------------------------------------------------

    async def _accept(self) -> None:
        while True:
            try:
                sock, _ = await self._loop.sock_accept(self._listener)
            except OSError as exc:   # e.g. out of file descriptors: keep serving the others
                logger.bind(actor="sim").warning("sim accept failed: {}", exc)
                await asyncio.sleep(0.1)
                continue
            conn = FrameConnection(sock, self._on_frame, self._on_lost, max_frame_bytes=self.max_frame_bytes)
            self._connections[conn] = set()

    def _close_connection(self, conn: FrameConnection, *, flush: bool = False) -> list[asyncio.Task]:
        """Close ``conn`` and cancel its requests in flight; returns them."""
        conn.close(flush=flush)
        tasks = list(self._connections.pop(conn, ()))
        for task in tasks:
            task.cancel()
        return tasks

    def _on_lost(self, conn: FrameConnection, exc: Exception | None) -> None:
        if isinstance(exc, FrameError):   # the stream cannot be trusted any more: say why, then close
            with contextlib.suppress(ConnectionError):
                conn.send({"id": None, "ok": False, "code": 400, "message": str(exc)})
        self._close_connection(conn, flush=True)

    def _on_frame(self, conn: FrameConnection, message: dict, payload: memoryview) -> None:
        """One request, as soon as its frame is in; ``payload`` lives only during this call."""
        op = message.get("op")
        if op == "invoke" and self.inline_invokes:
            try:
                outcome = self._process(*self._invoke_args(message), payload)
            except Exception as exc:   # a bug around the request (faults, pacing): answer, never hang
                logger.bind(actor="sim").opt(exception=exc).error("sim failed on {}", message.get("name"))
                outcome = ({"ok": False, "code": 500, "message": f"INTERNAL_SIM_ERROR {type(exc).__name__}"},
                           b"", 0.0, 0.0, None)
            self._answer(conn, message, outcome)
            return
        data = bytes(payload) if op == "invoke" else b""
        task = self._loop.create_task(self._handle(conn, message, data))
        requests = self._connections.get(conn)
        if requests is None:   # closed meanwhile
            task.cancel()
            return
        requests.add(task)
        task.add_done_callback(requests.discard)

    @staticmethod
    def _invoke_args(message: dict) -> tuple[int, str]:
        return int(message.get("key") or 0), str(message.get("name") or "")

    async def _handle(self, conn: FrameConnection, message: dict, data: bytes) -> None:
        op = message.get("op")
        if op == "invoke":
            outcome = await self._in_worker(self._process, *self._invoke_args(message), data)
            self._answer(conn, message, outcome)
            return
        reply = await self._control(op, message)
        self._send(conn, message.get("id"), reply)
        with contextlib.suppress(ConnectionError):
            await conn.drain()

    def _answer(self, conn: FrameConnection, message: dict, outcome) -> None:
        """Send an invoke's reply now, or after its simulated latency and transfer time."""
        if outcome is None:
            logger.bind(actor="sim").debug("dropping connection at {}", message.get("name"))
            self._close_connection(conn)
            return
        reply, result, latency, transfer, account = outcome
        delay = latency + self._pace(account, transfer)
        if delay <= 0:
            if not self._outbox:
                self._loop.call_soon(self._release)
            reply["id"] = message.get("id")
            self._outbox.setdefault(conn, []).append((reply, (result,) if result else ()))
            return
        requests = self._connections.get(conn)
        if requests is None:
            return
        task = self._loop.create_task(self._reply_later(conn, message.get("id"), reply, result, delay))
        requests.add(task)
        task.add_done_callback(requests.discard)

    def _release(self) -> None:
        """Once per loop pass: commit the part rows saved by this pass's requests in one
        transaction, then send their replies (one sendmsg per connection)."""
        outbox, self._outbox = self._outbox, {}
        if not self._commit_part_rows():   # nothing acknowledged that is not committed
            failed = {"ok": False, "code": 500, "message": "INTERNAL_SIM_ERROR part rows not committed"}
            outbox = {conn: [({**failed, "id": reply.get("id")}, ()) for reply, _ in frames]
                      for conn, frames in outbox.items()}
        for conn, frames in outbox.items():
            if not conn.closed:
                with contextlib.suppress(ConnectionError):
                    conn.send_frames(frames)

    def _commit_part_rows(self) -> bool:
        commit = getattr(self._world, "commit_part_rows", None)
        if commit is None:
            return True
        try:
            commit()
        except Exception as exc:
            logger.bind(actor="sim").opt(exception=exc).error("sim could not commit part rows")
            return False
        return True

    async def _reply_later(self, conn: FrameConnection, request_id: Any, reply: dict, result: bytes,
                           delay: float) -> None:
        await asyncio.sleep(delay)
        if not self._commit_part_rows():
            reply = {"ok": False, "code": 500, "message": "INTERNAL_SIM_ERROR part rows not committed"}
        self._send(conn, request_id, reply, result if reply.get("ok") else b"")
        with contextlib.suppress(ConnectionError):
            await conn.drain()

    @staticmethod
    def _send(conn: FrameConnection, request_id: Any, reply: dict, result: bytes = b"") -> None:
        if conn.closed:
            return
        reply["id"] = request_id
        with contextlib.suppress(ConnectionError):
            conn.send(reply, (result,) if result else ())

    async def _in_worker(self, fn: Callable, *args: Any) -> Any:
        return await self._loop.run_in_executor(self._executor, fn, *args)

    def _process(self, key: int, name: str, data) -> tuple[dict, bytes, float, float, Any] | None:
        """The drop check, the request itself and its simulated cost (on the loop, or in a
        worker thread when ``inline_invokes`` is off).  ``data`` is not kept.

        Returns None for a dropped connection, else (reply map, TL result, latency
        seconds, transfer seconds at the account's bandwidth cap, account).
        """
        world = self._world
        if world.should_drop(key, name):
            return None
        try:
            result = world.handle_bytes(key, data)
        except SimRpcError as exc:
            reply, result = {"ok": False, "code": exc.code, "message": exc.message}, b""
        except Exception as exc:
            logger.bind(actor="sim").opt(exception=exc).error("sim failed on {}", name)
            reply, result = {"ok": False, "code": 500, "message": f"INTERNAL_SIM_ERROR {type(exc).__name__}"}, b""
        else:
            reply = {"ok": True}
        nbytes = len(data) + len(result)
        total = world.delay_for(key, name, nbytes)
        if total <= 0:
            return reply, result, 0.0, 0.0, None
        account = world.user_for_key(key) if hasattr(world, "user_for_key") else key
        transfer = sum(nbytes / float(f.bytes_per_second) for f in getattr(world, "faults", ())
                       if f.kind == "bandwidth" and f.matches(name, account))
        return reply, result, max(0.0, total - transfer), transfer, (account if account is not None else key)

    def _pace(self, account: Any, transfer: float) -> float:
        """Seconds until a transfer of ``transfer`` seconds finishes on the account's link.

        Transfers of one account queue behind each other (across connections),
        so concurrent requests cannot exceed its bandwidth cap together.
        """
        if transfer <= 0:
            return 0.0
        now = self._loop.time()
        start = max(now, self._busy_until.get(account, 0.0))
        self._busy_until[account] = start + transfer
        return start + transfer - now

    async def _control(self, op: Any, message: dict) -> dict:
        args = {k: v for k, v in message.items() if k not in ("op", "id")}
        try:
            result = await self._in_worker(self.control.call, str(op), args)
        except (KeyError, ValueError, TypeError, LookupError) as exc:
            return {"ok": False, "message": str(exc).strip("'\"") or type(exc).__name__}
        except Exception as exc:
            logger.bind(actor="sim").opt(exception=exc).error("sim control {} failed", op)
            return {"ok": False, "message": f"{type(exc).__name__}: {exc}"}
        return {"ok": True, "result": result}


def run_server(state_dir: str | Path, socket_path: str | Path | None = None) -> int:
    """Entry point for ``stashd sim serve``: serve until SIGTERM/SIGINT; 0 on a clean stop."""
    server = SimServer(state_dir, socket_path)
    try:
        server.run()
    except SimServerError as exc:
        print(f"stashd sim serve: {exc}", file=sys.stderr)
        return 1
    return 0
