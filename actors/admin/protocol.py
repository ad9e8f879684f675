"""Admin socket wire format.

A frame is a 4-byte big-endian length followed by that many bytes of msgpack.
A request is the map ``{"id": int | str, "cmd": str, "args": map}``; the daemon
answers ``{"id": ..., "ok": True, "result": ...}`` or
``{"id": ..., "ok": False, "error": {"code": str, "message": str}}``.

This module only frames, decodes and validates; it holds no socket and no
thread, so everything here is tested without starting anything.  Every failure
is one of the errors below:

- ``FrameError`` (the byte stream cannot be trusted any more: reply if
  ``reply`` is true, then close the connection);
- ``RequestError`` (a well-framed message of the wrong shape: reply, and the
  connection stays usable).
"""
from __future__ import annotations

import dataclasses
import difflib
import enum
import struct
from pathlib import PurePath
from typing import Any, Iterable, Mapping

import msgpack

MAX_FRAME_BYTES = 1_048_576
"""Default cap on a request frame's body (``admin.max_frame_bytes``)."""

MAX_REPLY_BYTES = 64 * 1_048_576
"""Cap a client puts on a reply frame (status of many accounts is still small)."""

HEADER = struct.Struct(">I")

COMMANDS: frozenset[str] = frozenset({"status", "accounts", "pause", "resume", "shutdown",
                                    "upload", "transfers", "transfer", "budget",
                                    "verify", "retry", "scan", "runs"})
"""Commands the daemon knows today (later issues add more)."""

# Error codes put on the wire.
BAD_FRAME = "bad_frame"
BAD_REQUEST = "bad_request"
UNKNOWN_COMMAND = "unknown_command"
FRAME_TOO_LARGE = "frame_too_large"
PERMISSION_DENIED = "permission_denied"
INTERNAL_ERROR = "internal_error"
BUSY = "busy"
COMMAND_ERROR = "error"


class AdminError(Exception):
    """Base of every admin-socket error."""


class AdminCommandError(AdminError):
    """Raised by a dispatch function for a clean error reply (no traceback logged).

    Also raised by the client when the daemon answers ``ok: False``.
    """

    def __init__(self, message: str, code: str = COMMAND_ERROR):
        super().__init__(message)
        self.message = message
        self.code = code

    def __str__(self) -> str:
        return self.message


class FrameError(AdminError):
    """The byte stream is unusable; the connection must be closed.

    ``reply`` says whether an error reply should be sent before closing
    (there is no point answering a peer that already hung up).
    """

    code = BAD_FRAME
    reply = True

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class FrameTooLargeError(FrameError):
    code = FRAME_TOO_LARGE


class FrameTruncatedError(FrameError):
    """EOF in the middle of a frame."""

    reply = False


class RequestError(AdminError):
    """A decoded frame that is not a valid request; ``request_id`` if one was readable."""

    def __init__(self, message: str, code: str = BAD_REQUEST, request_id: int | str | None = None):
        super().__init__(message)
        self.message = message
        self.code = code
        self.request_id = request_id


@dataclasses.dataclass(frozen=True)
class Request:
    id: int | str
    cmd: str
    args: Mapping[str, Any]

    def __str__(self) -> str:
        return f"Request(id={self.id!r}, cmd={self.cmd})"


# ---------------------------------------------------------------- encoding


def _default(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.asdict(obj)
    if isinstance(obj, PurePath):
        return str(obj)
    if isinstance(obj, (set, frozenset)):
        return sorted(obj, key=repr)
    if isinstance(obj, enum.Enum):
        return obj.value
    raise TypeError(f"cannot encode {type(obj).__name__}")


def encode_frame(obj: Any) -> bytes:
    """Length-prefixed msgpack of ``obj``.  Raises ``FrameError`` if it cannot be encoded."""
    try:
        body = msgpack.packb(obj, use_bin_type=True, default=_default)
    except (TypeError, ValueError, OverflowError) as exc:
        raise FrameError(f"cannot encode frame: {exc}") from exc
    if len(body) > 0xFFFFFFFF:
        raise FrameError("frame body over 4 GiB")
    return HEADER.pack(len(body)) + body


def _reject_ext(code: int, data: bytes) -> Any:
    raise ValueError(f"msgpack extension type {code} not accepted")


def decode_body(body: bytes) -> Any:
    """Decode one frame body; every failure becomes ``FrameError``.

    unpackb bounds container and string sizes by the body length
    (which is itself capped), nesting by msgpack's own stack limit.
    """
    try:
        return msgpack.unpackb(
            body,
            raw=False,
            strict_map_key=False,
            use_list=True,
            ext_hook=_reject_ext,
        )
    except Exception as exc:  # msgpack raises ValueError, TypeError, StackError, ExtraData ...
        raise FrameError(f"undecodable msgpack: {type(exc).__name__}: {exc}"[:200]) from exc


# ---------------------------------------------------------------- reading


def _recv_exact(src: Any, n: int, *, allow_eof: bool) -> bytes | None:
    """Read exactly ``n`` bytes from a socket (``recv``) or a binary stream (``read``).

    Returns None on EOF before the first byte when ``allow_eof``; raises
    ``FrameTruncatedError`` on EOF after it.  Socket timeouts propagate.
    """
    chunks = []
    got = 0
    recv = getattr(src, "recv", None)
    while got < n:
        want = min(n - got, 65536)
        data = recv(want) if recv is not None else src.read(want)
        if not data:
            if got == 0 and allow_eof:
                return None
            raise FrameTruncatedError(f"connection closed after {got} of {n} bytes")
        chunks.append(data)
        got += len(data)
    return b"".join(chunks)


def read_frame(src: Any, max_bytes: int = MAX_FRAME_BYTES) -> Any:
    """Read and decode one frame from a socket or binary stream.

    Returns the decoded object, or None on a clean EOF between frames.
    Raises ``FrameTooLargeError`` *without reading the body* when the announced
    length exceeds ``max_bytes``, ``FrameTruncatedError`` on EOF mid-frame,
    ``FrameError`` for undecodable bodies.  Socket timeouts/OSError propagate.
    """
    header = _recv_exact(src, HEADER.size, allow_eof=True)
    if header is None:
        return None
    (length,) = HEADER.unpack(header)
    if length > max_bytes:
        raise FrameTooLargeError(f"frame of {length} bytes exceeds the {max_bytes}-byte cap")
    if length == 0:
        raise FrameError("empty frame")
    body = _recv_exact(src, length, allow_eof=False)
    return decode_body(body)


# ---------------------------------------------------------------- requests


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    close = difflib.get_close_matches(word, sorted(choices), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _valid_id(value: Any) -> bool:
    return (isinstance(value, int) and not isinstance(value, bool)) or isinstance(value, str)


def parse_request(obj: Any, commands: Iterable[str] = COMMANDS) -> Request:
    """Validate a decoded frame as a request; raises ``RequestError``."""
    if not isinstance(obj, dict):
        raise RequestError(f"request must be a map, not {type(obj).__name__}")
    raw_id = obj.get("id")
    request_id = raw_id if _valid_id(raw_id) else None
    if request_id is None:
        raise RequestError("request 'id' must be an integer or a string")
    if isinstance(request_id, str) and len(request_id) > 256:
        raise RequestError("request 'id' is longer than 256 characters")
    unknown = [k for k in obj if k not in ("id", "cmd", "args")]
    if unknown:
        raise RequestError(f"unknown request key {str(unknown[0])[:40]!r}", request_id=request_id)
    cmd = obj.get("cmd")
    if not isinstance(cmd, str):
        raise RequestError("request 'cmd' must be a string", request_id=request_id)
    args = obj.get("args", {})
    if not isinstance(args, dict) or not all(isinstance(k, str) for k in args):
        raise RequestError("request 'args' must be a map with string keys", request_id=request_id)
    commands = frozenset(commands)
    if cmd not in commands:
        raise RequestError(
            f"unknown command {cmd[:40]!r}{did_you_mean(cmd, commands)}",
            code=UNKNOWN_COMMAND,
            request_id=request_id,
        )
    return Request(id=request_id, cmd=cmd, args=args)


def make_request(request_id: int | str, cmd: str, args: Mapping[str, Any] | None = None) -> dict:
    return {"id": request_id, "cmd": cmd, "args": dict(args or {})}


def ok_reply(request_id: int | str | None, result: Any) -> dict:
    return {"id": request_id, "ok": True, "result": result}


def error_reply(request_id: int | str | None, code: str, message: str) -> dict:
    return {"id": request_id, "ok": False, "error": {"code": code, "message": message}}


def parse_reply(obj: Any) -> tuple[int | str | None, Any]:
    """Client side: return ``(id, result)`` or raise ``AdminCommandError`` / ``FrameError``."""
    if not isinstance(obj, dict) or not isinstance(obj.get("ok"), bool):
        raise FrameError("reply is not a {id, ok, result | error} map")
    if obj["ok"]:
        return obj.get("id"), obj.get("result")
    error = obj.get("error")
    if not isinstance(error, dict):
        raise AdminCommandError("daemon returned an error without details")
    raise AdminCommandError(str(error.get("message", "")), code=str(error.get("code", COMMAND_ERROR)))
