"""AccountActor with the real Telethon client on the in-process simulated Telegram."""
from __future__ import annotations

import asyncio
import hashlib
import os
import queue
import threading

import pykka
import pytest

from actors.account import AccountActor
from actors.account_messages import (
    DeletedResult,
    DeleteMessages,
    DocumentSentResult,
    DownloadRange,
    FloodWaitHit,
    GetAccountInfo,
    GetDialogs,
    GetHistory,
    GetMessages,
    ListTopics,
    Pause,
    Resume,
    SendDocument,
    UploadPart,
    UploadParts,
)
from actors.telegram.client import build_client
from actors.telegram.errors import (
    AccountPausedError,
    AccountUnavailableError,
    ChannelNotFoundError,
    CoolingDownError,
    FloodWaitError,
    InvalidRangeError,
    RpcError,
)
from actors.telegram.sim.local import LocalTransport
from actors.telegram.sim.world import Fault, SimWorld, auth_key_id, write_session_file
from storage.database import open_storage
from tests.actors.sim_helpers import Clock, sim_settings, stop_sim

T = 20  # every ask is bounded
KIB, MIB = 1024, 1024 * 1024
MARGIN = 64 * MIB


class Listener(pykka.ThreadingActor):
    def __init__(self, q):
        super().__init__()
        self.q = q

    def on_receive(self, message):
        self.q.put(message)


class Env:
    """A simulated Telegram with alice (regular) and bob (Premium), their session files,
    a source channel, a forum, a destination channel, settings and storage."""

    def __init__(self, tmp_path, db_url):
        self.tmp = tmp_path
        self.clock = Clock()
        self.world = SimWorld(tmp_path / "sim")
        w = self.world
        self.alice = w.create_user("Alice", username="alice", phone="+15550001111")
        self.bob = w.create_user("Bob", username="bob", phone="+15550002222", premium=True)
        users = [self.alice.user_id, self.bob.user_id]
        self.src = w.create_channel("Source", username="src_chan", members=users)
        self.forum = w.create_channel("Forum", forum=True, members=users)
        self.dest = w.create_channel("Stash", username="stash_archive", admins=users)
        self.hidden = w.create_channel("Hidden", members=[self.bob.user_id])
        self.settings = sim_settings(tmp_path)
        self.sessions = {
            "alice": write_session_file(tmp_path / "sessions" / "alice", self.alice.auth_key),
            "bob": write_session_file(tmp_path / "sessions" / "bob", self.bob.auth_key),
        }
        self.storage = open_storage(db_url or f"sqlite:///{tmp_path / 'stashd.db'}", clock=self.clock)

    def client_factory(self, name, wrap_transport=lambda transport: transport):
        path = self.sessions[name]
        return lambda: build_client(
            self.settings, path, transport_factory=lambda: wrap_transport(LocalTransport(self.world)))

    def start(self, name="alice", wrap_transport=lambda transport: transport, **kw):
        ref = AccountActor.start(
            name, self.sessions[name], self.settings, self.storage, None, self.clock,
            client_factory=self.client_factory(name, wrap_transport), **kw,
        )
        return ref

    def requests(self, user, name=None):
        key = auth_key_id(user.auth_key)
        return [r for r in self.world.request_log if r[0] == key and (name is None or r[1] == name)]

    def close(self):
        stop_sim(self.storage, self.world)


@pytest.fixture
def env(tmp_path):
    e = Env(tmp_path, None)
    yield e
    e.close()


def ask(ref, msg):
    return ref.ask(msg, timeout=T)


def test_info_detects_premium_and_upload_limit(env):
    alice, bob = env.start("alice"), env.start("bob")
    a, b = ask(alice, GetAccountInfo()), ask(bob, GetAccountInfo())
    assert (a.user_id, a.premium, a.state) == (env.alice.user_id, False, "ready")
    assert (b.user_id, b.premium, b.state) == (env.bob.user_id, True, "ready")
    assert a.upload_limit_bytes == 4000 * 512 * KIB - MARGIN
    assert b.upload_limit_bytes == 8000 * 512 * KIB - MARGIN
    assert "0001111" not in (a.phone_redacted or "") and a.phone_redacted
    rec = env.storage.get_account("bob")
    assert (rec.user_id, rec.premium, rec.upload_limit_bytes, rec.state) == (
        env.bob.user_id, True, b.upload_limit_bytes, "ready")
    assert a.error is None and a.flood_waits == ()


def test_dialogs_are_listed_and_recorded(env):
    ref = env.start("alice")
    channels = {c.channel_id: c for c in ask(ref, GetDialogs()).channels}
    assert set(channels) == {env.src, env.forum, env.dest}  # not the hidden one
    assert channels[env.forum].is_forum and not channels[env.src].is_forum
    assert channels[env.dest].is_admin and not channels[env.src].is_admin
    assert channels[env.dest].username == "stash_archive"
    stored = {c.channel_id: c for c in env.storage.list_channels()}
    assert stored[env.src].title == "Source" and "alice" in stored[env.src].seen_by


def test_history_pages_since_an_id(env):
    posted = [env.world.post_document(env.src, None, f"f{i}.zip", os.urandom(100 + i), caption=f"c{i}")
              for i in range(5)]
    posted.append(env.world.post_text(env.src, None, "hello"))
    ref = env.start("alice")
    seen, since = [], 0
    for _ in range(10):
        page = ask(ref, GetHistory(env.src, since_id=since, limit=2))
        if not page.messages:
            break
        ids = [m.id for m in page.messages]
        assert ids == sorted(ids) and ids[0] > since and len(ids) <= 2
        seen += page.messages
        since = page.next_since_id
    assert [m.id for m in seen] == posted
    assert seen[0].document.file_name == "f0.zip" and seen[0].text == "c0"
    assert seen[-1].document is None and seen[-1].text == "hello"
    # by username and by the marked -100 id, from a later id
    by_name = ask(ref, GetHistory("src_chan", since_id=posted[3]))
    assert [m.id for m in by_name.messages] == posted[4:]
    marked = ask(ref, GetHistory(int(f"-100{env.src}"), since_id=posted[4]))
    assert [m.id for m in marked.messages] == posted[5:]
    with pytest.raises(ChannelNotFoundError):
        ask(ref, GetHistory(env.hidden))


def test_topics_and_topic_history(env):
    t1 = env.world.create_topic(env.forum, "Books")
    t2 = env.world.create_topic(env.forum, "Music")
    in1 = [env.world.post_document(env.forum, None, f"b{i}.zip", b"x" * 10, topic_id=t1) for i in range(3)]
    env.world.post_document(env.forum, None, "m.zip", b"y", topic_id=t2)
    ref = env.start("alice")
    topics = {t.title: t.topic_id for t in ask(ref, ListTopics(env.forum)).topics}
    assert topics["Books"] == t1 and topics["Music"] == t2
    page = ask(ref, GetHistory(env.forum, topic_id=t1))
    docs = [m for m in page.messages if m.document]
    assert [m.id for m in docs] == in1 and {m.topic_id for m in docs} == {t1}
    later = ask(ref, GetHistory(env.forum, topic_id=t1, since_id=in1[0]))
    assert [m.id for m in later.messages if m.document] == in1[1:]


def test_ranged_download_is_byte_exact(env):
    data = os.urandom(MIB + 300 * KIB)
    msg_id = env.world.post_document(env.src, None, "big.zip", data)
    ref = env.start("alice")
    (msg,) = ask(ref, GetMessages(env.src, (msg_id,))).messages
    doc = msg.document
    assert doc.size == len(data)
    assert ask(ref, DownloadRange(doc, 0, MIB)) == data[:MIB]
    assert ask(ref, DownloadRange(doc, MIB, MIB)) == data[MIB:]  # short at the end
    assert ask(ref, DownloadRange(doc, 12 * KIB, 4 * KIB)) == data[12 * KIB:16 * KIB]
    tail = MIB + 256 * KIB
    assert ask(ref, DownloadRange(doc, tail, 64 * KIB)) == data[tail:tail + 64 * KIB]
    before = len(env.requests(env.alice, "GetFileRequest"))
    for offset, limit in [(100, 4096), (0, 3 * 4096), (MIB - 4096, 8192), (0, 2 * MIB)]:
        with pytest.raises(InvalidRangeError):
            ask(ref, DownloadRange(doc, offset, limit))
    assert len(env.requests(env.alice, "GetFileRequest")) == before  # refused locally


def _upload(ref, data, part_size, file_id, big):
    parts = [data[i:i + part_size] for i in range(0, len(data), part_size)]
    futures = [ref.ask(UploadPart(file_id, i, len(parts), p, big), block=False) for i, p in enumerate(parts)]
    return [f.get(timeout=T) for f in futures]


class InFlightGate:
    """Counts how many ``name`` requests are inside the transport at once, and holds
    each one until ``quorum`` of them have arrived together.

    Concurrent callers all get through together; serialised callers never reach the
    quorum, so the first one gives up after ``give_up`` seconds (only then: a passing
    run never waits on the clock) and every later one goes straight on, leaving
    ``max_in_flight`` at 1 for the assertion to catch."""

    def __init__(self, name, quorum, give_up=10.0):
        self.name, self.quorum, self.give_up = name, quorum, give_up
        self.in_flight = self.max_in_flight = 0
        self.gave_up = False
        self._open = None  # asyncio.Event, made on the actor's loop

    def wrap(self, transport):
        gate = self

        class Gated:
            async def invoke(self, auth_key_id, request_name, data):
                if request_name != gate.name:
                    return await transport.invoke(auth_key_id, request_name, data)
                return await gate._hold(transport.invoke(auth_key_id, request_name, data))

            async def close(self):
                await transport.close()

        return Gated()

    async def _hold(self, call):
        if self._open is None:
            self._open = asyncio.Event()
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if self.in_flight >= self.quorum:
                self._open.set()
            try:
                await asyncio.wait_for(self._open.wait(), self.give_up)
            except asyncio.TimeoutError:
                self.gave_up = True
                self._open.set()
            return await call
        finally:
            self.in_flight -= 1


def test_upload_parts_concurrently_then_send_document(env):
    gate = InFlightGate("SaveFilePartRequest", quorum=8)
    ref = env.start("bob", wrap_transport=gate.wrap)
    data = os.urandom(8 * 128 * KIB)
    results = _upload(ref, data, 128 * KIB, 1111, big=False)  # 8 asks in flight at once
    assert [r.index for r in results] == list(range(8))
    assert gate.max_in_flight == 8 and not gate.gave_up, (
        f"parts were not concurrent: at most {gate.max_in_flight} of 8 in flight at once")
    sent = ask(ref, SendDocument(
        env.dest, 1111, 8, False, "archive.zip", len(data), "caption #t1", random_id=424242,
        md5=hashlib.md5(data).hexdigest(),
    ))
    assert isinstance(sent, DocumentSentResult) and sent.message_id > 0 and sent.document_id
    assert env.world.document_bytes(env.dest, sent.message_id) == data
    (msg,) = ask(ref, GetMessages("stash_archive", (sent.message_id,))).messages
    assert msg.text == "caption #t1" and msg.document.file_name == "archive.zip"
    assert msg.document.size == len(data)


def test_upload_parts_sends_a_group_concurrently_with_an_outcome_per_part(env):
    gate = InFlightGate("SaveBigFilePartRequest", quorum=3)
    ref = env.start("alice", wrap_transport=gate.wrap)
    data = os.urandom(4 * 512 * KIB)
    parts = [UploadPart(3333, i, 4, data[i * 512 * KIB:(i + 1) * 512 * KIB], True) for i in range(3)]
    parts.append(UploadPart(3333, 3, 4, b"", True))          # an empty part: refused, alone
    outcomes = ask(ref, UploadParts(tuple(parts))).outcomes
    assert [o.index for o in outcomes[:3]] == [0, 1, 2]
    assert isinstance(outcomes[3], RpcError) and "FILE_PART_EMPTY" in str(outcomes[3])
    assert outcomes[3].__traceback__ is None
    assert gate.max_in_flight >= 3 and not gate.gave_up       # the group went out together
    ask(ref, UploadPart(3333, 3, 4, data[3 * 512 * KIB:], True))
    sent = ask(ref, SendDocument(env.dest, 3333, 4, True, "g.bin", len(data), "", random_id=31))
    assert env.world.document_bytes(env.dest, sent.message_id) == data


def test_a_flood_on_a_group_reaches_each_part_and_the_ledger_then_refuses_the_next(env):
    ref = env.start("alice")
    parts = tuple(UploadPart(4444, i, 3, os.urandom(512 * KIB), True) for i in range(3))
    env.world.set_fault(Fault(kind="flood", request="SaveBigFilePartRequest", seconds=30))
    outcomes = ask(ref, UploadParts(parts)).outcomes
    assert [type(o) for o in outcomes] == [FloodWaitError] * 3
    assert {(o.kind, o.seconds, o.until) for o in outcomes} == {
        ("SaveBigFilePartRequest", 30, env.clock.now + 30)}
    env.world.clear_faults()
    assert env.storage.active_flood_waits("alice") == {"SaveBigFilePartRequest": env.clock.now + 30}
    sent = len(env.requests(env.alice, "SaveBigFilePartRequest"))
    outcomes = ask(ref, UploadParts(parts)).outcomes   # cooling down: nothing goes out
    assert [type(o) for o in outcomes] == [CoolingDownError] * 3
    assert len(env.requests(env.alice, "SaveBigFilePartRequest")) == sent
    env.clock.now += 31
    assert [o.index for o in ask(ref, UploadParts(parts)).outcomes] == [0, 1, 2]


def test_big_file_parts_and_same_random_id_gives_one_message(env):
    ref = env.start("alice")
    data = os.urandom(3 * 512 * KIB + 1000)
    _upload(ref, data, 512 * KIB, 2222, big=True)
    send = SendDocument(env.dest, 2222, 4, True, "big.bin", len(data), "cap", random_id=777)
    first = ask(ref, send)
    again = ask(ref, send)
    assert again.message_id == first.message_id
    history = ask(ref, GetHistory(env.dest)).messages
    assert [m.id for m in history if m.document] == [first.message_id]
    assert env.world.document_bytes(env.dest, first.message_id) == data


def test_get_and_delete_messages(env):
    ids = [env.world.post_text(env.dest, None, f"t{i}") for i in range(3)]
    ref = env.start("alice")
    got = ask(ref, GetMessages(env.dest, (ids[0], 999_999, ids[2]))).messages
    assert [m.id if m else None for m in got] == [ids[0], None, ids[2]]
    assert ask(ref, DeleteMessages(env.dest, (ids[0], ids[1]))) == DeletedResult(2)
    got = ask(ref, GetMessages(env.dest, tuple(ids))).messages
    assert [m.id if m else None for m in got] == [None, None, ids[2]]
    with pytest.raises(ValueError):
        ask(ref, GetMessages(env.dest, tuple(range(1, 102))))


def test_pause_and_resume_persist(env):
    ref = env.start("alice")
    assert ask(ref, Pause()).state == "paused"
    assert env.storage.get_account("alice").state == "paused"
    with pytest.raises(AccountPausedError):
        ask(ref, GetHistory(env.src))
    assert ask(ref, GetAccountInfo()).state == "paused"  # info still answers
    ref.stop(timeout=T)
    ref = env.start("alice")  # a restart keeps the pause
    assert ask(ref, GetAccountInfo()).state == "paused"
    assert ask(ref, Resume()).state == "ready"
    assert env.storage.get_account("alice").state == "ready"
    assert ask(ref, GetHistory(env.src)).next_since_id >= 1
    ref.stop(timeout=T)
    assert env.storage.get_account("alice").state == "stopped"


def _floodwait_survives_restart(env):
    events: queue.Queue = queue.Queue()
    listener = Listener.start(events)
    ref = env.start("alice", listener=listener)
    env.world.set_fault(Fault(kind="flood", request="SaveFilePartRequest", seconds=30))
    with pytest.raises(FloodWaitError) as err:
        ask(ref, UploadPart(5, 0, 1, b"\0" * 1024, False))
    assert (err.value.kind, err.value.seconds, err.value.until) == (
        "SaveFilePartRequest", 30, env.clock.now + 30)
    env.world.clear_faults()
    assert env.storage.active_flood_waits("alice") == {"SaveFilePartRequest": env.clock.now + 30}
    hit = events.get(timeout=T)
    while not isinstance(hit, FloodWaitHit):
        hit = events.get(timeout=T)
    assert hit == FloodWaitHit("alice", "SaveFilePartRequest", 30.0, env.clock.now + 30)

    sent = len(env.requests(env.alice, "SaveFilePartRequest"))
    with pytest.raises(CoolingDownError):
        ask(ref, UploadPart(5, 0, 1, b"\0" * 1024, False))
    assert ask(ref, GetHistory(env.src)) is not None  # other kinds still go out
    assert dict(ask(ref, GetAccountInfo()).flood_waits) == {"SaveFilePartRequest": env.clock.now + 30}

    ref.stop(timeout=T)
    ref = env.start("alice")  # a new actor on the same storage: the ledger survived
    with pytest.raises(CoolingDownError) as cool:
        ask(ref, UploadPart(5, 0, 1, b"\0" * 1024, False))
    assert cool.value.until == env.clock.now + 30
    assert len(env.requests(env.alice, "SaveFilePartRequest")) == sent  # nothing reached Telegram

    env.clock.now += 31  # the wait is over
    assert ask(ref, UploadPart(5, 0, 1, b"\0" * 1024, False)).index == 0
    assert len(env.requests(env.alice, "SaveFilePartRequest")) == sent + 1


def test_floodwait_ledger_refuses_after_restart(env):
    _floodwait_survives_restart(env)


@pytest.mark.postgres
def test_floodwait_ledger_refuses_after_restart_on_postgres(tmp_path, pg_url):
    e = Env(tmp_path, pg_url)
    try:
        _floodwait_survives_restart(e)
    finally:
        e.close()


def test_one_thread_touches_the_client(env):
    """Every request the simulated Telegram sees for alice's session comes from the
    account actor's thread, while the test asks from several threads at once."""
    doc_msg = env.world.post_document(env.src, None, "d.zip", os.urandom(64 * KIB))
    ref = env.start("alice")
    actor_thread = ref.proxy().actor_thread.get(timeout=T)
    doc = ask(ref, GetMessages(env.src, (doc_msg,))).messages[0].document
    errors, barrier = [], threading.Barrier(6)

    def worker(i):
        try:
            barrier.wait(T)
            for j in range(5):
                ask(ref, GetHistory(env.src, limit=5))
                ask(ref, UploadPart(100 + i, j, 5, os.urandom(1024), False))
                assert ask(ref, DownloadRange(doc, 0, 64 * KIB))
                ask(ref, GetMessages(env.src, (doc_msg,)))
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,), name=f"caller-{i}") for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(T)
    assert not errors, errors
    ref.stop(timeout=T)
    log = env.requests(env.alice)
    kinds = {name for _, name, _ in log}
    assert {"SaveFilePartRequest", "GetFileRequest", "GetHistoryRequest", "GetUsersRequest"} <= kinds
    assert len(log) > 6 * 5 * 4
    assert {thread for _, _, thread in log} == {actor_thread.name}
    assert actor_thread.name.startswith("AccountActor")


def test_unauthorized_session_stays_alive_in_error_state(env, tmp_path):
    stray = write_session_file(tmp_path / "sessions" / "ghost", os.urandom(256))
    env.sessions["ghost"] = stray
    ref = env.start("ghost")
    info = ask(ref, GetAccountInfo())
    assert info.state == "error" and "stashd login ghost" in info.error
    assert env.storage.get_account("ghost").state == "error"
    with pytest.raises(AccountUnavailableError):
        ask(ref, GetDialogs())
    assert ref.is_alive()


def test_connection_failure_on_start_stops_the_actor(env):
    class Down:
        async def invoke(self, *a):
            raise ConnectionError("no server")

        async def close(self):
            pass

    path = env.sessions["alice"]
    settings = env.settings
    ref = AccountActor.start(
        "alice", path, settings, env.storage, None, env.clock,
        client_factory=lambda: build_client(settings, path, transport_factory=Down),
    )
    assert ref.actor_stopped.wait(T)
    with pytest.raises(pykka.ActorDeadError):
        ask(ref, GetAccountInfo())


def test_a_failed_account_actor_reports_its_death_to_the_supervisor_at_once(env):
    """SupervisedMixin's ActorDied, told from on_failure (not found later by a poll)."""
    from actors.supervision import ActorDied, supervised_context

    class Unknown:
        pass

    died: queue.Queue = queue.Queue()
    with supervised_context("account:alice", died.put):
        ref = env.start("alice")
    assert ask(ref, GetAccountInfo()).state == "ready"
    assert died.empty()
    ref.tell(Unknown())  # a tell'd handler that raises: on_failure, the actor stops
    report = died.get(timeout=T)
    assert isinstance(report, ActorDied) and report.name == "account:alice"
    assert report.urn == ref.actor_urn and "TypeError" in report.reason
    assert ref.actor_stopped.wait(T)


def test_metrics_count_requests_floods_and_state(env):
    from prometheus_client import CollectorRegistry

    from actors.metrics import Metrics

    registry = CollectorRegistry()
    metrics = Metrics(registry)
    ref = AccountActor.start(
        "alice", env.sessions["alice"], env.settings, env.storage, metrics, env.clock,
        client_factory=env.client_factory("alice"),
    )
    ask(ref, GetHistory(env.src))
    env.world.set_fault(Fault(kind="flood", request="SaveFilePartRequest", seconds=12))
    with pytest.raises(FloodWaitError):
        ask(ref, UploadPart(1, 0, 1, b"\0" * 1024, False))

    def value(name, **labels):
        return registry.get_sample_value(name, labels)

    assert value("stashd_telegram_requests_total", account="alice", method="GetHistoryRequest", result="ok") == 1
    assert value("stashd_telegram_requests_total", account="alice", method="SaveFilePartRequest",
                 result="flood") == 1
    assert value("stashd_floodwait_seconds_total", account="alice", method="SaveFilePartRequest") == 12
    assert value("stashd_account_state", account="alice", state="ready") == 1
    ask(ref, Pause())
    assert value("stashd_account_state", account="alice", state="paused") == 1
    assert not value("stashd_account_state", account="alice", state="ready")
