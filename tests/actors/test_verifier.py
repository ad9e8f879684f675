"""The real VerifierActor with real AccountActors over the in-process simulated
Telegram, a real UploaderActor and real storage on SQLite and PostgreSQL.

The upload and the re-upload are asked of the UploaderActor directly (standing
in for the dispatcher, which hands a transfer in "uploading" to an uploader);
the verifier is driven by Tick (told, like the daemon's ticker) followed by a
GetVerifierStatus ask: the actor handles its inbox in order, so the reply
means the pass is over. Time is a fake clock moved by the test."""
from __future__ import annotations

import os

import pytest

from actors.telegram.sim.world import Fault, SimWorld, auth_key_id
from actors.uploader import UploaderActor
from actors.uploader_messages import UploadTransfer
from actors.verifier import VerifierActor
from actors.verifier_messages import GetVerifierStatus, Tick, VerifyNow
from config.schema import VerifySettings
from storage import open_storage
from storage.manifest import build_manifest, read_manifest, write_manifest
from tests.actors.sim_helpers import Clock, sim_settings, start_sim_account, stop_sim

pytestmark = pytest.mark.timeout(60)

MIB = 1024 * 1024


class Env:
    def __init__(self, tmp_path, db_url):
        self.tmp = tmp_path
        self.clock = Clock()
        self.world = SimWorld(tmp_path / "sim", clock=self.clock)
        self.alice = self.world.create_user("Alice", username="alice", phone="+15550001111")
        self.bob = self.world.create_user("Bob", username="bob", phone="+15550002222")
        self.dest = self.world.create_channel("Stash", username="stash_archive",
                                              admins=[self.alice.user_id, self.bob.user_id])
        self.settings = sim_settings(tmp_path)
        self.storage = open_storage(db_url, clock=self.clock)
        self.accounts = {name: self._account(name, user) for name, user in
                         (("alice", self.alice), ("bob", self.bob))}
        self.uploader = UploaderActor.start(self.storage, self.accounts, window=4, clock=self.clock)
        self.verify = VerifySettings(first_check_delay_seconds=60, interval_seconds=300,
                                     verified_interval_seconds=86400, lease_seconds=120,
                                     max_attempts=3, backoff_initial_seconds=30,
                                     backoff_max_seconds=600, cleanup_grace_seconds=3600)
        self.verifier = self.start_verifier()

    def _account(self, name, user):
        return start_sim_account(name, user, tmp=self.tmp, world=self.world,
                                 settings=self.settings, storage=self.storage, clock=self.clock)

    def start_verifier(self, **kw):
        return VerifierActor.start(self.storage, self.verify, accounts=lambda: dict(self.accounts),
                                   node="testnode", clock=self.clock, request_timeout=20,
                                   idle_seconds=0, **kw)

    def transfer(self, size, limit, *, delete_original=True):
        path = self.tmp / f"data{size}.bin"
        path.write_bytes(os.urandom(size))
        m = build_manifest(path, "stash_archive", limit, caption="keep me")
        mpath = write_manifest(m, self.tmp / f"{m.transfer_id}.manifest")
        self.storage.create_transfer(
            m.transfer_id, source_path=str(path), size=size, sha256=m.sha256,
            destination="stash_archive", manifest_path=str(mpath), delete_original=delete_original,
            parts=[(p.index, p.offset, p.length, p.sha256, p.file_name, p.random_id) for p in m.parts])
        return m.transfer_id, path

    def upload(self, tid, account="alice"):
        result = self.uploader.ask(UploadTransfer(tid, account), timeout=30)
        # what the uploader does not know yet: the verifier's first check delay
        self.storage.schedule_check(tid, at=self.clock.now + self.verify.first_check_delay_seconds)
        return result

    def tick(self, verifier=None):
        """One pass (Tick), waited for with an ask behind it."""
        v = verifier or self.verifier
        v.tell(Tick())
        return v.ask(GetVerifierStatus(), timeout=30)

    def requests(self, name, user=None):
        keys = {auth_key_id(u.auth_key) for u in (user,) if u} if user else None
        return sum(1 for k, n, _ in self.world.request_log
                   if n == name and (keys is None or k in keys))

    def close(self):
        stop_sim(self.storage, self.world)


@pytest.fixture
def env(tmp_path, db_url):
    e = Env(tmp_path, db_url)
    yield e
    e.close()


def test_a_deleted_message_is_reuploaded_verified_then_cleaned(env):
    tid, path = env.transfer(2 * MIB + 100_000, MIB)  # 3 parts
    original = path.read_bytes()
    assert env.upload(tid).state == "uploaded"
    before = env.storage.list_parts(tid)
    assert len(before) == 3

    status = env.tick()  # not due yet: nothing asked of Telegram
    assert status.checks == {} and env.requests("GetMessagesRequest") == 0

    env.clock.now += 60
    status = env.tick()
    assert env.storage.get_transfer(tid).state == "verified"
    assert status.checks == {"present": 3} and env.requests("GetMessagesRequest") == 1

    # a channel admin deletes part 2
    assert env.world.delete_messages(env.dest, [before[1].message_id]) == 1
    env.clock.now += 3600  # grace passed, but the next check finds the miss first
    status = env.tick()
    t = env.storage.get_transfer(tid)
    assert (t.state, t.attempts) == ("uploading", 1) and path.exists()
    assert status.checks == {"present": 5, "missing": 1} and status.reuploads == 1
    fresh = env.storage.list_parts(tid)[1]
    assert fresh.message_id is None and fresh.random_id != before[1].random_id and fresh.misses == 1
    assert read_manifest(t.manifest_path).parts[1].random_id == fresh.random_id

    # the uploader resumes the part without a message (the dispatcher's job in the daemon)
    result = env.upload(tid, account="bob")
    assert [p.index for p in result.parts if p.stats is not None] == [1]
    after = env.storage.list_parts(tid)
    assert after[1].message_id not in (None, before[1].message_id) and after[1].account == "bob"
    assert [after[0].message_id, after[2].message_id] == [before[0].message_id, before[2].message_id]
    data = b"".join(env.world.document_bytes(env.dest, p.message_id) for p in after)
    assert data == original

    env.clock.now += 60
    env.tick()
    assert env.storage.get_transfer(tid).state == "verified" and path.exists()  # grace: not yet
    env.clock.now += 3600
    status = env.tick()
    t = env.storage.get_transfer(tid)
    assert t.state == "cleaned" and status.cleanups == 1
    assert not path.exists() and not os.path.exists(t.manifest_path)
    assert [p.message_id for p in env.storage.list_parts(tid)] == [p.message_id for p in after]
    # each pass asked at most one GetMessages for the transfer's 3 ids, and the cleanup
    # one more right before deleting (the fresh check)
    assert env.requests("GetMessagesRequest") == 5


def test_a_failing_telegram_is_not_a_pass(env):
    tid, path = env.transfer(300_000, MIB)
    env.upload(tid)
    env.clock.now += 60
    env.world.set_fault(Fault("error", request="GetMessagesRequest", error="CHANNEL_PRIVATE", code=400))
    status = env.tick()
    t = env.storage.get_transfer(tid)
    assert status.checks == {"error": 1} and "CHANNEL_PRIVATE" in status.last_error
    assert t.state == "verifying" and t.next_check_at == env.clock.now + 30
    assert env.storage.list_parts(tid)[0].verified_at is None
    assert env.storage.list_parts(tid)[0].misses == 0
    env.world.clear_faults()
    env.clock.now += 30
    env.tick()
    assert env.storage.get_transfer(tid).state == "verified"


def test_a_modified_original_fails_with_that_reason(env):
    tid, path = env.transfer(700_000, MIB, delete_original=True)
    env.upload(tid)
    part = env.storage.list_parts(tid)[0]
    env.world.delete_messages(env.dest, [part.message_id])
    path.write_bytes(os.urandom(700_001))
    sends = env.requests("SendMediaRequest")
    env.clock.now += 60
    env.tick()
    t = env.storage.get_transfer(tid)
    assert t.state == "failed" and t.reason.startswith("original changed:")
    assert env.storage.list_parts(tid)[0].random_id == part.random_id
    assert env.requests("SendMediaRequest") == sends and path.exists()


def test_verify_now_checks_at_once_and_a_restarted_verifier_takes_over(env):
    tid, _ = env.transfer(200_000, MIB)
    env.upload(tid)
    result = env.verifier.ask(VerifyNow(tid), timeout=30)
    assert result.scheduled == 1 and [o.result for o in result.outcomes] == ["verified"]
    # an earlier process of this node died holding a lease: a new verifier releases it
    from actors.verifier import PROCESS_TOKEN
    other, _ = env.transfer(100_000, MIB)
    env.upload(other)
    env.storage.schedule_check(tid, at=env.clock.now - 1)  # claimed first
    env.storage.schedule_check(other)
    assert [t.id for t in env.storage.claim_due_transfers("testnode/verifier#dead.1", 1, 600)] == [tid]
    # ... but a lease of another verifier of this very process is its own business
    mine = f"testnode/verifier#{PROCESS_TOKEN}.beef"
    assert [t.id for t in env.storage.claim_due_transfers(mine, 1, 600)] == [other]
    env.verifier.stop()
    env.verifier = env.start_verifier()
    status = env.tick()
    assert status.outcomes == {"verified": 1}
    assert env.storage.get_transfer(tid).lease_owner is None
    assert env.storage.get_transfer(other).lease_owner == mine


def test_the_dispatcher_resumes_a_reupload_the_verifier_queued(env, monkeypatch):
    """The real DispatcherActor hands the re-upload (state uploading, no account, content
    already a package of this very transfer) to an uploader; nothing waits on sleep."""
    import queue

    from actors.dispatcher import DispatcherActor
    from actors.dispatcher import Tick as DispatchTick
    from storage.transfers import TransferStore

    done: queue.Queue = queue.Queue()
    original = TransferStore.mark_transfer_uploaded

    def mark(self, transfer_id, **kw):
        record = original(self, transfer_id, **kw)
        done.put((transfer_id, kw.get("first_check_delay")))
        return record

    monkeypatch.setattr(TransferStore, "mark_transfer_uploaded", mark)
    tid, path = env.transfer(1_500_000, MIB)
    env.upload(tid)
    assert done.get(timeout=5) == (tid, 0.0)
    lost = env.storage.list_parts(tid)[0]
    env.world.delete_messages(env.dest, [lost.message_id])
    env.clock.now += 60
    env.tick()
    assert env.storage.get_transfer(tid).state == "uploading"
    uploader = UploaderActor.start(env.storage, env.accounts, window=4, clock=env.clock,
                                   first_check_delay=60)
    dispatcher = DispatcherActor.start(env.storage, accounts=lambda: dict(env.accounts),
                                       uploaders=lambda: {"u1": uploader}, node="testnode",
                                       clock=env.clock)
    dispatcher.tell(DispatchTick())
    assert done.get(timeout=30) == (tid, 60)
    parts = env.storage.list_parts(tid)
    assert parts[0].message_id not in (None, lost.message_id)
    assert env.storage.get_transfer(tid).next_check_at == env.clock.now + 60
    data = b"".join(env.world.document_bytes(env.dest, p.message_id) for p in parts)
    assert data == path.read_bytes()
    env.clock.now += 60
    env.tick()
    assert env.storage.get_transfer(tid).state == "verified"


def test_an_orphan_carrying_the_lost_part_is_adopted_not_uploaded_again(env):
    """A copy of the part already sits in the channel under its caption marker (an earlier
    re-upload by an account that crashed before recording it): the verifier adopts it."""
    tid, path = env.transfer(2 * MIB + 5, MIB)  # 3 parts
    env.upload(tid)
    parts = env.storage.list_parts(tid)
    plan = read_manifest(env.storage.get_transfer(tid).manifest_path).parts[2]
    data = path.read_bytes()
    orphan = env.world.post_document(env.dest, env.bob.user_id, plan.file_name,
                                     data[plan.offset:plan.end], caption=plan.caption)
    env.world.delete_messages(env.dest, [parts[2].message_id])
    sends = env.requests("SendMediaRequest")
    env.clock.now += 60
    env.tick()
    t = env.storage.get_transfer(tid)
    after = env.storage.list_parts(tid)
    assert t.state == "uploaded" and after[2].message_id == orphan
    assert after[2].random_id == parts[2].random_id  # nothing new was planned
    assert env.requests("SendMediaRequest") == sends and env.requests("SearchRequest") == 1
    env.clock.now += 60
    env.tick()
    assert env.storage.get_transfer(tid).state == "verified"


def test_deep_check_downloads_sampled_blocks_through_the_account(tmp_path, db_url):
    e = Env(tmp_path, db_url)
    try:
        e.verifier.stop()
        import dataclasses
        e.verify = dataclasses.replace(e.verify, deep_check=True, deep_check_samples=2)
        e.verifier = e.start_verifier()
        tid, _ = e.transfer(3 * MIB + 7, 4 * MIB)  # one document of 4 blocks
        e.upload(tid)
        e.clock.now += 60
        status = e.tick()
        assert e.storage.get_transfer(tid).state == "verified" and status.checks == {"present": 1}
        assert e.requests("GetFileRequest") == 2
    finally:
        e.close()


def test_a_message_lost_after_cleanup_is_reuploaded_from_the_kept_original(env):
    """Cleaned with the original kept (no delete_original), then a message goes: the same
    content is sent again from the kept manifest, through the real uploader and Telegram."""
    tid, path = env.transfer(2 * MIB + 100_000, MIB, delete_original=False)  # 3 parts
    original = path.read_bytes()
    env.upload(tid)
    env.clock.now += 60
    env.tick()
    env.clock.now += 3600
    status = env.tick()
    t = env.storage.get_transfer(tid)
    assert t.state == "cleaned" and status.cleanups == 1
    assert path.exists() and os.path.exists(t.manifest_path)
    before = env.storage.list_parts(tid)
    assert env.world.delete_messages(env.dest, [before[2].message_id]) == 1
    env.clock.now += 86400  # the slow re-check of a cleaned transfer
    status = env.tick()
    t = env.storage.get_transfer(tid)
    assert (t.state, t.attempts) == ("uploading", 1) and status.lost == 0
    sends = env.requests("SendMediaRequest")
    result = env.upload(tid, account="bob")
    assert [p.index for p in result.parts if p.stats is not None] == [2]
    assert env.requests("SendMediaRequest") == sends + 1
    after = env.storage.list_parts(tid)
    data = b"".join(env.world.document_bytes(env.dest, p.message_id) for p in after)
    assert data == original
    env.clock.now += 60
    env.tick()
    env.clock.now += 3600
    env.tick()
    assert env.storage.get_transfer(tid).state == "cleaned" and path.exists()


def test_status_is_answered_while_an_original_is_hashed(env, monkeypatch):
    """The sha256 of the original before a re-upload runs on the verifier's hashing thread
    (held here until the test lets it go): status asks are answered meanwhile, and the end
    of the hash wakes the verifier, which re-uploads at once."""
    import queue
    import threading

    import actors.verifier_core as core
    from storage.transfers import TransferStore

    started, release = threading.Event(), threading.Event()
    real = core.check_original

    def held(*args, **kwargs):
        started.set()
        assert release.wait(30), "the test never released the hash"
        return real(*args, **kwargs)

    monkeypatch.setattr(core, "check_original", held)
    env.verifier.stop()
    env.verifier = env.start_verifier(inline_hash_bytes=0)
    tid, path = env.transfer(2 * MIB + 100_000, MIB)
    env.upload(tid)
    states: queue.Queue = queue.Queue()  # state moves from now on (the re-upload's)
    original = TransferStore.set_transfer_state

    def record(self, transfer_id, state, **kw):
        rec = original(self, transfer_id, state, **kw)
        states.put((transfer_id, state))
        return rec

    monkeypatch.setattr(TransferStore, "set_transfer_state", record)
    part = env.storage.list_parts(tid)[1]
    env.world.delete_messages(env.dest, [part.message_id])
    env.clock.now += 60
    env.verifier.tell(Tick())
    assert started.wait(30)
    # the hash is running (held): the actor answers at once, and says so
    status = env.verifier.ask(GetVerifierStatus(), timeout=5)
    assert status.hashing == 1 and status.outcomes == {"waiting": 1}
    assert env.storage.get_transfer(tid).state == "verifying"
    result = env.verifier.ask(VerifyNow(tid), timeout=5)   # a check meanwhile: still waiting
    assert [o.result for o in result.outcomes] == ["waiting"]
    release.set()
    assert states.get(timeout=30) == (tid, "uploading")      # woken by the hash's end
    status = env.verifier.ask(GetVerifierStatus(), timeout=5)
    assert status.hashing == 0 and status.reuploads == 1
    fresh = env.storage.list_parts(tid)[1]
    assert fresh.message_id is None and fresh.misses == 1
