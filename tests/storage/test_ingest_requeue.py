"""storage ``requeue_lost_package`` (a package lost after cleanup goes back to its set to be
fetched again) and the content claim of that re-fetch, on SQLite and PostgreSQL."""
from __future__ import annotations

import pytest

from storage import open_storage
from tests.storage.test_ingest import CH, SHA, _msg, _package, _set


@pytest.fixture
def store(db_url, clock):
    s = open_storage(db_url, clock=clock)
    yield s
    s.close()


def ingested(store, key="k", tid="t1"):
    _set(store, key)
    _msg(store, 1 if key == "k" else 2, set_key=key, document_id=501 if key == "k" else 502)
    store.claim_ready_sets("p", 1, 60)
    return store.mark_set_ingested(key, transfer_id=tid, sha256=SHA, lease_owner="p")


def test_the_ingested_set_of_a_lost_transfer_is_ready_again(store, clock):
    _package(store)
    ingested(store)
    clock.advance(5)
    assert store.requeue_lost_package("t1", reason="fetching again") == ["k"]
    s = store.get_archive_set("k")
    assert (s.state, s.transfer_id, s.sha256, s.lease_owner) == ("ready", "t1", None, None)
    assert (s.attempts, s.next_attempt_at, s.reason) == (0, None, "fetching again")
    # claimable at once, by the channel's scan
    [claimed] = store.claim_ready_sets("q", 5, 60, channel_id=CH, states=("ready", "downloading"))
    assert claimed.set_key == "k" and claimed.transfer_id == "t1"
    # already requeued (not "ingested" any more): nothing twice
    assert store.requeue_lost_package("t1", reason="again") == []


def test_requeue_touches_only_the_sets_of_that_transfer(store):
    _package(store)
    ingested(store, "k", "t1")
    ingested(store, "k2", "t2")
    assert store.requeue_lost_package("t9", reason="x") == []     # not from ingest
    assert store.requeue_lost_package("t1", reason="x") == ["k"]
    assert store.get_archive_set("k2").state == "ingested"


def test_the_lost_package_does_not_satisfy_its_own_refetch_claim(store):
    _package(store, tid="t1")
    # the re-fetch of t1 claims the content for t1 itself: granted
    mine = store.claim_content(SHA, "node/t1", 60, "t1")
    assert mine.granted and mine.existing_package is None
    # any other set with the same content still finds the package: a duplicate of t1
    other = store.claim_content(SHA, "node/t2", 60, "t2")
    assert (other.granted, other.existing_package) == (False, "t1")


def test_retry_requeues_the_failed_set_of_a_refetch_only_when_asked(store):
    _package(store)
    ingested(store)
    assert store.requeue_lost_package("t1", reason="fetching again") == ["k"]
    store.set_archive_set_state("k", "failed", reason="re-fetch impossible")
    assert store.requeue_lost_package("t1", reason="x") == []        # the verifier's: ingested only
    assert store.requeue_lost_package("t1", reason="retry", states=("failed",)) == ["k"]
    s = store.get_archive_set("k")
    assert (s.state, s.transfer_id, s.reason) == ("ready", "t1", "retry")
    with pytest.raises(ValueError):
        store.requeue_lost_package("t1", reason="x", states=("lost",))


def test_channel_scanned_by_others_sees_only_other_owners_recent_runs(store, clock):
    store.start_run(mapping="a:x", channel_id=CH, account="a", owner="me")
    assert not store.channel_scanned_by_others(CH, "me", since=0.0)
    clock.advance(10)
    store.start_run(mapping="b:x", channel_id=CH, account="b", owner="other")
    assert store.channel_scanned_by_others(CH, "me", since=clock() - 5)
    assert not store.channel_scanned_by_others(CH, "me", since=clock() + 1)   # not since then
    assert not store.channel_scanned_by_others(CH + 1, "me", since=0.0)       # another channel
    assert not store.channel_scanned_by_others(CH, "other", since=clock() - 5)


def test_refetch_waiting_channels_names_only_ready_sets_of_failed_transfers(store):
    _package(store)
    ingested(store)
    assert store.refetch_waiting_channels() == set()                  # ingested, not lost
    store.requeue_lost_package("t1", reason="fetching again")
    assert store.refetch_waiting_channels() == set()                  # t1 itself is fine
    store.set_transfer_state("t1", "failed", reason="lost after cleanup: part 1")
    assert store.refetch_waiting_channels() == {CH}
    store.set_archive_set_state("k", "failed", reason="re-fetch impossible")
    assert store.refetch_waiting_channels() == set()                  # no longer waiting
