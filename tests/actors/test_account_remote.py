"""AccountActors with the default client path: the standalone sim server over its socket."""
from __future__ import annotations

import pytest

from config.loader import settings_from_dict
from actors.account import AccountActor
from actors.account_messages import GetAccountInfo, GetDialogs, GetHistory
from actors.telegram.session import discover_sessions
from actors.telegram.sim.remote import SimControl
from actors.telegram.sim.seed import seed_world
from actors.telegram.sim.server import SimServer
from storage.database import open_storage

T = 20


@pytest.fixture
def served(tmp_path):
    sim_dir = tmp_path / "sim"
    sim_dir.mkdir()
    server = SimServer(sim_dir).start_in_thread()
    seed_world(SimControl(server.socket_path), tmp_path / "sessions")
    yield server
    server.stop_thread()


def test_seeded_accounts_over_the_sim_socket(tmp_path, served):
    settings = settings_from_dict(
        {
            "daemon": {"state_dir": str(tmp_path), "sessions_dir": str(tmp_path / "sessions")},
            "telegram": {"mode": "simulated", "sim_socket": str(served.socket_path)},
        },
        base_dir=tmp_path, env={},
    )
    storage = open_storage(f"sqlite:///{tmp_path / 'stashd.db'}")
    try:
        entries = discover_sessions(settings)
        assert {"alice", "bob", "carol"} <= {e.name for e in entries}
        refs = {e.name: AccountActor.start(e.name, e.path, settings, storage) for e in entries}
        infos = {name: ref.ask(GetAccountInfo(), timeout=T) for name, ref in refs.items()}
        assert infos["bob"].premium and not infos["alice"].premium
        assert infos["bob"].upload_limit_bytes > infos["alice"].upload_limit_bytes
        assert all(i.state == "ready" for i in infos.values())
        channels = refs["alice"].ask(GetDialogs(), timeout=T).channels
        dest = next(c for c in channels if c.username == "stash_archive")
        assert dest.is_admin
        for c in channels:
            page = refs["alice"].ask(GetHistory(c.channel_id, limit=100), timeout=T)
            assert [m.id for m in page.messages] == sorted(m.id for m in page.messages)
        for ref in refs.values():
            ref.stop(timeout=T)
    finally:
        storage.close()
