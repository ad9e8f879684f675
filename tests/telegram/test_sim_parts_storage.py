"""How the simulated server stores uploaded parts: one sparse file per upload,
the document hard-linked from it (512 KiB parts) or gathered (smaller parts),
nothing left behind after sendMedia, expiry, or a rolled-back sendMedia."""

from __future__ import annotations

import hashlib
import os

import pytest
from telethon.tl import functions, types

from actors.telegram.sim.errors import SimRpcError
from actors.telegram.sim.world import SimWorld
from tests.telegram.sim_helpers import Clock, call, peer

KIB = 1024


@pytest.fixture
def env(tmp_path):
    clock = Clock()
    world = SimWorld(tmp_path / "w", clock=clock, seed=3, part_ttl_seconds=600)
    alice = world.create_user("A", username="alice")
    channel = world.create_channel("c", username="chan", admins=[alice.user_id])
    yield world, clock, alice, channel
    world.close()


def upload(world, user, file_id, data, part_size, *, big=True, order=None):
    parts = [data[i:i + part_size] for i in range(0, len(data), part_size)]
    for index in order or range(len(parts)):
        if big:
            request = functions.upload.SaveBigFilePartRequest(file_id, index, len(parts), parts[index])
        else:
            request = functions.upload.SaveFilePartRequest(file_id, index, parts[index])
        assert call(world, user, request) is True
    return len(parts)


def send(world, user, channel, file_id, count, *, big=True, name="f.bin", random_id=1, md5=""):
    input_file = (types.InputFileBig(file_id, count, name) if big
                  else types.InputFile(file_id, count, name, md5))
    media = types.InputMediaUploadedDocument(input_file, "application/octet-stream",
                                             [types.DocumentAttributeFilename(name)])
    updates = call(world, user, functions.messages.SendMediaRequest(
        peer(world, user, channel), media, "", random_id=random_id))
    return next(u.message for u in updates.updates if isinstance(u, types.UpdateNewChannelMessage))


def parts_dir(world):
    return world.state_dir / "parts"


def test_512k_parts_out_of_order_become_the_document_by_link_and_leave_nothing(env):
    world, _clock, alice, channel = env
    data = os.urandom(3 * 512 * KIB + 1000)
    count = upload(world, alice, 11, data, 512 * KIB, order=[3, 1, 0, 2])
    [upload_file] = list(parts_dir(world).iterdir())
    assert upload_file.stat().st_size == len(data)   # parts at i x 512 KiB, end to end
    message = send(world, alice, channel, 11, count)
    assert world.document_bytes(channel, message.id) == data
    assert list(parts_dir(world).iterdir()) == []     # the upload's name is gone, the document stays
    assert message.media.document.size == len(data)


@pytest.mark.parametrize("part_kib", [128, 256])
def test_smaller_parts_are_gathered_into_the_document(env, part_kib):
    world, _clock, alice, channel = env
    data = os.urandom(11 * part_kib * KIB + 77)
    count = upload(world, alice, 12, data, part_kib * KIB, order=list(range(11, -1, -1)))
    message = send(world, alice, channel, 12, count)
    assert world.document_bytes(channel, message.id) == data
    assert list(parts_dir(world).iterdir()) == []


def test_small_file_md5_is_checked_on_the_gathered_bytes(env):
    world, _clock, alice, channel = env
    data = os.urandom(300 * KIB)
    count = upload(world, alice, 13, data, 128 * KIB, big=False)
    with pytest.raises(SimRpcError, match="MD5_CHECKSUM_INVALID"):
        send(world, alice, channel, 13, count, big=False, md5="0" * 32)
    docs = world.state_dir / "docs"
    assert list(docs.iterdir()) == []                # the refused document left no file
    message = send(world, alice, channel, 13, count, big=False, md5=hashlib.md5(data).hexdigest(),
                   random_id=2)                      # the parts are still there
    assert world.document_bytes(channel, message.id) == data


def test_a_rolled_back_send_removes_its_document_file_and_keeps_the_parts(env, monkeypatch):
    world, _clock, alice, channel = env
    data = os.urandom(2 * 512 * KIB)
    count = upload(world, alice, 14, data, 512 * KIB)
    from actors.telegram.sim import handlers_messages

    def broken(*_a, **_k):
        raise RuntimeError("after the document was assembled")

    monkeypatch.setattr(handlers_messages, "_remember", broken)
    with pytest.raises(SimRpcError, match="SIM_INTERNAL_ERROR"):
        send(world, alice, channel, 14, count)
    assert list((world.state_dir / "docs").iterdir()) == []
    monkeypatch.undo()
    message = send(world, alice, channel, 14, count)
    assert world.document_bytes(channel, message.id) == data


def test_expired_parts_are_missing_and_their_file_is_removed(env):
    world, clock, alice, channel = env
    data = os.urandom(2 * 512 * KIB)
    upload(world, alice, 15, data[:512 * KIB], 512 * KIB)     # part 0 of a 1-part view: written early
    clock.now += 601
    call(world, alice, functions.upload.SaveBigFilePartRequest(16, 0, 2, data[:512 * KIB]))
    call(world, alice, functions.upload.SaveBigFilePartRequest(16, 1, 2, data[512 * KIB:]))
    assert world.expire_parts() == 1
    assert len(list(parts_dir(world).iterdir())) == 1         # file 15 had no part left: removed
    with pytest.raises(SimRpcError, match="FILE_PART_0_MISSING"):
        send(world, alice, channel, 15, 1)
    clock.now += 300                                           # file 16's parts: still young enough
    message = send(world, alice, channel, 16, 2)
    assert world.document_bytes(channel, message.id) == data


def test_part_size_rules_still_hold(env):
    world, _clock, alice, channel = env
    call(world, alice, functions.upload.SaveBigFilePartRequest(17, 0, 3, b"x" * 256 * KIB))
    call(world, alice, functions.upload.SaveBigFilePartRequest(17, 1, 3, b"y" * 128 * KIB))
    call(world, alice, functions.upload.SaveBigFilePartRequest(17, 2, 3, b"z" * KIB))
    with pytest.raises(SimRpcError, match="FILE_PART_SIZE_CHANGED"):
        send(world, alice, channel, 17, 3)
    with pytest.raises(SimRpcError, match="FILE_PART_SIZE_INVALID"):
        call(world, alice, functions.upload.SaveBigFilePartRequest(18, 0, 3, b"x" * 1000))


def rows_on_disk(world):
    """The part rows another connection sees: what is committed."""
    import sqlite3

    db = sqlite3.connect(world.state_dir / "world.sqlite3")
    try:
        return {r[0] for r in db.execute("SELECT part FROM parts")}
    finally:
        db.close()


def test_deferred_part_rows_wait_for_a_commit_and_any_transaction_commits_them(env):
    world, _clock, alice, channel = env
    data = os.urandom(2 * 512 * KIB)
    world.defer_part_rows()                                    # this thread: the server's group commit
    upload(world, alice, 19, data, 512 * KIB)
    assert rows_on_disk(world) == set()                        # saved, not yet committed
    assert world.commit_part_rows() == 2 and rows_on_disk(world) == {0, 1}
    upload(world, alice, 20, data, 512 * KIB)
    message = send(world, alice, channel, 20, 2)               # its transaction commits them first
    assert world.document_bytes(channel, message.id) == data


def test_other_threads_still_commit_each_part_at_once(env):
    import threading

    world, _clock, alice, _channel = env
    world.defer_part_rows()
    worker = threading.Thread(target=upload, args=(world, alice, 21, os.urandom(512 * KIB), 512 * KIB))
    worker.start()
    worker.join(30)
    assert rows_on_disk(world) == {0}


def test_closing_the_world_commits_deferred_rows(tmp_path):
    world = SimWorld(tmp_path / "w", clock=Clock(), part_ttl_seconds=600)
    alice = world.create_user("A", username="alice")
    channel = world.create_channel("c", username="chan", admins=[alice.user_id])
    data = os.urandom(512 * KIB + 5)
    world.defer_part_rows()
    count = upload(world, alice, 22, data, 512 * KIB)
    world.close()
    again = SimWorld(tmp_path / "w", clock=Clock(), part_ttl_seconds=600)
    try:
        message = send(again, alice, channel, 22, count)
        assert again.document_bytes(channel, message.id) == data
    finally:
        again.close()


def test_the_part_limit_follows_premium_changes_between_deferred_saves(env):
    world, _clock, alice, _channel = env
    world.defer_part_rows()                        # parts saved outside a transaction: premium cached

    def part_of(total):
        return functions.upload.SaveBigFilePartRequest(23, 0, total, b"x" * KIB)

    with pytest.raises(SimRpcError, match="FILE_PARTS_INVALID"):
        call(world, alice, part_of(4001))
    assert call(world, alice, part_of(4000)) is True
    world.set_premium(alice.user_id, True)
    assert call(world, alice, part_of(4001)) is True
    world.set_premium(alice.user_id, False)
    with pytest.raises(SimRpcError, match="FILE_PARTS_INVALID"):
        call(world, alice, part_of(4001))


def test_deferred_rows_a_failed_commit_could_not_write_are_kept_for_the_next(env):
    import sqlite3

    world, _clock, alice, _channel = env
    world.defer_part_rows()
    upload(world, alice, 24, os.urandom(512 * KIB), 512 * KIB)
    world._state.db.execute("PRAGMA busy_timeout=0")
    other = sqlite3.connect(world.state_dir / "world.sqlite3", isolation_level=None)
    other.execute("BEGIN IMMEDIATE")                           # another writer holds the database
    try:
        with pytest.raises(sqlite3.OperationalError, match="locked"):
            world.commit_part_rows()
    finally:
        other.execute("ROLLBACK")
        other.close()
    assert world.commit_part_rows() == 1 and rows_on_disk(world) == {0}
