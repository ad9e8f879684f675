"""Build Telethon TL objects from world rows, as seen by one viewing account."""

from __future__ import annotations

import datetime
import json
from dataclasses import dataclass, field

from telethon.tl import types

from .errors import SimRpcError, bad_request, unauthorized

TOPIC_ICON_COLOR = 0x6FB9F0
GENERAL_TOPIC_ID = 1


def tl_date(ts: float) -> datetime.datetime:
    return datetime.datetime.fromtimestamp(int(ts), tz=datetime.timezone.utc)


@dataclass
class Ctx:
    """One request being handled: the world state, the caller and the time."""

    world: object
    state: object
    auth_key_id: int
    user_id: int | None
    now: float
    seen_users: set = field(default_factory=set)
    seen_channels: set = field(default_factory=set)

    def me(self) -> int:
        if self.user_id is None:
            raise unauthorized()
        return self.user_id

    def user_row(self):
        return self.state.user(self.me())

    # -- entity lists carried by every result -------------------------------
    def users(self) -> list:
        out = []
        for uid in sorted(self.seen_users | ({self.user_id} if self.user_id else set())):
            row = self.state.user(uid)
            if row is not None:
                out.append(tl_user(self, row))
        return out

    def chats(self) -> list:
        return [tl_channel(self, self.state.channel(cid)) for cid in sorted(self.seen_channels)]


def tl_user(ctx: Ctx, row) -> types.User:
    is_self = row["id"] == ctx.user_id
    return types.User(
        id=row["id"],
        is_self=is_self,
        contact=False,
        premium=bool(row["premium"]),
        access_hash=ctx.state.hash_for(ctx.user_id or 0, "user", row["id"]),
        first_name=row["first_name"],
        username=row["username"],
        phone=(row["phone"] or "").lstrip("+") or None if is_self else None,
        status=types.UserStatusRecently() if not is_self else None,
    )


def tl_channel(ctx: Ctx, row) -> types.Channel:
    viewer = ctx.user_id or 0
    member = ctx.state.member(row["id"], viewer) if viewer else None
    forum = bool(row["forum"])
    admin = bool(member and member["admin"])
    rights = None
    if admin:
        rights = types.ChatAdminRights(
            change_info=True, post_messages=True, edit_messages=True, delete_messages=True,
            invite_users=True, pin_messages=True, manage_topics=True if forum else None,
        )
    return types.Channel(
        id=row["id"],
        title=row["title"],
        photo=types.ChatPhotoEmpty(),
        date=tl_date(row["created"]),
        broadcast=not forum,
        megagroup=forum,
        forum=forum,
        left=member is None,
        access_hash=ctx.state.hash_for(viewer, "channel", row["id"]),
        username=row["username"],
        admin_rights=rights,
    )


def tl_document(ctx: Ctx, doc) -> types.Document:
    return types.Document(
        id=doc["id"],
        access_hash=ctx.state.hash_for(0, "document", doc["id"]),
        file_reference=b"sim",
        date=tl_date(doc["date"]),
        mime_type=doc["mime_type"],
        size=doc["size"],
        dc_id=ctx.world.dc_id,
        attributes=[types.DocumentAttributeFilename(doc["file_name"])],
    )


def tl_photo(ctx: Ctx, photo_id: int) -> types.Photo:
    """A Photo with one PhotoSize per stored rendition, smallest first (as Telegram sends them)."""
    row = ctx.state.photo(photo_id)
    sizes = [types.PhotoSize(type=s["type"], w=s["w"], h=s["h"], size=s["size"])
             for s in ctx.state.photo_sizes(photo_id)]
    return types.Photo(
        id=photo_id,
        access_hash=ctx.state.hash_for(0, "photo", photo_id),
        file_reference=b"sim",
        date=tl_date(row["date"]),
        sizes=sizes,
        dc_id=ctx.world.dc_id,
    )


def tl_message(ctx: Ctx, channel_id: int, row):
    """A message row (or None) -> Message / MessageService / MessageEmpty."""
    peer = types.PeerChannel(channel_id)
    ctx.seen_channels.add(channel_id)
    if row is None or row["deleted"]:
        return types.MessageEmpty(id=row["id"] if row is not None else 0, peer_id=peer)
    channel = ctx.state.channel(channel_id)
    forum = bool(channel["forum"])
    sender = row["sender_id"]
    from_id = types.PeerUser(sender) if sender else None
    if sender:
        ctx.seen_users.add(sender)
    reply_to = None
    if forum and row["topic_id"] and row["topic_id"] != GENERAL_TOPIC_ID:
        reply_to = types.MessageReplyHeader(
            forum_topic=True,
            reply_to_msg_id=row["reply_to_id"] or row["topic_id"],
            reply_to_top_id=row["topic_id"] if row["reply_to_id"] else None,
        )
    elif row["reply_to_id"]:
        reply_to = types.MessageReplyHeader(reply_to_msg_id=row["reply_to_id"])
    common = dict(
        id=row["id"], peer_id=peer, date=tl_date(row["date"]), out=bool(sender and sender == ctx.user_id),
        post=not forum, from_id=from_id, reply_to=reply_to,
    )
    if row["action"]:
        action = json.loads(row["action"])
        if action["kind"] == "topic_create":
            tl_action = types.MessageActionTopicCreate(title=action["title"], icon_color=TOPIC_ICON_COLOR)
            common["reply_to"] = None
        else:
            tl_action = types.MessageActionChannelCreate(title=action["title"])
        return types.MessageService(action=tl_action, **common)
    media = None
    if row["document_id"]:
        doc = ctx.state.document(row["document_id"])
        media = types.MessageMediaDocument(document=tl_document(ctx, doc))
    elif row["photo_id"]:
        media = types.MessageMediaPhoto(photo=tl_photo(ctx, row["photo_id"]))
    return types.Message(message=row["text"] or "", media=media, grouped_id=row["grouped_id"], **common)


# -- resolving input peers ------------------------------------------------------------

def channel_id_of(ctx: Ctx, peer) -> int:
    """InputPeerChannel / InputChannel -> channel id, checking the access hash."""
    if isinstance(peer, (types.InputPeerChannel, types.InputChannel)):
        row = ctx.state.channel(peer.channel_id)
        if row is None or peer.access_hash != ctx.state.hash_for(ctx.me(), "channel", peer.channel_id):
            raise bad_request("CHANNEL_INVALID")
        return peer.channel_id
    if isinstance(peer, (types.InputPeerEmpty, types.InputChannelEmpty)):
        raise bad_request("CHANNEL_INVALID")
    raise bad_request("PEER_ID_INVALID")


def readable_channel(ctx: Ctx, peer) -> int:
    channel_id = channel_id_of(ctx, peer)
    if ctx.state.member(channel_id, ctx.me()) is None:
        raise bad_request("CHANNEL_PRIVATE")
    ctx.seen_channels.add(channel_id)
    return channel_id


def writable_channel(ctx: Ctx, peer) -> int:
    channel_id = readable_channel(ctx, peer)
    member = ctx.state.member(channel_id, ctx.me())
    channel = ctx.state.channel(channel_id)
    if not channel["forum"] and not member["admin"]:
        raise SimRpcError(403, "CHAT_WRITE_FORBIDDEN")
    return channel_id
