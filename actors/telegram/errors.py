"""Errors an AccountActor returns in the caller's future (one base: TelegramError).

Telethon's own exceptions never leave the account actor: the handlers translate
them here, so callers (uploader, verifier, budget) depend on this module only.
"""
from __future__ import annotations

__all__ = [
    "TelegramError",
    "FloodWaitError",
    "CoolingDownError",
    "AccountPausedError",
    "AccountUnavailableError",
    "ChannelNotFoundError",
    "InvalidRangeError",
    "FilePartMissingError",
    "RpcError",
]


class TelegramError(Exception):
    """Base of every error an account returns."""


class FloodWaitError(TelegramError):
    """Telegram said FLOOD_WAIT: this account must not send `kind` before `until`."""

    def __init__(self, kind: str, seconds: float, until: float):
        super().__init__(f"FloodWait on {kind}: {seconds:g} s (until {until:.0f})")
        self.kind, self.seconds, self.until = kind, seconds, until

    def __reduce__(self):
        return (type(self), (self.kind, self.seconds, self.until))


class CoolingDownError(TelegramError):
    """Refused locally, nothing sent: `kind` is still cooling down after a FloodWait."""

    def __init__(self, kind: str, until: float):
        super().__init__(f"{kind} is cooling down until {until:.0f}")
        self.kind, self.until = kind, until

    def __reduce__(self):
        return (type(self), (self.kind, self.until))


class AccountPausedError(TelegramError):
    """The account is paused (operator's `stashctl pause`): no new work."""

    def __init__(self, account: str):
        super().__init__(f"account {account} is paused")
        self.account = account

    def __reduce__(self):
        return (type(self), (self.account,))


class AccountUnavailableError(TelegramError):
    """The account cannot work at all (e.g. its session is not authorized)."""

    def __init__(self, account: str, reason: str):
        super().__init__(f"account {account} unavailable: {reason}")
        self.account, self.reason = account, reason

    def __reduce__(self):
        return (type(self), (self.account, self.reason))


class ChannelNotFoundError(TelegramError):
    def __init__(self, channel: object):
        super().__init__(f"channel {channel!r} not found or not visible to this account")
        self.channel = channel

    def __reduce__(self):
        return (type(self), (self.channel,))


class InvalidRangeError(TelegramError, ValueError):
    """A download range Telegram would refuse (checked before sending)."""


class FilePartMissingError(TelegramError):
    """FILE_PART_X_MISSING: the server lost (or never got) part `index`: send it again."""

    def __init__(self, kind: str, index: int):
        super().__init__(f"{kind}: file part {index} missing")
        self.kind, self.index = kind, index

    def __reduce__(self):
        return (type(self), (self.kind, self.index))


class RpcError(TelegramError):
    """Any other Telegram RPC error, with the request kind that caused it."""

    def __init__(self, kind: str, code: int | None, message: str):
        super().__init__(f"{kind}: {code} {message}")
        self.kind, self.code, self.message = kind, code, message

    def __reduce__(self):
        return (type(self), (self.kind, self.code, self.message))
