"""Frozen values that cross the storage boundary (ORM entities never do)."""
from __future__ import annotations

from dataclasses import dataclass

ACCOUNT_STATES = ("starting", "ready", "paused", "cooling_down", "error", "stopped")


@dataclass(frozen=True)
class AccountRecord:
    name: str
    user_id: int | None
    phone_redacted: str | None
    premium: bool | None
    upload_limit_bytes: int | None
    state: str
    cooldown_until: float | None
    updated_at: float


@dataclass(frozen=True)
class FloodWaitRecord:
    account: str
    request_kind: str
    until: float


@dataclass(frozen=True)
class ChannelRecord:
    channel_id: int
    title: str
    username: str | None
    is_forum: bool
    seen_by: tuple[str, ...]
