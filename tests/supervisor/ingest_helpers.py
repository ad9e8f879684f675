"""Shared pieces of the process-level ingest tests (tests/supervisor/test_ingest_*.py).

Each test gets its own standalone simulated Telegram (a ``stashd sim serve``
process on a tmp dir, seeded with the source channels of
``actors/telegram/sim/samples.py``), so its destination holds only its own
uploads. What landed is judged on the server: destination documents are
grouped by their ``#stashd:<transfer>:<n>/<count>`` caption markers, each
complete transfer's bytes (its documents in part order, read from the sim's
document files) hashed, and every expected archive must appear exactly once.
"""
from __future__ import annotations

import hashlib
import re
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable

from actors.demo import SimServerProcess
from actors.telegram.sim import samples
from actors.telegram.sim.remote import SimControl
from tests.supervisor.test_process import write_config as process_config

DESTINATION = "stash_archive"
MARKER = re.compile(r"#stashd:([0-9a-fA-F-]{8,}):(\d+)/(\d+)")

# Every seeded source channel, read by two accounts where they share it.
SEEDED_MAPPINGS = (
    {"account": "alice", "channel": "sim_source_a"},
    {"account": "bob", "channel": "sim_source_a"},
    {"account": "bob", "channel": "sim_source_b"},
    {"account": "carol", "channel": "sim_source_b"},
    {"account": "carol", "channel": "sim_forum", "topics": ["Games", "Software"],
     "creator": "forum crew", "tags": ["forum"]},
)


@contextmanager
def seeded_sim(base: Path, *, size_scale: float = 1.0):
    """A fresh standalone sim server, seeded; yields (server, seeded sessions dir)
    in the shape of tests/supervisor/conftest.py's ``sim`` fixture."""
    server = SimServerProcess(base / "sim", base / "sim" / "sim.sock").start()
    try:
        SimControl(server.socket_path).seed(base / "seeded-sessions", size_scale=size_scale)
        yield server, base / "seeded-sessions"
    finally:
        server.stop()


def toml_value(value) -> str:
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return str(value)


def ingest_config(state: Path, sim, mappings: Iterable[dict], *, db_url: str | None = None,
                  sessions: Iterable[str] | None = None, ingest: str = "", extra: str = "") -> Path:
    """A ``stashd run`` config on ``sim`` ingesting ``mappings`` into @stash_archive.

    ``sessions`` keeps only those session files (a process with its own account set)."""
    lines = []
    for m in mappings:
        m = dict(m)
        m.setdefault("destination", DESTINATION)
        lines.append("{" + ", ".join(f"{k} = {toml_value(v)}" for k, v in m.items()) + "}")
    database = f'[database]\nurl = "{db_url}"\n' if db_url else ""
    config = process_config(state, sim, extra=f"""{database}
[ingest]
scan_interval_seconds = 2.0
scan_jitter_seconds = 0.2
{ingest}
mappings = [
  {(',' + chr(10) + '  ').join(lines)},
]
{extra}
""")
    if sessions is not None:
        keep = set(sessions)
        for f in (state / "sessions").glob("*.session"):
            if f.stem not in keep:
                f.unlink()
    return config


def destination_transfers(server, channel: str = DESTINATION) -> dict[str, list[dict]]:
    """transfer id -> its live destination messages by part number (complete or not)."""
    messages = SimControl(server.socket_path).inspect(channel)["messages"]
    out: dict[str, dict[int, dict]] = {}
    counts: dict[str, int] = {}
    for m in messages:
        if not m.get("document") or m.get("deleted"):
            continue
        found = MARKER.search(m.get("text") or "")
        if found:
            tid = found.group(1)
            out.setdefault(tid, {}).setdefault(int(found.group(2)), m)
            counts[tid] = int(found.group(3))
    return {tid: [parts[n] for n in sorted(parts)] + ([None] * (counts[tid] - len(parts)))
            for tid, parts in out.items()}


def destination_ledger(server, channel: str = DESTINATION) -> dict[str, int]:
    """sha256 of each *complete* destination transfer -> how many transfers carry it."""
    ledger: dict[str, int] = {}
    docs = Path(server.state_dir) / "docs"
    for parts in destination_transfers(server, channel).values():
        if any(m is None for m in parts):
            continue
        digest = hashlib.sha256()
        for m in parts:
            digest.update((docs / str(m["document"]["id"])).read_bytes())
        key = digest.hexdigest()
        ledger[key] = ledger.get(key, 0) + 1
    return ledger


def destination_document_copies(server, channel: str = DESTINATION) -> dict[str, int]:
    """sha256 of each live destination *document* -> copies (a part sent twice shows here)."""
    docs = Path(server.state_dir) / "docs"
    copies: dict[str, int] = {}
    for m in SimControl(server.socket_path).inspect(channel)["messages"]:
        if m.get("document") and not m.get("deleted"):
            key = hashlib.sha256((docs / str(m["document"]["id"])).read_bytes()).hexdigest()
            copies[key] = copies.get(key, 0) + 1
    return copies


def expected(channels: Iterable[str] | None = None, scale: float = 1.0) -> dict[str, samples.ArchiveSet]:
    """sha256 -> the archive set that must be in the destination once (optionally only
    sets first posted in ``channels``)."""
    wanted = None if channels is None else set(channels)
    return {sha: x for sha, x in samples.expected_ingested(scale).items()
            if wanted is None or x.channel in wanted}


def wait_until(condition, timeout: float, what: str, *, proc=None, interval: float = 0.2):
    """Bounded polling of a condition; fails early when ``proc`` died."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(f"stashd exited ({proc.returncode}) while waiting for {what}:\n{err[-3000:]}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(interval)


def all_in_destination(server, wanted: dict[str, samples.ArchiveSet]):
    ledger = destination_ledger(server)
    return ledger if all(sha in ledger for sha in wanted) else None


def all_indexed(store, wanted) -> bool:
    """Every wanted package's phase-2 index is done (indexed or failed, not pending)."""
    return all((m := store.get_package_meta(sha)) is not None and m.index_state != "pending"
               for sha in wanted)


def assert_exactly_once(server, wanted: dict[str, samples.ArchiveSet]) -> dict[str, int]:
    """Every wanted archive in the destination exactly once, nothing unexpected, and no
    document sent twice."""
    ledger = destination_ledger(server)
    missing = sorted(x.name for sha, x in wanted.items() if sha not in ledger)
    twice = sorted(wanted[sha].name for sha, n in ledger.items() if n > 1 and sha in wanted)
    unknown = [sha for sha in ledger if sha not in samples.expected_ingested()]
    assert not missing, f"archives never uploaded: {missing}"
    assert not twice, f"archives uploaded more than once: {twice}"
    assert not unknown, f"destination transfers that match no archive: {len(unknown)}"
    incomplete = [tid for tid, parts in destination_transfers(server).items() if any(m is None for m in parts)]
    assert not incomplete, f"destination transfers with parts missing: {incomplete}"
    copies = destination_document_copies(server)
    assert all(n == 1 for n in copies.values()), "a destination document was sent twice"
    return ledger


def open_store(db_url: str):
    from storage.database import open_storage

    return open_storage(db_url)
