from __future__ import annotations

import pytest

from actors.demo import SimServerProcess
from actors.telegram.sim.remote import SimControl


@pytest.fixture(scope="session")
def sim(tmp_path_factory):
    """A standalone simulated Telegram server process, seeded; (server, seeded sessions dir)."""
    base = tmp_path_factory.mktemp("sim")
    server = SimServerProcess(base / "sim", base / "sim" / "sim.sock").start()
    SimControl(server.socket_path).seed(base / "seeded-sessions")
    yield server, base / "seeded-sessions"
    server.stop()
