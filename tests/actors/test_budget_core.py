"""Budget (pure logic): limits, quotas, cooldowns, fairness — no threads."""
from __future__ import annotations

import pytest

from actors.budget_core import (
    DAY, HOUR, Budget, InvalidRequestError, Quota, UnsatisfiableRequestError,
)


class FakeClock:
    def __init__(self, now: float = 1_000_000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


def ids(leases):
    return [lease.request_id for lease in leases]


@pytest.fixture
def clock():
    return FakeClock()


def test_grants_within_byte_limit_and_release_wakes_next(clock):
    b = Budget(limit_bytes=10, global_slots=10, per_account_slots=10, clock=clock)
    [first] = b.reserve("r1", "a", 8)
    assert first.nbytes == 8 and first.account == "a" and first.kind == "part"
    assert b.reserve("r2", "a", 5) == [] and b.is_waiting("r2")
    assert b.snapshot().reserved_bytes == 8 and b.snapshot().waiting == 1
    assert ids(b.release(first.lease_id)) == ["r2"]
    assert b.release(first.lease_id) == []  # idempotent
    assert b.reserved_bytes == 5


def test_request_larger_than_limit_is_refused_not_queued(clock):
    b = Budget(10, 4, 4, clock=clock)
    with pytest.raises(UnsatisfiableRequestError, match="exceeds the budget limit of 10"):
        b.reserve("big", "a", 11)
    assert b.waiting == 0
    b.reserve("ok", "a", 10)
    with pytest.raises(InvalidRequestError, match="already in use"):
        b.reserve("ok", "a", 1)
    with pytest.raises(InvalidRequestError, match="unknown budget kind"):
        b.reserve("x", "a", 1, kind="chunk")
    with pytest.raises(InvalidRequestError):
        b.reserve("y", "a", -1)


def test_global_and_per_account_slots(clock):
    b = Budget(100, global_slots=3, per_account_slots=2, clock=clock)
    granted = ids(b.reserve("a1", "a", 1) + b.reserve("a2", "a", 1) + b.reserve("a3", "a", 1))
    assert granted == ["a1", "a2"]                   # a's own window is 2
    assert ids(b.reserve("b1", "b", 1)) == ["b1"]    # a3 blocked by its own account only
    assert b.reserve("b2", "b", 1) == []             # global slots (3) taken
    snap = {s.account: s for s in b.snapshot().accounts}
    assert (snap["a"].parts_in_flight, snap["a"].waiting_parts) == (2, 1)
    assert b.snapshot().slots_in_use == 3


def test_heavy_account_cannot_starve_others(clock):
    b = Budget(limit_bytes=1, global_slots=10, per_account_slots=10, clock=clock)
    leases = b.reserve("a0", "a", 1)
    for i in range(1, 50):
        b.reserve(f"a{i}", "a", 1)
    b.reserve("b0", "b", 1)
    b.reserve("c0", "c", 1)
    order = []
    while leases:
        lease = leases.pop()
        order.append(lease.request_id)
        leases.extend(b.release(lease.lease_id))
    assert order[:5] == ["a0", "a1", "b0", "c0", "a2"]
    assert [r for r in order if r.startswith("a")] == [f"a{i}" for i in range(50)]


def test_round_robin_interleaves_accounts(clock):
    b = Budget(limit_bytes=1, global_slots=10, per_account_slots=10, clock=clock)
    [held] = b.reserve("hold", "z", 1)
    for i in range(3):
        for acct in "abc":
            b.reserve(f"{acct}{i}", acct, 1)
    order, leases = [], b.release(held.lease_id)
    while leases:
        lease = leases.pop()
        order.append(lease.request_id)
        leases.extend(b.release(lease.lease_id))
    assert order == ["a0", "b0", "c0", "a1", "b1", "c1", "a2", "b2", "c2"]


def test_large_request_is_not_starved_by_small_ones_from_other_accounts(clock):
    b = Budget(limit_bytes=10, global_slots=10, per_account_slots=10, clock=clock)
    [small] = b.reserve("s0", "a", 4)
    assert b.reserve("big", "b", 10) == []
    assert b.reserve("s1", "a", 4) == []      # would fit, but capacity is held for "big"
    assert b.reserve("s2", "c", 1) == []
    assert ids(b.release(small.lease_id)) == ["big"]


def test_account_blocked_by_itself_does_not_block_others(clock):
    b = Budget(limit_bytes=100, global_slots=10, per_account_slots=1, clock=clock)
    b.reserve("a0", "a", 1)
    assert b.reserve("a1", "a", 90) == []     # a's window is full
    assert ids(b.reserve("b0", "b", 50)) == ["b0"]
    b.cooldown("c", clock.now + 60)
    assert b.reserve("c0", "c", 1) == []
    assert ids(b.reserve("d0", "d", 1)) == ["d0"]


def test_cooldown_blocks_until_tick_after_it_ends(clock):
    b = Budget(100, 10, 10, clock=clock)
    b.cooldown("a", clock.now + 30)
    b.cooldown("a", clock.now + 10)          # an earlier end never shortens it
    assert b.reserve("p", "a", 1) == [] and b.reserve("f", "a", 1, kind="file") == []
    assert b.next_wakeup() == clock.now + 30
    assert b.snapshot().accounts[0].cooldown_until == clock.now + 30
    clock.now += 29.9
    assert b.tick() == []
    clock.now += 0.1
    assert sorted(ids(b.tick())) == ["f", "p"]
    assert b.snapshot().accounts[0].cooldown_until is None


def test_file_quotas_slide_with_the_clock(clock):
    q = Quota(hourly_files=2, daily_files=3, hourly_bytes=100)
    b = Budget(10, 10, 10, quotas={"a": q}, clock=clock)
    start = clock.now
    assert ids(b.reserve("f1", "a", 10, "file")) == ["f1"]
    clock.now += 10
    assert ids(b.reserve("f2", "a", 10, "file")) == ["f2"]
    assert b.reserve("f3", "a", 10, "file") == []           # 2 files this hour
    assert ids(b.reserve("other", "b", 10, "file")) == ["other"]  # b has no quota
    assert b.reserve("p", "a", 10) != []                     # parts don't count files
    assert b.next_wakeup() == start + HOUR
    clock.now = start + HOUR
    assert ids(b.tick()) == ["f3"]                           # f1 slid out of the hour
    assert b.reserve("f4", "a", 10, "file") == []            # 3 files today
    clock.now = start + DAY + 10
    assert ids(b.tick()) == ["f4"]


def test_file_byte_quota_charges_whole_document_up_front(clock):
    b = Budget(10, 10, 10, quotas={"a": Quota(hourly_bytes=100, daily_bytes=150)}, clock=clock)
    b.reserve("f1", "a", 70, "file")
    assert b.reserve("f2", "a", 40, "file") == []
    snap = b.snapshot().accounts[0]
    assert (snap.hourly_files, snap.hourly_bytes, snap.waiting_files) == (1, 70, 1)
    with pytest.raises(UnsatisfiableRequestError, match="hourly quota of 100"):
        b.reserve("huge", "a", 101, "file")
    clock.now += HOUR
    assert ids(b.tick()) == ["f2"]
    with pytest.raises(UnsatisfiableRequestError, match="file quota is 0"):
        Budget(10, 1, 1, quotas={"z": Quota(daily_files=0)}, clock=clock).reserve("r", "z", 1, "file")


def test_file_waiting_on_quota_does_not_block_parts_of_same_account(clock):
    b = Budget(10, 10, 10, quotas={"a": Quota(hourly_files=1)}, clock=clock)
    b.reserve("f1", "a", 1, "file")
    assert b.reserve("f2", "a", 1, "file") == []
    assert ids(b.reserve("p1", "a", 5)) == ["p1"]


def test_fifo_within_account_no_overtaking_by_smaller(clock):
    b = Budget(limit_bytes=10, global_slots=10, per_account_slots=10, clock=clock)
    [held] = b.reserve("held", "a", 6)
    assert b.reserve("big", "a", 8) == []
    assert b.reserve("small", "a", 1) == []   # would fit, but must not overtake "big"
    assert ids(b.release(held.lease_id)) == ["big", "small"]


def test_cancel_waiting_head_unblocks_others_and_cancel_granted_releases(clock):
    b = Budget(limit_bytes=10, global_slots=10, per_account_slots=10, clock=clock)
    [held] = b.reserve("held", "a", 5)
    assert b.reserve("big", "b", 10) == []
    assert b.reserve("small", "c", 5) == []
    assert ids(b.cancel("big")) == ["small"]
    assert b.cancel("big") == []
    assert b.cancel("held") == [] and b.lease(held.lease_id) is None
    assert b.reserved_bytes == 5
    b.reserve("held", "a", 5)                  # a cancelled id may be reused


def test_snapshot_to_dict_and_lease_ids_unique_across_instances(clock):
    b1, b2 = Budget(10, 1, 1, clock=clock), Budget(10, 1, 1, clock=clock)
    [l1], [l2] = b1.reserve("r", "a", 1), b2.reserve("r", "a", 1)
    assert l1.lease_id != l2.lease_id
    d = b1.snapshot().to_dict()
    assert d["reserved_bytes"] == 1 and d["accounts"][0]["account"] == "a"


def test_invalid_construction():
    with pytest.raises(ValueError, match="limit_bytes must be positive"):
        Budget(0, 1, 1)


def test_a_part_lease_of_several_slots_takes_them_all(clock):
    b = Budget(100, global_slots=6, per_account_slots=4, clock=clock)
    [four] = b.reserve("a4", "a", 40, slots=4)
    assert four.slots == 4 and b.slots_in_use == 4 and b.reserved_bytes == 40
    assert b.reserve("a1", "a", 10) == []            # a's 4 slots are all taken by one lease
    assert ids(b.reserve("b2", "b", 20, slots=2)) == ["b2"]
    assert b.reserve("b1", "b", 1) == []             # global slots (6) taken
    snap = {s.account: s for s in b.snapshot().accounts}
    assert (snap["a"].parts_in_flight, snap["b"].parts_in_flight) == (4, 2)
    assert ids(b.release(four.lease_id)) == ["a1", "b1"]
    assert b.slots_in_use == 4 and b.reserved_bytes == 31


def test_a_several_slot_request_waits_in_fifo_order_for_all_its_slots(clock):
    b = Budget(100, global_slots=8, per_account_slots=4, clock=clock)
    [one] = b.reserve("a1", "a", 1)
    assert b.reserve("a4", "a", 4, slots=4) == []   # needs the whole window: waits
    assert b.reserve("a1b", "a", 1) == []            # FIFO: no overtaking the larger head
    [four] = b.release(one.lease_id)
    assert four.request_id == "a4" and b.slots_in_use == 4
    assert ids(b.release(four.lease_id)) == ["a1b"]


def test_more_slots_than_an_account_has_is_refused(clock):
    b = Budget(100, global_slots=8, per_account_slots=4, clock=clock)
    with pytest.raises(UnsatisfiableRequestError, match="5 slots"):
        b.reserve("x", "a", 5, slots=5)
    with pytest.raises(InvalidRequestError, match="slots"):
        b.reserve("y", "a", 5, slots=0)
    [f] = b.reserve("f", "a", 5, kind="file", slots=3)   # files hold no slots
    assert f.slots == 0 and b.slots_in_use == 0
