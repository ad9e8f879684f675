"""read_pages / resolve_target over a fake ScanPort: short pages, stalled
pagination, hidden history falling back to a document search."""
from __future__ import annotations

import asyncio

import pytest

from actors.account_messages import (
    ChannelInfo, DialogsResult, DocumentInfo, HistoryResult, MessageInfo, TopicInfo, TopicsResult,
)
from actors.ingest.scan import (
    ChannelNotMappedError, StalledError, Target, UnknownTopicError, read_pages, resolve_target,
)
from actors.telegram.errors import RpcError

TARGET = Target("src", 500)


def msg(i, doc=True):
    d = DocumentInfo(i, 1, b"", 10, f"f{i}.zip", "application/zip", 2) if doc else None
    return MessageInfo(i, 0.0, "", d)


class FakePort:
    """History of message ids ``ids``; ``short`` caps page sizes; hooks to misbehave."""

    def __init__(self, ids, *, short=None, hidden=None, docs=None):
        self.ids = sorted(ids)
        self.docs = set(self.ids if docs is None else docs)
        self.short = short or {}
        self.hidden = hidden          # None | "error" | "empty"
        self.calls = []
        self.history_hook = None

    async def history(self, channel, topic_id, since_id, limit):
        self.calls.append(("history", since_id))
        if self.history_hook:
            hooked = self.history_hook(since_id)
            if hooked is not None:
                return hooked
        if self.hidden == "error":
            raise RpcError("GetHistoryRequest", 400, "CHAT_ADMIN_REQUIRED")
        if self.hidden == "empty":
            return HistoryResult((), since_id)
        newer = [i for i in self.ids if i > since_id][: self.short.get(since_id, limit)]
        return HistoryResult(tuple(msg(i, i in self.docs) for i in newer),
                             max(newer, default=since_id))

    async def search(self, channel, topic_id, max_id, limit):
        self.calls.append(("search", max_id))
        docs = sorted(i for i in self.docs if not max_id or i < max_id)
        page = docs[-limit:]
        following = page[0] if len(docs) > len(page) else 0
        return HistoryResult(tuple(msg(i) for i in page), following)


def collect(port, since=0, page_size=100):
    async def go():
        return [p async for p in read_pages(port, TARGET, since, page_size=page_size)]
    return asyncio.run(go())


def test_full_pages_until_an_empty_one():
    port = FakePort(range(1, 251))
    pages = collect(port)
    assert [len(p.messages) for p in pages] == [100, 100, 50]
    assert [p.next_since_id for p in pages] == [100, 200, 250]
    assert port.calls[-1] == ("history", 250)  # the empty page ends it; history is visible: no search
    assert all(c[0] == "history" for c in port.calls)


def test_a_short_page_is_not_the_end():
    port = FakePort(range(1, 301), short={0: 37, 37: 5})  # Telegram's short pages around deletions
    pages = collect(port)
    assert [len(p.messages) for p in pages] == [37, 5, 100, 100, 58]
    assert [m.id for p in pages for m in p.messages] == list(range(1, 301))


def test_nothing_new_reads_one_empty_page_and_one_probe():
    port = FakePort(range(1, 11))
    assert collect(port, since=10) == []
    assert port.calls == [("history", 10), ("search", 0)]


def test_service_only_page_moves_the_cursor():
    port = FakePort(range(1, 5))

    def hook(since):
        if since == 0:  # ids 1..2 are service messages (no MessageInfo), cursor moves anyway
            return HistoryResult((), 2)
        return None
    port.history_hook = hook
    pages = collect(port)
    assert pages[0].messages == () and pages[0].next_since_id == 2
    assert [m.id for m in pages[1].messages] == [3, 4]


def test_same_page_twice_is_stalled():
    port = FakePort(range(1, 300))
    port.history_hook = lambda since: HistoryResult(tuple(msg(i) for i in range(1, 101)), 100) \
        if since in (0, 100) else None
    with pytest.raises(StalledError) as info:
        collect(port)
    assert "same 100 message(s) twice" in info.value.reason


def test_page_that_does_not_advance_is_stalled():
    port = FakePort(range(1, 300))
    port.history_hook = lambda since: HistoryResult(tuple(msg(i) for i in range(150, 160)), since) \
        if since == 100 else None
    pages = []

    async def go():
        async for p in read_pages(port, TARGET, 0):
            pages.append(p)
    with pytest.raises(StalledError) as info:
        asyncio.run(go())
    assert len(pages) == 1 and "no newer position" in info.value.reason


def test_page_of_older_messages_only_is_stalled():
    port = FakePort(range(1, 300))
    port.history_hook = lambda since: HistoryResult(tuple(msg(i) for i in range(10, 20)), 120) \
        if since == 100 else None
    with pytest.raises(StalledError) as info:
        collect(port)
    assert "only older messages" in info.value.reason


@pytest.mark.parametrize("hidden", ["error", "empty"])
def test_hidden_history_falls_back_to_a_document_search(hidden):
    port = FakePort(range(1, 400), hidden=hidden, docs=[i for i in range(1, 400) if i % 3 == 0])
    pages = collect(port, since=30)
    assert len(pages) == 1 and pages[0].source == "search"
    assert [m.id for m in pages[0].messages] == [i for i in range(31, 400) if i % 3 == 0]
    assert pages[0].next_since_id == 399
    searches = [c for c in port.calls if c[0] == "search"]
    assert searches[0] == ("search", 0) and len(searches) == 2  # 123 documents above 30: two pages
    # nothing new since: one history call, one search page that reaches the cursor
    port.calls.clear()
    assert collect(port, since=399) == []
    assert len(port.calls) == 2


def test_other_history_errors_are_not_hidden_history():
    port = FakePort(range(1, 10))

    def hook(since):
        raise RpcError("GetHistoryRequest", 400, "CHANNEL_INVALID")
    port.history_hook = hook
    with pytest.raises(RpcError):
        collect(port)
    assert all(c[0] == "history" for c in port.calls)


class TargetPort:
    def __init__(self):
        self.dialog_calls = 0

    async def dialogs(self):
        self.dialog_calls += 1
        return DialogsResult((ChannelInfo(500, "Source", "src", False, False),
                              ChannelInfo(600, "Forum", "forum", True, False)))

    async def topics(self, channel):
        return TopicsResult((TopicInfo(1, "General"), TopicInfo(7, "Music"), TopicInfo(9, "Games")))


def test_resolve_target_by_username_id_and_topics():
    port = TargetPort()
    run = asyncio.run
    assert run(resolve_target(port, "SRC")) == [Target("SRC", 500, title="Source")]
    assert run(resolve_target(port, "-100500"))[0].channel_id == 500
    targets = run(resolve_target(port, "forum", ("music", 9)))
    assert [(t.topic_id, t.topic_title) for t in targets] == [(7, "Music"), (9, "Games")]
    with pytest.raises(UnknownTopicError):
        run(resolve_target(port, "forum", ("Films",)))
    with pytest.raises(ChannelNotMappedError):
        run(resolve_target(port, "elsewhere"))
