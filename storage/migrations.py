"""Numbered schema migrations, portable between SQLite and PostgreSQL.

``MIGRATIONS[n - 1]`` takes a database from version ``n - 1`` to ``n``. A step is
either a SQL string (portable types only: BIGINT, INTEGER, TEXT, BOOLEAN,
DOUBLE PRECISION) or a callable ``step(conn: MigrationConnection)`` for anything
that needs to differ per dialect. Migrations are append-only: never edit a
released one, add the next number.

The version lives in the single-row table ``schema_version``. Migrating takes a
lock first (SQLite: ``BEGIN IMMEDIATE``; PostgreSQL: ``pg_advisory_xact_lock``
inside the migration transaction), then re-reads the version, so two processes
opening the same fresh database never both migrate. Both engines have
transactional DDL: a failed migration leaves the database as it was.
"""
from __future__ import annotations

import time
from typing import Callable, Sequence, Union

from loguru import logger

from storage.errors import SchemaVersionError, StorageError
from storage.url import SQLITE_BUSY_TIMEOUT_MS

# Any constant works; it only has to be the same for every stashd process.
PG_MIGRATION_LOCK_KEY = 0x57A5_4D00_0001


class MigrationConnection:
    """A raw DB-API connection in autocommit mode plus its dialect name."""

    def __init__(self, raw, dialect: str):
        if dialect not in ("sqlite", "postgres"):
            raise ValueError(f"unknown dialect {dialect!r}")
        self.raw = raw
        self.dialect = dialect

    def execute(self, sql: str, params: Sequence = ()):
        """Run one statement; ``?`` placeholders work on both dialects."""
        if self.dialect == "postgres":
            sql = sql.replace("?", "%s")
        cur = self.raw.cursor()
        cur.execute(sql, tuple(params))
        return cur

    def table_exists(self, name: str) -> bool:
        if self.dialect == "sqlite":
            row = self.execute(
                "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (name,)
            ).fetchone()
            return row is not None
        # A plain MVCC read of the catalog: to_regclass() may answer from a
        # stale cache after waiting on the migration lock.
        row = self.execute(
            "SELECT 1 FROM pg_catalog.pg_tables "
            "WHERE schemaname = current_schema() AND tablename = ?", (name,)
        ).fetchone()
        return row is not None


Step = Union[str, Callable[[MigrationConnection], None]]


def _create_package_meta(conn: MigrationConnection) -> None:
    """Migration 4: per-package metadata; the preview is BLOB / BYTEA."""
    blob = "BYTEA" if conn.dialect == "postgres" else "BLOB"
    conn.execute(f"""CREATE TABLE package_meta (
            sha256 TEXT NOT NULL PRIMARY KEY,
            transfer_id TEXT NOT NULL,
            archive_format TEXT,
            index_state TEXT NOT NULL CHECK (index_state IN ('pending', 'ok',
                'encrypted', 'corrupt', 'unreadable')),
            index_reason TEXT,
            entry_count INTEGER NOT NULL,
            preview {blob},
            preview_path TEXT,
            preview_name TEXT,
            creator TEXT,
            tags TEXT NOT NULL,
            source_channel_id BIGINT,
            source_topic_id BIGINT,
            source_message_id BIGINT,
            attempts INTEGER NOT NULL,
            lease_owner TEXT,
            lease_until DOUBLE PRECISION,
            indexed_at DOUBLE PRECISION,
            created_at DOUBLE PRECISION NOT NULL,
            updated_at DOUBLE PRECISION NOT NULL
        )""")
    conn.execute("CREATE INDEX package_meta_state ON package_meta (index_state)")
    conn.execute("CREATE INDEX package_meta_transfer ON package_meta (transfer_id)")


def _source_messages_table(name: str, statuses: str) -> str:
    """The source_messages table (migration 4; rebuilt by migration 5 on SQLite)."""
    return f"""CREATE TABLE {name} (
            channel_id BIGINT NOT NULL,
            message_id BIGINT NOT NULL,
            topic_id BIGINT NOT NULL,
            account TEXT NOT NULL,
            document_id BIGINT,
            file_name TEXT NOT NULL,
            size BIGINT NOT NULL,
            posted_at DOUBLE PRECISION,
            set_key TEXT,
            part_number INTEGER,
            status TEXT NOT NULL CHECK (status IN {statuses}),
            reason TEXT,
            transfer_id TEXT,
            run_id TEXT,
            created_at DOUBLE PRECISION NOT NULL,
            updated_at DOUBLE PRECISION NOT NULL,
            PRIMARY KEY (channel_id, message_id)
        )"""


_SOURCE_MESSAGES_INDEXES = (
    "CREATE INDEX source_messages_set ON source_messages (set_key, part_number)",
    "CREATE INDEX source_messages_document ON source_messages (document_id)",
    "CREATE INDEX source_messages_status ON source_messages (status, channel_id)",
)


def _allow_seen_messages(conn: MigrationConnection) -> None:
    """Migration 5: source messages may be "seen" (a document that is no archive,
    recorded so that it is not examined again). PostgreSQL swaps the CHECK;
    SQLite cannot alter one, so the table is rebuilt (same columns, same order)."""
    statuses = "('pending', 'ingested', 'skipped', 'seen')"
    if conn.dialect == "postgres":
        conn.execute("ALTER TABLE source_messages DROP CONSTRAINT source_messages_status_check")
        conn.execute(f"ALTER TABLE source_messages ADD CONSTRAINT source_messages_status_check "
                     f"CHECK (status IN {statuses})")
        return
    conn.execute(_source_messages_table("source_messages_new", statuses))
    conn.execute("INSERT INTO source_messages_new SELECT * FROM source_messages")
    conn.execute("DROP TABLE source_messages")
    conn.execute("ALTER TABLE source_messages_new RENAME TO source_messages")
    for statement in _SOURCE_MESSAGES_INDEXES:
        conn.execute(statement)


MIGRATIONS: tuple[tuple[Step, ...], ...] = (
    # 1: accounts and their remembered FloodWaits
    (
        """CREATE TABLE accounts (
            name TEXT NOT NULL PRIMARY KEY,
            user_id BIGINT,
            phone_redacted TEXT,
            premium BOOLEAN,
            upload_limit_bytes BIGINT,
            state TEXT NOT NULL,
            cooldown_until DOUBLE PRECISION,
            updated_at DOUBLE PRECISION NOT NULL
        )""",
        """CREATE TABLE flood_waits (
            account TEXT NOT NULL,
            request_kind TEXT NOT NULL,
            until DOUBLE PRECISION NOT NULL,
            PRIMARY KEY (account, request_kind)
        )""",
        "CREATE INDEX flood_waits_until ON flood_waits (until)",
    ),
    # 2: channels and which accounts can see them
    (
        """CREATE TABLE channels (
            channel_id BIGINT NOT NULL PRIMARY KEY,
            title TEXT NOT NULL,
            username TEXT,
            is_forum BOOLEAN NOT NULL,
            updated_at DOUBLE PRECISION NOT NULL
        )""",
        """CREATE TABLE channel_seen_by (
            channel_id BIGINT NOT NULL REFERENCES channels (channel_id) ON DELETE CASCADE,
            account TEXT NOT NULL,
            PRIMARY KEY (channel_id, account)
        )""",
        "CREATE INDEX channel_seen_by_account ON channel_seen_by (account)",
    ),
    # 3: durable transfers (issue 3/4): transfers, their parts, the chunk
    # journal for resume, content claims and stored packages
    (
        """CREATE TABLE transfers (
            id TEXT NOT NULL PRIMARY KEY,
            state TEXT NOT NULL CHECK (state IN ('planned', 'uploading', 'uploaded',
                'verifying', 'verified', 'cleaned', 'failed')),
            source_path TEXT NOT NULL,
            size BIGINT NOT NULL,
            sha256 TEXT NOT NULL,
            destination TEXT NOT NULL,
            manifest_path TEXT NOT NULL,
            delete_original BOOLEAN NOT NULL,
            account TEXT,
            reason TEXT,
            attempts INTEGER NOT NULL,
            created_at DOUBLE PRECISION NOT NULL,
            updated_at DOUBLE PRECISION NOT NULL,
            next_check_at DOUBLE PRECISION,
            last_check_at DOUBLE PRECISION,
            lease_owner TEXT,
            lease_until DOUBLE PRECISION,
            duplicate_of TEXT REFERENCES transfers (id)
        )""",
        "CREATE INDEX transfers_state_due ON transfers (state, next_check_at)",
        "CREATE INDEX transfers_sha256 ON transfers (sha256)",
        """CREATE TABLE transfer_parts (
            transfer_id TEXT NOT NULL REFERENCES transfers (id) ON DELETE CASCADE,
            part_index INTEGER NOT NULL,
            byte_offset BIGINT NOT NULL,
            length BIGINT NOT NULL,
            sha256 TEXT NOT NULL,
            file_name TEXT NOT NULL,
            random_id BIGINT NOT NULL,
            message_id BIGINT,
            document_id BIGINT,
            account TEXT,
            sent_at DOUBLE PRECISION,
            verified_at DOUBLE PRECISION,
            misses INTEGER NOT NULL,
            PRIMARY KEY (transfer_id, part_index)
        )""",
        """CREATE TABLE part_journal (
            transfer_id TEXT NOT NULL,
            part_index INTEGER NOT NULL,
            chunk_index INTEGER NOT NULL,
            account TEXT NOT NULL,
            acked_at DOUBLE PRECISION NOT NULL,
            PRIMARY KEY (transfer_id, part_index, chunk_index),
            FOREIGN KEY (transfer_id, part_index)
                REFERENCES transfer_parts (transfer_id, part_index) ON DELETE CASCADE
        )""",
        """CREATE TABLE content_claims (
            sha256 TEXT NOT NULL PRIMARY KEY,
            owner TEXT NOT NULL,
            lease_until DOUBLE PRECISION NOT NULL,
            transfer_id TEXT,
            claimed_at DOUBLE PRECISION NOT NULL
        )""",
        """CREATE TABLE packages (
            sha256 TEXT NOT NULL PRIMARY KEY,
            transfer_id TEXT NOT NULL REFERENCES transfers (id),
            destination TEXT NOT NULL,
            created_at DOUBLE PRECISION NOT NULL
        )""",
        "CREATE INDEX packages_transfer ON packages (transfer_id)",
    ),
    # 4: ingest from source channels (issue 5): scan cursors, source messages,
    # ingested document ids, archive sets, skips, runs, the download journal,
    # and the phase-2 index of packages (entries + metadata)
    (
        """CREATE TABLE ingest_cursors (
            account TEXT NOT NULL,
            channel_id BIGINT NOT NULL,
            topic_id BIGINT NOT NULL,
            last_message_id BIGINT NOT NULL,
            last_scan_at DOUBLE PRECISION,
            stalled BOOLEAN NOT NULL,
            stalled_reason TEXT,
            updated_at DOUBLE PRECISION NOT NULL,
            PRIMARY KEY (account, channel_id, topic_id)
        )""",
        """CREATE TABLE archive_sets (
            set_key TEXT NOT NULL PRIMARY KEY,
            channel_id BIGINT NOT NULL,
            topic_id BIGINT NOT NULL,
            base_name TEXT NOT NULL,
            archive_format TEXT NOT NULL,
            scheme TEXT NOT NULL,
            state TEXT NOT NULL CHECK (state IN ('waiting', 'ready', 'downloading',
                'uploading', 'ingested', 'skipped', 'failed')),
            expected_parts INTEGER,
            seen_parts INTEGER NOT NULL,
            complete BOOLEAN NOT NULL,
            total_size BIGINT NOT NULL,
            sha256 TEXT,
            transfer_id TEXT,
            reason TEXT,
            lease_owner TEXT,
            lease_until DOUBLE PRECISION,
            created_at DOUBLE PRECISION NOT NULL,
            updated_at DOUBLE PRECISION NOT NULL
        )""",
        "CREATE INDEX archive_sets_state ON archive_sets (state, updated_at)",
        _source_messages_table("source_messages", "('pending', 'ingested', 'skipped')"),
        *_SOURCE_MESSAGES_INDEXES,
        """CREATE TABLE ingested_documents (
            document_id BIGINT NOT NULL PRIMARY KEY,
            channel_id BIGINT NOT NULL,
            message_id BIGINT NOT NULL,
            set_key TEXT,
            transfer_id TEXT,
            created_at DOUBLE PRECISION NOT NULL
        )""",
        """CREATE TABLE ingest_skips (
            channel_id BIGINT NOT NULL,
            message_id BIGINT NOT NULL,
            reason TEXT NOT NULL,
            detail TEXT,
            set_key TEXT,
            run_id TEXT,
            account TEXT,
            created_at DOUBLE PRECISION NOT NULL,
            PRIMARY KEY (channel_id, message_id)
        )""",
        "CREATE INDEX ingest_skips_reason ON ingest_skips (reason)",
        """CREATE TABLE ingest_runs (
            id TEXT NOT NULL PRIMARY KEY,
            mapping TEXT NOT NULL,
            channel_id BIGINT NOT NULL,
            topic_id BIGINT NOT NULL,
            account TEXT NOT NULL,
            owner TEXT,
            state TEXT NOT NULL CHECK (state IN ('running', 'finished', 'failed',
                'interrupted')),
            started_at DOUBLE PRECISION NOT NULL,
            finished_at DOUBLE PRECISION,
            updated_at DOUBLE PRECISION NOT NULL,
            seen INTEGER NOT NULL,
            ingested INTEGER NOT NULL,
            skipped INTEGER NOT NULL,
            skipped_by_reason TEXT NOT NULL,
            bytes_downloaded BIGINT NOT NULL,
            progress TEXT,
            error TEXT
        )""",
        "CREATE INDEX ingest_runs_started ON ingest_runs (started_at)",
        "CREATE INDEX ingest_runs_state ON ingest_runs (state)",
        """CREATE TABLE download_journal (
            path TEXT NOT NULL,
            chunk_index INTEGER NOT NULL,
            done_at DOUBLE PRECISION NOT NULL,
            PRIMARY KEY (path, chunk_index)
        )""",
        _create_package_meta,
        """CREATE TABLE package_entries (
            sha256 TEXT NOT NULL,
            entry_index INTEGER NOT NULL,
            path TEXT NOT NULL,
            size BIGINT NOT NULL,
            crc BIGINT,
            is_dir BOOLEAN NOT NULL,
            PRIMARY KEY (sha256, entry_index)
        )""",
    ),
    # 5: archive sets that keep failing: attempts, backoff, the last error;
    #    source messages "seen" (no archive: not examined again)
    (
        "ALTER TABLE archive_sets ADD COLUMN attempts INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE archive_sets ADD COLUMN next_attempt_at DOUBLE PRECISION",
        "ALTER TABLE archive_sets ADD COLUMN last_error TEXT",
        _allow_seen_messages,
    ),
)

CURRENT_VERSION = len(MIGRATIONS)

_VERSION_TABLE = """CREATE TABLE schema_version (
    id INTEGER NOT NULL PRIMARY KEY CHECK (id = 1),
    version INTEGER NOT NULL,
    upgraded_at DOUBLE PRECISION NOT NULL
)"""


def read_version(conn: MigrationConnection) -> int | None:
    """The database's schema version; None when it has no stashd schema at all."""
    if not conn.table_exists("schema_version"):
        return None
    row = conn.execute("SELECT version FROM schema_version WHERE id = 1").fetchone()
    return int(row[0]) if row is not None else 0


def _check_not_newer(version: int | None, supported: int) -> None:
    if version is not None and version > supported:
        raise SchemaVersionError(version, supported)


def _enable_wal(conn: MigrationConnection, timeout: float):
    """Switch to WAL, waiting for other connections.

    SQLite does not call the busy handler for a journal-mode change, so a
    concurrent opener holding the file gets "database is locked" at once;
    retry with a short backoff until ``timeout``.
    """
    deadline = time.monotonic() + timeout
    delay = 0.005
    while True:
        try:
            return conn.execute("PRAGMA journal_mode = WAL").fetchone()
        except Exception as exc:
            if "locked" not in str(exc) or time.monotonic() >= deadline:
                raise
        time.sleep(delay)
        delay = min(delay * 2, 0.2)


def migrate(
    conn: MigrationConnection,
    *,
    target: int | None = None,
    create: bool = True,
    clock: Callable[[], float] = time.time,
    migrations: Sequence[Sequence[Step]] = MIGRATIONS,
    lock_timeout_seconds: float = 60.0,
) -> list[int]:
    """Bring the database to ``target`` (default: the last of ``migrations``).

    Returns the versions applied (usually none).

    Raises SchemaVersionError, before writing anything, when the database is
    newer than ``len(migrations)``; StorageError when ``create`` is false and the
    database has no schema yet.
    """
    supported = len(migrations)
    if target is None:
        target = supported
    if not 0 <= target <= supported:
        raise ValueError(f"target version {target} outside 0..{supported}")
    version = read_version(conn)  # lock-free look first: refuse without writing
    _check_not_newer(version, supported)
    if version is None and not create:
        raise StorageError("database has no stashd schema (and create=False)")
    if version is not None and version >= target:
        return []

    if conn.dialect == "sqlite":
        mode = _enable_wal(conn, lock_timeout_seconds)
        if mode and str(mode[0]).lower() != "wal":  # pragma: no cover - odd filesystems
            logger.warning("SQLite refused WAL journal mode (got {})", mode[0])
        conn.execute(f"PRAGMA busy_timeout = {int(lock_timeout_seconds * 1000)}")
        try:
            conn.execute("BEGIN IMMEDIATE")
        finally:
            conn.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}")
    else:
        conn.execute("BEGIN")
        try:
            conn.execute(f"SET LOCAL lock_timeout = {int(lock_timeout_seconds * 1000)}")
            conn.execute("SELECT pg_advisory_xact_lock(?)", (PG_MIGRATION_LOCK_KEY,))
            conn.execute("SET LOCAL lock_timeout = 0")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
    applied: list[int] = []
    try:
        version = read_version(conn)  # again, under the lock
        _check_not_newer(version, supported)
        if version is None:
            conn.execute(_VERSION_TABLE)
            version = 0
        fresh = version == 0
        for number in range(version + 1, target + 1):
            for step in migrations[number - 1]:
                if callable(step):
                    step(conn)
                else:
                    conn.execute(step)
            applied.append(number)
        if applied:
            if fresh:
                conn.execute(
                    "INSERT INTO schema_version (id, version, upgraded_at) VALUES (1, ?, ?)",
                    (target, float(clock())),
                )
            else:
                conn.execute(
                    "UPDATE schema_version SET version = ?, upgraded_at = ? WHERE id = 1",
                    (target, float(clock())),
                )
        conn.execute("COMMIT")
    except BaseException:
        try:
            conn.execute("ROLLBACK")
        except Exception:  # the original error matters more
            pass
        raise
    if applied:
        logger.info("database schema migrated to version {} (applied {})", target, applied)
    return applied
