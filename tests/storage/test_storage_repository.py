"""Repository CRUD on both backends (SQLite file and real PostgreSQL)."""
from __future__ import annotations

import dataclasses

import pytest

from storage import (
    AccountRecord,
    ChannelRecord,
    FloodWaitRecord,
    Storage,
    StorageError,
    open_storage,
)

BIG_USER_ID = 7_123_456_789  # over int32
BIG_CHANNEL_ID = -1_002_345_678_901


@pytest.fixture
def store(db_url, clock):
    s = open_storage(db_url, clock=clock)
    yield s
    s.close()


def test_open_storage_returns_a_storage(store):
    assert isinstance(store, Storage)


def test_new_account_defaults_and_fields(store, clock):
    rec = store.upsert_account("alice")
    assert rec == AccountRecord(
        name="alice", user_id=None, phone_redacted=None, premium=None,
        upload_limit_bytes=None, state="starting", cooldown_until=None, updated_at=clock.now,
    )
    clock.advance(5)
    rec = store.upsert_account(
        "alice", user_id=BIG_USER_ID, phone="+15551234567", premium=True,
        upload_limit_bytes=4000 * 2**20, state="ready",
    )
    assert rec.user_id == BIG_USER_ID
    assert rec.phone_redacted == "+155*****67"
    assert rec.premium is True
    assert rec.upload_limit_bytes == 4000 * 2**20
    assert rec.state == "ready"
    assert rec.updated_at == clock.now
    assert store.get_account("alice") == rec


def test_upsert_leaves_unset_fields_alone(store):
    store.upsert_account("bob", user_id=42, phone="15550001122", premium=False, state="ready")
    rec = store.upsert_account("bob", upload_limit_bytes=2000 * 2**20)
    assert (rec.user_id, rec.phone_redacted, rec.premium, rec.state) == (42, "+155*****22", False, "ready")
    assert rec.upload_limit_bytes == 2000 * 2**20


def test_records_are_frozen(store):
    rec = store.upsert_account("alice")
    with pytest.raises(dataclasses.FrozenInstanceError):
        rec.state = "ready"


def test_get_missing_and_list_sorted(store):
    assert store.get_account("nobody") is None
    assert store.list_accounts() == []
    for name in ("carol", "alice", "bob"):
        store.upsert_account(name)
    assert [a.name for a in store.list_accounts()] == ["alice", "bob", "carol"]


def test_set_state_and_cooldown(store, clock):
    store.upsert_account("alice")
    clock.advance(1)
    rec = store.set_account_state("alice", "cooling_down")
    assert rec.state == "cooling_down" and rec.updated_at == clock.now
    store.set_account_cooldown("alice", clock.now + 300)
    assert store.get_account("alice").cooldown_until == clock.now + 300
    store.set_account_cooldown("alice", None)
    assert store.get_account("alice").cooldown_until is None
    assert store.get_account("alice").state == "cooling_down"


def test_set_state_creates_missing_account(store):
    store.set_account_state("dave", "paused")
    assert store.get_account("dave").state == "paused"


def test_unknown_state_is_refused(store):
    with pytest.raises(ValueError, match="unknown account state"):
        store.set_account_state("alice", "sleepy")
    with pytest.raises(ValueError):
        store.upsert_account("alice", state="sleepy")
    assert store.get_account("alice") is None


def test_flood_wait_keeps_the_later_until(store, clock):
    rec = store.record_flood_wait("alice", "SaveBigFilePartRequest", 30)
    assert rec == FloodWaitRecord("alice", "SaveBigFilePartRequest", clock.now + 30)
    shorter = store.record_flood_wait("alice", "SaveBigFilePartRequest", 10)
    assert shorter.until == clock.now + 30
    clock.advance(5)
    longer = store.record_flood_wait("alice", "SaveBigFilePartRequest", 60)
    assert longer.until == clock.now + 60
    assert store.active_flood_waits("alice") == {"SaveBigFilePartRequest": clock.now + 60}


def test_active_flood_waits_exclude_expired_and_other_accounts(store, clock):
    start = clock.now
    store.record_flood_wait("alice", "GetHistoryRequest", 10)
    store.record_flood_wait("alice", "SendMediaRequest", 100)
    store.record_flood_wait("bob", "GetHistoryRequest", 100)
    assert store.active_flood_waits("alice") == {
        "GetHistoryRequest": start + 10, "SendMediaRequest": start + 100}
    clock.advance(10)  # until == now is over
    assert store.active_flood_waits("alice") == {"SendMediaRequest": start + 100}
    assert store.active_flood_waits("bob") == {"GetHistoryRequest": start + 100}
    assert store.active_flood_waits("nobody") == {}


def test_flood_wait_rejects_negative_seconds(store):
    with pytest.raises(ValueError):
        store.record_flood_wait("alice", "X", -1)


def test_prune_flood_waits(store, clock):
    store.record_flood_wait("alice", "A", 10)
    store.record_flood_wait("alice", "B", 20)
    store.record_flood_wait("bob", "A", 30)
    assert store.prune_flood_waits() == 0
    clock.advance(20)
    assert store.prune_flood_waits() == 2
    assert store.prune_flood_waits() == 0
    assert store.active_flood_waits("bob") == {"A": clock.now + 10}
    # a pruned wait can be recorded afresh
    assert store.record_flood_wait("alice", "A", 1).until == clock.now + 1


def test_channels_upsert_and_seen_by(store):
    rec = store.upsert_channel(BIG_CHANNEL_ID, title="Archive", username=None, seen_by="alice")
    assert rec == ChannelRecord(BIG_CHANNEL_ID, "Archive", None, False, ("alice",))
    rec = store.upsert_channel(BIG_CHANNEL_ID, title="Archive 2", username="stash_archive",
                               is_forum=True, seen_by="bob")
    assert rec == ChannelRecord(BIG_CHANNEL_ID, "Archive 2", "stash_archive", True, ("alice", "bob"))
    again = store.upsert_channel(BIG_CHANNEL_ID, title="Archive 2", username="stash_archive",
                                 is_forum=True, seen_by="alice")
    assert again.seen_by == ("alice", "bob")
    store.upsert_channel(5, title="Small", username="small")
    assert store.list_channels() == [
        ChannelRecord(BIG_CHANNEL_ID, "Archive 2", "stash_archive", True, ("alice", "bob")),
        ChannelRecord(5, "Small", "small", False, ()),
    ]


def test_int64_columns_hold_telegram_ids(store, raw_db):
    store.upsert_account("alice", user_id=2**62, upload_limit_bytes=2**40)
    store.upsert_channel(-(2**62), title="t", username=None, seen_by="alice")
    assert raw_db.rows("SELECT user_id, upload_limit_bytes FROM accounts") == [(2**62, 2**40)]
    assert raw_db.rows("SELECT channel_id FROM channel_seen_by") == [(-(2**62),)]
    if raw_db.url.dialect == "postgres":
        types = dict(raw_db.rows(
            "SELECT table_name || '.' || column_name, data_type FROM information_schema.columns "
            "WHERE table_schema = 'public' AND column_name IN "
            "('user_id', 'upload_limit_bytes', 'channel_id')"))
        assert set(types.values()) == {"bigint"}, types


def test_full_phone_is_never_stored(store, raw_db):
    store.upsert_account("alice", phone="+15551234567")
    store.upsert_account("bob", phone="4915112345678")
    dump = raw_db.dump_text()
    assert "+155*****67" in dump and "+491*****78" in dump
    for secret in ("15551234567", "5551234567", "1234567", "4915112345678", "12345678"):
        assert secret not in dump
    assert "1234567" not in repr(store.list_accounts())


def test_closed_storage_refuses_work(db_url):
    s = open_storage(db_url)
    s.close()
    s.close()  # idempotent
    with pytest.raises(StorageError, match="closed"):
        s.list_accounts()


def test_two_storages_share_one_database(db_url, clock):
    a = open_storage(db_url, clock=clock)
    b = open_storage(db_url, clock=clock)
    try:
        a.record_flood_wait("alice", "X", 10)
        assert b.active_flood_waits("alice") == {"X": clock.now + 10}
        b.upsert_account("alice", state="ready")
        assert a.get_account("alice").state == "ready"
    finally:
        a.close()
        b.close()


def test_sqlite_connections_get_the_pragmas(sqlite_url):
    from pony.orm import db_session

    store = open_storage(sqlite_url)
    try:
        with db_session:
            got = {p: store.db.execute(f"PRAGMA {p}").fetchone()[0]
                   for p in ("journal_mode", "busy_timeout", "foreign_keys", "synchronous")}
        assert got == {"journal_mode": "wal", "busy_timeout": 30000, "foreign_keys": 1,
                       "synchronous": 1}  # 1 = NORMAL
    finally:
        store.close()
