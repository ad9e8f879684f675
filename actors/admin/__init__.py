"""The admin socket (server side), its wire protocol, and stashctl (client side)."""
from .client import AdminClient, AdminUnreachableError
from .protocol import (
    COMMANDS,
    MAX_FRAME_BYTES,
    AdminCommandError,
    AdminError,
    FrameError,
    FrameTooLargeError,
    FrameTruncatedError,
    RequestError,
    encode_frame,
    read_frame,
)
from .server import AdminServer, AdminServerError

__all__ = [
    "COMMANDS", "MAX_FRAME_BYTES", "AdminClient", "AdminCommandError", "AdminError",
    "AdminServer", "AdminServerError", "AdminUnreachableError", "FrameError",
    "FrameTooLargeError", "FrameTruncatedError", "RequestError", "encode_frame", "read_frame",
]
