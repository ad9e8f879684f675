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

    # -- migration 3: durable transfers (queries in storage.transfers) --------

    class Transfer(db.Entity):
        _table_ = "transfers"
        id = PrimaryKey(str)
        state = Required(str)
        source_path = Required(str)
        size = Required(int, size=64)
        sha256 = Required(str)
        destination = Required(str)
        manifest_path = Required(str)
        delete_original = Required(bool)
        account = Optional(str, nullable=True)
        reason = Optional(str, nullable=True)
        attempts = Required(int)
        created_at = Required(float)
        updated_at = Required(float)
        next_check_at = Optional(float)
        last_check_at = Optional(float)
        lease_owner = Optional(str, nullable=True)
        lease_until = Optional(float)
        duplicate_of = Optional(str, nullable=True)  # a transfers.id (FK in SQL)
        parts = Set("TransferPart")

    class TransferPart(db.Entity):
        _table_ = "transfer_parts"
        transfer = Required(Transfer, column="transfer_id")
        part_index = Required(int)
        offset = Required(int, size=64, column="byte_offset")
        length = Required(int, size=64)
        sha256 = Required(str)
        file_name = Required(str)
        random_id = Required(int, size=64)
        message_id = Optional(int, size=64)
        document_id = Optional(int, size=64)
        account = Optional(str, nullable=True)
        sent_at = Optional(float)
        verified_at = Optional(float)
        misses = Required(int)
        PrimaryKey(transfer, part_index)

    class PartJournal(db.Entity):
        _table_ = "part_journal"
        transfer_id = Required(str)
        part_index = Required(int)
        chunk_index = Required(int)
        account = Required(str)
        acked_at = Required(float)
        PrimaryKey(transfer_id, part_index, chunk_index)

    class ContentClaim(db.Entity):
        _table_ = "content_claims"
        sha256 = PrimaryKey(str)
        owner = Required(str)
        lease_until = Required(float)
        transfer_id = Optional(str, nullable=True)
        claimed_at = Required(float)

    class Package(db.Entity):
        _table_ = "packages"
        sha256 = PrimaryKey(str)
        transfer_id = Required(str)
        destination = Required(str)
        created_at = Required(float)

    # -- migration 4: ingest from source channels (queries in storage.ingest) --

    class IngestCursor(db.Entity):
        _table_ = "ingest_cursors"
        account = Required(str)
        channel_id = Required(int, size=64)
        topic_id = Required(int, size=64)  # 0: the whole channel
        last_message_id = Required(int, size=64)
        last_scan_at = Optional(float)
        stalled = Required(bool)
        stalled_reason = Optional(str, nullable=True)
        updated_at = Required(float)
        PrimaryKey(account, channel_id, topic_id)

    class ArchiveSet(db.Entity):
        _table_ = "archive_sets"
        set_key = PrimaryKey(str)
        channel_id = Required(int, size=64)
        topic_id = Required(int, size=64)
        base_name = Required(str)
        archive_format = Required(str)
        scheme = Required(str)
        state = Required(str)
        expected_parts = Optional(int)
        seen_parts = Required(int)
        complete = Required(bool)
        total_size = Required(int, size=64)
        sha256 = Optional(str, nullable=True)
        transfer_id = Optional(str, nullable=True)
        reason = Optional(str, nullable=True)
        lease_owner = Optional(str, nullable=True)
        lease_until = Optional(float)
        created_at = Required(float)
        updated_at = Required(float)
        attempts = Required(int, default=0)           # migration 5: failed tries of this set
        next_attempt_at = Optional(float)             # not claimed again before this (backoff)
        last_error = Optional(str, nullable=True)

    class SourceMessage(db.Entity):
        _table_ = "source_messages"
        channel_id = Required(int, size=64)
        message_id = Required(int, size=64)
        topic_id = Required(int, size=64)
        account = Required(str)
        document_id = Optional(int, size=64)
        file_name = Optional(str)  # NOT NULL; "" when the document has no name
        size = Required(int, size=64)
        posted_at = Optional(float)
        set_key = Optional(str, nullable=True)
        part_number = Optional(int)
        status = Required(str)
        reason = Optional(str, nullable=True)
        transfer_id = Optional(str, nullable=True)
        run_id = Optional(str, nullable=True)
        created_at = Required(float)
        updated_at = Required(float)
        PrimaryKey(channel_id, message_id)

    class IngestedDocument(db.Entity):
        _table_ = "ingested_documents"
        document_id = PrimaryKey(int, size=64, auto=False)
        channel_id = Required(int, size=64)
        message_id = Required(int, size=64)
        set_key = Optional(str, nullable=True)
        transfer_id = Optional(str, nullable=True)
        created_at = Required(float)

    class IngestSkip(db.Entity):
        _table_ = "ingest_skips"
        channel_id = Required(int, size=64)
        message_id = Required(int, size=64)
        reason = Required(str)
        detail = Optional(str, nullable=True)
        set_key = Optional(str, nullable=True)
        run_id = Optional(str, nullable=True)
        account = Optional(str, nullable=True)
        created_at = Required(float)
        PrimaryKey(channel_id, message_id)

    class IngestRun(db.Entity):
        _table_ = "ingest_runs"
        id = PrimaryKey(str)
        mapping = Required(str)
        channel_id = Required(int, size=64)
        topic_id = Required(int, size=64)
        account = Required(str)
        owner = Optional(str, nullable=True)
        state = Required(str)
        started_at = Required(float)
        finished_at = Optional(float)
        updated_at = Required(float)
        seen = Required(int)
        ingested = Required(int)
        skipped = Required(int)
        skipped_by_reason = Required(str)  # JSON object reason -> count
        bytes_downloaded = Required(int, size=64)
        progress = Optional(str, nullable=True)
        error = Optional(str, nullable=True)

    class DownloadChunk(db.Entity):
        _table_ = "download_journal"
        path = Required(str)
        chunk_index = Required(int)
        done_at = Required(float)
        PrimaryKey(path, chunk_index)

    class PackageMeta(db.Entity):
        _table_ = "package_meta"
        sha256 = PrimaryKey(str)
        transfer_id = Required(str)
        archive_format = Optional(str, nullable=True)
        index_state = Required(str)
        index_reason = Optional(str, nullable=True)
        entry_count = Required(int)
        preview = Optional(bytes, nullable=True)
        preview_path = Optional(str, nullable=True)
        preview_name = Optional(str, nullable=True)
        creator = Optional(str, nullable=True)
        tags = Optional(str)  # NOT NULL; JSON list
        source_channel_id = Optional(int, size=64)
        source_topic_id = Optional(int, size=64)
        source_message_id = Optional(int, size=64)
        attempts = Required(int)
        lease_owner = Optional(str, nullable=True)
        lease_until = Optional(float)
        indexed_at = Optional(float)
        created_at = Required(float)
        updated_at = Required(float)

    class PackageEntry(db.Entity):
        _table_ = "package_entries"
        sha256 = Required(str)
        entry_index = Required(int)
        path = Required(str)
        size = Required(int, size=64)
        crc = Optional(int, size=64)
        is_dir = Required(bool)
        PrimaryKey(sha256, entry_index)

    return SimpleNamespace(
        Account=Account, FloodWait=FloodWait, Channel=Channel, ChannelSeenBy=ChannelSeenBy,
        Transfer=Transfer, TransferPart=TransferPart, PartJournal=PartJournal,
        ContentClaim=ContentClaim, Package=Package,
        IngestCursor=IngestCursor, ArchiveSet=ArchiveSet, SourceMessage=SourceMessage,
        IngestedDocument=IngestedDocument, IngestSkip=IngestSkip, IngestRun=IngestRun,
        DownloadChunk=DownloadChunk, PackageMeta=PackageMeta, PackageEntry=PackageEntry,
    )
