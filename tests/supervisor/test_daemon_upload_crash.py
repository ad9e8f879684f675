"""A real `stashd run` killed at a fault point mid-upload, restarted on the same state:
the transfer reaches 'uploaded' and the destination holds each part exactly once."""
from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from actors.admin.client import call as admin_call
from actors.telegram.sim.remote import SimControl
from tests.supervisor.test_process import all_ready, env, stashd, stop, wait_for
from tests.supervisor.test_process import write_config as process_config

pytestmark = pytest.mark.slow

MIB = 1024 * 1024


def write_config(state: Path, sim, root: Path) -> Path:
    # the margin leaves regular accounts a 1 MiB limit, so a 2.5 MiB file is split in 3
    return process_config(
        state, sim,
        telegram=f"upload_limit_margin_bytes = {2000 * MIB - MIB}",
        extra=f"""[upload]
roots = ["{root}"]
destination = "stash_archive"
uploaders = 2
""")


@pytest.mark.parametrize("fault", ["after_send_before_record", "after_record", "mid_part_upload@3"])
def test_killed_at_a_fault_point_resumes_without_duplicates(tmp_path, sim, fault):
    root = tmp_path / "files"
    root.mkdir()
    data = os.urandom(2 * MIB + MIB // 2)
    name = f"crash-{fault.split('@')[0]}-{os.getpid()}.bin"
    (root / name).write_bytes(data)
    config = write_config(tmp_path / "state", sim, root)
    sock = tmp_path / "state" / "stashd.sock"
    proc = stashd("run", "--config", str(config), env=env(STASHD_FAULT=fault))
    try:
        wait_for(lambda: all_ready(sock), what="accounts ready")
        [t] = admin_call(sock, "upload", {"paths": [str(root / name)]})["transfers"]
        assert t["parts_total"] == 3
        assert proc.wait(60) == -signal.SIGKILL   # died at the fault point
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()
    proc = stashd("run", "--config", str(config), env=env())
    try:
        wait_for(lambda: all_ready(sock), what="accounts ready after restart")
        done = wait_for(lambda: (lambda x: x if x["state"] == "uploaded" else None)(
            admin_call(sock, "transfer", {"id": t["id"]})), timeout=60, what="transfer uploaded")
        assert stop(proc) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()
    server, _ = sim
    messages = SimControl(server.socket_path).inspect("stash_archive")["messages"]
    ours = [m for m in messages if m.get("document") and m["document"]["file_name"].startswith(name)
            and not m.get("deleted")]
    assert sorted(m["document"]["file_name"] for m in ours) == [f"{name}.001", f"{name}.002", f"{name}.003"]
    assert sorted(m["id"] for m in ours) == sorted(p["message_id"] for p in done["parts"])
    manifests = list((tmp_path / "state" / "manifests").glob("*.stashd-manifest"))
    assert [m.name for m in manifests] == [f"{t['id']}.stashd-manifest"]   # reused, not re-planned
