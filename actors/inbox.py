"""The watched inbox folder (``upload.inbox_dir``): settled files become transfers.

No inotify: on every :class:`Tick` the folder is walked (recursively).  A
regular file is *settled* when its size and mtime are the same as at the
previous scan (a file still being copied in changes between scans); a settled
file not planned yet is planned through :class:`actors.transfers.TransferPlanner`
(caption: its path relative to the inbox).  "Planned yet" means a transfer
with that source path and size exists in storage (so a restart does not queue
the inbox again), or this scanner planned or refused that (path, size, mtime)
already.  A file that is planned twice anyway is completed by reference
(same content hash), never uploaded twice.
"""
from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

import pykka
from loguru import logger

from actors.supervision import SupervisedMixin
from actors.transfers import PathRefusedError

__all__ = ["InboxScanner", "InboxActor", "Tick"]

log = logger.bind(actor="inbox")


class Tick:
    """Scan now (told by the daemon's ticker)."""


class InboxScanner:
    def __init__(self, planner: Any, storage: Any, inbox_dir: Path | str, *, history: int = 100_000):
        self.planner, self.storage = planner, storage
        self.inbox_dir = Path(inbox_dir)
        self._history = history
        self._previous: dict[str, tuple[int, int]] = {}
        self._done: set[tuple[str, int, int]] = set()

    def _walk(self) -> dict[str, tuple[int, int]]:
        seen: dict[str, tuple[int, int]] = {}
        for dirpath, dirnames, filenames in os.walk(self.inbox_dir):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for name in sorted(filenames):
                if name.startswith("."):  # temp files of writers, our own manifests' temps
                    continue
                path = os.path.join(dirpath, name)
                try:
                    st = os.lstat(path)
                except OSError:
                    continue
                if stat.S_ISREG(st.st_mode) and st.st_size > 0:
                    seen[os.path.realpath(path)] = (st.st_size, st.st_mtime_ns)
        return seen

    def scan(self) -> list:
        """Plan every settled, unplanned file; returns the new TransferRecords."""
        if not self.inbox_dir.is_dir():
            return []
        current = self._walk()
        settled = [(p, sz, mt) for p, (sz, mt) in sorted(current.items())
                   if self._previous.get(p) == (sz, mt) and (p, sz, mt) not in self._done]
        self._previous = current
        if not settled:
            return []
        known = {(t.source_path, t.size) for t in self.storage.list_transfers(limit=self._history)}
        planned = []
        for path, size, mtime in settled:
            self._done.add((path, size, mtime))
            if (path, size) in known:
                continue
            rel = os.path.relpath(path, os.path.realpath(self.inbox_dir))
            try:
                records = self.planner.plan([path], caption=rel)
            except PathRefusedError as exc:
                log.warning("inbox file refused: {}", exc)
                continue
            except Exception as exc:  # noqa: BLE001 - one bad file must not stop the inbox
                log.error("inbox file {} could not be planned: {}", path, exc)
                continue
            planned.extend(records)
        return planned


class InboxActor(SupervisedMixin, pykka.ThreadingActor):
    def __init__(self, scanner: InboxScanner):
        super().__init__()
        self.scanner = scanner

    def on_receive(self, message: Any) -> Any:
        if isinstance(message, Tick):
            return self.scanner.scan()
        raise TypeError(f"InboxActor does not handle {type(message).__name__}")
