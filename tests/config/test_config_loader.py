"""Loading files, defaults, paths, environment, checks across fields, display."""
from __future__ import annotations

import io
import os
import tomllib
from pathlib import Path

import pytest

import config
from config import (
    AccountSettings,
    ConfigError,
    Settings,
    check_main,
    format_settings,
    load_config,
    load_or_report,
    settings_from_dict,
)

API_HASH = "0123456789abcdef0123456789abcdef"
SIM = {"telegram": {"mode": "simulated"}}


def write(tmp_path: Path, text: str, name: str = "stashd.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def errors_of(d, base_dir="/base", env=None) -> list[str]:
    with pytest.raises(ConfigError) as exc:
        settings_from_dict(d, base_dir, env={} if env is None else env)
    return exc.value.errors


# -- defaults and paths ----------------------------------------------------


def test_defaults_in_simulated_mode():
    s = settings_from_dict(SIM, "/base", env={})
    assert isinstance(s, Settings)
    assert s.daemon.state_dir == Path("/base")
    assert s.daemon.sessions_dir == Path("/base/sessions")
    assert s.daemon.log_level == "INFO" and s.daemon.log_file is None and s.daemon.log_json is False
    assert s.database.url == "sqlite:////base/stashd.db"
    assert s.admin.socket == Path("/base/stashd.sock")
    assert s.admin.max_frame_bytes == 1_048_576
    assert s.telegram.sim_socket == Path("/base/sim/sim.sock")
    assert (s.telegram.api_id, s.telegram.api_hash) == (1, "sim")
    assert (s.telegram.dc_id, s.telegram.host, s.telegram.port) == (2, "149.154.167.50", 443)
    assert s.telegram.rsa_key_file is None and s.telegram.test_servers is False
    assert s.telegram.request_timeout_seconds == 60.0
    assert s.telegram.upload_limit_margin_bytes == 64 * 1024 * 1024
    assert (s.metrics.enabled, s.metrics.host, s.metrics.port) == (True, "127.0.0.1", 9464)
    sup = s.supervisor
    assert (sup.max_restarts, sup.restart_window_seconds, sup.backoff_initial_seconds,
            sup.backoff_max_seconds, sup.watchdog, sup.stop_timeout_seconds) == (5, 60.0, 0.5, 30.0, True, 20.0)
    assert s.accounts == ()


def test_settings_are_frozen():
    s = settings_from_dict(SIM, "/base", env={})
    with pytest.raises(AttributeError):
        s.metrics.port = 1  # type: ignore[misc]
    hash(s)


def test_state_dir_is_relative_to_the_config_file_and_the_rest_to_state_dir(tmp_path):
    path = write(tmp_path, """
[daemon]
state_dir = "state"
sessions_dir = "s"
log_file = "../logs/stashd.log"
[database]
url = "sqlite:///db/stashd.db"
[telegram]
mode = "simulated"
sim_socket = "/abs/sim.sock"
[admin]
socket = "ctl.sock"
""")
    s = load_config(path, env={})
    state = tmp_path / "state"
    assert s.daemon.state_dir == state
    assert s.daemon.sessions_dir == state / "s"
    assert s.daemon.log_file == tmp_path / "logs" / "stashd.log"  # normalised, no ".."
    assert s.database.url == f"sqlite:///{state / 'db' / 'stashd.db'}"
    assert s.telegram.sim_socket == Path("/abs/sim.sock")
    assert s.admin.socket == state / "ctl.sock"


def test_state_dir_defaults_to_the_config_files_directory(tmp_path, monkeypatch):
    write(tmp_path, '[telegram]\nmode = "simulated"\n')
    monkeypatch.chdir(tmp_path)
    s = load_config("stashd.toml", env={})  # relative config path: made absolute
    assert s.daemon.state_dir == tmp_path
    assert s.database.url == f"sqlite:///{tmp_path / 'stashd.db'}"


def test_home_is_expanded(monkeypatch):
    monkeypatch.setenv("HOME", "/home/me")
    s = settings_from_dict({"daemon": {"state_dir": "~/stash"}, **SIM}, "/base", env={})
    assert s.daemon.state_dir == Path("/home/me/stash")


def test_absolute_sqlite_and_postgres_urls_are_kept():
    s = settings_from_dict({"database": {"url": "sqlite:////data/x.db"}, **SIM}, "/base", env={})
    assert s.database.url == "sqlite:////data/x.db"
    s = settings_from_dict({"database": {"url": "postgres://u:pw@db:5432/stash"}, **SIM}, "/base", env={})
    assert s.database.url == "postgresql://u:pw@db:5432/stash"


def test_metrics_port_zero_is_allowed_but_telegram_port_zero_is_not():
    s = settings_from_dict({"metrics": {"port": 0}, **SIM}, "/base", env={})
    assert s.metrics.port == 0
    assert errors_of({"telegram": {"mode": "simulated", "port": 0}}) == [
        "telegram.port: must be between 1 and 65535, got 0"]


def test_log_level_any_case():
    s = settings_from_dict({"daemon": {"log_level": "debug"}, **SIM}, "/base", env={})
    assert s.daemon.log_level == "DEBUG"


# -- errors -----------------------------------------------------------------


def test_every_error_is_reported_at_once():
    errors = errors_of({
        "databse": {"url": "sqlite:///x.db"},
        "telegram": {"mode": "rael", "api_id": "abc", "api_hsh": "x"},
        "metrics": {"port": 70000, "enabled": "yes"},
        "daemon": {"log_level": "verbose"},
        "supervisor": {"max_restarts": -1},
    })
    assert errors == [
        "databse: unknown key (did you mean 'database'?)",
        "telegram.mode: must be one of 'real', 'simulated', got 'rael' (did you mean 'real'?)",
        "telegram.api_id: expected an integer, got 'abc'",
        "telegram.api_hsh: unknown key (did you mean 'api_hash'?)",
        "metrics.port: must be between 0 and 65535, got 70000",
        "metrics.enabled: expected true or false, got 'yes'",
        "daemon.log_level: must be one of 'TRACE', 'DEBUG', 'INFO', 'SUCCESS', 'WARNING', "
        "'ERROR', 'CRITICAL', got 'verbose'",
        "supervisor.max_restarts: must be >= 0, got -1",
    ]


def test_unknown_key_without_a_close_match_and_misplaced_keys():
    assert errors_of({"zzz": 1, "api_hash": "x", **SIM}) == [
        "zzz: unknown key",
        "api_hash: unknown key (it belongs in [telegram])",
    ]
    assert errors_of({"port": 1, **SIM}) == ["port: unknown key (it belongs in [telegram] or [metrics])"]


def test_real_mode_needs_credentials():
    errors = errors_of({"telegram": {"mode": "real"}})
    assert len(errors) == 2
    assert errors[0].startswith("telegram.api_id: required when telegram.mode is 'real'")
    assert "STASHD_API_ID" in errors[0]
    assert errors[1].startswith("telegram.api_hash: required when telegram.mode is 'real'")
    # the default mode is real
    assert errors_of({}) == errors


def test_bad_mode_does_not_also_complain_about_credentials():
    assert errors_of({"telegram": {"mode": "rael"}}) == [
        "telegram.mode: must be one of 'real', 'simulated', got 'rael' (did you mean 'real'?)"]


def test_bad_api_id_is_not_reported_twice():
    assert errors_of({"telegram": {"api_id": 0, "api_hash": API_HASH}}) == [
        "telegram.api_id: must be >= 1, got 0"]


def test_duplicate_accounts():
    errors = errors_of({**SIM, "accounts": [
        {"session": "alice"}, {"session": "bob"}, {"session": "alice.session", "paused": True}]})
    assert errors == ["accounts[2].session: duplicate session 'alice' (already in accounts[0])"]


def test_unknown_key_inside_accounts():
    assert errors_of({**SIM, "accounts": [{"session": "a", "pasued": True}]}) == [
        "accounts[0].pasued: unknown key (did you mean 'paused'?)"]


def test_rsa_key_file_must_exist(tmp_path):
    errors = errors_of({"telegram": {"mode": "simulated", "rsa_key_file": "keys/tg.pem"}}, tmp_path)
    assert errors == [f"telegram.rsa_key_file: file not found: {tmp_path / 'keys' / 'tg.pem'}"]
    (tmp_path / "keys").mkdir()
    (tmp_path / "keys" / "tg.pem").write_text("-----BEGIN RSA PUBLIC KEY-----\n")
    s = settings_from_dict({"telegram": {"mode": "simulated", "rsa_key_file": "keys/tg.pem"}}, tmp_path, env={})
    assert s.telegram.rsa_key_file == tmp_path / "keys" / "tg.pem"


def test_backoff_initial_must_not_exceed_max():
    assert errors_of({**SIM, "supervisor": {"backoff_initial_seconds": 10, "backoff_max_seconds": 1}}) == [
        "supervisor.backoff_initial_seconds: must not exceed supervisor.backoff_max_seconds (10.0 > 1.0)"]


def test_database_url_errors():
    assert errors_of({**SIM, "database": {"url": "mysql://u:hunter2@h/db"}}) == [
        "database.url: must start with 'sqlite:///' or 'postgresql://', got 'mysql://u:********@h/db'"]


def test_section_that_is_not_a_table():
    assert errors_of({**SIM, "metrics": 5, "accounts": {"session": "x"}}) == [
        "metrics: expected a table ([metrics]), got 5",
        "accounts: expected an array of tables ([[accounts]]), got a table",
    ]


# -- files --------------------------------------------------------------------


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError) as exc:
        load_config(tmp_path / "nope.toml", env={})
    assert exc.value.errors == [f"config file not found: {tmp_path / 'nope.toml'}"]
    assert exc.value.path == tmp_path / "nope.toml"


def test_directory_instead_of_file(tmp_path):
    with pytest.raises(ConfigError) as exc:
        load_config(tmp_path, env={})
    assert "is a directory" in exc.value.errors[0]


def test_toml_syntax_error_has_line_and_column(tmp_path):
    path = write(tmp_path, '[telegram]\nmode = "simulated"\nport = \n')
    with pytest.raises(ConfigError) as exc:
        load_config(path, env={})
    [error] = exc.value.errors
    assert error.startswith("TOML syntax error at line 3, column 8: ")


def test_non_utf8_file(tmp_path):
    path = tmp_path / "stashd.toml"
    path.write_bytes(b'[daemon]\nlog_level = "\xff"\n')
    with pytest.raises(ConfigError) as exc:
        load_config(path, env={})
    assert "UTF-8" in exc.value.errors[0]


def test_load_config_errors_carry_the_path(tmp_path):
    path = write(tmp_path, "databse = 1\n")
    with pytest.raises(ConfigError) as exc:
        load_config(path, env={})
    assert exc.value.path == path
    assert str(path) in str(exc.value)
    assert "databse: unknown key (did you mean 'database'?)" in str(exc.value)


# -- environment ------------------------------------------------------------------


def test_environment_supplies_credentials():
    s = settings_from_dict({}, "/base", env={"STASHD_API_ID": " 12345 ", "STASHD_API_HASH": API_HASH})
    assert s.telegram.mode == "real"
    assert (s.telegram.api_id, s.telegram.api_hash) == (12345, API_HASH)


def test_environment_overrides_the_file():
    d = {"telegram": {"api_id": 1, "api_hash": "fromfile"}}
    s = settings_from_dict(d, "/base", env={"STASHD_API_ID": "777", "STASHD_API_HASH": API_HASH})
    assert (s.telegram.api_id, s.telegram.api_hash) == (777, API_HASH)
    # empty variables are ignored
    s = settings_from_dict(d, "/base", env={"STASHD_API_ID": "", "STASHD_API_HASH": " "})
    assert (s.telegram.api_id, s.telegram.api_hash) == (1, "fromfile")


def test_bad_environment_value_names_the_variable():
    errors = errors_of({}, env={"STASHD_API_ID": "abc", "STASHD_API_HASH": API_HASH})
    assert errors == ["telegram.api_id: expected an integer, got 'abc' (from environment variable STASHD_API_ID)"]


def test_env_defaults_to_os_environ(monkeypatch, tmp_path):
    monkeypatch.setenv("STASHD_API_ID", "4242")
    monkeypatch.setenv("STASHD_API_HASH", API_HASH)
    path = write(tmp_path, "")
    assert load_config(path).telegram.api_id == 4242
    assert settings_from_dict({}, tmp_path).telegram.api_hash == API_HASH


# -- display and masking ------------------------------------------------------------


def real_settings(**database) -> Settings:
    d = {"telegram": {"api_id": 918273, "api_hash": API_HASH}, "database": database} if database else \
        {"telegram": {"api_id": 918273, "api_hash": API_HASH}}
    return settings_from_dict(d, "/base", env={})


def test_format_settings_masks_secrets():
    s = real_settings(url="postgresql://stash:hunter2@db:5432/stash")
    text = format_settings(s)
    assert API_HASH not in text
    assert "918273" not in text
    assert "hunter2" not in text
    assert 'api_hash = "********"' in text
    assert 'api_id = "********"' in text
    assert 'url = "postgresql://stash:********@db:5432/stash"' in text


def test_repr_does_not_leak_secrets():
    s = real_settings(url="postgresql://stash:hunter2@db:5432/stash")
    for text in (repr(s), str(s), repr(s.telegram), repr(s.database)):
        assert API_HASH not in text and "hunter2" not in text and "918273" not in text
    assert "api_hash='********'" in repr(s.telegram)


def test_errors_never_contain_the_api_hash():
    errors = errors_of({"telegram": {"api_hash": 12345678901, "mode": "real", "api_id": 5}})
    assert errors == ["telegram.api_hash: expected a string, got an integer"]


def test_format_settings_is_toml_showing_the_effective_values(tmp_path):
    s = settings_from_dict({**SIM, "metrics": {"port": 0},
                            "accounts": [{"session": "alice", "paused": True}, {"session": "bob"}]},
                           tmp_path, env={})
    shown = tomllib.loads(format_settings(s))
    assert shown["daemon"]["state_dir"] == str(tmp_path)
    assert "log_file" not in shown["daemon"]  # unset values are comments
    assert shown["metrics"]["port"] == 0
    assert shown["supervisor"]["backoff_max_seconds"] == 30.0
    no_quota = {"hourly_files": 0, "hourly_bytes": 0, "daily_files": 0, "daily_bytes": 0}
    assert shown["accounts"] == [{"session": "alice", "enabled": True, "paused": True, **no_quota},
                                 {"session": "bob", "enabled": True, "paused": False, **no_quota}]
    # what is displayed loads back to the same settings (secrets aside)
    shown["telegram"].pop("api_id"), shown["telegram"].pop("api_hash")
    assert settings_from_dict(shown, "/elsewhere", env={}) == s


# -- command line helpers ------------------------------------------------------------


def test_check_main_reports_every_error_prefixed_by_the_file(tmp_path):
    path = write(tmp_path, 'databse = 1\n[telegram]\nmode = "simulated"\nport = "x"\n')
    err = io.StringIO()
    assert check_main(path, env={}, err=err) == 2
    assert err.getvalue().splitlines() == [
        f"{path}: databse: unknown key (did you mean 'database'?)",
        f"{path}: telegram.port: expected an integer, got 'x'",
    ]


def test_check_main_ok_and_show(tmp_path):
    path = write(tmp_path, '[telegram]\nmode = "simulated"\n')
    out, err = io.StringIO(), io.StringIO()
    assert check_main(path, env={}, out=out, err=err) == 0
    assert out.getvalue() == "" and err.getvalue() == ""
    assert check_main(path, env={}, show=True, out=out, err=err) == 0
    assert 'mode = "simulated"' in out.getvalue()


def test_check_main_defaults_to_stderr(tmp_path, capsys):
    assert check_main(tmp_path / "missing.toml", env={}) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "config file not found" in captured.err


def test_load_or_report(tmp_path):
    err = io.StringIO()
    assert load_or_report(tmp_path / "missing.toml", env={}, err=err) is None
    assert "missing.toml" in err.getvalue()
    path = write(tmp_path, '[telegram]\nmode = "simulated"\n')
    assert isinstance(load_or_report(path, env={}, err=err), Settings)


# -- accounts ------------------------------------------------------------------------


def test_account_lookup(tmp_path):
    s = settings_from_dict({**SIM, "accounts": [{"session": "carol", "enabled": False},
                                                {"session": "alice", "paused": True}]},
                           tmp_path, env={})
    assert s.account("alice") == AccountSettings("alice", enabled=True, paused=True)
    assert s.account("bob") == AccountSettings("bob")
    assert s.account("carol").enabled is False


def test_public_names():
    for name in ("load_config", "settings_from_dict", "format_settings", "check_main",
                 "ConfigError", "Settings", "TelegramSettings", "AccountSettings"):
        assert hasattr(config, name)
    assert issubclass(ConfigError, Exception)
    assert os.path.basename(config.__file__) == "__init__.py"


# -- upload ----------------------------------------------------------------------


def test_upload_defaults_and_paths(tmp_path):
    s = settings_from_dict({**SIM, "upload": {"roots": ["files", "/srv/x"], "inbox_dir": "files/in"}},
                           tmp_path, env={})
    assert s.upload.roots == (tmp_path / "files", Path("/srv/x"))
    assert s.upload.inbox_dir == tmp_path / "files" / "in"
    assert s.upload.manifests_dir == tmp_path / "manifests"
    assert (s.upload.uploaders, s.upload.window, s.upload.budget_bytes) == (4, 8, 64 * 1024 * 1024)
    bare = settings_from_dict(SIM, tmp_path, env={})
    assert bare.upload.roots == () and bare.upload.inbox_dir is None


def test_upload_errors_are_all_reported(tmp_path):
    with pytest.raises(ConfigError) as info:
        settings_from_dict({**SIM, "upload": {"roots": ["a", 3], "window": 0, "budget_bytes": 10,
                                              "uploadrs": 2},
                            "accounts": [{"session": "a", "daily_bytes": -1}]}, tmp_path, env={})
    errors = info.value.errors
    assert any(e.startswith("upload.roots: [1]: expected a path") for e in errors)
    assert any(e.startswith("upload.window: must be between 1 and 64") for e in errors)
    assert any(e.startswith("upload.budget_bytes: must be >= 524288") for e in errors)
    assert "upload.uploadrs: unknown key (did you mean 'uploaders'?)" in errors
    assert any(e.startswith("accounts[0].daily_bytes: must be >= 0") for e in errors)


def test_upload_cross_checks(tmp_path):
    with pytest.raises(ConfigError) as info:
        settings_from_dict({**SIM, "upload": {"roots": ["files"], "inbox_dir": "/elsewhere/in",
                                              "window": 16, "global_slots": 8}}, tmp_path, env={})
    assert info.value.errors == [
        "upload.inbox_dir: /elsewhere/in is not under any of upload.roots",
        "upload.window: must not exceed upload.global_slots (16 > 8)",
    ]
