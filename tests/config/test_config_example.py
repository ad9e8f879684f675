"""config/stashd.example.toml loads, and documents every key of the schema."""
from __future__ import annotations

import re
import tomllib
from pathlib import Path

import config
from config.loader import settings_from_dict
from config.schema import SCHEMA, Section, TableList

EXAMPLE = Path(config.__file__).parent / "stashd.example.toml"
ENV = {"STASHD_API_ID": "12345", "STASHD_API_HASH": "0123456789abcdef0123456789abcdef"}


def test_example_loads_in_real_mode_with_credentials_from_the_environment():
    s = config.load_config(EXAMPLE, env=ENV)
    assert s.telegram.mode == "real"
    assert s.telegram.api_id == 12345
    assert s.daemon.state_dir == Path("/var/lib/stashd")
    assert s.daemon.sessions_dir == Path("/var/lib/stashd/sessions")
    assert s.database.url == "sqlite:////var/lib/stashd/stashd.db"
    assert s.admin.socket == Path("/run/stashd/stashd.sock")


def test_example_without_credentials_fails_only_on_them():
    try:
        config.load_config(EXAMPLE, env={})
    except config.ConfigError as exc:
        assert [e.split(":")[0] for e in exc.errors] == ["telegram.api_id", "telegram.api_hash"]
    else:
        raise AssertionError("real mode without credentials loaded")


def test_example_loads_in_simulated_mode():
    data = tomllib.loads(EXAMPLE.read_text())
    data["telegram"]["mode"] = "simulated"
    s = settings_from_dict(data, EXAMPLE.parent, env={})
    assert s.telegram.mode == "simulated"
    assert s.telegram.sim_socket == Path("/var/lib/stashd/sim/sim.sock")


def test_example_active_values_equal_the_defaults_except_paths():
    """The example shows defaults; only where things live differs."""
    data = tomllib.loads(EXAMPLE.read_text())
    example = settings_from_dict(data, "/base", env=ENV)
    default = settings_from_dict({}, "/base", env=ENV)
    for name in ("metrics", "supervisor"):
        assert getattr(example, name) == getattr(default, name)
    for key in ("log_level", "log_json", "log_file"):
        assert getattr(example.daemon, key) == getattr(default.daemon, key)
    assert example.admin.max_frame_bytes == default.admin.max_frame_bytes
    t, d = example.telegram, default.telegram
    assert (t.dc_id, t.host, t.port, t.test_servers, t.request_timeout_seconds, t.upload_limit_margin_bytes) == \
           (d.dc_id, d.host, d.port, d.test_servers, d.request_timeout_seconds, d.upload_limit_margin_bytes)


def _documented_keys(text: str) -> set[str]:
    """'section.key' for each `key = ...` line (commented out or not) under a
    [section] or [[section]] header (headers may be commented out too)."""
    keys, section = set(), None
    for line in text.splitlines():
        header = re.match(r"^#?\s*\[\[?(\w+)\]\]?\s*$", line)
        if header:
            section = header.group(1)
            continue
        key = re.match(r"^#?\s*(\w+)\s*=", line)
        if key and section:
            keys.add(f"{section}.{key.group(1)}")
    return keys


def test_example_documents_every_key():
    documented = _documented_keys(EXAMPLE.read_text())
    expected = set()
    for name, spec in SCHEMA.items():
        section = spec.section if isinstance(spec, TableList) else spec
        assert isinstance(section, Section)
        expected |= {f"{name}.{key}" for key in section.fields}
    assert expected - documented == set()
    assert documented - expected == set()


def test_every_key_has_a_comment_above_it():
    """Directly above each active key is a comment, or the key belongs to a
    group of keys whose shared comment names it."""
    lines = EXAMPLE.read_text().splitlines()
    for i, line in enumerate(lines):
        key = re.match(r"^(\w+)\s*=", line)
        if not key:
            continue
        j = i - 1
        while re.match(r"^\w+\s*=", lines[j]):
            j -= 1
        comment = []
        while j >= 0 and lines[j].startswith("#"):
            comment.append(lines[j])
            j -= 1
        assert comment, f"undocumented: {line}"
        if j < i - 1 - len(comment):  # shares its comment with the keys above it
            assert key.group(1) in "\n".join(comment), f"comment above does not name {key.group(1)}"
