"""AdminServer on a real Unix socket with a fake dispatch."""
from __future__ import annotations

import os
import socket
import stat
import struct
import threading

import pytest
from admin_helpers import connect, frames, read_all, request

from actors.admin import server as server_mod
from actors.admin.client import AdminClient, call
from actors.admin.protocol import AdminCommandError, encode_frame
from actors.admin.server import AdminServer, AdminServerError, peer_credentials


def test_every_command_round_trips(server, daemon):
    with AdminClient(server.path, timeout=5) as client:  # several requests, one connection
        status = client.call("status")
        assert status["state"] == "running" and [a["name"] for a in status["accounts"]] == ["alice", "bob"]
        assert client.call("accounts")[1]["premium"] is True
        assert client.call("pause", {"account": "bob"}) == {"account": "bob", "state": "paused"}
        assert client.call("resume", {"account": "bob"}) == {"account": "bob", "state": "ready"}
        assert client.call("shutdown") == "stopping"
    assert [c for c, _ in daemon.calls] == ["status", "accounts", "pause", "resume", "shutdown"]
    assert daemon.calls[2] == ("pause", {"account": "bob"})


def test_reply_carries_the_request_id(server):
    with connect(server.path) as s:
        assert request(s, {"id": "abc", "cmd": "accounts", "args": {}})["id"] == "abc"
        assert request(s, {"id": 77, "cmd": "accounts", "args": {}})["id"] == 77


def test_socket_is_mode_0600_and_umask_is_restored(start_server, sock_path):
    before = os.umask(0o022)
    try:
        start_server()
        assert os.umask(0o022) == 0o022
    finally:
        os.umask(before)
    st = os.stat(sock_path)
    assert stat.S_ISSOCK(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o600


def test_peer_credentials_are_the_kernel_ones():
    a, b = socket.socketpair(socket.AF_UNIX)
    with a, b:
        assert peer_credentials(a) == (os.getpid(), os.getuid(), os.getgid())


def test_peer_of_another_uid_is_refused(start_server, daemon):
    srv = start_server(allowed_uid=os.geteuid() + 1)
    with connect(srv.path) as s:
        s.sendall(encode_frame({"id": 1, "cmd": "status", "args": {}}))
        replies = frames(read_all(s))  # refused, then closed
    assert len(replies) == 1 and replies[0]["ok"] is False
    assert replies[0]["error"]["code"] == "permission_denied"
    assert daemon.calls == []


def test_default_allowed_uid_is_the_servers_euid(monkeypatch, start_server, daemon):
    monkeypatch.setattr(server_mod.os, "geteuid", lambda: 54321)
    srv = start_server()
    monkeypatch.undo()
    with pytest.raises(AdminCommandError) as info:
        call(srv.path, "status", timeout=5)
    assert info.value.code == "permission_denied" and "54321" in info.value.message
    assert daemon.calls == []


def test_bad_request_keeps_the_connection_usable(server):
    with connect(server.path) as s:
        r = request(s, {"id": 1, "cmd": "stats", "args": {}})
        assert r["error"]["code"] == "unknown_command" and "did you mean 'status'" in r["error"]["message"]
        assert r["id"] == 1
        r = request(s, [1, 2, 3])
        assert r == {"id": None, "ok": False, "error": {"code": "bad_request", "message": r["error"]["message"]}}
        r = request(s, {"id": 2, "cmd": "pause", "args": "bob"})
        assert r["error"]["code"] == "bad_request" and r["id"] == 2
        assert request(s, {"id": 3, "cmd": "accounts", "args": {}})["ok"] is True


def test_oversized_frame_gets_an_error_then_close(start_server, daemon):
    srv = start_server(max_frame_bytes=64)
    with connect(srv.path) as s:
        s.sendall(struct.pack(">I", 65))  # only the header: the server must not wait for the body
        replies = frames(read_all(s))
    assert [r["error"]["code"] for r in replies] == ["frame_too_large"]
    with connect(srv.path) as s:
        assert request(s, {"id": 1, "cmd": "accounts", "args": {}})["ok"]


def test_undecodable_frame_gets_an_error_then_close(server):
    with connect(server.path) as s:
        s.sendall(struct.pack(">I", 3) + b"\xc1\xc1\xc1" + encode_frame({"id": 1, "cmd": "status", "args": {}}))
        s.shutdown(socket.SHUT_WR)
        replies = frames(read_all(s))
    assert [r["error"]["code"] for r in replies] == ["bad_frame"]


def test_truncated_frame_is_closed_without_reply(server):
    with connect(server.path) as s:
        s.sendall(struct.pack(">I", 100) + b"\x80")
        s.shutdown(socket.SHUT_WR)
        assert read_all(s) == b""


def test_command_error_and_crash_become_clean_replies(start_server):
    def dispatch(cmd, args):
        if cmd == "pause":
            raise AdminCommandError("no account named 'zed'", code="not_found")
        if cmd == "resume":
            raise ZeroDivisionError("division by zero")
        if cmd == "accounts":
            return {"weird": object()}
        return {"fine": True}

    srv = start_server(dispatch)
    with connect(srv.path) as s:
        r = request(s, {"id": 1, "cmd": "pause", "args": {"account": "zed"}})
        assert r["error"] == {"code": "not_found", "message": "no account named 'zed'"}
        r = request(s, {"id": 2, "cmd": "resume", "args": {}})
        assert r["error"]["code"] == "internal_error" and "ZeroDivisionError" in r["error"]["message"]
        r = request(s, {"id": 3, "cmd": "accounts", "args": {}})
        assert r["id"] == 3 and r["error"]["code"] == "internal_error"
        assert request(s, {"id": 4, "cmd": "status", "args": {}}) == {"id": 4, "ok": True, "result": {"fine": True}}


def test_idle_client_does_not_block_others_and_is_dropped(start_server):
    srv = start_server(read_timeout=0.3)
    idle = connect(srv.path, timeout=10)
    idle.sendall(b"\x00\x00")  # half a header, then silence
    try:
        assert call(srv.path, "accounts", timeout=5)[0]["name"] == "alice"
        assert idle.recv(10) == b""  # server gave up on it after its read deadline
    finally:
        idle.close()


def test_connections_are_bounded(start_server):
    srv = start_server(max_connections=2)
    held = [connect(srv.path), connect(srv.path)]
    try:
        for s in held:  # both are being served
            assert request(s, {"id": 1, "cmd": "accounts", "args": {}})["ok"]
        with connect(srv.path) as third:
            replies = frames(read_all(third))
        assert [r["error"]["code"] for r in replies] == ["busy"]
        assert request(held[0], {"id": 2, "cmd": "accounts", "args": {}})["ok"]
    finally:
        for s in held:
            s.close()


def test_stale_socket_file_is_replaced(start_server, sock_path):
    dead = socket.socket(socket.AF_UNIX)
    dead.bind(str(sock_path))
    dead.close()  # file stays, nobody listens
    srv = start_server()
    assert call(srv.path, "accounts", timeout=5)


def test_refuses_to_start_over_a_live_daemon(start_server, sock_path, daemon):
    first = start_server()
    second = AdminServer(sock_path, daemon.dispatch)
    with pytest.raises(AdminServerError, match="already answering"):
        second.start()
    assert call(first.path, "accounts", timeout=5)  # the first one is untouched


def test_refuses_to_replace_a_regular_file(start_server, sock_path):
    sock_path.write_text("keep me")
    with pytest.raises(AdminServerError, match="not a socket"):
        start_server()
    assert sock_path.read_text() == "keep me"


def test_path_too_long_is_a_clear_error(tmp_path, daemon):
    with pytest.raises(AdminServerError, match="too long"):
        AdminServer(tmp_path / ("x" * 120), daemon.dispatch).start()


def test_stop_closes_connections_and_removes_the_socket(sock_path, daemon):
    srv = AdminServer(sock_path, daemon.dispatch).start()
    client = connect(sock_path, timeout=10)
    assert request(client, {"id": 1, "cmd": "accounts", "args": {}})["ok"]
    srv.stop()
    srv.stop()  # idempotent
    assert client.recv(10) == b""
    client.close()
    assert not sock_path.exists()
    with pytest.raises(OSError):
        connect(sock_path)


def test_stop_leaves_a_newer_daemons_socket_alone(sock_path, daemon, start_server):
    old = AdminServer(sock_path, daemon.dispatch).start()
    os.unlink(sock_path)  # e.g. an operator removed it and a new daemon took the path
    new = start_server()
    old.stop()
    assert sock_path.exists() and call(new.path, "accounts", timeout=5)


def test_shutdown_command_may_stop_the_server_from_its_handler(start_server, daemon):
    srv = start_server()
    stopped = threading.Event()

    def on_shutdown():
        srv.stop()
        stopped.set()

    daemon.on_shutdown = on_shutdown
    assert call(srv.path, "shutdown", timeout=5) == "stopping"  # the reply still arrives
    assert stopped.wait(5)
    assert not srv.path.exists()
