"""A real `stashd run` killed at a fault point mid-upload, restarted on the same state:
the transfer reaches 'uploaded' and the destination holds each part exactly once.

Every fault point runs on SQLite; the ones that cross the database in a different way
(the orphan manifest, the send before its record, a chunk journal) on PostgreSQL too.
"""
from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from actors.admin.client import call as admin_call
from actors.telegram.sim.remote import SimControl
from tests.supervisor.test_process import all_ready, env, stashd, stop, wait_for
from tests.supervisor.test_process import write_config as process_config

pytestmark = [pytest.mark.slow, pytest.mark.timeout(90)]

MIB = 1024 * 1024
FAULTS = ["after_manifest_write", "after_send_before_record", "after_record", "mid_part_upload@3"]
ON_POSTGRES = {"after_manifest_write", "after_send_before_record", "mid_part_upload@3"}
CASES = [pytest.param(f, "sqlite", id=f"{f}-sqlite") for f in FAULTS] + [
    pytest.param(f, "postgres", id=f"{f}-postgres") for f in FAULTS if f in ON_POSTGRES]


def write_config(state: Path, sim, root: Path, db: str | None = None, inbox: Path | None = None) -> Path:
    # the margin leaves regular accounts a 1 MiB limit, so a 2.5 MiB file is split in 3
    database = f'[database]\nurl = "{db}"\n' if db else ""
    inbox_line = f'inbox_dir = "{inbox}"\n' if inbox else ""
    return process_config(
        state, sim,
        telegram=f"upload_limit_margin_bytes = {2000 * MIB - MIB}",
        extra=f"""{database}[upload]
roots = ["{root}"]
destination = "stash_archive"
uploaders = 2
{inbox_line}""")


def database(db: str, tmp_path: Path, request) -> str | None:
    return request.getfixturevalue("pg_url") if db == "postgres" else None


def run_until_killed(config: Path, fault: str, start):
    """Start a daemon with STASHD_FAULT, run ``start(sock)``, expect it SIGKILLed; returns start's value."""
    sock = config.parent / "stashd.sock"
    proc = stashd("run", "--config", str(config), env=env(STASHD_FAULT=fault))
    try:
        wait_for(lambda: all_ready(sock), timeout=40, what="accounts ready")  # a loaded machine
        value = start(sock)
        assert proc.wait(60) == -signal.SIGKILL   # died at the fault point
        return value
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()


def restart_until_uploaded(config: Path, find_id):
    """Restart without a fault; wait until the transfer ``find_id(sock)`` names is uploaded."""
    sock = config.parent / "stashd.sock"
    proc = stashd("run", "--config", str(config), env=env())
    try:
        wait_for(lambda: all_ready(sock), timeout=40, what="accounts ready after restart")
        tid = wait_for(lambda: find_id(sock), timeout=30, what="the transfer after restart")
        done = wait_for(lambda: (lambda x: x if x["state"] == "uploaded" else None)(
            admin_call(sock, "transfer", {"id": tid})), timeout=60, what="transfer uploaded")
        transfers = admin_call(sock, "transfers", {"limit": 100})["transfers"]
        assert stop(proc) == 0
        return done, transfers
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()


def in_channel(sim, name: str) -> list[dict]:
    server, _ = sim
    messages = SimControl(server.socket_path).inspect("stash_archive")["messages"]
    return [m for m in messages if m.get("document") and m["document"]["file_name"].startswith(name)
            and not m.get("deleted")]


def assert_once_and_reused(sim, name, done, state: Path):
    ours = in_channel(sim, name)
    assert sorted(m["document"]["file_name"] for m in ours) == [f"{name}.001", f"{name}.002", f"{name}.003"]
    assert sorted(m["id"] for m in ours) == sorted(p["message_id"] for p in done["parts"])
    manifests = list((state / "manifests").glob("*.stashd-manifest"))
    assert [m.name for m in manifests] == [f"{done['id']}.stashd-manifest"]   # reused, not re-planned


@pytest.mark.parametrize("fault,db", CASES)
def test_killed_at_a_fault_point_resumes_without_duplicates(tmp_path, sim, fault, db, request):
    root = tmp_path / "files"
    root.mkdir()
    name = f"crash-{fault.split('@')[0]}-{db}-{os.getpid()}.bin"
    (root / name).write_bytes(os.urandom(2 * MIB + MIB // 2))
    state = tmp_path / "state"
    config = write_config(state, sim, root, database(db, tmp_path, request))

    def upload(sock):
        if fault == "after_manifest_write":   # the daemon dies inside the request: no reply
            with pytest.raises(Exception):
                admin_call(sock, "upload", {"paths": [str(root / name)]})
            return None
        [t] = admin_call(sock, "upload", {"paths": [str(root / name)]})["transfers"]
        assert t["parts_total"] == 3
        return t["id"]

    tid = run_until_killed(config, fault, upload)
    if tid is None:   # only the manifest exists: the restart queues the transfer with it
        [orphan] = (state / "manifests").glob("*.stashd-manifest")
        tid = orphan.name.split(".")[0]
    done, transfers = restart_until_uploaded(config, lambda sock: tid)
    assert done["id"] == tid
    assert [t["id"] for t in transfers] == [tid]
    assert_once_and_reused(sim, name, done, state)


def test_inbox_file_killed_after_its_manifest_is_uploaded_once(tmp_path, sim):
    """The inbox plans a file, the daemon dies before the row: after the restart the orphan
    manifest is queued before the inbox scans again, so the file is not planned a second time."""
    root = tmp_path / "files"
    inbox = root / "inbox"
    inbox.mkdir(parents=True)
    name = f"inbox-crash-{os.getpid()}.bin"
    state = tmp_path / "state"
    config = write_config(state, sim, root, inbox=inbox)

    def drop(sock):
        (inbox / name).write_bytes(os.urandom(2 * MIB + MIB // 2))
        return None

    run_until_killed(config, "after_manifest_write", drop)
    [orphan] = (state / "manifests").glob("*.stashd-manifest")
    tid = orphan.name.split(".")[0]
    done, transfers = restart_until_uploaded(config, lambda sock: tid)
    assert [t["id"] for t in transfers] == [tid]
    assert_once_and_reused(sim, name, done, state)


def test_killed_before_record_then_continued_by_another_account_adopts_the_orphan(tmp_path, sim):
    """The account that sent part 2 (unrecorded: killed at after_send_before_record) is gone
    after the restart (its session removed): another account takes the transfer over, finds
    part 2 by its caption marker and adopts it instead of sending it a second time."""
    root = tmp_path / "files"
    root.mkdir()
    name = f"handover-{os.getpid()}.bin"
    (root / name).write_bytes(os.urandom(2 * MIB + MIB // 2))
    state = tmp_path / "state"
    config = write_config(state, sim, root)

    def upload(sock):
        [t] = admin_call(sock, "upload", {"paths": [str(root / name)]})["transfers"]
        return t["id"]

    tid = run_until_killed(config, "after_send_before_record@2", upload)
    from storage import open_storage
    storage = open_storage(f"sqlite:///{state / 'stashd.db'}")
    try:
        t = storage.get_transfer(tid)
        assert t.state == "uploading" and [p.message_id is not None for p in storage.list_parts(tid)] == [
            True, False, False]
    finally:
        storage.close()
    (state / "sessions" / f"{t.account}.session").unlink()        # that account is gone
    sent_before = [m["id"] for m in in_channel(sim, name)]
    assert len(sent_before) == 2                                   # part 1 recorded, part 2 not
    done, _ = restart_until_uploaded(config, lambda sock: tid)
    accounts = [p["account"] for p in done["parts"]]
    assert accounts[:2] == [t.account, t.account] and accounts[2] != t.account
    assert sorted(p["message_id"] for p in done["parts"])[:2] == sorted(sent_before)
    assert_once_and_reused(sim, name, done, state)
