"""VerifierActor: the thread that runs :class:`actors.verifier_core.Verifier` (issue 4).

A ThreadingActor of its own (SupervisedMixin), so its checks never block other
actors; it asks AccountActors (GetMessages, DownloadRange) with timeouts and
is never asked by them.  The sha256 of an original before a re-upload (over
``inline_hash_bytes``, 4 MiB) runs on a one-thread pool of the actor
(:class:`actors.verifier_core.OriginalChecks`): the check is left "waiting"
meanwhile, the actor keeps answering status and VerifyNow, and the hashing
thread tells it OriginalChecked when done (the transfer is checked again at
once; after interval_seconds anyway, should that tell be lost).  Messages: actors.verifier_messages -- Tick (the
daemon's ticker), VerifyNow(transfer_id | None) -> VerifyResult,
GetVerifierStatus -> VerifierStatusResult.

    VerifierActor.start(storage, settings.verify, accounts=callable -> {name: ref},
                        node=..., metrics=None, clock=time.time,
                        request_timeout=60.0, adopt=None, on_lost=None,
                        inline_hash_bytes=4 MiB)

Lease owner: ``verifier_owner(node)`` = "<node>/verifier#<process>.<actor>",
unique per process and actor; on start the leases of an earlier *process* of the
same node (same host and state dir) are released (recovery after a crash or
SIGKILL); leases of other nodes and of this process's verifiers are left to
expire (``[verify] lease_seconds``). Two daemons must not share a state dir.

``on_lost(transfer, parts, missing_indexes)``: called when a message of a
cleaned transfer is gone and there is nothing left to re-upload from (state
failed, "lost after cleanup: ..."); the daemon passes
``actors.ingest.refetch.requeue_lost``: a package that came from ingest is
fetched again from its source channel.

:class:`AccountsMessagePort` is the MessagePort over AccountActor refs: readers
are the running accounts whose stored state is ready or cooling_down, the part's
sending account first.
"""
from __future__ import annotations

import asyncio
import dataclasses
import secrets
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Sequence

import pykka
from loguru import logger

from actors.account_messages import DownloadRange, GetMessages
from actors.supervision import SupervisedMixin
from actors.verifier_core import INLINE_HASH_BYTES, OriginalChecks, Verifier
from actors.verifier_messages import (
    GetVerifierStatus, OriginalChecked, Tick, VerifierStatusResult, VerifyNow, VerifyResult,
)

__all__ = ["AccountsMessagePort", "VerifierActor", "idle_wait", "verifier_owner", "marker_adopter"]

READER_STATES = ("ready", "cooling_down")
OWNER_MARK = "/verifier#"


PROCESS_TOKEN = secrets.token_hex(4)  # one per process: tells this process's leases apart


def verifier_owner(node: str) -> str:
    """A lease owner unique per process and actor: "<node>/verifier#<process>.<actor>"."""
    return f"{node}{OWNER_MARK}{PROCESS_TOKEN}.{secrets.token_hex(4)}"


class AccountsMessagePort:
    """MessagePort over AccountActor refs (asked with a timeout from the verifier's thread)."""

    def __init__(self, storage: Any, accounts: Callable[[], dict[str, Any]], *,
                 timeout: float = 60.0):
        self.storage, self._accounts, self.timeout = storage, accounts, timeout

    def _ref(self, account: str) -> Any:
        ref = self._accounts().get(account)
        if ref is None or not ref.is_alive():
            raise LookupError(f"account {account} is not running")
        return ref

    def readers(self, channel: str, preferred: Sequence[str] = ()) -> list[str]:
        refs = self._accounts()
        try:
            states = {a.name: a.state for a in self.storage.list_accounts()}
        except Exception:  # noqa: BLE001 - storage hiccup: try the running ones
            states = {}
        names = []
        for name, ref in refs.items():
            if ref is None or not ref.is_alive():
                continue
            if states.get(name, "ready") not in READER_STATES:
                continue
            try:
                if "GetMessagesRequest" in self.storage.active_flood_waits(name):
                    continue
            except Exception:  # noqa: BLE001
                pass
            names.append(name)
        rank = {n: i for i, n in enumerate(preferred)}
        return sorted(names, key=lambda n: (rank.get(n, len(rank)), n))

    def get_messages(self, account: str, channel: str, ids: tuple[int, ...]) -> tuple[Any, ...]:
        return self._ref(account).ask(GetMessages(channel, tuple(ids)), timeout=self.timeout).messages

    def download_range(self, account: str, document: Any, offset: int, limit: int) -> bytes:
        return self._ref(account).ask(DownloadRange(document, offset, limit), timeout=self.timeout)


def marker_adopter(port: AccountsMessagePort) -> Callable[..., dict]:
    """The Verifier's ``adopt`` hook over actors.adoption (W2): search the destination for
    the transfer's caption marker and match the parts about to be uploaded again."""
    from actors.adoption import adoptable, search_marker

    def adopt(transfer: Any, parts: list, manifest: Any) -> dict:
        readers = port.readers(transfer.destination, [p.account for p in parts if p.account])
        if not readers:
            return {}
        account = readers[0]
        ref = port._ref(account)  # noqa: SLF001
        messages = asyncio.run(search_marker(ref, transfer.destination, manifest.caption_marker,
                                             timeout=port.timeout, max_pages=5))
        lost = {p.message_id for p in parts}
        messages = [m for m in messages if m.id not in lost]
        # adoptable() wants every part of the transfer (the marker says n/count) and
        # matches the ones without a message id: the parts about to be uploaded again
        wanted = {p.index for p in parts}
        every = [dataclasses.replace(p, message_id=None) if p.index in wanted else p
                 for p in port.storage.list_parts(transfer.id)]
        found = adoptable(every, messages, transfer.id)
        return {i: (m.id, m.document.id if m.document else None, account) for i, m in found.items()}

    return adopt


def idle_wait(settings: Any, cap: float, *, now: float, next_check: float | None) -> float:
    """How long an idle verifier may skip Ticks: never past the next stored check
    (``next_check``), nor past the shortest delay after which a check it does not know of
    yet can fall due (first check delay, re-check interval, first back-off), nor ``cap``."""
    delays = [cap, settings.first_check_delay_seconds, settings.interval_seconds,
              settings.backoff_initial_seconds]
    if next_check is not None:
        delays.append(next_check - now)
    return max(0.0, min(float(d) for d in delays))


class VerifierActor(SupervisedMixin, pykka.ThreadingActor):
    """See the module docstring. Ticks coalesce: an idle verifier claims again on the first
    Tick at or after the next stored check (or after the shortest configured delay, at most
    ``idle_seconds``: :func:`idle_wait`); after a full batch the next pass follows at once
    (told to itself, so VerifyNow and status asks get in between)."""

    def __init__(self, storage: Any, settings: Any, *, accounts: Callable[[], dict[str, Any]],
                 node: str, metrics: Any = None, clock: Callable[[], float] = time.time,
                 request_timeout: float = 60.0, adopt: Any = True,
                 on_lost: Callable[..., Any] | None = None, idle_seconds: float = 5.0,
                 monotonic: Callable[[], float] = time.monotonic, rng: Any = None,
                 claim_limit: int | None = None, inline_hash_bytes: int = INLINE_HASH_BYTES):
        super().__init__()
        self.storage, self.settings, self.node = storage, settings, node
        self.owner = verifier_owner(node)
        self.port = AccountsMessagePort(storage, accounts, timeout=request_timeout)
        if adopt is True:
            try:
                adopt = marker_adopter(self.port)
            except ImportError:
                adopt = None
        # the sha256 of an original before a re-upload: on a thread of its own, so status
        # and VerifyNow are answered during a multi-GB hash
        self._hash_stop = threading.Event()
        self._hasher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="verifier-hash")
        originals = OriginalChecks(self._hasher, on_done=self._hash_done,
                                   inline_bytes=inline_hash_bytes, cancelled=self._hash_stop)
        self.core = Verifier(storage, self.port, settings, owner=self.owner, clock=clock, rng=rng,
                             metrics=metrics, adopt=adopt or None, on_lost=on_lost,
                             claim_limit=claim_limit, originals=originals)
        self._clock, self._monotonic, self._idle = clock, monotonic, idle_seconds
        self._next_idle_pass = 0.0          # monotonic: at most idle_seconds of skipped Ticks
        self._next_due_pass = 0.0           # clock: the next check we know of, or a delay
        self._passes = 0
        self._last_pass_at: float | None = None
        self._log = logger.bind(actor="verifier")

    def on_start(self) -> None:
        # A crashed earlier process of this node left leases nobody renews: take them back
        # now instead of after lease_seconds. Verifiers of this process (another actor, or
        # the one a restart replaces) keep theirs until they expire.
        released = self.storage.release_transfer_leases(
            f"{self.node}{OWNER_MARK}", keep=f"{self.node}{OWNER_MARK}{PROCESS_TOKEN}.")
        self._log.info("verifier {} started{}", self.owner,
                       f"; released {released} lease(s) of an earlier verifier" if released else "")

    def on_stop(self) -> None:
        try:
            super().on_stop()
        finally:
            self._stop_hashing()

    def on_failure(self, *exc_info) -> None:
        try:
            super().on_failure(*exc_info)
        finally:
            self._stop_hashing()

    def _stop_hashing(self) -> None:
        self._hash_stop.set()  # a running hash stops at its next 1 MiB block
        self._hasher.shutdown(wait=False, cancel_futures=True)

    def _hash_done(self, transfer_id: str) -> None:
        """On the hashing thread: wake the actor (nothing else is touched here)."""
        if self._hash_stop.is_set():
            return
        try:
            self.actor_ref.tell(OriginalChecked(transfer_id))
        except pykka.ActorDeadError:
            pass

    def on_receive(self, message: Any) -> Any:
        match message:
            case Tick():
                self._tick()
            case OriginalChecked(transfer_id=tid):
                self._original_checked(tid)
            case VerifyNow(transfer_id=tid):
                return self._verify_now(tid)
            case GetVerifierStatus():
                return self._status()
            case _:
                self._log.warning("ignoring unexpected message {!r}", message)
        return None

    # -- passes ----------------------------------------------------------------------------
    def _pass(self) -> list:
        outcomes = self.core.run_pass()
        self._passes += 1
        self._last_pass_at = self._clock()
        for o in outcomes:
            if o.result not in ("verified", "following"):
                self._log.info("check: {}", o)
        return outcomes

    def _tick(self) -> None:
        if not self.settings.enabled:
            return
        if self._monotonic() < self._next_idle_pass and self._clock() < self._next_due_pass:
            return
        outcomes = self._pass()
        if len(outcomes) >= self.core.claim_limit:
            self.actor_ref.tell(Tick())  # more is due: go on after what is queued
            return
        now = self._clock()
        try:
            next_check = self.storage.next_check_time()
        except Exception as exc:  # noqa: BLE001 - no back-off beyond the configured delays
            self._log.warning("next check time: storage failed: {}", exc)
            next_check = now
        wait = idle_wait(self.settings, self._idle, now=now, next_check=next_check)
        self._next_idle_pass = self._monotonic() + wait
        self._next_due_pass = now + wait

    def _original_checked(self, transfer_id: str) -> None:
        """A hash ended: the transfer is due now and the next pass acts on the verdict."""
        try:
            self.storage.schedule_check(transfer_id)
        except Exception as exc:  # noqa: BLE001 - it is due after interval_seconds anyway
            self._log.warning("transfer {}: could not schedule its check: {}", transfer_id, exc)
            return
        if self.settings.enabled:
            self._next_idle_pass = self._next_due_pass = 0.0
            self._tick()

    def _verify_now(self, transfer_id: str | None) -> VerifyResult:
        scheduled = self.storage.schedule_check(transfer_id)
        outcomes: list = []
        for _ in range(50):  # bounded: what was made due now is ahead of later checks
            got = self._pass()
            outcomes += got
            if not got or (transfer_id is not None and any(o.transfer_id == transfer_id for o in got)):
                break
        if transfer_id is not None:
            outcomes = [o for o in outcomes if o.transfer_id == transfer_id]
        return VerifyResult(scheduled, tuple(outcomes))

    def _status(self) -> VerifierStatusResult:
        core = self.core
        try:
            due, lag = self.storage.count_due_checks(), core.lag_seconds()
        except Exception as exc:  # noqa: BLE001
            due, lag = -1, 0.0
            self._log.warning("status: storage failed: {}", exc)
        return VerifierStatusResult(
            owner=self.owner, enabled=self.settings.enabled, passes=self._passes,
            last_pass_at=self._last_pass_at, due=due, lag_seconds=round(lag, 3),
            checks=dict(core.checks), outcomes=dict(core.outcomes), reuploads=core.reuploads,
            cleanups=core.cleanups, lost=core.lost, last_error=core.last_error,
            hashing=core.originals.running)
