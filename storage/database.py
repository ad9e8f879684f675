"""open_storage: parse the URL, migrate under a lock, bind Pony, map entities."""
from __future__ import annotations

import threading
import time
from typing import Callable

from loguru import logger
from pony.orm import Database
from pony.orm.core import OrmError
from pony.orm.dbapiprovider import DBException

from storage.errors import SchemaVersionError, StorageError
from storage.migrations import CURRENT_VERSION, MigrationConnection, migrate
from storage.models import define_entities
from storage.repository import Storage
from storage.url import SQLITE_BUSY_TIMEOUT_MS, DatabaseUrl, parse_url

# Pony imports its provider module inside Database.bind(); two threads opening
# storage at once can see it half-imported, so binds are serialised.
_BIND_LOCK = threading.Lock()

SQLITE_PRAGMAS = (
    f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}",  # first: the others may wait
    "PRAGMA journal_mode = WAL",
    "PRAGMA foreign_keys = ON",
    "PRAGMA synchronous = NORMAL",
)


def run_migrations(url: DatabaseUrl, *, create: bool, clock: Callable[[], float]) -> int:
    """Migrate the database to CURRENT_VERSION with a short raw connection."""
    raw = url.connect_raw(create=create)
    try:
        conn = MigrationConnection(raw, url.dialect)
        migrate(conn, create=create, clock=clock)
        return CURRENT_VERSION
    except StorageError:
        raise
    except Exception as exc:
        raise StorageError(
            f"cannot migrate database {url.safe}: {type(exc).__name__}: {exc}"
        ) from exc
    finally:
        raw.close()


def _is_closed(connection) -> bool:
    closed = getattr(connection, "closed", None)  # psycopg2: 0 while open
    if closed is not None and not callable(closed):
        return bool(closed)
    try:
        connection.in_transaction  # sqlite3: raises once closed (from any thread)
    except Exception:  # noqa: BLE001
        return True
    return False


def prune_connections(connections: list, owners: dict) -> int:
    """Drop the connections that are closed, or whose thread has ended (Pony keeps one
    connection per thread: nobody uses it again), closing the latter where the driver lets
    another thread do it (sqlite3 does not: dropping the last reference closes it).
    ``owners``: id(connection) -> the thread that opened it. Returns how many were dropped."""
    keep = []
    for con in connections:
        owner = owners.get(id(con))
        if _is_closed(con):
            owners.pop(id(con), None)
            continue
        if owner is not None and not owner.is_alive():
            owners.pop(id(con), None)
            try:
                con.close()
            except Exception:  # noqa: BLE001 - sqlite3: other thread; freed with the last ref
                pass
            continue
        keep.append(con)
    dropped = len(connections) - len(keep)
    connections[:] = keep
    return dropped


def _bind(url: DatabaseUrl, *, create: bool) -> tuple[Database, object, list]:
    db = Database()
    connections: list = []
    owners: dict[int, threading.Thread] = {}
    lock = threading.Lock()

    def track(connection) -> None:
        # every connection is kept for Storage.close(); those of ended threads (admin
        # requests, short-lived workers) are pruned here so the list does not grow forever
        with lock:
            prune_connections(connections, owners)
            connections.append(connection)
            owners[id(connection)] = threading.current_thread()

    @db.on_connect(provider="sqlite")
    def _sqlite_pragmas(_db, connection):
        cursor = connection.cursor()
        for pragma in SQLITE_PRAGMAS:
            cursor.execute(pragma)
        track(connection)

    @db.on_connect(provider="postgres")
    def _pg_track(_db, connection):
        track(connection)

    entities = define_entities(db)
    try:
        with _BIND_LOCK:
            db.bind(**url.pony_bind_args(create=create))
        db.generate_mapping(create_tables=False, check_tables=True)
    except (DBException, OrmError, OSError) as exc:
        for con in connections:
            try:
                con.close()
            except Exception:  # pragma: no cover
                pass
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise StorageError(
            f"cannot open database {url.safe}: {type(exc).__name__}: {first}"
        ) from None
    return db, entities, connections


def open_storage(url: str, *, clock: Callable[[], float] = time.time, create: bool = True) -> Storage:
    """Open (and create/upgrade) the database at ``url``.

    ``create=False`` refuses a database that does not exist or has no stashd
    schema yet; an older schema is upgraded either way. A newer schema raises
    SchemaVersionError before anything is written.
    """
    parsed = parse_url(url)
    version = run_migrations(parsed, create=create, clock=clock)
    db, entities, connections = _bind(parsed, create=create)
    logger.debug("storage open: {} (schema v{})", parsed.safe, version)
    return Storage(
        db, entities, parsed, schema_version=version, clock=clock, connections=connections
    )


__all__ = ["open_storage", "run_migrations", "SchemaVersionError", "StorageError"]
