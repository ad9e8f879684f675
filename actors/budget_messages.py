"""Messages to and from the BudgetActor (frozen: pykka does not copy them)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Hashable

from actors.budget_core import Lease, Quota


@dataclass(frozen=True)
class ReserveBudget:
    """Ask for a lease; the answer is told to ``reply_to`` (BudgetGranted or BudgetRefused).

    ``reply_to`` is anything with ``tell(message)``, normally the requester's
    ActorRef. The BudgetActor never blocks: a request that cannot be granted
    now waits in its queue and is answered when capacity frees.
    """

    request_id: Hashable
    account: str
    nbytes: int
    kind: str = "part"  # "part" | "file", see actors.budget_core
    reply_to: Any = field(default=None, repr=False, compare=False)
    slots: int = 1      # chunks one part lease covers (a few chunks sent in one call)

    def __str__(self) -> str:
        slots = f" x{self.slots}" if self.slots != 1 else ""
        return f"ReserveBudget({self.request_id} {self.kind}{slots} {self.nbytes}B for {self.account})"


@dataclass(frozen=True)
class ReleaseBudget:
    lease_id: str


@dataclass(frozen=True)
class CancelBudget:
    """Withdraw a waiting request, or release its lease if it was granted."""

    request_id: Hashable


@dataclass(frozen=True)
class FloodWaitHit:
    """``account`` must make no calls of ``request_kind`` before ``until`` (epoch s)."""

    account: str
    until: float
    request_kind: str = ""


@dataclass(frozen=True)
class SetAccountQuota:
    account: str
    quota: Quota | None


@dataclass(frozen=True)
class Tick:
    """Re-evaluate cooldowns and quota windows; reap leases of dead requesters."""


@dataclass(frozen=True)
class GetBudgetSnapshot:
    """ask -> actors.budget_core.BudgetSnapshot"""


@dataclass(frozen=True)
class BudgetGranted:
    request_id: Hashable
    lease: Lease

    def __str__(self) -> str:
        return f"BudgetGranted({self.request_id} lease {self.lease.lease_id})"


@dataclass(frozen=True)
class BudgetRefused:
    request_id: Hashable
    reason: str
