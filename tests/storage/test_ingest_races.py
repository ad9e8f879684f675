"""Races on ingest records: many threads, each with its own Storage (its own
connections, as separate processes would have), on SQLite and PostgreSQL.
Exactly one of many recorders wins a source message or a document id; sets and
index work are never leased twice."""
from __future__ import annotations


import pytest

from tests.storage.race_helpers import race

THREADS = 12
CH = -100777
SHA = "cd" * 32


@pytest.mark.timeout(60)
def test_one_recorder_wins_a_source_message_and_a_document_id(stores):
    def record(i, s):
        seen = s.record_source_message(CH, 42, account=f"acct{i}", file_name="a.zip", size=10,
                                       document_id=9000, set_key="k")
        added = s.record_ingested_documents([(9000, CH, 42)], transfer_id=f"t{i}")
        return seen, added

    results = race(stores, record)
    created = [seen for seen, _ in results if seen.created]
    assert len(created) == 1
    winner = created[0].record.account
    assert {seen.record.account for seen, _ in results} == {winner}  # everyone sees the winner
    added = [i for i, (_, n) in enumerate(results) if n == 1]
    assert len(added) == 1 and sum(n for _, n in results) == 1
    assert stores[0].find_ingested_document(9000).transfer_id == f"t{added[0]}"


@pytest.mark.timeout(60)
def test_racing_set_upserts_and_meta_registrations_make_one_row(stores):
    def step(i, s):
        st = s.upsert_archive_set("k", channel_id=CH, base_name="a", archive_format="zip",
                                  scheme="zip", expected_parts=None, seen_parts=1 + i % 3,
                                  complete=i % 2 == 0, total_size=10)
        meta = s.register_package_meta(SHA, f"t{i}")
        return st, meta

    results = race(stores, step)
    assert len({meta.transfer_id for _, meta in results}) == 1
    final = stores[0].get_archive_set("k")
    assert final.complete and final.state == "ready"  # some upsert said complete
    assert stores[0].archive_sets_by_state()["ready"] == 1


@pytest.mark.timeout(60)
def test_sets_and_index_work_are_never_leased_twice(stores, clock):
    s0 = stores[0]
    for n in range(30):
        s0.upsert_archive_set(f"set{n:02d}", channel_id=CH, base_name=f"a{n}",
                              archive_format="7z", scheme="7z", expected_parts=1, seen_parts=1,
                              complete=True, total_size=1)
        sha = f"{n:064x}"
        s0.register_package_meta(sha, f"t{n}")
        s0.create_transfer(f"t{n}", source_path="/s", size=1, sha256=sha, destination="@d",
                           manifest_path="/m", delete_original=False,
                           parts=[(0, 0, 1, "00" * 32, "a", n + 1)])
        s0.record_part_sent(f"t{n}", 0, message_id=n + 1, document_id=None, account="a")
        s0.mark_transfer_uploaded(f"t{n}")

    def claim(i, s):
        return ([x.set_key for x in s.claim_ready_sets(f"w{i}", 3, 60)],
                [x.sha256 for x in s.claim_index_work(f"w{i}", 3, 60)])

    results = race(stores, claim)
    sets = [k for got, _ in results for k in got]
    metas = [k for _, got in results for k in got]
    assert len(sets) == len(set(sets)) == 30  # 12 x 3 >= 30: all taken, none twice
    assert len(metas) == len(set(metas)) == 30
    owners = {x.set_key: x.lease_owner for x in s0.list_archive_sets(limit=100)}
    for i, (got, _) in enumerate(results):
        assert all(owners[k] == f"w{i}" for k in got)
    # nothing is free while the leases live; all of it after they expire, once
    assert race(stores, lambda i, s: s.claim_ready_sets(f"x{i}", 3, 60)) == [[]] * THREADS
    clock.advance(61)
    again = [k.set_key for got in race(stores, lambda i, s: s.claim_ready_sets(f"y{i}", 5, 60))
             for k in got]
    assert sorted(again) == sorted(set(sets))
