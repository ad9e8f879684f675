"""The [ingest] section: defaults, [[ingest.mappings]], every error at once."""
from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from actors.daemon import ingest_enabled, upload_enabled
from config.loader import ConfigError, format_settings, load_config, settings_from_dict

SIM = {"telegram": {"mode": "simulated"}}


def errors_of(d, base="/base"):
    with pytest.raises(ConfigError) as info:
        settings_from_dict({**SIM, **d}, base, env={})
    return info.value.errors


def test_defaults_put_staging_in_the_state_dir_and_map_nothing():
    s = settings_from_dict({**SIM, "daemon": {"state_dir": "/srv/st"}}, "/base", env={})
    assert s.ingest.staging_dir == Path("/srv/st/staging")
    assert s.ingest.mappings == ()
    assert s.ingest.enabled and s.ingest.download_window == 8
    assert not ingest_enabled(s) and not upload_enabled(s)


def test_mappings_from_array_of_tables_take_the_upload_destination(tmp_path):
    (tmp_path / "sessions").mkdir()
    (tmp_path / "sessions" / "bob.session").write_bytes(b"")  # a session file is an account too
    path = tmp_path / "stashd.toml"
    path.write_text("""
[telegram]
mode = "simulated"
[upload]
destination = "stash_archive"
[[accounts]]
session = "alice"
[ingest]
staging_dir = "/tmp/stage"
scan_jitter_seconds = 0
[[ingest.mappings]]
account = "alice"
channel = "@sim_source_a"
tags = ["games", "old"]
[[ingest.mappings]]
account = "bob"
channel = -1001234567
topics = [3, "Music"]
destination = "other_dest"
creator = "forum crew"
""")
    s = load_config(path, env={})
    a, b = s.ingest.mappings
    assert (a.account, a.channel, a.topics, a.destination, a.creator, a.tags) == \
        ("alice", "sim_source_a", (), "stash_archive", None, ("games", "old"))
    assert (b.account, b.channel, b.topics, b.destination, b.creator) == \
        ("bob", "-1001234567", (3, "Music"), "other_dest", "forum crew")
    assert s.ingest.staging_dir == Path("/tmp/stage") and s.ingest.scan_jitter_seconds == 0
    # mappings start the upload pipeline even without upload.roots
    assert s.upload.roots == () and ingest_enabled(s) and upload_enabled(s)
    # disabled: nothing runs
    off = settings_from_dict({**tomllib.loads(path.read_text()), "ingest": {"enabled": False}},
                             tmp_path, env={})
    assert not ingest_enabled(off) and not upload_enabled(off)


def test_every_mapping_error_is_reported_at_once():
    errors = errors_of({
        "accounts": [{"session": "alice"}, {"session": "bob", "enabled": False}],
        "ingest": {"download_window": 0, "mappings": [
            {"account": "alcie", "channel": "sim_source_a"},                # unknown + no destination
            {"account": "bob", "channel": "sim_source_b", "destination": "dest_one"},  # disabled
            {"account": "alice", "channel": "sim_source_a", "destination": "dest_one"},
            {"account": "alice", "channel": "sim_source_a", "destination": "dest_two"},  # duplicate
            {"channel": 5, "topics": [0], "colour": "red"},                 # field errors
            "not a table",
        ]},
    })
    assert errors == [
        "ingest.download_window: must be between 1 and 64, got 0",
        "ingest.mappings[4].channel: a channel id is marked -100..., got 5",
        "ingest.mappings[4].topics: [0]: a topic id is >= 1, got 0",
        "ingest.mappings[4].colour: unknown key",
        "ingest.mappings[4].account: required",
        "ingest.mappings[5]: expected a table, got 'not a table'",
        "ingest.mappings[0].account: unknown account 'alcie' (did you mean 'alice'?): not in "
        "[[accounts]] and no alcie.session in /base/sessions",
        "ingest.mappings[0].destination: no destination (set it here or upload.destination)",
        "ingest.mappings[1].account: account 'bob' is disabled in [[accounts]]",
        "ingest.mappings[3]: duplicate of ingest.mappings[2] (account 'alice', channel 'sim_source_a')",
    ]


def test_same_channel_for_two_accounts_and_two_topic_sets_is_fine():
    s = settings_from_dict({**SIM, "accounts": [{"session": "alice"}, {"session": "bob"}],
                            "upload": {"destination": "stash_archive"},
                            "ingest": {"mappings": [
                                {"account": "alice", "channel": "sim_forum", "topics": [3]},
                                {"account": "alice", "channel": "sim_forum", "topics": [4]},
                                {"account": "bob", "channel": "sim_forum", "topics": [3]},
                            ]}}, "/base", env={})
    assert len(s.ingest.mappings) == 3


def test_displayed_settings_load_back_the_same():
    s = settings_from_dict({**SIM, "accounts": [{"session": "alice"}],
                            "ingest": {"mappings": [{"account": "alice", "channel": "sim_forum",
                                                     "topics": [3, "Music"], "destination": "stash_x",
                                                     "tags": ["a"]}]}}, "/base", env={})
    shown = tomllib.loads(format_settings(s))
    assert shown["ingest"]["mappings"] == [{"account": "alice", "channel": "sim_forum",
                                            "topics": [3, "Music"], "destination": "stash_x",
                                            "tags": ["a"]}]
    shown["telegram"].pop("api_id"), shown["telegram"].pop("api_hash")
    assert settings_from_dict(shown, "/elsewhere", env={}) == s


def test_set_lease_and_retry_keys_are_read_and_checked_together():
    s = settings_from_dict({**SIM, "ingest": {"set_lease_seconds": 90, "max_set_attempts": 3,
                                              "set_backoff_initial_seconds": 5,
                                              "set_backoff_max_seconds": 40}}, "/base", env={})
    assert (s.ingest.set_lease_seconds, s.ingest.max_set_attempts) == (90.0, 3)
    assert (s.ingest.set_backoff_initial_seconds, s.ingest.set_backoff_max_seconds) == (5.0, 40.0)
    d = settings_from_dict(SIM, "/base", env={}).ingest
    assert (d.set_lease_seconds, d.max_set_attempts) == (600.0, 5)
    errors = errors_of({"ingest": {"set_lease_seconds": 1, "max_set_attempts": 0,
                                   "set_backoff_initial_seconds": 100, "set_backoff_max_seconds": 10}})
    text = "\n".join(errors)
    assert "ingest.set_lease_seconds" in text and "ingest.max_set_attempts" in text
    assert "ingest.set_backoff_initial_seconds: must not exceed" in text
