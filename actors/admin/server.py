"""The admin socket: a Unix socket answering framed msgpack requests.

One accept thread, one short-lived thread per connection (at most
``max_connections`` at once; the next one gets a ``busy`` reply).  Every read
has a deadline, so a slow or idle client only ever holds its own connection.
Peers of another uid are refused by their kernel credentials (SO_PEERCRED).

The server knows nothing of actors: the supervisor passes ``dispatch(cmd,
args) -> result``, called on the connection's thread.  ``AdminCommandError``
from it becomes a clean error reply; anything else an ``internal_error`` reply
(logged with its traceback) and the server keeps serving.
"""
from __future__ import annotations

import errno
import os
import selectors
import socket
import stat
import struct
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterable

from loguru import logger

from . import protocol
from .protocol import (
    MAX_FRAME_BYTES,
    AdminCommandError,
    AdminError,
    FrameError,
    RequestError,
    encode_frame,
    error_reply,
    ok_reply,
    parse_request,
    read_frame,
)

__all__ = ["AdminServer", "AdminServerError", "AdminCommandError", "peer_credentials"]

Dispatch = Callable[[str, dict], Any]

_UCRED = struct.Struct("3i")  # struct ucred {pid_t pid; uid_t uid; gid_t gid;}
_MAX_UNIX_PATH = 107


class AdminServerError(AdminError):
    """The admin socket cannot be started (path in use, too long, ...)."""


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """``(pid, uid, gid)`` of the process at the other end of a Unix socket."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    return _UCRED.unpack(raw)


class AdminServer:
    def __init__(
        self,
        path: str | os.PathLike,
        dispatch: Dispatch,
        *,
        max_frame_bytes: int = MAX_FRAME_BYTES,
        commands: Iterable[str] = protocol.COMMANDS,
        read_timeout: float = 10.0,
        max_connections: int = 16,
        allowed_uid: int | None = None,
    ):
        self.path = Path(path)
        self._dispatch = dispatch
        self.max_frame_bytes = int(max_frame_bytes)
        self.commands = frozenset(commands)
        self.read_timeout = float(read_timeout)
        self.max_connections = int(max_connections)
        self.allowed_uid = os.geteuid() if allowed_uid is None else int(allowed_uid)
        self._log = logger.bind(actor="admin")
        self._listener: socket.socket | None = None
        self._inode: tuple[int, int] | None = None
        self._wake_r: socket.socket | None = None
        self._wake_w: socket.socket | None = None
        self._accept_thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._conns: dict[threading.Thread, socket.socket] = {}
        self._stopping = threading.Event()
        self._closing = False

    # ------------------------------------------------------------ lifecycle

    def start(self) -> "AdminServer":
        if self._listener is not None:
            raise AdminServerError("admin server already started")
        if len(os.fsencode(self.path)) > _MAX_UNIX_PATH:
            raise AdminServerError(f"admin socket path is too long for a Unix socket: {self.path}")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        except OSError as exc:
            raise AdminServerError(f"cannot create {self.path.parent}: {exc}") from exc
        self._clear_stale_socket()
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        bound = False
        try:
            # The umask makes the socket 0600 from the moment it exists; the chmod
            # is belt and braces (and documents the intent).
            old_umask = os.umask(0o177)
            try:
                listener.bind(str(self.path))
                bound = True
            finally:
                os.umask(old_umask)
            os.chmod(self.path, 0o600)
            st = os.stat(self.path)
            self._inode = (st.st_dev, st.st_ino)
            listener.listen(min(64, max(self.max_connections, 8)))
        except OSError as exc:
            listener.close()
            if bound:
                self.path.unlink(missing_ok=True)
            raise AdminServerError(f"cannot listen on {self.path}: {exc}") from exc
        self._listener = listener
        self._wake_r, self._wake_w = socket.socketpair()
        self._stopping.clear()
        self._closing = False
        self._accept_thread = threading.Thread(
            target=self._accept_loop, name="admin-accept", daemon=True
        )
        self._accept_thread.start()
        self._log.info("admin socket listening on {}", self.path)
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Close the listener, end every connection, remove the socket file. Idempotent."""
        with self._lock:  # a second, concurrent stop() returns at once
            if self._listener is None or self._closing:
                return
            self._closing = True
        self._stopping.set()
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass
        if self._accept_thread is not threading.current_thread():
            self._accept_thread.join(timeout)
        me = threading.current_thread()  # stop() may come from a command handler
        with self._lock:
            conns = [(t, c) for t, c in self._conns.items() if t is not me]
        for _, conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for thread, _ in conns:
            thread.join(timeout)
        self._listener.close()
        self._wake_r.close()
        self._wake_w.close()
        self._listener = None
        self._unlink_own_socket()
        self._log.info("admin socket closed")

    def __enter__(self) -> "AdminServer":
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    @property
    def active_connections(self) -> int:
        with self._lock:
            return len(self._conns)

    def _clear_stale_socket(self) -> None:
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(st.st_mode):
            raise AdminServerError(f"{self.path} exists and is not a socket; refusing to replace it")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.settimeout(1.0)
        try:
            probe.connect(str(self.path))
        except (ConnectionRefusedError, FileNotFoundError):
            self._log.info("removing stale admin socket {}", self.path)
            try:
                self.path.unlink()
            except FileNotFoundError:
                pass
            return
        except OSError as exc:
            raise AdminServerError(f"cannot tell whether {self.path} is in use: {exc}") from exc
        finally:
            probe.close()
        raise AdminServerError(f"another stashd is already answering on {self.path}")

    def _unlink_own_socket(self) -> None:
        try:
            st = os.lstat(self.path)
            if (st.st_dev, st.st_ino) == self._inode:
                self.path.unlink()
        except FileNotFoundError:
            pass
        except OSError as exc:
            self._log.warning("cannot remove admin socket {}: {}", self.path, exc)

    # ------------------------------------------------------------ accepting

    def _accept_loop(self) -> None:
        sel = selectors.DefaultSelector()
        sel.register(self._listener, selectors.EVENT_READ)
        sel.register(self._wake_r, selectors.EVENT_READ)
        try:
            while not self._stopping.is_set():
                for key, _ in sel.select():
                    if key.fileobj is self._wake_r or self._stopping.is_set():
                        return
                    self._accept_one()
        except Exception:
            if not self._stopping.is_set():
                self._log.opt(exception=True).error("admin accept loop failed")
        finally:
            sel.close()

    def _accept_one(self) -> None:
        try:
            conn, _ = self._listener.accept()
        except OSError as exc:
            if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                self._log.warning("admin accept failed: {}", exc)
                self._stopping.wait(0.05)  # out of descriptors: do not spin
            return
        with self._lock:
            busy = len(self._conns) >= self.max_connections
            if not busy:
                thread = threading.Thread(
                    target=self._serve_connection, args=(conn,), name="admin-conn", daemon=True
                )
                self._conns[thread] = conn
        if busy:
            conn.settimeout(1.0)  # on the accept thread: never block it on a peer
            self._send_quietly(conn, error_reply(None, protocol.BUSY, "too many admin connections"))
            conn.close()
            return
        thread.start()

    # ------------------------------------------------------------ one connection

    def _serve_connection(self, conn: socket.socket) -> None:
        try:
            conn.settimeout(self.read_timeout)
            try:
                _, uid, _ = peer_credentials(conn)
            except OSError as exc:
                self._log.warning("admin connection without peer credentials refused: {}", exc)
                return
            if uid != self.allowed_uid:
                self._log.warning("admin connection from uid {} refused", uid)
                self._send_quietly(
                    conn,
                    error_reply(
                        None,
                        protocol.PERMISSION_DENIED,
                        f"uid {uid} may not use this socket (only uid {self.allowed_uid})",
                    ),
                )
                return
            while not self._stopping.is_set():
                if not self._serve_one(conn):
                    return
        except Exception:
            self._log.opt(exception=True).error("admin connection handler failed")
        finally:
            with self._lock:  # free the slot before the peer can see the close
                self._conns.pop(threading.current_thread(), None)
            conn.close()

    def _serve_one(self, conn: socket.socket) -> bool:
        """Read one frame and answer it; False when the connection should close."""
        try:
            obj = read_frame(_DeadlineReader(conn, self.read_timeout), self.max_frame_bytes)
        except FrameError as exc:
            if exc.reply:
                self._send_quietly(conn, error_reply(None, exc.code, exc.message))
            return False
        except (socket.timeout, OSError):
            return False  # idle too long, reset, or shut down by stop()
        if obj is None:
            return False
        conn.settimeout(self.read_timeout)  # for sending the reply
        try:
            request = parse_request(obj, self.commands)
        except RequestError as exc:
            return self._send_quietly(conn, error_reply(exc.request_id, exc.code, exc.message))
        return self._send_quietly(conn, self._answer(request))

    def _answer(self, request: protocol.Request) -> dict:
        try:
            result = self._dispatch(request.cmd, dict(request.args))
        except AdminCommandError as exc:
            return error_reply(request.id, exc.code, exc.message)
        except Exception as exc:
            self._log.opt(exception=True).error("admin command {} failed", request.cmd)
            return error_reply(request.id, protocol.INTERNAL_ERROR, _short(exc))
        return ok_reply(request.id, result)

    def _send_quietly(self, conn: socket.socket, reply: dict) -> bool:
        try:
            data = encode_frame(reply)
        except FrameError as exc:
            self._log.error("admin reply cannot be encoded: {}", exc)
            data = encode_frame(
                error_reply(reply.get("id"), protocol.INTERNAL_ERROR, "reply cannot be encoded")
            )
        try:
            conn.sendall(data)
        except (socket.timeout, OSError):
            return False
        return True


class _DeadlineReader:
    """A socket's ``recv`` with one deadline for a whole frame (slow-drip clients lose)."""

    def __init__(self, conn: socket.socket, seconds: float):
        self._conn = conn
        self._deadline = time.monotonic() + seconds

    def recv(self, n: int) -> bytes:
        remaining = self._deadline - time.monotonic()
        if remaining <= 0:
            raise socket.timeout("frame not received in time")
        self._conn.settimeout(remaining)
        return self._conn.recv(n)


def _short(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}"
    return text if len(text) <= 200 else text[:197] + "..."
