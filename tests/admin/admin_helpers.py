"""Helpers for the admin tests: a fake daemon and raw-socket utilities."""
from __future__ import annotations

import io
import socket
import threading

from actors.admin.protocol import COMMANDS, AdminCommandError, encode_frame, read_frame

NOW = 1_700_000_000.0


def sample_accounts(now: float = NOW) -> list[dict]:
    return [
        {"name": "alice", "user_id": 1001, "phone": "+1555***67", "premium": False,
         "upload_limit_bytes": 2000 * 2**20 - 64 * 2**20, "state": "ready",
         "cooldown_until": None, "flood_waits": {"SaveBigFilePartRequest": now + 125}},
        {"name": "bob", "user_id": 1002, "phone": "+4477***01", "premium": True,
         "upload_limit_bytes": 4000 * 2**20 - 64 * 2**20, "state": "paused",
         "cooldown_until": None, "flood_waits": {}},
    ]


class FakeDaemon:
    """dispatch() for the server; records every call it receives."""

    def __init__(self, now: float = NOW):
        self.now = now
        self.calls: list[tuple[str, dict]] = []
        self._lock = threading.Lock()
        self.paused: set[str] = set()
        self.on_shutdown = None

    def dispatch(self, cmd: str, args: dict):
        with self._lock:
            self.calls.append((cmd, args))
        if cmd == "status":
            return {"version": "0.1.0", "pid": 4242, "uptime_seconds": 3723.5, "state": "running",
                    "accounts": sample_accounts(self.now),
                    "actors": [{"name": "account:alice", "alive": True, "restarts": 0, "inbox": 0},
                               {"name": "account:bob", "alive": True, "restarts": 2, "inbox": 3}]}
        if cmd == "accounts":
            return sample_accounts(self.now)
        if cmd in ("pause", "resume"):
            name = args.get("account")
            if name not in ("alice", "bob"):
                raise AdminCommandError(f"no account named {name!r}", code="not_found")
            (self.paused.add if cmd == "pause" else self.paused.discard)(name)
            return {"account": name, "state": "paused" if cmd == "pause" else "ready"}
        if cmd == "shutdown":
            if self.on_shutdown:
                self.on_shutdown()
            return "stopping"
        if cmd in COMMANDS:  # a valid command this fake does not model
            raise AdminCommandError(f"{cmd} is not modelled by FakeDaemon", code="not_found")
        raise AssertionError(f"dispatch got an unvalidated command {cmd!r}")


def connect(path, timeout: float = 5.0) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    s.connect(str(path))
    return s


def request(sock: socket.socket, obj) -> dict:
    """Send one object as a frame and read one reply frame."""
    sock.sendall(encode_frame(obj))
    return read_frame(sock, 1 << 26)


def read_all(sock: socket.socket) -> bytes:
    """Everything until EOF (a reset after data counts as EOF). Timeouts propagate."""
    chunks = []
    while True:
        try:
            data = sock.recv(65536)
        except ConnectionResetError:
            break
        if not data:
            break
        chunks.append(data)
    return b"".join(chunks)


def frames(data: bytes) -> list:
    stream = io.BytesIO(data)
    out = []
    while True:
        obj = read_frame(stream, 1 << 26)
        if obj is None:
            return out
        out.append(obj)

