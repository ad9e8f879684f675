"""IngestStore (storage.ingest) on SQLite and PostgreSQL: cursors, messages, sets, skips,
runs, the download journal and the two-phase package index."""
from __future__ import annotations

import dataclasses

import pytest

from storage import open_storage
from storage.errors import StorageError
from storage.ingest import (
    INDEX_STATES, SET_STATES, IngestNotFoundError, SetLeaseLostError, SetStateError,
)

SHA = "ab" * 32
CH, CH2 = -1001, -1002


@pytest.fixture
def store(db_url, clock):
    s = open_storage(db_url, clock=clock)
    yield s
    s.close()


def _msg(store, message_id, *, channel=CH, document_id=None, set_key="k", part=1, size=100,
         account="alice", name=None, topic=None):
    return store.record_source_message(
        channel, message_id, account=account, file_name=name or f"a.7z.{part or 1:03d}", size=size,
        document_id=document_id, topic_id=topic, posted_at=1.5, set_key=set_key,
        part_number=part, run_id="r1")


def _set(store, key="k", *, complete=True, parts=1, channel=CH, topic=None):
    return store.upsert_archive_set(
        key, channel_id=channel, topic_id=topic, base_name="a", archive_format="7z",
        scheme="7z.nnn", expected_parts=parts if complete else None, seen_parts=parts,
        complete=complete, total_size=100 * parts)


def _package(store, sha=SHA, tid="t1"):
    """Phase 1 as the upload pipeline does it: transfer, part sent, uploaded."""
    store.create_transfer(tid, source_path="/s", size=1, sha256=sha, destination="@d",
                          manifest_path="/m", delete_original=False,
                          parts=[(0, 0, 1, "00" * 32, "a.7z", 1)])
    store.record_part_sent(tid, 0, message_id=55, document_id=9, account="alice")
    return store.mark_transfer_uploaded(tid)


# --------------------------------------------------------------------------- cursors


def test_cursor_advances_never_backwards_and_stalls_with_a_reason(store, clock):
    assert store.get_cursor("alice", CH) is None
    c = store.advance_cursor("alice", CH, last_message_id=40)
    assert (c.last_message_id, c.last_scan_at, c.stalled, c.topic_id) == (40, clock.now, False, None)
    clock.advance(10)
    assert store.advance_cursor("alice", CH, last_message_id=30).last_message_id == 40
    s = store.mark_cursor_stalled("alice", CH, reason="page did not advance past 40")
    assert (s.stalled, s.stalled_reason, s.last_message_id, s.last_scan_at) == (
        True, "page did not advance past 40", 40, clock.now)
    assert store.advance_cursor("alice", CH, last_message_id=41).stalled is False
    # per account and per topic
    store.advance_cursor("bob", CH, last_message_id=5)
    store.advance_cursor("alice", CH, 7, last_message_id=3)
    assert store.get_cursor("alice", CH, 7).last_message_id == 3
    assert store.get_cursor("alice", CH).last_message_id == 41
    assert [(c.account, c.topic_id) for c in store.list_cursors()] == [
        ("alice", None), ("alice", 7), ("bob", None)]
    assert [c.account for c in store.list_cursors("bob")] == ["bob"]
    fresh = store.mark_cursor_stalled("carol", CH2, reason="history hidden")
    assert (fresh.last_message_id, fresh.stalled) == (0, True)


# --------------------------------------------------------------------------- messages


def test_source_message_first_writer_wins(store):
    first = _msg(store, 10, document_id=77, account="alice")
    assert first.created and first.record.status == "pending"
    again = _msg(store, 10, document_id=77, account="bob", size=999)
    assert not again.created and again.record == first.record  # unchanged
    assert store.get_source_message(CH, 10) == first.record
    assert store.get_source_message(CH, 11) is None
    assert store.seen_message_ids(CH, [9, 10, 11]) == {10}
    assert store.seen_message_ids(CH2, [10]) == set()
    assert store.seen_message_ids(CH, []) == set()
    r = first.record
    assert (r.document_id, r.file_name, r.size, r.posted_at, r.part_number, r.run_id) == (
        77, "a.7z.001", 100, 1.5, 1, "r1")


def _check_many_seen_ids_are_looked_up_in_batches(store):
    for i in range(0, 1200, 8):
        _msg(store, i, channel=CH2, set_key="many", part=None)
    assert store.seen_message_ids(CH2, range(1200)) == set(range(0, 1200, 8))


def _check_set_messages_come_in_part_order_with_the_zip_tail_last(store):
    _msg(store, 3, part=None, name="a.zip")
    _msg(store, 1, part=2, name="a.z02")
    _msg(store, 2, part=1, name="a.z01")
    _msg(store, 4, set_key="other")
    assert [m.file_name for m in store.set_messages("k")] == ["a.z01", "a.z02", "a.zip"]


def test_message_status_and_listing(store, clock):
    _msg(store, 1)
    clock.advance(1)
    _msg(store, 2)
    assert [m.message_id for m in store.list_source_messages("pending")] == [1, 2]
    m = store.set_message_status(CH, 2, "skipped", reason="too_large")
    assert (m.status, m.reason) == ("skipped", "too_large")
    assert [m.message_id for m in store.list_source_messages("pending", channel_id=CH)] == [1]
    with pytest.raises(IngestNotFoundError):
        store.set_message_status(CH, 99, "skipped")
    with pytest.raises(ValueError):
        store.set_message_status(CH, 1, "gone")


# --------------------------------------------------------------------------- documents


def _check_ingested_documents_first_row_wins(store):
    assert store.find_ingested_document(77) is None
    assert store.record_ingested_documents([(77, CH, 10), (78, CH, 11)], transfer_id="t1") == 2
    assert store.record_ingested_documents([(77, CH2, 50), (None, CH2, 51)], transfer_id="t2") == 0
    d = store.find_ingested_document(77)
    assert (d.channel_id, d.message_id, d.transfer_id) == (CH, 10, "t1")
    assert store.ingested_document_ids([76, 77, 78]) == {77, 78}


# --------------------------------------------------------------------------- sets


def test_set_waits_until_complete_and_never_falls_back(store):
    s = _set(store, complete=False)
    assert (s.state, s.complete, s.expected_parts) == ("waiting", False, None)
    s = _set(store, complete=True, parts=3)
    assert (s.state, s.complete, s.seen_parts, s.total_size) == ("ready", True, 3, 300)
    store.set_archive_set_state("k", "downloading")
    s = _set(store, complete=False, parts=2)  # a late, stale view
    assert (s.state, s.complete, s.seen_parts, s.expected_parts) == ("downloading", True, 3, 3)
    assert store.archive_sets_by_state() == {**{st: 0 for st in SET_STATES}, "downloading": 1}
    assert [x.set_key for x in store.list_archive_sets("downloading")] == ["k"]
    assert store.list_archive_sets("ready") == []


def test_claim_ready_sets_leases_and_takes_over_only_expired_leases(store, clock):
    _set(store, "a")
    clock.advance(1)
    _set(store, "b")
    _set(store, "w", complete=False)
    got = store.claim_ready_sets("p1", 10, 60)
    assert [s.set_key for s in got] == ["a", "b"] and {s.lease_owner for s in got} == {"p1"}
    assert store.claim_ready_sets("p2", 10, 60) == []
    store.set_archive_set_state("a", "downloading", expected="ready", lease_owner="p1")
    assert store.renew_set_lease("a", "p1", 60) and not store.renew_set_lease("a", "p2", 60)
    clock.advance(61)  # p1 died: both leases run out
    taken = store.claim_ready_sets("p2", 1, 60)
    assert [(s.set_key, s.state) for s in taken] == [("a", "downloading")]
    with pytest.raises(SetLeaseLostError):
        store.set_archive_set_state("a", "uploading", lease_owner="p1")
    assert store.release_set_lease("a", "p2") and not store.release_set_lease("a", "p2")
    assert [s.set_key for s in store.claim_ready_sets("p3", 5, 60, channel_id=CH)] == ["a", "b"]
    assert store.claim_ready_sets("p4", 5, 60, channel_id=CH2) == []
    with pytest.raises(ValueError):
        store.claim_ready_sets("p4", 5, 60, states=("waiting",))


def _check_set_state_compare_and_set(store):
    _set(store)
    with pytest.raises(SetStateError) as info:
        store.set_archive_set_state("k", "uploading", expected=("downloading",))
    assert info.value.current == "ready"
    s = store.set_archive_set_state("k", "uploading", sha256=SHA.upper(), transfer_id="t1",
                                    reason="x")
    assert (s.state, s.sha256, s.transfer_id, s.reason) == ("uploading", SHA, "t1", "x")
    assert store.set_archive_set_state("k", "uploading", reason="").reason is None
    with pytest.raises(IngestNotFoundError):
        store.set_archive_set_state("nope", "ready")


def test_documents_of_a_failed_package_do_not_count_as_ingested(store):
    """A forward of a lost package's document is a copy of the content: it is downloaded
    rather than skipped before any byte, and its transfer takes the document rows over."""
    _package(store, tid="t1")
    assert store.record_ingested_documents([(77, CH, 10), (78, CH, 11)], set_key="k",
                                           transfer_id="t1") == 2
    assert store.ingested_document_ids([77, 78]) == {77, 78}
    store.set_transfer_state("t1", "failed", reason="lost after cleanup: part 1")
    assert store.ingested_document_ids([77, 78]) == set()
    # a new copy of the content (a forward of document 77) is ingested as t2
    assert store.record_ingested_documents([(77, CH2, 50)], set_key="k2", transfer_id="t2") == 1
    d = store.find_ingested_document(77)
    assert (d.channel_id, d.message_id, d.set_key, d.transfer_id) == (CH2, 50, "k2", "t2")
    assert store.ingested_document_ids([77, 78]) == {77}
    # a live package's rows are kept: the first still wins
    assert store.record_ingested_documents([(77, CH, 12)], transfer_id="t3") == 0
    assert store.find_ingested_document(77).transfer_id == "t2"

def test_mark_set_ingested_records_messages_documents_and_clears_skips(store):
    _set(store, parts=2)
    _msg(store, 1, part=1, document_id=501)
    _msg(store, 2, part=2, document_id=502)
    store.record_skip(CH, 2, "incomplete_set", set_key="k")
    assert store.get_source_message(CH, 2).status == "skipped"
    store.claim_ready_sets("p", 1, 60)
    s = store.mark_set_ingested("k", transfer_id="t1", sha256=SHA, lease_owner="p")
    assert (s.state, s.transfer_id, s.lease_owner) == ("ingested", "t1", None)
    assert {(m.status, m.transfer_id, m.reason) for m in store.set_messages("k")} == {
        ("ingested", "t1", None)}
    assert store.ingested_document_ids([501, 502]) == {501, 502}
    assert store.list_skips() == []


def test_mark_set_skipped_as_duplicate_remembers_the_documents(store, clock):
    _set(store, parts=1)
    _msg(store, 1, document_id=601)
    s = store.mark_set_skipped("k", "duplicate", detail="same sha256 as t0", duplicate_of="t0",
                               run_id="r9")
    assert (s.state, s.reason, s.transfer_id) == ("skipped", "duplicate", "t0")
    [skip] = store.list_skips()
    assert (skip.message_id, skip.reason, skip.detail, skip.run_id, skip.account, skip.set_key) == (
        1, "duplicate", "same sha256 as t0", "r9", "alice", "k")
    assert store.find_ingested_document(601).transfer_id == "t0"
    assert store.get_source_message(CH, 1).status == "skipped"
    _set(store, "k2")
    _msg(store, 5, set_key="k2", document_id=602)
    store.mark_set_skipped("k2", "unreadable")
    assert store.find_ingested_document(602) is None  # not a duplicate: may come back
    with pytest.raises(ValueError):
        store.mark_set_skipped("k2", "")


# --------------------------------------------------------------------------- skips


def test_skips_are_one_current_reason_per_message(store, clock):
    _msg(store, 1, set_key=None)
    store.record_skip(CH, 1, "incomplete_set", detail="part 2 missing")
    clock.advance(5)
    k = store.record_skip(CH, 1, "too_large", detail="3 GiB > 2 GiB", account="bob")
    assert (k.reason, k.detail, k.account, k.created_at) == ("too_large", "3 GiB > 2 GiB", "bob",
                                                             clock.now)
    assert store.get_source_message(CH, 1).reason == "too_large"
    store.record_skip(CH2, 7, "duplicate")  # a message that was never recorded: fine
    clock.advance(1)
    store.record_skip(CH2, 8, "duplicate")
    assert store.skips_by_reason() == {"too_large": 1, "duplicate": 2}
    assert store.skips_by_reason(CH2) == {"duplicate": 2}
    assert [k.message_id for k in store.list_skips()] == [8, 7, 1]  # newest first
    assert [k.message_id for k in store.list_skips("duplicate", channel_id=CH2, limit=1)] == [8]
    assert store.clear_skip(CH2, 7) and not store.clear_skip(CH2, 7)


# --------------------------------------------------------------------------- runs


def test_run_counters_add_up_live_and_finish(store, clock):
    run = store.start_run(mapping="a->stash", channel_id=CH, account="alice", owner="host:1")
    assert (run.state, run.seen, run.skipped_by_reason, run.topic_id) == ("running", 0, {}, None)
    store.update_run(run.id, seen=5, bytes_downloaded=1000, progress="page 1")
    store.update_run(run.id, seen=3, ingested=1, skipped="too_large")
    r = store.update_run(run.id, skipped={"too_large": 2, "duplicate": 1}, bytes_downloaded=24)
    assert (r.seen, r.ingested, r.skipped, r.bytes_downloaded, r.progress) == (
        8, 1, 4, 1024, "page 1")
    assert r.skipped_by_reason == {"too_large": 3, "duplicate": 1}
    clock.advance(3)
    done = store.finish_run(run.id)
    assert (done.state, done.finished_at) == ("finished", clock.now)
    assert store.get_run(run.id) == done
    with pytest.raises(ValueError):
        store.finish_run(run.id, state="running")
    with pytest.raises(IngestNotFoundError):
        store.update_run("nope", seen=1)
    with pytest.raises(StorageError):
        store.start_run(mapping="m", channel_id=CH, account="a", run_id=run.id)


def test_stale_runs_are_interrupted_and_runs_list_newest_first(store, clock):
    old = store.start_run(mapping="m", channel_id=CH, account="alice", owner="p1")
    clock.advance(100)
    mine = store.start_run(mapping="m", channel_id=CH2, account="bob", owner="p2", topic_id=4)
    failed = store.start_run(mapping="m", channel_id=CH2, account="bob", owner="p2")
    store.finish_run(failed.id, state="failed", error="account banned")
    assert store.interrupt_stale_runs(older_than=50) == 1
    assert store.get_run(old.id).state == "interrupted"
    assert store.interrupt_stale_runs(older_than=0, owner="p1") == 0
    assert store.interrupt_stale_runs(older_than=0, owner="p2") == 1
    assert store.get_run(mine.id).state == "interrupted"
    assert store.get_run(failed.id).error == "account banned"
    assert [r.id for r in store.list_runs()][-1] == old.id
    assert [r.id for r in store.list_runs("failed")] == [failed.id]
    assert store.get_run(mine.id).topic_id == 4


# --------------------------------------------------------------------------- download journal


def _check_download_journal_per_staged_file(store):
    store.journal_download("/stage/a.part", [0, 1, 5])
    store.journal_download("/stage/a.part", [1, 2])  # idempotent
    store.journal_download("/stage/b.part", [])
    assert store.downloaded_chunks("/stage/a.part") == {0, 1, 2, 5}
    assert store.downloaded_chunks("/stage/b.part") == set()
    assert store.clear_download_journal("/stage/a.part") == 4
    assert store.downloaded_chunks("/stage/a.part") == set()


# --------------------------------------------------------------------------- phase 2


def test_two_phase_package_index(store):
    meta = store.register_package_meta(SHA, "t1", archive_format="7z", creator="Source A",
                                       tags=["games", "retro"], source_channel_id=CH,
                                       source_topic_id=3, source_message_id=10)
    assert (meta.index_state, meta.tags, meta.entry_count, meta.attempts) == (
        "pending", ("games", "retro"), 0, 0)
    assert store.register_package_meta(SHA, "other") == meta  # idempotent, first kept
    # the upload has not finished: nothing awaits phase 2 yet
    assert store.packages_awaiting_index() == []
    _package(store)  # phase 1 (mark_transfer_uploaded writes the package row)
    assert [m.sha256 for m in store.packages_awaiting_index()] == [SHA]
    # ... a crash here leaves it pending; a restart finds it again
    [claimed] = store.claim_index_work("p1", 5, 60)
    assert claimed.lease_owner == "p1" and store.claim_index_work("p2", 5, 60) == []
    entries = [("d/", 0, None, True), ("d/a.txt", 6000, 0xDEADBEEF, False),
               dataclasses.make_dataclass("E", ["path", "size", "crc", "is_dir"])(
                   "d/cover.png", 70, 1, False)]
    done = store.record_package_index(SHA.upper(), state="ok", entries=entries,
                                      preview=b"\x89PNG\r\n\x1a\nxx", preview_name="d/cover.png",
                                      lease_owner="p1")
    assert (done.index_state, done.entry_count, done.attempts, done.lease_owner) == (
        "ok", 3, 1, None)
    assert done.preview == b"\x89PNG\r\n\x1a\nxx" and done.indexed_at is not None
    assert [(e.index, e.path, e.size, e.crc, e.is_dir) for e in store.package_entries(SHA)] == [
        (0, "d/", 0, None, True), (1, "d/a.txt", 6000, 0xDEADBEEF, False),
        (2, "d/cover.png", 70, 1, False)]
    assert store.packages_awaiting_index() == []
    assert store.index_states() == {**{s: 0 for s in INDEX_STATES}, "ok": 1}
    # re-indexing replaces the entries
    again = store.record_package_index(SHA, state="encrypted", reason="headers encrypted")
    assert (again.index_state, again.index_reason, again.entry_count, again.attempts) == (
        "encrypted", "headers encrypted", 0, 2)
    assert store.package_entries(SHA) == [] and store.get_package_meta(SHA).preview is None


def _lose_unindexed(store, clock, tid):
    """``tid``'s package lost after cleanup (transfer failed) before it was indexed: its
    index was given up as unreadable (the staged files were gone)."""
    store.set_transfer_state(tid, "failed", reason="lost after cleanup: part 1")
    store.claim_index_work("p1", 1, 30)
    store.record_package_index(SHA, state="unreadable", lease_owner="p1",
                               reason="staged files were removed before indexing")
    clock.advance(5)


def test_a_new_copy_of_a_lost_package_takes_its_metadata_over(store, clock):
    """The lost copy (transfer failed) was never indexed and its staged files are gone: the
    copy that is ingested again names itself and its source in the metadata, and its own
    staged files are indexed; the metadata of a live package is kept (the first wins)."""
    store.register_package_meta(SHA, "t1", archive_format="7z", creator="Source A",
                                tags=["a"], source_channel_id=CH, source_message_id=10)
    _package(store, tid="t1")
    _lose_unindexed(store, clock, "t1")
    meta = store.register_package_meta(SHA, "t2", archive_format="7z", creator="Source B",
                                       tags=["b"], source_channel_id=CH2, source_topic_id=4,
                                       source_message_id=50)
    assert (meta.transfer_id, meta.creator, meta.tags, meta.source_channel_id,
            meta.source_topic_id, meta.source_message_id) == ("t2", "Source B", ("b",), CH2, 4, 50)
    assert (meta.index_state, meta.index_reason, meta.created_at) == ("pending", None, clock.now)
    assert store.register_package_meta(SHA, "t3", creator="C") == meta   # t2 is not failed


def test_an_uploaded_copy_takes_over_the_index_of_a_lost_package(store, clock):
    """A copy that registers no metadata (a local upload) still holds the content once
    uploaded: the pending index reads its files, not the lost copy's removed ones; an
    index already taken from the same bytes is kept."""
    store.register_package_meta(SHA, "t1", creator="Source A", source_message_id=10)
    _package(store, tid="t1")
    _lose_unindexed(store, clock, "t1")
    _package(store, tid="t2")
    meta = store.get_package_meta(SHA)
    assert (meta.transfer_id, meta.index_state, meta.creator, meta.source_message_id) == (
        "t2", "pending", "Source A", 10)
    assert [m.transfer_id for m in store.claim_index_work("p2", 1, 30)] == ["t2"]
    store.record_package_index(SHA, state="ok", entries=[("a.txt", 1, 2, False)], lease_owner="p2")
    store.set_transfer_state("t2", "failed", reason="lost after cleanup: part 1")
    _package(store, tid="t3")
    meta = store.get_package_meta(SHA)
    assert (meta.transfer_id, meta.index_state, meta.entry_count) == ("t3", "ok", 1)


def test_index_lease_is_checked_and_expires(store, clock):
    store.register_package_meta(SHA, "t1")
    _package(store)
    store.claim_index_work("p1", 1, 30)
    clock.advance(31)
    assert [m.sha256 for m in store.claim_index_work("p2", 1, 30)] == [SHA]
    with pytest.raises(StorageError, match="lease"):
        store.record_package_index(SHA, state="ok", lease_owner="p1")
    with pytest.raises(IngestNotFoundError):
        store.record_package_index("cd" * 32, state="ok")
    with pytest.raises(ValueError):
        store.record_package_index(SHA, state="pending-ish")
    assert store.get_package_meta("cd" * 32) is None


def _check_large_preview_and_many_entries_round_trip(store):
    store.register_package_meta(SHA, "t1")
    blob = bytes(range(256)) * 4096  # 1 MiB, every byte value
    entries = [(f"dir/file-{i:05d}.bin", i, i * 7, False) for i in range(2000)]
    store.record_package_index(SHA, state="ok", entries=entries, preview=blob)
    assert store.get_package_meta(SHA).preview == blob
    got = store.package_entries(SHA)
    assert len(got) == 2000 and got[1999].path == "dir/file-01999.bin"
    assert len(store.package_entries(SHA, limit=10)) == 10


# Each test on PostgreSQL pays for a fresh database; the small checks share one.


def test_messages_documents_and_set_order(store):
    _check_set_messages_come_in_part_order_with_the_zip_tail_last(store)
    _check_many_seen_ids_are_looked_up_in_batches(store)
    _check_ingested_documents_first_row_wins(store)


def test_set_state_journal_and_large_index(store):
    _check_set_state_compare_and_set(store)
    _check_download_journal_per_staged_file(store)
    _check_large_preview_and_many_entries_round_trip(store)
