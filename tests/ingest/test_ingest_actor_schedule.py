"""The IngestActor's schedule as plain logic: jitter, one round per account at a time,
ScanNow now or, while running, once more when the round ends, retries after failures."""
from __future__ import annotations

import random

from actors.ingest.actor import Schedule

MAPPINGS = [("alice:a", "alice"), ("alice:b", "alice"), ("bob:a", "bob")]


def schedule(jitter=60.0, seed=1):
    return Schedule(MAPPINGS, interval=900.0, jitter=jitter, retry=30.0, rng=random.Random(seed))


def test_first_scans_come_within_the_jitter():
    s = schedule()
    s.start(1000.0)
    assert all(1000.0 <= s.next_at(label) <= 1060.0 for label, _ in MAPPINGS)
    assert len({s.next_at(label) for label, _ in MAPPINGS}) == 3  # spread, not all at once
    assert s.take_due(999.0) == {}
    assert s.take_due(1060.0) == {"alice": ["alice:a", "alice:b"], "bob": ["bob:a"]}


def test_a_running_mapping_is_not_taken_twice_and_comes_back_after_the_interval():
    s = schedule(jitter=0)
    s.start(0.0)
    assert s.take_due(0.0) == {"alice": ["alice:a", "alice:b"], "bob": ["bob:a"]}
    assert s.take_due(5.0) == {} and s.running("alice:a")
    s.finished("alice:a", 10.0)
    s.finished("alice:b", 12.0, ok=False)   # failed: retried sooner
    s.finished("bob:a", 10.0)
    assert (s.next_at("alice:a"), s.next_at("alice:b"), s.next_at("bob:a")) == (910.0, 42.0, 910.0)
    assert s.take_due(42.0, busy={"alice"}) == {}   # its account is still busy
    assert s.take_due(42.0) == {"alice": ["alice:b"]}


def test_jitter_on_every_rescan():
    s = schedule(jitter=60.0)
    s.start(0.0)
    s.take_due(60.0)
    s.finished("alice:a", 100.0)
    assert 1000.0 <= s.next_at("alice:a") <= 1060.0


def test_scan_now_makes_idle_mappings_due_and_running_ones_due_again_after_their_round():
    s = schedule(jitter=0)
    s.start(0.0)
    s.take_due(0.0, busy={"bob"})                  # alice's round runs
    s.scan_now(["alice:a", "bob:a"], 5.0)
    assert s.next_at("bob:a") == 5.0                 # idle: due now
    assert s.running("alice:a")                      # running: again when its round ends
    assert s.take_due(5.0, busy={"alice"}) == {"bob": ["bob:a"]}
    s.finished("alice:a", 20.0)
    assert s.next_at("alice:a") == 20.0              # at once, not after the interval
    s.finished("alice:b", 20.0)
    assert s.take_due(20.0) == {"alice": ["alice:a"]}


def test_abandoned_round_retries_soon():
    s = schedule(jitter=0)
    s.start(0.0)
    s.take_due(0.0)
    s.abandon("alice:a", 3.0)                        # the account was down
    assert s.next_at("alice:a") == 33.0
    s.finished("alice:b", 3.0)
    s.abandon("alice:b", 3.0)                        # already rescheduled: left alone
    assert s.next_at("alice:b") == 903.0
