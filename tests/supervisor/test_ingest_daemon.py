"""A real `stashd run` ingesting the seeded source channels (SQLite and PostgreSQL).

Two accounts read Source A, two read Source B, one reads the forum's topics.
Every archive of every naming scheme lands in the destination exactly once
(counted by sha256 on the simulated server); the forward (same document id),
the re-upload (same bytes) and the incomplete set are skipped with their
reasons; the encrypted and the corrupt archives are delivered all the same,
with the reason on their index; the archive with a cover image has a preview.
"""
from __future__ import annotations

import pytest

from tests.supervisor import ingest_helpers as h
from tests.supervisor.test_process import all_ready, env, stashd, stop, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(90)]


def test_daemon_ingests_every_seeded_archive_exactly_once(tmp_path, db_url):
    with h.seeded_sim(tmp_path) as sim:
        server, _ = sim
        config = h.ingest_config(tmp_path / "state", sim, h.SEEDED_MAPPINGS, db_url=db_url)
        sock = tmp_path / "state" / "stashd.sock"
        wanted = h.expected()
        proc = stashd("run", "--config", str(config), env=env())
        try:
            wait_for(lambda: all_ready(sock), what="accounts ready")
            h.wait_until(lambda: h.all_in_destination(server, wanted), 60, "every archive uploaded", proc=proc)
            store = h.open_store(db_url)
            try:
                h.wait_until(lambda: {"duplicate", "incomplete_set"} <= set(store.skips_by_reason()),
                             30, "duplicate and incomplete_set skips recorded", proc=proc)
                h.wait_until(lambda: h.all_indexed(store, wanted), 30, "every package indexed", proc=proc)
                check_records(store, wanted)
            finally:
                store.close()
            assert stop(proc) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.communicate()
        h.assert_exactly_once(server, wanted)


def check_records(store, wanted) -> None:
    by_name = {x.name: sha for sha, x in wanted.items()}
    for sha, x in wanted.items():
        meta = store.get_package_meta(sha)
        assert meta.index_state == (x.reason or "ok"), (x.name, meta.index_state, meta.index_reason)
        if x.reason:
            assert meta.index_reason  # the reason is recorded, and visible
        else:
            assert meta.entry_count == len(store.package_entries(sha)) > 0, x.name
    photos = store.get_package_meta(by_name["holiday-photos"])
    assert photos.preview_name == "holiday-photos/cover.png" or photos.preview_path
    forum = store.get_package_meta(by_name["retro-games"])
    assert forum.creator == "forum crew" and "forum" in forum.tags

    skipped = {}
    for s in store.list_skips(limit=1000):
        msg = store.get_source_message(s.channel_id, s.message_id)
        skipped.setdefault(s.reason, []).append((s.channel_id, msg.file_name if msg else None))
    # the forward (Source B, same document id) and the re-upload (forum, same bytes): one skip each
    duplicates = [c for c, name in skipped["duplicate"] if name == "shared-ebooks.zip"]
    assert len(duplicates) == len(set(duplicates)) == 2, skipped["duplicate"]
    assert sorted(name for _, name in skipped["incomplete_set"]) == ["partial-set.zip.001", "partial-set.zip.003"]
    ingested_names = {n for x in wanted.values() for n in x.file_names if x.name != "shared-ebooks"}
    for reason, entries in skipped.items():
        assert not ingested_names & {name for _, name in entries}, (reason, entries)
    assert set(skipped) <= {"duplicate", "incomplete_set", "not_archive"}, skipped
