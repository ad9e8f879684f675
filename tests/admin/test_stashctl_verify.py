"""stashctl verify / retry / transfers --state / transfer against a real daemon in-process:
real AccountActors and VerifierActor on the in-process simulated Telegram, real admin socket.

The [verify] schedule is far in the future, so nothing is checked unless stashctl asks.
"""
from __future__ import annotations

import contextlib
import json
import os
import queue

import pytest

from actors.admin import ctl
from actors.admin.client import call as admin_call
from actors.admin.protocol import AdminCommandError
from actors.daemon import Daemon
from actors.telegram.sim.world import SimWorld, write_session_file
from tests.actors.sim_helpers import daemon_settings
from storage.transfers import TransferStore
from tests.actors.sim_helpers import sim_account_starter, uploaded_queue

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def uploaded(monkeypatch):
    """Transfer ids, put the moment storage marks one uploaded (no polling)."""
    return uploaded_queue(monkeypatch)


@pytest.fixture
def passed(monkeypatch):
    """Transfer ids, put the moment storage records a passing check (no polling)."""
    done: queue.Queue = queue.Queue()
    original = TransferStore.record_passes

    def record(self, passes, **kw):
        written = original(self, list(passes), **kw)
        for tid in written:
            done.put(tid)
        return written

    monkeypatch.setattr(TransferStore, "record_passes", record)
    return done


@pytest.fixture
def env(tmp_path, monkeypatch, db_url):
    monkeypatch.delenv("STASHD_SOCKET", raising=False)
    world = SimWorld(tmp_path / "sim")
    alice = world.create_user("Alice", username="alice")
    channel = world.create_channel("Stash", username="stash_archive", admins=[alice.user_id])
    write_session_file(tmp_path / "sessions" / "alice.session", alice.auth_key)
    root = tmp_path / "files"
    root.mkdir()
    settings = daemon_settings(tmp_path, db_url, **{
        "upload": {"roots": [str(root)], "destination": "stash_archive", "uploaders": 1, "window": 4},
        # only stashctl makes anything due; a re-upload is allowed at once
        "verify": {"first_check_delay_seconds": 3600, "interval_seconds": 3600,
                   "verified_interval_seconds": 86400, "backoff_initial_seconds": 0.001,
                   "backoff_max_seconds": 0.001, "max_attempts": 3,
                   "cleanup_grace_seconds": 3600},
    })

    daemon = Daemon(settings, account_starter=sim_account_starter(world), tick_seconds=0.05)
    daemon.start()
    yield daemon, world, channel, root, str(settings.admin.socket)
    daemon.stop()
    world.close()


def stashctl(capsys, sock, *argv):
    rc = ctl.main(["--socket", sock, *argv])
    out, err = capsys.readouterr()
    return rc, out, err


def live_documents(world, channel):
    return {m["id"]: m for m in world.inspect()["messages"]
            if m["channel_id"] == channel and m["document"] and not m["deleted"]}


def upload(sock, uploaded, path) -> str:
    [t] = admin_call(sock, "upload", {"paths": [str(path)]})["transfers"]
    assert uploaded.get(timeout=30) == t["id"]
    return t["id"]


def test_verify_one_transfer_shows_the_check_a_miss_and_the_reupload(env, uploaded, capsys):
    daemon, world, channel, root, sock = env
    (root / "a.bin").write_bytes(os.urandom(300_000))
    tid = upload(sock, uploaded, root / "a.bin")
    first = admin_call(sock, "transfer", {"id": tid})
    assert first["last_check_at"] is None and first["parts"][0]["verified_at"] is None

    rc, out, err = stashctl(capsys, sock, "verify", tid)
    assert rc == 0, out + err
    assert "check: verified" in out or "check: cleaned" in out
    lines = out.splitlines()
    header = lines[lines.index("PARTS") + 1].split()
    assert header == list(ctl.CHECKED_PART_HEADERS)
    assert "last check:" in out and "never" not in out.split("last check:")[1].splitlines()[0]
    assert "attempts:" in out and "misses:" in out

    # the message disappears: the check says so, exits 1, and the part is sent again
    old = first["parts"][0]["message_id"]
    world.delete_messages(channel, [old])
    rc, out, err = stashctl(capsys, sock, "verify", tid)
    assert rc == 1, out + err
    assert "part(s) 0 missing" in out
    assert uploaded.get(timeout=30) == tid                     # re-uploaded from the manifest
    rc, out, err = stashctl(capsys, sock, "verify", tid)
    assert rc == 0, out + err
    rc, out, _ = stashctl(capsys, sock, "transfer", tid, "--json")
    view = json.loads(out)
    [part] = view["parts"]
    assert part["misses"] == 1 and part["verified_at"] is not None
    assert part["message_id"] != old and part["message_id"] in live_documents(world, channel)
    assert view["state"] in ("verified", "cleaned") and view["last_check_at"] >= first["created_at"]
    assert [m["document"]["file_name"] for m in live_documents(world, channel).values()] == ["a.bin"]


def test_verify_without_id_and_all(env, uploaded, passed, capsys):
    daemon, world, channel, root, sock = env
    ids = set()
    for name in ("x.bin", "y.bin"):
        (root / name).write_bytes(os.urandom(1000) + name.encode())
        ids.add(upload(sock, uploaded, root / name))
    rc, out, _ = stashctl(capsys, sock, "verify")            # nothing is due for an hour
    assert rc == 0 and out.startswith("nothing to check")
    rc, out, _ = stashctl(capsys, sock, "verify", "--all", "--json")
    result = json.loads(out)
    assert rc == 0 and result["scheduled"] == 2 and len(result["transfers"]) == 2 and result["all"]
    assert {passed.get(timeout=10), passed.get(timeout=10)} == ids   # checked at once, not in 5 s
    assert {admin_call(sock, "transfer", {"id": t})["state"] for t in ids} == {"verified"}
    assert ctl.main(["--socket", sock, "verify", "x", "--all"]) == 2
    capsys.readouterr()


def test_modified_original_fails_then_retry_after_restoring_it(env, uploaded, capsys):
    daemon, world, channel, root, sock = env
    path = root / "doc.bin"
    data = os.urandom(200_000)
    path.write_bytes(data)
    stamp = path.stat()
    tid = upload(sock, uploaded, path)
    rc, out, err = stashctl(capsys, sock, "retry", tid)
    assert rc == 1 and "not failed" in err and "[bad_state]" in err

    path.write_bytes(b"changed" + data[7:])                    # same size, other content
    os.utime(path, ns=(stamp.st_atime_ns, stamp.st_mtime_ns + 5_000_000_000))
    [msg] = live_documents(world, channel)
    world.delete_messages(channel, [msg])
    rc, out, err = stashctl(capsys, sock, "verify", tid)
    assert rc == 1 and "check: failed" in out
    view = admin_call(sock, "transfer", {"id": tid})
    assert view["state"] == "failed" and view["reason"]
    assert live_documents(world, channel) == {}                # nothing else was uploaded

    rc, out, _ = stashctl(capsys, sock, "transfers", "--state", "failed")
    assert rc == 0 and tid[:12] in out and "failed" in out
    rc, out, err = stashctl(capsys, sock, "transfers", "--state", "faild")
    assert rc == 2 and "did you mean 'failed'" in err
    with pytest.raises(AdminCommandError) as exc:
        admin_call(sock, "transfers", {"state": "lost"})
    assert exc.value.code == "bad_request" and "lost" in exc.value.message
    rc, out, err = stashctl(capsys, sock, "verify", tid)
    assert rc == 1 and "[bad_state]" in err and "stashctl retry" in err

    # the operator puts the original back and retries: uploaded again, then verified
    path.write_bytes(data)
    os.utime(path, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))
    rc, out, err = stashctl(capsys, sock, "retry", tid)
    assert rc == 0, err
    assert out.startswith(f"transfer {tid}: failed -> ") and "it had failed" in out
    assert uploaded.get(timeout=30) == tid
    rc, out, err = stashctl(capsys, sock, "verify", tid)
    assert rc == 0, out + err
    [doc] = live_documents(world, channel).values()
    assert doc["document"]["file_name"] == "doc.bin"
    assert world.document_bytes(channel, doc["id"]) == data


def test_admin_commands_do_not_leak_database_connections(env, db_url):
    """Each admin connection is a thread of its own; its database connection must not outlive it."""
    if not db_url.startswith("postgres"):
        pytest.skip("counted on PostgreSQL (pg_stat_activity)")
    import psycopg2

    def backends() -> int:
        with psycopg2.connect(db_url) as con, con.cursor() as cur:
            cur.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                        "AND pid <> pg_backend_pid()")
            return cur.fetchone()[0]

    daemon, world, channel, root, sock = env
    admin_call(sock, "transfers", {})
    before = backends()
    for _ in range(30):
        admin_call(sock, "transfers", {"state": "failed"})
    assert backends() <= before + 1


def test_unknown_transfer_and_verifier_errors(env, capsys):
    daemon, world, channel, root, sock = env
    for argv in (("verify", "nope"), ("retry", "nope")):
        rc, out, err = stashctl(capsys, sock, *argv)
        assert rc == 1 and "no transfer 'nope'" in err and "[not_found]" in err
    with pytest.raises(AdminCommandError) as exc:
        admin_call(sock, "retry", {})
    assert exc.value.code == "bad_request"


@pytest.fixture
def duplicated(monkeypatch):
    """Transfer ids, put the moment storage completes one by reference (no polling)."""
    done: queue.Queue = queue.Queue()
    original = TransferStore.mark_transfer_duplicate

    def mark(self, transfer_id, duplicate_of, **kw):
        record = original(self, transfer_id, duplicate_of, **kw)
        done.put(transfer_id)
        return record

    monkeypatch.setattr(TransferStore, "mark_transfer_duplicate", mark)
    return done


def test_retry_refuses_a_transfer_left_with_nothing_to_upload_from(env, uploaded, duplicated, capsys):
    """Completed by reference with delete_original, its original and manifest removed at
    cleanup, then the copy it referenced is lost and no other copy holds the content: a retry
    would upload it from nothing. The daemon refuses and changes nothing."""
    daemon, world, channel, root, sock = env
    store = daemon.storage
    data = os.urandom(200_000)
    (root / "a.bin").write_bytes(data)
    first = upload(sock, uploaded, root / "a.bin")
    (root / "b.bin").write_bytes(data)
    [t] = admin_call(sock, "upload", {"paths": [str(root / "b.bin")], "delete_original": True})["transfers"]
    assert duplicated.get(timeout=30) == t["id"]
    tid = t["id"]
    b = store.get_transfer(tid)
    assert b.duplicate_of == first and b.delete_original
    # what its cleanup deletes (the verifier may have cleaned it already: it follows `first`)
    for path in (b.source_path, b.manifest_path):
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)
    store.set_transfer_state(first, "failed", reason="lost after cleanup: message 1 is gone; "
                                                     "nothing left to re-upload from: ...")
    store.set_transfer_state(tid, "failed", reason="the copy it referenced is lost")

    def kept(r):  # what a retry changes (a check still running may reword the reason, no more)
        return (r.state, r.reason is None, r.duplicate_of, r.attempts, r.source_path, r.manifest_path)
    before = kept(store.get_transfer(tid))

    rc, out, err = stashctl(capsys, sock, "retry", tid)
    assert rc == 1, out + err
    assert "[nothing_to_upload]" in err and "content is lost" in err, err
    assert "manifest" in err and str(b.source_path) in err, err
    assert kept(store.get_transfer(tid)) == before            # nothing changed
    with pytest.raises(AdminCommandError) as exc:
        admin_call(sock, "retry", {"id": tid})
    assert exc.value.code == "nothing_to_upload"

    # once a copy holds the content again (the referenced one, retried from its kept
    # original and manifest), the retry follows it
    rc, out, err = stashctl(capsys, sock, "retry", first)
    assert rc == 0, out + err
    rc, out, err = stashctl(capsys, sock, "retry", tid)
    assert rc == 0, out + err
    after = store.get_transfer(tid)   # the verifier may already have followed it further
    assert after.duplicate_of == first and after.state in ("uploaded", "verified", "cleaned"), after
