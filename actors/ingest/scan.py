"""Reading what is new in a source channel (or forum topic) since its cursor.

Plain async logic over a :class:`ScanPort` (normally :class:`AccountScanPort`:
asks to one AccountActor; no Telegram client is touched here), so it is tested
with a fake port as well as over the simulated Telegram.

:func:`read_pages` yields pages of new messages, oldest first; the caller
records each page and only then advances the cursor to ``page.next_since_id``
(a crash re-reads at most one page, and recording is idempotent).

- **History.** ``GetHistory(since_id=cursor, limit=100)`` again and again until
  a page brings nothing new.  A *short* page is not the end: Telegram returns
  short pages around deleted messages, so only an empty page (nothing newer
  than the cursor) ends the read.  A page of service messages only has no
  messages but still moves the cursor.
- **Stalled pagination.** A page that does not move the cursor although it
  carries messages, or the same page twice, raises :class:`StalledError` with
  the reason; the caller marks the cursor stalled and reports it.
- **Hidden history.** When GetHistory is refused with one of
  :data:`HIDDEN_HISTORY_ERRORS`, or shows nothing new while a document search
  finds a newer document, the channel is read by the document search instead
  (``SearchMessages(documents_only=True)``, newest first, paged down with
  ``max_id`` to the cursor) and yielded as one page, oldest first.
  ``Page.source`` says which way a page was read.

:func:`resolve_target` turns a mapping's channel (username or -100 id) into the
bare channel id the cursors are kept under, and topic titles into topic ids.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, AsyncIterator, Protocol

from actors.account_messages import (
    ChannelInfo, DialogsResult, GetDialogs, GetHistory, HistoryResult, ListTopics, MessageInfo,
    SearchMessages, TopicsResult,
)
from actors.account_core import bare_channel_id
from actors.asking import ask_async
from actors.telegram.errors import RpcError

__all__ = [
    "HIDDEN_HISTORY_ERRORS", "PAGE_SIZE", "ScanError", "StalledError", "UnknownTopicError",
    "ChannelNotMappedError", "Page", "Target", "ScanPort", "AccountScanPort", "read_pages",
    "read_history", "read_by_search", "resolve_target",
]

PAGE_SIZE = 100
#: GetHistory refusals that mean "this account may not read the history": use search.
HIDDEN_HISTORY_ERRORS = frozenset({"CHAT_ADMIN_REQUIRED", "HISTORY_HIDDEN", "CHANNEL_HISTORY_HIDDEN"})


class ScanError(Exception):
    """A mapping could not be scanned (the message says why)."""


class StalledError(ScanError):
    """Pagination stopped advancing; ``reason`` says how."""

    def __init__(self, reason: str):
        self.reason = reason
        super().__init__(f"pagination stalled: {reason}")


class UnknownTopicError(ScanError):
    pass


class ChannelNotMappedError(ScanError):
    """The account does not see the mapped channel among its dialogs."""


@dataclass(frozen=True)
class Page:
    messages: tuple[MessageInfo, ...]  # ascending by id, all newer than the cursor
    next_since_id: int                 # the cursor after this page
    source: str = "history"            # "history" | "search"


@dataclass(frozen=True)
class Target:
    """One (channel, topic) of a mapping: what a cursor is kept for."""

    channel: str               # as asked (username or -100 id)
    channel_id: int            # bare id (cursor, records)
    topic_id: int | None = None
    topic_title: str | None = None
    title: str = ""

    def __str__(self) -> str:
        topic = f" topic {self.topic_title or self.topic_id}" if self.topic_id else ""
        return f"{self.channel}{topic}"


class ScanPort(Protocol):
    async def dialogs(self) -> DialogsResult: ...
    async def history(self, channel: Any, topic_id: int | None, since_id: int,
                      limit: int) -> HistoryResult: ...
    async def search(self, channel: Any, topic_id: int | None, max_id: int,
                     limit: int) -> HistoryResult: ...
    async def topics(self, channel: Any) -> TopicsResult: ...


class AccountScanPort:
    """ScanPort over one AccountActor."""

    def __init__(self, account_ref: Any, *, timeout: float = 120.0):
        self.ref, self.timeout = account_ref, timeout

    async def dialogs(self) -> DialogsResult:
        return await ask_async(self.ref, GetDialogs(), self.timeout)

    async def history(self, channel, topic_id, since_id, limit) -> HistoryResult:
        return await ask_async(self.ref, GetHistory(channel, topic_id, since_id, limit), self.timeout)

    async def search(self, channel, topic_id, max_id, limit) -> HistoryResult:
        msg = SearchMessages(channel, "", topic_id=topic_id, documents_only=True, max_id=max_id,
                             limit=limit)
        return await ask_async(self.ref, msg, self.timeout)

    async def topics(self, channel) -> TopicsResult:
        return await ask_async(self.ref, ListTopics(channel), self.timeout)


# ------------------------------------------------------------------ reading


async def read_pages(port: ScanPort, target: Target, since_id: int, *,
                     page_size: int = PAGE_SIZE) -> AsyncIterator[Page]:
    """Every new message of ``target`` after ``since_id``, page by page (module doc)."""
    try:
        first = await port.history(target.channel, target.topic_id, since_id, page_size)
    except RpcError as exc:
        if exc.message not in HIDDEN_HISTORY_ERRORS:
            raise
        page = await read_by_search(port, target, since_id, page_size=page_size)
        if page.messages or page.next_since_id > since_id:
            yield page
        return
    if not first.messages and first.next_since_id <= since_id:
        # nothing new in the history: is it hidden? (a search finding a newer document
        # says so; it costs one request when there is nothing)
        page = await read_by_search(port, target, since_id, page_size=page_size)
        if page.messages:
            yield page
        return
    async for page in read_history(port, target, since_id, first=first, page_size=page_size):
        yield page


async def read_history(port: ScanPort, target: Target, since_id: int, *,
                       first: HistoryResult | None = None,
                       page_size: int = PAGE_SIZE) -> AsyncIterator[Page]:
    cursor = since_id
    previous: tuple[int, ...] | None = None
    result = first
    while True:
        if result is None:
            result = await port.history(target.channel, target.topic_id, cursor, page_size)
        ids = tuple(m.id for m in result.messages)
        fresh = tuple(m for m in result.messages if m.id > cursor)
        if ids and ids == previous:
            raise StalledError(f"GetHistory returned the same {len(ids)} message(s) twice "
                               f"after message {cursor}")
        if result.next_since_id <= cursor:
            if ids:
                raise StalledError(f"GetHistory after message {cursor} returned {len(ids)} message(s) "
                                   f"(ids {min(ids)}..{max(ids)}) but no newer position")
            return  # nothing newer: the end of the history (for now)
        if ids and not fresh:
            raise StalledError(f"GetHistory after message {cursor} returned only older messages "
                               f"(ids {min(ids)}..{max(ids)})")
        previous = ids
        cursor = result.next_since_id
        yield Page(tuple(sorted(fresh, key=lambda m: m.id)), cursor, "history")
        result = None


async def read_by_search(port: ScanPort, target: Target, since_id: int, *,
                         page_size: int = PAGE_SIZE) -> Page:
    """Documents newer than ``since_id`` by search (newest first, paged down), as one page."""
    found: dict[int, MessageInfo] = {}
    max_id = 0
    while True:
        result = await port.search(target.channel, target.topic_id, max_id, page_size)
        newer = [m for m in result.messages if m.id > since_id]
        for m in newer:
            found[m.id] = m
        reached_cursor = len(newer) < len(result.messages)
        following = result.next_since_id
        if reached_cursor or not result.messages or following <= since_id + 1 or following == 0:
            break
        if max_id and following >= max_id:
            raise StalledError(f"document search below message {max_id} did not move "
                               f"(next page below {following})")
        max_id = following
    messages = tuple(sorted(found.values(), key=lambda m: m.id))
    top = max(found, default=since_id)
    return Page(messages, max(top, since_id), "search")


# ------------------------------------------------------------------ targets


async def resolve_target(port: ScanPort, channel: str, topics: tuple = (), *,
                         dialogs: tuple[ChannelInfo, ...] | None = None) -> list[Target]:
    """The (channel, topic) targets of one mapping.

    ``dialogs`` (the account's channels, from GetDialogs) may be passed to save
    the request when several mappings are resolved at once.
    """
    if dialogs is None:
        dialogs = (await port.dialogs()).channels
    info = _find_channel(channel, dialogs)
    if info is None:
        raise ChannelNotMappedError(f"channel {channel} is not among this account's dialogs")
    if not topics:
        return [Target(channel, info.channel_id, title=info.title)]
    known = (await port.topics(channel)).topics
    targets = []
    for wanted in topics:
        match = [t for t in known if (t.topic_id == wanted if isinstance(wanted, int)
                                      else t.title.casefold() == str(wanted).casefold())]
        if not match:
            raise UnknownTopicError(f"channel {channel} has no topic {wanted!r} "
                                    f"(topics: {', '.join(t.title for t in known) or 'none'})")
        targets.append(Target(channel, info.channel_id, match[0].topic_id, match[0].title, info.title))
    return targets


def _find_channel(channel: str, dialogs) -> ChannelInfo | None:
    text = str(channel).lstrip("@")
    if text.lstrip("-").isdigit():
        cid = bare_channel_id(int(text))
        return next((c for c in dialogs if c.channel_id == cid), None)
    return next((c for c in dialogs if c.username and c.username.casefold() == text.casefold()), None)
