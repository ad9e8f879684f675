"""DispatcherActor: hands planned/uploading transfers to idle UploaderActors.

On every :class:`Tick` (the daemon sends one about every 0.5 s) it looks at the
transfers in "uploading" and "planned" (oldest first) and gives each to an
idle uploader of the pool with an account chosen by :func:`choose_account`:

- the account's actor is running and its state is "ready" (or "cooling_down"
  for kinds that are not upload calls): paused/error/starting accounts get
  nothing;
- no FloodWait is running for its upload calls (``storage.active_flood_waits``:
  SaveBigFilePartRequest, SaveFilePartRequest, SendMediaRequest);
- its upload limit fits the transfer's largest part;
- not known to be over quota;
- least busy (fewest transfers given to it), then by name.

A transfer an account started (in "uploading", or put back to "planned" by a
retry) resumes with that account (uploaded chunks, the chunk journal and
random_id de-duplication are per session).  It
is handed over to another account (:func:`handover_account`) only when

- that account is no longer configured: at once;
- its upload limit no longer fits the transfer's parts: at once;
- it is down -- not running, or in a state other than ready/cooling_down
  (error, paused, starting) -- continuously for ``handover_after`` seconds
  (``upload.handover_after_seconds``, 600 s by default; the clock starts when
  this dispatcher first sees it down, so a restart starts it again);

never because of a FloodWait or a quota (waiting them out is the rule; moving
the work elsewhere would dodge them).  The uploader then adopts, by caption
marker, the parts the first account sent without recording them
(actors/adoption.py) before it uploads the rest.

Before a transfer goes out (planned or uploading) its content is claimed: a
package stored meanwhile completes it by reference (``mark_transfer_duplicate``,
only while none of its parts has a message); a live claim of another owner
leaves it for a later tick.  Then one "file" lease per document still to send
(each part without a message, of that part's size) is reserved from the
BudgetActor, so the hourly/daily file quotas count Telegram documents, not
transfers; quotas and cooldowns are the budget's business.  Each BudgetGranted
lease is given back at once (a file lease holds nothing, its quota charge
stays); the parts already charged are remembered, so a transfer that waited
for quota is never charged twice for one document.  When every part is
charged the uploader is asked.  Nothing here blocks: the uploader's future is
waited for on a small waiter thread that tells :class:`UploadFinished` back.
A failed upload is retried with exponential backoff (the transfer stays
"uploading", resumable).

Claims of the transfers being uploaded (or waiting for budget) are renewed
every quarter lease on Tick, so a transfer that takes longer than the lease
keeps its content.  When a renewal finds the claim lost (it expired and
another owner took it), the uploader is told :class:`StopUpload`: what was sent
is recorded, the transfer stays "uploading" and is resumed once the claim can
be taken again (or completed by reference when the other copy is stored).

FloodWaitHit events of the AccountActors (the daemon makes this actor their
listener) are forwarded to the budget; at start the flood waits persisted in
storage are loaded into the budget.
"""
from __future__ import annotations

import itertools
import threading
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable

import pykka
from loguru import logger

from actors import account_messages as am
from actors.budget_messages import (
    BudgetGranted, BudgetRefused, CancelBudget, FloodWaitHit, ReleaseBudget, ReserveBudget,
)
from actors.supervision import SupervisedMixin
from actors.transfers import CLAIM_LEASE_SECONDS, DEFAULT_LIMIT_BYTES, claim_owner
from actors.uploader_messages import StopUpload, UploadTransfer

__all__ = ["AccountView", "DispatcherActor", "GetDispatchStatus", "Tick", "UploadFinished",
           "UPLOAD_KINDS", "account_refusal", "choose_account", "handover_account", "is_down",
           "HANDOVER_AFTER_SECONDS"]

UPLOAD_KINDS = ("SaveBigFilePartRequest", "SaveFilePartRequest", "SendMediaRequest")
WORKING_STATES = ("ready", "cooling_down")
HANDOVER_AFTER_SECONDS = 600.0


# -- messages -----------------------------------------------------------------------------
@dataclass(frozen=True)
class Tick:
    """Look for work (told by the daemon's ticker)."""


@dataclass(frozen=True)
class UploadFinished:
    uploader: str
    transfer_id: str
    account: str
    result: Any = None          # TransferUploadedResult
    error: str | None = None    # "Type: message" when the upload failed


@dataclass(frozen=True)
class GetDispatchStatus:
    """ask -> {"busy": {uploader: transfer id}, "waiting_budget": [...], "retry_at": {...}}"""


# -- choosing an account (plain logic) ----------------------------------------------------
@dataclass(frozen=True)
class AccountView:
    name: str
    state: str
    upload_limit_bytes: int | None
    alive: bool = True
    cooling_until: float | None = None   # latest FloodWait end of an upload call
    busy: int = 0
    blocked_until: float | None = None   # over quota (budget did not grant a file lease)


def account_refusal(view: AccountView, need_bytes: int, now: float) -> str | None:
    """Why ``view`` cannot take a document of ``need_bytes`` now, or None."""
    if not view.alive:
        return "not running"
    if view.state not in WORKING_STATES:
        return view.state
    if view.cooling_until is not None and view.cooling_until > now:
        return "cooling down"
    if need_bytes > (view.upload_limit_bytes or DEFAULT_LIMIT_BYTES):
        return "upload limit too small"
    if view.blocked_until is not None and view.blocked_until > now:
        return "over quota"
    return None


def choose_account(views: list[AccountView], need_bytes: int, now: float) -> str | None:
    """The least busy account that can take the document now (ties: by name)."""
    fit = [v for v in views if account_refusal(v, need_bytes, now) is None]
    if not fit:
        return None
    return min(fit, key=lambda v: (v.busy, v.name)).name


def is_down(view: AccountView) -> bool:
    """Not running, or in a state that takes no work (error, paused, starting)."""
    return not view.alive or view.state not in WORKING_STATES


def handover_account(started_by: str, views: list[AccountView], need_bytes: int, now: float,
                     down_since: float | None, handover_after: float) -> str | None:
    """Who continues a transfer ``started_by`` began (see module doc), or None: wait.

    ``down_since``: since when ``started_by`` has been seen down (None: it is not).
    """
    own = next((v for v in views if v.name == started_by), None)
    if own is not None:
        why = account_refusal(own, need_bytes, now)
        if why is None:
            return started_by
        if why != "upload limit too small":
            if not is_down(own) or down_since is None or now - down_since < handover_after:
                return None     # cooling down / over quota / not down long enough: wait
    return choose_account([v for v in views if v.name != started_by], need_bytes, now)


# -- the actor ------------------------------------------------------------------------------
@dataclass
class _Job:
    transfer_id: str
    account: str
    uploader: str
    nbytes: int
    since: float
    sha256: str = ""
    urn: str | None = None
    pending: dict[str, int] = field(default_factory=dict)   # budget request id -> part index


class DispatcherActor(SupervisedMixin, pykka.ThreadingActor):
    def __init__(self, storage: Any, *, accounts: Callable[[], dict[str, Any]],
                 uploaders: Callable[[], dict[str, Any]], budget: Any = None, node: str,
                 metrics: Any = None, clock: Callable[[], float] = time.time,
                 lease_seconds: float = CLAIM_LEASE_SECONDS, retry_base: float = 5.0,
                 retry_max: float = 300.0, quota_wait: float = 10.0, quota_backoff: float = 60.0,
                 batch: int = 200, handover_after: float = HANDOVER_AFTER_SECONDS):
        super().__init__()
        self.storage, self.budget, self.node = storage, budget, node
        self._accounts, self._uploaders = accounts, uploaders
        self._metrics, self._clock = metrics, clock
        self._lease, self._retry_base, self._retry_max = lease_seconds, retry_base, retry_max
        self._quota_wait, self._quota_backoff, self._batch = quota_wait, quota_backoff, batch
        self._handover_after = handover_after
        self._down_since: dict[str, float] = {}   # account -> first seen down (this run)
        self._charged: dict[str, set[int]] = {}   # transfer -> parts whose file lease was granted
        self._handed_over: set[str] = set()        # transfers already logged as handed over
        self._busy: dict[str, _Job] = {}          # uploader name -> job (asked or waiting for budget)
        self._waiting: dict[str, _Job] = {}       # budget request id -> job
        self._retry_at: dict[str, float] = {}
        self._failures: dict[str, int] = {}
        self._blocked: dict[str, float] = {}      # account -> over quota until
        self._max_part: dict[str, int] = {}
        self._renewed_at = 0.0
        self._ids = itertools.count(1)
        self._log = logger.bind(actor="dispatcher")

    # -- lifecycle ------------------------------------------------------------------
    def on_start(self) -> None:
        if self.budget is None:
            return
        for acct in self.storage.list_accounts():
            for kind, until in self.storage.active_flood_waits(acct.name).items():
                self.budget.tell(FloodWaitHit(acct.name, until, kind))

    def on_stop(self) -> None:
        for request_id in list(self._waiting):
            self._tell_budget(CancelBudget(request_id))

    def _drop_pending(self, job: _Job) -> None:
        """Withdraw the job's file requests still waiting (granted ones stay charged)."""
        for rid in list(job.pending):
            self._waiting.pop(rid, None)
            self._tell_budget(CancelBudget(rid))
        job.pending.clear()

    # -- messages -------------------------------------------------------------------
    def on_receive(self, message: Any) -> Any:
        match message:
            case Tick():
                self._tick()
            case UploadFinished():
                self._finished(message)
            case BudgetGranted(request_id=rid, lease=lease):
                self._tell_budget(ReleaseBudget(lease.lease_id))  # a file lease holds nothing
                job = self._waiting.pop(rid, None)
                if job is not None:
                    index = job.pending.pop(rid)
                    self._charged.setdefault(job.transfer_id, set()).add(index)
                    if not job.pending:
                        self._ask_uploader(job)
            case BudgetRefused(request_id=rid, reason=reason):
                job = self._waiting.pop(rid, None)
                if job is not None:
                    self._log.bind(account=job.account).warning(
                        "budget refused transfer {}: {}", job.transfer_id, reason)
                    self._drop_pending(job)
                    self._busy.pop(job.uploader, None)
                    self._blocked[job.account] = self._clock() + self._quota_backoff * 60
            case am.FloodWaitHit(account=account, kind=kind, until=until):
                self._tell_budget(FloodWaitHit(account, until, kind))
            case am.AccountStateChanged():
                pass  # states are read from storage on every tick
            case GetDispatchStatus():
                return {"busy": {u: j.transfer_id for u, j in self._busy.items()},
                        "waiting_budget": sorted(j.transfer_id for j in self._waiting.values()),
                        "retry_at": dict(self._retry_at)}
            case _:
                self._log.warning("ignoring unexpected message {!r}", message)
        return None

    def _tell_budget(self, message: Any) -> None:
        if self.budget is not None:
            try:
                self.budget.tell(message)
            except pykka.ActorDeadError:
                self._log.warning("budget is down; dropped {}", message)

    # -- the tick -------------------------------------------------------------------------
    def _tick(self) -> None:
        now = self._clock()
        uploaders = self._uploaders()
        self._reap(uploaders, now)
        self._update_gauges()
        if now - self._renewed_at > self._lease / 4:
            self._renewed_at = now
            self._renew_claims(uploaders)
        views = self._views(now)
        idle = [name for name, ref in sorted(uploaders.items())
                if name not in self._busy and ref is not None and ref.is_alive()]
        if not idle:
            return
        active = {j.transfer_id for j in self._busy.values()}
        todo = sorted(self.storage.list_transfers("uploading", limit=self._batch)
                      + self.storage.list_transfers("planned", limit=self._batch),
                      key=lambda t: (t.created_at, t.id))
        for t in todo:
            if not idle:
                break
            if t.id in active or self._retry_at.get(t.id, 0) > now:
                continue
            claim = self._claim(t)
            if claim is None:
                continue
            account = self._pick(t, views, now)
            if account is None:
                continue
            unsent = self.storage.parts_without_message(t.id)
            job = _Job(t.id, account, idle.pop(0), sum(p.length for p in unsent), now,
                       t.sha256 if claim else "")
            self._busy[job.uploader] = job
            views = [v if v.name != account else _replace_busy(v, v.busy + 1) for v in views]
            charged = self._charged.get(t.id, set())
            todo_parts = [p for p in unsent if p.index not in charged]
            if self.budget is None or not todo_parts:
                self._ask_uploader(job)
                continue
            for p in todo_parts:  # one file lease per Telegram document (quotas count documents)
                rid = f"file-{self.node}-{t.id}-{p.index}-{next(self._ids)}"
                job.pending[rid] = p.index
                self._waiting[rid] = job
            for rid, index in list(job.pending.items()):
                length = next(p.length for p in todo_parts if p.index == index)
                self._tell_budget(ReserveBudget(rid, account, length, "file",
                                                reply_to=self.actor_ref))

    def _renew_claims(self, uploaders: dict[str, Any]) -> None:
        for job in list(self._busy.values()):
            if not job.sha256:
                continue
            if self.storage.renew_claim(job.sha256, claim_owner(self.node, job.transfer_id), self._lease):
                continue
            self._log.bind(account=job.account).warning(
                "transfer {}: content claim lost (taken over after it expired); stopping its upload",
                job.transfer_id)
            self._drop_pending(job)
            ref = uploaders.get(job.uploader)
            if job.urn is not None and ref is not None:
                try:
                    ref.tell(StopUpload(job.transfer_id, "content claim lost"))
                except pykka.ActorDeadError:
                    pass
            else:   # not asked yet (waiting for budget): just let it go
                self._busy.pop(job.uploader, None)

    def _reap(self, uploaders: dict[str, Any], now: float) -> None:
        for name, job in list(self._busy.items()):
            ref = uploaders.get(name)
            if job.pending:
                if now - job.since > self._quota_wait:  # quota (or cooldown) holds it: try later
                    self._drop_pending(job)
                    self._busy.pop(name)
                    self._blocked[job.account] = now + self._quota_backoff
                    self._log.bind(account=job.account).info(
                        "no file lease for {} within {:.0f}s; account skipped for {:.0f}s",
                        job.transfer_id, self._quota_wait, self._quota_backoff)
                continue
            if job.urn is not None and (ref is None or ref.actor_urn != job.urn or not ref.is_alive()):
                self._log.warning("uploader {} went away during {}", name, job.transfer_id)
                self._busy.pop(name)

    def _claim(self, t: Any) -> bool | None:
        """True: we hold the content claim (renewed while it uploads); False: go without one
        (the package is this transfer itself -- a re-upload of lost parts -- or another
        package exists but some parts of this one are sent already); None: not now."""
        c = self.storage.claim_content(t.sha256, claim_owner(self.node, t.id), self._lease, t.id)
        if c.existing_package == t.id:
            return False
        if c.existing_package:
            if t.state == "uploading" and len(self.storage.parts_without_message(t.id)) < t.part_count:
                # some parts are in the channel already: finish it rather than strand them
                self._log.info("transfer {}: content stored already by {}; finishing the parts "
                               "left", t.id, c.existing_package)
                return False
            self.storage.mark_transfer_duplicate(t.id, c.existing_package)
            self._log.info("transfer {}: content stored already by {}: completed by reference",
                           t.id, c.existing_package)
            return None
        return True if c.granted else None

    def _pick(self, t: Any, views: list[AccountView], now: float) -> str | None:
        need = self._max_part.get(t.id)
        if need is None:
            need = self._max_part[t.id] = max((p.length for p in self.storage.list_parts(t.id)),
                                              default=0)
        if t.account:   # started before (also a planned one put back by a retry)
            account = handover_account(t.account, views, need, now, self._down_since.get(t.account),
                                       self._handover_after)
            if account is not None and account != t.account and t.id not in self._handed_over:
                self._handed_over.add(t.id)
                self._log.bind(account=account).warning(
                    "transfer {}: {} is {}; handed over to {} (parts it sent unrecorded are "
                    "adopted by caption marker)", t.id, t.account,
                    "no longer configured" if t.account not in {v.name for v in views}
                    else "down or too small", account)
            return account
        return choose_account(views, need, now)

    def _views(self, now: float) -> list[AccountView]:
        refs = self._accounts()
        records = {a.name: a for a in self.storage.list_accounts()}
        busy: dict[str, int] = {}
        for job in self._busy.values():
            busy[job.account] = busy.get(job.account, 0) + 1
        views = []
        for name, ref in sorted(refs.items()):
            rec = records.get(name)
            floods = self.storage.active_flood_waits(name)
            cooling = max((floods[k] for k in UPLOAD_KINDS if k in floods), default=None)
            view = AccountView(
                name=name, state=rec.state if rec is not None else "starting",
                upload_limit_bytes=rec.upload_limit_bytes if rec is not None else None,
                alive=ref is not None and ref.is_alive(), cooling_until=cooling,
                busy=busy.get(name, 0), blocked_until=self._blocked.get(name))
            if is_down(view):
                self._down_since.setdefault(name, now)
            else:
                self._down_since.pop(name, None)
            views.append(view)
        return views

    # -- asking an uploader without blocking --------------------------------------------
    def _ask_uploader(self, job: _Job) -> None:
        ref = self._uploaders().get(job.uploader)
        if ref is None or not ref.is_alive():
            self._busy.pop(job.uploader, None)
            return
        job.urn = ref.actor_urn
        self._busy[job.uploader] = job
        self._log.bind(account=job.account).info("transfer {} -> {} via {}", job.transfer_id,
                                                 job.account, job.uploader)
        future = ref.ask(UploadTransfer(job.transfer_id, job.account), block=False)
        me = self.actor_ref

        def wait() -> None:
            try:
                msg = UploadFinished(job.uploader, job.transfer_id, job.account, result=future.get())
            except BaseException as exc:  # noqa: BLE001 - reported, never raised here
                msg = UploadFinished(job.uploader, job.transfer_id, job.account,
                                     error=f"{type(exc).__name__}: {exc}")
            try:
                me.tell(msg)
            except pykka.ActorDeadError:
                pass

        threading.Thread(target=wait, name=f"wait-{job.uploader}", daemon=True).start()

    def _finished(self, msg: UploadFinished) -> None:
        job = self._busy.get(msg.uploader)
        if job is not None and job.transfer_id == msg.transfer_id:
            del self._busy[msg.uploader]
        log = self._log.bind(account=msg.account)
        if msg.error is None:
            self._failures.pop(msg.transfer_id, None)
            self._retry_at.pop(msg.transfer_id, None)
            self._max_part.pop(msg.transfer_id, None)
            self._charged.pop(msg.transfer_id, None)
            self._handed_over.discard(msg.transfer_id)
            log.info("transfer {} uploaded", msg.transfer_id)
            return
        n = self._failures[msg.transfer_id] = self._failures.get(msg.transfer_id, 0) + 1
        delay = min(self._retry_max, self._retry_base * 2 ** (n - 1))
        self._retry_at[msg.transfer_id] = self._clock() + delay
        if self._metrics is not None and hasattr(self._metrics, "record_part"):
            self._metrics.record_part(msg.account, 0, None, "error")
        log.warning("transfer {} failed (attempt {}), retry in {:.0f}s: {}", msg.transfer_id, n,
                    delay, msg.error)

    def _update_gauges(self) -> None:
        gauge = getattr(self._metrics, "transfers", None)
        if gauge is None:
            return
        for state, n in self.storage.transfers_by_state().items():
            gauge.labels(state=state).set(n)


def _replace_busy(view: AccountView, busy: int) -> AccountView:
    return replace(view, busy=busy)
