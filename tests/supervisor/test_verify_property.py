"""Issue 4's invariants as a property, with real `stashd run` processes (SQLite and PostgreSQL):

under a randomised schedule of simulated-Telegram faults, deleted messages and SIGKILLs of the
daemon at its fault points (or at a random moment when the point is not reached),

- no original is deleted before its transfer is verified (a watcher thread sees each original
  disappear and looks the transfer up in the database at that moment: it must be "verified"
  with every part verified -- the Cleaner deletes files first, then marks the transfer
  cleaned -- or already "cleaned");
- after the final restart, every transfer reaches cleaned (policy: delete originals, a short
  grace) or failed, with nothing lost: each part of a cleaned transfer is in the destination
  exactly once under its recorded message id, and a failed one keeps its original and manifest.

Deletions hit transfers on their way to verification (uploaded/verifying) at any moment, a
check running or not (no pass both verifies and cleans a transfer, and the cleanup asks for the
messages again right before it deletes anything), and verified ones between checks. A message
deleted after the cleanup's fresh look is lost by definition, like one deleted after cleanup
(DESIGN "Durability model"): the schedule never deletes a verified transfer's message mid-pass.
"""
from __future__ import annotations

import os
import threading
import time
import uuid
from pathlib import Path

import pytest
from hypothesis import HealthCheck, Phase, event, given, settings
from hypothesis import strategies as st

from actors import faults
from actors.admin.client import call as admin_call
from actors.telegram.sim.remote import SimControl
from tests.supervisor.test_process import all_ready, env, stashd, stop, wait_for
from tests.supervisor.test_verify_reupload import DEST, MIB, live_documents, verify_config

pytestmark = pytest.mark.slow

ROUND_SECONDS = 6.0          # a round ends at its fault point, or is SIGKILLed after this long
DELETE_MARGIN_SECONDS = 0.3
PROPERTY_VERIFY = {"first_check_delay_seconds": 1.0, "interval_seconds": 0.3,
                   "verified_interval_seconds": 3600, "cleanup_grace_seconds": 1.0,
                   "backoff_initial_seconds": 0.1, "backoff_max_seconds": 0.4, "max_attempts": 6,
                   "lease_seconds": 20}

SIM_FAULTS = [
    None,
    {"kind": "error", "request": "GetMessagesRequest", "error": "RPC_CALL_FAIL", "code": 500,
     "fraction": 0.5},
    {"kind": "flood", "request": "GetMessagesRequest", "seconds": 1, "fraction": 0.3},
    {"kind": "drop", "request": "SendMediaRequest", "fraction": 0.3},
    {"kind": "latency", "seconds": 0.05},
]

rounds = st.lists(
    st.fixed_dictionaries({
        "kill_at": st.one_of(st.none(), st.tuples(st.sampled_from(faults.POINTS), st.integers(1, 3))),
        "sim_fault": st.sampled_from(range(len(SIM_FAULTS))),
        "deletes": st.integers(0, 2),
    }),
    min_size=1, max_size=2)


class OriginalWatcher(threading.Thread):
    """Polls the originals; when one is gone, reads its transfer's state at once."""

    def __init__(self, db_url: str, paths: dict[Path, str | None]):
        super().__init__(name="original-watcher", daemon=True)
        from storage import open_storage

        self.storage = open_storage(db_url)
        self.paths = paths             # path -> transfer id (None until known)
        self.gone: dict[Path, str] = {}
        self.violations: list[str] = []
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.wait(0.01):
            for path, tid in list(self.paths.items()):
                if path in self.gone or path.exists():
                    continue
                record = self.storage.get_transfer(tid) if tid else None
                state = record.state if record else None
                parts = self.storage.list_parts(tid) if tid else []
                self.gone[path] = state
                unverified = [p.index for p in parts if p.verified_at is None]
                if state not in ("verified", "cleaned") or not parts or unverified:
                    self.violations.append(f"{path.name} deleted while its transfer {tid} is {state} "
                                           f"(parts not verified: {unverified})")

    def close(self) -> None:
        self.halt.set()
        self.join(5)
        self.storage.close()


def known_transfers(storage, root: Path) -> dict[str, object]:
    """source path -> transfer record, for the files under ``root``."""
    return {r.source_path: r for r in storage.list_transfers(limit=10_000)
            if r.source_path.startswith(str(root))}


def run_schedule(tmp: Path, sim, db_url: str, schedule: list[dict]) -> int:
    """Run one schedule; returns how many messages it deleted."""
    from storage import open_storage

    server, _ = sim
    control = SimControl(server.socket_path)
    root = tmp / "files"
    root.mkdir(parents=True)
    prefix = f"prop-{uuid.uuid4().hex[:8]}"
    sizes = [40_000, 120_000, MIB + MIB // 2, 70_000]        # the third is split in 2 parts
    originals = {}
    for i, size in enumerate(sizes):
        path = root / f"{prefix}-{i}.bin"
        path.write_bytes(os.urandom(size))
        originals[path] = None
    config = verify_config(tmp / "state", sim, root, db_url, delete_original=True, **PROPERTY_VERIFY)
    sock = tmp / "state" / "stashd.sock"
    storage = open_storage(db_url)
    watcher = OriginalWatcher(db_url, originals)
    watcher.start()
    deleted = 0
    try:
        for step in schedule + [{"kill_at": None, "sim_fault": 0, "deletes": 0, "final": True}]:
            final = step.get("final", False)
            fault_env = {} if step["kill_at"] is None else \
                {"STASHD_FAULT": f"{step['kill_at'][0]}@{step['kill_at'][1]}"}
            proc = stashd("run", "--config", str(config), env=env(**fault_env))
            try:
                if not wait_for(lambda: proc.poll() is not None or all_ready(sock), timeout=30,
                                what="daemon ready") or proc.poll() is not None:
                    continue  # died at its fault point before it was ready
                known = known_transfers(storage, root)
                missing = [str(p) for p in originals if str(p) not in known]
                if missing:
                    try:
                        admin_call(sock, "upload", {"paths": missing})
                    except Exception:
                        proc.wait(10)   # killed while planning (after_manifest_write), else raises
                        continue
                for path, r in known_transfers(storage, root).items():
                    originals[Path(path)] = r.id
                spec = SIM_FAULTS[step["sim_fault"]]
                if spec:
                    control.set_fault(**spec)
                deletes = step["deletes"]
                if final:
                    ids = [r.id for r in known_transfers(storage, root).values()]
                    wait_for(lambda: all(storage.get_transfer(t).state in ("cleaned", "failed")
                                         for t in ids), timeout=45, what="every transfer settled")
                    assert stop(proc) == 0
                    break
                deadline = time.monotonic() + ROUND_SECONDS
                while proc.poll() is None and time.monotonic() < deadline:
                    if deletes:
                        done = delete_one_unverified(control, storage, root)
                        deletes -= done
                        deleted += done
                    time.sleep(0.02)
            finally:
                control.clear_faults()
                if proc.poll() is None:
                    proc.kill()          # SIGKILL at a random moment of the round
                proc.communicate()
        check_outcome(sim, storage, root, prefix, originals, watcher)
        return deleted
    finally:
        watcher.close()
        storage.close()


def delete_one_unverified(control: SimControl, storage, root: Path) -> int:
    """Delete a message of a transfer not cleaned yet: uploaded/verifying at any moment (even
    while a check that already saw the message runs), verified only between checks (the window
    after the cleanup's fresh look is the one no verifier can close)."""
    now = time.time()
    for r in known_transfers(storage, root).values():
        between_checks = r.lease_owner is None and r.next_check_at is not None \
            and r.next_check_at > now + DELETE_MARGIN_SECONDS
        if r.state in ("uploaded", "verifying") or (r.state == "verified" and between_checks):
            sent = [p for p in storage.list_parts(r.id) if p.message_id is not None]
            if sent:
                return control.delete(DEST, [sent[0].message_id])
    return 0


def check_outcome(sim, storage, root, prefix, originals, watcher) -> None:
    assert watcher.violations == []
    records = known_transfers(storage, root)
    assert sorted(records) == sorted(str(p) for p in originals)       # one transfer per file
    docs = live_documents(sim, prefix)
    by_name: dict[str, list[int]] = {}
    for m in docs:
        by_name.setdefault(m["document"]["file_name"], []).append(m["id"])
    assert all(len(v) == 1 for v in by_name.values()), f"duplicates: {by_name}"
    for path, r in records.items():
        parts = storage.list_parts(r.id)
        if r.state == "cleaned":
            for p in parts:
                assert by_name.get(p.file_name) == [p.message_id], (r.id, p, by_name.get(p.file_name))
                assert p.verified_at is not None
            assert not Path(path).exists(), f"cleaned, policy delete_original, but {path} is still there"
        else:
            assert r.state == "failed" and r.reason, r
            assert Path(path).exists() and Path(r.manifest_path).exists(), r


@pytest.mark.timeout(150)
def test_no_original_deleted_before_verified_under_faults_and_kills(tmp_path, sim, db_url):
    runs = iter(range(1000))

    @settings(max_examples=3, deadline=None, phases=[Phase.generate], database=None,
              suppress_health_check=list(HealthCheck))
    @given(schedule=rounds)
    def prop(schedule):
        deleted = run_schedule(tmp_path / f"example-{next(runs)}", sim, db_url, schedule)
        event(f"messages deleted: {deleted}")

    prop()
