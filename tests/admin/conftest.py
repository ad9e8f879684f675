"""Fixtures: a FakeDaemon behind a real AdminServer on a Unix socket in tmp_path."""
from __future__ import annotations

import os

import pytest
from admin_helpers import FakeDaemon

from actors.admin.server import AdminServer


@pytest.fixture
def daemon():
    return FakeDaemon()


@pytest.fixture
def sock_path(tmp_path):
    path = tmp_path / "a.sock"
    assert len(os.fsencode(path)) < 100, "tmp path too long for AF_UNIX"
    return path


@pytest.fixture
def start_server(sock_path, daemon):
    servers = []

    def start(dispatch=None, path=None, **kw) -> AdminServer:
        server = AdminServer(path or sock_path, dispatch or daemon.dispatch, **kw)
        servers.append(server)
        return server.start()

    yield start
    for server in servers:
        server.stop()


@pytest.fixture
def server(start_server):
    return start_server(read_timeout=5.0)
