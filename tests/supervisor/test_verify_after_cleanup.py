"""A message lost after cleanup, against a real daemon in-process (real AccountActors,
UploaderActor, VerifierActor on the in-process simulated Telegram, real admin socket,
SQLite and PostgreSQL): with the original kept (no delete_original) the lost part is sent
again from the kept manifest; with the original away the transfer fails "lost after
cleanup", and ``stashctl retry`` re-uploads it once the original is back as it was.

Nothing is due unless stashctl asks (the [verify] delays are an hour); the cleanup grace
is 0, so the second ``verify`` of a transfer cleans it (never the first: it verifies)."""
from __future__ import annotations

import os

import pytest

from actors.admin import ctl
from actors.admin.client import call as admin_call
from actors.daemon import Daemon
from actors.telegram.sim.world import SimWorld, write_session_file
from tests.actors.sim_helpers import daemon_settings
from tests.actors.sim_helpers import sim_account_starter, uploaded_queue

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def uploaded(monkeypatch):
    return uploaded_queue(monkeypatch)


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
        "upload": {"roots": [str(root)], "destination": "stash_archive", "uploaders": 1,
                   "window": 4, "delete_original": False},
        "verify": {"first_check_delay_seconds": 3600, "interval_seconds": 3600,
                   "verified_interval_seconds": 86400, "backoff_initial_seconds": 0.001,
                   "backoff_max_seconds": 0.001, "max_attempts": 3,
                   "cleanup_grace_seconds": 0},
    })
    daemon = Daemon(settings, account_starter=sim_account_starter(world), tick_seconds=0.05)
    daemon.start()
    yield world, channel, root, str(settings.admin.socket)
    daemon.stop()
    world.close()


def stashctl(capsys, sock, *argv):
    rc = ctl.main(["--socket", sock, *argv])
    out, err = capsys.readouterr()
    return rc, out, err


def live_documents(world, channel):
    return {m["id"]: m for m in world.inspect()["messages"]
            if m["channel_id"] == channel and m["document"] and not m["deleted"]}


def cleaned(sock, uploaded, path) -> dict:
    [t] = admin_call(sock, "upload", {"paths": [str(path)]})["transfers"]
    assert uploaded.get(timeout=30) == t["id"]
    admin_call(sock, "verify", {"id": t["id"]})
    admin_call(sock, "verify", {"id": t["id"]})
    view = admin_call(sock, "transfer", {"id": t["id"]})
    assert view["state"] == "cleaned", view
    return view


def test_a_lost_message_of_a_kept_original_is_sent_again(env, uploaded, capsys):
    world, channel, root, sock = env
    path = root / "keep.bin"
    data = os.urandom(300_000)
    path.write_bytes(data)
    view = cleaned(sock, uploaded, path)
    [old] = live_documents(world, channel)
    world.delete_messages(channel, [old])
    rc, out, err = stashctl(capsys, sock, "verify", view["id"])
    assert rc == 1 and "reuploading" in out, out + err
    assert uploaded.get(timeout=30) == view["id"]
    [doc] = live_documents(world, channel).values()
    assert doc["id"] != old and world.document_bytes(channel, doc["id"]) == data
    assert path.read_bytes() == data


def test_retry_of_a_transfer_lost_after_cleanup_once_the_original_is_back(env, uploaded, capsys,
                                                                             tmp_path):
    world, channel, root, sock = env
    path = root / "doc.bin"
    data = os.urandom(200_000)
    path.write_bytes(data)
    view = cleaned(sock, uploaded, path)
    tid = view["id"]
    away = tmp_path / "away.bin"
    os.rename(path, away)                         # its disk is not there during the check
    [old] = live_documents(world, channel)
    world.delete_messages(channel, [old])
    rc, out, err = stashctl(capsys, sock, "verify", tid)
    assert rc == 1, out + err
    failed = admin_call(sock, "transfer", {"id": tid})
    assert failed["state"] == "failed"
    assert failed["reason"].startswith("lost after cleanup:") and "original gone" in failed["reason"]
    assert live_documents(world, channel) == {}   # nothing else was uploaded in its place

    os.rename(away, path)                         # back as it was (same size, mtime, content)
    rc, out, err = stashctl(capsys, sock, "retry", tid)
    assert rc == 0, out + err
    assert uploaded.get(timeout=30) == tid
    rc, out, err = stashctl(capsys, sock, "verify", tid)
    assert rc == 0, out + err
    [doc] = live_documents(world, channel).values()
    assert world.document_bytes(channel, doc["id"]) == data


def test_retry_rebuilds_a_manifest_an_older_cleanup_removed(env, uploaded, capsys, tmp_path):
    """The case reported: cleaned by a stashd that removed every manifest, the message lost,
    the original kept: 'failed: lost after cleanup', and retry said 'manifest not found'.
    Now the manifest is planned again from the kept original (same split, every part's
    sha256 compared) and the lost part is sent again."""
    world, channel, root, sock = env
    path = root / "old.bin"
    data = os.urandom(250_000)
    path.write_bytes(data)
    view = cleaned(sock, uploaded, path)
    tid = view["id"]
    [manifest] = (tmp_path / "manifests").glob(f"{tid}*")    # kept with the original
    os.unlink(manifest)                           # what the older cleanup did
    away = tmp_path / "away.bin"
    os.rename(path, away)                         # and the original was not there at the check
    [old] = live_documents(world, channel)
    world.delete_messages(channel, [old])
    rc, out, err = stashctl(capsys, sock, "verify", tid)
    assert rc == 1, out + err
    assert admin_call(sock, "transfer", {"id": tid})["state"] == "failed"
    os.rename(away, path)
    rc, out, err = stashctl(capsys, sock, "retry", tid)
    assert rc == 0, out + err
    assert uploaded.get(timeout=30) == tid
    [doc] = live_documents(world, channel).values()
    assert doc["id"] != old and world.document_bytes(channel, doc["id"]) == data
