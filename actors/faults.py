"""Named crash points for kill/restart tests.

``fault_point(name)`` does nothing unless the environment variable
``STASHD_FAULT`` names it.  The variable is a comma-separated list of
``NAME`` (fire on the first hit) or ``NAME@N`` (fire on the N-th hit, counted
per name in this process).  Firing kills the process at once with SIGKILL:
no finally blocks, no atexit, no flush -- exactly what a crash or an OOM kill
leaves behind.

Points in the code:

- ``after_manifest_write``: the manifest is on disk, the transfer row not yet;
- ``mid_part_upload``: a chunk of a part was acknowledged and journaled;
- ``after_send_before_record``: Telegram returned the message, not recorded yet;
- ``after_record``: the message id of a part is recorded (phase 1).

Ingest (issue 5; not in ``POINTS``, which the upload-only property test samples):

- ``ingest_after_download_chunk``: downloaded chunks were fsynced and journaled;
- ``ingest_after_claim``: a ready archive set was leased, nothing done with it yet;
- ``ingest_after_manifest``: a set's manifest is on disk, its transfer row not yet;
- ``ingest_before_index``: a package is uploaded and listed, its index not recorded.
"""
from __future__ import annotations

import os
import signal
import threading
from typing import Mapping

ENV = "STASHD_FAULT"
POINTS = ("after_manifest_write", "mid_part_upload", "after_send_before_record", "after_record")

_lock = threading.Lock()
_hits: dict[str, int] = {}


def parse_faults(spec: str | None) -> dict[str, int]:
    """``"a,b@3"`` -> ``{"a": 1, "b": 3}`` (the hit number each name fires on)."""
    out: dict[str, int] = {}
    for item in (spec or "").split(","):
        item = item.strip()
        if not item:
            continue
        name, _, nth = item.partition("@")
        try:
            n = int(nth) if nth else 1
        except ValueError:
            raise ValueError(f"{ENV}: bad hit number in {item!r} (expected NAME or NAME@N)") from None
        if n < 1:
            raise ValueError(f"{ENV}: hit number must be >= 1 in {item!r}")
        out[name.strip()] = n
    return out


def should_fire(name: str, env: Mapping[str, str] | None = None) -> bool:
    """Count one hit of ``name``; True when this hit is the one ``STASHD_FAULT`` names."""
    spec = (os.environ if env is None else env).get(ENV)
    if not spec:
        return False
    wanted = parse_faults(spec).get(name)
    if wanted is None:
        return False
    with _lock:
        _hits[name] = _hits.get(name, 0) + 1
        return _hits[name] == wanted


def fault_point(name: str) -> None:
    """Die here (SIGKILL) when ``STASHD_FAULT`` asks for it; otherwise do nothing."""
    if should_fire(name):
        try:
            os.write(2, f"stashd: fault point {name!r} reached: SIGKILL\n".encode())
        except OSError:
            pass
        os.kill(os.getpid(), signal.SIGKILL)


def reset_hits() -> None:
    """Forget the hit counts (tests)."""
    with _lock:
        _hits.clear()
