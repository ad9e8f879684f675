"""Schema versioning: fresh, upgrade, refuse newer, concurrent first opens."""
from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from storage.database import open_storage
from storage.errors import SchemaVersionError, StorageError
from storage.migrations import (
    CURRENT_VERSION,
    MIGRATIONS,
    PG_MIGRATION_LOCK_KEY,
    MigrationConnection,
    migrate,
    read_version,
)
from storage.url import parse_url


def _raw_migration_conn(url: str) -> MigrationConnection:
    parsed = parse_url(url)
    return MigrationConnection(parsed.connect_raw(create=True), parsed.dialect)


def test_there_is_an_older_version_to_upgrade_from():
    assert CURRENT_VERSION >= 2  # otherwise the upgrade test proves nothing


def test_fresh_database_gets_current_version(db_url, raw_db, clock):
    store = open_storage(db_url, clock=clock)
    store.close()
    assert store.schema_version == CURRENT_VERSION
    assert raw_db.rows("SELECT id, version, upgraded_at FROM schema_version") == [
        (1, CURRENT_VERSION, clock.now)]
    assert {"accounts", "flood_waits", "channels", "channel_seen_by", "schema_version"} <= set(
        raw_db.tables())


def test_reopening_applies_nothing(db_url, raw_db, clock):
    open_storage(db_url, clock=clock).close()
    clock.advance(100)
    open_storage(db_url, clock=clock).close()
    assert raw_db.rows("SELECT upgraded_at FROM schema_version") == [(clock.now - 100,)]
    assert migrate(raw_db.conn) == []


def test_old_database_is_upgraded_and_keeps_its_rows(db_url, raw_db, clock):
    assert migrate(raw_db.conn, target=1, clock=clock) == [1]
    assert read_version(raw_db.conn) == 1
    assert "channels" not in raw_db.tables()
    raw_db.execute(
        "INSERT INTO accounts (name, user_id, phone_redacted, premium, upload_limit_bytes, "
        "state, cooldown_until, updated_at) VALUES ('alice', 7123456789, '+155*****67', "
        "TRUE, 2097152000, 'ready', NULL, 1.5)")
    clock.advance(60)
    store = open_storage(db_url, clock=clock)
    try:
        assert read_version(raw_db.conn) == CURRENT_VERSION
        assert raw_db.rows("SELECT upgraded_at FROM schema_version") == [(clock.now,)]
        alice = store.get_account("alice")
        assert (alice.user_id, alice.premium, alice.state) == (7123456789, True, "ready")
        store.upsert_channel(1, title="t", username=None, seen_by="alice")  # new tables work
    finally:
        store.close()


def test_upgraded_schema_equals_fresh_schema(db_url, raw_db):
    open_storage(db_url).close()
    fresh = raw_db.catalog()
    raw_db.drop_all()
    assert raw_db.tables() == []
    for version in range(1, CURRENT_VERSION + 1):  # one step at a time, like real upgrades
        migrate(raw_db.conn, target=version)
    stepwise = raw_db.catalog()
    raw_db.drop_all()
    migrate(raw_db.conn, target=1)
    open_storage(db_url).close()
    upgraded = raw_db.catalog()
    assert fresh["columns"]  # the comparison below is not between two empty catalogs
    assert upgraded == fresh
    assert stepwise == fresh


def _make_newer(raw_db) -> int:
    newer = MIGRATIONS + (("CREATE TABLE from_the_future (x BIGINT)",),)
    migrate(raw_db.conn, migrations=newer)
    return len(newer)


def test_newer_database_is_refused_before_anything_is_written(db_url, raw_db):
    newer = _make_newer(raw_db)
    before = (raw_db.catalog(), raw_db.rows("SELECT * FROM schema_version"))
    with pytest.raises(SchemaVersionError) as info:
        open_storage(db_url)
    assert str(info.value) == (
        f"database schema is version {newer}, this stashd supports up to "
        f"{CURRENT_VERSION}; upgrade stashd")
    assert (info.value.db_version, info.value.supported) == (newer, CURRENT_VERSION)
    assert isinstance(info.value, StorageError)
    assert (raw_db.catalog(), raw_db.rows("SELECT * FROM schema_version")) == before


def test_newer_database_refused_even_when_detected_under_the_lock(db_url, raw_db):
    """The lock-free first look can be stale; the locked re-read must refuse too."""
    newer = len(MIGRATIONS) + 1
    conn = _raw_migration_conn(db_url)
    try:
        looks = []
        real_read = read_version

        class Racing(MigrationConnection):
            def table_exists(self, name):
                found = super().table_exists(name)
                looks.append(name)
                if len(looks) == 1:  # after the lock-free look, before the lock
                    _make_newer(raw_db)
                return found

        racing = Racing(conn.raw, conn.dialect)
        with pytest.raises(SchemaVersionError):
            migrate(racing)
        assert real_read(raw_db.conn) == newer
        assert "accounts" in raw_db.tables()  # the newer schema, untouched
    finally:
        conn.raw.close()


def test_create_false_refuses_an_empty_database(db_url, raw_db):  # raw_db: the file exists
    with pytest.raises(StorageError, match="no stashd schema"):
        open_storage(db_url, create=False)
    open_storage(db_url).close()
    open_storage(db_url, create=False).close()


def test_create_false_refuses_a_missing_sqlite_file(tmp_path):
    path = tmp_path / "missing.db"
    with pytest.raises(StorageError, match="does not exist"):
        open_storage(f"sqlite:///{path}", create=False)
    assert not path.exists()


def test_concurrent_first_opens_migrate_once(db_url):
    n = 6
    barrier = threading.Barrier(n)
    conns = [_raw_migration_conn(db_url) for _ in range(n)]

    def race(conn):
        barrier.wait(timeout=10)
        return migrate(conn)

    try:
        with ThreadPoolExecutor(n) as pool:
            results = [f.result(timeout=60) for f in [pool.submit(race, c) for c in conns]]
    finally:
        for c in conns:
            c.raw.close()
    assert sorted(results, key=len) == [[]] * (n - 1) + [list(range(1, CURRENT_VERSION + 1))]


def test_concurrent_open_storage_all_succeed(db_url):
    n = 4
    barrier = threading.Barrier(n)

    def open_one(i):
        barrier.wait(timeout=10)
        store = open_storage(db_url)
        try:
            return store.upsert_account(f"acc{i}").name
        finally:
            store.close()

    with ThreadPoolExecutor(n) as pool:
        names = [f.result(timeout=60) for f in [pool.submit(open_one, i) for i in range(n)]]
    assert names == [f"acc{i}" for i in range(n)]


def test_failed_migration_leaves_the_database_unchanged(db_url, raw_db):
    migrate(raw_db.conn, target=1)
    before = raw_db.catalog()
    broken = MIGRATIONS[:1] + (("CREATE TABLE half_done (x BIGINT)", "THIS IS NOT SQL"),)
    with pytest.raises(Exception):
        migrate(raw_db.conn, migrations=broken)
    assert raw_db.catalog() == before
    assert read_version(raw_db.conn) == 1


def test_callable_migration_steps_get_the_dialect(db_url, raw_db):
    seen = []

    def step(conn):
        seen.append(conn.dialect)
        conn.execute("CREATE TABLE by_callable (x BIGINT)")

    migrate(raw_db.conn, migrations=MIGRATIONS + ((step,),))
    assert seen == [raw_db.url.dialect]
    assert "by_callable" in raw_db.tables()


def test_waiting_for_another_migration_times_out_instead_of_hanging(db_url, raw_db):
    holder = _raw_migration_conn(db_url)
    conn = _raw_migration_conn(db_url)
    try:
        if holder.dialect == "sqlite":
            holder.execute("BEGIN IMMEDIATE")
        else:
            holder.execute("BEGIN")
            holder.execute("SELECT pg_advisory_xact_lock(?)", (PG_MIGRATION_LOCK_KEY,))
        with pytest.raises(Exception, match="lock"):
            migrate(conn, lock_timeout_seconds=0.2)
        holder.execute("ROLLBACK")
        assert read_version(raw_db.conn) is None
        assert migrate(conn) == list(range(1, CURRENT_VERSION + 1))  # the connection is still usable
    finally:
        holder.raw.close()
        conn.raw.close()
