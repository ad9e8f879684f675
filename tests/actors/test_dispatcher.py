"""Dispatcher: account choice (plain logic) and the actor handing work to uploaders."""
from __future__ import annotations

import queue

import pykka
import pytest

from actors.dispatcher import (
    AccountView, DispatcherActor, GetDispatchStatus, Tick, account_refusal, choose_account,
)
from actors.transfers import TransferPlanner
from actors.uploader_messages import TransferUploadedResult, UploadTransfer
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


@pytest.fixture
def env(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    settings = settings_from_dict({
        "daemon": {"state_dir": str(tmp_path / "state")}, "telegram": {"mode": "simulated"},
        "upload": {"roots": [str(root)], "destination": "stash_archive"}}, base_dir=tmp_path, env={})
    storage = open_storage(f"sqlite:///{tmp_path / 'db.sqlite'}")
    yield settings, storage, root
    storage.close()


def start(storage, accounts, asked, n=2):
    uploaders = {f"uploader:{i}": FakeUploader.start(asked, storage) for i in range(n)}
    return DispatcherActor.start(storage, accounts=lambda: accounts, uploaders=lambda: uploaders,
                                 budget=None, node="test-node")


def test_dispatcher_gives_work_only_to_eligible_accounts_and_resumes_with_the_same(env):
    settings, storage, root = env
    storage.upsert_account("alice", upload_limit_bytes=2000 * MIB, state="paused")
    storage.upsert_account("bob", upload_limit_bytes=2000 * MIB, state="ready")
    storage.upsert_account("carol", upload_limit_bytes=MIB, state="ready")       # too small
    storage.upsert_account("dave", upload_limit_bytes=2000 * MIB, state="ready")
    storage.record_flood_wait("bob", "SaveFilePartRequest", 600)                   # cooling down
    (root / "a.bin").write_bytes(b"a" * (2 * MIB))
    (root / "b.bin").write_bytes(b"b" * (2 * MIB))
    planner = TransferPlanner(storage, settings, node="test-node", limit_bytes=2 * MIB)
    first, second = planner.plan([str(root / "a.bin"), str(root / "b.bin")])
    # the second one was started by carol before: it resumes with carol, or waits
    storage.set_transfer_state(second.id, "uploading", account="carol")
    asked: queue.Queue = queue.Queue()
    accounts = {n: Alive() for n in ("alice", "bob", "carol", "dave")}
    dispatcher = start(storage, accounts, asked)
    dispatcher.tell(Tick())
    got = asked.get(timeout=10)
    assert (got.transfer_id, got.account) == (first.id, "dave")
    dispatcher.ask(GetDispatchStatus(), timeout=10)   # the tick that gave it out is over
    assert asked.empty()                              # carol's transfer waits for carol
    assert storage.get_transfer(second.id).state == "uploading"
    assert storage.get_transfer(first.id).state == "uploaded"


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
