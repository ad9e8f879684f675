"""PartScheduler: plain logic, property-tested with random interleavings of events."""
from __future__ import annotations

import pytest
from hypothesis import given, settings, strategies as st

from actors.telegram.errors import (
    CoolingDownError, FilePartMissingError, FloodWaitError, RpcError,
)
from actors.uploader_core import (
    BIG_FILE_THRESHOLD, CHUNK_SIZE, Chunk, PartScheduler, TooManyPartsError,
    flood_until, is_transient, missing_index,
)
from storage.manifest import PartPlan

KIB, MIB = 1024, 1024 * 1024


class Clock:
    def __init__(self, now=1000.0):
        self.now = now

    def __call__(self):
        return self.now


def plan(length, offset=0):
    return PartPlan(index=0, offset=offset, length=length, sha256="0" * 64, file_name="f.bin",
                    file_id=11, random_id=22, caption="c", chunk_hashes=())


def test_chunks_cover_the_document_at_its_offset():
    s = PartScheduler(plan(3 * CHUNK_SIZE + 5, offset=7 * MIB), window=10, clock=Clock())
    assert (s.total, s.big) == (4, False)
    chunks = s.next_chunks()
    assert chunks == [Chunk(0, 7 * MIB, CHUNK_SIZE), Chunk(1, 7 * MIB + CHUNK_SIZE, CHUNK_SIZE),
                      Chunk(2, 7 * MIB + 2 * CHUNK_SIZE, CHUNK_SIZE), Chunk(3, 7 * MIB + 3 * CHUNK_SIZE, 5)]


def test_big_means_over_ten_mib_and_part_cap_is_enforced():
    assert not PartScheduler(plan(BIG_FILE_THRESHOLD), window=1).big
    assert PartScheduler(plan(BIG_FILE_THRESHOLD + 1), window=1).big
    PartScheduler(plan(4 * CHUNK_SIZE), window=1, max_parts=4)
    with pytest.raises(TooManyPartsError):
        PartScheduler(plan(4 * CHUNK_SIZE + 1), window=1, max_parts=4)
    with pytest.raises(ValueError):
        PartScheduler(plan(10), window=0)


def test_window_ack_and_journal_callback():
    journal = []
    s = PartScheduler(plan(5 * CHUNK_SIZE), window=2, clock=Clock(), on_ack=journal.append)
    assert [c.index for c in s.next_chunks()] == [0, 1]
    assert s.next_chunks() == []
    s.ack(1)
    assert [c.index for c in s.next_chunks()] == [2]
    with pytest.raises(ValueError):
        s.ack(1)  # not in flight any more
    for i in (0, 2):
        s.ack(i)
    assert [c.index for c in s.next_chunks()] == [3, 4]
    s.ack(3), s.ack(4)
    assert s.done and journal == [1, 0, 2, 3, 4]


def test_resume_from_journal_sends_only_the_rest():
    s = PartScheduler(plan(6 * CHUNK_SIZE), window=10, acked={0, 1, 2}, clock=Clock())
    assert [c.index for c in s.next_chunks()] == [3, 4, 5]
    with pytest.raises(ValueError):
        PartScheduler(plan(6 * CHUNK_SIZE), window=1, acked={6})


def test_flood_parks_until_the_wait_ends_and_requeues():
    clock = Clock()
    s = PartScheduler(plan(4 * CHUNK_SIZE), window=3, clock=clock)
    s.next_chunks()
    s.flood(1, clock.now + 30)
    assert s.parked_until() == clock.now + 30
    s.ack(0)
    assert s.next_chunks() == []          # parked: nothing new, in-flight ones still settle
    s.flood(2, clock.now + 10)            # an earlier end does not shorten the park
    assert s.parked_until() == clock.now + 30 and s.attempts(1) == 0
    clock.now += 30
    assert s.parked_until() is None
    assert [c.index for c in s.next_chunks()] == [1, 2, 3]


def test_missing_requeues_the_chunk_and_everything_acked_before_it():
    clock = Clock()
    s = PartScheduler(plan(4 * CHUNK_SIZE), window=4, acked={0}, clock=clock)
    s.next_chunks()
    s.ack(1)
    clock.now += 10
    s.ack(2)
    clock.now += 10
    s.ack(3)
    assert s.done
    assert s.missing(2) == [0, 1, 2]      # journaled (oldest), older, itself; not the newer 3
    assert not s.done and s.resent == 3
    assert s.missing(1) == []             # already pending
    assert [c.index for c in s.next_chunks()] == [0, 1, 2]
    assert s.reset() == [3]


def test_error_helpers():
    assert missing_index(FilePartMissingError("SendMediaRequest", 3)) == 3
    assert missing_index(RpcError("SendMediaRequest", 400, "FILE_PART_0_MISSING")) == 0
    assert missing_index(RpcError("SendMediaRequest", 400, "MEDIA_INVALID")) is None
    assert flood_until(FloodWaitError("X", 5, 105.0)) == 105.0
    assert flood_until(CoolingDownError("X", 99.0)) == 99.0
    assert flood_until(RpcError("X", 400, "Y")) is None
    assert is_transient(RpcError("X", None, "connection failed"))
    assert is_transient(RpcError("X", 500, "INTERNAL"))
    assert not is_transient(RpcError("X", 400, "FILE_PARTS_INVALID"))


# -- properties -------------------------------------------------------------------------
EVENTS = st.lists(st.tuples(st.sampled_from(["next", "ack", "fail", "flood", "missing", "tick", "reset"]),
                            st.integers(0, 10 ** 6)), max_size=200)


@settings(max_examples=300, deadline=None)
@given(n=st.integers(1, 12), window=st.integers(1, 5), journaled=st.sets(st.integers(0, 11)), events=EVENTS)
def test_random_interleavings_never_lose_a_chunk(n, window, journaled, events):
    clock = Clock()
    journaled = {i for i in journaled if i < n}
    acks = []
    s = PartScheduler(plan(n * CHUNK_SIZE - 1), window=window, acked=journaled, clock=clock,
                      on_ack=acks.append)
    handed = []  # what the "network" holds in flight, mirrors s.in_flight

    def check():
        pending, flight, acked = list(s.pending), s.in_flight, s.acked
        assert len(pending) == len(set(pending))
        assert set(pending) | flight | acked == set(range(n))
        assert not (set(pending) & flight or set(pending) & acked or flight & acked)
        assert len(flight) <= window and flight == set(handed)
        if s.parked_until() is not None:
            assert s.next_chunks() == []

    for kind, r in events:
        if kind == "next":
            handed += [c.index for c in s.next_chunks()]
        elif kind in ("ack", "fail", "flood") and handed:
            i = handed.pop(r % len(handed))
            if kind == "ack":
                s.ack(i)
            elif kind == "fail":
                s.failed(i)
            else:
                s.flood(i, clock.now + r % 50)
        elif kind == "missing":
            s.missing(r % n)
        elif kind == "tick":
            clock.now += r % 40
        elif kind == "reset":
            s.reset()
        check()
    # drain: the network answers everything, time passes; the document completes
    for _ in range(4 * n + 10):
        clock.now += 100
        handed += [c.index for c in s.next_chunks()]
        assert len(handed) <= window
        while handed:
            s.ack(handed.pop())
        check()
        if s.done:
            break
    assert s.done and s.acked == set(range(n)) and not s.pending and not s.in_flight
    assert set(acks) | journaled == set(range(n))


# -- the driver against a fake port -----------------------------------------------------------
import asyncio  # noqa: E402

from actors.uploader_core import MemoryJournal, UploadError, UploadStats, upload_document  # noqa: E402


class FakePort:
    """Scripted answers: ``errors[(kind, index)]`` is a list of exceptions raised in turn."""

    def __init__(self, clock, errors=None):
        self.clock, self.errors = clock, errors or {}
        self.stored, self.calls, self.live, self.peak = {}, [], 0, 0

    def _maybe_raise(self, key):
        queue = self.errors.get(key)
        if queue:
            raise queue.pop(0)

    async def upload_part(self, file_id, index, total, data, big):
        self.live += 1
        self.peak = max(self.peak, self.live)
        try:
            await asyncio.sleep(0)
            self.calls.append(("part", index))
            self._maybe_raise(("part", index))
            self.stored[index] = data
        finally:
            self.live -= 1

    async def send_document(self, **kw):
        self.calls.append(("send", kw["random_id"]))
        self._maybe_raise(("send", None))
        for i in range(kw["total_parts"]):
            if i not in self.stored:
                raise FilePartMissingError("SendMediaRequest", i)
        return b"".join(self.stored[i] for i in range(kw["total_parts"]))


def run_upload(port, p, data, clock, **kw):
    slept, stats = [], []

    async def sleep(s):
        slept.append(s)
        clock.now += s

    out = asyncio.run(upload_document(port, p, lambda off, n: data[off:off + n], clock=clock,
                                      sleep=sleep, on_stats=stats.append, **kw))
    return out, slept, stats[0]


def test_driver_retries_transient_errors_and_waits_out_floods():
    clock = Clock()
    data = bytes(range(256)) * (6 * CHUNK_SIZE // 256)
    port = FakePort(clock, {
        ("part", 1): [RpcError("SaveFilePartRequest", None, "connection failed")],
        ("part", 3): [FloodWaitError("SaveFilePartRequest", 20, clock.now + 20)],
        ("part", 4): [CoolingDownError("SaveFilePartRequest", clock.now + 20)],
        ("send", None): [FloodWaitError("SendMediaRequest", 5, clock.now + 100)],
    })
    out, slept, stats = run_upload(port, plan(len(data)), data, clock, window=3, backoff=0.25)
    assert out == data and port.peak <= 3
    assert stats == UploadStats(chunks_sent=6, chunks_resent=0, flood_waits=3, retries=1, send_attempts=2)
    assert 0.25 in slept and sum(slept) >= 100
    assert [c for c in port.calls if c[0] == "send"] == [("send", 22), ("send", 22)]


def test_driver_gives_up_and_raises_permanent_errors():
    clock = Clock()
    data = b"x" * (2 * CHUNK_SIZE)
    failing = FakePort(clock, {("part", 0): [RpcError("SaveFilePartRequest", 500, "X")] * 3})
    with pytest.raises(UploadError):
        run_upload(failing, plan(len(data)), data, clock, window=2, max_attempts=3)
    refused = FakePort(clock, {("send", None): [RpcError("SendMediaRequest", 400, "MEDIA_INVALID")]})
    with pytest.raises(RpcError):
        run_upload(refused, plan(len(data)), data, clock, window=2)


def test_driver_resends_what_the_server_lost_and_skips_the_journal():
    clock = Clock()
    data = b"y" * (4 * CHUNK_SIZE)
    port = FakePort(clock)
    port.stored = {0: data[:CHUNK_SIZE]}            # the server kept 0, lost 1
    journal = MemoryJournal({0, 1})
    out, _, stats = run_upload(port, plan(len(data)), data, clock, window=4, journal=journal)
    assert out == data and stats.chunks_resent == 2  # 1 reported missing; 0 is as old, re-sent too
    assert sorted(i for k, i in port.calls if k == "part") == [0, 1, 2, 3]


# -- several chunks per call ---------------------------------------------------------------------
from actors.uploader_core import BudgetRefusedError  # noqa: E402


class GroupPort(FakePort):
    """FakePort with upload_parts: one call for a group, an outcome per part."""

    def __init__(self, clock, errors=None):
        super().__init__(clock, errors)
        self.groups = []

    async def upload_parts(self, file_id, total, big, parts):
        self.groups.append([i for i, _ in parts])
        outcomes = []
        for index, data in parts:
            try:
                await self.upload_part(file_id, index, total, data, big)
                outcomes.append(index)
            except Exception as exc:  # noqa: BLE001 - the outcome of that part
                outcomes.append(exc)
        return tuple(outcomes)


class FakeBudget:
    """Leases of (nbytes, slots), refused above ``max_slots``; records what is held."""

    def __init__(self, max_slots=None):
        self.max_slots, self.held, self.peak_bytes, self.asked = max_slots, set(), 0, []

    async def acquire(self, nbytes, slots=1):
        self.asked.append(slots)
        if self.max_slots is not None and slots > self.max_slots:
            raise BudgetRefusedError(f"{slots} slots")
        lease = (len(self.asked), nbytes, slots)
        self.held.add(lease)
        self.peak_bytes = max(self.peak_bytes, sum(n for _, n, _ in self.held))
        return lease

    def release(self, lease):
        self.held.remove(lease)


def test_driver_sends_groups_in_one_call_under_one_lease_each():
    clock = Clock()
    data = bytes(range(256)) * (10 * CHUNK_SIZE // 256) + b"tail"
    port, budget = GroupPort(clock), FakeBudget()
    out, _, stats = run_upload(port, plan(len(data)), data, clock, window=8, group=4, budget=budget)
    assert out == data and stats.chunks_sent == 11
    assert port.groups[:2] == [[0, 1, 2, 3], [4, 5, 6, 7]]       # the window: two groups of four
    assert sorted(i for g in port.groups for i in g) == list(range(11))
    assert all(len(g) <= 4 for g in port.groups) and port.peak <= 8
    assert budget.held == set() and budget.peak_bytes <= 8 * CHUNK_SIZE
    assert sum(budget.asked) == 11                               # every chunk under a lease slot


def test_driver_settles_each_part_of_a_group_on_its_own():
    clock = Clock()
    data = b"z" * (8 * CHUNK_SIZE)
    port = GroupPort(clock, {
        ("part", 1): [RpcError("SaveBigFilePartRequest", None, "connection failed")],
        ("part", 2): [FloodWaitError("SaveBigFilePartRequest", 20, clock.now + 20)],
        ("part", 5): [FilePartMissingError("SaveBigFilePartRequest", 5)],
    })
    journal = MemoryJournal()
    out, slept, stats = run_upload(port, plan(len(data)), data, clock, window=4, group=4,
                                   journal=journal, backoff=0.25)
    assert out == data
    assert stats == UploadStats(chunks_sent=8, chunks_resent=0, flood_waits=1, retries=2, send_attempts=1)
    assert sorted(journal.records) == list(range(8))   # only acknowledged chunks, each once
    assert 0.25 in slept and sum(slept) >= 20


def test_driver_falls_back_to_one_chunk_per_lease_when_a_group_is_refused():
    clock = Clock()
    data = b"w" * (6 * CHUNK_SIZE)
    port, budget = GroupPort(clock), FakeBudget(max_slots=1)
    out, _, stats = run_upload(port, plan(len(data)), data, clock, window=4, group=4, budget=budget)
    assert out == data and stats.chunks_sent == 6
    assert budget.asked[0] == 4 and set(budget.asked[1:]) == {1}   # refused once, then single leases
    assert port.groups == [] and budget.held == set()


def test_driver_without_upload_parts_sends_a_group_as_concurrent_calls():
    clock = Clock()
    data = b"v" * (5 * CHUNK_SIZE)
    port = FakePort(clock, {("part", 3): [RpcError("SaveFilePartRequest", 400, "FILE_PART_INVALID")]})
    with pytest.raises(RpcError, match="FILE_PART_INVALID"):
        run_upload(port, plan(len(data)), data, clock, window=4, group=4)
    port = FakePort(clock)
    out, _, _ = run_upload(port, plan(len(data)), data, clock, window=4, group=4)
    assert out == data and port.peak == 4
