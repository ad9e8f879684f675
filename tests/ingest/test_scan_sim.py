"""read_pages through a real AccountActor (real Telethon) on the simulated Telegram:
holes left by deleted messages give short pages and nothing is missed; a refused
history falls back to SearchMessages; forum topics by title."""
from __future__ import annotations

import asyncio

import pytest

from actors.ingest.scan import AccountScanPort, read_pages, resolve_target
from actors.telegram.sim.world import Fault
from ingest_sim import SimEnv

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def env(tmp_path):
    e = SimEnv(tmp_path, accounts=("alice",))
    yield e
    e.close()


def read_all(env, channel, topics=(), since=0):
    port = AccountScanPort(env.refs["alice"], timeout=20)

    async def go():
        [target] = await resolve_target(port, channel, topics)
        return target, [p async for p in read_pages(port, target, since)]
    return asyncio.run(go())


def test_holes_of_deleted_messages_give_short_pages_and_nothing_is_missed(env):
    ids = [env.post(f"a{i}.zip", b"PK\x03\x04" + bytes(20)) for i in range(260)]
    env.world.delete_messages(env.source_a, ids[50:90] + ids[150:155])  # holes
    target, pages = read_all(env, "sim_source_a")
    assert target.channel_id == env.source_a
    got = [m.id for p in pages for m in p.messages]
    assert got == [i for i in ids if i not in set(ids[50:90] + ids[150:155])]
    assert any(len(p.messages) < 100 for p in pages[:-1])  # a short page that was not the end
    assert pages[-1].next_since_id == ids[-1]
    assert {p.source for p in pages} == {"history"}
    # the next read from the cursor brings only what is new
    more = env.post("late.zip", b"PK\x03\x04" + bytes(20))
    _, again = read_all(env, "sim_source_a", since=pages[-1].next_since_id)
    assert [m.id for p in again for m in p.messages] == [more]


def test_refused_history_is_read_by_document_search(env):
    docs = [env.post(f"d{i}.zip", b"PK\x03\x04" + bytes(20)) for i in range(130)]
    env.world.post_text(env.source_a, env.poster.user_id, "just text")
    alice = env.users["alice"].user_id
    env.world.set_fault(Fault("error", request="GetHistoryRequest", error="CHAT_ADMIN_REQUIRED",
                              account=alice))
    _, pages = read_all(env, "sim_source_a", since=docs[9])
    assert [p.source for p in pages] == ["search"]
    assert [m.id for m in pages[0].messages] == docs[10:]
    assert pages[0].next_since_id == docs[-1]
    assert env.count("alice", "SearchRequest") == 2  # 120 documents above the cursor: two pages


def test_forum_topic_by_title(env):
    topic = env.world.create_topic(env.forum, "Games")
    other = env.world.create_topic(env.forum, "Music")
    mine = [env.post(f"g{i}.zip", b"PK\x03\x04", channel=env.forum, topic_id=topic) for i in range(3)]
    env.post("m.zip", b"PK\x03\x04", channel=env.forum, topic_id=other)
    target, pages = read_all(env, "sim_forum", topics=("games",))
    assert (target.topic_id, target.topic_title) == (topic, "Games")
    assert [m.id for p in pages for m in p.messages] == mine
