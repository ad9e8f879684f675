"""A package lost after cleanup is fetched again from its source (actors.ingest.refetch):
the daemon in-process with real AccountActors over the in-process simulated Telegram, the
real upload pipeline, IngestActor and VerifierActor, SQLite and PostgreSQL.

Nothing is checked unless the test asks (``verify`` over the admin socket); the cleanup
grace is 0, so the second check of a transfer cleans it (deleting the staged copy and its
manifest: nothing is left to re-upload from)."""
from __future__ import annotations

import hashlib
import os

import pytest

from actors.admin.client import call as admin_call
from actors.daemon import Daemon
from actors.telegram.sim.world import SimWorld, write_session_file
from tests.actors.sim_helpers import daemon_settings
from tests.actors.sim_helpers import sim_account_starter
from tests.ingest.test_ingest_actor_sim import changes, destination_docs, zip_bytes  # noqa: F401

pytestmark = pytest.mark.timeout(90)


@pytest.fixture
def env(tmp_path, db_url):
    world = SimWorld(tmp_path / "sim")
    alice = world.create_user("Alice", username="alice")
    poster = world.create_user("Poster", username="poster")
    dest = world.create_channel("Stash", username="stash_archive", admins=[alice.user_id])
    src = world.create_channel("A", username="sim_source_a", members=[alice.user_id, poster.user_id])
    other = world.create_channel("B", username="sim_source_b", members=[alice.user_id, poster.user_id])
    write_session_file(tmp_path / "sessions" / "alice.session", alice.auth_key)
    settings = daemon_settings(tmp_path, db_url, **{
        "upload": {"destination": "stash_archive", "uploaders": 1, "window": 4},
        "verify": {"first_check_delay_seconds": 3600, "interval_seconds": 3600,
                   "verified_interval_seconds": 86400, "backoff_initial_seconds": 0.001,
                   "backoff_max_seconds": 0.001, "max_attempts": 3, "cleanup_grace_seconds": 0},
        "ingest": {"scan_interval_seconds": 3600, "scan_jitter_seconds": 0, "download_window": 4,
                   "mappings": [{"account": "alice", "channel": "sim_source_a"},
                                {"account": "alice", "channel": "sim_source_b"}]},
    })
    daemon = Daemon(settings, account_starter=sim_account_starter(world), tick_seconds=0.05)
    yield daemon, world, poster, dest, src, other
    daemon.stop()
    world.close()


def ingested_and_cleaned(daemon, world, poster, src, changes, data: bytes):
    """Post ``data`` as an archive, wait until it is ingested and indexed, then verify and clean
    it: returns (transfer id, source message id)."""
    msg_id = world.post_document(src, poster.user_id, "pack.zip", data)
    daemon.start()
    store = daemon.storage
    changes(lambda: [s.state for s in store.list_archive_sets(limit=10)] == ["ingested"]
            and store.index_states().get("ok") == 1)
    [s] = store.list_archive_sets(limit=10)
    sock = daemon.settings.admin.socket
    admin_call(sock, "verify", {"id": s.transfer_id})
    admin_call(sock, "verify", {"id": s.transfer_id})
    t = store.get_transfer(s.transfer_id)
    assert t.state == "cleaned" and t.delete_original
    assert not os.path.exists(t.source_path)        # staged copy deleted
    assert not os.path.exists(t.manifest_path)      # nothing to re-upload from
    return t.id, msg_id


def refetch_metric(daemon, result):
    return daemon.metrics.registry.get_sample_value("stashd_ingest_refetch_total", {"result": result})


def test_a_lost_ingested_package_is_fetched_again_from_its_source(env, changes):
    daemon, world, poster, dest, src, other = env
    data = zip_bytes(1)
    sha = hashlib.sha256(data).hexdigest()
    tid, _ = ingested_and_cleaned(daemon, world, poster, src, changes, data)
    store = daemon.storage
    [lost] = destination_docs(world, dest)
    world.delete_messages(dest, [lost["id"]])

    admin_call(daemon.settings.admin.socket, "verify", {"id": tid})
    # on_lost requeued the set; the scan it woke fetched it again and queued the lost part
    changes(lambda: store.get_transfer(tid).state in ("uploaded", "verified")
            and store.get_archive_set(store.list_archive_sets(limit=10)[0].set_key).state == "ingested")
    [doc] = destination_docs(world, dest)
    assert doc["id"] != lost["id"]
    assert hashlib.sha256(world.document_bytes(dest, doc["id"])).hexdigest() == sha
    t = store.get_transfer(tid)
    assert t.sha256 == sha and "fetched again" in t.reason
    assert [p.message_id for p in store.list_parts(tid)] == [doc["id"]]
    assert store.find_package(sha).transfer_id == tid           # still the one package
    assert refetch_metric(daemon, "requeued") == 1 and refetch_metric(daemon, "queued") == 1

    # checked and cleaned again like any ingested package
    admin_call(daemon.settings.admin.socket, "verify", {"id": tid})
    admin_call(daemon.settings.admin.socket, "verify", {"id": tid})
    assert store.get_transfer(tid).state == "cleaned"

    # the same bytes posted elsewhere are a duplicate of the restored package: not sent again
    world.post_document(other, poster.user_id, "again.zip", data)
    admin_call(daemon.settings.admin.socket, "scan", {"channel": "sim_source_b"})
    changes(lambda: any(s.base_name == "again" and s.state == "skipped"
                        for s in store.list_archive_sets(limit=10)))
    assert len(destination_docs(world, dest)) == 1


def test_a_lost_package_whose_source_is_gone_too_stays_failed_loudly(env, changes):
    daemon, world, poster, dest, src, other = env
    tid, msg_id = ingested_and_cleaned(daemon, world, poster, src, changes, zip_bytes(2))
    store = daemon.storage
    [lost] = destination_docs(world, dest)
    world.delete_messages(dest, [lost["id"]])
    world.delete_messages(src, [msg_id])
    admin_call(daemon.settings.admin.socket, "verify", {"id": tid})
    [key] = [s.set_key for s in store.list_archive_sets(limit=10)]
    # the metric is counted just after the set's state is written: wait for both
    changes(lambda: store.get_archive_set(key).state == "failed"
            and refetch_metric(daemon, "source_gone") == 1)
    t = store.get_transfer(tid)
    assert t.state == "failed"
    assert t.reason.startswith("lost after cleanup:") and "SOURCE GONE" in t.reason, t.reason
    assert f"source message {msg_id}" in t.reason
    assert "re-fetch of lost transfer" in store.get_archive_set(key).reason
    assert destination_docs(world, dest) == []                  # nothing else was uploaded
    assert refetch_metric(daemon, "source_gone") == 1 and refetch_metric(daemon, "queued") == 0


def reload_mappings(daemon, tmp_path, channels):
    """The config file now maps only ``channels`` (for alice); the daemon reloads it."""
    import dataclasses

    from config.schema import IngestMapping

    ing = daemon.settings.ingest
    new = dataclasses.replace(daemon.settings, ingest=dataclasses.replace(ing, mappings=tuple(
        IngestMapping(account="alice", channel=c, destination="stash_archive") for c in channels)))
    daemon.config_path = tmp_path / "stashd.toml"
    daemon._config_loader = lambda path: new  # noqa: SLF001 - the file's new content
    return daemon.reload()


def test_a_lost_package_whose_mapping_was_removed_fails_clearly_until_retried(env, changes, tmp_path):
    """Nobody scans a channel whose mapping is gone: the requeued set would wait "ready" for
    ever. It ends clearly instead, and once the mapping is back, stashctl retry fetches it."""
    daemon, world, poster, dest, src, other = env
    data = zip_bytes(3)
    sha = hashlib.sha256(data).hexdigest()
    tid, _ = ingested_and_cleaned(daemon, world, poster, src, changes, data)
    store = daemon.storage
    sock = daemon.settings.admin.socket
    [key] = [s.set_key for s in store.list_archive_sets(limit=10)]
    channel_id = store.get_archive_set(key).channel_id
    assert "ingest mapping alice:sim_source_a removed" in reload_mappings(daemon, tmp_path,
                                                                           ["sim_source_b"])
    [lost] = destination_docs(world, dest)
    world.delete_messages(dest, [lost["id"]])

    admin_call(sock, "verify", {"id": tid})
    changes(lambda: store.get_archive_set(key).state == "failed"
            and refetch_metric(daemon, "no_mapping") == 1)
    t = store.get_transfer(tid)
    assert t.state == "failed" and t.reason.startswith("lost after cleanup:"), t.reason
    assert f"no ingest mapping for source channel {channel_id} any more" in t.reason, t.reason
    assert f"stashctl retry {tid}" in t.reason, t.reason
    assert "no ingest mapping" in store.get_archive_set(key).reason
    assert destination_docs(world, dest) == []
    assert refetch_metric(daemon, "queued") == 0

    # a retry while the mapping is still missing ends the same way again
    assert admin_call(sock, "retry", {"id": tid})["refetch"]["sets"] == [key]
    changes(lambda: store.get_archive_set(key).state == "failed"
            and refetch_metric(daemon, "no_mapping") == 2)
    assert "no ingest mapping" in store.get_transfer(tid).reason

    # the mapping comes back; the operator retries: the package is fetched again
    reload_mappings(daemon, tmp_path, ["sim_source_a", "sim_source_b"])
    result = admin_call(sock, "retry", {"id": tid})
    assert result["refetch"]["sets"] == [key] and result["refetch"]["channels"] == [channel_id]
    changes(lambda: store.get_transfer(tid).state in ("uploaded", "verified")
            and store.get_archive_set(key).state == "ingested")
    [doc] = destination_docs(world, dest)
    assert hashlib.sha256(world.document_bytes(dest, doc["id"])).hexdigest() == sha
    assert refetch_metric(daemon, "queued") == 1 and refetch_metric(daemon, "no_mapping") == 2
