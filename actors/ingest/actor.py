"""IngestActor: scans every mapping on a schedule and ingests what it finds.

One per daemon (child "ingest"). A LoopActor: its thread runs one asyncio loop
on which each account's work is a task, so the accounts scan and download in
parallel with each other; every Telegram call is a message to that account's
AccountActor (this actor never holds a Telegram client).

Schedule. Each mapping (``[[ingest.mappings]]``) is due
``scan_interval_seconds`` plus a random ``0..scan_jitter_seconds`` after its
last scan (the first scan comes within the jitter after start). On
:class:`Tick` (the daemon sends one about every 0.5 s) an account with due
mappings and no task running gets a task that, per mapping and per (channel,
topic) target, in a recorded run (storage ``start_run``/``update_run``/
``finish_run``, counters and a progress line updated live):

1. reads what is new since the cursor (actors.ingest.scan.read_pages), records
   each page and advances the cursor after it (SetRecorder); a stalled
   pagination marks the cursor stalled with its reason and fails the run;
2. re-evaluates the channel's waiting sets;
3. claims the channel's ready sets one at a time and ingests each (SetWorker:
   de-duplication by document id before download, download, sha256 claim,
   transfer creation).

Besides, at most every ``phase2_interval`` seconds a task follows the sets
being uploaded and indexes finished packages (Phase2).

:class:`ScanNow` makes the matching mappings (all, or those of one channel,
by name or id) due at once. :class:`GetIngestStatus` answers with the live
progress of each account and the schedule.

A lost package requeued for a re-fetch (actors.ingest.refetch) waits "ready"
for the scan of its channel. Every ``UNMAPPED_CHECK_SECONDS``, after a ScanNow
of one channel and after a reload, the re-fetches waiting in a
channel that no mapping scans (the channel each mapping resolved to on its last
scan; undecided while a mapping has not resolved yet) and that no other node has
scanned within two scan intervals are ended (``SetWorker.end_unmapped_refetches``)
instead of waiting for ever.

Nothing that matters is kept only here: runs left "running" by a previous life
of this node are marked "interrupted" at start; cursors, sets, claims and
transfers are in storage, so a restarted actor (or another process) carries on.
"""
from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from loguru import logger

from actors.base import LoopActor
from actors.faults import fault_point
from actors.ingest.pipeline import (
    IngestAccountPort, Phase2, RecordOutcome, SetRecorder, SetWorker, remove_empty_staging_dirs,
    set_backoff,
)
from actors.ingest.scan import ScanError, StalledError, read_pages, resolve_target
from actors.supervision import SupervisedMixin
from actors.telegram.errors import TelegramError

__all__ = ["IngestActor", "Tick", "ScanNow", "ScanNowResult", "GetIngestStatus", "IngestStatusResult",
           "UpdateIngestSettings", "UpdateIngestSettingsResult", "mapping_label"]

RETRY_SECONDS = 30.0        # an account that is not running: look again after this
PHASE2_INTERVAL = 1.0
STAGING_SWEEP_SECONDS = 60.0  # empty staging folders (files removed by the cleanup) go this often
UNMAPPED_CHECK_SECONDS = 30.0  # re-fetches waiting in a channel no mapping scans: looked for this often


# ------------------------------------------------------------------ messages


@dataclass(frozen=True)
class Tick:
    """Start due scans and the phase-2 round (time-driven work)."""


@dataclass(frozen=True)
class ScanNow:
    """Scan the mappings of ``channel`` (username, -100 id or bare id), or all, now."""

    channel: str | None = None


@dataclass(frozen=True)
class ScanNowResult:
    mappings: tuple[str, ...]   # the labels made due


@dataclass(frozen=True)
class GetIngestStatus:
    pass


@dataclass(frozen=True)
class UpdateIngestSettings:
    """A reload: the new ``[ingest]`` section (mappings, schedule, limits) applies from now on."""

    ingest: Any   # config.schema.IngestSettings


@dataclass(frozen=True)
class UpdateIngestSettingsResult:
    added: tuple[str, ...]      # mapping labels
    removed: tuple[str, ...]
    restart_needed: tuple[str, ...] = ()   # keys that only a restart applies


@dataclass(frozen=True)
class IngestStatusResult:
    mappings: tuple[dict, ...]    # label, account, channel, topics, next_scan_at, running
    running: tuple[dict, ...]     # one per busy account: its live progress

    def to_dict(self) -> dict:
        return {"mappings": [dict(m) for m in self.mappings], "running": [dict(r) for r in self.running]}


def mapping_label(m: Any) -> str:
    topics = f"#{','.join(str(t) for t in m.topics)}" if m.topics else ""
    return f"{m.account}:{m.channel}{topics}"


@dataclass
class _Progress:
    account: str
    mapping: str = ""
    phase: str = "starting"
    run_id: str | None = None
    target: str = ""
    cursor: int = 0
    pages: int = 0
    set: str | None = None
    bytes_done: int = 0
    bytes_total: int = 0
    started_at: float = 0.0
    counters: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"account": self.account, "mapping": self.mapping, "phase": self.phase,
                "run_id": self.run_id, "target": self.target, "cursor": self.cursor,
                "pages": self.pages, "set": self.set, "bytes_done": self.bytes_done,
                "bytes_total": self.bytes_total, "started_at": self.started_at}


# ------------------------------------------------------------------ the schedule (no threads)


class Schedule:
    """When each mapping is due, as plain logic (the actor drives it, tests call it directly).

    A mapping is *due* at a time, *running* while its account's round has it, or
    *again* when ScanNow came while it ran (due at once when that round ends).
    """

    RUNNING, AGAIN = float("inf"), -1.0

    def __init__(self, mappings: list[tuple[str, str]], *, interval: float, jitter: float,
                 retry: float = RETRY_SECONDS, rng: random.Random | None = None):
        self.accounts = dict(mappings)          # label -> account
        self.interval, self.jitter, self.retry = interval, jitter, retry
        self.rng = rng or random.Random()
        self.due: dict[str, float] = {}

    def _jitter(self) -> float:
        return self.rng.uniform(0, self.jitter) if self.jitter else 0.0

    def start(self, now: float) -> None:
        """The first scans come within the jitter after start."""
        for label in self.accounts:
            self.due[label] = now + self._jitter()

    def take_due(self, now: float, busy: set[str] | frozenset = frozenset()) -> dict[str, list[str]]:
        """Due labels of accounts not ``busy``, by account; they are running from now on."""
        out: dict[str, list[str]] = {}
        for label, account in self.accounts.items():
            at = self.due.get(label, now)  # AGAIN (-1) counts as due once its account is free
            if account in busy or at == self.RUNNING or at > now:
                continue
            out.setdefault(account, []).append(label)
        for labels in out.values():
            for label in labels:
                self.due[label] = self.RUNNING
        return out

    def finished(self, label: str, now: float, *, ok: bool = True) -> None:
        """One scan ended: due again after the interval (a failure: after ``retry``)."""
        if self.due.get(label) == self.AGAIN:
            self.due[label] = now
            return
        self.due[label] = now + (self.interval if ok else self.retry) + self._jitter()

    def abandon(self, label: str, now: float) -> None:
        """A round ended without scanning this label (account down): try again soon."""
        if self.due.get(label) in (self.RUNNING, self.AGAIN):
            self.finished(label, now, ok=False)

    def update(self, mappings: list[tuple[str, str]], now: float, *, interval: float,
               jitter: float) -> None:
        """New mappings (a reload): new labels are due within the jitter, removed ones
        forgotten (a round running one finishes its scan), the rest keep their time."""
        self.interval, self.jitter = interval, jitter
        self.accounts = dict(mappings)
        for label in list(self.due):
            if label not in self.accounts:
                del self.due[label]
        for label in self.accounts:
            if label not in self.due:
                self.due[label] = now + self._jitter()

    def scan_now(self, labels, now: float) -> None:
        for label in labels:
            self.due[label] = self.AGAIN if self.due.get(label) == self.RUNNING else now

    def running(self, label: str) -> bool:
        return self.due.get(label) in (self.RUNNING, self.AGAIN)

    def next_at(self, label: str) -> float | None:
        at = self.due.get(label)
        return None if at in (None, self.RUNNING, self.AGAIN) else at


# ------------------------------------------------------------------ the actor


class IngestActor(SupervisedMixin, LoopActor):
    def __init__(self, storage: Any, settings: Any, accounts: Callable[[str], Any], *,
                 planner: Any, node: str, budget: Any = None, metrics: Any = None,
                 clock: Callable[[], float] = time.time, rng: random.Random | None = None,
                 limit_for: Callable[[], int] | None = None, request_timeout: float = 120.0,
                 chunk_size: int = 1024 * 1024, phase2_interval: float = PHASE2_INTERVAL,
                 sleep: Callable[[float], Any] = asyncio.sleep, settle_seconds: float | None = None):
        super().__init__()
        self.storage, self.settings, self.node = storage, settings, node
        self._accounts = accounts
        self._metrics, self._clock = metrics, clock
        self._rng = rng or random.Random()
        self._timeout = request_timeout
        self._phase2_interval = phase2_interval
        ing = settings.ingest
        self._mappings = [(mapping_label(m), m) for m in ing.mappings]
        self.schedule = Schedule([(label, m.account) for label, m in self._mappings],
                                 interval=ing.scan_interval_seconds, jitter=ing.scan_jitter_seconds,
                                 rng=self._rng)
        self._last_present: dict[str, float] = {}
        self._stalled: dict[str, bool] = {}
        self._tasks: dict[str, asyncio.Task] = {}
        self._progress: dict[str, _Progress] = {}
        self._phase2_task: asyncio.Task | None = None
        self._last_phase2 = 0.0
        budget_for = None
        if budget is not None:
            from actors.uploader import BudgetActorPort
            budget_for = lambda account: BudgetActorPort(budget, account)  # noqa: E731
        extra = {} if settle_seconds is None else {"settle_seconds": settle_seconds}
        self.recorder = SetRecorder(storage, max_archive_bytes=ing.max_archive_bytes, clock=clock, **extra)
        self.worker = SetWorker(storage, planner, settings, node=node, staging_dir=Path(ing.staging_dir),
                                budget_for=budget_for, limit_for=limit_for, window=ing.download_window,
                                clock=clock, chunk_size=chunk_size, sleep=sleep,
                                set_lease_seconds=ing.set_lease_seconds, metrics=metrics)
        self._last_sweep = 0.0
        self._resolved: dict[str, set[int]] = {}   # label -> channel ids its last scan resolved
        self._last_unmapped_check = float("-inf")
        self.phase2 = Phase2(storage, node=node, clock=clock, staging_dir=Path(ing.staging_dir))
        self._log = logger.bind(actor="ingest")

    # -- life cycle --------------------------------------------------------------------------
    def on_start(self) -> None:
        self.schedule.start(self._clock())
        try:
            n = self.storage.interrupt_stale_runs(older_than=0.0, owner=self.node)
            if n:
                self._log.warning("{} run(s) of an earlier life marked interrupted", n)
            released = self._release_own_set_leases()
            if released:
                self._log.info("released {} set lease(s) of an earlier life of this node", released)
        except Exception as exc:  # noqa: BLE001 - not worth failing the start over
            self._log.warning("could not clean up after an earlier life: {}", exc)
        self._log.info("ingest: {} mapping(s), staging in {}", len(self._mappings),
                       self.settings.ingest.staging_dir)

    async def on_stop(self) -> None:
        tasks = [t for t in (*self._tasks.values(), self._phase2_task) if t is not None and not t.done()]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    def _release_own_set_leases(self) -> int:
        """Leases this node held when it died (a crash mid-set): free at once, not after expiry."""
        prefix, n = f"{self.node}/", 0
        for state in ("ready", "downloading", "uploading"):
            for s in self.storage.list_archive_sets(state, limit=100_000):
                if s.lease_owner and s.lease_owner.startswith(prefix):
                    n += bool(self.storage.release_set_lease(s.set_key, s.lease_owner))
        return n

    def on_failure(self, exc_type, exc_value, tb) -> None:
        self._log.opt(exception=(exc_type, exc_value, tb)).error("ingest actor failed")
        super().on_failure(exc_type, exc_value, tb)

    def on_receive(self, message: Any) -> Any:
        if isinstance(message, Tick):
            return self._tick()
        if isinstance(message, ScanNow):
            return self._scan_now(message)
        if isinstance(message, GetIngestStatus):
            return self._status()
        if isinstance(message, UpdateIngestSettings):
            return self._update_settings(message.ingest)
        raise TypeError(f"IngestActor does not handle {type(message).__name__}")

    # -- the schedule ------------------------------------------------------------------------
    def _tick(self) -> None:
        now = self._clock()
        busy = {a for a, t in self._tasks.items() if not t.done()}
        by_label = dict(self._mappings)
        for account, labels in self.schedule.take_due(now, busy).items():
            due = [(label, by_label[label]) for label in labels]
            self._tasks[account] = self.loop.create_task(self._account_round(account, due))
        if (self._phase2_task is None or self._phase2_task.done()) and \
                now - self._last_phase2 >= self._phase2_interval:
            self._last_phase2 = now
            self._phase2_task = self.loop.create_task(self._phase2_round())
        if now - self._last_unmapped_check >= UNMAPPED_CHECK_SECONDS:
            self.end_unmapped_refetches()
        self._update_lag(now)

    def _scan_now(self, msg: ScanNow) -> ScanNowResult:
        wanted = None if msg.channel is None else _channel_key(msg.channel)
        labels = []
        for label, m in self._mappings:
            if wanted is None or _channel_key(m.channel) == wanted or self._known_id(m, wanted):
                labels.append(label)
        self.schedule.scan_now(labels, self._clock())  # running ones: again when their round ends
        if labels:
            self._tick()
        if wanted is not None:  # e.g. the wake of a re-fetch in a channel not mapped any more
            self.end_unmapped_refetches()
        return ScanNowResult(tuple(labels))

    def _update_settings(self, ing: Any) -> UpdateIngestSettingsResult:
        import dataclasses

        old = self.settings.ingest
        restart = tuple(k for k in ("staging_dir", "enabled") if getattr(old, k) != getattr(ing, k))
        if "staging_dir" in restart:  # staged downloads stay where they are until a restart
            ing = dataclasses.replace(ing, staging_dir=old.staging_dir)
        self.settings = dataclasses.replace(self.settings, ingest=ing)
        before = {label for label, _m in self._mappings}
        self._mappings = [(mapping_label(m), m) for m in ing.mappings]
        after = {label for label, _m in self._mappings}
        self.schedule.update([(label, m.account) for label, m in self._mappings], self._clock(),
                             interval=ing.scan_interval_seconds, jitter=ing.scan_jitter_seconds)
        for label in before - after:
            self._stalled.pop(label, None)
            self._last_present.pop(label, None)
            self._resolved.pop(label, None)
        self.recorder.max_bytes = ing.max_archive_bytes
        w = self.worker
        w.settings, w.window, w.max_bytes = self.settings, ing.download_window, ing.max_archive_bytes
        w.set_lease_seconds = ing.set_lease_seconds
        result = UpdateIngestSettingsResult(tuple(sorted(after - before)), tuple(sorted(before - after)),
                                            restart)
        self._log.info("ingest settings reloaded: {} mapping(s), added {}, removed {}", len(after),
                       list(result.added), list(result.removed))
        if result.removed:
            self.end_unmapped_refetches()
        return result

    def _mapped_channels(self) -> dict[str, set[int] | None]:
        """Each mapping's channel ids: a -100/bare id as is, else what its last scan
        resolved (None: not known yet)."""
        from actors.account_core import bare_channel_id

        out: dict[str, set[int] | None] = {}
        for label, m in self._mappings:
            key = _channel_key(m.channel)
            if key.lstrip("-").isdigit():
                out[label] = {bare_channel_id(int(key))}
            else:
                out[label] = self._resolved.get(label)
        return out

    def end_unmapped_refetches(self) -> int:
        """End the re-fetches waiting in channels no mapping scans (see the module doc)."""
        from actors.ingest.refetch import unmapped_channels

        now = self._clock()
        self._last_unmapped_check = now
        ing = self.settings.ingest
        since = now - 2 * (ing.scan_interval_seconds + ing.scan_jitter_seconds) - RETRY_SECONDS
        try:
            waiting = self.storage.refetch_waiting_channels()
            if not waiting:
                return 0
            channels = unmapped_channels(waiting, self._mapped_channels())
            ended = 0
            for channel_id in sorted(channels):
                if self.storage.channel_scanned_by_others(channel_id, self.node, since):
                    continue  # another process maps it: its scan fetches the set
                ended += len(self.worker.end_unmapped_refetches(channel_id))
            return ended
        except Exception as exc:  # noqa: BLE001 - looked at again next time
            self._log.warning("could not look for re-fetches in unmapped channels: {!r}", exc)
            return 0

    def _known_id(self, m: Any, wanted: str) -> bool:
        if not wanted.lstrip("-").isdigit():
            return False
        from actors.account_core import bare_channel_id
        cid = bare_channel_id(int(wanted))
        resolved = self._resolved.get(mapping_label(m))
        if resolved is not None:  # what its last scan resolved, not any channel of its account
            return cid in resolved
        return any(c.account == m.account and c.channel_id == cid for c in self._cursors())

    def _cursors(self):
        try:
            return self.storage.list_cursors()
        except Exception:  # noqa: BLE001
            return []

    def _reschedule(self, label: str, *, soon: bool = False) -> None:
        self.schedule.finished(label, self._clock(), ok=not soon)

    def _update_lag(self, now: float) -> None:
        if self._metrics is None or not hasattr(self._metrics, "set_scan_lag"):
            return
        for label, _m in self._mappings:
            last = self._last_present.get(label)
            self._metrics.set_scan_lag(label, now - last if last is not None else 0.0,
                                       self._stalled.get(label, False))

    # -- one account's round -------------------------------------------------------------------
    async def _account_round(self, account: str, due: list) -> None:
        progress = self._progress[account] = _Progress(account, started_at=self._clock())
        try:
            ref = self._accounts(account)
            if ref is None or not ref.is_alive():
                self._log.bind(account=account).warning("account {} is not running: scan later", account)
                for label, _m in due:
                    self._reschedule(label, soon=True)
                return
            port = IngestAccountPort(ref, timeout=self._timeout)
            try:
                dialogs = (await port.dialogs()).channels
            except Exception as exc:  # noqa: BLE001 - report, try again later
                self._log.bind(account=account).warning("dialogs of {} failed: {!r}", account, exc)
                for label, _m in due:
                    self._reschedule(label, soon=True)
                return
            for label, m in due:
                progress.mapping = label
                ok = await self._scan_mapping(account, label, m, port, dialogs, progress)
                self._reschedule(label, soon=not ok)
        finally:
            self._progress.pop(account, None)
            for label, _m in due:
                self.schedule.abandon(label, self._clock())

    async def _scan_mapping(self, account, label, m, port, dialogs, progress) -> bool:
        log = self._log.bind(account=account)
        try:
            targets = await resolve_target(port, m.channel, m.topics, dialogs=dialogs)
            self._resolved[label] = {t.channel_id for t in targets}
        except (ScanError, TelegramError) as exc:
            run = self.storage.start_run(mapping=label, channel_id=0, account=account, owner=self.node)
            self.storage.finish_run(run.id, state="failed", error=str(exc))
            self._run_done("failed")
            log.warning("mapping {}: {}", label, exc)
            return False
        ok = True
        for target in targets:
            ok = await self._scan_target(account, label, m, target, port, progress) and ok
        return ok

    async def _scan_target(self, account, label, m, target, port, progress) -> bool:
        store, log = self.storage, self._log.bind(account=account)
        run = store.start_run(mapping=label, channel_id=target.channel_id, account=account,
                              topic_id=target.topic_id, owner=self.node)
        progress.run_id, progress.target, progress.phase = run.id, str(target), "scanning"
        progress.pages, progress.set = 0, None
        error, state = None, "finished"
        try:
            cursor = store.get_cursor(account, target.channel_id, target.topic_id)
            since = cursor.last_message_id if cursor is not None else 0
            progress.cursor = since
            at_present = False
            try:
                async for page in read_pages(port, target, since):
                    sniffed = await self.recorder.sniff(target, page, port)
                    out = self.recorder.record_page(target, page, account=account, run_id=run.id,
                                                    sniffed=sniffed)
                    for key in sorted(out.set_keys):
                        self.recorder.refresh_set(key, at_present=False, run_id=run.id, account=account,
                                                  outcome=out)
                    store.advance_cursor(account, target.channel_id, target.topic_id,
                                         last_message_id=page.next_since_id)
                    progress.pages += 1
                    progress.cursor = page.next_since_id
                    store.update_run(run.id, seen=out.seen, skipped=out.skipped or None,
                                     progress=f"read up to message {page.next_since_id}"
                                              f"{' (document search: history hidden)' if page.source == 'search' else ''}")
                    self._count(account, seen=out.seen, skipped=out.skipped)
                at_present = True
                self._stalled[label] = False
                self._last_present[label] = self._clock()
            except StalledError as exc:
                store.mark_cursor_stalled(account, target.channel_id, target.topic_id, reason=exc.reason)
                self._stalled[label] = True
                state, error = "failed", f"stalled: {exc.reason}"
                log.warning("{}: pagination stalled: {}", target, exc.reason)
            waiting = RecordOutcome()
            self.recorder.refresh_waiting(target.channel_id, at_present=at_present, run_id=run.id,
                                          account=account, outcome=waiting)
            if waiting.skipped:
                store.update_run(run.id, skipped=waiting.skipped)
                self._count(account, skipped=waiting.skipped)
            await self._ingest_ready(account, m, target, port, progress, run.id)
        except asyncio.CancelledError:
            store.finish_run(run.id, state="interrupted", error="stopped")
            raise
        except Exception as exc:  # noqa: BLE001 - a run fails, the actor goes on
            state, error = "failed", f"{type(exc).__name__}: {exc}"
            log.opt(exception=exc).warning("{}: scan failed", target)
        store.finish_run(run.id, state=state, error=error)
        self._run_done(state)
        return state == "finished"

    async def _ingest_ready(self, account, m, target, port, progress, run_id) -> None:
        from storage.ingest import SetLeaseLostError

        store, ing = self.storage, self.settings.ingest
        owner = self.worker.set_owner(account)
        tried: set[str] = set()
        while True:
            claimed = store.claim_ready_sets(owner, 1, ing.set_lease_seconds, channel_id=target.channel_id,
                                             states=("ready", "downloading"))
            if not claimed:
                return
            rec = claimed[0]
            fault_point("ingest_after_claim")
            if rec.set_key in tried:  # failed once in this run: next scan
                store.release_set_lease(rec.set_key, owner)
                return
            tried.add(rec.set_key)
            progress.phase, progress.set = "downloading", rec.base_name
            progress.bytes_done, progress.bytes_total = 0, rec.total_size

            def on_bytes(n: int, progress=progress) -> None:
                progress.bytes_done += n
                self._count(account, downloaded=n)

            before = progress.bytes_done
            try:
                outcome = await self.worker.process(rec, port, account=account, mapping=m, run_id=run_id,
                                                    on_bytes=on_bytes)
            except asyncio.CancelledError:
                raise
            except SetLeaseLostError as exc:  # taken over by another worker: not a failure of the set
                store.update_run(run_id, bytes_downloaded=progress.bytes_done - before,
                                 progress=f"set {rec.base_name}: lease lost, left to its new holder")
                self._log.bind(account=account).warning("set {}: {}", rec.set_key, exc)
                continue
            except Exception as exc:  # noqa: BLE001 - this set is tried again after a backoff
                self._set_failed(account, rec, owner, exc, run_id, progress.bytes_done - before)
                continue
            skipped = {outcome.result: 1} if outcome.result in ("duplicate", "too_large", "unreadable") \
                else None
            store.update_run(run_id, bytes_downloaded=progress.bytes_done - before, skipped=skipped,
                             ingested=1 if outcome.result == "queued" else 0,
                             progress=f"set {rec.base_name}: {outcome.result}")
            if skipped:
                self._count(account, skipped=skipped)
            progress.phase, progress.set = "scanning", None

    def _set_failed(self, account, rec, owner, exc, run_id, downloaded: int) -> None:
        """One failed try: backoff before the next, skipped ("failed") at the cap."""
        ing, log = self.settings.ingest, self._log.bind(account=account)
        error = f"{type(exc).__name__}: {exc}"
        try:
            after = self.storage.record_set_failure(
                rec.set_key, owner, error=error, max_attempts=ing.max_set_attempts, run_id=run_id,
                account=account, backoff=lambda n: set_backoff(n, ing.set_backoff_initial_seconds,
                                                               ing.set_backoff_max_seconds))
        except Exception as store_exc:  # noqa: BLE001 - at least free it for the next scan
            log.warning("set {}: recording its failure failed: {!r}", rec.set_key, store_exc)
            self.storage.release_set_lease(rec.set_key, owner)
            after = None
        gave_up = after is not None and after.state == "skipped"
        self.storage.update_run(
            run_id, bytes_downloaded=downloaded, skipped={"failed": 1} if gave_up else None,
            progress=f"set {rec.base_name} failed"
                     f"{f' (attempt {after.attempts}/{ing.max_set_attempts})' if after else ''}: {error}")
        if gave_up:
            self._count(account, skipped={"failed": 1})
            log.opt(exception=exc).warning("set {} failed {} times: skipped (failed): {}", rec.set_key,
                                           after.attempts, error)
        else:
            log.opt(exception=exc).warning("set {} failed, tried again after a backoff: {}",
                                           rec.set_key, error)

    # -- phase 2 -------------------------------------------------------------------------------
    async def _phase2_round(self) -> None:
        try:
            follow = self.phase2.follow_uploads()
            if follow.ingested or follow.skipped:
                self._count(None, ingested=follow.ingested, skipped=follow.skipped)
            await self.phase2.index_pending()
        except Exception as exc:  # noqa: BLE001 - tried again next round
            self._log.opt(exception=exc).warning("phase 2 round failed")
        now = self._clock()
        if now - self._last_sweep >= STAGING_SWEEP_SECONDS:
            self._last_sweep = now
            self.sweep_staging()

    def sweep_staging(self, *, older_than: float = STAGING_SWEEP_SECONDS, now: float | None = None) -> int:
        """Remove the empty staging folders of sets no longer worked on here."""
        n = remove_empty_staging_dirs(Path(self.settings.ingest.staging_dir),
                                      keep=self.worker.active_dirs(), older_than=older_than, now=now)
        if n:
            self._log.info("removed {} empty staging folder(s)", n)
        return n

    # -- status & metrics ----------------------------------------------------------------------
    def _status(self) -> IngestStatusResult:
        mappings = []
        for label, m in self._mappings:
            task = self._tasks.get(m.account)
            running = task is not None and not task.done() and \
                self._progress.get(m.account) is not None and self._progress[m.account].mapping == label
            mappings.append({"label": label, "account": m.account, "channel": m.channel,
                             "topics": list(m.topics), "destination": m.destination,
                             "next_scan_at": self.schedule.next_at(label),
                             "running": running, "stalled": self._stalled.get(label, False),
                             "last_complete_scan_at": self._last_present.get(label)})
        running = tuple(p.to_dict() for p in self._progress.values())
        return IngestStatusResult(tuple(mappings), running)

    def _count(self, account, *, seen=0, ingested=0, skipped=None, downloaded=0) -> None:
        if self._metrics is not None and hasattr(self._metrics, "record_ingest"):
            self._metrics.record_ingest(account=account, seen=seen, ingested=ingested, skipped=skipped,
                                        downloaded=downloaded)

    def _run_done(self, state: str) -> None:
        if self._metrics is not None and hasattr(self._metrics, "record_ingest_run"):
            self._metrics.record_ingest_run(state)


def _channel_key(channel: str) -> str:
    text = str(channel).strip().lstrip("@")
    return text if text.lstrip("-").isdigit() else text.casefold()
