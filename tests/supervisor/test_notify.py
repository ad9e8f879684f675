from __future__ import annotations

import os
import socket
import uuid

import pytest

from actors.notify import Notifier


@pytest.fixture
def dgram(tmp_path):
    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(5)
    yield path, sock
    sock.close()


def test_messages_reach_a_real_datagram_socket(dgram):
    path, sock = dgram
    n = Notifier({"NOTIFY_SOCKET": str(path)})
    assert n.enabled
    assert n.ready("3 accounts")
    assert sock.recv(4096) == b"READY=1\nSTATUS=3 accounts"
    assert n.watchdog()
    assert sock.recv(4096) == b"WATCHDOG=1"
    assert n.reloading(clock_usec=42)
    assert sock.recv(4096) == b"RELOADING=1\nMONOTONIC_USEC=42"
    assert n.stopping()
    assert sock.recv(4096) == b"STOPPING=1"
    assert n.status("busy")
    assert sock.recv(4096) == b"STATUS=busy"


def test_abstract_socket():
    name = f"stashd-test-{uuid.uuid4().hex}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(b"\0" + name.encode())
    sock.settimeout(5)
    try:
        assert Notifier({"NOTIFY_SOCKET": "@" + name}).ready()
        assert sock.recv(4096) == b"READY=1"
    finally:
        sock.close()


def test_without_notify_socket_everything_is_a_noop():
    n = Notifier({})
    assert not n.enabled
    assert n.ready() is False
    assert n.watchdog_interval is None


def test_missing_socket_does_not_raise(tmp_path):
    assert Notifier({"NOTIFY_SOCKET": str(tmp_path / "absent")}).ready() is False


def test_watchdog_interval_is_half_of_watchdog_usec(dgram):
    path, _ = dgram
    assert Notifier({"NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "10000000"}).watchdog_interval == 5.0
    other_pid = {"NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "10000000", "WATCHDOG_PID": "1"}
    assert os.getpid() == 1 or Notifier(other_pid).watchdog_interval is None
    assert Notifier({"NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "junk"}).watchdog_interval is None
