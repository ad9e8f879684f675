"""stashctl scan / runs and the ingest part of status: arguments and tables."""
from __future__ import annotations

import json

import pytest

from actors.admin import ctl
from actors.admin.protocol import COMMANDS

NOW = 1_800_000_000.0


def test_commands_are_registered():
    assert {"scan", "runs"} <= COMMANDS


def test_arguments():
    assert ctl.command_args(ctl.parse_args(["scan"])) == {}
    assert ctl.command_args(ctl.parse_args(["scan", "@sim_source_a"])) == {"channel": "@sim_source_a"}
    assert ctl.command_args(ctl.parse_args(["runs", "--state", "failed", "--limit", "5"])) == \
        {"state": "failed", "limit": 5}
    with pytest.raises(SystemExit):
        ctl.parse_args(["runs", "--limit", "0"])


def test_runs_table_and_json():
    result = {"runs": [
        {"id": "0f0e0d0c-0000-4000-8000-000000000001", "mapping": "alice:sim_source_a",
         "state": "finished", "started_at": NOW - 90, "seen": 7, "ingested": 5, "skipped": 2,
         "skipped_by_reason": {"duplicate": 1, "incomplete_set": 1}, "bytes_downloaded": 3 * 1024 * 1024,
         "progress": "read up to message 42", "error": None},
        {"id": "0f0e0d0c-0000-4000-8000-000000000002", "mapping": "bob:sim_forum#Games",
         "state": "failed", "started_at": NOW - 30, "seen": 0, "ingested": 0, "skipped": 0,
         "skipped_by_reason": {}, "bytes_downloaded": 0, "progress": None,
         "error": "stalled: GetHistory returned the same 100 message(s) twice"}]}
    text = ctl.render("runs", result, as_json=False, now=NOW)
    lines = text.splitlines()
    assert lines[0].split() == ["ID", "MAPPING", "STATE", "STARTED", "SEEN", "INGESTED", "SKIPPED",
                                "DOWNLOADED", "NOTE"]
    assert "alice:sim_source_a" in lines[1] and "2 (duplicate 1, incomplete_set 1)" in lines[1]
    assert "3 MiB" in lines[1] and "read up to message 42" in lines[1]
    assert "failed" in lines[2] and "stalled: GetHistory" in lines[2]
    assert json.loads(ctl.render("runs", result, as_json=True, now=NOW)) == result
    assert ctl.render("runs", {"runs": []}, as_json=False, now=NOW) == "no runs"


def test_scan_output():
    assert ctl.render("scan", {"started": ["alice:a", "bob:a"]}, as_json=False, now=NOW) == \
        "scanning: alice:a, bob:a"
    assert ctl.render("scan", {"started": []}, as_json=False, now=NOW) == "no mappings to scan"


def test_status_shows_an_ingest_section():
    status = {"version": "1", "pid": 1, "uptime_seconds": 5, "state": "running", "accounts": [],
              "actors": [], "transfers": {},
              "ingest": {"sets": {"waiting": 1, "ingested": 4, "ready": 0},
                         "skipped": {"duplicate": 2}, "index": {"ok": 4, "pending": 0},
                         "running": [{"account": "alice", "mapping": "alice:a", "phase": "downloading",
                                      "cursor": 120, "pages": 2, "set": "pack", "bytes_done": 1024,
                                      "bytes_total": 4096}],
                         "mappings": [{"label": "alice:a", "destination": "stash", "running": True,
                                       "next_scan_at": None, "stalled": False},
                                      {"label": "bob:b", "destination": "stash", "running": False,
                                       "next_scan_at": NOW + 600, "stalled": True}]}}
    text = ctl.render("status", status, as_json=False, now=NOW)
    section = text[text.index("INGEST"):]
    assert "sets:     waiting 1, ingested 4" in section
    assert "skipped:  duplicate 2" in section
    assert "pack 1 KiB/4 KiB" in section
    assert "alice:a" in section and "now" in section
    assert "in 10m00s" in section and "stalled" in section
    assert "ingest:" not in text.split("ACCOUNTS")[0]  # not dumped as JSON in the header
