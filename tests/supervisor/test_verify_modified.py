"""Issue 4, a real `stashd run` on the standalone simulated Telegram (SQLite and PostgreSQL):
an original modified after its upload, whose message then disappears, is not uploaded again --
the transfer fails with the reason and everything is kept."""
from __future__ import annotations

import os
import uuid

import pytest

from actors.admin.client import call as admin_call
from actors.telegram.sim.remote import SimControl
from tests.supervisor.test_process import all_ready, env, stashd, stop, wait_for
from tests.supervisor.test_verify_reupload import DEST, all_in, live_documents, verify_config

pytestmark = pytest.mark.slow


@pytest.mark.timeout(90)
def test_modified_original_fails_with_the_reason_and_nothing_is_uploaded(tmp_path, sim, db_url):
    root = tmp_path / "files"
    root.mkdir()
    prefix = f"mod-{uuid.uuid4().hex[:8]}"
    a, b = root / f"{prefix}-a.bin", root / f"{prefix}-b.bin"
    data = os.urandom(300_000)
    a.write_bytes(data)
    b.write_bytes(os.urandom(100_000))
    # originals are to be deleted once verified, after an hour's grace (so never here)
    config = verify_config(tmp_path / "state", sim, root, db_url, delete_original=True)
    sock = tmp_path / "state" / "stashd.sock"
    server, _ = sim
    proc = stashd("run", "--config", str(config), env=env())
    try:
        wait_for(lambda: all_ready(sock), what="accounts ready")
        ta, tb = (t["id"] for t in admin_call(sock, "upload", {"paths": [str(a), str(b)]})["transfers"])
        views = wait_for(lambda: all_in(sock, [ta, tb], ("verified",)), timeout=30, what="verified")
        [msg] = [p["message_id"] for p in views[ta]["parts"]]

        # same size, other bytes, a later mtime; then the message goes
        a.write_bytes(b"X" * 10 + data[10:])
        st = a.stat()
        os.utime(a, ns=(st.st_atime_ns, st.st_mtime_ns + 3_000_000_000))
        assert SimControl(server.socket_path).delete(DEST, [msg]) == 1
        failed = wait_for(lambda: all_in(sock, [ta], ("failed",)), timeout=30, what="failed")[ta]
        assert failed["reason"].startswith("original changed"), failed["reason"]
        assert failed["parts"][0]["misses"] >= 1

        # the daemon goes on: a new file is uploaded and verified, the failed one stays failed
        c = root / f"{prefix}-c.bin"
        c.write_bytes(os.urandom(50_000))
        [tc] = (t["id"] for t in admin_call(sock, "upload", {"paths": [str(c)]})["transfers"])
        wait_for(lambda: all_in(sock, [tb, tc], ("verified",)), timeout=30, what="b and c verified")
        after = admin_call(sock, "transfer", {"id": ta})
        assert after["state"] == "failed" and after["reason"] == failed["reason"]
        status = admin_call(sock, "status")
        assert status["transfers"]["failed"] >= 1
        assert stop(proc) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()
    names = sorted(m["document"]["file_name"] for m in live_documents(sim, prefix))
    assert names == [b.name, c.name]                      # nothing else was uploaded for a
    # a failed transfer keeps everything: the (changed) original and its manifest
    assert a.exists() and a.read_bytes()[:10] == b"X" * 10
    assert (tmp_path / "state" / "manifests" / f"{ta}.stashd-manifest").exists()

