"""The running daemon: storage, supervised actors, admin socket, metrics, signals.

:class:`Daemon` is what ``stashd run`` and ``stashd demo`` drive. Start-up order:
storage -> actors (one AccountActor per session, joined with a ping; then, when
``upload.roots`` is configured, the upload pipeline: BudgetActor, the
UploaderActor pool, DispatcherActor, InboxActor, VerifierActor unless
[verify] enabled = false) -> ticker -> admin socket ->
metrics endpoint -> READY. Stop order is the reverse.

Children are all under one SupervisorActor; everybody who talks to another
child does it through :class:`_Relay` (or a lookup in ``Daemon._refs``), so a
restarted child is found under its name, never through a stale ref.

The main thread owns the daemon's life: signal handlers (and the admin
``shutdown`` command, and the supervisor giving up) only set a flag and write a
byte to a self-pipe; :meth:`Daemon.run` wakes on it and does the work: stop,
reload, dump stacks, watchdog pings.
"""
from __future__ import annotations

import dataclasses
import os
import select
import signal
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pykka
from loguru import logger

from actors.notify import Notifier
from actors.telegram.session import discover_sessions
from actors.supervision import (
    AddChild, ChildSpec, GetChild, GetStatus, RemoveChild, StartChildren, StopChildren,
    SupervisorActor,
)

ACCOUNT_PREFIX = "account:"
UPLOADER_PREFIX = "uploader:"
BUDGET, DISPATCHER, INBOX = "budget", "dispatcher", "inbox"
ASK_TIMEOUT = 10.0
VERIFIER = "verifier"
INGEST = "ingest"
VERIFY_STATES = ("uploaded", "verifying", "verified", "cleaned")
"""What ``stashctl verify`` can check (storage.transfers.VERIFY_STATES: cleaned ones too,
a lost message is reported)."""
VERIFY_ASK_TIMEOUT = 60.0
VERIFY_ALL_LIMIT = 1_000_000
VERIFY_SHOWN = 100
TICK_SECONDS = 0.5

log = logger.bind(actor="daemon")


def stashd_version() -> str:
    try:
        from importlib.metadata import version
        return version("stashd")
    except Exception:  # not installed (running from a checkout)
        return "0.1.0"


# ------------------------------------------------------------------ sessions


@dataclass(frozen=True)
class AccountPlan:
    """One account the daemon should run: a session file plus its config overrides."""

    name: str
    session_path: Path
    paused: bool = False


def discover_accounts(settings) -> list[AccountPlan]:
    """The accounts to run: every session found (files fixed to mode 0600),
    minus ``enabled = false`` ones; ``paused = true`` starts one paused.

    A configured account without its session file is reported and skipped.
    """
    plans = []
    for entry in discover_sessions(settings):
        if not entry.enabled:
            continue
        if not entry.exists:
            log.warning("[[accounts]] names {!r} but {} does not exist; run: stashd login {}",
                        entry.name, entry.path, entry.name)
            continue
        plans.append(AccountPlan(entry.name, entry.path, entry.paused))
    return plans


def _default_account_starter(name, session_path, settings, storage, metrics, clock, *, listener=None):
    from actors.account import AccountActor
    return AccountActor.start(name, session_path, settings, storage, metrics, clock, listener=listener)


def _takes_listener(fn: Callable[..., Any]) -> bool:
    import inspect
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return "listener" in params  # not **kwargs: pykka's Actor.start passes those to __init__


class _Relay:
    """``tell`` to whatever actor currently runs under ``name`` (restarts included)."""

    def __init__(self, refs: dict, name: str):
        self._refs, self._name = refs, name

    def tell(self, message: Any) -> None:
        ref = self._refs.get(self._name)
        if ref is None:
            raise pykka.ActorDeadError(f"{self._name} is not running")
        ref.tell(message)

    def is_alive(self) -> bool:
        ref = self._refs.get(self._name)
        return ref is not None and ref.is_alive()


def upload_enabled(settings) -> bool:
    upload = getattr(settings, "upload", None)
    return bool(upload is not None and upload.roots) or ingest_enabled(settings)


def ingest_enabled(settings) -> bool:
    """``[ingest]`` is on and maps at least one source (ingested archives go
    through the upload pipeline, so that runs too)."""
    ingest = getattr(settings, "ingest", None)
    return bool(ingest is not None and ingest.enabled and ingest.mappings)


# ------------------------------------------------------------------ waking the main thread


class _Waker:
    """Self-pipe: safe to poke from a signal handler or any thread."""

    def __init__(self):
        self._r, self._w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    def wake(self) -> None:
        try:
            os.write(self._w, b"!")
        except (BlockingIOError, OSError):
            pass  # pipe full (already awake) or closed

    def wait(self, timeout: float | None) -> None:
        ready, _, _ = select.select([self._r], [], [], timeout)
        if ready:
            try:
                while os.read(self._r, 4096):
                    pass
            except (BlockingIOError, OSError):
                pass

    def close(self) -> None:
        for fd in (self._r, self._w):
            try:
                os.close(fd)
            except OSError:
                pass


def thread_dump() -> str:
    """Every thread's current stack, as text."""
    names = {t.ident: t.name for t in threading.enumerate()}
    parts = []
    for ident, frame in sys._current_frames().items():
        parts.append(f"--- thread {names.get(ident, '?')} (ident {ident}) ---\n"
                     + "".join(traceback.format_stack(frame)))
    return "\n".join(parts)


# ------------------------------------------------------------------ the daemon


class Daemon:
    """Owns storage, the supervisor actor, the admin socket and the metrics endpoint."""

    def __init__(self, settings, *, config_path: Path | str | None = None,
                 notifier: Notifier | None = None, clock: Callable[[], float] = time.time,
                 account_starter: Callable[..., pykka.ActorRef] | None = None,
                 config_loader: Callable[[Path], Any] | None = None,
                 on_reload_logging: Callable[[Any], None] | None = None,
                 sim_autostart: bool = False, upload_limit_bytes: int | None = None,
                 tick_seconds: float = TICK_SECONDS, metrics_port_fallback: bool = False):
        self.settings = settings
        self.config_path = Path(config_path) if config_path else None
        self.notifier = notifier or Notifier()
        self.clock = clock
        self._account_starter = account_starter or _default_account_starter
        self._config_loader = config_loader
        self._on_reload_logging = on_reload_logging
        self._sim_autostart = sim_autostart
        self._sim = None
        self.storage = None
        self.metrics = None
        self.supervisor: pykka.ActorRef | None = None
        self.admin = None
        self.metrics_server = None
        self.state = "starting"
        self.started_at = time.time()
        self.exit_code: int | None = None
        self._accounts: dict[str, AccountPlan] = {}
        self._paused: set[str] = set()
        self._waker = _Waker()
        self._stop_requested = False
        self._reload_requested = False
        self._dump_requested = False
        self._old_handlers: dict[int, Any] = {}
        self._stopped = False
        self._upload_limit_bytes = upload_limit_bytes
        self._tick_seconds = tick_seconds
        self._metrics_port_fallback = metrics_port_fallback  # demo: a taken port -> a free one
        self._refs: dict[str, pykka.ActorRef] = {}
        self._ticker_stop = threading.Event()
        self._ticker: threading.Thread | None = None
        self.planner = None
        self.node = None

    # -- start ---------------------------------------------------------------

    def start(self) -> None:
        """Bring everything up, then READY. Raises on failure (after undoing what started)."""
        try:
            self._start()
        except BaseException:
            self.stop()
            raise

    def _start(self) -> None:
        from storage import open_storage

        s = self.settings
        Path(s.daemon.state_dir).mkdir(parents=True, exist_ok=True, mode=0o700)
        Path(s.daemon.sessions_dir).mkdir(parents=True, exist_ok=True, mode=0o700)
        self.notifier.status("opening storage")
        self.storage = open_storage(s.database.url, clock=self.clock)
        self.metrics = self._make_metrics()
        if self._sim_autostart:  # simulated mode and no server answering: start one (after storage is fine)
            from actors.demo import ensure_sim_server
            self._sim = ensure_sim_server(s)
        plans = discover_accounts(s)
        self._accounts = {p.name: p for p in plans}
        self._paused = {p.name for p in plans if p.paused}
        sup = s.supervisor
        from actors.transfers import TransferPlanner, node_id
        self.node = node_id(s)
        self.planner = TransferPlanner(self.storage, s, self.clock, limit_bytes=self._upload_limit_bytes,
                                       node=self.node)
        specs = [self._account_spec(p) for p in plans]
        if upload_enabled(s):
            self.planner.recover_orphans(older_than=self.started_at)  # crash after a manifest write
            specs += self._upload_specs()
        if ingest_enabled(s):
            specs += self._ingest_specs()
        self.supervisor = SupervisorActor.start(
            specs, on_exit=self._supervisor_gave_up,
            max_restarts=sup.max_restarts, restart_window_seconds=sup.restart_window_seconds,
            backoff_initial_seconds=sup.backoff_initial_seconds,
            backoff_max_seconds=sup.backoff_max_seconds,
            stop_timeout_seconds=sup.stop_timeout_seconds, metrics=self.metrics, clock=self.clock)
        self.notifier.status(f"starting {len(plans)} actors")
        self.supervisor.ask(StartChildren(), timeout=ASK_TIMEOUT * (len(specs) + 1))
        self._start_ticker()
        self._start_admin()
        self._start_metrics()
        self.state = "running"
        log.info("stashd {} running: {} account(s) [{}], admin socket {}", stashd_version(), len(plans),
                 ", ".join(sorted(self._accounts)), s.admin.socket)
        self.notifier.ready(f"running {len(plans)} account(s)")

    def _make_metrics(self):
        try:
            from prometheus_client import CollectorRegistry

            from actors.metrics import Metrics
        except ImportError:
            log.warning("actors.metrics not available: metrics disabled")
            return None
        metrics = Metrics(CollectorRegistry())
        try:
            metrics.build_info.info({"version": stashd_version()})
        except Exception:  # already set by Metrics itself
            pass
        if upload_enabled(self.settings):
            try:
                from actors.budget import budget_metrics
                metrics.add_upload_metrics()
                self._budget_metrics = budget_metrics(metrics.registry)
            except Exception as exc:  # already registered, or an older Metrics
                log.warning("upload metrics not registered: {}", exc)
            if _verify_settings(self.settings).enabled:
                metrics.add_verify_metrics()
        if ingest_enabled(self.settings):
            metrics.add_ingest_metrics()
        return metrics

    def _start_admin(self) -> None:
        from actors.admin.server import AdminServer

        path = Path(self.settings.admin.socket)
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        from actors.admin.protocol import COMMANDS
        self.admin = AdminServer(path, self._dispatch_admin, max_frame_bytes=self.settings.admin.max_frame_bytes,
                                 commands=COMMANDS)
        self.admin.start()

    def _dispatch_admin(self, cmd: str, args: dict) -> Any:
        """dispatch() on an admin connection's thread, then that thread's database connection
        is closed: Pony keeps one per thread, and each admin connection is a new thread, so
        without this every stashctl command left a PostgreSQL connection (or a SQLite file
        handle) open until the daemon stopped ("too many clients already")."""
        try:
            return self.dispatch(cmd, args)
        finally:
            db = getattr(self.storage, "db", None)
            if db is not None:
                try:
                    db.disconnect()
                except Exception as exc:  # inside a db_session (a bug) or already closed
                    log.debug("admin thread: database disconnect failed: {}", exc)

    def _start_metrics(self) -> None:
        m = self.settings.metrics
        if not m.enabled or self.metrics is None:
            return
        from actors.metrics import start_metrics_server

        try:
            self.metrics_server = start_metrics_server(self.metrics, m.host, m.port)
        except OSError as exc:
            if not (self._metrics_port_fallback and m.port):
                raise OSError(exc.errno, f"metrics endpoint {m.host}:{m.port}: {exc.strerror}; "
                              "set [metrics] port (or enabled = false) in the config") from exc
            log.warning("metrics port {} is taken ({}); serving on a free port instead", m.port, exc)
            self.metrics_server = start_metrics_server(self.metrics, m.host, 0)
        log.info("metrics on http://{}:{}/metrics", m.host, getattr(self.metrics_server, "port", m.port))

    def _account_spec(self, plan: AccountPlan) -> ChildSpec:
        def factory() -> pykka.ActorRef:
            kw = {}
            if _takes_listener(self._account_starter):  # events (FloodWaitHit) go to the dispatcher
                kw["listener"] = _Relay(self._refs, DISPATCHER)
            ref = self._account_starter(plan.name, plan.session_path, self.settings, self.storage,
                                        self.metrics, self.clock, **kw)
            self._refs[ACCOUNT_PREFIX + plan.name] = ref
            if plan.name in self._paused:
                _tell_account(ref, "Pause")
            return ref

        # Not critical: one broken session must not keep the others from running.
        return ChildSpec(ACCOUNT_PREFIX + plan.name, factory, critical=False)

    # -- the upload pipeline ----------------------------------------------------------

    def _registered(self, name: str, start: Callable[[], pykka.ActorRef]) -> Callable[[], pykka.ActorRef]:
        def factory() -> pykka.ActorRef:
            ref = start()
            self._refs[name] = ref
            return ref
        return factory

    def _upload_specs(self) -> list[ChildSpec]:
        from actors.budget import BudgetActor
        from actors.budget_core import Quota
        from actors.dispatcher import DispatcherActor
        from actors.uploader import UploaderActor

        s, up = self.settings, self.settings.upload

        def quota(name: str):
            a = s.account(name)
            q = Quota(a.hourly_files or None, a.hourly_bytes or None, a.daily_files or None,
                      a.daily_bytes or None)
            return None if q == Quota() else q

        def budget() -> pykka.ActorRef:
            quotas = {n: q for n in self._accounts if (q := quota(n)) is not None}
            return BudgetActor.start(up.budget_bytes, up.global_slots, up.window, quotas,
                                     metrics=getattr(self, "_budget_metrics", None), clock=self.clock)

        def uploader(name: str) -> Callable[[], pykka.ActorRef]:
            return lambda: UploaderActor.start(
                self.storage, self._account_for_upload, budget=_Relay(self._refs, BUDGET),
                window=up.window, name=name, metrics=self.metrics,
                request_timeout=s.telegram.request_timeout_seconds * 2,
                first_check_delay=_verify_settings(s).first_check_delay_seconds)

        def dispatcher() -> pykka.ActorRef:
            return DispatcherActor.start(
                self.storage, accounts=self._account_refs, uploaders=self._uploader_refs,
                budget=_Relay(self._refs, BUDGET), node=self.node, metrics=self.metrics,
                clock=self.clock, handover_after=up.handover_after_seconds)

        specs = [ChildSpec(BUDGET, self._registered(BUDGET, budget), critical=True)]
        for i in range(1, up.uploaders + 1):
            name = f"{UPLOADER_PREFIX}{i}"
            specs.append(ChildSpec(name, self._registered(name, uploader(name)), critical=False))
        specs.append(ChildSpec(DISPATCHER, self._registered(DISPATCHER, dispatcher), critical=True))
        if up.inbox_dir is not None:
            from actors.inbox import InboxActor, InboxScanner
            scanner = InboxScanner(self.planner, self.storage, up.inbox_dir)
            specs.append(ChildSpec(INBOX, self._registered(INBOX, lambda: InboxActor.start(scanner)),
                                   critical=False))
        if _verify_settings(s).enabled:
            specs.append(self._verifier_spec())
        return specs

    def _verifier_spec(self) -> ChildSpec:
        """The VerifierActor (issue 4): checks, re-uploads and cleans up uploaded transfers."""
        from actors.verifier import VerifierActor

        from actors.ingest.refetch import requeue_lost

        # a lost package that came from ingest is fetched again from its source
        on_lost = requeue_lost(self.storage, wake=self._wake_ingest, metrics=self.metrics)

        def verifier() -> pykka.ActorRef:
            return VerifierActor.start(
                self.storage, _verify_settings(self.settings), accounts=self._account_refs,
                node=self.node, metrics=self.metrics, clock=self.clock,
                request_timeout=self.settings.telegram.request_timeout_seconds, on_lost=on_lost)

        # Not critical: uploads go on while a crashing verifier is restarted with backoff.
        return ChildSpec(VERIFIER, self._registered(VERIFIER, verifier), critical=False)

    def _wake_ingest(self, channel_ids: list[int]) -> None:
        """Scan these source channels now (a requeued lost package is claimed by the scan)."""
        from actors.ingest.actor import ScanNow

        ref = self._refs.get(INGEST)
        if ref is None or not ref.is_alive():
            return  # no ingest here (yet): the set waits, "ready", for the next scan
        for channel_id in channel_ids:
            ref.tell(ScanNow(str(channel_id)))

    def _account_for_upload(self, name: str) -> pykka.ActorRef:
        ref = self._refs.get(ACCOUNT_PREFIX + name) if name in self._accounts else None
        if ref is None or not ref.is_alive():
            raise LookupError(f"account {name} is not running")
        return ref

    def _account_refs(self) -> dict[str, pykka.ActorRef | None]:
        return {name: self._refs.get(ACCOUNT_PREFIX + name) for name in list(self._accounts)}

    def _uploader_refs(self) -> dict[str, pykka.ActorRef | None]:
        return {name: ref for name, ref in list(self._refs.items()) if name.startswith(UPLOADER_PREFIX)}

    def _start_ticker(self) -> None:
        if not upload_enabled(self.settings) or not self._tick_seconds:
            return
        from actors import budget_messages, dispatcher, inbox

        ticks = ((BUDGET, budget_messages.Tick()), (DISPATCHER, dispatcher.Tick()), (INBOX, inbox.Tick()))

        def loop() -> None:
            while not self._ticker_stop.wait(self._tick_seconds):
                self.tick(ticks)

        self._ticker = threading.Thread(target=loop, name="daemon-tick", daemon=True)
        self._ticker.start()

    def tick(self, ticks=None) -> None:
        """Tell the budget, the dispatcher and the inbox to do their time-driven work."""
        if ticks is None:
            from actors import budget_messages, dispatcher, inbox
            ticks = ((BUDGET, budget_messages.Tick()), (DISPATCHER, dispatcher.Tick()),
                     (INBOX, inbox.Tick()))
        for name, message in ticks:
            ref = self._refs.get(name)
            if ref is not None:
                try:
                    ref.tell(message)
                except pykka.ActorDeadError:
                    pass
        verifier = self._refs.get(VERIFIER)
        if verifier is not None:  # idle passes coalesce inside the verifier
            from actors.verifier_messages import Tick as VerifierTick
            try:
                verifier.tell(VerifierTick())
            except pykka.ActorDeadError:
                pass
        ingest = self._refs.get(INGEST)
        if ingest is not None:
            from actors.ingest.actor import Tick as IngestTick
            try:
                ingest.tell(IngestTick())
            except pykka.ActorDeadError:
                pass

    # -- signals / requests ------------------------------------------------------

    def install_signal_handlers(self) -> None:
        """Only from the main thread. Handlers set a flag and wake :meth:`run`."""
        handlers = {signal.SIGTERM: self.request_stop, signal.SIGINT: self.request_stop,
                    signal.SIGHUP: self.request_reload, signal.SIGUSR1: self.request_dump}
        for signum, fn in handlers.items():
            self._old_handlers[signum] = signal.signal(signum, lambda _s, _f, fn=fn: fn())

    def restore_signal_handlers(self) -> None:
        for signum, old in self._old_handlers.items():
            signal.signal(signum, old if old is not None else signal.SIG_DFL)
        self._old_handlers.clear()

    def request_stop(self) -> None:
        self._stop_requested = True
        self._waker.wake()

    def request_reload(self) -> None:
        self._reload_requested = True
        self._waker.wake()

    def request_dump(self) -> None:
        self._dump_requested = True
        self._waker.wake()

    def _supervisor_gave_up(self, code: int) -> None:
        self.exit_code = code
        self._waker.wake()

    # -- main loop -----------------------------------------------------------------

    def run(self) -> int:
        """Serve until asked to stop; returns the process exit code. Main thread only."""
        interval = self.notifier.watchdog_interval if self.settings.supervisor.watchdog else None
        next_ping = time.monotonic()
        try:
            while True:
                timeout = None if interval is None else max(0.0, next_ping - time.monotonic())
                self._waker.wait(timeout)
                if self._dump_requested:
                    self._dump_requested = False
                    log.warning("SIGUSR1: thread dump\n{}", thread_dump())
                if self.exit_code is not None or self._stop_requested:
                    break
                if self._reload_requested:
                    self._reload_requested = False
                    self.reload()
                if interval is not None and time.monotonic() >= next_ping:
                    next_ping = time.monotonic() + interval
                    if self.healthy():
                        self.notifier.watchdog()
                    else:
                        log.warning("actors unhealthy: skipping the watchdog ping")
        finally:
            self.stop()
        return self.exit_code or 0

    def healthy(self) -> bool:
        if self.supervisor is None or not self.supervisor.is_alive():
            return False
        try:
            return self.supervisor.ask(GetStatus(), timeout=ASK_TIMEOUT).healthy
        except Exception:
            return False

    # -- stop --------------------------------------------------------------------------

    def stop(self) -> None:
        """Stop in reverse order: admin socket, actors, metrics, storage. Idempotent."""
        if self._stopped:
            return
        self._stopped = True
        self.state = "stopping"
        self.notifier.stopping("stopping")
        log.info("stopping")
        if self.admin is not None:
            _quietly(self.admin.stop, "admin socket")
        self._ticker_stop.set()
        if self._ticker is not None:
            self._ticker.join(5)
        if self.supervisor is not None and self.supervisor.is_alive():
            timeout = self.settings.supervisor.stop_timeout_seconds * (len(self._accounts) + 1) + 5
            _quietly(lambda: self.supervisor.ask(StopChildren("shutdown"), timeout=timeout), "actors")
            _quietly(lambda: self.supervisor.stop(timeout=10), "supervisor")
        if self.metrics_server is not None:
            _quietly(self.metrics_server.stop, "metrics endpoint")
        if self.storage is not None:
            _quietly(self.storage.close, "storage")
        if self._sim is not None:
            _quietly(self._sim.stop, "simulated Telegram server")
        self._waker.close()
        self.state = "stopped"
        log.info("stopped")

    # -- reload (SIGHUP) -----------------------------------------------------------------

    def reload(self) -> list[str]:
        """Re-read config and sessions dir; apply what can change live; return the changes."""
        self.notifier.reloading()
        changes: list[str] = []
        try:
            new = self.settings
            if self.config_path is not None:
                loader = self._config_loader or _load_config
                try:
                    new = loader(self.config_path)
                except Exception as exc:
                    errors = getattr(exc, "errors", None) or [str(exc)]
                    log.error("reload: config has errors, keeping the running config:\n  {}",
                              "\n  ".join(errors))
                    return changes
            old = self.settings
            if (old.daemon.log_level, old.daemon.log_file, old.daemon.log_json) != \
                    (new.daemon.log_level, new.daemon.log_file, new.daemon.log_json):
                if self._on_reload_logging is not None:
                    self._on_reload_logging(new)
                changes.append(f"logging: level {old.daemon.log_level} -> {new.daemon.log_level}")
            for section in ("database", "telegram", "admin", "metrics", "supervisor"):
                if getattr(old, section) != getattr(new, section):
                    changes.append(f"[{section}] changed: takes effect after a restart")
            self.settings = dataclasses.replace(old, daemon=new.daemon, accounts=new.accounts) \
                if dataclasses.is_dataclass(old) else new
            changes += self._reconcile_accounts()
            changes += self._reload_ingest(old, new)
            for line in changes:
                log.info("reload: {}", line)
            if not changes:
                log.info("reload: nothing changed")
            return changes
        finally:
            self.notifier.ready("reloaded")

    def _reload_ingest(self, old, new) -> list[str]:
        """``[ingest]`` changes: the running IngestActor gets the new mappings and
        schedule; starting ingest where it did not run needs a restart."""
        old_ing, new_ing = getattr(old, "ingest", None), getattr(new, "ingest", None)
        if old_ing is None or new_ing is None or old_ing == new_ing:
            return []
        ref = self._refs.get(INGEST)
        if ref is None or not ref.is_alive():
            if ingest_enabled(new):
                return ["[ingest] changed: ingest starts after a restart (it is not running now)"]
            return []
        from actors.ingest.actor import UpdateIngestSettings

        live = new_ing if ingest_enabled(new) else dataclasses.replace(new_ing, mappings=())
        if dataclasses.is_dataclass(self.settings):
            self.settings = dataclasses.replace(self.settings, ingest=live)
        try:
            result = ref.ask(UpdateIngestSettings(live), timeout=ASK_TIMEOUT)
        except Exception as exc:
            return [f"[ingest] changed, but the ingest actor did not take it: {exc}"]
        changes = [f"ingest mapping {label} added" for label in result.added]
        changes += [f"ingest mapping {label} removed" for label in result.removed]
        changes += [f"ingest.{key} changed: takes effect after a restart" for key in result.restart_needed]
        return changes or ["[ingest] settings changed"]

    def _reconcile_accounts(self) -> list[str]:
        changes = []
        wanted = {p.name: p for p in discover_accounts(self.settings)}
        for name in sorted(set(self._accounts) - set(wanted)):
            self.supervisor.ask(RemoveChild(ACCOUNT_PREFIX + name), timeout=ASK_TIMEOUT * 3)
            del self._accounts[name]
            self._paused.discard(name)
            changes.append(f"account {name} removed")
        for name in sorted(set(wanted) - set(self._accounts)):
            plan = wanted[name]
            self._accounts[name] = plan
            if plan.paused:
                self._paused.add(name)
            self.supervisor.ask(AddChild(self._account_spec(plan)), timeout=ASK_TIMEOUT * 3)
            changes.append(f"account {name} added" + (" (paused)" if plan.paused else ""))
        for name in sorted(set(wanted) & set(self._accounts)):
            was, now = self._accounts[name].paused, wanted[name].paused
            self._accounts[name] = wanted[name]
            if was != now:
                self._set_paused(name, now)
                changes.append(f"account {name} {'paused' if now else 'resumed'} by config")
        return changes

    # -- accounts --------------------------------------------------------------------------

    def account_ref(self, name: str) -> pykka.ActorRef | None:
        if self.supervisor is None or name not in self._accounts:
            return None
        return self.supervisor.ask(GetChild(ACCOUNT_PREFIX + name), timeout=ASK_TIMEOUT)

    def account_names(self) -> list[str]:
        return sorted(self._accounts)

    def account_info(self, name: str, timeout: float = ASK_TIMEOUT) -> dict:
        """One account as the admin protocol shows it (live actor reply, else storage)."""
        info: dict[str, Any] = {"name": name, "user_id": None, "phone": None, "premium": None,
                                "upload_limit_bytes": None, "state": "stopped",
                                "cooldown_until": None, "flood_waits": {}}
        record = None
        if self.storage is not None:
            try:
                record = self.storage.get_account(name)
            except Exception as exc:
                log.warning("storage lookup of {} failed: {}", name, exc)
        if record is not None:
            info.update(user_id=record.user_id, phone=record.phone_redacted, premium=record.premium,
                        upload_limit_bytes=record.upload_limit_bytes, state=record.state,
                        cooldown_until=record.cooldown_until)
        ref = self.account_ref(name)
        if ref is None:
            info["state"] = "restarting" if name in self._accounts else "stopped"
            return info
        try:
            from actors.account_messages import GetAccountInfo
            live = ref.ask(GetAccountInfo(), timeout=timeout)
        except Exception as exc:
            info["error"] = f"{type(exc).__name__}: {exc}"
            return info
        for key in ("user_id", "premium", "upload_limit_bytes", "state"):
            value = getattr(live, key, None)
            if value is not None:
                info[key] = value
        if getattr(live, "phone_redacted", None):
            info["phone"] = live.phone_redacted
        if getattr(live, "flood_waits", None):
            info["flood_waits"] = dict(live.flood_waits)
        if getattr(live, "error", None):
            info["error"] = live.error
        return info

    def _set_paused(self, name: str, paused: bool) -> None:
        (self._paused.add if paused else self._paused.discard)(name)
        ref = self.account_ref(name)
        if ref is not None:
            _ask_account(ref, "Pause" if paused else "Resume")

    # -- admin commands ------------------------------------------------------------------------

    def dispatch(self, cmd: str, args: dict) -> Any:
        """Admin socket commands (called on the admin connection's thread)."""
        from actors.admin.server import AdminCommandError

        args = args or {}
        if cmd == "status":
            return self.status()
        if cmd == "accounts":
            return [self.account_info(n) for n in self.account_names()]
        if cmd in ("pause", "resume"):
            name = args.get("account") or args.get("name")
            if not isinstance(name, str) or name not in self._accounts:
                raise AdminCommandError(f"unknown account {name!r}; known: {', '.join(self.account_names())}")
            try:
                self._set_paused(name, cmd == "pause")
            except Exception as exc:
                raise AdminCommandError(f"{cmd} {name} failed: {exc}") from exc
            return self.account_info(name)
        if cmd == "shutdown":
            log.info("shutdown requested over the admin socket")
            self.request_stop()
            return {"stopping": True}
        if cmd in ("upload", "transfers", "transfer", "budget", "verify", "retry"):
            return getattr(self, f"_cmd_{cmd}")(args)
        if cmd in ("scan", "runs"):
            return getattr(self, f"_cmd_{cmd}")(args)
        raise AdminCommandError(f"unknown command {cmd!r}")

    # -- upload commands -------------------------------------------------------------

    def transfer_view(self, t, *, with_parts: bool = False) -> dict:
        from actors.transfers import part_dict, transfer_dict

        parts = self.storage.list_parts(t.id)

        def journaled(index: int) -> int:
            if not t.account:
                return 0
            return len(self.storage.journaled_chunks(t.id, index, account=t.account))

        view = transfer_dict(t, parts, journaled if t.state == "uploading" else None)
        if with_parts:
            view["parts"] = [part_dict(p) for p in parts]
            _add_verification(view, t, parts)
        return view

    def _cmd_upload(self, args: dict) -> dict:
        from actors.admin.server import AdminCommandError
        from actors.transfers import PathRefusedError

        paths = args.get("paths")
        if isinstance(paths, str):
            paths = [paths]
        if not isinstance(paths, (list, tuple)) or not paths or not all(isinstance(p, str) for p in paths):
            raise AdminCommandError("upload: paths must be a non-empty list of strings", code="bad_request")
        try:
            records = self.planner.plan(paths, dest=args.get("dest"), caption=args.get("caption"),
                                        delete_original=args.get("delete_original"))
        except PathRefusedError as exc:
            raise AdminCommandError(str(exc), code="path_refused") from exc
        except ValueError as exc:
            raise AdminCommandError(f"upload: {exc}", code="bad_request") from exc
        self.tick()  # start at once instead of on the next tick
        return {"transfers": [self.transfer_view(t) for t in records]}

    def _cmd_transfers(self, args: dict) -> dict:
        from actors.admin.server import AdminCommandError

        state, limit = args.get("state"), args.get("limit")
        if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 1):
            raise AdminCommandError("transfers: limit must be a positive integer", code="bad_request")
        try:
            records = self.storage.list_transfers(state, limit=limit or 100)
        except ValueError as exc:
            raise AdminCommandError(f"transfers: {exc}", code="bad_request") from exc
        return {"transfers": [self.transfer_view(t) for t in records]}

    def _cmd_transfer(self, args: dict) -> dict:
        from actors.admin.server import AdminCommandError

        tid = args.get("id")
        t = self.storage.get_transfer(tid) if isinstance(tid, str) and tid else None
        if t is None:
            raise AdminCommandError(f"no transfer {tid!r}", code="not_found")
        return self.transfer_view(t, with_parts=True)

    # -- verification commands (issue 4) -------------------------------------------------

    def _transfer_arg(self, cmd: str, args: dict, *, required: bool):
        from actors.admin.server import AdminCommandError

        tid = args.get("id")
        if tid is None and not required:
            return None
        if not isinstance(tid, str) or not tid:
            raise AdminCommandError(f"{cmd}: id must be a transfer id", code="bad_request")
        t = self.storage.get_transfer(tid)
        if t is None:
            raise AdminCommandError(f"no transfer {tid!r}", code="not_found")
        return t

    def _cmd_verify(self, args: dict) -> dict:
        """Check now: one transfer (asked, the outcome returned), every due one (no id), or
        every checkable one (``all``); the last two only wake the verifier."""
        from actors import verifier_messages as vm
        from actors.admin.server import AdminCommandError

        t = self._transfer_arg("verify", args, required=False)
        ref = self._refs.get(VERIFIER)
        if ref is None or not ref.is_alive():
            raise AdminCommandError("the verifier is not running (no upload pipeline configured, "
                                    "[verify] enabled = false, or it is restarting)", code="not_running")
        now = self.clock()
        if t is not None:
            if t.state not in VERIFY_STATES:
                hint = " (stashctl retry puts a failed one back)" if t.state == "failed" else ""
                raise AdminCommandError(
                    f"verify: transfer {t.id} is {t.state}; only {', '.join(VERIFY_STATES)} transfers "
                    f"are checked{hint}", code="bad_state")
            try:
                result = ref.ask(vm.VerifyNow(t.id), timeout=VERIFY_ASK_TIMEOUT)
            except pykka.Timeout as exc:
                raise AdminCommandError(f"verify: no answer from the verifier within "
                                        f"{VERIFY_ASK_TIMEOUT:g}s", code="timeout") from exc
            after = self.storage.get_transfer(t.id) or t
            return {"scheduled": result.scheduled, "requested_at": now,
                    "outcomes": [o.to_dict() for o in result.outcomes],
                    "transfer": self.transfer_view(after, with_parts=True)}
        if args.get("all"):  # due now, then the verifier runs its passes
            scheduled = self.storage.schedule_check(None, at=now, states=VERIFY_STATES)
        else:
            scheduled = self.storage.count_due_checks(VERIFY_STATES)
        records = [r for state in VERIFY_STATES
                   for r in self.storage.list_transfers(state, limit=VERIFY_ALL_LIMIT)
                   if r.next_check_at is not None and r.next_check_at <= now]
        records.sort(key=lambda r: (r.next_check_at or 0.0, r.created_at))
        try:  # VerifyNow runs passes at once; a Tick waits for the verifier's next idle pass
            ref.tell(vm.VerifyNow(None) if args.get("all") else vm.Tick())
        except pykka.ActorDeadError as exc:
            raise AdminCommandError("the verifier is restarting; try again", code="not_running") from exc
        shown = []
        for r in records[:VERIFY_SHOWN]:
            parts = self.storage.list_parts(r.id)
            shown.append({"id": r.id, "state": r.state, "source_path": r.source_path,
                          "last_check_at": r.last_check_at, "next_check_at": r.next_check_at,
                          "misses": sum(p.misses for p in parts)})
        return {"scheduled": scheduled, "all": bool(args.get("all")), "requested_at": now,
                "transfers": shown}

    def _tell_verifier(self, transfer_id: str | None = None) -> None:
        """Wake the verifier: check ``transfer_id`` at once, or a Tick (its next idle pass)."""
        ref = self._refs.get(VERIFIER)
        if ref is None:
            return
        try:
            from actors import verifier_messages
            ref.tell(verifier_messages.VerifyNow(transfer_id) if transfer_id else verifier_messages.Tick())
        except (ImportError, AttributeError, pykka.ActorDeadError) as exc:
            log.warning("could not wake the verifier: {}", exc)

    def _cmd_retry(self, args: dict) -> dict:
        """failed -> back into the pipeline (storage decides where: upload or check)."""
        from actors.admin.server import AdminCommandError
        from storage.transfers import TransferStateError

        t = self._transfer_arg("retry", args, required=True)
        if t.state != "failed":
            raise AdminCommandError(
                f"retry: transfer {t.id} is {t.state}, not failed; only a failed transfer can be "
                f"retried", code="bad_state")
        refetch = self._retry_refetch(t)
        if refetch is not None:
            return refetch
        problem = self._retry_source_problem(t)
        if problem is not None:
            raise AdminCommandError(f"retry: transfer {t.id} cannot be retried: {problem}; the "
                                    f"transfer is left as it is", code="nothing_to_upload")
        try:
            record = self.storage.retry_transfer(t.id)
        except TransferStateError as exc:
            raise AdminCommandError(f"retry: {exc}", code="bad_state") from exc
        log.info("transfer {} retried by the operator: failed -> {} (it had failed: {})",
                 t.id, record.state, t.reason)
        self.tick()
        self._tell_verifier(record.id if record.state in VERIFY_STATES else None)
        return {"transfer": self.transfer_view(record, with_parts=True), "previous_reason": t.reason}

    def _retry_source_problem(self, t) -> str | None:
        """Why a retry of failed ``t`` would upload from nothing (storage ``retry_transfer``
        decides what it does; this asks the same questions without writing), or None: it
        follows a live copy, only checks again, or has a manifest / original to upload from
        (actors.manifest_restore ``nothing_to_upload_from``)."""
        from actors.manifest_restore import lost_parts, nothing_to_upload_from

        dropped = None
        if t.duplicate_of is not None:
            ref = self.storage.get_transfer(t.duplicate_of)
            if ref is None or ref.state != "failed":
                return None  # follows the copy it references
            package = self.storage.find_package(t.sha256)
            if package is not None:
                return None  # follows the copy that holds the content now
            dropped = t.duplicate_of
        parts = self.storage.list_parts(t.id)
        sent = bool(parts) and all(p.message_id is not None for p in parts)
        if sent and dropped is None and not lost_parts(parts):
            return None  # every part is sent and was seen: only checked again
        why = nothing_to_upload_from(t, parts)
        if why is None:
            return None
        if dropped is not None:
            return (f"it was completed by reference to transfer {dropped}, which is lost, and no "
                    f"other copy holds its content, so it would be uploaded itself, but nothing "
                    f"is left to upload it from: {why}: the content is lost")
        return f"nothing is left to upload it from: {why}: the content is lost"

    def _retry_refetch(self, t) -> dict | None:
        """A transfer lost after cleanup whose re-fetch from its source failed (source gone, no
        mapping, ...): its archive set(s) go back to "ready" and the scan of their channel is
        woken; the transfer stays failed until the re-fetch moves it on. None: not such a one."""
        from actors.ingest.refetch import LOST_PREFIX, marked_reason

        if not (t.reason or "").startswith(LOST_PREFIX):
            return None
        keys = self.storage.requeue_lost_package(
            t.id, reason=f"fetching again: stashctl retry of lost transfer {t.id}", states=("failed",))
        if not keys:
            return None
        record = self.storage.set_transfer_state(
            t.id, "failed", expected="failed",
            reason=marked_reason(t, "fetching again from the source channel (stashctl retry)"))
        sets = [self.storage.get_archive_set(k) for k in keys]
        channels = sorted({s.channel_id for s in sets if s is not None})
        log.info("transfer {} retried by the operator: set(s) {} queued to be fetched again from "
                 "channel(s) {} (it had failed: {})", t.id, keys, channels, t.reason)
        self._wake_ingest(channels)
        return {"transfer": self.transfer_view(record, with_parts=True), "previous_reason": t.reason,
                "refetch": {"sets": keys, "channels": channels}}

    def _cmd_budget(self, args: dict) -> dict:
        from actors.admin.server import AdminCommandError
        from actors.budget_messages import GetBudgetSnapshot

        ref = self._refs.get(BUDGET)
        if ref is None or not ref.is_alive():
            raise AdminCommandError("the budget is not running (no upload.roots configured?)",
                                    code="not_running")
        return ref.ask(GetBudgetSnapshot(), timeout=ASK_TIMEOUT).to_dict()

    def status(self) -> dict:
        actors = []
        sup_status = None
        if self.supervisor is not None and self.supervisor.is_alive():
            try:
                sup_status = self.supervisor.ask(GetStatus(), timeout=ASK_TIMEOUT)
            except Exception:
                sup_status = None
        if sup_status is not None:
            actors = [{"name": c.name, "alive": c.alive, "state": c.state, "restarts": c.restarts,
                       "inbox": c.inbox} for c in sup_status.children]
        state = self.state
        if state == "running" and sup_status is not None and not sup_status.healthy:
            state = "degraded"
        return {"version": stashd_version(), "pid": os.getpid(),
                "uptime_seconds": round(time.time() - self.started_at, 3), "state": state,
                "accounts": [self.account_info(n) for n in self.account_names()],
                "actors": actors, "transfers": self._transfers_by_state(),
                **({"ingest": self._ingest_status()} if ingest_enabled(self.settings) else {}),
                **({"verifier": self._verifier_status()} if VERIFIER in self._refs else {})}

    def _verifier_status(self) -> dict:
        """The verifier's reply to GetVerifierStatus (passes, due, lag, checks, re-uploads...)."""
        from actors.verifier_messages import GetVerifierStatus

        ref = self._refs.get(VERIFIER)
        if ref is None or not ref.is_alive():
            return {"running": False}
        try:
            return {"running": True, **ref.ask(GetVerifierStatus(), timeout=ASK_TIMEOUT).to_dict()}
        except Exception as exc:  # busy in a long pass, or restarting
            return {"running": True, "error": f"{type(exc).__name__}: {exc}"}

    # -- ingest -------------------------------------------------------------------------

    def _ingest_specs(self) -> list[ChildSpec]:
        from actors.ingest.actor import IngestActor

        def limit_for() -> int:
            """The largest upload limit among this node's ready accounts (Premium: larger),
            so a set is split only when no account here can take it whole."""
            if self._upload_limit_bytes is not None:
                return self._upload_limit_bytes
            limits = [a.upload_limit_bytes for a in self.storage.list_accounts()
                      if a.name in self._accounts and a.state in ("ready", "cooling_down")
                      and a.upload_limit_bytes]
            return max(limits) if limits else self.planner.default_limit()

        def start() -> pykka.ActorRef:
            return IngestActor.start(
                self.storage, self.settings, self._account_for_ingest, planner=self.planner,
                node=self.node, budget=_Relay(self._refs, BUDGET), metrics=self.metrics,
                clock=self.clock, limit_for=limit_for,
                request_timeout=self.settings.telegram.request_timeout_seconds * 2)

        return [ChildSpec(INGEST, self._registered(INGEST, start), critical=False)]

    def _account_for_ingest(self, name: str) -> pykka.ActorRef | None:
        ref = self._refs.get(ACCOUNT_PREFIX + name) if name in self._accounts else None
        return ref if ref is not None and ref.is_alive() else None

    def _ingest_ref(self):
        from actors.admin.server import AdminCommandError

        ref = self._refs.get(INGEST)
        if ref is None or not ref.is_alive():
            raise AdminCommandError("ingest is not running (no [[ingest.mappings]] configured, "
                                    "or ingest.enabled = false)", code="not_running")
        return ref

    def _cmd_scan(self, args: dict) -> dict:
        from actors.admin.server import AdminCommandError
        from actors.ingest.actor import ScanNow

        channel = args.get("channel")
        if channel is not None and (not isinstance(channel, (str, int)) or isinstance(channel, bool)):
            raise AdminCommandError("scan: channel must be a username or an id", code="bad_request")
        result = self._ingest_ref().ask(ScanNow(None if channel is None else str(channel)),
                                        timeout=ASK_TIMEOUT)
        if channel is not None and not result.mappings:
            known = sorted({m.channel for m in self.settings.ingest.mappings})
            raise AdminCommandError(f"scan: no mapping reads {channel!r}; mapped: {', '.join(known)}",
                                    code="not_found")
        return {"started": list(result.mappings)}

    def _cmd_runs(self, args: dict) -> dict:
        from actors.admin.server import AdminCommandError

        state, limit = args.get("state"), args.get("limit")
        if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 1):
            raise AdminCommandError("runs: limit must be a positive integer", code="bad_request")
        try:
            runs = self.storage.list_runs(state, limit=limit or 20)
        except ValueError as exc:
            raise AdminCommandError(f"runs: {exc}", code="bad_request") from exc
        return {"runs": [_run_view(r) for r in runs]}

    def _ingest_status(self) -> dict:
        from actors.ingest.actor import GetIngestStatus

        view: dict[str, Any] = {}
        try:
            view["sets"] = self.storage.archive_sets_by_state()
            view["skipped"] = self.storage.skips_by_reason()
            view["index"] = self.storage.index_states()
            view["runs"] = [_run_view(r) for r in self.storage.list_runs("running", limit=20)]
            view["retrying"] = [  # sets that failed and wait for their next try (backoff)
                {"set": s.base_name, "set_key": s.set_key, "attempts": s.attempts,
                 "next_attempt_at": s.next_attempt_at, "last_error": s.last_error}
                for state in ("ready", "downloading")
                for s in self.storage.list_archive_sets(state, limit=500) if s.attempts]
        except Exception as exc:
            log.warning("ingest counts failed: {}", exc)
        ref = self._refs.get(INGEST)
        if ref is not None and ref.is_alive():
            try:
                view.update(ref.ask(GetIngestStatus(), timeout=ASK_TIMEOUT).to_dict())
            except Exception as exc:
                view["error"] = f"{type(exc).__name__}: {exc}"
        return view

    def _transfers_by_state(self) -> dict:
        try:
            return self.storage.transfers_by_state() if self.storage is not None else {}
        except Exception as exc:
            log.warning("counting transfers failed: {}", exc)
            return {}


def _add_verification(view: dict, t, parts) -> None:
    """What the transfer view shows of verification: checks, lease, attempts, misses per part."""
    view.update(attempts=t.attempts, last_check_at=t.last_check_at, next_check_at=t.next_check_at,
                lease_owner=t.lease_owner, lease_until=t.lease_until, cleaned=t.state == "cleaned",
                misses=sum(p.misses for p in parts))
    for shown, p in zip(view["parts"], parts):
        shown.update(verified_at=p.verified_at, misses=p.misses, document_id=p.document_id)


def _run_view(r) -> dict:
    """An ingest run as the admin protocol shows it."""
    return {"id": r.id, "mapping": r.mapping, "account": r.account, "channel_id": r.channel_id,
            "topic_id": r.topic_id, "state": r.state, "started_at": r.started_at,
            "finished_at": r.finished_at, "seen": r.seen, "ingested": r.ingested, "skipped": r.skipped,
            "skipped_by_reason": dict(r.skipped_by_reason), "bytes_downloaded": r.bytes_downloaded,
            "progress": r.progress, "error": r.error}


def _verify_settings(settings):
    """``[verify]`` (defaults when the settings object predates it)."""
    verify = getattr(settings, "verify", None)
    if verify is None:
        from config.schema import VerifySettings
        verify = VerifySettings()
    return verify


def _load_config(path: Path):
    from config import load_config
    return load_config(path)


def _message(name: str):
    import actors.account_messages as m
    return getattr(m, name)()


def _tell_account(ref: pykka.ActorRef, name: str) -> None:
    try:
        ref.tell(_message(name))
    except Exception as exc:
        log.warning("could not send {} to {}: {}", name, ref, exc)


def _ask_account(ref: pykka.ActorRef, name: str) -> Any:
    return ref.ask(_message(name), timeout=ASK_TIMEOUT)


def _quietly(fn: Callable[[], Any], what: str) -> None:
    try:
        fn()
    except Exception as exc:
        log.warning("stopping {} failed: {!r}", what, exc)
