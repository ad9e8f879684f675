"""Channels, dialogs, history, topics, sending and deleting messages."""

from __future__ import annotations

from telethon.tl import functions, types

from .errors import SimRpcError, bad_request
from .handlers_build import (
    GENERAL_TOPIC_ID, TOPIC_ICON_COLOR, Ctx, channel_id_of, readable_channel, tl_channel,
    tl_date, tl_message, tl_user, writable_channel,
)

PAGE_LIMIT = 100


def _channel_messages(ctx: Ctx, channel_id: int, messages: list, count: int):
    return types.messages.ChannelMessages(
        pts=ctx.state.channel(channel_id)["pts"], count=count, messages=messages, topics=[],
        chats=ctx.chats(), users=ctx.users(),
    )


# -- entities --------------------------------------------------------------------------

def resolve_username(ctx: Ctx, req):
    ctx.me()
    row = ctx.state.channel_by_username(req.username)
    if row is not None:
        ctx.seen_channels.add(row["id"])
        peer = types.PeerChannel(row["id"])
    else:
        row = ctx.state.user_by_username(req.username)
        if row is None:
            raise bad_request("USERNAME_NOT_OCCUPIED")
        ctx.seen_users.add(row["id"])
        peer = types.PeerUser(row["id"])
    return types.contacts.ResolvedPeer(peer=peer, chats=ctx.chats(), users=ctx.users())


def get_channels(ctx: Ctx, req):
    for input_channel in req.id:
        ctx.seen_channels.add(channel_id_of(ctx, input_channel))
    return types.messages.Chats(chats=ctx.chats())


def get_full_channel(ctx: Ctx, req):
    channel_id = readable_channel(ctx, req.channel)
    row = ctx.state.channel(channel_id)
    count = ctx.state.one("SELECT COUNT(*) FROM members WHERE channel_id=?", channel_id)[0]
    full = types.ChannelFull(
        id=channel_id, about="", read_inbox_max_id=0, read_outbox_max_id=0, unread_count=0,
        chat_photo=types.PhotoEmpty(id=0), notify_settings=types.PeerNotifySettings(),
        bot_info=[], pts=row["pts"], participants_count=count,
    )
    return types.messages.ChatFull(full_chat=full, chats=ctx.chats(), users=ctx.users())


def get_dialogs(ctx: Ctx, req):
    me = ctx.me()
    dialogs, messages = [], []
    rows = ctx.state.all(
        "SELECT c.* FROM channels c JOIN members m ON m.channel_id=c.id WHERE m.user_id=?", me
    )
    tops = sorted(((ctx.state.top_message_id(r["id"]), r) for r in rows),
                  key=lambda t: (-t[0], t[1]["id"]))
    for top, row in tops:
        ctx.seen_channels.add(row["id"])
        dialogs.append(types.Dialog(
            peer=types.PeerChannel(row["id"]), top_message=top, read_inbox_max_id=top,
            read_outbox_max_id=top, unread_count=0, unread_mentions_count=0,
            unread_reactions_count=0, unread_poll_votes_count=0,
            notify_settings=types.PeerNotifySettings(), pts=row["pts"],
        ))
        if top:
            messages.append(tl_message(ctx, row["id"], ctx.state.message(row["id"], top)))
    return types.messages.Dialogs(dialogs=dialogs, messages=messages, chats=ctx.chats(),
                                  users=ctx.users())


# -- history -----------------------------------------------------------------------------

def _slice(ctx: Ctx, channel_id: int, where: str, args: tuple, req):
    """Telegram's offset_id/offset_date/add_offset/limit/min_id/max_id window over
    messages sorted newest first.

    As on Telegram, the window is taken over message ids, deleted ones included,
    and deleted messages are then left out: a page around deleted messages is
    short (fewer than ``limit``) although older history follows."""
    limit = min(max(req.limit, 0), PAGE_LIMIT)  # limit=0: only the count, as Telegram does
    rows = ctx.state.all(
        f"SELECT * FROM messages WHERE channel_id=? {where} ORDER BY id DESC",
        channel_id, *args,
    )
    live = sum(1 for r in rows if not r["deleted"])
    offset_date = getattr(req, "offset_date", None) or getattr(req, "max_date", None)
    if req.offset_id:
        position = sum(1 for r in rows if r["id"] >= req.offset_id)
    elif offset_date and offset_date.timestamp() > 0:
        ts = offset_date.timestamp()
        position = sum(1 for r in rows if r["date"] >= ts)
    else:
        position = 0
    start = max(0, position + req.add_offset)
    end = max(0, position + req.add_offset + limit)
    window = rows[start:end]
    window = [r for r in window if not r["deleted"]
              and (not req.min_id or r["id"] > req.min_id) and (not req.max_id or r["id"] < req.max_id)]
    messages = [tl_message(ctx, channel_id, r) for r in window]
    return _channel_messages(ctx, channel_id, messages, live)


def get_history(ctx: Ctx, req):
    channel_id = readable_channel(ctx, req.peer)
    return _slice(ctx, channel_id, "", (), req)


def _topic_where(ctx: Ctx, channel_id: int, topic_id: int):
    if topic_id == GENERAL_TOPIC_ID:
        return "AND (topic_id IS NULL OR topic_id=?) AND id<>?", (GENERAL_TOPIC_ID, GENERAL_TOPIC_ID)
    return "AND topic_id=? AND id<>?", (topic_id, topic_id)


def get_replies(ctx: Ctx, req):
    channel_id = readable_channel(ctx, req.peer)
    channel = ctx.state.channel(channel_id)
    if channel["forum"]:
        topic = ctx.state.one("SELECT id FROM topics WHERE channel_id=? AND id=?", channel_id, req.msg_id)
        if topic is None and req.msg_id != GENERAL_TOPIC_ID:
            raise bad_request("TOPIC_ID_INVALID")
        where, args = _topic_where(ctx, channel_id, req.msg_id)
    else:
        if ctx.state.message(channel_id, req.msg_id) is None:
            raise bad_request("MSG_ID_INVALID")
        where, args = "AND reply_to_id=?", (req.msg_id,)
    return _slice(ctx, channel_id, where, args, req)


def search(ctx: Ctx, req):
    channel_id = readable_channel(ctx, req.peer)
    where, args = "", ()
    if isinstance(req.filter, types.InputMessagesFilterDocument):
        where = "AND document_id IS NOT NULL"
    elif isinstance(req.filter, (types.InputMessagesFilterPhotos, types.InputMessagesFilterPhotoVideo)):
        where = "AND photo_id IS NOT NULL"
    elif not isinstance(req.filter, types.InputMessagesFilterEmpty):
        raise bad_request("FILTER_NOT_SUPPORTED")
    if req.q:
        where += " AND instr(lower(text), lower(?)) > 0"
        args += (req.q,)
    if req.top_msg_id:
        extra, extra_args = _topic_where(ctx, channel_id, req.top_msg_id)
        where += " " + extra
        args += extra_args
    return _slice(ctx, channel_id, where, args, req)


def get_forum_topics(ctx: Ctx, req):
    channel_id = readable_channel(ctx, req.peer)
    channel = ctx.state.channel(channel_id)
    if not channel["forum"]:
        raise bad_request("CHANNEL_FORUM_MISSING")
    rows = [dict(r) for r in ctx.state.all(
        "SELECT * FROM topics WHERE channel_id=? ORDER BY id DESC", channel_id)]
    rows.append({"id": GENERAL_TOPIC_ID, "title": "General", "created": channel["created"],
                 "creator_id": None})
    if req.q:
        rows = [r for r in rows if req.q.lower() in r["title"].lower()]
    if req.offset_topic:
        rows = [r for r in rows if r["id"] < req.offset_topic]
    total = len(rows)
    rows = rows[: min(req.limit or PAGE_LIMIT, PAGE_LIMIT)]
    topics, messages = [], []
    for r in rows:
        where, args = _topic_where(ctx, channel_id, r["id"])
        top = ctx.state.one(
            f"SELECT MAX(id) FROM messages WHERE channel_id=? AND deleted=0 {where}", channel_id, *args
        )[0] or r["id"]
        creator = r["creator_id"] or ctx.me()
        ctx.seen_users.add(creator)
        topics.append(types.ForumTopic(
            id=r["id"], date=tl_date(r["created"]), peer=types.PeerChannel(channel_id),
            title=r["title"], icon_color=TOPIC_ICON_COLOR, top_message=top,
            read_inbox_max_id=top, read_outbox_max_id=top, unread_count=0,
            unread_mentions_count=0, unread_reactions_count=0, unread_poll_votes_count=0,
            from_id=types.PeerUser(creator), notify_settings=types.PeerNotifySettings(),
        ))
        row = ctx.state.message(channel_id, top)
        if row is not None:
            messages.append(tl_message(ctx, channel_id, row))
    return types.messages.ForumTopics(
        count=total, topics=topics, messages=messages, chats=ctx.chats(), users=ctx.users(),
        pts=channel["pts"],
    )


def get_messages(ctx: Ctx, req):
    channel_id = readable_channel(ctx, req.channel)
    if not req.id:
        raise bad_request("MESSAGE_IDS_EMPTY")
    if len(req.id) > PAGE_LIMIT:
        raise bad_request("LIMIT_INVALID")
    out = []
    for item in req.id:
        msg_id = item.id if isinstance(item, types.InputMessageID) else 0
        row = ctx.state.message(channel_id, msg_id)
        out.append(tl_message(ctx, channel_id, row) if row is not None
                   else types.MessageEmpty(id=msg_id, peer_id=types.PeerChannel(channel_id)))
    count = ctx.state.one("SELECT COUNT(*) FROM messages WHERE channel_id=? AND deleted=0", channel_id)[0]
    return _channel_messages(ctx, channel_id, out, count)


def delete_messages(ctx: Ctx, req):
    me = ctx.me()
    channel_id = readable_channel(ctx, req.channel)
    if not req.id:
        raise bad_request("MESSAGE_IDS_EMPTY")
    if len(req.id) > PAGE_LIMIT:
        raise bad_request("LIMIT_INVALID")
    admin = ctx.state.member(channel_id, me)["admin"]
    live = []
    for msg_id in req.id:
        row = ctx.state.message(channel_id, msg_id)
        if row is None or row["deleted"]:
            continue
        if not admin and row["sender_id"] != me:
            raise SimRpcError(403, "MESSAGE_DELETE_FORBIDDEN")
        live.append(msg_id)
    pts = ctx.world.delete_live_messages(channel_id, live)
    return types.messages.AffectedMessages(pts=pts, pts_count=len(live))


# -- sending ---------------------------------------------------------------------------

def _reply_target(ctx: Ctx, channel_id: int, reply_to) -> tuple[int | None, int | None]:
    """InputReplyTo -> (topic_id, reply_to_id) as stored."""
    forum = bool(ctx.state.channel(channel_id)["forum"])
    if not isinstance(reply_to, types.InputReplyToMessage):
        return (GENERAL_TOPIC_ID if forum else None), None
    target = reply_to.reply_to_msg_id
    if forum:
        top = reply_to.top_msg_id
        if top is None and ctx.state.one(
                "SELECT 1 FROM topics WHERE channel_id=? AND id=?", channel_id, target):
            return target, None
        row = ctx.state.message(channel_id, target)
        if row is None or row["deleted"]:
            raise bad_request("REPLY_TO_INVALID" if top is None else "TOPIC_ID_INVALID")
        return top or row["topic_id"] or GENERAL_TOPIC_ID, target
    row = ctx.state.message(channel_id, target)
    if row is None or row["deleted"]:
        raise bad_request("REPLY_TO_INVALID")
    return None, target


def sent_updates(ctx: Ctx, channel_id: int, msg_id: int, random_id: int | None):
    row = ctx.state.message(channel_id, msg_id)
    pts = ctx.state.channel(channel_id)["pts"]
    updates = []
    if random_id is not None:
        updates.append(types.UpdateMessageID(id=msg_id, random_id=random_id))
    updates.append(types.UpdateNewChannelMessage(tl_message(ctx, channel_id, row), pts=pts, pts_count=1))
    return types.Updates(updates=updates, users=ctx.users(), chats=ctx.chats(),
                         date=tl_date(ctx.now), seq=0)


def _deduplicated(ctx: Ctx, random_id: int | None):
    if random_id is None:
        return None
    row = ctx.state.one("SELECT channel_id, message_id FROM random_ids WHERE user_id=? AND random_id=?",
                        ctx.me(), random_id)
    if row is None:
        return None
    msg = ctx.state.message(row[0], row[1])
    if msg is None or msg["deleted"]:
        return None  # the message is gone: a repeat creates it again
    ctx.seen_channels.add(row[0])
    return sent_updates(ctx, row[0], row[1], random_id)


def _remember(ctx: Ctx, random_id, channel_id: int, msg_id: int) -> None:
    if random_id is not None:
        ctx.state.run("INSERT OR REPLACE INTO random_ids VALUES(?,?,?,?)",
                      ctx.me(), random_id, channel_id, msg_id)


def send_message(ctx: Ctx, req):
    channel_id = writable_channel(ctx, req.peer)
    existing = _deduplicated(ctx, req.random_id)
    if existing is not None:
        return existing
    if not req.message:
        raise bad_request("MESSAGE_EMPTY")
    topic_id, reply_to_id = _reply_target(ctx, channel_id, req.reply_to)
    msg_id = ctx.state.insert_message(channel_id, date=ctx.now, sender_id=ctx.me(), text=req.message,
                                      topic_id=topic_id, reply_to_id=reply_to_id)
    _remember(ctx, req.random_id, channel_id, msg_id)
    return sent_updates(ctx, channel_id, msg_id, req.random_id)


def send_media(ctx: Ctx, req):
    from .handlers_upload import document_from_media
    channel_id = writable_channel(ctx, req.peer)
    existing = _deduplicated(ctx, req.random_id)
    if existing is not None:
        return existing
    topic_id, reply_to_id = _reply_target(ctx, channel_id, req.reply_to)
    doc_id = document_from_media(ctx, req.media)
    msg_id = ctx.state.insert_message(channel_id, date=ctx.now, sender_id=ctx.me(), text=req.message or "",
                                      topic_id=topic_id, reply_to_id=reply_to_id, document_id=doc_id)
    _remember(ctx, req.random_id, channel_id, msg_id)
    return sent_updates(ctx, channel_id, msg_id, req.random_id)


HANDLERS = {
    functions.contacts.ResolveUsernameRequest: resolve_username,
    functions.channels.GetChannelsRequest: get_channels,
    functions.channels.GetFullChannelRequest: get_full_channel,
    functions.messages.GetDialogsRequest: get_dialogs,
    functions.messages.GetHistoryRequest: get_history,
    functions.messages.GetRepliesRequest: get_replies,
    functions.messages.SearchRequest: search,
    functions.messages.GetForumTopicsRequest: get_forum_topics,
    functions.channels.GetMessagesRequest: get_messages,
    functions.channels.DeleteMessagesRequest: delete_messages,
    functions.messages.SendMessageRequest: send_message,
    functions.messages.SendMediaRequest: send_media,
}

__all__ = ["HANDLERS", "tl_user", "tl_channel"]
