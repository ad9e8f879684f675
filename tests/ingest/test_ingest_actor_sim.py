"""The daemon in-process with [[ingest.mappings]]: real AccountActors (real Telethon over
the in-process simulated Telegram), the real upload pipeline and the IngestActor.
Two accounts read one shared channel: every archive is uploaded exactly once; a forward
and a re-post are skipped as duplicates; runs, status and stashctl scan/runs show it."""
from __future__ import annotations

import hashlib
import io
import os
import threading
import time
import zipfile

import pytest

from actors.admin.client import call as admin_call
from actors.daemon import Daemon
from actors.telegram.sim.world import SimWorld, write_session_file
from config import settings_from_dict
from tests.actors.sim_helpers import daemon_settings
from storage.ingest import IngestStore
from tests.actors.sim_helpers import sim_account_starter

pytestmark = pytest.mark.timeout(90)


def zip_bytes(seed: int, n_files: int = 3, size: int = 150_000) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        for i in range(n_files):
            zf.writestr(f"seed{seed}/file{i}.bin", os.urandom(size))
    return buf.getvalue()


@pytest.fixture
def changes(monkeypatch):
    """A condition notified whenever an archive set changes state (no polling on a timer)."""
    cond = threading.Condition()
    for name in ("mark_set_ingested", "mark_set_skipped", "set_archive_set_state",
                 "record_package_index"):
        original = getattr(IngestStore, name)

        def wrapper(self, *a, _original=original, **kw):
            result = _original(self, *a, **kw)
            with cond:
                cond.notify_all()
            return result
        monkeypatch.setattr(IngestStore, name, wrapper)

    def wait_for(predicate, timeout=60.0):
        deadline = time.monotonic() + timeout
        with cond:
            while not predicate():
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError("timed out waiting for the ingest to settle")
                cond.wait(min(left, 0.5))  # also re-check now and then: a change may land between
    return wait_for


def make_env(tmp_path, db_url, mappings, *, scan_interval=3600.0):
    world = SimWorld(tmp_path / "sim")
    users = {"alice": world.create_user("Alice", username="alice"),
             "bob": world.create_user("Bob", username="bob", premium=True)}
    poster = world.create_user("Poster", username="poster")
    ids = [u.user_id for u in users.values()]
    dest = world.create_channel("Stash", username="stash_archive", admins=ids)
    src_a = world.create_channel("A", username="sim_source_a", members=ids + [poster.user_id])
    src_b = world.create_channel("B", username="sim_source_b", members=ids + [poster.user_id])
    for name, user in users.items():
        write_session_file(tmp_path / "sessions" / f"{name}.session", user.auth_key)
    settings = daemon_settings(tmp_path, db_url, **{
        "upload": {"destination": "stash_archive", "uploaders": 2, "window": 4},
        "ingest": {"scan_interval_seconds": scan_interval, "scan_jitter_seconds": 0,
                   "download_window": 4, "mappings": mappings},
    })

    daemon = Daemon(settings, account_starter=sim_account_starter(world), tick_seconds=0.05)
    return daemon, world, poster, dest, src_a, src_b


def destination_docs(world, dest):
    return [m for m in world.inspect()["messages"]
            if m["channel_id"] == dest and m["document"] and not m["deleted"]]


def final(storage):
    sets = storage.list_archive_sets(limit=1000)
    return bool(sets) and all(s.state in ("ingested", "skipped", "failed") for s in sets)


def test_two_accounts_one_channel_each_archive_uploaded_once(tmp_path, db_url, changes):
    mappings = [{"account": "alice", "channel": "sim_source_a", "tags": ["games"]},
                {"account": "bob", "channel": "sim_source_a", "tags": ["games"]},
                {"account": "alice", "channel": "sim_source_b", "creator": "b crew"}]
    daemon, world, poster, dest, src_a, src_b = make_env(tmp_path, db_url, mappings)
    archives = [zip_bytes(i) for i in range(4)]
    for i, data in enumerate(archives):
        world.post_document(src_a, poster.user_id, f"pack{i}.zip", data)
    world.post_document(src_a, poster.user_id, "readme.txt", b"not an archive")
    world.post_document(src_b, poster.user_id, "again.zip", archives[0])  # same bytes, new document
    try:
        daemon.start()
        changes(lambda: final(daemon.storage) and len(daemon.storage.list_archive_sets(limit=100)) == 5)
        changes(lambda: daemon.storage.index_states().get("pending", 0) == 0)
        store = daemon.storage
        docs = destination_docs(world, dest)
        sent = sorted(hashlib.sha256(world.document_bytes(dest, m["id"])).hexdigest() for m in docs)
        assert sent == sorted(hashlib.sha256(a).hexdigest() for a in archives)  # each once
        states = {s.base_name: (s.state, s.reason) for s in store.list_archive_sets(limit=100)}
        assert states == {**{f"pack{i}": ("ingested", None) for i in range(4)},
                          "again": ("skipped", "duplicate")}
        assert store.skips_by_reason() == {"duplicate": 1}
        assert store.index_states()["ok"] == 4
        meta = store.get_package_meta(hashlib.sha256(archives[1]).hexdigest())
        assert meta.tags == ("games",) and meta.archive_format == "zip"
        # runs: one per mapping, finished, counters add up to what happened
        runs = store.list_runs(limit=20)
        assert {r.mapping for r in runs} == {"alice:sim_source_a", "bob:sim_source_a",
                                            "alice:sim_source_b"}
        assert all(r.state == "finished" for r in runs)
        assert sum(r.seen for r in runs) == 5
        assert sum(r.ingested for r in runs) == 4     # queued for upload, by whichever account won
        # metrics: archives seen, ingested, skipped by reason, bytes downloaded, scan lag
        reg = daemon.metrics.registry
        seen = sum(reg.get_sample_value("stashd_ingest_archives_seen_total", {"account": a}) or 0
                   for a in ("alice", "bob"))
        assert seen == 5
        assert reg.get_sample_value("stashd_ingest_archives_ingested_total") == 4
        assert reg.get_sample_value("stashd_ingest_skipped_total", {"reason": "duplicate"}) == 1
        downloaded = sum(reg.get_sample_value("stashd_ingest_download_bytes_total", {"account": a}) or 0
                         for a in ("alice", "bob"))
        assert downloaded == sum(len(a) for a in archives) + len(archives[0])  # the re-post too
        for r in runs:
            assert reg.get_sample_value("stashd_ingest_scan_lag_seconds", {"mapping": r.mapping}) >= 0
            assert reg.get_sample_value("stashd_ingest_scan_stalled", {"mapping": r.mapping}) == 0
        # the admin socket: status shows ingest, runs lists them, scan starts one
        sock = daemon.settings.admin.socket
        status = admin_call(sock, "status")
        assert status["ingest"]["sets"]["ingested"] == 4
        assert {m["label"] for m in status["ingest"]["mappings"]} == {r.mapping for r in runs}
        assert len(admin_call(sock, "runs", {})["runs"]) == len(runs)
        new = zip_bytes(9)
        world.post_document(src_b, poster.user_id, "late.zip", new)
        assert admin_call(sock, "scan", {"channel": "sim_source_b"})["started"] == ["alice:sim_source_b"]
        changes(lambda: any(s.base_name == "late" and s.state == "ingested"
                            for s in store.list_archive_sets(limit=100)))
        assert len(destination_docs(world, dest)) == 5
        with pytest.raises(Exception) as info:
            admin_call(sock, "scan", {"channel": "elsewhere"})
        assert "no mapping reads" in str(info.value)
    finally:
        daemon.stop()
        world.close()


def test_the_seeded_catalogue_every_naming_scheme(tmp_path, changes):
    """The demo world (actors/telegram/sim/seed.py): every naming scheme, a forward, a
    re-upload, encrypted and corrupt archives, an incomplete set; three accounts."""
    from actors.telegram.sim import samples
    from actors.telegram.sim.seed import seed_world

    world = SimWorld(tmp_path / "sim")
    seeded = seed_world(world, tmp_path / "sessions", size_scale=0.5)
    chans = seeded["channels"]
    by_username = {"sim_source_a": chans["source_a"], "sim_source_b": chans["source_b"],
                   "sim_forum": chans["forum"]}
    mappings = [{"account": "alice", "channel": "sim_source_a"},
                {"account": "bob", "channel": "sim_source_a"},
                {"account": "bob", "channel": "sim_source_b"},
                {"account": "carol", "channel": "sim_source_b", "creator": "b crew"},
                {"account": "alice", "channel": "sim_forum", "topics": ["Games"], "tags": ["games"]},
                {"account": "carol", "channel": "sim_forum", "topics": ["Software", "Games"]}]
    settings = settings_from_dict({
        "daemon": {"state_dir": str(tmp_path), "sessions_dir": "sessions"},
        "telegram": {"mode": "simulated"}, "metrics": {"enabled": False},
        "supervisor": {"backoff_initial_seconds": 0.0, "backoff_max_seconds": 0.0,
                       "stop_timeout_seconds": 5},
        "upload": {"destination": "stash_archive", "uploaders": 2, "window": 4},
        "ingest": {"scan_interval_seconds": 3600, "scan_jitter_seconds": 0, "mappings": mappings},
    }, base_dir=tmp_path, env={})

    daemon = Daemon(settings, account_starter=sim_account_starter(world), tick_seconds=0.05)
    expected = samples.expected_sets(0.5)
    try:
        daemon.start()
        store = daemon.storage

        def settled():
            sets = store.list_archive_sets(limit=100)
            return len(sets) == len(expected) and all(
                s.state in ("ingested", "skipped", "failed") or (s.state == "waiting" and s.reason is None
                                                                  and s.base_name == "partial-set")
                for s in sets) and store.index_states().get("pending", 0) == 0
        changes(settled)
        sets = {(s.channel_id, s.base_name): s for s in store.list_archive_sets(limit=100)}
        dest = chans["destination"]
        winners = {}  # sha256 -> the set that was ingested (which copy wins is a race)
        for x in expected:
            s = sets[(by_username[x.channel], x.name)]
            if s.state == "ingested":
                assert x.sha256 not in winners, f"{x.name} ingested twice"
                winners[x.sha256] = s
        assert set(winners) == {x.sha256 for x in expected if x.expect == "ingest"}
        for x in expected:
            s = sets[(by_username[x.channel], x.name)]
            if x.expect == "ingest" or x.reason == "duplicate":
                if winners[x.sha256] is not s:
                    assert (s.state, s.reason) == ("skipped", "duplicate"), (x.name, s)
                    assert s.transfer_id == winners[x.sha256].transfer_id
                    continue
                assert s.sha256 == x.sha256
                parts = store.list_parts(s.transfer_id)
                content = b"".join(world.document_bytes(dest, p.message_id) for p in parts)
                assert hashlib.sha256(content).hexdigest() == x.sha256
                meta = store.get_package_meta(x.sha256)
                want = {"encrypted": "encrypted", "corrupt": "corrupt"}.get(x.reason, "ok")
                assert meta.index_state == want, (x.name, meta.index_state, meta.index_reason)
            else:
                assert x.reason == "incomplete_set" and s.state == "waiting"
                assert store.skips_by_reason(channel_id=s.channel_id).get("incomplete_set", 0) == 2
        # exactly one destination document per part of each ingested set: nothing twice
        docs = destination_docs(world, dest)
        assert len(docs) == sum(len(store.list_parts(w.transfer_id)) for w in winners.values())
        shas = [hashlib.sha256(world.document_bytes(dest, m["id"])).hexdigest() for m in docs]
        assert len(shas) == len(set(shas))
    finally:
        daemon.stop()
        world.close()
