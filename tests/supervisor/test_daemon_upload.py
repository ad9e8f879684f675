"""The daemon in-process with real AccountActors on the in-process simulated Telegram:
``upload`` over the admin socket -> planned, split, uploaded, recorded; the same content again
is completed by reference; refusals queue nothing."""
from __future__ import annotations

import hashlib
import os

import pytest

from actors.admin.client import call as admin_call
from actors.admin.protocol import AdminCommandError
from actors.daemon import Daemon
from actors.telegram.sim.world import SimWorld, write_session_file
from config import settings_from_dict
from tests.actors.sim_helpers import sim_account_starter, uploaded_queue

MIB = 1024 * 1024


@pytest.fixture
def uploaded(monkeypatch):
    """A queue of transfer ids, put the moment storage marks one uploaded (no polling)."""
    return uploaded_queue(monkeypatch)


def build(tmp_path, db_url, *, users=("alice", "bob"), configured=None):
    """World, settings and a Daemon (not started); sessions only for ``configured`` users."""
    world = SimWorld(tmp_path / "sim")
    users = {n: world.create_user(n.title(), username=n) for n in users}
    channel = world.create_channel("Stash", username="stash_archive",
                                   admins=[u.user_id for u in users.values()])
    for name, user in users.items():
        if configured is None or name in configured:
            write_session_file(tmp_path / "sessions" / f"{name}.session", user.auth_key)
    root = tmp_path / "files"
    root.mkdir()
    settings = settings_from_dict({
        "daemon": {"state_dir": str(tmp_path), "sessions_dir": "sessions"},
        "telegram": {"mode": "simulated"},
        "database": {"url": db_url},
        "metrics": {"enabled": False},
        "supervisor": {"backoff_initial_seconds": 0.0, "backoff_max_seconds": 0.0,
                       "stop_timeout_seconds": 5},
        "upload": {"roots": [str(root)], "destination": "stash_archive", "uploaders": 2, "window": 4},
    }, base_dir=tmp_path, env={})

    # 1 MiB split limit: a 2.5 MiB file is "over the account limit" without uploading GBs
    daemon = Daemon(settings, account_starter=sim_account_starter(world), upload_limit_bytes=MIB,
                    tick_seconds=0.05)
    return daemon, world, users, channel, root, settings


@pytest.fixture
def env(tmp_path, db_url):
    daemon, world, _, channel, root, settings = build(tmp_path, db_url)
    daemon.start()
    yield daemon, world, channel, root, settings.admin.socket
    daemon.stop()
    world.close()


def documents(world, channel):
    return [m for m in world.inspect()["messages"]
            if m["channel_id"] == channel and m["document"] and not m["deleted"]]


def test_upload_splits_uploads_records_and_dedups(env, uploaded):
    daemon, world, channel, root, sock = env
    data = os.urandom(2 * MIB + MIB // 2 + 123)
    (root / "big.bin").write_bytes(data)
    reply = admin_call(sock, "upload", {"paths": [str(root / "big.bin")], "dest": None,
                                        "caption": "nightly", "delete_original": None})
    [t] = reply["transfers"]
    assert set(t) == {"id", "state", "source_path", "size", "destination", "account", "parts_total",
                      "parts_sent", "bytes_done", "duplicate_of", "reason", "created_at", "updated_at"}
    assert (t["state"], t["size"], t["parts_total"], t["destination"]) == ("planned", len(data), 3,
                                                                          "stash_archive")
    assert uploaded.get(timeout=60) == t["id"]

    detail = admin_call(sock, "transfer", {"id": t["id"]})
    assert detail["state"] == "uploaded" and detail["parts_sent"] == 3 and detail["bytes_done"] == len(data)
    parts = detail["parts"]
    assert [p["file_name"] for p in parts] == ["big.bin.001", "big.bin.002", "big.bin.003"]
    assert all(p["message_id"] and p["account"] in ("alice", "bob") for p in parts)
    assert len({p["account"] for p in parts}) == 1          # one transfer, one account
    # the destination holds each part exactly once, and together they are the file
    docs = documents(world, channel)
    assert sorted(d["document"]["file_name"] for d in docs) == ["big.bin.001", "big.bin.002", "big.bin.003"]
    joined = b"".join(world.document_bytes(channel, p["message_id"]) for p in parts)
    assert hashlib.sha256(joined).digest() == hashlib.sha256(data).digest()

    # the same content again: completed by reference, nothing uploaded
    (root / "copy.bin").write_bytes(data)
    [again] = admin_call(sock, "upload", {"paths": [str(root / "copy.bin")]})["transfers"]
    assert again["state"] == "uploaded" and again["duplicate_of"] == t["id"]
    assert len(documents(world, channel)) == 3

    listed = admin_call(sock, "transfers", {"state": "uploaded", "limit": 10})["transfers"]
    assert [x["id"] for x in listed] == [t["id"], again["id"]]
    status = admin_call(sock, "status")
    assert status["transfers"]["uploaded"] == 2 and status["transfers"]["planned"] == 0
    budget = admin_call(sock, "budget")
    assert budget["limit_bytes"] == daemon.settings.upload.budget_bytes and budget["reserved_bytes"] == 0


def test_refused_paths_queue_nothing_and_unknown_transfer(env, tmp_path):
    daemon, world, channel, root, sock = env
    (root / "ok.bin").write_bytes(b"ok")
    (tmp_path / "outside.bin").write_bytes(b"no")
    (root / "link.bin").symlink_to(tmp_path / "outside.bin")
    with pytest.raises(AdminCommandError) as err:
        admin_call(sock, "upload", {"paths": [str(root / "ok.bin"), str(root / "link.bin"),
                                              str(root / "nope.bin")]})
    assert err.value.code == "path_refused"
    assert str(root / "link.bin") in err.value.message and str(root / "nope.bin") in err.value.message
    assert admin_call(sock, "transfers", {})["transfers"] == []
    with pytest.raises(AdminCommandError) as err:
        admin_call(sock, "transfer", {"id": "no-such-id"})
    assert err.value.code == "not_found"


def test_a_transfer_of_an_unconfigured_account_is_continued_with_adoption(tmp_path, db_url, uploaded):
    """zed started a split transfer and sent part 2 without recording it, then zed was removed
    from the config: the daemon hands the transfer over, adopts part 2 by its caption marker
    and uploads only parts 1 and 3."""
    from actors.transfers import TransferPlanner
    from storage import open_storage
    daemon, world, users, channel, root, settings = build(
        tmp_path, db_url, users=("alice", "zed"), configured=("alice",))
    data = os.urandom(2 * MIB + MIB // 2)
    (root / "zed.bin").write_bytes(data)
    storage = open_storage(db_url)
    try:
        [t] = TransferPlanner(storage, settings, limit_bytes=MIB).plan(
            [str(root / "zed.bin")])
        storage.set_transfer_state(t.id, "uploading", account="zed")
        from storage.manifest import read_manifest
        part2 = read_manifest(t.manifest_path).parts[1]
        orphan = world.post_document(channel, users["zed"].user_id, part2.file_name,
                                     data[part2.offset:part2.end], caption=part2.caption)
    finally:
        storage.close()
    daemon.start()
    try:
        assert uploaded.get(timeout=60) == t.id
        parts = admin_call(settings.admin.socket, "transfer", {"id": t.id})["parts"]
        docs = documents(world, channel)
        joined = b"".join(world.document_bytes(channel, p["message_id"]) for p in parts)
    finally:
        daemon.stop()
        world.close()
    assert [p["account"] for p in parts] == ["alice", "zed", "alice"]
    assert parts[1]["message_id"] == orphan
    assert sorted(d["document"]["file_name"] for d in docs) == [
        "zed.bin.001", "zed.bin.002", "zed.bin.003"]           # part 2 was not sent again
    assert joined == data
