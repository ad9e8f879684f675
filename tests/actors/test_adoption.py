"""SearchMessages on the real AccountActor + Telethon over the simulated Telegram, and
marker-based adoption (actors/adoption.py): a transfer continued by another account adopts
the messages the first account sent but never recorded, and uploads only what is missing."""
from __future__ import annotations

import asyncio
import os

import pytest

from actors.account_messages import DocumentInfo, MessageInfo, SearchMessages
from actors.adoption import adopt_orphans, adoptable
from actors.telegram.sim.world import SimWorld, auth_key_id
from actors.uploader import AccountPort, FileReader, UploaderActor
from actors.uploader_core import upload_document
from actors.uploader_messages import UploadTransfer
from storage.database import open_storage
from storage.manifest import build_manifest, write_manifest
from storage.transfers import PartRecord
from tests.actors.sim_helpers import Clock, sim_settings, start_sim_account, stop_sim

MIB = 1024 * 1024
pytestmark = pytest.mark.timeout(60)


class Env:
    """Two accounts (alice, bob), both admins of stash_archive, plus a forum; real Telethon."""

    def __init__(self, tmp_path, db_url):
        self.tmp = tmp_path
        self.clock = Clock()
        self.world = SimWorld(tmp_path / "sim", clock=self.clock)
        self.users = {n: self.world.create_user(n.title(), username=n) for n in ("alice", "bob")}
        admins = [u.user_id for u in self.users.values()]
        self.dest = self.world.create_channel("Stash", username="stash_archive", admins=admins)
        self.forum = self.world.create_channel("Forum", username="sim_forum", forum=True, admins=admins)
        self.settings = sim_settings(tmp_path)
        self.storage = open_storage(db_url, clock=self.clock)
        self.accounts = {n: self._start(n) for n in self.users}

    def _start(self, name):
        return start_sim_account(name, self.users[name], tmp=self.tmp, world=self.world,
                                 settings=self.settings, storage=self.storage, clock=self.clock)

    def count(self, name, request):
        key = auth_key_id(self.users[name].auth_key)
        return sum(1 for k, n, _ in self.world.request_log if k == key and n == request)

    def search(self, name="alice", **kw):
        kw.setdefault("channel", "stash_archive")
        kw.setdefault("query", "")
        return self.accounts[name].ask(SearchMessages(**kw), timeout=20)

    def documents(self):
        return [m for m in self.world.inspect()["messages"]
                if m["channel_id"] == self.dest and m["document"] and not m["deleted"]]

    def transfer(self, size, limit):
        path = self.tmp / "split.bin"
        path.write_bytes(os.urandom(size))
        m = build_manifest(path, "stash_archive", limit, caption="adopt me")
        mpath = write_manifest(m, self.tmp / f"{m.transfer_id}.manifest")
        self.storage.create_transfer(
            m.transfer_id, source_path=str(path), size=size, sha256=m.sha256,
            destination="stash_archive", manifest_path=str(mpath), delete_original=False,
            parts=[(p.index, p.offset, p.length, p.sha256, p.file_name, p.random_id) for p in m.parts])
        return path, m

    def send_unrecorded(self, name, path, manifest, index):
        """What a crash between send and record leaves: the message, no record."""
        with FileReader(path) as reader:
            return asyncio.run(upload_document(AccountPort(self.accounts[name], "stash_archive"),
                                               manifest.parts[index], reader, window=4,
                                               clock=self.clock))

    def close(self):
        stop_sim(self.storage, self.world)


@pytest.fixture
def env(tmp_path):
    e = Env(tmp_path, f"sqlite:///{tmp_path / 'stashd.db'}")
    yield e
    e.close()


# -- SearchMessages over the real client ---------------------------------------------------
def test_search_matches_captions_filters_documents_and_pages_with_max_id(env):
    w, alice = env.world, env.users["alice"].user_id
    docs = [w.post_document(env.dest, alice, f"f{i}.bin", os.urandom(100 + i),
                            caption=f"batch #Stashd:abc:{i}") for i in range(5)]
    text = w.post_text(env.dest, alice, "batch #stashd:abc:9 (text only)")
    w.post_document(env.dest, alice, "other.bin", b"x" * 10, caption="unrelated")

    everything = env.search(query="#stashd:abc")
    assert [m.id for m in everything.messages] == docs + [text]       # ascending, case-insensitive
    assert everything.next_since_id == 0                               # one page holds them all
    only_docs = env.search(query="#stashd:abc", documents_only=True)
    assert [m.id for m in only_docs.messages] == docs
    assert only_docs.messages[2].document.file_name == "f2.bin"
    assert only_docs.messages[2].document.size == 102
    assert only_docs.messages[2].text == "batch #Stashd:abc:2"

    page = env.search(query="#stashd:abc", documents_only=True, limit=2)   # newest first, paged
    seen = list(page.messages)
    while page.next_since_id:
        page = env.search(query="#stashd:abc", documents_only=True, limit=2, max_id=page.next_since_id)
        seen += page.messages
    assert sorted(m.id for m in seen) == docs and len(seen) == len(docs)
    assert [m.id for m in env.search(query="abc", max_id=docs[2]).messages] == docs[:2]
    assert env.search(query="nothing like it").messages == ()
    with pytest.raises(ValueError):
        env.search(query="x", limit=0)


def test_search_in_a_forum_topic(env):
    w, alice = env.world, env.users["alice"].user_id
    topic = w.create_topic(env.forum, "Backups")
    inside = w.post_document(env.forum, alice, "in.bin", b"1", caption="key-7", topic_id=topic)
    w.post_document(env.forum, alice, "out.bin", b"2", caption="key-7")
    res = env.search(channel="sim_forum", query="key-7", topic_id=topic)
    assert [m.id for m in res.messages] == [inside]
    assert res.messages[0].topic_id == topic
    assert len(env.search(channel="sim_forum", query="key-7").messages) == 2


# -- plain logic ---------------------------------------------------------------------------
TID = "11111111-2222-4333-8444-555555555555"


def part(index, message_id=None, length=100, name=None):
    return PartRecord(TID, index, index * 100, length, "00", name or f"f.bin.{index + 1:03d}", 1,
                      message_id, None, None, None, None, 0)


def msg(mid, text, size=100, name="f.bin.001", doc=True):
    d = DocumentInfo(mid * 10, 1, b"", size, name, "application/octet-stream", 2) if doc else None
    return MessageInfo(mid, 0.0, text, d)


def test_adoptable_takes_only_exact_markers_with_matching_documents():
    parts = [part(0, message_id=7), part(1), part(2)]
    found = adoptable(parts, [
        msg(10, f"#stashd:{TID}:1/3"),                                  # part 0 has a message already
        msg(11, f"caption\n#stashd:{TID}:2/3", name="f.bin.002"),       # adopted
        msg(12, f"#stashd:{TID}:2/3", name="f.bin.002"),                # a duplicate: oldest wins
        msg(13, f"#stashd:{TID}:3/3", name="f.bin.003", size=99),       # wrong size
        msg(14, f"#stashd:{TID}:3/4", name="f.bin.003"),                # another split
        msg(15, f"#stashd:{TID.replace('1', '9')}:3/3", name="f.bin.003"),   # another transfer
        msg(16, f"#stashd:{TID}:3/3", name="g.bin.003"),                # wrong name
        msg(17, f"#stashd:{TID}:3/3", name="f.bin.003", doc=False),     # no document
    ], TID)
    assert {i: m.id for i, m in found.items()} == {1: 11}
    assert adoptable(parts, [msg(20, f"#stashd:{TID}:3/3", name="f.bin.003")], TID)[2].id == 20


# -- adoption through storage and the real account ----------------------------------------
def test_adopt_orphans_records_found_messages_and_leaves_the_rest(env):
    path, m = env.transfer(5 * MIB + 100, 2 * MIB)
    assert len(m.parts) == 3
    sent = env.send_unrecorded("alice", path, m, 1)
    # a stranger posts the marker of part 3 with another document: never adopted
    env.world.post_document(env.dest, env.users["alice"].user_id, m.parts[2].file_name, b"fake",
                            caption=m.parts[2].caption)
    env.storage.set_transfer_state(m.transfer_id, "uploading", account="alice")
    adopted = asyncio.run(adopt_orphans(env.storage, env.accounts["bob"], m.transfer_id))
    assert adopted == [1]
    parts = env.storage.list_parts(m.transfer_id)
    assert [(p.message_id, p.account) for p in parts] == [(None, None), (sent.message_id, "alice"),
                                                           (None, None)]
    assert parts[1].document_id == sent.document_id
    assert env.count("bob", "SearchRequest") == 1
    # nothing left to adopt: no second search
    assert asyncio.run(adopt_orphans(env.storage, env.accounts["bob"], m.transfer_id)) == []


def test_a_port_with_search_works_in_place_of_an_actor(env):
    path, m = env.transfer(MIB, 2 * MIB)
    sent = env.send_unrecorded("alice", path, m, 0)
    asked = []

    class Port:
        async def search(self, message):
            asked.append(message)
            return env.accounts["bob"].ask(message, timeout=20)

    assert asyncio.run(adopt_orphans(env.storage, Port(), m.transfer_id, sent_by="alice")) == [0]
    assert env.storage.list_parts(m.transfer_id)[0].message_id == sent.message_id
    assert asked[0].query == m.caption_marker and asked[0].documents_only


@pytest.mark.parametrize("db", ["sqlite", "postgres"])
def test_uploader_continuing_with_another_account_adopts_then_uploads_only_the_rest(
        tmp_path, request, db):
    url = f"sqlite:///{tmp_path / 'stashd.db'}" if db == "sqlite" else request.getfixturevalue("pg_url")
    env = Env(tmp_path, url)
    try:
        path, m = env.transfer(5 * MIB + 100, 2 * MIB)
        uploader = UploaderActor.start(env.storage, env.accounts, window=4, clock=env.clock)
        # alice recorded part 1, sent part 2 but crashed before recording it
        first = env.send_unrecorded("alice", path, m, 0)
        env.storage.set_transfer_state(m.transfer_id, "uploading", account="alice")
        env.storage.record_part_sent(m.transfer_id, 0, message_id=first.message_id,
                                     document_id=first.document_id, account="alice")
        orphan = env.send_unrecorded("alice", path, m, 1)
        result = uploader.ask(UploadTransfer(m.transfer_id, "bob"), timeout=30)
        assert result.state == "uploaded"
        assert [p.message_id for p in result.parts][:2] == [first.message_id, orphan.message_id]
        assert env.count("bob", "SendMediaRequest") == 1          # only part 3
        docs = env.documents()
        assert sorted(d["document"]["file_name"] for d in docs) == [p.file_name for p in m.parts]
        data = b"".join(env.world.document_bytes(env.dest, p.message_id) for p in result.parts)
        assert data == path.read_bytes()
        t = env.storage.get_transfer(m.transfer_id)
        assert t.account == "bob"
        assert [p.account for p in env.storage.list_parts(m.transfer_id)] == ["alice", "alice", "bob"]
    finally:
        env.close()


def test_same_account_resumes_without_searching(env):
    path, m = env.transfer(MIB, 2 * MIB)
    env.storage.set_transfer_state(m.transfer_id, "uploading", account="alice")
    env.send_unrecorded("alice", path, m, 0)
    uploader = UploaderActor.start(env.storage, env.accounts, window=4, clock=env.clock)
    result = uploader.ask(UploadTransfer(m.transfer_id, "alice"), timeout=30)
    assert result.state == "uploaded"
    assert env.count("alice", "SearchRequest") == 0
    assert len(env.documents()) == 1                      # random_id made the re-send idempotent


def test_a_planned_transfer_put_back_after_another_account_started_it_adopts_too(env):
    """A retry may put a transfer alice started back to "planned": bob still adopts first,
    and the transfer names bob only once the adoption is done."""
    path, m = env.transfer(3 * MIB, 2 * MIB)
    env.storage.set_transfer_state(m.transfer_id, "uploading", account="alice")
    orphan = env.send_unrecorded("alice", path, m, 0)
    env.storage.set_transfer_state(m.transfer_id, "planned")
    uploader = UploaderActor.start(env.storage, env.accounts, window=4, clock=env.clock)
    result = uploader.ask(UploadTransfer(m.transfer_id, "bob"), timeout=30)
    assert [p.message_id for p in result.parts][0] == orphan.message_id
    assert env.count("bob", "SendMediaRequest") == 1 and len(env.documents()) == 2
    assert env.storage.get_transfer(m.transfer_id).account == "bob"
