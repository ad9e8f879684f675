"""stashctl main() against a live AdminServer."""
from __future__ import annotations

import json
import os
import socket

import pytest
from admin_helpers import NOW, sample_accounts

from actors.admin import ctl


@pytest.fixture(autouse=True)
def _no_env_socket(monkeypatch):
    monkeypatch.delenv("STASHD_SOCKET", raising=False)


@pytest.fixture
def fixed_now(monkeypatch):
    monkeypatch.setattr(ctl.time, "time", lambda: NOW)


def run(capsys, *argv):
    rc = ctl.main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def test_status_table(server, capsys, fixed_now):
    rc, out, err = run(capsys, "--socket", str(server.path), "status")
    assert rc == 0, err
    lines = out.splitlines()
    assert lines[0].split() == ["version:", "0.1.0"]
    assert "uptime:   1h02m03s" in lines and "state:    running" in lines
    header = next(line for line in lines if line.startswith("NAME"))
    assert header.split() == ["NAME", "STATE", "PREMIUM", "LIMIT", "USER", "PHONE", "COOLDOWN"]
    alice = next(line for line in lines if line.startswith("alice"))
    bob = next(line for line in lines if line.startswith("bob"))
    assert alice.split()[:7] == ["alice", "ready", "no", "1936", "MiB", "1001", "+1555***67"]
    assert "2m05s (SaveBigFilePartRequest)" in alice
    assert bob.split() == ["bob", "paused", "yes", "3936", "MiB", "1002", "+4477***01", "-"]
    # columns are aligned: every row's STATE starts where the header's does
    assert alice.index("ready") == bob.index("paused") == header.index("STATE")
    assert "ACTORS" in out and "account:bob" in out


def test_status_json_is_the_raw_result(server, capsys, daemon):
    rc, out, _ = run(capsys, "--socket", str(server.path), "--json", "status")
    assert rc == 0
    assert json.loads(out) == daemon.dispatch("status", {})


def test_accounts_table_and_json(server, capsys, fixed_now):
    rc, out, _ = run(capsys, "--socket", str(server.path), "accounts")
    assert rc == 0
    assert out.splitlines()[0].split() == list(ctl.ACCOUNT_HEADERS)
    assert len(out.splitlines()) == 3
    rc, out, _ = run(capsys, "--socket", str(server.path), "--json", "accounts")
    assert rc == 0 and json.loads(out) == sample_accounts()


def test_pause_resume_shutdown(server, capsys, daemon):
    assert run(capsys, "--socket", str(server.path), "pause", "bob")[0] == 0
    assert daemon.paused == {"bob"}
    rc, out, _ = run(capsys, "--socket", str(server.path), "resume", "bob")
    assert rc == 0 and "ready" in out and daemon.paused == set()
    rc, out, _ = run(capsys, "--socket", str(server.path), "shutdown")
    assert rc == 0 and out.strip() == "stopping"
    assert daemon.calls[-3:] == [("pause", {"account": "bob"}), ("resume", {"account": "bob"}), ("shutdown", {})]


def test_command_error_exits_1_with_message(server, capsys):
    rc, out, err = run(capsys, "--socket", str(server.path), "pause", "zed")
    assert rc == 1 and out == ""
    assert "no account named 'zed'" in err


def test_refused_peer_exits_1(start_server, capsys):
    srv = start_server(allowed_uid=os.geteuid() + 1)
    rc, _, err = run(capsys, "--socket", str(srv.path), "status")
    assert rc == 1 and "permission_denied" in err


def test_no_daemon_exits_3(tmp_path, capsys):
    missing = tmp_path / "none.sock"
    rc, out, err = run(capsys, "--socket", str(missing), "status")
    assert rc == 3 and out == ""
    assert f"stashd is not running? cannot connect to {missing}" in err


def test_stale_socket_exits_3(tmp_path, capsys):
    path = tmp_path / "stale.sock"
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(path))
    s.close()
    assert run(capsys, "--socket", str(path), "accounts")[0] == 3


@pytest.mark.parametrize("argv", [
    [],
    ["pause"],
    ["frobnicate"],
    ["--socket", "/x", "--config", "/y", "status"],
    ["--timeout", "0", "status"],
    ["status", "extra"],
])
def test_usage_errors_exit_2(argv, capsys):
    assert ctl.main(argv) == 2


def test_unreadable_config_is_a_usage_error(tmp_path, capsys):
    rc, _, err = run(capsys, "--config", str(tmp_path / "nope.toml"), "status")
    assert rc == 2 and "cannot read config" in err
    bad = tmp_path / "bad.toml"
    bad.write_text("[admin\n")
    assert run(capsys, "--config", str(bad), "status")[0] == 2


def test_help_exits_0(capsys):
    assert ctl.main(["--help"]) == 0
    assert "pause" in capsys.readouterr().out


def test_socket_from_environment(server, capsys, monkeypatch):
    monkeypatch.setenv("STASHD_SOCKET", str(server.path))
    assert run(capsys, "accounts")[0] == 0
    # --socket wins over the environment
    assert run(capsys, "--socket", str(server.path) + ".x", "accounts")[0] == 3


def test_socket_from_config(tmp_path, start_server, capsys):
    (tmp_path / "conf").mkdir()
    cfg = tmp_path / "conf" / "stashd.toml"
    cfg.write_text('[daemon]\nstate_dir = "../state"\n\n[admin]\nsocket = "ctl.sock"\n')
    srv = start_server(path=tmp_path / "state" / "ctl.sock")
    assert ctl.socket_from_config(cfg).resolve() == srv.path.resolve()
    rc, out, err = run(capsys, "--config", str(cfg), "accounts")
    assert rc == 0, err
    assert "alice" in out


def test_socket_from_config_defaults(tmp_path):
    cfg = tmp_path / "stashd.toml"
    cfg.write_text('[telegram]\nmode = "real"\n')  # incomplete for the daemon; enough for stashctl
    assert ctl.socket_from_config(cfg).resolve() == (tmp_path / "stashd.sock").resolve()


def test_default_socket(monkeypatch):
    ns = ctl.parse_args(["status"])
    assert ctl.resolve_socket(ns, env={}) == ctl.DEFAULT_SOCKET == ctl.Path("/run/stashd/stashd.sock")


def test_human_formats():
    assert ctl.human_bytes(2000 * 2**20) == "2000 MiB"
    assert ctl.human_bytes(512) == "512 B" and ctl.human_bytes(None) is None
    assert ctl.human_duration(59.9) == "59s" and ctl.human_duration(90061) == "1d01h01m"
    acct = {"cooldown_until": NOW + 10, "flood_waits": {"A": NOW + 5, "B": NOW - 1}}
    assert ctl.cooldown_text(acct, NOW) == "10s (account) +1"
    assert ctl.cooldown_text({"cooldown_until": NOW - 5, "flood_waits": {}}, NOW) is None
    assert ctl.table(["A", "BB"], [["xxx", None]]) == "A    BB\nxxx  -"


def test_global_options_also_after_the_command(server, capsys, daemon):
    rc, out, _ = run(capsys, "status", "--json", "--socket", str(server.path))
    assert rc == 0 and json.loads(out) == daemon.dispatch("status", {})
    # an option given before the command is not reset by the subcommand's defaults
    rc, out, _ = run(capsys, "--json", "--socket", str(server.path), "accounts")
    assert rc == 0 and json.loads(out) == sample_accounts()
    rc, out, _ = run(capsys, "--socket", str(server.path), "pause", "alice", "--json")
    assert rc == 0 and json.loads(out) == {"account": "alice", "state": "paused"}
    assert ctl.main(["--socket", "/x", "status", "--config", "/y"]) == 2
