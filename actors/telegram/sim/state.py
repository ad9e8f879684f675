"""Persistent state of the simulated Telegram: one SQLite file (WAL) + blob dirs.

SimState is not thread-safe on its own: SimWorld holds a lock around every use.
Rows come back as ``sqlite3.Row``; they never leave the sim package.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import sqlite3
from collections import OrderedDict
from pathlib import Path

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS users(
    id INTEGER PRIMARY KEY, first_name TEXT NOT NULL, username TEXT UNIQUE,
    phone TEXT, premium INTEGER NOT NULL DEFAULT 0, created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS auth_keys(key_id INTEGER PRIMARY KEY, user_id INTEGER);
CREATE TABLE IF NOT EXISTS channels(
    id INTEGER PRIMARY KEY, title TEXT NOT NULL, username TEXT UNIQUE,
    forum INTEGER NOT NULL DEFAULT 0, created REAL NOT NULL,
    pts INTEGER NOT NULL DEFAULT 1, last_msg_id INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS members(
    channel_id INTEGER, user_id INTEGER, admin INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY(channel_id, user_id));
CREATE TABLE IF NOT EXISTS topics(
    channel_id INTEGER, id INTEGER, title TEXT NOT NULL, created REAL NOT NULL,
    creator_id INTEGER, PRIMARY KEY(channel_id, id));
CREATE TABLE IF NOT EXISTS messages(
    channel_id INTEGER, id INTEGER, date REAL NOT NULL, sender_id INTEGER,
    text TEXT NOT NULL DEFAULT '', topic_id INTEGER, reply_to_id INTEGER,
    document_id INTEGER, action TEXT, deleted INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY(channel_id, id));
CREATE TABLE IF NOT EXISTS documents(
    id INTEGER PRIMARY KEY, size INTEGER NOT NULL, mime_type TEXT NOT NULL,
    file_name TEXT NOT NULL, date REAL NOT NULL);
CREATE TABLE IF NOT EXISTS random_ids(
    user_id INTEGER, random_id INTEGER, channel_id INTEGER NOT NULL,
    message_id INTEGER NOT NULL, PRIMARY KEY(user_id, random_id));
CREATE TABLE IF NOT EXISTS parts(
    owner_id INTEGER, file_id INTEGER, part INTEGER, total INTEGER NOT NULL,
    size INTEGER NOT NULL, created REAL NOT NULL,
    PRIMARY KEY(owner_id, file_id, part));
CREATE TABLE IF NOT EXISTS faults(id INTEGER PRIMARY KEY AUTOINCREMENT, spec TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS photos(
    id INTEGER PRIMARY KEY, date REAL NOT NULL, label TEXT NOT NULL DEFAULT '');
CREATE TABLE IF NOT EXISTS photo_sizes(
    photo_id INTEGER, type TEXT NOT NULL, w INTEGER NOT NULL, h INTEGER NOT NULL,
    size INTEGER NOT NULL, PRIMARY KEY(photo_id, type));
"""

# Columns added after the first worlds were written: (table, column, declaration).
# A world directory written before them gets them on open (ALTER TABLE ... ADD COLUMN).
LATER_COLUMNS = (
    ("messages", "photo_id", "INTEGER"),
    ("messages", "grouped_id", "INTEGER"),
)

USER_ID_BASE = 700000000
CHANNEL_ID_BASE = 1900000000
DOCUMENT_ID_BASE = 5200000000000000000
PHOTO_ID_BASE = 5300000000000000000


def signed64(value: int) -> int:
    """Map any int onto the signed 64-bit range (SQLite INTEGER, TL long)."""
    value &= (1 << 64) - 1
    return value - (1 << 64) if value >= (1 << 63) else value


class SimState:
    def __init__(self, state_dir: Path):
        self.dir = Path(state_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.docs_dir = self.dir / "docs"
        self.parts_dir = self.dir / "parts"
        self.photos_dir = self.dir / "photos"
        self.docs_dir.mkdir(exist_ok=True)
        self.parts_dir.mkdir(exist_ok=True)
        self.photos_dir.mkdir(exist_ok=True)
        self.db = sqlite3.connect(
            self.dir / "world.sqlite3", check_same_thread=False, isolation_level=None
        )
        self.db.row_factory = sqlite3.Row
        self._key_users: dict[int, int | None] = {}   # auth key id -> user id (cleared on rollback)
        self._upload_fds: OrderedDict[tuple[int, int], int] = OrderedDict()   # (owner, file id) -> open fd
        self._part_rows: list[tuple] = []   # rows of parts saved with defer=True, not yet committed
        # user id -> premium, for the part-count limit of every part saved outside a
        # transaction; forgotten whenever a transaction (the only writer of users) begins or ends
        self._premium: dict[int, bool] = {}
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.execute("PRAGMA busy_timeout=5000")
        self.db.executescript(SCHEMA)
        self._add_later_columns()
        secret = self.get_meta("secret")
        if secret is None:
            secret = secrets.token_hex(32)
            self.set_meta("secret", secret)
        self.secret = bytes.fromhex(secret)

    def close(self) -> None:
        self.flush_part_rows()
        while self._upload_fds:
            os.close(self._upload_fds.popitem()[1])
        self.db.close()

    def _add_later_columns(self) -> None:
        for table, column, decl in LATER_COLUMNS:
            have = {r[1] for r in self.db.execute(f"PRAGMA table_info({table})")}
            if column not in have:
                self.db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {decl}")

    # -- small helpers -----------------------------------------------------
    def one(self, sql: str, *args):
        return self.db.execute(sql, args).fetchone()

    def all(self, sql: str, *args) -> list:
        return self.db.execute(sql, args).fetchall()

    def run(self, sql: str, *args) -> sqlite3.Cursor:
        return self.db.execute(sql, args)

    def transaction(self):
        """``with state.transaction():`` - deferred part rows are committed before it begins."""
        return _Txn(self.db, self._key_users.clear, self._begin, self._premium.clear)

    def _begin(self) -> None:
        self._premium.clear()
        self.flush_part_rows()

    def get_meta(self, key: str) -> str | None:
        row = self.one("SELECT value FROM meta WHERE key=?", key)
        return row[0] if row else None

    def set_meta(self, key: str, value: str) -> None:
        self.run("INSERT OR REPLACE INTO meta(key, value) VALUES(?, ?)", key, value)

    def hash_for(self, viewer_id: int, kind: str, peer_id: int) -> int:
        """Deterministic access hash, different for every viewing account."""
        mac = hmac.new(self.secret, f"{viewer_id}:{kind}:{peer_id}".encode(), hashlib.sha256)
        return signed64(int.from_bytes(mac.digest()[:8], "big"))

    def next_id(self, table: str, base: int) -> int:
        row = self.one(f"SELECT MAX(id) FROM {table}")
        return max(row[0] or 0, base) + 1

    # -- users and keys ------------------------------------------------------
    def user(self, user_id: int):
        return self.one("SELECT * FROM users WHERE id=?", user_id)

    def premium(self, user_id: int) -> bool:
        try:
            return self._premium[user_id]
        except KeyError:
            pass
        row = self.one("SELECT premium FROM users WHERE id=?", user_id)
        premium = bool(row and row[0])
        if not self.db.in_transaction:
            self._premium[user_id] = premium
        return premium

    def user_by_username(self, username: str):
        return self.one("SELECT * FROM users WHERE lower(username)=lower(?)", username)

    def user_by_phone(self, phone: str):
        digits = "".join(c for c in phone if c.isdigit())
        for row in self.all("SELECT * FROM users WHERE phone IS NOT NULL"):
            if "".join(c for c in row["phone"] if c.isdigit()) == digits:
                return row
        return None

    def user_for_key(self, key_id: int) -> int | None:
        key_id = signed64(key_id)
        try:
            return self._key_users[key_id]   # asked 3 times per request: cached
        except KeyError:
            pass
        row = self.one("SELECT user_id FROM auth_keys WHERE key_id=?", key_id)
        user_id = row[0] if row else None
        if row is not None:
            self._key_users[key_id] = user_id
        return user_id

    def bind_key(self, key_id: int, user_id: int | None) -> None:
        self._key_users.pop(signed64(key_id), None)
        self.run(
            "INSERT OR REPLACE INTO auth_keys(key_id, user_id) VALUES(?, ?)",
            signed64(key_id), user_id,
        )

    # -- channels ----------------------------------------------------------------
    def channel(self, channel_id: int):
        return self.one("SELECT * FROM channels WHERE id=?", channel_id)

    def channel_by_username(self, username: str):
        return self.one("SELECT * FROM channels WHERE lower(username)=lower(?)", username)

    def member(self, channel_id: int, user_id: int):
        return self.one(
            "SELECT * FROM members WHERE channel_id=? AND user_id=?", channel_id, user_id
        )

    def bump_pts(self, channel_id: int, count: int = 1) -> int:
        self.run("UPDATE channels SET pts = pts + ? WHERE id=?", count, channel_id)
        return self.one("SELECT pts FROM channels WHERE id=?", channel_id)[0]

    def new_message_id(self, channel_id: int) -> int:
        self.run("UPDATE channels SET last_msg_id = last_msg_id + 1 WHERE id=?", channel_id)
        return self.one("SELECT last_msg_id FROM channels WHERE id=?", channel_id)[0]

    def insert_message(self, channel_id: int, *, date: float, sender_id=None, text="",
                       topic_id=None, reply_to_id=None, document_id=None, action=None,
                       photo_id=None, grouped_id=None) -> int:
        msg_id = self.new_message_id(channel_id)
        self.run(
            "INSERT INTO messages(channel_id, id, date, sender_id, text, topic_id, reply_to_id,"
            " document_id, action, photo_id, grouped_id) VALUES(?,?,?,?,?,?,?,?,?,?,?)",
            channel_id, msg_id, date, sender_id, text, topic_id, reply_to_id, document_id,
            json.dumps(action) if action else None, photo_id,
            None if grouped_id is None else signed64(grouped_id),
        )
        self.bump_pts(channel_id)
        return msg_id

    def message(self, channel_id: int, msg_id: int):
        return self.one("SELECT * FROM messages WHERE channel_id=? AND id=?", channel_id, msg_id)

    def top_message_id(self, channel_id: int) -> int:
        row = self.one(
            "SELECT MAX(id) FROM messages WHERE channel_id=? AND deleted=0", channel_id
        )
        return row[0] or 0

    # -- documents and parts -----------------------------------------------------
    def document(self, doc_id: int):
        return self.one("SELECT * FROM documents WHERE id=?", doc_id)

    def doc_path(self, doc_id: int) -> Path:
        return self.docs_dir / str(doc_id)

    # -- photos: one file per (photo, size type), as Telegram keeps each size ------------
    def photo(self, photo_id: int):
        return self.one("SELECT * FROM photos WHERE id=?", photo_id)

    def photo_sizes(self, photo_id: int) -> list:
        """The photo's sizes, smallest first (Telegram's order)."""
        return self.all("SELECT * FROM photo_sizes WHERE photo_id=? ORDER BY size, type", photo_id)

    def photo_path(self, photo_id: int, size_type: str) -> Path:
        return self.photos_dir / f"{photo_id}_{size_type}"

    # Uploaded parts of one (owner, file_id) live in ONE sparse file, part i at
    # i * PART_SLOT (the largest part Telegram takes), plus a row per part in
    # ``parts`` (its size and age: expiry, FILE_PART_X_MISSING, size checks).
    # Parts of 512 KiB, as every big upload sends them, are then already laid
    # out as the document: sendMedia hard-links the file instead of copying.
    PART_SLOT = 512 * 1024

    def upload_path(self, owner_id: int, file_id: int) -> Path:
        return self.parts_dir / f"{owner_id}_{signed64(file_id)}"

    OPEN_UPLOADS = 16   # upload files kept open between parts (least recently written closed first)

    def _upload_fd(self, owner_id: int, file_id: int) -> int:
        key = (owner_id, signed64(file_id))
        fd = self._upload_fds.get(key)
        if fd is not None:
            self._upload_fds.move_to_end(key)
            return fd
        fd = os.open(self.upload_path(owner_id, file_id), os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
        self._upload_fds[key] = fd
        if len(self._upload_fds) > self.OPEN_UPLOADS:
            os.close(self._upload_fds.popitem(last=False)[1])
        return fd

    def _forget_upload(self, owner_id: int, file_id: int) -> None:
        """Close the upload's file and remove its name (its document, if any, is a link of its own)."""
        fd = self._upload_fds.pop((owner_id, signed64(file_id)), None)
        if fd is not None:
            os.close(fd)
        self.upload_path(owner_id, file_id).unlink(missing_ok=True)

    def save_part(self, owner_id: int, file_id: int, part: int, total: int,
                  data, now: float, *, defer: bool = False) -> None:
        """Write one part (any bytes-like object) at its slot and record it: at once, or with
        ``defer`` in memory until ``flush_part_rows`` (or the next transaction) commits it."""
        fd = self._upload_fd(owner_id, file_id)
        view, offset = memoryview(data), part * self.PART_SLOT
        while view:
            written = os.pwrite(fd, view, offset)
            view, offset = view[written:], offset + written
        row = (owner_id, signed64(file_id), part, total, len(data), now)
        if defer:
            self._part_rows.append(row)
        else:
            self.db.execute(_SAVE_PART, row)

    def flush_part_rows(self) -> int:
        """Commit the deferred part rows in one transaction; how many there were."""
        rows, self._part_rows = self._part_rows, []
        if not rows:
            return 0
        try:
            if self.db.in_transaction:
                self.db.executemany(_SAVE_PART, rows)
            else:
                with _Txn(self.db):
                    self.db.executemany(_SAVE_PART, rows)
        except BaseException:
            self._part_rows[:0] = rows   # still owed: the server answers their requests only once they are in
            raise
        return len(rows)

    def parts(self, owner_id: int, file_id: int, newer_than: float) -> dict[int, tuple[int, int]]:
        self.flush_part_rows()
        rows = self.all(
            "SELECT part, total, size FROM parts WHERE owner_id=? AND file_id=? AND created>=?",
            owner_id, signed64(file_id), newer_than,
        )
        return {r["part"]: (r["total"], r["size"]) for r in rows}

    def drop_parts(self, owner_id: int, file_id: int) -> None:
        self.flush_part_rows()
        self.run("DELETE FROM parts WHERE owner_id=? AND file_id=?", owner_id, signed64(file_id))
        self._forget_upload(owner_id, file_id)

    def prune_parts(self, older_than: float) -> int:
        """Forget parts older than ``older_than``; an upload left with no part loses its file."""
        self.flush_part_rows()
        rows = self.all(
            "SELECT DISTINCT owner_id, file_id FROM parts WHERE created<?", older_than
        )
        self.run("DELETE FROM parts WHERE created<?", older_than)
        for row in rows:
            if self.one("SELECT 1 FROM parts WHERE owner_id=? AND file_id=? LIMIT 1", row[0], row[1]) is None:
                self._forget_upload(row[0], row[1])
        return len(rows)


_SAVE_PART = ("INSERT OR REPLACE INTO parts(owner_id, file_id, part, total, size, created)"
              " VALUES(?,?,?,?,?,?)")


class _Txn:
    """``with state.transaction():`` — BEGIN IMMEDIATE ... COMMIT / ROLLBACK."""

    def __init__(self, db: sqlite3.Connection, on_rollback=None, before=None, after=None):
        self.db, self.on_rollback, self.before, self.after = db, on_rollback, before, after

    def __enter__(self):
        if self.before is not None:
            self.before()
        self.db.execute("BEGIN IMMEDIATE")
        return self

    def __exit__(self, exc_type, exc, tb):
        self.db.execute("ROLLBACK" if exc_type else "COMMIT")
        if self.after is not None:
            self.after()
        if exc_type and self.on_rollback is not None:
            self.on_rollback()
        return False
