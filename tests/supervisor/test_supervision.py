"""Restart intensity, backoff and the supervisor actor with deliberately failing children."""
from __future__ import annotations

import queue
import random
import threading

import pykka
import pytest
from prometheus_client import CollectorRegistry

from actors.supervision import (
    AddChild, ChildSpec, GetChild, GetStatus, RemoveChild, RestartIntensity, StartChildren,
    StartupError, StopChildren, SupervisedMixin, SupervisorActor, compute_backoff,
)


class FakeClock:
    def __init__(self, t: float = 1000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


# ------------------------------------------------------------------ pure logic


def test_backoff_doubles_and_caps():
    assert [compute_backoff(a, 0.5, 30) for a in range(8)] == [0.5, 1, 2, 4, 8, 16, 30, 30]
    assert compute_backoff(1000, 0.5, 30) == 30


def test_backoff_jitter_stays_in_half_to_full():
    rng = random.Random(1)
    for attempt in range(10):
        full = compute_backoff(attempt, 1, 10)
        got = compute_backoff(attempt, 1, 10, jitter=True, rng=rng)
        assert full / 2 <= got <= full


def test_backoff_rejects_negative():
    with pytest.raises(ValueError):
        compute_backoff(-1, 1, 2)


def test_intensity_allows_max_then_refuses_within_window():
    clock = FakeClock()
    ri = RestartIntensity(3, 60, clock)
    assert [ri.record() for _ in range(3)] == [True, True, True]
    assert ri.record() is False


def test_intensity_window_slides():
    clock = FakeClock()
    ri = RestartIntensity(2, 10, clock)
    assert ri.record() and ri.record()
    clock.t += 10  # both earlier restarts fall out of the window
    assert ri.record() is True
    assert ri.recent == 1
    clock.t += 5
    assert ri.record() is True
    assert ri.record() is False


def test_intensity_zero_means_no_restart():
    assert RestartIntensity(0, 1, FakeClock()).record() is False


# ------------------------------------------------------------------ supervisor


class Crash:
    """tell'd: raise, which stops the actor (on_failure)."""


class Quit:
    """tell'd: stop without failing (noticed by the is_alive poll)."""


class Echo:
    pass


class Worker(SupervisedMixin, pykka.ThreadingActor):
    def __init__(self, tag: str, started: list):
        super().__init__()
        self.tag = tag
        started.append(self.actor_urn)

    def on_receive(self, message):
        if isinstance(message, Crash):
            raise RuntimeError("deliberate crash")
        if isinstance(message, Quit):
            self.stop()
            return None
        if isinstance(message, Echo):
            return self.tag
        return super().on_receive(message)


class PlainWorker(pykka.ThreadingActor):  # no mixin: only the poll notices its death
    def on_receive(self, message):
        if isinstance(message, Crash):
            raise RuntimeError("deliberate crash")
        return "plain"


class ExitRecorder:
    def __init__(self):
        self.code = None
        self.event = threading.Event()

    def __call__(self, code):
        self.code = code
        self.event.set()


def _start_sup(specs, exit_rec, **kw):
    kw.setdefault("backoff_initial_seconds", 0.0)
    kw.setdefault("backoff_max_seconds", 0.0)
    kw.setdefault("tick_seconds", 0.02)
    sup = SupervisorActor.start(specs, on_exit=exit_rec, **kw)
    sup.ask(StartChildren(), timeout=10)
    return sup


class Spawns:
    """Wraps child factories so every started incarnation is reported on a queue.

    The report is made inside the supervisor's own spawn handling, so a GetChild
    asked after it is answered once that handling (ping, state, gauges) is done."""

    def __init__(self):
        self.started: queue.Queue = queue.Queue()

    def wrap(self, name, factory):
        def start():
            ref = factory()
            self.started.put((name, ref.actor_urn))
            return ref
        return start


def _wait_new_ref(sup, spawns, name, old_urn, timeout=10.0):
    """The next running incarnation of ``name`` (not ``old_urn``)."""
    while True:
        got, urn = spawns.started.get(timeout=timeout)
        if got == name and urn != old_urn:
            break
    ref = sup.ask(GetChild(name), timeout=5)
    assert ref is not None and ref.actor_urn == urn, f"{name} was not restarted"
    return ref


def test_children_start_in_order_and_stop_in_reverse():
    order = []

    class Rec(pykka.ThreadingActor):
        def __init__(self, tag):
            super().__init__()
            self.tag = tag

        def on_start(self):
            order.append(("start", self.tag))

        def on_stop(self):
            order.append(("stop", self.tag))

    specs = [ChildSpec(t, lambda t=t: Rec.start(t)) for t in ("a", "b", "c")]
    sup = _start_sup(specs, ExitRecorder())
    sup.ask(StopChildren(), timeout=10)
    assert order == [("start", "a"), ("start", "b"), ("start", "c"),
                     ("stop", "c"), ("stop", "b"), ("stop", "a")]
    status = sup.ask(GetStatus(), timeout=5)
    assert not status.healthy and status.stopping


def test_crashed_child_is_replaced_by_a_new_answering_actor():
    started: list = []
    registry = CollectorRegistry()

    from types import SimpleNamespace
    from prometheus_client import Counter, Gauge
    metrics = SimpleNamespace(
        actor_restarts=Counter("t_restarts", "x", ["actor"], registry=registry),
        actors_alive=Gauge("t_alive", "x", registry=registry),
        inbox_depth=Gauge("t_inbox", "x", ["actor"], registry=registry),
    )
    exit_rec = ExitRecorder()
    spawns = Spawns()
    sup = _start_sup([ChildSpec("w", spawns.wrap("w", lambda: Worker.start("w", started)))], exit_rec,
                     metrics=metrics)
    first = sup.ask(GetChild("w"), timeout=5)
    assert first.ask(Echo(), timeout=5) == "w"
    first.tell(Crash())
    second = _wait_new_ref(sup, spawns, "w", first.actor_urn)
    assert second.ask(Echo(), timeout=5) == "w"
    assert not first.is_alive()
    assert len(started) == 2
    assert registry.get_sample_value("t_restarts_total", {"actor": "w"}) == 1
    status = sup.ask(GetStatus(), timeout=5)
    assert status.healthy and status.children[0].restarts == 1
    assert exit_rec.code is None


def test_plain_actor_death_noticed_by_poll():
    spawns = Spawns()
    sup = _start_sup([ChildSpec("p", spawns.wrap("p", PlainWorker.start))], ExitRecorder())
    first = sup.ask(GetChild("p"), timeout=5)
    first.tell(Crash())
    second = _wait_new_ref(sup, spawns, "p", first.actor_urn)
    assert second.ask("x", timeout=5) == "plain"


def test_intensity_exceeded_stops_everything_and_exits_nonzero():
    started: list = []
    exit_rec = ExitRecorder()
    stopped = []

    class Other(pykka.ThreadingActor):
        def on_stop(self):
            stopped.append("other")

    spawns = Spawns()
    specs = [ChildSpec("other", lambda: Other.start()),
             ChildSpec("w", spawns.wrap("w", lambda: Worker.start("w", started)))]
    sup = _start_sup(specs, exit_rec, max_restarts=2, restart_window_seconds=60)
    urn = None
    for _ in range(2):
        ref = sup.ask(GetChild("w"), timeout=5)
        ref.tell(Crash())
        urn = _wait_new_ref(sup, spawns, "w", ref.actor_urn).actor_urn
    sup.ask(GetChild("w"), timeout=5).tell(Crash())  # third restart within the window
    assert exit_rec.event.wait(10)
    assert exit_rec.code == 1
    assert stopped == ["other"]
    assert not any(r.is_alive() for r in pykka.ActorRegistry.get_all() if r != sup)
    assert len(started) == 3 and urn is not None


def test_child_that_fails_at_every_restart_exhausts_intensity():
    attempts = []

    def factory():
        attempts.append(1)
        if len(attempts) > 1:
            raise OSError("cannot start")
        return Worker.start("w", [])

    exit_rec = ExitRecorder()
    sup = _start_sup([ChildSpec("w", factory)], exit_rec, max_restarts=3)
    sup.ask(GetChild("w"), timeout=5).tell(Crash())
    assert exit_rec.event.wait(10)
    assert exit_rec.code == 1
    assert len(attempts) == 4  # first start + 3 failed restarts, the 4th restart refused


def test_critical_child_failing_to_start_aborts_startup():
    class Broken(pykka.ThreadingActor):
        def on_start(self):
            raise RuntimeError("nope")

    stopped = []

    class Ok(pykka.ThreadingActor):
        def on_stop(self):
            stopped.append("ok")

    sup = SupervisorActor.start([ChildSpec("ok", Ok.start), ChildSpec("broken", Broken.start)],
                                on_exit=ExitRecorder(), ping_timeout_seconds=2, tick_seconds=None)
    with pytest.raises(StartupError):
        sup.ask(StartChildren(), timeout=10)
    assert stopped == ["ok"]


def test_noncritical_child_failing_to_start_is_retried():
    calls = []

    def factory():
        calls.append(1)
        if len(calls) == 1:
            raise OSError("not yet")
        return Worker.start("n", [])

    spawns = Spawns()
    sup = _start_sup([ChildSpec("n", spawns.wrap("n", factory), critical=False)], ExitRecorder())
    ref = _wait_new_ref(sup, spawns, "n", None)
    assert ref.ask(Echo(), timeout=5) == "n"


def test_add_and_remove_child():
    sup = _start_sup([], ExitRecorder())
    assert sup.ask(AddChild(ChildSpec("x", lambda: Worker.start("x", []))), timeout=5)
    ref = sup.ask(GetChild("x"), timeout=5)
    assert ref.ask(Echo(), timeout=5) == "x"
    assert sup.ask(RemoveChild("x"), timeout=10)
    assert not ref.is_alive()
    assert sup.ask(GetChild("x"), timeout=5) is None


def test_stopping_supervisor_stops_children():
    sup = _start_sup([ChildSpec("w", lambda: Worker.start("w", []))], ExitRecorder())
    ref = sup.ask(GetChild("w"), timeout=5)
    sup.stop(timeout=10)
    assert not ref.is_alive()
