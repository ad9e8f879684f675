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
