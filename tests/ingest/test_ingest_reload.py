"""Reload (SIGHUP / Daemon.reload) applies [ingest] changes: the running IngestActor
gets the new mappings (in-process daemon, real AccountActors over the simulated Telegram)."""
from __future__ import annotations

import dataclasses

import pytest

from actors.admin.client import call as admin_call
from config.schema import IngestMapping
from test_ingest_actor_sim import changes, make_env, zip_bytes  # noqa: F401 - changes is a fixture

pytestmark = pytest.mark.timeout(60)


def test_reload_adds_and_removes_mappings_of_the_running_ingest(tmp_path, changes):  # noqa: F811
    daemon, world, poster, dest, src_a, src_b = make_env(
        tmp_path, f"sqlite:///{tmp_path / 'stashd.db'}",
        [{"account": "alice", "channel": "sim_source_a"}])
    world.post_document(src_a, poster.user_id, "first.zip", zip_bytes(1))
    world.post_document(src_b, poster.user_id, "second.zip", zip_bytes(2))
    try:
        daemon.start()
        store = daemon.storage

        def state(name):
            return {s.base_name: s.state for s in store.list_archive_sets(limit=100)}.get(name)
        changes(lambda: state("first") == "ingested")
        assert state("second") is None  # sim_source_b is not mapped yet

        ing = daemon.settings.ingest
        new = dataclasses.replace(daemon.settings, ingest=dataclasses.replace(
            ing, scan_interval_seconds=1800.0, mappings=(
                IngestMapping(account="alice", channel="sim_source_b", destination="stash_archive"),)))
        daemon.config_path = tmp_path / "stashd.toml"
        daemon._config_loader = lambda path: new  # noqa: SLF001 - the file's new content
        result = daemon.reload()
        assert "ingest mapping alice:sim_source_b added" in result
        assert "ingest mapping alice:sim_source_a removed" in result
        assert daemon.settings.ingest.mappings == new.ingest.mappings

        changes(lambda: state("second") == "ingested")  # the new mapping is scanned at once
        sock = daemon.settings.admin.socket
        status = admin_call(sock, "status")["ingest"]
        assert [m["label"] for m in status["mappings"]] == ["alice:sim_source_b"]
        assert admin_call(sock, "scan", {})["started"] == ["alice:sim_source_b"]
        assert daemon.reload() == []  # the same config again: nothing changes
    finally:
        daemon.stop()
        world.close()
