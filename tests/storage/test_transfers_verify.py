"""Verifier support in storage.transfers on both backends: schedule_check,
oldest_due_check / count_due_checks, release_transfer_leases,
mark_transfer_cleaned (never before verified), retry_transfer."""
from __future__ import annotations

import pytest

from storage import LeaseLostError, TransferStateError, open_storage
from storage.transfers import VERIFY_STATES

SHA = "ab" * 32


@pytest.fixture
def store(db_url, clock):
    s = open_storage(db_url, clock=clock)
    yield s
    s.close()


def _create(store, tid, *, n=2, sha=None):
    return store.create_transfer(
        tid, source_path=f"/in/{tid}", size=20, sha256=sha or f"{hash(tid) & 0xffff:064x}",
        destination="@stash", manifest_path=f"/m/{tid}", delete_original=False,
        parts=[(i, i * 10, 10, f"{i:064x}", f"f.{i}", 1000 + i) for i in range(n)])


def _uploaded(store, tid, *, n=2, delay=0.0):
    _create(store, tid, n=n)
    for i in range(n):
        store.record_part_sent(tid, i, message_id=100 + i, document_id=5000 + i, account="alice")
    return store.mark_transfer_uploaded(tid, first_check_delay=delay)


def _verified(store, tid, n=2):
    _uploaded(store, tid, n=n)
    store.record_check(tid, present=range(n))
    store.set_transfer_state(tid, "verifying")
    return store.set_transfer_state(tid, "verified")


def test_schedule_check_one_or_all_verifiable(store, clock):
    _uploaded(store, "a", delay=100)
    _uploaded(store, "b", delay=200)
    _create(store, "p")  # planned: never scheduled for a check
    assert store.count_due_checks() == 0 and store.oldest_due_check() is None
    assert store.schedule_check("a") == 1
    assert store.get_transfer("a").next_check_at == clock.now
    assert store.count_due_checks() == 1 and store.oldest_due_check() == clock.now
    assert store.schedule_check("p") == 0 and store.schedule_check("nope") == 0
    assert store.schedule_check(at=clock.now - 5) == 2
    assert store.oldest_due_check() == clock.now - 5 and store.count_due_checks() == 2
    assert store.get_transfer("p").next_check_at == clock.now  # untouched (created due)


def test_oldest_due_check_ignores_future_checks_and_counts_leased_ones(store, clock):
    _uploaded(store, "a", delay=0)
    clock.advance(10)
    _uploaded(store, "b", delay=0)
    _uploaded(store, "c", delay=50)
    assert store.oldest_due_check() == clock.now - 10
    assert store.claim_due_transfers("v1", 1, 60)[0].id == "a"
    assert store.oldest_due_check() == clock.now - 10  # leased but still not checked
    assert store.count_due_checks() == 2
    assert set(VERIFY_STATES) == {"uploaded", "verifying", "verified", "cleaned"}


def test_release_transfer_leases_of_an_earlier_incarnation(store, clock):
    for tid in ("a", "b", "c"):
        _uploaded(store, tid)
    store.claim_due_transfers("node1/verifier#old.1", 1, 600)
    store.claim_due_transfers("node1/verifier#new.2", 1, 600)
    store.claim_due_transfers("node2/verifier#x.1", 1, 600)
    assert store.release_transfer_leases("node1/verifier#", keep="node1/verifier#new.") == 1
    owners = sorted(filter(None, (store.get_transfer(t).lease_owner for t in "abc")))
    assert owners == ["node1/verifier#new.2", "node2/verifier#x.1"]
    # the released one is claimable again at once
    assert [t.id for t in store.claim_due_transfers("node1/verifier#new.3", 5, 600)] == ["a"]
    with pytest.raises(ValueError):
        store.release_transfer_leases("")


def test_cleaned_only_after_every_part_is_verified(store, clock):
    _uploaded(store, "t")
    with pytest.raises(TransferStateError, match="only a verified"):
        store.mark_transfer_cleaned("t")
    store.record_check("t", present=[0])
    store.set_transfer_state("t", "verifying")
    store.set_transfer_state("t", "verified")  # a state set by hand, part 1 unverified
    with pytest.raises(TransferStateError, match=r"parts not verified: \[1\]"):
        store.mark_transfer_cleaned("t")
    store.record_check("t", present=[1])
    leased = store.claim_due_transfers("v", 1, 60, states=("verified",))
    assert [t.id for t in leased] == ["t"]
    with pytest.raises(LeaseLostError):
        store.mark_transfer_cleaned("t", lease_owner="other")
    rec = store.mark_transfer_cleaned("t", lease_owner="v", next_check_at=clock.now + 99)
    assert (rec.state, rec.next_check_at) == ("cleaned", clock.now + 99)
    parts = store.list_parts("t")  # the compact record stays
    assert [p.message_id for p in parts] == [100, 101]
    # cleaned is still re-checked on the slow cycle, and can go back to verifying
    assert store.set_transfer_state("t", "verifying").state == "verifying"


def test_a_duplicate_is_cleaned_only_when_its_reference_is_verified(store):
    _uploaded(store, "orig")
    _create(store, "dup")
    store.mark_transfer_duplicate("dup", "orig")
    store.set_transfer_state("dup", "verifying")
    store.set_transfer_state("dup", "verified")
    with pytest.raises(TransferStateError, match="referenced transfer 'orig' is 'uploaded'"):
        store.mark_transfer_cleaned("dup")
    store.record_check("orig", present=[0, 1])
    store.set_transfer_state("orig", "verifying")
    store.set_transfer_state("orig", "verified")
    assert store.mark_transfer_cleaned("dup").state == "cleaned"


def test_failed_keeps_everything_and_cannot_be_cleaned(store):
    _verified(store, "t")
    store.set_transfer_state("t", "failed", reason="lost")
    with pytest.raises(TransferStateError):
        store.mark_transfer_cleaned("t")
    assert [p.message_id for p in store.list_parts("t")] == [100, 101]


@pytest.mark.parametrize("sent,expected", [(2, "verifying"), (1, "uploading"), (0, "planned")])
def test_retry_transfer_picks_where_to_start(store, clock, sent, expected):
    _create(store, "t")
    store.set_transfer_state("t", "uploading", account="alice")
    for i in range(sent):
        store.record_part_sent("t", i, message_id=100 + i, document_id=None, account="alice")
    store.set_transfer_state("t", "failed", reason="gave up after 5 re-uploads", attempts=5)
    clock.advance(30)
    rec = store.retry_transfer("t")
    assert (rec.state, rec.attempts, rec.reason, rec.next_check_at) == (expected, 0, None, clock.now)
    assert rec.lease_owner is None
    if expected == "uploading":
        assert rec.account is None  # any eligible account may resume it
    with pytest.raises(TransferStateError, match="only a failed transfer"):
        store.retry_transfer("t")


def test_retry_of_a_failed_duplicate_follows_its_reference_again(store, clock):
    _uploaded(store, "orig")
    _create(store, "dup")
    store.mark_transfer_duplicate("dup", "orig")
    store.set_transfer_state("dup", "failed", reason="reference failed")
    rec = store.retry_transfer("dup")
    assert (rec.state, rec.duplicate_of, rec.next_check_at) == ("uploaded", "orig", clock.now)


def _sent(store, tid, sha):
    _create(store, tid, sha=sha)
    for i in range(2):
        store.record_part_sent(tid, i, message_id=hash(tid) % 1000 * 10 + i, document_id=None,
                               account="alice")
    return store.mark_transfer_uploaded(tid)


def test_retry_of_a_duplicate_of_a_lost_package_uploads_it_from_its_own_original(store, clock):
    """The referenced copy was lost (failed) and no other copy holds the content: following
    it again would only fail again, so the retry drops the reference and the transfer is
    planned from its own manifest and original."""
    _sent(store, "orig", SHA)
    _create(store, "dup", sha=SHA)
    store.mark_transfer_duplicate("dup", "orig")
    store.set_transfer_state("orig", "failed", reason="lost after cleanup: SOURCE GONE")
    store.set_transfer_state("dup", "failed", reason="referenced transfer orig failed")
    rec = store.retry_transfer("dup")
    assert (rec.state, rec.duplicate_of, rec.reason) == ("planned", None, None)
    assert store.claim_content(SHA, "node/dup", 60, "dup").granted  # nothing holds it: upload


def test_a_new_copy_of_a_lost_package_takes_over_its_by_reference_transfers(store, clock):
    """When another copy is uploaded and holds the content of the lost one, the transfers
    completed by reference to the lost one follow the new copy (a failed one on its retry)."""
    _sent(store, "orig", SHA)
    for tid in ("dup", "dup2"):
        _create(store, tid, sha=SHA)
        store.mark_transfer_duplicate(tid, "orig")
    store.set_transfer_state("orig", "failed", reason="lost after cleanup: SOURCE GONE")
    store.set_transfer_state("dup", "failed", reason="referenced transfer orig failed")
    _sent(store, "copy", SHA)
    assert store.find_package(SHA).transfer_id == "copy"
    assert store.get_transfer("dup2").duplicate_of == "copy"   # still fine: follows the copy
    rec = store.retry_transfer("dup")
    assert (rec.state, rec.duplicate_of, rec.next_check_at) == ("uploaded", "copy", clock.now)
    assert store.get_transfer("orig").duplicate_of is None      # the lost one itself untouched


def test_retry_of_a_duplicate_of_a_lost_package_follows_a_live_copy(store, clock):
    """The reference failed and a copy holds the content (its takeover did not re-point
    this transfer, say one referenced before): the retry follows the live copy."""
    _sent(store, "orig", SHA)
    store.set_transfer_state("orig", "failed", reason="lost after cleanup: SOURCE GONE")
    _sent(store, "copy", SHA)
    _create(store, "dup", sha=SHA)
    store.mark_transfer_duplicate("dup", "orig")
    store.set_transfer_state("dup", "failed", reason="referenced transfer orig failed")
    rec = store.retry_transfer("dup")
    assert (rec.state, rec.duplicate_of) == ("uploaded", "copy")


def test_a_reupload_claims_the_content_of_its_own_package(store, clock):
    """The dispatcher claims content before it hands out a transfer, re-uploads included:
    the package row of the transfer itself must not make it a duplicate of itself."""
    _uploaded(store, "t")
    sha = store.get_transfer("t").sha256
    assert store.find_package(sha).transfer_id == "t"
    c = store.claim_content(sha, "node/t", 60, "t")
    assert (c.granted, c.existing_package, c.holder) == (True, None, "node/t")
    # anyone else still finds the package
    c = store.claim_content(sha, "node/u", 60, "u")
    assert (c.granted, c.existing_package) == (False, "t")
    assert store.claim_content(sha, "node/x", 60).existing_package == "t"
    # the re-upload completes: its claim is released, the package stays
    store.set_part_random_id("t", 0, 77)
    store.set_transfer_state("t", "verifying")
    store.set_transfer_state("t", "uploading")
    store.record_part_sent("t", 0, message_id=900, document_id=None, account="bob")
    store.mark_transfer_uploaded("t")
    assert store.claim_content(sha, "node/t2", 60, "t").holder == "node/t2"  # no stale claim


def test_record_passes_writes_many_in_one_go_and_skips_lost_leases(store, clock):
    for tid in ("a", "b", "c"):
        _uploaded(store, tid)
    store.set_transfer_state("c", "failed", reason="x")
    store.claim_due_transfers("v", 10, 60)  # a and b (c is failed)
    store.release_transfer_lease("b", "v")
    store.claim_due_transfers("w", 10, 60)  # b now belongs to w
    clock.advance(5)
    done = store.record_passes([("a", "verified", clock.now + 100, True),
                                ("b", "verified", clock.now + 100, False),
                                ("c", "verified", None, False)], lease_owner="v")
    assert done == ["a"]
    a = store.get_transfer("a")
    assert (a.state, a.next_check_at, a.last_check_at, a.lease_owner) == (
        "verified", clock.now + 100, clock.now, None)
    assert [p.verified_at for p in store.list_parts("a")] == [clock.now, clock.now]
    assert store.get_transfer("b").state == "uploaded"
    assert all(p.verified_at is None for p in store.list_parts("b"))
    assert store.record_passes([], lease_owner="v") == []
