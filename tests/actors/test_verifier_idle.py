"""VerifierActor's idle back-off honours short intervals: a Tick is skipped only while
nothing stored or configured can be due (actors.verifier.idle_wait). Real actor, real
SQLite storage, an injected clock and an injected monotonic clock that never moves (so
only the configured delays can let a pass through)."""
from __future__ import annotations

import pykka
import pytest

from actors.verifier import VerifierActor, idle_wait
from actors.verifier_messages import GetVerifierStatus, Tick
from config.schema import VerifySettings
from storage import open_storage

pytestmark = pytest.mark.timeout(30)


class Clock:
    def __init__(self, now=1_700_000_000.0):
        self.now = now

    def __call__(self):
        return self.now


def settings(**kw):
    base = dict(first_check_delay_seconds=1.0, interval_seconds=2.0,
                verified_interval_seconds=86400.0, lease_seconds=60.0,
                backoff_initial_seconds=3.0, backoff_max_seconds=60.0,
                cleanup_grace_seconds=3600.0)
    base.update(kw)
    return VerifySettings(**base)


def test_idle_wait_is_the_shortest_of_cap_delays_and_next_check():
    s = settings()
    assert idle_wait(s, 5.0, now=100.0, next_check=None) == 1.0        # first check delay
    assert idle_wait(s, 5.0, now=100.0, next_check=100.25) == 0.25      # the next stored check
    assert idle_wait(s, 5.0, now=100.0, next_check=90.0) == 0.0         # overdue: at once
    assert idle_wait(settings(first_check_delay_seconds=60.0, interval_seconds=60.0,
                              backoff_initial_seconds=60.0), 5.0, now=0.0, next_check=None) == 5.0
    assert idle_wait(settings(first_check_delay_seconds=0.0), 5.0, now=0.0, next_check=None) == 0.0


class Env:
    def __init__(self, tmp_path, **kw):
        self.clock = Clock()
        self.storage = open_storage(f"sqlite:///{tmp_path / 'stashd.db'}", clock=self.clock)
        self.settings = settings(**kw)
        self.n = 0
        self.ref = VerifierActor.start(self.storage, self.settings, accounts=lambda: {},
                                       node="idle-test", clock=self.clock, adopt=None,
                                       monotonic=lambda: 0.0, idle_seconds=5.0)

    def transfer(self):
        """A transfer uploaded now (first check after first_check_delay_seconds)."""
        self.n += 1
        tid = f"t{self.n}"
        self.storage.create_transfer(
            tid, source_path=f"/nowhere/{tid}", size=10, sha256=f"{self.n:064x}",
            destination="stash_archive", manifest_path=f"/nowhere/{tid}.manifest",
            delete_original=False, parts=[(0, 0, 10, "0" * 64, f"{tid}.bin", self.n)])
        self.storage.record_part_sent(tid, 0, message_id=self.n, document_id=self.n,
                                      account="alice")
        self.storage.mark_transfer_uploaded(
            tid, first_check_delay=self.settings.first_check_delay_seconds)
        return tid

    def tick(self):
        self.ref.tell(Tick())
        return self.ref.ask(GetVerifierStatus(), timeout=10)

    def close(self):
        self.ref.stop()
        self.storage.close()


@pytest.fixture
def env(tmp_path):
    e = Env(tmp_path)
    yield e
    e.close()


def test_a_check_due_in_a_second_is_made_on_the_first_tick_after_it(env):
    tid = env.transfer()                       # due in 1 s
    assert env.tick().passes == 1              # nothing due yet: an idle pass
    env.clock.now += 0.5
    assert env.tick().passes == 1              # skipped: nothing can be due yet
    env.clock.now += 0.5                       # the check's time
    status = env.tick()
    assert status.passes == 2 and status.outcomes == {"error": 1}  # checked (no account: error)
    t = env.storage.get_transfer(tid)
    assert t.state == "verifying" and t.next_check_at == env.clock.now + 3.0  # back-off 3 s
    env.clock.now += 0.9
    assert env.tick().passes == 2              # skipped: within the shortest delay (1 s)
    env.clock.now += 2.1                       # the back-off's end: checked again on time
    assert env.tick().outcomes == {"error": 2}


def test_a_transfer_uploaded_after_an_idle_pass_is_not_kept_waiting(env):
    assert env.tick().passes == 1              # nothing stored: wait the shortest delay, 1 s
    env.clock.now += 0.4
    env.transfer()                             # due at +1.4
    env.clock.now += 0.6
    assert env.tick().passes == 2              # the configured delay ran out: an idle pass
    assert env.storage.get_transfer("t1").state == "uploaded"
    env.clock.now += 0.4
    assert env.tick().outcomes == {"error": 1}  # on time, not 5 s later


def test_long_intervals_still_coalesce_ticks(tmp_path):
    e = Env(tmp_path, first_check_delay_seconds=60.0, interval_seconds=60.0,
            backoff_initial_seconds=60.0)
    try:
        e.transfer()
        assert e.tick().passes == 1
        for _ in range(3):
            e.clock.now += 1.0
            assert e.tick().passes == 1         # within idle_seconds: Ticks skipped
        e.clock.now += 2.0                      # 5 s: idle_seconds is the cap
        assert e.tick().passes == 2
    finally:
        e.close()


def test_the_next_check_time_is_the_smallest_next_check_at(env):
    assert env.storage.next_check_time() is None
    env.transfer()
    env.clock.now += 10
    env.transfer()
    assert env.storage.next_check_time() == env.clock.now - 10 + 1.0
    pykka.ActorRegistry.stop_all(block=True, timeout=10)
