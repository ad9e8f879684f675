"""Races on claims and due-check leases: many threads, each with its own Storage
(its own connections), on SQLite and PostgreSQL."""
from __future__ import annotations

import time

import pytest

from storage import open_storage
from tests.storage.race_helpers import race

SHA = "ef" * 32
THREADS = 16


def _transfer(store, tid, sha=SHA, parts=1):
    store.create_transfer(
        tid, source_path=f"/in/{tid}", size=parts, sha256=sha, destination="@stash",
        manifest_path=f"/m/{tid}", delete_original=False,
        parts=[(i, i, 1, "00" * 32, f"{tid}.{i}", i + 1) for i in range(parts)])


def _upload(store, tid, parts=1):
    for i in range(parts):
        store.record_part_sent(tid, i, message_id=1000 + i, document_id=7, account="alice")
    store.mark_transfer_uploaded(tid)


def test_exactly_one_of_many_claimers_wins_a_hash(stores):
    results = race(stores, lambda i, s: s.claim_content(SHA, f"w{i}", 30, f"t{i}"))
    winners = [r for r in results if r.granted]
    assert len(winners) == 1
    assert {r.holder for r in results} == {winners[0].holder}
    assert all(r.existing_package is None for r in results)


def test_after_upload_every_claimer_sees_the_package(stores):
    s0 = stores[0]
    _transfer(s0, "t0")
    assert s0.claim_content(SHA, "w0", 30, "t0").granted
    _upload(s0, "t0")
    results = race(stores, lambda i, s: s.claim_content(SHA, f"x{i}", 30, f"u{i}"))
    assert [(r.granted, r.existing_package) for r in results] == [(False, "t0")] * THREADS


def test_upload_racing_claimers_never_grants_after_the_package(stores):
    """Claimers racing the upload either see the live claim or the package."""
    s0 = stores[0]
    _transfer(s0, "t0")
    assert s0.claim_content(SHA, "w0", 30, "t0").granted

    def step(i, s):
        if i == 0:
            _upload(s, "t0")
            return None
        return s.claim_content(SHA, f"x{i}", 30, f"u{i}")

    results = [r for r in race(stores, step) if r is not None]
    assert all(not r.granted for r in results)
    assert all(r.holder == "w0" or r.existing_package == "t0" for r in results)


def test_one_claimer_takes_over_an_expired_lease(stores, clock):
    assert stores[0].claim_content(SHA, "dead", 10, "t-dead").granted
    clock.advance(11)
    results = race(stores, lambda i, s: s.claim_content(SHA, f"w{i}", 10, f"t{i}"))
    winners = [r.holder for r in results if r.granted]
    assert len(winners) == 1 and winners[0] != "dead"
    assert {r.holder for r in results} == {winners[0]}


def test_due_transfers_are_never_leased_twice(stores, clock):
    n = 60
    for i in range(n):
        tid = f"t{i:03d}"
        _transfer(stores[0], tid, sha=f"{i:064x}")
        _upload(stores[0], tid)

    def drain(i, s):
        mine = []
        while True:
            got = s.claim_due_transfers(f"v{i}", 3, 600)
            if not got:
                return mine
            assert all(t.lease_owner == f"v{i}" for t in got)
            assert len(got) <= 3
            mine.extend(t.id for t in got)

    per_owner = race(stores, drain)
    claimed = [tid for ids in per_owner for tid in ids]
    assert sorted(claimed) == [f"t{i:03d}" for i in range(n)]  # each exactly once
    leases = {t.id: t.lease_owner for t in stores[0].list_transfers(limit=n)}
    for i, ids in enumerate(per_owner):
        assert all(leases[tid] == f"v{i}" for tid in ids)


def test_skip_locked_does_not_wait_for_a_locked_row(db_url, raw_db, clock):
    if raw_db.url.dialect != "postgres":
        pytest.skip("row locks are a PostgreSQL feature (SQLite serialises writers)")
    store = open_storage(db_url, clock=clock)
    try:
        for i in range(3):
            _transfer(store, f"t{i}", sha=f"{i:064x}")
            _upload(store, f"t{i}")
        raw_db.execute("BEGIN")
        raw_db.execute("SELECT id FROM transfers WHERE id = 't0' FOR UPDATE")
        started = time.monotonic()
        got = store.claim_due_transfers("v", 10, 60)
        assert time.monotonic() - started < 5
        assert sorted(t.id for t in got) == ["t1", "t2"]
        raw_db.execute("ROLLBACK")
        assert [t.id for t in store.claim_due_transfers("v2", 10, 60)] == ["t0"]
    finally:
        store.close()
