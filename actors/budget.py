"""BudgetActor: a thin pykka shell over :class:`actors.budget_core.Budget`.

Requests come as ``tell``s and are answered by telling the requester
``BudgetGranted``/``BudgetRefused``, so the actor never blocks and never asks
anyone.  It keeps nothing that matters across a restart: a new BudgetActor
starts with no leases (lease ids never collide with the old ones, and
releasing an unknown lease is a no-op).

Time-driven work (cooldowns ending, quota windows sliding) happens on ``Tick``,
which also reaps leases and waiters whose requester actor has died.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable

import pykka
from loguru import logger
from prometheus_client import CollectorRegistry, Gauge

from actors.budget_core import Budget, BudgetError, Lease, Quota
from actors.budget_messages import (
    BudgetGranted, BudgetRefused, CancelBudget, FloodWaitHit, GetBudgetSnapshot, ReleaseBudget,
    ReserveBudget, SetAccountQuota, Tick,
)


@dataclass(frozen=True)
class BudgetMetrics:
    budget_reserved_bytes: Gauge
    budget_limit_bytes: Gauge
    budget_waiting: Gauge


def budget_metrics(registry: CollectorRegistry) -> BudgetMetrics:
    """The budget's gauges, registered in ``registry``."""
    return BudgetMetrics(
        budget_reserved_bytes=Gauge("stashd_budget_reserved_bytes",
                                    "Bytes of upload parts currently leased", registry=registry),
        budget_limit_bytes=Gauge("stashd_budget_limit_bytes",
                                 "Global byte budget for in-flight parts", registry=registry),
        budget_waiting=Gauge("stashd_budget_waiting_requests",
                             "Budget requests waiting for a lease", registry=registry),
    )


class BudgetActor(pykka.ThreadingActor):
    def __init__(self, limit_bytes: int, global_slots: int, per_account_slots: int,
                 quotas: dict[str, Quota] | None = None, *, metrics: Any = None,
                 clock: Callable[[], float] = time.time):
        super().__init__()
        self.budget = Budget(limit_bytes, global_slots, per_account_slots, quotas, clock)
        self._metrics = metrics
        self._reply_to: dict[Any, Any] = {}   # request id -> requester, waiting or granted
        self._log = logger.bind(actor="budget")

    def on_start(self) -> None:
        self._update_gauges()

    def on_receive(self, message: Any) -> Any:
        match message:
            case ReserveBudget():
                self._reserve(message)
            case ReleaseBudget(lease_id=lease_id):
                lease = self.budget.lease(lease_id)
                if lease is not None:
                    self._reply_to.pop(lease.request_id, None)
                self._deliver(self.budget.release(lease_id))
            case CancelBudget(request_id=request_id):
                self._reply_to.pop(request_id, None)
                self._deliver(self.budget.cancel(request_id))
            case FloodWaitHit(account=account, until=until, request_kind=kind):
                self._log.bind(account=account).info(
                    "cooling down until {until:.0f} after FloodWait on {kind}", until=until, kind=kind or "?")
                self._deliver(self.budget.cooldown(account, until))
            case SetAccountQuota(account=account, quota=quota):
                self._deliver(self.budget.set_quota(account, quota))
            case Tick():
                self._deliver(self._reap_dead() + self.budget.tick())
            case GetBudgetSnapshot():
                return self.budget.snapshot()
            case _:
                self._log.warning("ignoring unexpected message {!r}", message)
        self._update_gauges()
        return None

    def _reserve(self, msg: ReserveBudget) -> None:
        if msg.reply_to is None or not hasattr(msg.reply_to, "tell"):
            self._log.error("dropping {}: no reply_to to answer", msg)
            return
        if msg.request_id in self._reply_to:
            self._tell(msg.reply_to, BudgetRefused(msg.request_id, f"request id {msg.request_id!r} is already in use"))
            return
        self._reply_to[msg.request_id] = msg.reply_to
        try:
            granted = self.budget.reserve(msg.request_id, msg.account, msg.nbytes, msg.kind, msg.slots)
        except BudgetError as exc:
            del self._reply_to[msg.request_id]
            self._log.bind(account=msg.account).warning("refused {}: {}", msg, exc)
            self._tell(msg.reply_to, BudgetRefused(msg.request_id, str(exc)))
            return
        self._deliver(granted)

    def _deliver(self, granted: list[Lease]) -> None:
        pending = list(granted)
        while pending:
            lease = pending.pop(0)
            reply_to = self._reply_to.get(lease.request_id)
            if reply_to is not None and self._tell(reply_to, BudgetGranted(lease.request_id, lease)):
                continue
            self._log.bind(account=lease.account).info(
                "requester of {} is gone; releasing its lease", lease.request_id)
            self._reply_to.pop(lease.request_id, None)
            pending.extend(self.budget.release(lease.lease_id))

    def _reap_dead(self) -> list[Lease]:
        granted = []
        for request_id, reply_to in list(self._reply_to.items()):
            is_alive = getattr(reply_to, "is_alive", None)
            if is_alive is not None and not is_alive():
                del self._reply_to[request_id]
                granted.extend(self.budget.cancel(request_id))
        return granted

    @staticmethod
    def _tell(reply_to: Any, message: Any) -> bool:
        try:
            reply_to.tell(message)
        except pykka.ActorDeadError:
            return False
        return True

    def _update_gauges(self) -> None:
        m = self._metrics
        if m is None:
            return
        for name, value in (("budget_reserved_bytes", self.budget.reserved_bytes),
                            ("budget_limit_bytes", self.budget.limit_bytes),
                            ("budget_waiting", self.budget.waiting)):
            gauge = getattr(m, name, None)
            if gauge is not None:
                gauge.set(value)
