"""Seed a simulated Telegram with the accounts and channels the demo and tests use.

Accounts: alice (regular), bob (Premium), carol (regular), each with a Telethon
session file (mode 0600) in the sessions directory, plus a "publisher" account
without a session that posts into the source channels.  Channels:

- "Sim Source A" (@sim_source_a): one archive of every naming scheme (zip with a
  cover image inside, posted in an album after a photo, .zip.001/.002, .z01+.zip,
  .partN.rar, .rar+.rNN, .7z.001/.002), a text document, deleted posts (holes:
  short pages); alice, bob.
- "Sim Source B" (@sim_source_b): a forward of A's "shared-ebooks.zip" (same
  document id), a photo message, a zip in an album after a photo (its preview), a
  7z, an encrypted zip, a corrupt zip, an incomplete .zip.00N set, texts and a
  deleted post; bob, carol.
- "Sim Forum" (@sim_forum): forum with topics "Games" and "Software" (a
  re-upload of "shared-ebooks.zip": same bytes, new document; a RAR with
  encrypted headers); everyone.
- "Stash Archive" (@stash_archive): the destination; all three are admins.

What each archive set should become is ``samples.expected_sets()``.
Seeding is idempotent: existing users, channels, topics and posts (by file
name, photo label or text) are kept, and only missing session files are written.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loguru import logger

from actors.telegram.sim import samples


@dataclass(frozen=True)
class SeedUser:
    username: str
    first_name: str
    phone: str | None
    premium: bool
    session: bool = True


ALICE = SeedUser("alice", "Alice", "+15550000001", False)
BOB = SeedUser("bob", "Bob", "+15550000002", True)
CAROL = SeedUser("carol", "Carol", "+15550000003", False)
PUBLISHER = SeedUser("sim_publisher", "Publisher", None, False, session=False)
USERS = (ALICE, BOB, CAROL, PUBLISHER)

SOURCE_A = "sim_source_a"
SOURCE_B = "sim_source_b"
FORUM = "sim_forum"
DESTINATION = "stash_archive"


def seed_world(world_or_control: Any, sessions_dir: str | Path, *, size_scale: float = 1.0) -> dict:
    """Create the demo world; returns a JSON-able summary.

    ``world_or_control`` is a ``SimWorld`` or a ``SimControl`` of a running
    server (the server then seeds its own world, writing the session files
    into ``sessions_dir``, which must be reachable from the server).
    """
    sessions_dir = Path(sessions_dir)
    if hasattr(world_or_control, "call") and not hasattr(world_or_control, "handle_bytes"):
        return world_or_control.seed(sessions_dir, size_scale=size_scale)
    return _Seeder(world_or_control, sessions_dir, size_scale).run()


class _Seeder:
    def __init__(self, world: Any, sessions_dir: Path, scale: float):
        self.world = world
        self.sessions_dir = sessions_dir
        self.scale = scale
        self.snapshot = world.inspect()
        self.created = {"users": 0, "channels": 0, "topics": 0, "messages": 0, "sessions": 0}

    def run(self) -> dict:
        self.sessions_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        ids = {user.username: self.user(user) for user in USERS}
        alice, bob, carol, pub = (ids[u.username] for u in USERS)
        a = self.channel("Sim Source A", SOURCE_A, members=[alice, bob], admins=[pub])
        b = self.channel("Sim Source B", SOURCE_B, members=[bob, carol], admins=[pub])
        forum = self.channel("Sim Forum", FORUM, forum=True, members=[alice, bob, carol], admins=[pub])
        dest = self.channel("Stash Archive", DESTINATION, members=[], admins=[alice, bob, carol])
        channels = {SOURCE_A: a, SOURCE_B: b, FORUM: forum}
        topics = {title: self.topic(forum, title) for title in samples.forum_topic_titles()}
        for username, posts in samples.channel_posts(self.scale).items():
            for post in posts:
                self.post(channels[username], pub, post, topics.get(post.topic), channels)
        summary = {
            "sessions_dir": str(self.sessions_dir.resolve()),
            "accounts": [{"name": u.username, "user_id": ids[u.username], "premium": u.premium,
                          "session": str(self._session_path(u)) if u.session else None}
                         for u in USERS],
            "channels": {"source_a": a, "source_b": b, "forum": forum, "destination": dest},
            "created": dict(self.created),
        }
        logger.bind(actor="sim").info("seeded simulated Telegram: {}", self.created)
        return summary

    # -- users ---------------------------------------------------------------

    def _session_path(self, user: SeedUser) -> Path:
        return (self.sessions_dir / f"{user.username}.session").resolve()

    def _find(self, kind: str, **match: Any) -> dict | None:
        for record in self.snapshot.get(kind, []):
            if all(_norm(_value(record, k)) == _norm(v) for k, v in match.items()):
                return record
        return None

    def user(self, user: SeedUser) -> int:
        existing = self._find("users", username=user.username)
        session_path = self._session_path(user)
        if existing is None:
            created = self.world.create_user(user.first_name, username=user.username,
                                             phone=user.phone, premium=user.premium)
            self.created["users"] += 1
            user_id, auth_key = created.user_id, created.auth_key
        else:
            user_id = int(existing.get("user_id", existing.get("id")))
            auth_key = None
        if user.session and not session_path.exists():
            if auth_key is None:
                new_key = getattr(self.world, "new_auth_key", None) or self.world.add_auth_key
                auth_key = new_key(user_id)
            self._write_session(session_path, auth_key)
        return user_id

    def _write_session(self, path: Path, auth_key: bytes) -> None:
        from actors.telegram.sim.world import write_session_file

        world = self.world
        write_session_file(path, auth_key, dc_id=getattr(world, "dc_id", 2),
                           host=getattr(world, "host", "127.0.0.1"), port=getattr(world, "port", 443))
        path.chmod(0o600)
        self.created["sessions"] += 1

    # -- channels, topics, posts ----------------------------------------------

    def channel(self, title: str, username: str, *, forum: bool = False,
                members: list[int], admins: list[int]) -> int:
        existing = self._find("channels", username=username)
        if existing is not None:
            return int(existing.get("channel_id", existing.get("id")))
        self.created["channels"] += 1
        return int(self.world.create_channel(title, username=username, forum=forum,
                                             members=members, admins=admins))

    def topic(self, channel_id: int, title: str) -> int:
        existing = self._find("topics", channel_id=channel_id, title=title)
        if existing is not None:
            return int(existing.get("topic_id", existing.get("id")))
        self.created["topics"] += 1
        return int(self.world.create_topic(channel_id, title))

    def _posted(self, channel_id: int, **match: Any) -> bool:
        return self._find("messages", channel_id=channel_id, **match) is not None

    def document(self, channel_id: int, sender_id: int, sample: samples.Sample, *,
                 topic_id: int | None = None, grouped_id: int | None = None) -> None:
        if self._posted(channel_id, file_name=sample.file_name):
            return
        self.created["messages"] += 1
        extra = {"grouped_id": grouped_id} if grouped_id is not None else {}
        self.world.post_document(channel_id, sender_id, sample.file_name, sample.data,
                                 caption=sample.caption, topic_id=topic_id, mime_type=sample.mime_type,
                                 **extra)

    def photo(self, channel_id: int, sender_id: int, sample: samples.Sample, *,
              topic_id: int | None = None, grouped_id: int | None = None) -> None:
        """A photo message (MessageMediaPhoto); the sample's file name labels it."""
        if self._posted(channel_id, photo_label=sample.file_name):
            return
        self.created["messages"] += 1
        self.world.post_photo(channel_id, sender_id, sample.data, caption=sample.caption,
                              topic_id=topic_id, grouped_id=grouped_id, label=sample.file_name)

    def text(self, channel_id: int, sender_id: int, text: str, *, topic_id: int | None = None) -> int | None:
        if self._posted(channel_id, text=text):
            return None
        self.created["messages"] += 1
        return self.world.post_text(channel_id, sender_id, text, topic_id=topic_id)

    def post(self, channel_id: int, sender_id: int, post: samples.Post, topic_id: int | None,
             channels: dict[str, int]) -> None:
        grouped_id = None
        if post.album is not None:
            username = next(name for name, cid in channels.items() if cid == channel_id)
            grouped_id = samples.album_grouped_id(username, post.album)
        if post.kind == "document":
            self.document(channel_id, sender_id, post.sample, topic_id=topic_id, grouped_id=grouped_id)
        elif post.kind == "photo":
            self.photo(channel_id, sender_id, post.sample, topic_id=topic_id, grouped_id=grouped_id)
        elif post.kind == "text":
            self.text(channel_id, sender_id, post.text, topic_id=topic_id)
        elif post.kind == "deleted":
            msg_id = self.text(channel_id, sender_id, post.text, topic_id=topic_id)
            if msg_id is not None:
                self.world.delete_messages(channel_id, [msg_id])
        elif post.kind == "forward":
            self.forward(channel_id, sender_id, channels[post.forward_of], post.sample, topic_id=topic_id)
        else:
            raise ValueError(f"unknown post kind {post.kind!r}")

    def forward(self, channel_id: int, sender_id: int, from_channel_id: int, sample: samples.Sample, *,
                topic_id: int | None = None) -> None:
        """Post the document ``sample`` has in ``from_channel_id`` again: the same document id."""
        if self._posted(channel_id, file_name=sample.file_name):
            return
        self.snapshot = self.world.inspect()  # the original may have been posted in this run
        original = self._find("messages", channel_id=from_channel_id, file_name=sample.file_name)
        if original is None:
            raise LookupError(f"nothing to forward: {sample.file_name} is not in channel {from_channel_id}")
        self.created["messages"] += 1
        repost_document(self.world, channel_id, sender_id, int(original["document"]["id"]),
                        caption=original.get("text") or "", topic_id=topic_id)


def _value(record: dict, key: str) -> Any:
    """A field of an ``inspect()`` record; ``file_name`` also looks into ``document``,
    ``photo_label`` into ``photo``."""
    if key == "file_name" and "file_name" not in record:
        return (record.get("document") or {}).get("file_name")
    if key == "photo_label":
        return (record.get("photo") or {}).get("label")
    return record.get(key)


def _norm(value: Any) -> Any:
    return value.lower() if isinstance(value, str) else value


def repost_document(world: Any, channel_id: int, sender_id: int | None, document_id: int, *,
                    caption: str = "", topic_id: int | None = None) -> int:
    """A new message in ``channel_id`` carrying an existing document (what a forward is
    to a reader: another message, the same document id). Uses the world's own
    ``post_existing_document`` when it has one, else its state directly."""
    method = getattr(world, "post_existing_document", None)
    if method is not None:
        return int(method(channel_id, sender_id, document_id, caption=caption, topic_id=topic_id))
    with world._lock, world._state.transaction():
        world._check_post(channel_id, topic_id)
        if world._state.document(document_id) is None:
            raise LookupError(f"no document {document_id}")
        return world._state.insert_message(channel_id, date=world.clock(), sender_id=sender_id,
                                           text=caption, topic_id=topic_id, document_id=document_id)
