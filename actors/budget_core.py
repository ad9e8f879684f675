"""The global gates of the upload pipeline, as a plain class (no threads).

:class:`Budget` grants leases for two kinds of request:

``"part"``
    Upload chunks in flight: ``slots`` of them (one by default; an uploader
    sending a few chunks in one call asks for them in one lease).  Holds
    ``nbytes`` of the global byte budget (the bound on buffered memory),
    ``slots`` global slots and ``slots`` slots of its account, until released.
    Parts never count against quotas.
``"file"``
    Permission to start one Telegram document of ``nbytes``.  When granted it
    charges the account's hourly and daily quotas with one file and the whole
    ``nbytes`` at once, so a document that was admitted is never stalled half
    way by a quota (its uploaded parts would expire on the server meanwhile).
    It holds no bytes or slots; quota usage is never given back.

Both kinds wait while their account cools down after a FloodWait.  A request
that could never be granted (a part above the byte limit or with more slots
than an account has, a file above the account's byte quota, a zero file
quota) is refused with
:class:`UnsatisfiableRequestError` instead of waiting forever.

Fairness.  Each account has its own FIFO queue per kind: nothing overtakes an
earlier request of the same account and kind.  A waiter blocked by its own
account (cooldown, per-account slots, quota) never blocks other accounts.
Global capacity (bytes, global slots) goes round-robin: the account served
least recently whose head is not blocked by its own limits has the turn; when
its head does not fit, capacity is held for it (nobody else takes parts) until
enough is released, so large requests are not starved by small ones.

Every mutating method returns the leases it newly granted, in grant order,
because any of them may notice that time has passed (cooldowns ended, quota
windows slid).  Time comes from the injected ``clock``.
"""
from __future__ import annotations

import itertools
import secrets
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from typing import Callable, Hashable

HOUR, DAY = 3600.0, 86400.0
KINDS = ("part", "file")


class BudgetError(Exception):
    """A request the budget refuses; the message says why."""


class InvalidRequestError(BudgetError):
    """Malformed request: unknown kind, negative size, reused request id."""


class UnsatisfiableRequestError(BudgetError):
    """The request can never be granted under the configured limits."""


@dataclass(frozen=True)
class Quota:
    """Per-account limits over sliding windows; None means unlimited."""

    hourly_files: int | None = None
    hourly_bytes: int | None = None
    daily_files: int | None = None
    daily_bytes: int | None = None


@dataclass(frozen=True)
class Lease:
    lease_id: str
    request_id: Hashable
    account: str
    nbytes: int
    kind: str
    granted_at: float
    slots: int = 1          # chunks this part lease covers (0 for a file)


@dataclass(frozen=True)
class AccountBudget:
    account: str
    parts_in_flight: int
    reserved_bytes: int
    waiting_parts: int
    waiting_files: int
    cooldown_until: float | None
    hourly_files: int
    hourly_bytes: int
    daily_files: int
    daily_bytes: int
    quota: Quota | None


@dataclass(frozen=True)
class BudgetSnapshot:
    taken_at: float
    reserved_bytes: int
    limit_bytes: int
    slots_in_use: int
    global_slots: int
    per_account_slots: int
    waiting: int
    accounts: tuple[AccountBudget, ...]

    def to_dict(self) -> dict:
        """Plain dict (msgpack/JSON-able) for stashctl."""
        return asdict(self)


@dataclass(frozen=True)
class _Request:
    request_id: Hashable
    account: str
    nbytes: int
    kind: str
    queued_at: float
    slots: int = 1


@dataclass
class _Account:
    parts: deque = field(default_factory=deque)     # waiting part requests, FIFO
    files: deque = field(default_factory=deque)     # waiting file requests, FIFO
    in_flight: int = 0                              # part slots held
    reserved: int = 0
    cooldown_until: float = 0.0
    usage: deque = field(default_factory=deque)     # (granted_at, nbytes) of file grants


class Budget:
    def __init__(self, limit_bytes: int, global_slots: int, per_account_slots: int,
                 quotas: dict[str, Quota] | None = None, clock: Callable[[], float] = time.time):
        for name, value in (("limit_bytes", limit_bytes), ("global_slots", global_slots),
                            ("per_account_slots", per_account_slots)):
            if value <= 0:
                raise ValueError(f"{name} must be positive, got {value}")
        self.limit_bytes = limit_bytes
        self.global_slots = global_slots
        self.per_account_slots = per_account_slots
        self._quotas = dict(quotas or {})
        self._clock = clock
        self._accounts: dict[str, _Account] = {}
        self._order: list[str] = []     # accounts with waiting parts, least recently served first
        self._leases: dict[str, Lease] = {}
        self._by_request: dict[Hashable, Lease | _Request] = {}
        self.reserved_bytes = 0
        self.slots_in_use = 0
        self._ids = itertools.count(1)
        self._id_prefix = secrets.token_hex(4)  # lease ids of a restarted budget never collide

    # ------------------------------------------------------------------ requests

    def reserve(self, request_id: Hashable, account: str, nbytes: int, kind: str = "part",
                slots: int = 1) -> list[Lease]:
        """Queue a request; returns newly granted leases (this one if it fits now).

        ``slots``: how many chunks a part lease covers (each takes a global and
        an account slot); a file request takes none, whatever is passed.
        """
        if kind not in KINDS:
            raise InvalidRequestError(f"unknown budget kind {kind!r}; expected one of {KINDS}")
        if not isinstance(nbytes, int) or nbytes < 0:
            raise InvalidRequestError(f"nbytes must be a non-negative int, got {nbytes!r}")
        if not isinstance(slots, int) or slots < 1:
            raise InvalidRequestError(f"slots must be a positive int, got {slots!r}")
        if request_id in self._by_request:
            raise InvalidRequestError(f"request id {request_id!r} is already in use")
        slots = slots if kind == "part" else 0
        self._check_satisfiable(account, nbytes, kind, slots)
        req = _Request(request_id, account, nbytes, kind, self._clock(), slots)
        acct = self._account(account)
        if kind == "part":
            if not acct.parts:
                self._order.append(account)
            acct.parts.append(req)
        else:
            acct.files.append(req)
        self._by_request[request_id] = req
        return self._pump()

    def release(self, lease_id: str) -> list[Lease]:
        """Give a lease back; unknown ids are ignored (release is idempotent)."""
        lease = self._leases.pop(lease_id, None)
        if lease is None:
            return []
        del self._by_request[lease.request_id]
        if lease.kind == "part":
            acct = self._accounts[lease.account]
            acct.in_flight -= lease.slots
            acct.reserved -= lease.nbytes
            self.reserved_bytes -= lease.nbytes
            self.slots_in_use -= lease.slots
        return self._pump()

    def cancel(self, request_id: Hashable) -> list[Lease]:
        """Withdraw a waiting request, or release its lease if already granted."""
        entry = self._by_request.get(request_id)
        if isinstance(entry, Lease):
            return self.release(entry.lease_id)
        if entry is None:
            return []
        del self._by_request[request_id]
        acct = self._accounts[entry.account]
        queue = acct.parts if entry.kind == "part" else acct.files
        queue.remove(entry)
        if entry.kind == "part" and not queue:
            self._order.remove(entry.account)
        return self._pump()

    def cooldown(self, account: str, until: float) -> list[Lease]:
        """After a FloodWait: grant nothing to ``account`` before ``until``."""
        acct = self._account(account)
        acct.cooldown_until = max(acct.cooldown_until, until)
        return self._pump()

    def set_quota(self, account: str, quota: Quota | None) -> list[Lease]:
        """Replace an account's quota (None: unlimited); waiters are not re-checked."""
        if quota is None:
            self._quotas.pop(account, None)
        else:
            self._quotas[account] = quota
        return self._pump()

    def tick(self) -> list[Lease]:
        """Re-evaluate time-based conditions (cooldowns, quota windows)."""
        return self._pump()

    # ------------------------------------------------------------------ queries

    def lease(self, lease_id: str) -> Lease | None:
        return self._leases.get(lease_id)

    def is_waiting(self, request_id: Hashable) -> bool:
        return isinstance(self._by_request.get(request_id), _Request)

    @property
    def waiting(self) -> int:
        return len(self._by_request) - len(self._leases)

    def next_wakeup(self) -> float | None:
        """Earliest time at which a waiter may become grantable by time alone."""
        now, times = self._clock(), []
        for acct in self._accounts.values():
            if not (acct.parts or acct.files):
                continue
            if acct.cooldown_until > now:
                times.append(acct.cooldown_until)
            if acct.files:
                times.extend(t + w for t, _ in acct.usage for w in (HOUR, DAY) if t + w > now)
        return min(times, default=None)

    def snapshot(self) -> BudgetSnapshot:
        now = self._clock()
        accounts = []
        for name in sorted(self._accounts):
            acct = self._accounts[name]
            hf, hb = self._usage(acct, now, HOUR)
            df, db = self._usage(acct, now, DAY)
            accounts.append(AccountBudget(
                account=name, parts_in_flight=acct.in_flight, reserved_bytes=acct.reserved,
                waiting_parts=len(acct.parts), waiting_files=len(acct.files),
                cooldown_until=acct.cooldown_until if acct.cooldown_until > now else None,
                hourly_files=hf, hourly_bytes=hb, daily_files=df, daily_bytes=db,
                quota=self._quotas.get(name),
            ))
        return BudgetSnapshot(
            taken_at=now, reserved_bytes=self.reserved_bytes, limit_bytes=self.limit_bytes,
            slots_in_use=self.slots_in_use, global_slots=self.global_slots,
            per_account_slots=self.per_account_slots, waiting=self.waiting, accounts=tuple(accounts),
        )

    # ------------------------------------------------------------------ internals

    def _account(self, name: str) -> _Account:
        acct = self._accounts.get(name)
        if acct is None:
            acct = self._accounts[name] = _Account()
        return acct

    def _check_satisfiable(self, account: str, nbytes: int, kind: str, slots: int) -> None:
        if kind == "part":
            if nbytes > self.limit_bytes:
                raise UnsatisfiableRequestError(
                    f"part of {nbytes} bytes exceeds the budget limit of {self.limit_bytes} bytes")
            if slots > min(self.per_account_slots, self.global_slots):
                raise UnsatisfiableRequestError(
                    f"part lease of {slots} slots exceeds the {self.per_account_slots} per account "
                    f"/ {self.global_slots} global slots")
            return
        q = self._quotas.get(account)
        if q is None:
            return
        for label, cap in (("hourly", q.hourly_bytes), ("daily", q.daily_bytes)):
            if cap is not None and nbytes > cap:
                raise UnsatisfiableRequestError(
                    f"file of {nbytes} bytes exceeds {account}'s {label} quota of {cap} bytes")
        for label, cap in (("hourly", q.hourly_files), ("daily", q.daily_files)):
            if cap is not None and cap < 1:
                raise UnsatisfiableRequestError(f"{account}'s {label} file quota is {cap}")

    @staticmethod
    def _usage(acct: _Account, now: float, window: float) -> tuple[int, int]:
        while acct.usage and acct.usage[0][0] <= now - DAY:
            acct.usage.popleft()
        recent = [n for t, n in acct.usage if t > now - window]
        return len(recent), sum(recent)

    def _file_ok(self, account: str, acct: _Account, req: _Request, now: float) -> bool:
        if acct.cooldown_until > now:
            return False
        q = self._quotas.get(account)
        if q is None:
            return True
        for window, max_files, max_bytes in ((HOUR, q.hourly_files, q.hourly_bytes),
                                             (DAY, q.daily_files, q.daily_bytes)):
            if max_files is None and max_bytes is None:
                continue
            files, nbytes = self._usage(acct, now, window)
            if max_files is not None and files + 1 > max_files:
                return False
            if max_bytes is not None and nbytes + req.nbytes > max_bytes:
                return False
        return True

    def _part_own_ok(self, acct: _Account, now: float) -> bool:
        return (acct.cooldown_until <= now
                and acct.in_flight + acct.parts[0].slots <= self.per_account_slots)

    def _pump(self) -> list[Lease]:
        now = self._clock()
        granted = []
        for name, acct in self._accounts.items():
            while acct.files and self._file_ok(name, acct, acct.files[0], now):
                granted.append(self._grant(acct.files.popleft(), now))
        while True:
            turn = next((n for n in self._order if self._part_own_ok(self._accounts[n], now)), None)
            if turn is None:
                break
            acct = self._accounts[turn]
            head = acct.parts[0]
            if (self.reserved_bytes + head.nbytes > self.limit_bytes
                    or self.slots_in_use + head.slots > self.global_slots):
                break  # capacity is held for the account whose turn it is
            acct.parts.popleft()
            granted.append(self._grant(head, now))
            self._order.remove(turn)
            if acct.parts:
                self._order.append(turn)
        return granted

    def _grant(self, req: _Request, now: float) -> Lease:
        lease = Lease(f"{self._id_prefix}-{next(self._ids)}", req.request_id, req.account,
                      req.nbytes, req.kind, now, req.slots)
        acct = self._accounts[req.account]
        if req.kind == "part":
            acct.in_flight += req.slots
            acct.reserved += req.nbytes
            self.reserved_bytes += req.nbytes
            self.slots_in_use += req.slots
        else:
            acct.usage.append((now, req.nbytes))
        self._leases[lease.lease_id] = lease
        self._by_request[req.request_id] = lease
        return lease
