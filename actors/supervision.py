"""Supervision for pykka actors: restart with backoff, OTP restart intensity.

pykka has no supervisor trees and an actor cannot be restarted, only replaced.
:class:`SupervisorActor` owns a list of :class:`ChildSpec`; it starts the
children in order (joining each with a ping ask), notices a child that died
(an :class:`ActorDied` event told by :class:`SupervisedMixin`, or the fallback
``is_alive()`` poll on every :class:`Tick`), replaces it with a new actor from
the spec's factory after :func:`compute_backoff`, and when the restarts exceed
:class:`RestartIntensity` it stops every child in reverse order and calls
``on_exit(1)`` so the process exits non-zero (and systemd restarts it).

The logic that needs no thread (backoff, intensity) is plain and tested with a
fake clock.
"""
from __future__ import annotations

import contextlib
import contextvars
import random
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

import pykka
from loguru import logger
from pykka.messages import ProxyGetAttr

Clock = Callable[[], float]

EXIT_INTENSITY = 1


# --------------------------------------------------------------------------- logic


def compute_backoff(attempt: int, initial: float, maximum: float, *, jitter: bool = False,
                    rng: random.Random | None = None) -> float:
    """Delay before restart number ``attempt`` (0-based): initial * 2**attempt, capped.

    With ``jitter`` the delay is drawn uniformly from [delay/2, delay] ("equal
    jitter"), so restarts of many children do not line up.
    """
    if attempt < 0:
        raise ValueError("attempt must be >= 0")
    if initial < 0 or maximum < 0:
        raise ValueError("initial and maximum must be >= 0")
    delay = min(maximum, initial * (2 ** min(attempt, 64)))
    if jitter and delay > 0:
        delay = (rng or random).uniform(delay / 2, delay)
    return delay


class RestartIntensity:
    """OTP restart intensity: at most ``max_restarts`` within ``window_seconds``.

    :meth:`record` notes one restart and returns False when that restart would
    exceed the intensity (the supervisor then gives up).
    """

    def __init__(self, max_restarts: int, window_seconds: float, clock: Clock = time.time):
        if max_restarts < 0 or window_seconds <= 0:
            raise ValueError("max_restarts must be >= 0 and window_seconds > 0")
        self.max_restarts = max_restarts
        self.window_seconds = window_seconds
        self._clock = clock
        self._times: deque[float] = deque()

    def _expire(self, now: float) -> None:
        while self._times and now - self._times[0] >= self.window_seconds:
            self._times.popleft()

    def record(self) -> bool:
        now = self._clock()
        self._expire(now)
        self._times.append(now)
        return len(self._times) <= self.max_restarts

    @property
    def recent(self) -> int:
        self._expire(self._clock())
        return len(self._times)


# ------------------------------------------------------------------------ messages


@dataclass(frozen=True)
class ChildSpec:
    """How to (re)create one supervised actor. ``factory`` returns a started ActorRef.

    ``critical``: a critical child that cannot be started aborts start-up and
    makes the supervisor unhealthy (no watchdog pings) while it is down; a
    non-critical child is retried with backoff. Every restart of any child
    counts towards the restart intensity.
    """

    name: str
    factory: Callable[[], pykka.ActorRef]
    critical: bool = True


@dataclass(frozen=True)
class ActorDied:
    """Event: the child ``name`` (actor ``urn``) stopped without being asked to."""

    name: str
    reason: str
    urn: str | None = None

    def __str__(self) -> str:
        return f"ActorDied({self.name}: {self.reason})"


@dataclass(frozen=True)
class Tick:
    """Time-driven work: poll liveness, refresh gauges."""


@dataclass(frozen=True)
class RestartChild:
    name: str
    generation: int


@dataclass(frozen=True)
class StartChildren:
    """Ask: start every child in order; raises StartupError if a critical one fails."""


@dataclass(frozen=True)
class StopChildren:
    """Ask: stop every child in reverse order (shutdown)."""

    reason: str = "shutdown"


@dataclass(frozen=True)
class AddChild:
    """Ask: start one more child at the end (e.g. a new session on SIGHUP)."""

    spec: ChildSpec


@dataclass(frozen=True)
class RemoveChild:
    """Ask: stop and forget a child."""

    name: str


@dataclass(frozen=True)
class GetChild:
    """Ask: the current ActorRef of a child (None while it is down)."""

    name: str


@dataclass(frozen=True)
class GetStatus:
    """Ask: a SupervisorStatus."""


@dataclass(frozen=True)
class ChildStatus:
    name: str
    alive: bool
    critical: bool
    restarts: int
    state: str  # "running" | "restarting" | "stopped"
    inbox: int


@dataclass(frozen=True)
class SupervisorStatus:
    healthy: bool
    stopping: bool
    children: tuple[ChildStatus, ...]
    restarts_in_window: int


class StartupError(RuntimeError):
    """A critical child could not be started."""


# --------------------------------------------------------------- child-side mixin

_LISTENER: contextvars.ContextVar[Callable[[ActorDied], None] | None] = contextvars.ContextVar(
    "stashd_supervision_listener", default=None)
_CHILD_NAME: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "stashd_supervision_child", default=None)


class SupervisedMixin:
    """Mix into any pykka actor class (first in the bases) to report its death at once.

    The supervisor calls a child's factory inside a context naming the child and
    its listener; the actor captures both when it is constructed (in the
    caller's thread) and, from ``on_failure``, tells the supervisor
    :class:`ActorDied`. Without the mixin a death is still noticed, by the
    supervisor's ``is_alive()`` poll on the next tick.
    """

    def __new__(cls, *args: Any, **kwargs: Any):
        obj = super().__new__(cls)
        obj._supervision_listener = _LISTENER.get()
        obj._supervision_name = _CHILD_NAME.get()
        return obj

    def on_failure(self, exception_type, exception_value, traceback) -> None:
        try:
            super().on_failure(exception_type, exception_value, traceback)
        finally:
            self._report_death(f"{getattr(exception_type, '__name__', exception_type)}: {exception_value}")

    def _report_death(self, reason: str) -> None:
        listener = getattr(self, "_supervision_listener", None)
        if listener is not None:
            listener(ActorDied(self._supervision_name or str(self), reason,
                               getattr(self, "actor_urn", None)))


@contextlib.contextmanager
def supervised_context(name: str, listener: Callable[[ActorDied], None] | None):
    t1 = _LISTENER.set(listener)
    t2 = _CHILD_NAME.set(name)
    try:
        yield
    finally:
        _CHILD_NAME.reset(t2)
        _LISTENER.reset(t1)


def ping(ref: pykka.ActorRef, timeout: float) -> None:
    """Join an actor: it must answer a message within ``timeout``.

    Uses pykka's own attribute-get message so any actor class answers it
    without a handler of its own.
    """
    urn = ref.ask(ProxyGetAttr(attr_path=("actor_urn",)), timeout=timeout)
    if urn != ref.actor_urn:  # pragma: no cover - sanity
        raise StartupError(f"unexpected ping answer from {ref}")


# ------------------------------------------------------------------ the supervisor


@dataclass
class _Child:
    spec: ChildSpec
    ref: pykka.ActorRef | None = None
    state: str = "stopped"
    attempt: int = 0
    restarts: int = 0
    generation: int = 0
    started_at: float = 0.0
    timer: threading.Timer | None = field(default=None, repr=False)


class SupervisorActor(pykka.ThreadingActor):
    """Starts, watches and replaces child actors; gives up past the restart intensity.

    ``on_exit(code)`` is called (from the supervisor's thread) after every child
    has been stopped because the restart intensity was exceeded.
    """

    def __init__(self, specs, *, on_exit: Callable[[int], None], max_restarts: int = 5,
                 restart_window_seconds: float = 60.0, backoff_initial_seconds: float = 0.5,
                 backoff_max_seconds: float = 30.0, stop_timeout_seconds: float = 20.0,
                 ping_timeout_seconds: float = 10.0, tick_seconds: float | None = 0.5,
                 metrics=None, clock: Clock = time.time, jitter: bool = True):
        super().__init__()
        self._children: list[_Child] = [_Child(spec) for spec in specs]
        names = [c.spec.name for c in self._children]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate child names: {names}")
        self._on_exit = on_exit
        self._intensity = RestartIntensity(max_restarts, restart_window_seconds, clock)
        self._backoff = (backoff_initial_seconds, backoff_max_seconds)
        self._stop_timeout = stop_timeout_seconds
        self._ping_timeout = ping_timeout_seconds
        self._tick_seconds = tick_seconds
        self._metrics = metrics
        self._clock = clock
        self._jitter = jitter
        self._stopping = False
        self._ticker_stop = threading.Event()
        self._log = logger.bind(actor="supervisor")

    # -- lifecycle ------------------------------------------------------------

    def on_start(self) -> None:
        if self._tick_seconds:
            me = self.actor_ref

            def tick_loop() -> None:
                while not self._ticker_stop.wait(self._tick_seconds):
                    if not me.is_alive():
                        return
                    me.tell(Tick())

            threading.Thread(target=tick_loop, name="supervisor-tick", daemon=True).start()

    def on_stop(self) -> None:
        self._ticker_stop.set()
        self._stop_all("supervisor stopped")

    def on_failure(self, *exc_info) -> None:
        self._ticker_stop.set()
        self._stop_all("supervisor failed")
        self._on_exit(EXIT_INTENSITY)

    # -- messages -------------------------------------------------------------

    def on_receive(self, message: Any) -> Any:
        if isinstance(message, Tick):
            return self._tick()
        if isinstance(message, ActorDied):
            return self._died(message.name, message.urn, message.reason)
        if isinstance(message, RestartChild):
            return self._restart(message.name, message.generation)
        if isinstance(message, StartChildren):
            return self._start_all()
        if isinstance(message, StopChildren):
            return self._stop_all(message.reason)
        if isinstance(message, GetChild):
            child = self._find(message.name)
            return child.ref if child and child.state == "running" else None
        if isinstance(message, GetStatus):
            return self._status()
        if isinstance(message, AddChild):
            return self._add(message.spec)
        if isinstance(message, RemoveChild):
            return self._remove(message.name)
        return super().on_receive(message)

    # -- internals ------------------------------------------------------------

    def _find(self, name: str) -> _Child | None:
        return next((c for c in self._children if c.spec.name == name), None)

    def _notify(self, event: ActorDied) -> None:
        # Called from a dying child's thread: only tell, never touch state here.
        ref = self.actor_ref
        if ref.is_alive():
            ref.tell(event)

    def _spawn(self, child: _Child) -> None:
        with supervised_context(child.spec.name, self._notify):
            ref = child.spec.factory()
        child.ref = ref
        try:
            ping(ref, self._ping_timeout)
        except Exception:
            with contextlib.suppress(Exception):
                ref.stop(block=False)
            raise
        child.state = "running"
        child.started_at = self._clock()
        child.generation += 1
        self._log.info("started {}", child.spec.name)

    def _start_all(self) -> int:
        for child in self._children:
            if child.state != "stopped":
                continue
            try:
                self._spawn(child)
            except Exception as exc:
                if child.spec.critical:
                    self._log.error("critical actor {} failed to start: {}", child.spec.name, exc)
                    self._stop_all("start-up failed")
                    raise StartupError(f"{child.spec.name} failed to start: {exc}") from exc
                self._log.warning("actor {} failed to start: {}; retrying", child.spec.name, exc)
                self._schedule(child, f"start failed: {exc}", count=False)
        self._update_gauges()
        return len(self._children)

    def _add(self, spec: ChildSpec) -> bool:
        if self._stopping:
            return False
        if self._find(spec.name):
            raise ValueError(f"child {spec.name!r} already exists")
        child = _Child(spec)
        self._children.append(child)
        try:
            self._spawn(child)
        except Exception as exc:
            self._log.warning("actor {} failed to start: {}; retrying", spec.name, exc)
            self._schedule(child, f"start failed: {exc}", count=False)
        self._update_gauges()
        return True

    def _remove(self, name: str) -> bool:
        child = self._find(name)
        if child is None:
            return False
        self._stop_child(child)
        self._children.remove(child)
        self._update_gauges()
        return True

    def _died(self, name: str, urn: str | None, reason: str) -> None:
        child = self._find(name)
        if child is None or child.state != "running" or self._stopping:
            return
        if urn is not None and child.ref is not None and child.ref.actor_urn != urn:
            return  # an older incarnation
        self._log.error("actor {} died: {}", name, reason)
        child.ref = None
        if self._metrics is not None:
            self._metrics.actor_restarts.labels(actor=name).inc()
        self._schedule(child, reason, count=True)
        self._update_gauges()

    def _schedule(self, child: _Child, reason: str, *, count: bool) -> None:
        if count or child.state == "restarting":
            if not self._intensity.record():
                self._give_up(f"{child.spec.name}: {reason}")
                return
        if child.state == "running" and self._clock() - child.started_at > self._intensity.window_seconds:
            child.attempt = 0
        delay = compute_backoff(child.attempt, *self._backoff, jitter=self._jitter)
        child.attempt += 1
        child.restarts += 1
        child.state = "restarting"
        child.generation += 1
        me = self.actor_ref
        timer = threading.Timer(delay, lambda: me.is_alive() and me.tell(
            RestartChild(child.spec.name, child.generation)))
        timer.daemon = True
        child.timer = timer
        self._log.info("restarting {} in {:.2f}s (attempt {})", child.spec.name, delay, child.attempt)
        timer.start()

    def _restart(self, name: str, generation: int) -> None:
        child = self._find(name)
        if child is None or child.state != "restarting" or child.generation != generation or self._stopping:
            return
        child.timer = None
        try:
            self._spawn(child)
        except Exception as exc:
            self._log.error("restart of {} failed: {}", name, exc)
            child.ref = None
            self._schedule(child, f"restart failed: {exc}", count=True)
        self._update_gauges()

    def _give_up(self, reason: str) -> None:
        self._log.critical("restart intensity exceeded ({} restarts in {:.0f}s), last: {}; stopping",
                           self._intensity.max_restarts, self._intensity.window_seconds, reason)
        self._stop_all("restart intensity exceeded")
        self._on_exit(EXIT_INTENSITY)

    def _stop_child(self, child: _Child) -> None:
        if child.timer is not None:
            child.timer.cancel()
            child.timer = None
        ref, child.ref = child.ref, None
        child.state = "stopped"
        if ref is None:
            return
        try:
            ref.stop(block=True, timeout=self._stop_timeout)
        except Exception as exc:  # pykka.Timeout, ActorDeadError
            self._log.warning("actor {} did not stop cleanly: {!r}", child.spec.name, exc)

    def _stop_all(self, reason: str) -> None:
        if not self._stopping:
            self._log.info("stopping {} actors ({})", len(self._children), reason)
        self._stopping = True
        for child in reversed(self._children):
            self._stop_child(child)
        self._update_gauges()

    def _tick(self) -> None:
        if self._stopping:
            return
        for child in list(self._children):
            if child.state == "running" and child.ref is not None and not child.ref.is_alive():
                self._died(child.spec.name, child.ref.actor_urn, "actor is no longer alive")
        self._update_gauges()

    def _update_gauges(self) -> None:
        if self._metrics is None:
            return
        alive = 0
        for child in self._children:
            ref = child.ref
            if ref is not None and ref.is_alive():
                alive += 1
            self._metrics.inbox_depth.labels(actor=child.spec.name).set(_inbox_depth(ref))
        self._metrics.actors_alive.set(alive)

    def _status(self) -> SupervisorStatus:
        children = tuple(
            ChildStatus(c.spec.name, bool(c.ref and c.ref.is_alive()), c.spec.critical, c.restarts,
                        c.state, _inbox_depth(c.ref))
            for c in self._children)
        healthy = not self._stopping and all(c.alive for c in children if c.critical)
        return SupervisorStatus(healthy, self._stopping, children, self._intensity.recent)


def _inbox_depth(ref: pykka.ActorRef | None) -> int:
    if ref is None:
        return 0
    inbox = ref.actor_inbox
    size = getattr(inbox, "depth", None) or getattr(inbox, "qsize", None)  # LoopInbox / queue.Queue
    try:
        return int(size()) if size is not None else 0
    except Exception:
        return 0
