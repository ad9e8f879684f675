"""upload_document driving the REAL AccountActor on the in-process simulated Telegram."""
from __future__ import annotations

import asyncio
import os

import pytest

from actors.account import AccountActor
from actors.telegram.client import build_client
from actors.telegram.sim.local import LocalTransport
from actors.telegram.sim.world import Fault, SimWorld, auth_key_id, write_session_file
from actors.uploader import AccountPort, FileReader
from actors.uploader_core import MemoryJournal, UploadStats, upload_document
from storage.database import open_storage
from storage.manifest import build_manifest
from tests.actors.sim_helpers import Clock, sim_settings, stop_sim

MIB = 1024 * 1024


class Env:
    def __init__(self, tmp_path, db_url=None):
        self.tmp = tmp_path
        self.clock = Clock()
        self.world = SimWorld(tmp_path / "sim", clock=self.clock)
        self.alice = self.world.create_user("Alice", username="alice", phone="+15550001111")
        self.dest = self.world.create_channel("Stash", username="stash_archive", admins=[self.alice.user_id])
        self.settings = sim_settings(tmp_path)
        self.session = write_session_file(tmp_path / "sessions" / "alice", self.alice.auth_key)
        self.storage = open_storage(db_url or f"sqlite:///{tmp_path / 'stashd.db'}", clock=self.clock)
        factory = lambda: build_client(self.settings, self.session,  # noqa: E731
                                       transport_factory=lambda: LocalTransport(self.world))
        self.account = AccountActor.start("alice", self.session, self.settings, self.storage, None,
                                          self.clock, client_factory=factory)
        self.sleeps: list[tuple[float, dict]] = []

    async def sleep(self, seconds):
        """Fake time: note the ledger at the moment of waiting, then jump the clock."""
        self.sleeps.append((seconds, self.storage.active_flood_waits("alice")))
        self.clock.now += seconds
        await asyncio.sleep(0)

    def count(self, name):
        key = auth_key_id(self.alice.auth_key)
        return sum(1 for k, n, _ in self.world.request_log if k == key and n == name)

    def file(self, name, size):
        path = self.tmp / name
        path.write_bytes(os.urandom(size))
        manifest = build_manifest(path, "stash_archive", 2000 * MIB, caption="hello")
        assert len(manifest.parts) == 1
        return path, manifest.parts[0]

    def upload(self, path, plan, port=None, **kw):
        stats = []
        port = port or AccountPort(self.account, self.dest)
        with FileReader(path) as reader:
            sent = asyncio.run(upload_document(port, plan, reader, window=kw.pop("window", 4),
                                               clock=self.clock, sleep=self.sleep,
                                               on_stats=stats.append, **kw))
        return sent, stats[0]

    def close(self):
        stop_sim(self.storage, self.world)


@pytest.fixture
def env(tmp_path):
    e = Env(tmp_path)
    yield e
    e.close()


@pytest.fixture
def db_env(tmp_path, db_url):
    """Env on SQLite and on PostgreSQL, for the tests that go through storage."""
    e = Env(tmp_path, db_url)
    yield e
    e.close()


@pytest.mark.parametrize("size,big", [(11 * MIB + 12345, True), (3 * MIB + 7, False)])
def test_upload_is_byte_exact(env, size, big):
    path, plan = env.file("doc.bin", size)
    sent, stats = env.upload(path, plan)
    assert env.world.document_bytes(env.dest, sent.message_id) == path.read_bytes()
    total = -(-size // (512 * 1024))
    name = "SaveBigFilePartRequest" if big else "SaveFilePartRequest"
    assert env.count(name) == total and env.count("SendMediaRequest") == 1
    assert stats == UploadStats(total, 0, 0, 0, 1)
    # the same random_id again (a retry after a crash) gives the same message, not a second one
    again, _ = env.upload(path, plan, journal=MemoryJournal(range(total)))
    assert again.message_id == sent.message_id


def test_flood_on_parts_is_waited_out_on_the_same_account(env):
    path, plan = env.file("big.bin", 11 * MIB)
    env.world.set_fault(Fault("flood", request="SaveBigFilePartRequest", fraction=0.35, seconds=30))
    sent, stats = env.upload(path, plan)
    assert env.world.document_bytes(env.dest, sent.message_id) == path.read_bytes()
    assert stats.flood_waits >= 1 and stats.chunks_sent == 22
    waits = [(s, ledger) for s, ledger in env.sleeps if ledger]
    assert waits and all("SaveBigFilePartRequest" in ledger for _, ledger in waits)
    assert all(0 < s <= 30 for s, _ in waits)


def test_parts_expired_before_send_are_sent_again(env):
    path, plan = env.file("big.bin", 11 * MIB)

    class ExpiringPort(AccountPort):
        expired = False

        async def send_document(self, **kw):
            if not self.expired:  # hours pass between the last part and the send
                self.expired = True
                env.clock.now += 2 * env.world.part_ttl_seconds
                assert env.world.expire_parts() >= 1
            return await super().send_document(**kw)

    sent, stats = env.upload(path, plan, port=ExpiringPort(env.account, env.dest))
    assert env.world.document_bytes(env.dest, sent.message_id) == path.read_bytes()
    assert env.count("SaveBigFilePartRequest") == 44 and env.count("SendMediaRequest") == 2
    assert stats.chunks_resent == 22


def test_resume_sends_only_the_chunks_the_journal_lacks(env):
    path, plan = env.file("big.bin", 11 * MIB)
    port = AccountPort(env.account, env.dest)
    data = path.read_bytes()

    async def first_half():
        for i in range(11):
            await port.upload_part(plan.file_id, i, 22, data[i * 512 * 1024:(i + 1) * 512 * 1024], True)
    asyncio.run(first_half())
    journal = MemoryJournal(range(11))
    sent, stats = env.upload(path, plan, journal=journal)
    assert env.count("SaveBigFilePartRequest") == 22  # 11 before the "crash", 11 after
    assert sorted(journal.records) == list(range(11, 22)) and stats.chunks_resent == 0
    assert env.world.document_bytes(env.dest, sent.message_id) == data


@pytest.mark.parametrize("size", [11 * MIB, 3 * MIB])
def test_journal_says_acked_but_server_dropped_everything(env, size):
    path, plan = env.file("doc.bin", size)
    total = size // (512 * 1024)
    sent, stats = env.upload(path, plan, journal=MemoryJournal(range(total)))
    assert env.world.document_bytes(env.dest, sent.message_id) == path.read_bytes()
    assert stats.chunks_resent == total and stats.send_attempts == 2


# -- UploaderActor: a whole transfer through storage ---------------------------------------
def planned_transfer(env, size, limit):
    from storage.manifest import write_manifest
    path = env.tmp / "split.bin"
    path.write_bytes(os.urandom(size))
    manifest = build_manifest(path, "stash_archive", limit, caption="split me")
    mpath = write_manifest(manifest, env.tmp / "split.manifest")
    env.storage.create_transfer(
        manifest.transfer_id, source_path=str(path), size=size, sha256=manifest.sha256,
        destination="stash_archive", manifest_path=str(mpath), delete_original=False,
        parts=[(p.index, p.offset, p.length, p.sha256, p.file_name, p.random_id) for p in manifest.parts])
    return path, manifest


def start_uploader(env):
    from actors.uploader import UploaderActor
    return UploaderActor.start(env.storage, {"alice": env.account}, window=4, clock=env.clock,
                               sleep=env.sleep)


def test_uploader_actor_uploads_a_split_transfer_and_records_it(db_env):
    env = db_env
    from actors.uploader_messages import UploadTransfer
    path, manifest = planned_transfer(env, 7 * MIB + 100, 3 * MIB)
    assert len(manifest.parts) == 3
    result = start_uploader(env).ask(UploadTransfer(manifest.transfer_id, "alice"), timeout=30)
    assert result.state == "uploaded" and [p.index for p in result.parts] == [0, 1, 2]
    data = b"".join(env.world.document_bytes(env.dest, p.message_id) for p in result.parts)
    assert data == path.read_bytes()
    parts = env.storage.list_parts(manifest.transfer_id)
    assert [p.message_id for p in parts] == [p.message_id for p in result.parts]
    assert all(p.account == "alice" for p in parts)
    assert env.storage.get_transfer(manifest.transfer_id).state == "uploaded"
    assert env.storage.journaled_chunks(manifest.transfer_id, 0) == set()


def test_uploader_actor_resumes_from_the_journal_after_a_failed_send(db_env):
    env = db_env
    from actors.telegram.errors import RpcError
    from actors.uploader_messages import UploadTransfer
    path, manifest = planned_transfer(env, 5 * MIB, 3 * MIB)
    uploader = start_uploader(env)
    env.world.set_fault(Fault("error", request="SendMediaRequest", error="CHAT_WRITE_FORBIDDEN", code=403))
    with pytest.raises(RpcError):
        uploader.ask(UploadTransfer(manifest.transfer_id, "alice"), timeout=30)
    assert env.storage.get_transfer(manifest.transfer_id).state == "uploading"
    assert env.storage.journaled_chunks(manifest.transfer_id, 0) == set(range(6))
    env.world.clear_faults()
    result = uploader.ask(UploadTransfer(manifest.transfer_id, "alice"), timeout=30)
    assert result.state == "uploaded"
    assert env.count("SaveFilePartRequest") == 10          # every chunk exactly once
    data = b"".join(env.world.document_bytes(env.dest, p.message_id) for p in result.parts)
    assert data == path.read_bytes()


@pytest.mark.parametrize("group", [1, 2, 4])   # 2: one lease fills the budget; 4: over it, one each
def test_budget_leases_bound_the_chunks_in_memory(env, group):
    from actors.budget import BudgetActor
    from actors.budget_messages import GetBudgetSnapshot
    from actors.uploader import BudgetActorPort

    budget = BudgetActor.start(2 * 512 * 1024, 8, 8, clock=env.clock)
    path, plan = env.file("big.bin", 11 * MIB)
    live, peak = [0], [0]

    class CountingPort(AccountPort):
        async def upload_part(self, *args):
            try:
                return await super().upload_part(*args)
            finally:
                live[0] -= 1

        async def upload_parts(self, file_id, total, big, parts):
            try:
                return await super().upload_parts(file_id, total, big, parts)
            finally:
                live[0] -= len(parts)

    with FileReader(path) as reader:
        def read(offset, length):
            live[0] += 1
            peak[0] = max(peak[0], live[0])
            return reader(offset, length)

        port = BudgetActorPort(budget, "alice")
        sent = asyncio.run(upload_document(CountingPort(env.account, env.dest), plan, read, window=6,
                                           budget=port, clock=env.clock, sleep=env.sleep, group=group))
    assert env.world.document_bytes(env.dest, sent.message_id) == path.read_bytes()
    assert peak[0] == 2  # the window is 6, the byte budget two chunks
    snap = budget.ask(GetBudgetSnapshot(), timeout=10)
    assert (snap.reserved_bytes, snap.waiting, snap.slots_in_use) == (0, 0, 0)


def test_stop_upload_ends_the_running_transfer_safely_and_it_resumes(db_env):
    from actors.uploader import UploadStoppedError
    from actors.uploader_messages import StopUpload, UploadTransfer
    env = db_env
    path, manifest = planned_transfer(env, 7 * MIB + 100, 3 * MIB)
    uploader = start_uploader(env)
    record = env.storage.record_part_sent

    def record_then_stop(*args, **kw):      # the claim is lost right after part 1 is recorded
        part = record(*args, **kw)
        if part.index == 0:
            uploader.tell(StopUpload(manifest.transfer_id, "content claim lost"))
        return part

    env.storage.record_part_sent = record_then_stop
    with pytest.raises(UploadStoppedError, match="content claim lost"):
        uploader.ask(UploadTransfer(manifest.transfer_id, "alice"), timeout=30)
    assert env.storage.get_transfer(manifest.transfer_id).state == "uploading"
    assert [p.message_id is not None for p in env.storage.list_parts(manifest.transfer_id)] == [
        True, False, False]
    # a stop for a transfer that is not running does nothing; the next ask resumes
    assert uploader.ask(StopUpload("another", "x"), timeout=10) is False
    result = uploader.ask(UploadTransfer(manifest.transfer_id, "alice"), timeout=30)
    assert result.state == "uploaded"
    assert env.count("SendMediaRequest") == 3             # each part sent once
    data = b"".join(env.world.document_bytes(env.dest, p.message_id) for p in result.parts)
    assert data == path.read_bytes()
