"""Issue 4: two verifier processes on one database (PostgreSQL, and a SQLite file) never check
the same transfer at once.

Each process is a bare verifier: the real AccountActor (alice in one, carol in the other) on the
standalone simulated Telegram and the real VerifierActor, over a Storage wrapper that logs, with
the system-wide monotonic clock, when a claim handed it a transfer (a check starts) and every
later storage call about that transfer (the check goes on). A check of transfer T by process P
spans from its claim to P's last call about T before P claims T again. The test then asserts no
two checks of one transfer by different processes overlap, on a schedule that re-checks every
transfer several times a second so the two collide often.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from actors.telegram.sim.remote import SimControl
from tests.supervisor.test_process import ROOT, env
from tests.supervisor.test_verify_reupload import DEST

pytestmark = pytest.mark.slow

TRANSFERS = 120
CHECKS_EACH = 2 * TRANSFERS     # checks each process makes before the test stops them


# ---------------------------------------------------------------- the child process


class LoggedStorage:
    """Storage, with each claim and each later call about a claimed transfer logged."""

    def __init__(self, storage, log):
        self._storage, self._log = storage, log

    def _event(self, kind: str, tid: str, what: str) -> None:
        self._log.write(json.dumps([kind, tid, what, time.monotonic()]) + "\n")

    def claim_due_transfers(self, *args, **kwargs):
        claimed = self._storage.claim_due_transfers(*args, **kwargs)
        for t in claimed:
            self._event("start", t.id, "claim")
        return claimed

    def list_parts_many(self, ids):
        ids = list(ids)
        out = self._storage.list_parts_many(ids)
        for tid in ids:
            self._event("touch", tid, "list_parts_many")
        return out

    def record_passes(self, passes, **kwargs):
        passes = list(passes)
        try:
            return self._storage.record_passes(passes, **kwargs)
        finally:
            for item in passes:
                self._event("touch", item[0], "record_passes")

    def __getattr__(self, name):
        fn = getattr(self._storage, name)
        if not callable(fn):
            return fn

        def call(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            finally:  # a refused call (lease lost) still shows the process was working on it
                tid = kwargs.get("transfer_id", args[0] if args and isinstance(args[0], str) else None)
                if tid is not None:
                    self._event("touch", tid, name)
        return call


def child_main(argv: list[str]) -> int:
    """One bare verifier: spec (JSON) -> runs until the stop file appears; log to spec['log']."""
    spec = json.loads(argv[0])
    import pykka
    from loguru import logger

    from actors.account import AccountActor
    from actors.account_messages import GetAccountInfo
    from actors.verifier import VerifierActor
    from actors.verifier_messages import Tick
    from config.loader import settings_from_dict
    from storage import open_storage

    logger.remove()
    logger.add(sys.stderr, level="WARNING")
    base = Path(spec["dir"])
    settings = settings_from_dict(
        {"daemon": {"state_dir": str(base), "sessions_dir": spec["sessions"]},
         "telegram": {"mode": "simulated", "sim_socket": spec["socket"]},
         "verify": {"first_check_delay_seconds": 0, "interval_seconds": 0.2,
                    "verified_interval_seconds": 0.2, "lease_seconds": 30, "batch_size": 20,
                    "cleanup_grace_seconds": 3600}},
        base_dir=base, env={})
    storage = open_storage(spec["db_url"])
    log = open(spec["log"], "w", buffering=1)
    try:
        name = spec["account"]
        account = AccountActor.start(name, Path(spec["sessions"]) / f"{name}.session", settings, storage)
        info = account.ask(GetAccountInfo(), timeout=60)
        assert info.state == "ready", info
        (base / f"ready-{name}").touch()
        go, stop = Path(spec["go"]), Path(spec["stop"])
        deadline = time.monotonic() + 60
        while not go.exists() and time.monotonic() < deadline:
            time.sleep(0.005)   # both processes start checking together
        verifier = VerifierActor.start(LoggedStorage(storage, log), settings.verify,
                                       accounts=lambda: {name: account}, node=spec["node"])
        while not stop.exists() and time.monotonic() < deadline:
            verifier.tell(Tick())
            time.sleep(0.02)    # the daemon's ticker, faster
    finally:
        pykka.ActorRegistry.stop_all(block=True, timeout=30)
        log.close()
        storage.close()
    return 0


# ---------------------------------------------------------------- analysis


def checks_from_log(events: list[list]) -> dict[str, list[tuple[float, float]]]:
    """transfer id -> [(start, end)] of one process's checks (start: claim; end: its last
    call about the transfer before it claimed it again)."""
    out: dict[str, list[tuple[float, float]]] = {}
    open_: dict[str, list[float]] = {}
    for kind, tid, _what, at in sorted(events, key=lambda e: e[3]):
        if kind == "start":
            if tid in open_:
                out.setdefault(tid, []).append(tuple(open_[tid]))
            open_[tid] = [at, at]
        elif tid in open_:
            open_[tid][1] = at
    for tid, (start, end) in open_.items():
        out.setdefault(tid, []).append((start, end))
    return out


def overlaps(a: dict[str, list[tuple[float, float]]],
             b: dict[str, list[tuple[float, float]]]) -> list[tuple[str, tuple, tuple]]:
    found = []
    for tid in set(a) & set(b):
        for x in a[tid]:
            for y in b[tid]:
                if x[0] < y[1] and y[0] < x[1]:
                    found.append((tid, x, y))
    return found


def test_overlap_detector_sees_an_overlap_and_accepts_a_handover():
    p1 = checks_from_log([["start", "t", "claim", 1.0], ["touch", "t", "record_check", 2.0],
                          ["start", "t", "claim", 5.0], ["touch", "t", "record_check", 6.0]])
    assert p1 == {"t": [(1.0, 2.0), (5.0, 6.0)]}
    assert overlaps(p1, {"t": [(2.5, 4.5)]}) == []               # in between: fine
    assert overlaps(p1, {"t": [(1.5, 1.7)]}) == [("t", (1.0, 2.0), (1.5, 1.7))]
    assert overlaps(p1, {"u": [(1.5, 1.7)]}) == []


# ---------------------------------------------------------------- the test


def seed_uploaded(sim, db_url: str, prefix: str, n: int) -> list[str]:
    """n one-part documents posted by alice, and their uploaded transfers in the database."""
    from storage import open_storage

    server, _ = sim
    control = SimControl(server.socket_path)
    posted = []
    for i in range(n):
        tid = uuid.uuid4().hex
        name = f"{prefix}-{i:03d}.bin"
        msg = control.post(DEST, file_name=name, data=os.urandom(64) + name.encode(),
                           caption=f"#stashd:{tid}:1/1", sender="alice")
        posted.append((tid, name, msg))
    docs = {m["id"]: m["document"] for m in control.inspect(DEST)["messages"] if m.get("document")}
    storage = open_storage(db_url)
    try:
        for tid, name, msg in posted:
            size = docs[msg]["size"]
            storage.create_transfer(tid, source_path=f"/nonexistent/{name}", size=size, sha256="0" * 64,
                                    destination=DEST, manifest_path=f"/nonexistent/{tid}.m",
                                    delete_original=False,
                                    parts=[(0, 0, size, "0" * 64, name, uuid.uuid4().int >> 65)])
            storage.record_part_sent(tid, 0, message_id=msg, document_id=docs[msg]["id"], account="alice")
            storage.mark_transfer_uploaded(tid)
    finally:
        storage.close()
    return [p[0] for p in posted]


@pytest.mark.timeout(90)
def test_two_verifier_processes_never_check_one_transfer_at_once(tmp_path, sim, db_url):
    server, seeded = sim
    ids = seed_uploaded(sim, db_url, f"two-{uuid.uuid4().hex[:8]}", TRANSFERS)
    go, stop = tmp_path / "go", tmp_path / "stop"
    procs, logs = [], {}
    for account in ("alice", "carol"):
        d = tmp_path / account
        d.mkdir()
        logs[account] = d / "checks.jsonl"
        spec = {"dir": str(d), "sessions": str(seeded), "socket": str(server.socket_path),
                "db_url": db_url, "account": account, "node": f"test-{account}",
                "log": str(logs[account]), "go": str(go), "stop": str(stop)}
        procs.append(subprocess.Popen(
            [sys.executable, "-c", "import sys; from tests.supervisor.test_verify_two_verifiers "
             "import child_main; sys.exit(child_main(sys.argv[1:]))", json.dumps(spec)],
            cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    try:
        deadline = time.monotonic() + 45
        while not all((tmp_path / a / f"ready-{a}").exists() for a in ("alice", "carol")):
            assert all(p.poll() is None for p in procs), [p.communicate() for p in procs]
            assert time.monotonic() < deadline, "verifier processes did not get ready"
            time.sleep(0.05)
        go.touch()

        def started(account: str) -> int:
            path = logs[account]
            return path.read_text().count('"start"') if path.exists() else 0

        while not all(started(a) >= CHECKS_EACH for a in logs):
            assert all(p.poll() is None for p in procs), [p.communicate() for p in procs]
            assert time.monotonic() < deadline + 30, {a: started(a) for a in logs}
            time.sleep(0.1)
        stop.touch()
        for p in procs:
            out, err = p.communicate(timeout=30)
            assert p.returncode == 0, err[-3000:]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()

    checks = {}
    for account, path in logs.items():
        events = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        checks[account] = checks_from_log(events)
    counts = {a: sum(len(v) for v in c.values()) for a, c in checks.items()}
    # both worked, on the same transfers, many times over
    assert all(n >= CHECKS_EACH for n in counts.values()), counts
    assert set(checks["alice"]) | set(checks["carol"]) == set(ids)
    shared = set(checks["alice"]) & set(checks["carol"])
    assert len(shared) >= TRANSFERS // 2, (len(shared), counts)
    assert overlaps(checks["alice"], checks["carol"]) == []

    from storage import open_storage
    storage = open_storage(db_url)
    try:
        records = [storage.get_transfer(tid) for tid in ids]
        assert {r.state for r in records} == {"verified"}, {r.state for r in records}
    finally:
        storage.close()
