"""Pony entities, mapped onto the tables that storage.migrations creates.

Entities are defined inside ``define_entities(db)`` so every ``Database`` (every
Storage, every test) gets its own classes. They never leave a ``db_session``:
the repository converts them to the frozen records in storage.records.

Adding a table (transfers, parts, claims...): append a numbered migration to
storage.migrations.MIGRATIONS that creates it, map an entity onto it here
(``_table_``, ``column=`` where names differ; ``int`` ids with ``size=64``), and
put its queries in a small repository module that uses ``run_in_session``.
``generate_mapping(check_tables=True)`` fails loudly if the two disagree.
"""
from __future__ import annotations

from types import SimpleNamespace

from pony.orm import Database, Optional, PrimaryKey, Required, Set


def define_entities(db: Database) -> SimpleNamespace:
    class Account(db.Entity):
        _table_ = "accounts"
        name = PrimaryKey(str)
        user_id = Optional(int, size=64)
        phone_redacted = Optional(str, nullable=True)
        premium = Optional(bool)
        upload_limit_bytes = Optional(int, size=64)
        state = Required(str)
        cooldown_until = Optional(float)
        updated_at = Required(float)

    class FloodWait(db.Entity):
        _table_ = "flood_waits"
        account = Required(str)
        request_kind = Required(str)
        until = Required(float)
        PrimaryKey(account, request_kind)

    class Channel(db.Entity):
        _table_ = "channels"
        channel_id = PrimaryKey(int, size=64, auto=False)
        title = Optional(str)  # NOT NULL; an empty title is stored as ""
        username = Optional(str, nullable=True)
        is_forum = Required(bool)
        updated_at = Required(float)
        seen_by = Set("ChannelSeenBy")

    class ChannelSeenBy(db.Entity):
        _table_ = "channel_seen_by"
        channel = Required(Channel, column="channel_id")
        account = Required(str)
        PrimaryKey(channel, account)

    return SimpleNamespace(
        Account=Account, FloodWait=FloodWait, Channel=Channel, ChannelSeenBy=ChannelSeenBy
    )
