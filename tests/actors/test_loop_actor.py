"""LoopActor: one asyncio loop per actor thread, pykka semantics kept."""
from __future__ import annotations

import asyncio
import threading

import pykka
import pytest

from actors.base import LoopActor, inbox_depth

T = 5  # seconds: every wait in these tests is bounded


class Recorder(LoopActor):
    def __init__(self, log=None):
        super().__init__()
        self.log = log if log is not None else []
        self.threads: list[str] = []
        self.gate: asyncio.Event | None = None

    def _mark(self, what):
        self.threads.append((what, threading.current_thread()))

    def on_start(self):
        self.gate = asyncio.Event()
        self._mark("on_start")

    def on_stop(self):
        self._mark("on_stop")
        self.log.append(("on_stop", threading.current_thread()))

    def on_failure(self, *exc_info):
        self.log.append(("on_failure", threading.current_thread(), exc_info[1]))

    def on_receive(self, message):
        self._mark(message)
        if message == "fail":
            raise ValueError("boom")
        if message == "wait":
            return self._wait_gate()
        if message == "open":
            return self._open_gate()
        return ("echo", message)

    async def _wait_gate(self):
        self._mark("wait-inside")
        await asyncio.wait_for(self.gate.wait(), T)
        return "waited"

    async def _open_gate(self):
        self.gate.set()
        return "opened"

    # proxy-callable methods
    def thread_name(self):
        return threading.current_thread().name

    async def async_thread_name(self):
        await asyncio.sleep(0)
        return threading.current_thread().name

    def handler_threads(self):
        return list(self.threads)

    def schedule_later(self, event: threading.Event):
        asyncio.get_running_loop().call_later(0.01, event.set)
        return "scheduled"

    async def async_fail(self):
        await asyncio.sleep(0)
        raise KeyError("async boom")

    async def hang(self, started: threading.Event):
        started.set()
        await asyncio.Event().wait()


def test_async_asks_run_concurrently():
    ref = Recorder.start()
    first = ref.ask("wait", block=False)  # awaits the gate ...
    second = ref.ask("open", block=False)  # ... which only the second one opens
    assert second.get(timeout=T) == "opened"
    assert first.get(timeout=T) == "waited"


def test_every_handler_runs_on_the_actor_thread():
    log = []
    ref = Recorder.start(log)
    proxy = ref.proxy()
    actor_thread_name = proxy.thread_name().get(timeout=T)
    assert proxy.async_thread_name().get(timeout=T) == actor_thread_name
    ref.ask("x", timeout=T)
    ref.ask("wait", block=False)
    ref.ask("open", timeout=T)
    threads = proxy.handler_threads().get(timeout=T)
    ref.stop(timeout=T)
    names = {t.name for _, t in threads} | {t.name for what, t, *_ in log}
    assert names == {actor_thread_name}
    assert actor_thread_name != threading.current_thread().name
    assert [w for w, _ in threads][:1] == ["on_start"]
    assert [w for w, *_ in log] == ["on_stop"]


def test_ask_exception_goes_to_caller_and_actor_survives():
    ref = Recorder.start()
    with pytest.raises(ValueError, match="boom"):
        ref.ask("fail", timeout=T)
    with pytest.raises(KeyError, match="async boom"):
        ref.proxy().async_fail().get(timeout=T)
    assert ref.is_alive()
    assert ref.ask("still", timeout=T) == ("echo", "still")


def test_tell_exception_calls_on_failure_and_stops():
    log = []
    ref = Recorder.start(log)
    ref.tell("fail")
    ref.actor_stopped.wait(T)
    assert not ref.is_alive()
    assert pykka.ActorRegistry.get_by_urn(ref.actor_urn) is None
    with pytest.raises(pykka.ActorDeadError):
        ref.ask("late", timeout=T)
    # on_failure ran (on the actor thread), on_stop did not
    kinds = [entry[0] for entry in log]
    assert kinds == ["on_failure"]
    assert isinstance(log[0][2], ValueError)


def test_async_tell_exception_stops_the_actor():
    log = []
    ref = Recorder.start(log)
    ref.proxy().async_fail.defer()  # a tell: nobody receives the exception
    assert ref.actor_stopped.wait(T)
    assert [entry[0] for entry in log] == ["on_failure"]
    assert isinstance(log[0][2], KeyError)


def test_stop_runs_on_stop_and_unregisters():
    log = []
    ref = Recorder.start(log)
    assert ref.ask("hi", timeout=T) == ("echo", "hi")
    assert ref.stop(timeout=T) is True
    assert not ref.is_alive()
    assert pykka.ActorRegistry.get_by_urn(ref.actor_urn) is None
    assert [entry[0] for entry in log] == ["on_stop"]
    assert ref.stop(timeout=T) is False  # already dead
    with pytest.raises(pykka.ActorDeadError):
        ref.tell("x")


def test_stop_via_tell_and_inflight_cancelled_after_grace():
    class Quick(Recorder):
        stop_grace_seconds = 0.0

    ref = Quick.start()
    started = threading.Event()
    pending = ref.proxy().hang(started)
    assert started.wait(T)
    ref.stop(timeout=T)
    with pytest.raises(pykka.ActorDeadError):
        pending.get(timeout=T)


def test_messages_after_stop_get_actor_dead_error():
    ref = Recorder.start()
    ref.ask("x", timeout=T)
    stop = ref.stop(block=False)
    # queued behind the stop: answered with ActorDeadError (or refused at tell)
    try:
        late = ref.ask("late", block=False)
    except pykka.ActorDeadError:
        late = None
    assert stop.get(timeout=T) is True
    if late is not None:
        with pytest.raises(pykka.ActorDeadError):
            late.get(timeout=T)


def test_on_start_failure_stops_without_on_failure():
    log = []

    class BadStart(Recorder):
        def on_start(self):
            raise RuntimeError("cannot start")

    ref = BadStart.start(log)
    assert ref.actor_stopped.wait(T)
    assert log == []
    with pytest.raises(pykka.ActorDeadError):
        ref.ask("x", timeout=T)


def test_async_on_start_and_messages_buffered_before_loop():
    release = threading.Event()

    class SlowStart(Recorder):
        async def on_start(self):
            self.gate = asyncio.Event()
            # block the thread: messages sent now must be buffered, not lost
            await asyncio.get_running_loop().run_in_executor(None, release.wait, T)
            self.started = True

        def on_receive(self, message):
            return (message, getattr(self, "started", False))

    ref = SlowStart.start()
    futures = [ref.ask(i, block=False) for i in range(5)]
    assert inbox_depth(ref) == 5
    release.set()
    assert [f.get(timeout=T) for f in futures] == [(i, True) for i in range(5)]
    assert ref.proxy().inbox_depth().get(timeout=T) == 0


def test_loop_keeps_running_between_messages():
    ref = Recorder.start()
    fired = threading.Event()
    assert ref.proxy().schedule_later(fired).get(timeout=T) == "scheduled"
    # no further message: the call_later callback fires while the actor is idle
    assert fired.wait(T)


def test_handlers_start_in_message_order():
    order = []

    class Ordered(LoopActor):
        def on_receive(self, message):
            if message % 2:
                return self._async(message)
            order.append(message)
            return message

        async def _async(self, message):
            order.append(message)
            await asyncio.sleep(0)
            return message

    ref = Ordered.start()
    futures = [ref.ask(i, block=False) for i in range(20)]
    assert [f.get(timeout=T) for f in futures] == list(range(20))
    assert order == list(range(20))


def test_many_async_asks_in_flight_from_many_threads():
    class Counter(LoopActor):
        def on_start(self):
            self.active = 0
            self.peak = 0
            self.barrier = asyncio.Event()

        async def part(self, i):
            self.active += 1
            self.peak = max(self.peak, self.active)
            if self.active == 8:
                self.barrier.set()
            await asyncio.wait_for(self.barrier.wait(), T)
            self.active -= 1
            return i

    ref = Counter.start()
    proxy = ref.proxy()
    results = [None] * 8

    def call(i):
        results[i] = proxy.part(i).get(timeout=T)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(T)
    assert results == list(range(8))
    assert proxy.peak.get(timeout=T) == 8


def test_on_teardown_runs_last_after_stop_and_after_failure():
    done = []
    events = [threading.Event(), threading.Event()]

    class Closing(Recorder):
        async def on_teardown(self):
            await asyncio.sleep(0)  # may await
            done.append((threading.current_thread().name, self.actor_stopped.is_set()))
            events[len(done) - 1].set()

        def name(self):
            return threading.current_thread().name

    ref = Closing.start()
    name = ref.proxy().name().get(timeout=T)
    ref.stop(timeout=T)
    assert events[0].wait(T)
    failing = Closing.start()
    failing.tell("fail")
    assert events[1].wait(T)
    assert done[0] == (name, True)
    assert done[1][1] is True and done[1][0] != name
