"""The systemd notify protocol (sd_notify) without a dependency.

When ``NOTIFY_SOCKET`` is set (a filesystem path, or ``@name`` for an abstract
socket) each state change is one datagram: ``READY=1``, ``STATUS=...``,
``WATCHDOG=1``, ``STOPPING=1``, ``RELOADING=1``. When it is not set every call is
a no-op, so the daemon runs the same outside systemd.
"""
from __future__ import annotations

import os
import socket
import time
from typing import Mapping

from loguru import logger


class Notifier:
    """Sends sd_notify datagrams; ``env`` defaults to ``os.environ`` (read at construction)."""

    def __init__(self, env: Mapping[str, str] | None = None):
        env = os.environ if env is None else env
        self.address = _address(env.get("NOTIFY_SOCKET", ""))
        self.watchdog_usec = _watchdog_usec(env)

    @property
    def enabled(self) -> bool:
        return self.address is not None

    @property
    def watchdog_interval(self) -> float | None:
        """Seconds between WATCHDOG=1 pings (half of WATCHDOG_USEC), None when no watchdog."""
        if not self.enabled or not self.watchdog_usec:
            return None
        return self.watchdog_usec / 2 / 1_000_000

    def notify(self, *fields: str) -> bool:
        """Send one datagram made of ``fields`` joined by newlines; False if not sent."""
        if self.address is None:
            return False
        data = "\n".join(fields).encode("utf-8")
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.sendto(data, self.address)
            return True
        except OSError as exc:
            logger.bind(actor="notify").warning("sd_notify failed: {}", exc)
            return False

    def ready(self, status: str | None = None) -> bool:
        return self.notify("READY=1", *([f"STATUS={status}"] if status else []))

    def status(self, status: str) -> bool:
        return self.notify(f"STATUS={status}")

    def watchdog(self) -> bool:
        return self.notify("WATCHDOG=1")

    def stopping(self, status: str | None = None) -> bool:
        return self.notify("STOPPING=1", *([f"STATUS={status}"] if status else []))

    def reloading(self, clock_usec: int | None = None) -> bool:
        # systemd >= 253 wants MONOTONIC_USEC alongside RELOADING=1 (Type=notify-reload).
        usec = clock_usec if clock_usec is not None else time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.notify("RELOADING=1", f"MONOTONIC_USEC={usec}")


def _address(value: str) -> str | bytes | None:
    if not value:
        return None
    if value.startswith("@"):
        return b"\0" + value[1:].encode("utf-8")  # abstract namespace
    if value.startswith("/"):
        return value
    return None  # vsock and other exotic addresses are not supported


def _watchdog_usec(env: Mapping[str, str]) -> int | None:
    raw = env.get("WATCHDOG_USEC")
    if not raw:
        return None
    pid = env.get("WATCHDOG_PID")
    if pid and pid != str(os.getpid()):
        return None  # meant for another process
    try:
        usec = int(raw)
    except ValueError:
        return None
    return usec if usec > 0 else None
