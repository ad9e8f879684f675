"""Budget under random operation sequences (hypothesis state machine).

A model kept beside the Budget records every request, grant, release,
cancellation and cooldown, and checks after each step that no limit is
exceeded, no cooling account is served, FIFO holds within an account and kind,
and nothing grantable is left waiting; at the end, once everything is
released and time has passed, every request has been granted.
"""
from __future__ import annotations

import itertools

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from actors.budget_core import DAY, HOUR, Budget, Quota, UnsatisfiableRequestError

LIMIT, GLOBAL_SLOTS, ACCOUNT_SLOTS = 10, 3, 2
QUOTAS = {"a": Quota(hourly_files=2, daily_files=3, hourly_bytes=8),
          "b": Quota(daily_bytes=12, daily_files=5)}
ACCOUNTS = ["a", "b", "c"]


class BudgetMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.now = 1_000_000.0
        self.budget = Budget(LIMIT, GLOBAL_SLOTS, ACCOUNT_SLOTS, dict(QUOTAS), clock=lambda: self.now)
        self.seq = itertools.count()
        self.waiting: dict[str, tuple] = {}     # request id -> (seq, account, nbytes, kind)
        self.held: dict[str, object] = {}       # lease id -> Lease
        self.file_grants: dict[str, list] = {a: [] for a in ACCOUNTS}  # (time, nbytes)
        self.cooldowns: dict[str, float] = {}
        self.done: set[str] = set()             # granted or cancelled or refused

    # ------------------------------------------------------------ bookkeeping

    def absorb(self, leases):
        for lease in leases:
            rid = lease.request_id
            assert rid in self.waiting, f"{rid} granted but not waiting"
            seq, account, nbytes, kind = self.waiting.pop(rid)
            assert (lease.account, lease.nbytes, lease.kind) == (account, nbytes, kind)
            assert self.now >= self.cooldowns.get(account, 0), "granted during cooldown"
            earlier = [r for r, w in self.waiting.items() if w[1:2] == (account,) and w[3] == kind and w[0] < seq]
            assert not earlier, f"{rid} overtook {earlier} in {account}/{kind}"
            self.held[lease.lease_id] = lease
            self.done.add(rid)
            if kind == "file":
                self.file_grants[account].append((self.now, nbytes))

    def held_parts(self, account=None):
        return [l for l in self.held.values() if l.kind == "part" and account in (None, l.account)]

    def file_usage(self, account, window):
        recent = [n for t, n in self.file_grants[account] if t > self.now - window]
        return len(recent), sum(recent)

    def file_grantable(self, account, nbytes):
        if self.now < self.cooldowns.get(account, 0):
            return False
        q = QUOTAS.get(account)
        if q is None:
            return True
        for window, mf, mb in ((HOUR, q.hourly_files, q.hourly_bytes), (DAY, q.daily_files, q.daily_bytes)):
            files, used = self.file_usage(account, window)
            if (mf is not None and files + 1 > mf) or (mb is not None and used + nbytes > mb):
                return False
        return True

    def heads(self, kind):
        out = {}
        for rid, w in sorted(self.waiting.items(), key=lambda kv: kv[1][0]):
            if w[3] == kind and w[1] not in out:
                out[w[1]] = (rid, w[2])
        return out

    # ------------------------------------------------------------ rules

    @rule(account=st.sampled_from(ACCOUNTS), nbytes=st.integers(0, 13), kind=st.sampled_from(["part", "file"]))
    def reserve(self, account, nbytes, kind):
        rid = f"r{next(self.seq)}"
        self.waiting[rid] = (int(rid[1:]), account, nbytes, kind)
        try:
            granted = self.budget.reserve(rid, account, nbytes, kind)
        except UnsatisfiableRequestError:
            q = QUOTAS.get(account)
            caps = [LIMIT] if kind == "part" else [c for c in (q and (q.hourly_bytes, q.daily_bytes)) or () if c]
            assert any(nbytes > c for c in caps), "refused a satisfiable request"
            del self.waiting[rid]
            self.done.add(rid)
            return
        assert kind == "file" or nbytes <= LIMIT
        self.absorb(granted)

    @precondition(lambda self: self.held)
    @rule(data=st.data())
    def release(self, data):
        lease_id = data.draw(st.sampled_from(sorted(self.held)))
        self.held.pop(lease_id)
        self.absorb(self.budget.release(lease_id))

    @precondition(lambda self: self.waiting or self.held)
    @rule(data=st.data())
    def cancel(self, data):
        by_request = {l.request_id: lid for lid, l in self.held.items()}
        rid = data.draw(st.sampled_from(sorted(list(self.waiting) + list(by_request))))
        if rid in self.waiting:
            del self.waiting[rid]
            self.done.add(rid)
        else:
            del self.held[by_request[rid]]
        self.absorb(self.budget.cancel(rid))

    @rule(account=st.sampled_from(ACCOUNTS), seconds=st.sampled_from([0.5, 30, 600, 5000]))
    def flood_wait(self, account, seconds):
        until = self.now + seconds
        self.cooldowns[account] = max(self.cooldowns.get(account, 0), until)
        self.absorb(self.budget.cooldown(account, until))

    @rule(seconds=st.sampled_from([0, 1, 60, 1800, HOUR, DAY]))
    def advance(self, seconds):
        self.now += seconds
        self.absorb(self.budget.tick())

    # ------------------------------------------------------------ invariants

    @invariant()
    def within_limits(self):
        parts = self.held_parts()
        assert sum(l.nbytes for l in parts) == self.budget.reserved_bytes <= LIMIT
        assert len(parts) == self.budget.slots_in_use <= GLOBAL_SLOTS
        for account in ACCOUNTS:
            assert len(self.held_parts(account)) <= ACCOUNT_SLOTS
            q = QUOTAS.get(account)
            if q:
                hf, hb = self.file_usage(account, HOUR)
                df, db = self.file_usage(account, DAY)
                for used, cap in ((hf, q.hourly_files), (hb, q.hourly_bytes), (df, q.daily_files), (db, q.daily_bytes)):
                    assert cap is None or used <= cap
        assert self.budget.waiting == len(self.waiting)

    @invariant()
    def nothing_grantable_left_waiting(self):
        for account, (rid, nbytes) in self.heads("file").items():
            assert not self.file_grantable(account, nbytes), f"file {rid} left waiting"
        free_bytes = LIMIT - self.budget.reserved_bytes
        free_slots = GLOBAL_SLOTS - self.budget.slots_in_use
        unblocked = [nbytes for account, (rid, nbytes) in self.heads("part").items()
                     if self.now >= self.cooldowns.get(account, 0)
                     and len(self.held_parts(account)) < ACCOUNT_SLOTS]
        if unblocked:
            assert free_slots == 0 or any(n > free_bytes for n in unblocked), "grantable part left waiting"

    def teardown(self):
        # release everything, let time pass: every request is eventually granted
        for _ in range(50):
            while self.held:
                lease_id = min(self.held)
                self.held.pop(lease_id)
                self.absorb(self.budget.release(lease_id))
            if not self.waiting:
                break
            self.now = max([self.now, *self.cooldowns.values()]) + DAY
            self.absorb(self.budget.tick())
        assert not self.waiting, f"never granted: {sorted(self.waiting)}"
        assert self.budget.reserved_bytes == 0 and self.budget.waiting == 0


BudgetMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=60, deadline=None)
TestBudgetProperties = BudgetMachine.TestCase
