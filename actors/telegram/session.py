"""Find the accounts' session files: every *.session in sessions_dir plus [[accounts]].

Session files hold auth keys: they are kept at mode 0600 (fixed when found
wider) and their contents are never logged.
"""
from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loguru import logger

__all__ = ["SessionEntry", "discover_sessions", "secure_session_file"]

SESSION_MODE = 0o600


@dataclass(frozen=True)
class SessionEntry:
    name: str  # account name = session file stem
    path: Path  # <sessions_dir>/<name>.session
    enabled: bool = True
    paused: bool = False
    exists: bool = True


def secure_session_file(path: Path) -> bool:
    """chmod 0600 if the file is readable by others; True when it had to be fixed."""
    mode = stat.S_IMODE(os.stat(path).st_mode)
    if mode & 0o077:
        os.chmod(path, SESSION_MODE)
        logger.bind(account=path.stem).warning(
            "session file {} had mode {:o}; fixed to 0600", path.name, mode
        )
        return True
    return False


def _session_name(value: str) -> str:
    name = Path(value).name
    return name[: -len(".session")] if name.endswith(".session") else name


def discover_sessions(settings: Any) -> list[SessionEntry]:
    """Accounts to run, sorted by name: session files found plus configured entries.

    A configured account without its file is returned with exists=False (the
    supervisor reports it; `stashd login NAME` creates it).
    """
    sessions_dir = Path(settings.daemon.sessions_dir)
    found: dict[str, Path] = {}
    if sessions_dir.is_dir():
        for path in sorted(sessions_dir.glob("*.session")):
            if path.is_file():
                found[path.stem] = path
    configured = {_session_name(a.session): a for a in getattr(settings, "accounts", ())}
    entries = []
    for name in sorted(set(found) | set(configured)):
        path = found.get(name) or sessions_dir / f"{name}.session"
        exists = path.is_file()
        if exists:
            secure_session_file(path)
        acc = configured.get(name)
        entries.append(
            SessionEntry(
                name=name,
                path=path,
                enabled=acc.enabled if acc else True,
                paused=acc.paused if acc else False,
                exists=exists,
            )
        )
    return entries
