"""SimWorld on its own: bytes in, bytes out, persistence, faults, paging arithmetic."""

from __future__ import annotations

import threading

import pytest
from telethon.extensions import BinaryReader
from telethon.tl import functions, types

from actors.telegram.sim.errors import SimRpcError
from actors.telegram.sim.world import Fault, SimWorld, auth_key_id, write_session_file
from tests.telegram.sim_helpers import Clock, call, peer


@pytest.fixture
def world(tmp_path):
    w = SimWorld(tmp_path / "w", clock=Clock(), seed=1)
    yield w
    w.close()


def history(world, user, channel_id, **kw):
    args = dict(offset_id=0, offset_date=None, add_offset=0, limit=100, max_id=0, min_id=0, hash=0)
    args.update(kw)
    result = call(world, user, functions.messages.GetHistoryRequest(peer(world, user, channel_id), **args))
    return [m.id for m in result.messages]


def test_history_window_follows_offset_id_and_add_offset(world):
    alice = world.create_user("A")
    ch = world.create_channel("c", members=[alice.user_id])
    for i in range(30):
        world.post_text(ch, alice.user_id, str(i))  # ids 2..31 (1 is the service message)
    assert history(world, alice, ch, limit=5) == [31, 30, 29, 28, 27]
    assert history(world, alice, ch, offset_id=10, limit=3) == [9, 8, 7]
    assert history(world, alice, ch, offset_id=10, add_offset=-3, limit=3) == [12, 11, 10]
    assert history(world, alice, ch, offset_id=10, add_offset=-2, limit=5) == [11, 10, 9, 8, 7]
    assert history(world, alice, ch, offset_id=30, add_offset=-10, limit=10) == [31, 30]
    assert history(world, alice, ch, offset_id=5, limit=10, min_id=2) == [4, 3]
    assert history(world, alice, ch, limit=10, max_id=29) == list(range(28, 21, -1))  # filtered after slicing
    assert len(history(world, alice, ch, limit=500)) == 31  # clamped to a 100 page


def test_world_survives_reopening_the_directory(tmp_path):
    clock = Clock()
    first = SimWorld(tmp_path / "w", clock=clock)
    alice = first.create_user("A", username="alice", phone="+15551234567", premium=True)
    ch = first.create_channel("c", username="chan", forum=True, admins=[alice.user_id])
    topic = first.create_topic(ch, "T")
    doc_path = tmp_path / "payload.zip"
    doc_path.write_bytes(b"zipzip" * 1000)
    msg = first.post_document(ch, alice.user_id, "payload.zip", doc_path, caption="c", topic_id=topic)
    rid = functions.messages.SendMessageRequest(peer(first, alice, ch), "once", random_id=99)
    sent = call(first, alice, rid)
    first.set_fault(Fault("latency", seconds=0.25))
    before = first.inspect()
    first.close()

    second = SimWorld(tmp_path / "w", clock=clock)
    try:
        assert second.inspect() == before
        assert second.document_bytes(ch, msg) == b"zipzip" * 1000
        again = call(second, alice, functions.messages.SendMessageRequest(
            peer(second, alice, ch), "once", random_id=99))
        assert again.updates[0].id == sent.updates[0].id
        assert second.delay_for(auth_key_id(alice.auth_key), "GetHistoryRequest", 10) == 0.25
        assert call(second, alice, functions.users.GetUsersRequest([types.InputUserSelf()]))[0].premium
    finally:
        second.close()
    assert "4567" not in str(before["users"]) and before["users"][0]["phone"] != "+15551234567"


def test_unknown_key_and_unsimulated_requests(world):
    world.create_user("A")
    with pytest.raises(SimRpcError) as unknown:
        world.handle_bytes(12345, bytes(functions.updates.GetStateRequest()))
    assert (unknown.value.code, unknown.value.message) == (401, "AUTH_KEY_UNREGISTERED")
    config = functions.InvokeWithLayerRequest(1, functions.InitConnectionRequest(
        1, "d", "s", "a", "en", "", "en", functions.help.GetConfigRequest()))
    raw = world.handle_bytes(12345, bytes(config))  # anonymous keys may fetch the config
    assert config.read_result(BinaryReader(raw)).this_dc == 2
    alice = world.create_user("B")
    with pytest.raises(SimRpcError) as missing:
        call(world, alice, functions.account.GetPasswordRequest())
    assert missing.value.code == 400
    with pytest.raises(SimRpcError):
        world.handle_bytes(auth_key_id(alice.auth_key), b"\x00\x01\x02\x03garbage")


def test_faults_fire_per_account_fraction_and_kind(world):
    alice, bob = world.create_user("A"), world.create_user("B")
    ka, kb = auth_key_id(alice.auth_key), auth_key_id(bob.auth_key)
    world.set_fault(Fault("error", request="GetStateRequest", error="RPC_CALL_FAIL", code=400,
                          account=alice.user_id))
    with pytest.raises(SimRpcError) as err:
        call(world, alice, functions.updates.GetStateRequest())
    assert err.value.message == "RPC_CALL_FAIL"
    assert call(world, bob, functions.updates.GetStateRequest()).pts >= 1
    world.clear_faults()
    world.set_fault(Fault("drop", fraction=0.5))
    drops = [world.should_drop(ka, "GetStateRequest") for _ in range(200)]
    assert 60 < sum(drops) < 140
    world.clear_faults()
    world.set_fault(Fault("bandwidth", bytes_per_second=1000, account=bob.user_id))
    world.set_fault(Fault("latency", seconds=0.5, request="GetFileRequest"))
    assert world.delay_for(kb, "GetFileRequest", 2000) == pytest.approx(2.5)
    assert world.delay_for(ka, "GetFileRequest", 2000) == pytest.approx(0.5)
    assert world.delay_for(ka, "SaveFilePartRequest", 2000) == 0
    with pytest.raises(ValueError):
        Fault("meteor")


def test_handle_bytes_from_many_threads(world):
    users = [world.create_user(f"U{i}") for i in range(4)]
    ch = world.create_channel("c", admins=[u.user_id for u in users])
    errors = []

    def work(user):
        try:
            p = peer(world, user, ch)
            for i in range(25):
                call(world, user, functions.messages.SendMessageRequest(p, f"m{i}", random_id=i + 1))
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(u,)) for u in users]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors
    live = [m for m in world.inspect()["messages"] if m["channel_id"] == ch and not m["service"]]
    assert len(live) == 100 and len({m["id"] for m in live}) == 100


def test_session_file_is_private_and_loadable(tmp_path, world):
    from telethon.sessions import SQLiteSession

    alice = world.create_user("A")
    path = write_session_file(tmp_path / "alice", alice.auth_key, dc_id=2, host="127.0.0.1", port=443)
    assert path.name == "alice.session" and path.stat().st_mode & 0o777 == 0o600
    session = SQLiteSession(str(path))
    assert session.auth_key.key == alice.auth_key and session.dc_id == 2
    session.close()


def test_a_bug_in_a_handler_is_a_clean_400(world, monkeypatch):
    from actors.telegram.sim import handlers

    alice = world.create_user("A")

    def broken(ctx, req):
        raise KeyError("oops")

    monkeypatch.setitem(handlers.HANDLERS, functions.updates.GetStateRequest, broken)
    with pytest.raises(SimRpcError) as info:
        call(world, alice, functions.updates.GetStateRequest())
    assert (info.value.code, info.value.message) == (400, "SIM_INTERNAL_ERROR")
