"""Durable transfers (storage.transfers) on both backends: states, two-phase
records, claims, journal, due-check leases, the migration 2 -> 3 upgrade."""
from __future__ import annotations

import dataclasses

import pytest

from storage import (
    TRANSFER_STATES,
    ClaimResult,
    LeaseLostError,
    PartConflictError,
    StorageError,
    TransferExistsError,
    TransferNotFoundError,
    TransferStateError,
    open_storage,
)
from storage.migrations import CURRENT_VERSION, migrate, read_version

SHA = "ab" * 32
OTHER_SHA = "cd" * 32
BIG_RANDOM = -(2**63) + 5
BIG_MESSAGE = 2**40 + 3
BIG_DOCUMENT = 5_000_000_000_000_000_001


@pytest.fixture
def store(db_url, clock):
    s = open_storage(db_url, clock=clock)
    yield s
    s.close()


def _parts(n=2, size=10):
    return [(i, i * size, size, f"{i:064x}", f"file.{i + 1:03d}", BIG_RANDOM + i)
            for i in range(n)]


def _create(store, tid="t1", *, sha=SHA, n=2, **kw):
    fields = dict(source_path="/in/file", size=20, sha256=sha, destination="@stash_archive",
                  manifest_path=f"/state/manifests/{tid}.msgpack", delete_original=True)
    fields.update(kw)
    return store.create_transfer(tid, parts=_parts(n), **fields)


def _upload_all(store, tid, n=2, base=100):
    for i in range(n):
        store.record_part_sent(tid, i, message_id=base + i, document_id=BIG_DOCUMENT + i,
                               account="alice")
    return store.mark_transfer_uploaded(tid)


# -- create / read ---------------------------------------------------------------


def test_create_transfer_and_read_it_back(store, clock):
    rec = _create(store, sha=SHA.upper(), account="bob")
    assert (rec.id, rec.state, rec.sha256, rec.account, rec.part_count) == (
        "t1", "planned", SHA, "bob", 2)
    assert (rec.attempts, rec.reason, rec.duplicate_of, rec.lease_owner) == (0, None, None, None)
    assert rec.created_at == rec.updated_at == rec.next_check_at == clock.now
    assert rec.delete_original is True
    assert store.get_transfer("t1") == rec
    assert store.get_transfer("nope") is None
    parts = store.list_parts("t1")
    assert [(p.index, p.offset, p.length, p.file_name, p.random_id) for p in parts] == [
        (0, 0, 10, "file.001", BIG_RANDOM), (1, 10, 10, "file.002", BIG_RANDOM + 1)]
    assert all(p.message_id is None and p.misses == 0 for p in parts)
    with pytest.raises(dataclasses.FrozenInstanceError):
        rec.state = "failed"


def test_create_refuses_a_taken_id_and_duplicate_indexes(store):
    _create(store)
    with pytest.raises(TransferExistsError):
        _create(store)
    with pytest.raises(ValueError, match="duplicate part"):
        store.create_transfer("t2", source_path="/x", size=1, sha256=SHA, destination="d",
                              manifest_path="m", delete_original=False,
                              parts=[(0, 0, 1, "a", "f", 1), (0, 1, 1, "b", "g", 2)])
    assert store.get_transfer("t2") is None


def test_list_transfers_and_counts(store, clock):
    for i in range(3):
        _create(store, f"t{i}", sha=f"{i:064x}")
        clock.advance(1)
    store.set_transfer_state("t1", "failed", reason="disk gone")
    assert [t.id for t in store.list_transfers()] == ["t0", "t1", "t2"]
    assert [t.id for t in store.list_transfers(limit=2)] == ["t0", "t1"]
    assert [t.id for t in store.list_transfers("planned")] == ["t0", "t2"]
    assert [t.reason for t in store.list_transfers("failed")] == ["disk gone"]
    counts = store.transfers_by_state()
    assert set(counts) == set(TRANSFER_STATES)
    assert counts["planned"] == 2 and counts["failed"] == 1 and counts["verified"] == 0
    assert [t.id for t in store.transfer_for_sha256(f"{2:064x}")] == ["t2"]
    with pytest.raises(ValueError):
        store.list_transfers("bogus")


# -- state machine --------------------------------------------------------------------


def test_state_compare_and_set(store, clock):
    _create(store)
    clock.advance(3)
    rec = store.set_transfer_state("t1", "uploading", expected="planned", account="alice")
    assert (rec.state, rec.account, rec.updated_at) == ("uploading", "alice", clock.now)
    with pytest.raises(TransferStateError) as info:
        store.set_transfer_state("t1", "uploaded", expected="planned")
    assert (info.value.current, info.value.wanted) == ("uploading", "uploaded")
    assert store.get_transfer("t1").state == "uploading"
    rec = store.set_transfer_state("t1", "uploaded", expected=("planned", "uploading"),
                                   next_check_at=clock.now + 60, attempts=2)
    assert (rec.state, rec.next_check_at, rec.attempts) == ("uploaded", clock.now + 60, 2)


def test_moves_outside_the_state_machine_are_refused(store):
    _create(store)
    for bad in ("cleaned", "verified", "verifying"):
        with pytest.raises(TransferStateError, match="cannot move"):
            store.set_transfer_state("t1", bad)
    assert store.get_transfer("t1").state == "planned"
    with pytest.raises(ValueError):
        store.set_transfer_state("t1", "lost")
    with pytest.raises(TransferNotFoundError):
        store.set_transfer_state("missing", "failed")
    # the whole happy path, and a re-check cycle
    for state in ("uploading", "uploaded", "verifying", "verified", "verifying", "verified",
                  "cleaned"):
        assert store.set_transfer_state("t1", state).state == state


def test_reason_is_kept_replaced_and_cleared(store):
    _create(store)
    store.set_transfer_state("t1", "failed", reason="source changed: size")
    assert store.set_transfer_state("t1", "failed").reason == "source changed: size"
    assert store.set_transfer_state("t1", "planned", reason="").reason is None


# -- two-phase record --------------------------------------------------------------------


def test_record_part_sent_is_idempotent_and_refuses_another_message(store, clock):
    _create(store)
    first = store.record_part_sent("t1", 0, message_id=BIG_MESSAGE, document_id=BIG_DOCUMENT,
                                   account="alice")
    assert (first.message_id, first.document_id, first.account, first.sent_at) == (
        BIG_MESSAGE, BIG_DOCUMENT, "alice", clock.now)
    clock.advance(10)
    again = store.record_part_sent("t1", 0, message_id=BIG_MESSAGE, document_id=BIG_DOCUMENT,
                                   account="alice")
    assert again == first  # the retry after a crash changes nothing
    with pytest.raises(PartConflictError) as info:
        store.record_part_sent("t1", 0, message_id=BIG_MESSAGE + 1, document_id=1,
                               account="bob")
    assert (info.value.recorded, info.value.offered) == (BIG_MESSAGE, BIG_MESSAGE + 1)
    assert store.list_parts("t1")[0] == first
    assert [p.index for p in store.parts_without_message("t1")] == [1]
    with pytest.raises(StorageError, match="no part 7"):
        store.record_part_sent("t1", 7, message_id=1, document_id=1, account="alice")


def test_mark_uploaded_needs_every_message_and_stores_the_package(store, clock):
    _create(store)
    store.set_transfer_state("t1", "uploading")
    store.record_part_sent("t1", 0, message_id=5, document_id=6, account="alice")
    with pytest.raises(TransferStateError, match=r"without a message id: \[1\]"):
        store.mark_transfer_uploaded("t1")
    assert store.find_package(SHA) is None
    store.record_part_sent("t1", 1, message_id=7, document_id=8, account="alice")
    rec = store.mark_transfer_uploaded("t1", first_check_delay=300)
    assert (rec.state, rec.next_check_at) == ("uploaded", clock.now + 300)
    pkg = store.find_package(SHA)
    assert (pkg.transfer_id, pkg.destination) == ("t1", "@stash_archive")
    # a second transfer of the same content does not replace the package
    _create(store, "t2")
    _upload_all(store, "t2", base=200)
    assert store.find_package(SHA).transfer_id == "t1"


def test_fresh_random_id_for_a_reupload(store):
    _create(store)
    _upload_all(store, "t1")
    store.record_check("t1", present=[0], missing=[1])
    part = store.set_part_random_id("t1", 1, 2**63 - 1)
    assert (part.random_id, part.message_id, part.document_id, part.sent_at, part.misses) == (
        2**63 - 1, None, None, None, 1)
    assert [p.index for p in store.parts_without_message("t1")] == [1]
    store.record_part_sent("t1", 1, message_id=999, document_id=1, account="bob")
    assert store.parts_without_message("t1") == []


def test_duplicate_completes_by_reference(store):
    _create(store)
    _upload_all(store, "t1")
    _create(store, "t2")
    rec = store.mark_transfer_duplicate("t2", "t1")
    assert (rec.state, rec.duplicate_of) == ("uploaded", "t1")
    with pytest.raises(TransferNotFoundError):
        store.mark_transfer_duplicate("t2", "nope")


# -- content claims -------------------------------------------------------------------------


def test_claim_grant_hold_renew_release(store, clock):
    assert store.claim_content(SHA, "w1", 30, "t1") == ClaimResult(True, None, "w1", clock.now + 30)
    assert store.claim_content(SHA, "w2", 30, "t2") == ClaimResult(False, None, "w1", clock.now + 30)
    assert store.claim_content(SHA, "w1", 30, "t1").granted  # our own claim again
    clock.advance(20)
    assert store.renew_claim(SHA, "w1", 30)
    assert not store.renew_claim(SHA, "w2", 30)
    clock.advance(20)  # still inside the renewed lease
    assert store.claim_content(SHA, "w2", 30).holder == "w1"
    assert not store.release_claim(SHA, "w2")
    assert store.release_claim(SHA, "w1")
    assert store.claim_content(SHA, "w2", 30).granted


def test_expired_claim_is_taken_over(store, clock):
    assert store.claim_content(SHA, "dead", 10, "t1").granted
    clock.advance(9.5)
    assert not store.claim_content(SHA, "w2", 10).granted
    clock.advance(0.5)
    taken = store.claim_content(SHA, "w2", 10, "t2")
    assert taken == ClaimResult(True, None, "w2", clock.now + 10)
    assert not store.renew_claim(SHA, "dead", 10)  # the old owner learns it lost it
    assert not store.release_claim(SHA, "dead")


def test_claim_after_upload_sees_the_package(store):
    _create(store)
    assert store.claim_content(SHA, "w1", 30, "t1").granted
    _upload_all(store, "t1")
    result = store.claim_content(SHA, "w2", 30, "t2")
    assert result == ClaimResult(False, "t1", None, None)
    assert not store.renew_claim(SHA, "w1", 30)  # released by the upload
    assert store.claim_content(OTHER_SHA, "w2", 30).granted


def test_claim_recheck_after_claiming_sees_a_package(store):
    """A package stored between the first look and the claim row wins."""
    _create(store)
    Package = store.entities.Package
    orig = store._now

    def racing_now():  # runs after the first package look, before the claim row
        Package(sha256=SHA, transfer_id="t1", destination="@d", created_at=1.0)
        return orig()

    store._now = racing_now
    try:
        result = store.claim_content(SHA, "w2", 30, "t2")
    finally:
        store._now = orig
    assert result == ClaimResult(False, "t1", None, None)
    assert store.find_package(SHA).transfer_id == "t1"
    assert not store.release_claim(SHA, "w2")  # no claim row left behind


def test_a_failed_package_does_not_count_as_stored(store, clock):
    """A package whose transfer failed (lost after cleanup, re-fetch pending or
    impossible) holds nothing: the same content found again is uploaded and becomes
    the package; a live package (also one being restored) de-duplicates as before."""
    _create(store)
    _upload_all(store, "t1")
    store.set_transfer_state("t1", "failed", reason="lost after cleanup: part 1")
    store.set_transfer_state("t1", "uploading", expected="failed")  # its re-fetch restores it
    assert store.claim_content(SHA, "w2", 30, "t2") == ClaimResult(False, "t1", None, None)
    assert store.find_package(SHA).transfer_id == "t1"
    store.set_transfer_state("t1", "failed", reason="lost after cleanup: SOURCE GONE")
    assert store.find_package(SHA) is None
    assert store.claim_content(SHA, "w2", 30, "t2") == ClaimResult(True, None, "w2", clock.now + 30)
    assert store.claim_content(SHA, "w1", 30, "t1").holder == "w2"  # a late re-fetch waits
    _create(store, "t2")
    clock.advance(5)
    _upload_all(store, "t2", base=200)
    pkg = store.find_package(SHA)
    assert (pkg.transfer_id, pkg.created_at) == ("t2", clock.now)   # the new copy holds it now
    assert not store.renew_claim(SHA, "w2", 30)  # released by the upload
    assert store.claim_content(SHA, "w1", 30, "t1") == ClaimResult(False, "t2", None, None)
    assert store.claim_content(SHA, "w3", 30, "t3") == ClaimResult(False, "t2", None, None)


# -- chunk journal ------------------------------------------------------------------------


def test_chunk_journal(store, clock):
    _create(store)
    store.journal_chunk("t1", 0, 0, "alice")
    store.journal_chunk("t1", 0, 0, "alice")  # idempotent
    clock.advance(100)
    store.journal_chunk_many("t1", 0, [1, 2, 3], "alice")
    store.journal_chunk("t1", 1, 0, "bob")
    assert store.journaled_chunks("t1", 0) == {0, 1, 2, 3}
    assert store.journaled_chunks("t1", 0, max_age=50) == {1, 2, 3}
    assert store.journaled_chunks("t1", 0, account="bob") == set()
    assert store.journaled_chunks("t1", 1, account="bob") == {0}
    assert store.clear_journal("t1", 0) == 4
    assert store.journaled_chunks("t1", 0) == set()
    assert store.journaled_chunks("t1", 1) == {0}
    assert store.clear_journal("t1") == 1
    with pytest.raises(StorageError, match="no part 9"):
        store.journal_chunk("t1", 9, 0, "alice")


def test_journal_chunk_many_is_one_bulk_upsert(store, clock, caplog):
    """2500 chunks: one transaction, one statement per 500 rows, no lookup per chunk, the
    same statement text for every batch of a size (Pony parses a text once); journaling
    again is idempotent and takes the newer account and time."""
    import logging

    from pony.orm import set_sql_debug

    _create(store)
    store.journal_chunk_many("t1", 0, [], "alice")                        # nothing to do
    store.journal_chunk_many("t1", 0, range(0, 2000, 2), "alice")
    clock.advance(100)
    caplog.set_level(logging.INFO, logger="pony.orm.sql")
    set_sql_debug(True)
    try:
        store.journal_chunk_many("t1", 0, list(range(2500)) + [7, 7], "bob")
    finally:
        set_sql_debug(False)
    statements = [r.getMessage() for r in caplog.records if r.name == "pony.orm.sql"]
    journal = [sql for sql in statements if "part_journal" in sql]
    assert len(journal) == 5 and all(sql.lstrip().startswith("INSERT") for sql in journal)
    assert len(set(journal)) == 1
    assert store.journaled_chunks("t1", 0) == set(range(2500))
    assert store.journaled_chunks("t1", 0, account="bob") == set(range(2500))  # updated
    assert store.journaled_chunks("t1", 0, max_age=50) == set(range(2500))
    store.journal_chunk_many("t1", 0, [1, 2], "carol")
    assert store.journaled_chunks("t1", 0, account="carol") == {1, 2}
    assert store.clear_journal("t1", 0) == 2500


# -- due checks and leases -------------------------------------------------------------------


def test_due_transfers_are_leased_once(store, clock):
    for i in range(3):
        _create(store, f"t{i}", sha=f"{i:064x}")
        _upload_all(store, f"t{i}", base=10 * i)
    store.set_transfer_state("t2", "uploaded", next_check_at=clock.now + 100)
    assert [t.id for t in store.claim_due_transfers("v1", 1, 60)] == ["t0"]
    got = store.claim_due_transfers("v2", 10, 60)
    assert [(t.id, t.lease_owner, t.lease_until) for t in got] == [("t1", "v2", clock.now + 60)]
    assert store.claim_due_transfers("v3", 10, 60) == []
    clock.advance(100)  # t2 due; t0/t1 leases expired -> taken over
    assert sorted(t.id for t in store.claim_due_transfers("v3", 10, 60)) == ["t0", "t1", "t2"]
    assert not store.renew_transfer_lease("t0", "v1", 60)
    assert store.renew_transfer_lease("t0", "v3", 120)
    assert store.get_transfer("t0").lease_until == clock.now + 120


def test_due_claim_respects_states(store, clock):
    _create(store, "p")
    _create(store, "u", sha=OTHER_SHA)
    _upload_all(store, "u")
    assert [t.id for t in store.claim_due_transfers("v", 10, 60)] == ["u"]
    assert [t.id for t in store.claim_due_transfers("up", 10, 60, states=("planned",))] == ["p"]
    store.set_transfer_state("u", "verifying", release_lease=True)
    store.set_transfer_state("u", "verified", next_check_at=clock.now)
    assert [t.id for t in store.claim_due_transfers("v", 10, 60)] == ["u"]
    assert store.claim_due_transfers("v", 0, 60) == []


def test_lease_owner_guards_verifier_writes(store, clock):
    _create(store)
    _upload_all(store, "t1")
    store.claim_due_transfers("v1", 10, 60)
    rec = store.record_check("t1", present=[0, 1], next_check_at=clock.now + 600,
                             lease_owner="v1")
    assert (rec.last_check_at, rec.next_check_at) == (clock.now, clock.now + 600)
    assert all(p.verified_at == clock.now for p in store.list_parts("t1"))
    clock.advance(61)
    store.set_transfer_state("t1", "uploaded", next_check_at=clock.now)
    assert [t.id for t in store.claim_due_transfers("v2", 10, 60)] == ["t1"]
    with pytest.raises(LeaseLostError) as info:
        store.set_transfer_state("t1", "verified", lease_owner="v1")
    assert info.value.holder == "v2"
    with pytest.raises(LeaseLostError):
        store.record_check("t1", missing=[0], lease_owner="v1")
    assert not store.release_transfer_lease("t1", "v1")
    rec = store.set_transfer_state("t1", "verifying", lease_owner="v2")
    rec = store.record_check("t1", missing=[1], lease_owner="v2")
    assert [p.misses for p in store.list_parts("t1")] == [0, 1]
    assert store.list_parts("t1")[1].verified_at is None
    assert store.release_transfer_lease("t1", "v2", next_check_at=clock.now + 5)
    rec = store.get_transfer("t1")
    assert (rec.lease_owner, rec.lease_until, rec.next_check_at) == (None, None, clock.now + 5)
    with pytest.raises(StorageError, match="no parts"):
        store.record_check("t1", present=[5])


# -- schema ----------------------------------------------------------------------------------


def test_version_2_database_is_upgraded_to_transfers(db_url, raw_db, clock):
    assert CURRENT_VERSION >= 3
    migrate(raw_db.conn, target=2, clock=clock)
    assert "transfers" not in raw_db.tables()
    raw_db.execute("INSERT INTO channels (channel_id, title, username, is_forum, updated_at) "
                   "VALUES (-1002345678901, 'src', NULL, FALSE, 1.0)")
    store = open_storage(db_url, clock=clock)
    try:
        assert read_version(raw_db.conn) == CURRENT_VERSION
        assert {"transfers", "transfer_parts", "part_journal", "content_claims",
                "packages"} <= set(raw_db.tables())
        assert [c.channel_id for c in store.list_channels()] == [-1002345678901]
        _create(store)
        _upload_all(store, "t1")
        assert raw_db.rows("SELECT message_id, document_id FROM transfer_parts "
                           "ORDER BY part_index") == [(100, BIG_DOCUMENT), (101, BIG_DOCUMENT + 1)]
    finally:
        store.close()


def test_schema_refuses_an_unknown_state(raw_db, store):
    _create(store)
    with pytest.raises(Exception):
        raw_db.execute("UPDATE transfers SET state = 'lost' WHERE id = 't1'")
