from __future__ import annotations

import json

import pytest

import supervisor


def test_version(capsys):
    assert supervisor.main(["--version"]) == 0
    assert capsys.readouterr().out.startswith("stashd ")


def test_no_command_prints_help_and_exits_2(capsys):
    assert supervisor.main([]) == 2
    assert "run" in capsys.readouterr().err


def test_check_config(tmp_path, capsys):
    good = tmp_path / "good.toml"
    good.write_text(f'[daemon]\nstate_dir = "{tmp_path}"\n[telegram]\nmode = "simulated"\n')
    assert supervisor.main(["check-config", "--config", str(good)]) == 0
    bad = tmp_path / "bad.toml"
    bad.write_text("[daemon]\nstate_dri = 1\n[bogus]\n")
    assert supervisor.main(["check-config", "--config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "state_dri" in err and "bogus" in err


def test_run_with_config_errors_starts_nothing(tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text(f'[daemon]\nstate_dir = "{tmp_path}"\nlog_level = "LOUD"\n[admin]\nmax_frame_bytes = -1\n')
    assert supervisor.main(["run", "--config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "log_level" in err and "max_frame_bytes" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.toml"]


def test_sim_is_dispatched_to_the_sim_cli(sim, capsys):
    server, _ = sim
    assert supervisor.main(["sim", "inspect", "--dir", str(server.state_dir)]) == 0
    snapshot = json.loads(capsys.readouterr().out)
    assert any(c.get("username") == "stash_archive" for c in snapshot["channels"])


@pytest.mark.parametrize("argv", [["run", "--help"], ["demo", "--help"], ["login", "--help"]])
def test_subcommand_help(argv, capsys):
    assert supervisor.main(argv) == 0
    assert "usage: stashd" in capsys.readouterr().out
