"""Dispatcher: account choice (plain logic) and the actor handing work to uploaders."""
from __future__ import annotations

import queue

import pykka
import pytest

from actors.base import LoopActor
from actors.budget import BudgetActor
from actors.budget_core import Quota
from actors.budget_messages import GetBudgetSnapshot
from actors.dispatcher import (
    AccountView, DispatcherActor, GetDispatchStatus, Tick, account_refusal, choose_account,
    handover_account,
)
from actors.transfers import TransferPlanner
from actors.uploader_messages import StopUpload, TransferUploadedResult, UploadTransfer
from config import settings_from_dict
from storage import open_storage

MIB = 1024 * 1024
NOW = 1_700_000_000.0


def view(name, state="ready", limit=2000 * MIB, **kw):
    return AccountView(name, state, limit, **kw)


def test_refusals():
    assert account_refusal(view("a"), MIB, NOW) is None
    assert account_refusal(view("a", "paused"), MIB, NOW) == "paused"
    assert account_refusal(view("a", "error"), MIB, NOW) == "error"
    assert account_refusal(view("a", alive=False), MIB, NOW) == "not running"
    assert account_refusal(view("a", cooling_until=NOW + 5), MIB, NOW) == "cooling down"
    assert account_refusal(view("a", cooling_until=NOW - 5), MIB, NOW) is None
    assert account_refusal(view("a", limit=MIB), 2 * MIB, NOW) == "upload limit too small"
    assert account_refusal(view("a", blocked_until=NOW + 1), MIB, NOW) == "over quota"


def test_choose_excludes_paused_cooling_and_small_and_takes_the_least_busy():
    views = [view("alice", "paused"), view("bob", cooling_until=NOW + 60),
             view("carol", limit=100 * MIB), view("dave", busy=2), view("erin", busy=1)]
    assert choose_account(views, 500 * MIB, NOW) == "erin"
    assert choose_account(views, 50 * MIB, NOW) == "carol"          # idle and fits
    assert choose_account(views[:3], 500 * MIB, NOW) is None
    assert choose_account([view("b", busy=1), view("a", busy=1)], MIB, NOW) == "a"


class FakeUploader(pykka.ThreadingActor):
    """Records what it is asked; answers when the test releases it."""

    def __init__(self, asked: queue.Queue, storage):
        super().__init__()
        self.asked, self.storage = asked, storage

    def on_receive(self, message):
        assert isinstance(message, UploadTransfer)
        for part in self.storage.parts_without_message(message.transfer_id):
            self.storage.record_part_sent(message.transfer_id, part.index, message_id=100 + part.index,
                                          document_id=None, account=message.account)
        self.storage.mark_transfer_uploaded(message.transfer_id)
        self.asked.put(message)
        return TransferUploadedResult(message.transfer_id, "uploaded", ())


class Alive:
    """Stands in for an AccountActor ref: only is_alive is used by the dispatcher."""

    def is_alive(self):
        return True


class Clock:
    def __init__(self):
        self.now = NOW

    def __call__(self):
        return self.now


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def env(tmp_path, db_url, clock):
    root = tmp_path / "root"
    root.mkdir()
    settings = settings_from_dict({
        "daemon": {"state_dir": str(tmp_path / "state")}, "telegram": {"mode": "simulated"},
        "upload": {"roots": [str(root)], "destination": "stash_archive"}}, base_dir=tmp_path, env={})
    storage = open_storage(db_url, clock=clock)
    yield settings, storage, root
    storage.close()


def start(storage, accounts, asked, n=2, uploader=None, **kw):
    uploaders = {f"uploader:{i}": (uploader or FakeUploader).start(asked, storage) for i in range(n)}
    kw.setdefault("budget", None)
    return DispatcherActor.start(storage, accounts=lambda: accounts, uploaders=lambda: uploaders,
                                 node="test-node", **kw)


def settle(dispatcher, budget=None):
    """Every message told so far is handled (dispatcher -> budget -> dispatcher)."""
    dispatcher.ask(GetDispatchStatus(), timeout=10)
    if budget is not None:
        budget.ask(GetBudgetSnapshot(), timeout=10)
        dispatcher.ask(GetDispatchStatus(), timeout=10)


def test_dispatcher_gives_work_only_to_eligible_accounts_and_resumes_with_the_same(env, clock):
    settings, storage, root = env
    storage.upsert_account("alice", upload_limit_bytes=2000 * MIB, state="paused")
    storage.upsert_account("bob", upload_limit_bytes=2000 * MIB, state="ready")
    storage.upsert_account("carol", upload_limit_bytes=MIB, state="ready")       # too small
    storage.upsert_account("dave", upload_limit_bytes=2000 * MIB, state="ready")
    storage.upsert_account("erin", upload_limit_bytes=2000 * MIB, state="error")
    storage.record_flood_wait("bob", "SaveFilePartRequest", 600)                   # cooling down
    (root / "a.bin").write_bytes(b"a" * (2 * MIB))
    (root / "b.bin").write_bytes(b"b" * (2 * MIB))
    (root / "c.bin").write_bytes(b"c" * (2 * MIB))
    planner = TransferPlanner(storage, settings, node="test-node", limit_bytes=2 * MIB)
    first, second, third = planner.plan([str(root / x) for x in ("a.bin", "b.bin", "c.bin")])
    # started before by bob (cooling down) and erin (in error): they wait for them
    storage.set_transfer_state(second.id, "uploading", account="bob")
    storage.set_transfer_state(third.id, "uploading", account="erin")
    asked: queue.Queue = queue.Queue()
    accounts = {n: Alive() for n in ("alice", "bob", "carol", "dave", "erin")}
    dispatcher = start(storage, accounts, asked, n=3, clock=clock)
    dispatcher.tell(Tick())
    got = asked.get(timeout=10)
    assert (got.transfer_id, got.account) == (first.id, "dave")
    settle(dispatcher)                                # the tick that gave it out is over
    assert asked.empty()
    assert storage.get_transfer(second.id).state == "uploading"
    assert storage.get_transfer(first.id).state == "uploaded"


def test_handover_rule():
    views = [view("alice", "error"), view("bob"), view("carol", busy=1),
             view("dave", cooling_until=NOW + 60), view("erin", blocked_until=NOW + 60),
             view("fred", limit=MIB), view("gina", alive=False)]
    after = 600.0

    def who(started_by, down_since=None, need=10 * MIB, vs=views):
        return handover_account(started_by, vs, need, NOW, down_since, after)

    assert who("bob") == "bob"                                   # fine: its own
    assert who("carol") == "carol"
    assert who("dave", NOW - 10 * after) is None                 # FloodWait: never dodged
    assert who("erin", NOW - 10 * after) is None                 # quota: waited out
    assert who("alice", NOW - 10) is None                        # down, not long enough
    assert who("alice", NOW - after) == "bob"                    # down long enough
    assert who("gina", NOW - after) == "bob"                     # not running
    assert who("gina", None) is None                             # not seen down yet
    assert who("zed") == "bob"                                   # no longer configured: at once
    assert who("fred") == "bob"                                  # its limit no longer fits: at once
    assert who("fred", need=MIB // 2) == "fred"
    assert who("alice", NOW - after, vs=views[:1]) is None       # nobody else can take it


def test_a_transfer_is_handed_over_after_its_account_is_down_long_enough(env, clock):
    settings, storage, root = env
    for name in ("alice", "bob"):
        storage.upsert_account(name, upload_limit_bytes=2000 * MIB, state="ready")
    (root / "a.bin").write_bytes(b"a" * MIB)
    [t] = TransferPlanner(storage, settings, node="test-node", limit_bytes=2 * MIB).plan(
        [str(root / "a.bin")])
    storage.set_transfer_state(t.id, "uploading", account="alice")
    storage.upsert_account("alice", state="error")
    asked: queue.Queue = queue.Queue()
    dispatcher = start(storage, {"alice": Alive(), "bob": Alive()}, asked, clock=clock,
                       handover_after=300)
    dispatcher.tell(Tick())
    settle(dispatcher)
    clock.now += 299
    dispatcher.tell(Tick())
    settle(dispatcher)
    assert asked.empty()                       # alice is down, but not for 300 s yet
    clock.now += 2
    dispatcher.tell(Tick())
    got = asked.get(timeout=10)
    assert (got.transfer_id, got.account) == (t.id, "bob")


def test_file_quota_counts_documents_and_never_charges_one_twice(env, clock):
    settings, storage, root = env
    storage.upsert_account("alice", upload_limit_bytes=2000 * MIB, state="ready")
    (root / "a.bin").write_bytes(b"a" * (2 * MIB))
    (root / "b.bin").write_bytes(b"b" * (2 * MIB))
    planner = TransferPlanner(storage, settings, clock, node="test-node", limit_bytes=MIB)
    [first] = planner.plan([str(root / "a.bin")])
    clock.now += 1
    [second] = planner.plan([str(root / "b.bin")])
    assert (first.part_count, second.part_count) == (2, 2)
    budget = BudgetActor.start(64 * MIB, 8, 8, {"alice": Quota(hourly_files=3)}, clock=clock)
    asked: queue.Queue = queue.Queue()
    dispatcher = start(storage, {"alice": Alive()}, asked, n=2, budget=budget, clock=clock,
                       quota_wait=10, quota_backoff=60)
    dispatcher.tell(Tick())              # two documents each: 3 fit the hourly quota
    assert asked.get(timeout=10).transfer_id == first.id
    settle(dispatcher, budget)
    snap = budget.ask(GetBudgetSnapshot(), timeout=10).accounts[0]
    assert (snap.hourly_files, snap.hourly_bytes, snap.waiting_files) == (3, 3 * MIB, 1)
    assert asked.empty()                 # one of its two documents is over the quota
    clock.now += 11                      # quota_wait: the waiting request is withdrawn
    dispatcher.tell(Tick())
    settle(dispatcher, budget)
    assert budget.ask(GetBudgetSnapshot(), timeout=10).accounts[0].waiting_files == 0
    clock.now += 3600                    # a new hour: only the document not charged yet is asked
    dispatcher.tell(Tick())
    assert asked.get(timeout=10).transfer_id == second.id
    snap = budget.ask(GetBudgetSnapshot(), timeout=10).accounts[0]
    assert (snap.hourly_files, snap.hourly_bytes) == (1, MIB)


class SlowUploader(LoopActor):
    """Takes an UploadTransfer and holds it until told StopUpload (or released)."""

    stop_grace_seconds = 0.0     # a held upload is cancelled at once when the test ends

    def __init__(self, asked: queue.Queue, storage):
        super().__init__()
        self.asked, self.storage = asked, storage
        self.running = {}

    def on_receive(self, message):
        if isinstance(message, StopUpload):
            self.asked.put(message)
            future = self.running.pop(message.transfer_id, None)
            if future is not None:
                future.set_exception(RuntimeError("stopped"))
            return None
        return self._hold(message)

    async def _hold(self, message):
        import asyncio
        future = asyncio.get_running_loop().create_future()
        self.running[message.transfer_id] = future
        self.asked.put(message)
        return await future


def test_a_long_upload_keeps_its_claim_and_a_lost_claim_stops_it(env, clock, monkeypatch):
    settings, storage, root = env
    finished: queue.Queue = queue.Queue()
    original = DispatcherActor._finished

    def note(self, msg):
        original(self, msg)
        finished.put(msg)

    monkeypatch.setattr(DispatcherActor, "_finished", note)
    storage.upsert_account("alice", upload_limit_bytes=2000 * MIB, state="ready")
    (root / "a.bin").write_bytes(b"a" * MIB)
    [t] = TransferPlanner(storage, settings, node="test-node", limit_bytes=2 * MIB,
                          lease_seconds=100).plan([str(root / "a.bin")])
    asked: queue.Queue = queue.Queue()
    dispatcher = start(storage, {"alice": Alive()}, asked, n=1, uploader=SlowUploader, clock=clock,
                       lease_seconds=100)
    dispatcher.tell(Tick())
    assert asked.get(timeout=10).transfer_id == t.id
    for _ in range(8):                   # 240 s of upload, ticks renewing every 30 s
        clock.now += 30
        dispatcher.tell(Tick())
        settle(dispatcher)
        other = storage.claim_content(t.sha256, "other-node/x", 100, "x")
        assert not other.granted and other.holder == "test-node/" + t.id
    clock.now += 101                     # the dispatcher stalled past the lease: taken over
    assert storage.claim_content(t.sha256, "other-node/x", 1000, "x").granted
    dispatcher.tell(Tick())
    stop = asked.get(timeout=10)
    assert stop == StopUpload(t.id, "content claim lost")
    assert "stopped" in finished.get(timeout=10).error
    status = dispatcher.ask(GetDispatchStatus(), timeout=10)
    assert status["busy"] == {} and t.id in status["retry_at"]
    clock.now += 400                     # retry due, but the other owner's claim is live
    dispatcher.tell(Tick())
    settle(dispatcher)
    assert asked.empty()


def test_dispatcher_completes_a_duplicate_by_reference_instead_of_uploading(env):
    settings, storage, root = env
    storage.upsert_account("alice", upload_limit_bytes=2000 * MIB, state="ready")
    (root / "a.bin").write_bytes(b"same" * 100)
    (root / "b.bin").write_bytes(b"same" * 100)
    first, second = TransferPlanner(storage, settings, node="test-node", limit_bytes=MIB).plan(
        [str(root / "a.bin"), str(root / "b.bin")])
    asked: queue.Queue = queue.Queue()
    dispatcher = start(storage, {"alice": Alive()}, asked, n=2)
    dispatcher.tell(Tick())
    assert asked.get(timeout=10).transfer_id == first.id   # the second's content is claimed by the first
    dispatcher.ask(GetDispatchStatus(), timeout=10)
    assert asked.empty()
    dispatcher.tell(Tick())
    dispatcher.ask(GetDispatchStatus(), timeout=10)
    assert asked.empty()
    t = storage.get_transfer(second.id)
    assert (t.state, t.duplicate_of) == ("uploaded", first.id)


def test_a_reupload_of_a_stored_transfer_goes_out_without_a_claim(env, clock):
    """The verifier put a lost part back (new random_id, state uploading): the package is the
    transfer itself, so no claim is needed, none is renewed, nothing stops it."""
    settings, storage, root = env
    storage.upsert_account("alice", upload_limit_bytes=2000 * MIB, state="ready")
    (root / "a.bin").write_bytes(b"a" * (2 * MIB))
    [t] = TransferPlanner(storage, settings, node="test-node", limit_bytes=MIB).plan([str(root / "a.bin")])
    for i in range(2):
        storage.record_part_sent(t.id, i, message_id=10 + i, document_id=None, account="alice")
    storage.set_transfer_state(t.id, "uploading", account="alice")
    storage.mark_transfer_uploaded(t.id)
    assert storage.find_package(t.sha256).transfer_id == t.id
    storage.set_part_random_id(t.id, 1, 12345)
    storage.set_transfer_state(t.id, "uploading")
    asked: queue.Queue = queue.Queue()
    dispatcher = start(storage, {"alice": Alive()}, asked, n=1, uploader=SlowUploader, clock=clock,
                       lease_seconds=100)
    dispatcher.tell(Tick())
    got = asked.get(timeout=10)
    assert (got.transfer_id, got.account) == (t.id, "alice")
    clock.now += 60                      # a renewal tick: no claim to renew, nothing stopped
    dispatcher.tell(Tick())
    settle(dispatcher)
    assert asked.empty()
    assert dispatcher.ask(GetDispatchStatus(), timeout=10)["busy"] == {"uploader:0": t.id}
    assert storage.get_transfer(t.id).duplicate_of is None
