"""Errors raised by the simulated Telegram server."""


class SimRpcError(Exception):
    """An RPC error as Telegram would send it: a numeric code and a message.

    The sender turns it into Telethon's own exception class through
    ``telethon.errors.rpc_message_to_error``, so callers see exactly what a
    real server would give them (``FloodWaitError``, ``FilePartMissingError``...).
    """

    def __init__(self, code: int, message: str):
        super().__init__(f"{code} {message}")
        self.code = int(code)
        self.message = str(message)

    def __reduce__(self):
        return (SimRpcError, (self.code, self.message))


def bad_request(message: str) -> SimRpcError:
    return SimRpcError(400, message)


def flood_wait(seconds: float) -> SimRpcError:
    return SimRpcError(420, f"FLOOD_WAIT_{max(0, int(seconds))}")


def unauthorized(message: str = "AUTH_KEY_UNREGISTERED") -> SimRpcError:
    return SimRpcError(401, message)


def forbidden(message: str) -> SimRpcError:
    return SimRpcError(403, message)
