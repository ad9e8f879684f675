"""A small blocking client for the admin socket (used by stashctl and tests)."""
from __future__ import annotations

import itertools
import os
import socket
from pathlib import Path
from typing import Any, Mapping

from .protocol import (
    MAX_REPLY_BYTES,
    AdminError,
    FrameError,
    encode_frame,
    make_request,
    parse_reply,
    read_frame,
)


class AdminUnreachableError(AdminError):
    """No daemon answers on the socket (missing, refused, timed out, hung up)."""


class AdminClient:
    """One connection, several requests.  ``call`` raises ``AdminCommandError``
    for an error reply and ``AdminUnreachableError`` when the daemon cannot be
    reached or stops answering."""

    def __init__(self, path: str | os.PathLike, *, timeout: float = 10.0):
        self.path = Path(path)
        self.timeout = timeout
        self._sock: socket.socket | None = None
        self._ids = itertools.count(1)

    def connect(self) -> "AdminClient":
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(str(self.path))
        except OSError as exc:
            sock.close()
            raise AdminUnreachableError(
                f"stashd is not running? cannot connect to {self.path}: {exc.strerror or exc}"
            ) from exc
        self._sock = sock
        return self

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def __enter__(self) -> "AdminClient":
        return self.connect()

    def __exit__(self, *exc_info) -> None:
        self.close()

    def call(self, cmd: str, args: Mapping[str, Any] | None = None) -> Any:
        if self._sock is None:
            self.connect()
        request_id = next(self._ids)
        try:
            try:
                self._sock.sendall(encode_frame(make_request(request_id, cmd, args)))
            except (BrokenPipeError, ConnectionResetError):
                # The daemon may refuse a connection (another uid, too busy)
                # with an error reply and close before our request is sent:
                # that reply is still waiting to be read.
                pass
            reply = read_frame(self._sock, MAX_REPLY_BYTES)
        except socket.timeout as exc:
            self.close()
            raise AdminUnreachableError(
                f"no answer from stashd on {self.path} within {self.timeout:g} s"
            ) from exc
        except (OSError, FrameError) as exc:
            self.close()
            raise AdminUnreachableError(f"connection to stashd on {self.path} failed: {exc}") from exc
        if reply is None:
            self.close()
            raise AdminUnreachableError(f"stashd on {self.path} closed the connection without answering")
        reply_id, result = parse_reply(reply)  # raises AdminCommandError on ok: False
        if reply_id != request_id:
            self.close()
            raise AdminUnreachableError(f"reply id {reply_id!r} does not match request id {request_id}")
        return result


def call(path: str | os.PathLike, cmd: str, args: Mapping[str, Any] | None = None, *, timeout: float = 10.0) -> Any:
    """One request on a fresh connection."""
    with AdminClient(path, timeout=timeout) as client:
        return client.call(cmd, args)
