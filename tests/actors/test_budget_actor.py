"""BudgetActor: answers by tell, wakes waiters, honours cooldowns via Tick."""
from __future__ import annotations

import queue
import threading

import pykka
import pytest
from prometheus_client import CollectorRegistry

from actors.budget import BudgetActor, budget_metrics
from actors.budget_core import Quota
from actors.budget_messages import (
    BudgetGranted, BudgetRefused, CancelBudget, FloodWaitHit, GetBudgetSnapshot, ReleaseBudget,
    ReserveBudget, SetAccountQuota, Tick,
)

T = 5  # every wait is bounded


class Inbox:
    """A reply_to that is not an actor: replies land in a queue."""

    def __init__(self):
        self.q: queue.Queue = queue.Queue()

    def tell(self, message):
        self.q.put(message)

    def next(self):
        return self.q.get(timeout=T)

    def empty_after(self, budget):
        budget.ask(GetBudgetSnapshot(), timeout=T)  # every earlier tell has been handled
        return self.q.empty()


class Held:
    """Shared counter of leases held by requesters, to check the byte budget."""

    def __init__(self):
        self.lock = threading.Lock()
        self.now = self.peak = 0

    def add(self, n):
        with self.lock:
            self.now += n
            self.peak = max(self.peak, self.now)


class Requester(pykka.ThreadingActor):
    """Reserves ``count`` parts at start; records and releases each grant."""

    def __init__(self, name, account, budget, count, nbytes, held, events):
        super().__init__()
        self.name, self.account, self.budget = name, account, budget
        self.count, self.nbytes, self.held, self.events = count, nbytes, held, events

    def on_start(self):
        for i in range(self.count):
            self.budget.tell(ReserveBudget((self.name, i), self.account, self.nbytes, "part", self.actor_ref))

    def on_receive(self, message):
        if isinstance(message, BudgetGranted):
            self.held.add(message.lease.nbytes)
            self.events.put(message)
            self.held.add(-message.lease.nbytes)
            self.budget.tell(ReleaseBudget(message.lease.lease_id))
        else:
            self.events.put(message)


class Holder(pykka.ThreadingActor):
    """Keeps whatever it is granted."""

    def __init__(self, events):
        super().__init__()
        self.events = events

    def on_receive(self, message):
        self.events.put(message)


class FakeClock:
    def __init__(self):
        self.now = 1_000_000.0

    def __call__(self):
        return self.now


def test_many_requesters_all_granted_fifo_within_byte_budget():
    budget = BudgetActor.start(limit_bytes=3, global_slots=10, per_account_slots=10)
    held, events = Held(), queue.Queue()
    names = [(f"r{i}", "abc"[i % 3]) for i in range(6)]
    for name, account in names:
        Requester.start(name, account, budget, 10, 1, held, events)
    grants = [events.get(timeout=T) for _ in range(60)]
    assert all(isinstance(g, BudgetGranted) for g in grants)
    assert held.peak <= 3
    for name, _ in names:
        mine = [g.request_id[1] for g in grants if g.request_id[0] == name]
        assert mine == list(range(10)), f"{name} served out of order"
    snap = budget.ask(GetBudgetSnapshot(), timeout=T)
    assert snap.reserved_bytes == 0 and snap.waiting == 0 and snap.limit_bytes == 3


def test_released_lease_wakes_the_next_waiter():
    budget = BudgetActor.start(limit_bytes=10, global_slots=4, per_account_slots=4)
    inbox = Inbox()
    budget.tell(ReserveBudget("first", "a", 8, "part", inbox))
    first = inbox.next()
    assert isinstance(first, BudgetGranted) and first.lease.nbytes == 8
    budget.tell(ReserveBudget("second", "b", 5, "part", inbox))
    assert inbox.empty_after(budget)
    assert budget.ask(GetBudgetSnapshot(), timeout=T).waiting == 1
    budget.tell(ReleaseBudget(first.lease.lease_id))
    second = inbox.next()
    assert second.request_id == "second" and second.lease.account == "b"


def test_too_large_request_is_refused():
    budget = BudgetActor.start(limit_bytes=10, global_slots=4, per_account_slots=4)
    inbox = Inbox()
    budget.tell(ReserveBudget("big", "a", 11, "part", inbox))
    refused = inbox.next()
    assert isinstance(refused, BudgetRefused) and "exceeds the budget limit" in refused.reason
    budget.tell(ReserveBudget("odd", "a", 1, "chunk", inbox))
    assert "unknown budget kind" in inbox.next().reason
    assert budget.ask(GetBudgetSnapshot(), timeout=T).waiting == 0


def test_cooldown_ends_on_tick_with_fake_clock():
    clock = FakeClock()
    budget = BudgetActor.start(limit_bytes=10, global_slots=4, per_account_slots=4, clock=clock)
    inbox = Inbox()
    budget.tell(FloodWaitHit("a", clock.now + 30, "SaveBigFilePartRequest"))
    budget.tell(ReserveBudget("p", "a", 1, "part", inbox))
    budget.tell(ReserveBudget("q", "b", 1, "part", inbox))
    assert inbox.next().request_id == "q"     # b is not held up by a's cooldown
    budget.tell(Tick())
    assert inbox.empty_after(budget)
    snap = budget.ask(GetBudgetSnapshot(), timeout=T)
    assert {s.account: s.cooldown_until for s in snap.accounts}["a"] == clock.now + 30
    clock.now += 30
    budget.tell(Tick())
    assert inbox.next().request_id == "p"


def test_quota_update_and_file_leases():
    clock = FakeClock()
    budget = BudgetActor.start(10, 4, 4, {"a": Quota(hourly_files=1)}, clock=clock)
    inbox = Inbox()
    budget.tell(ReserveBudget("f1", "a", 100, "file", inbox))
    assert inbox.next().lease.kind == "file"
    budget.tell(ReserveBudget("f2", "a", 100, "file", inbox))
    assert inbox.empty_after(budget)
    budget.tell(SetAccountQuota("a", Quota(hourly_files=2)))
    assert inbox.next().request_id == "f2"


def test_cancel_withdraws_a_waiter():
    budget = BudgetActor.start(limit_bytes=10, global_slots=4, per_account_slots=4)
    inbox = Inbox()
    budget.tell(ReserveBudget("hold", "a", 10, "part", inbox))
    hold = inbox.next()
    budget.tell(ReserveBudget("w", "b", 10, "part", inbox))
    budget.tell(CancelBudget("w"))
    budget.tell(ReleaseBudget(hold.lease.lease_id))
    assert inbox.empty_after(budget)
    assert budget.ask(GetBudgetSnapshot(), timeout=T).reserved_bytes == 0


def test_dead_requesters_lose_their_leases_and_waiters_move_on():
    budget = BudgetActor.start(limit_bytes=10, global_slots=4, per_account_slots=4)
    events, inbox = queue.Queue(), Inbox()
    holder = Holder.start(events)
    budget.tell(ReserveBudget("h", "a", 10, "part", holder))
    assert isinstance(events.get(timeout=T), BudgetGranted)
    budget.tell(ReserveBudget("w", "b", 10, "part", inbox))
    assert inbox.empty_after(budget)
    holder.stop(timeout=T)
    budget.tell(Tick())
    w = inbox.next()
    assert w.request_id == "w"

    # a requester dead by the time its grant is delivered: the lease goes back at once
    gone = Holder.start(events)
    gone.stop(timeout=T)
    budget.tell(ReserveBudget("late", "c", 4, "part", gone))
    budget.tell(ReserveBudget("next", "d", 4, "part", inbox))
    assert inbox.empty_after(budget)
    budget.tell(ReleaseBudget(w.lease.lease_id))
    assert inbox.next().request_id == "next"
    snap = budget.ask(GetBudgetSnapshot(), timeout=T)
    assert snap.reserved_bytes == 4 and snap.waiting == 0


def test_gauges_follow_the_budget():
    registry = CollectorRegistry()
    metrics = budget_metrics(registry)
    budget = BudgetActor.start(limit_bytes=10, global_slots=4, per_account_slots=4, metrics=metrics)
    inbox = Inbox()
    budget.tell(ReserveBudget("a", "a", 7, "part", inbox))
    budget.tell(ReserveBudget("b", "b", 7, "part", inbox))
    budget.ask(GetBudgetSnapshot(), timeout=T)
    value = registry.get_sample_value
    assert value("stashd_budget_reserved_bytes") == 7
    assert value("stashd_budget_limit_bytes") == 10
    assert value("stashd_budget_waiting_requests") == 1


def test_message_without_reply_to_does_not_kill_the_actor():
    budget = BudgetActor.start(limit_bytes=10, global_slots=4, per_account_slots=4)
    budget.tell(ReserveBudget("x", "a", 1))
    budget.tell("nonsense")
    assert budget.ask(GetBudgetSnapshot(), timeout=T).waiting == 0
    assert budget.is_alive()


def test_str_of_messages_is_readable():
    assert str(ReserveBudget("r1", "alice", 524288, "part", Inbox())) == "ReserveBudget(r1 part 524288B for alice)"


@pytest.mark.parametrize("bad", [0, -1])
def test_invalid_limits_stop_construction(bad):
    with pytest.raises(ValueError):
        BudgetActor(limit_bytes=bad, global_slots=1, per_account_slots=1)
