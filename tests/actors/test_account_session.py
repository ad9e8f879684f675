"""Session discovery and the client builder (no network: clients are not connected)."""
from __future__ import annotations

import os
import stat

import pytest
import rsa as pyrsa
from telethon.crypto import rsa as tg_rsa

from config.loader import settings_from_dict
from actors.telegram.client import build_client, open_session
from actors.telegram.session import discover_sessions


def _settings(tmp_path, **telegram):
    data = {
        "daemon": {"state_dir": str(tmp_path)},
        "telegram": {"mode": "real", "api_id": 12345, "api_hash": "0123456789abcdef", **telegram},
        "accounts": [{"session": "carol", "paused": True}, {"session": "alice", "enabled": False}],
    }
    return settings_from_dict(data, base_dir=tmp_path, env={})


def test_discover_sessions_merges_files_and_config_and_fixes_mode(tmp_path):
    settings = _settings(tmp_path)
    sessions = settings.daemon.sessions_dir
    sessions.mkdir(parents=True)
    (sessions / "alice.session").write_bytes(b"")
    (sessions / "bob.session").write_bytes(b"")
    os.chmod(sessions / "alice.session", 0o644)
    os.chmod(sessions / "bob.session", 0o600)
    (sessions / "notes.txt").write_text("x")
    found = {e.name: e for e in discover_sessions(settings)}
    assert sorted(found) == ["alice", "bob", "carol"]
    assert found["alice"].enabled is False and found["alice"].exists
    assert found["carol"].paused and not found["carol"].exists
    assert found["bob"].enabled and not found["bob"].paused
    for name in ("alice", "bob"):
        assert stat.S_IMODE(os.stat(sessions / f"{name}.session").st_mode) == 0o600


def test_real_client_has_no_flood_sleep_and_custom_endpoint(tmp_path):
    settings = _settings(tmp_path, dc_id=2, host="10.0.0.7", port=8443)
    client = build_client(settings, tmp_path / "x.session")
    try:
        assert client.flood_sleep_threshold == 0
        assert (client.session.dc_id, client.session.server_address, client.session.port) == (2, "10.0.0.7", 8443)
    finally:
        client.session.close()


def test_test_servers_flag_uses_test_dc(tmp_path):
    client = build_client(_settings(tmp_path, test_servers=True), tmp_path / "t")
    try:
        assert client.session.server_address == "149.154.167.40"
    finally:
        client.session.close()


def test_rsa_key_file_is_added_to_telethon(tmp_path):
    pub, _ = pyrsa.newkeys(512)
    key_file = tmp_path / "server.pub"
    key_file.write_bytes(pub.save_pkcs1())
    before = set(tg_rsa._server_keys)
    client = build_client(_settings(tmp_path, rsa_key_file=str(key_file)), tmp_path / "r")
    client.session.close()
    added = set(tg_rsa._server_keys) - before
    assert len(added) == 1
    for fp in added:
        del tg_rsa._server_keys[fp]


def test_simulated_mode_builds_the_sim_client(tmp_path):
    settings = settings_from_dict(
        {"daemon": {"state_dir": str(tmp_path)}, "telegram": {"mode": "simulated"}}, base_dir=tmp_path, env={})
    client = build_client(settings, tmp_path / "s.session", transport_factory=lambda: None)
    try:
        assert type(client).__name__ == "SimTelegramClient" and client.flood_sleep_threshold == 0
    finally:
        client.session.close()


def test_open_session_accepts_suffix(tmp_path):
    s = open_session(tmp_path / "a.session")
    s.close()
    assert (tmp_path / "a.session").exists()
    with pytest.raises(ValueError):
        build_client(type("S", (), {"telegram": type("T", (), {"mode": "bogus"})()})(), tmp_path / "b")
