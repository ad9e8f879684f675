"""SimWorld: the simulated Telegram server's state and its request entry point.

Everything persists in ``state_dir/world.sqlite3`` (WAL) with document bytes in
``state_dir/docs/`` and uploaded parts in ``state_dir/parts/``; reopening the
same directory gives back the same world. One lock guards the database, so the
world may be used from several threads (socket server, tests, admin CLI).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

from loguru import logger
from telethon.crypto import AuthKey

from .errors import SimRpcError
from .handlers import decode, encode, handle, unwrap
from .handlers_build import Ctx
from .handlers_upload import decode_part_request
from .state import CHANNEL_ID_BASE, DOCUMENT_ID_BASE, PHOTO_ID_BASE, USER_ID_BASE, SimState
from .state_faults import Fault, FaultSet

__all__ = ["SimWorld", "SimUser", "Fault", "SimRpcError", "write_session_file", "auth_key_id"]

REQUEST_LOG_MAX = 200_000


@dataclass(frozen=True)
class SimUser:
    user_id: int
    auth_key: bytes

    def __repr__(self) -> str:  # never print key material
        return f"SimUser(user_id={self.user_id})"


def auth_key_id(auth_key: bytes) -> int:
    """The 64-bit id Telegram derives from an auth key (as Telethon computes it)."""
    return AuthKey(auth_key).key_id


def image_dimensions(data: bytes) -> tuple[int, int]:
    """(width, height) of a PNG, GIF or JPEG from its header; (0, 0) when unknown."""
    import struct
    if data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) >= 24:
        return struct.unpack(">II", data[16:24])
    if data[:6] in (b"GIF87a", b"GIF89a") and len(data) >= 10:
        return struct.unpack("<HH", data[6:10])
    if data[:2] == b"\xff\xd8":
        pos = 2
        while pos + 9 <= len(data):
            if data[pos] != 0xFF:
                break
            marker, length = data[pos + 1], struct.unpack(">H", data[pos + 2:pos + 4])[0]
            if marker in (0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF):
                h, w = struct.unpack(">HH", data[pos + 5:pos + 9])
                return w, h
            pos += 2 + length
    return 0, 0


def photo_size_type(width: int, height: int) -> str:
    """Telegram's name for a rendition that fits a box: s 100, m 320, x 800, y 1280, w 2560."""
    side = max(width, height)
    for kind, box in (("s", 100), ("m", 320), ("x", 800), ("y", 1280)):
        if side <= box:
            return kind
    return "w"


def _redact(phone: str | None) -> str | None:
    if phone is None:
        return None
    try:
        from storage.redact import redact_phone
    except ImportError:  # storage not available: same shape, keep it private
        digits = phone.strip()
        return digits[:5] + "***" + digits[-2:] if len(digits) > 7 else "***"
    return redact_phone(phone)


class SimWorld:
    def __init__(self, state_dir: Path, clock: Callable[[], float] = time.time, *,
                 seed: int = 0, part_ttl_seconds: float = 3600.0, host: str = "127.0.0.1",
                 port: int = 443, dc_id: int = 2, max_parts_regular: int = 4000,
                 max_parts_premium: int = 8000, login_code: str = "12345"):
        self.state_dir = Path(state_dir)
        self.clock = clock
        self.part_ttl_seconds = part_ttl_seconds
        self.host, self.port, self.dc_id = host, port, dc_id
        self.max_parts_regular = max_parts_regular
        self.max_parts_premium = max_parts_premium
        self.login_code = login_code
        self.request_log: list[tuple[int, str, str]] = []
        self._lock = threading.RLock()
        self._state = SimState(self.state_dir)
        self._faults = FaultSet(self._state, seed)
        self._after: list[Callable[[], None]] = []
        self._undo: list[Callable[[], None]] = []
        self._saves = 0
        self._deferring = threading.local()

    def close(self) -> None:
        with self._lock:
            self._state.close()

    # -- the wire entry point ------------------------------------------------------
    def handle_bytes(self, auth_key_id: int, request) -> bytes:
        """Answer one serialized TL request (any bytes-like object, not kept after the
        call); raises SimRpcError like Telegram would."""
        try:
            part = decode_part_request(request)
            obj = part or unwrap(decode(request))
        except Exception as exc:  # garbage in: a clean 400, never a crash
            raise SimRpcError(400, "INPUT_REQUEST_INVALID") from exc
        name = type(obj).__name__
        # a deferred part save is one pwrite and a row in memory: no transaction of its own
        deferred = part is not None and self.part_rows_deferred
        with self._lock:
            user_id = self._state.user_for_key(auth_key_id)
            self._faults.raise_for(name, user_id)
            ctx = Ctx(self, self._state, auth_key_id, user_id, self.clock())
            self._after, self._undo = [], []
            try:
                with contextlib.nullcontext() if deferred else self._state.transaction():
                    result = handle(ctx, obj)
            except SimRpcError:
                self._run_undo()
                raise
            except Exception as exc:  # a bug in the simulation: loud log, clean 400 (never a hang)
                self._run_undo()
                logger.opt(exception=exc).bind(actor="sim").error("simulated {} failed", name)
                raise SimRpcError(400, "SIM_INTERNAL_ERROR") from exc
            after, self._after = self._after, []
            for action in after:
                action()
            return encode(result)

    # -- group commit of part rows (the socket server's) -----------------------------
    def defer_part_rows(self) -> None:
        """Parts that requests on the calling thread save keep their row in memory until
        ``commit_part_rows()`` (or any transaction) commits it: the socket server commits
        once per loop pass and only then answers those requests, so an acknowledged part
        is as durable as before, for one commit instead of one per part."""
        self._deferring.on = True

    @property
    def part_rows_deferred(self) -> bool:
        return getattr(self._deferring, "on", False)

    def commit_part_rows(self) -> int:
        with self._lock:
            return self._state.flush_part_rows()

    def after_commit(self, action: Callable[[], None]) -> None:
        self._after.append(action)

    def on_rollback(self, action: Callable[[], None]) -> None:
        """Undo a file effect of the current request if its transaction rolls back."""
        self._undo.append(action)

    def _run_undo(self) -> None:
        undo, self._undo = self._undo, []
        for action in reversed(undo):
            action()

    def user_for_key(self, auth_key_id: int) -> int | None:
        with self._lock:
            return self._state.user_for_key(auth_key_id)

    def delay_for(self, auth_key_id: int, request_name: str, nbytes: int) -> float:
        if not self._faults.faults:   # no fault at all: no lock, no lookup
            return 0.0
        with self._lock:
            return self._faults.delay_for(request_name, self._state.user_for_key(auth_key_id), nbytes)

    def should_drop(self, auth_key_id: int, request_name: str) -> bool:
        if not self._faults.faults:
            return False
        with self._lock:
            return self._faults.should_drop(request_name, self._state.user_for_key(auth_key_id))

    def log_request(self, auth_key_id: int, request_name: str, thread_name: str) -> None:
        self.request_log.append((auth_key_id, request_name, thread_name))
        if len(self.request_log) > REQUEST_LOG_MAX:
            del self.request_log[: REQUEST_LOG_MAX // 2]

    # -- faults ----------------------------------------------------------------------
    def set_fault(self, fault: Fault) -> None:
        with self._lock:
            self._faults.add(fault)

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()

    @property
    def faults(self) -> list[Fault]:
        with self._lock:
            return list(self._faults.faults)

    # -- helpers used by handlers (lock already held) -----------------------------
    def new_document_id(self) -> int:
        return self._state.next_id("documents", DOCUMENT_ID_BASE)

    def maybe_prune_parts(self) -> None:
        self._saves += 1
        if self._saves % 256 == 0:
            self._state.prune_parts(self.clock() - self.part_ttl_seconds)

    def delete_live_messages(self, channel_id: int, ids: list[int]) -> int:
        for msg_id in ids:
            self._state.run("UPDATE messages SET deleted=1 WHERE channel_id=? AND id=?", channel_id, msg_id)
        if ids:
            return self._state.bump_pts(channel_id, len(ids))
        return self._state.channel(channel_id)["pts"]

    # -- administration ------------------------------------------------------------
    def create_user(self, first_name: str, *, username: str | None = None,
                    phone: str | None = None, premium: bool = False) -> SimUser:
        key = os.urandom(256)
        with self._lock, self._state.transaction():
            user_id = self._state.next_id("users", USER_ID_BASE)
            self._state.run(
                "INSERT INTO users(id, first_name, username, phone, premium, created) VALUES(?,?,?,?,?,?)",
                user_id, first_name, username, phone, int(premium), self.clock(),
            )
            self._state.bind_key(auth_key_id(key), user_id)
        return SimUser(user_id, key)

    def new_auth_key(self, user_id: int) -> bytes:
        """A fresh auth key signed in as user_id (a second session for one account)."""
        key = os.urandom(256)
        with self._lock, self._state.transaction():
            self._require_user(user_id)
            self._state.bind_key(auth_key_id(key), user_id)
        return key

    add_auth_key = new_auth_key

    def set_premium(self, user_id: int, premium: bool) -> None:
        with self._lock, self._state.transaction():
            self._require_user(user_id)
            self._state.run("UPDATE users SET premium=? WHERE id=?", int(premium), user_id)

    def create_channel(self, title: str, *, username: str | None = None, forum: bool = False,
                       members: Iterable[int] = (), admins: Iterable[int] = ()) -> int:
        admins = list(admins)
        with self._lock, self._state.transaction():
            channel_id = self._state.next_id("channels", CHANNEL_ID_BASE)
            now = self.clock()
            self._state.run(
                "INSERT INTO channels(id, title, username, forum, created, pts, last_msg_id)"
                " VALUES(?,?,?,?,?,0,0)", channel_id, title, username, int(forum), now,
            )
            for user_id in list(members) + admins:
                self._require_user(user_id)
                self._state.run(
                    "INSERT INTO members(channel_id, user_id, admin) VALUES(?,?,?) ON CONFLICT(channel_id, user_id)"
                    " DO UPDATE SET admin=max(admin, excluded.admin)",
                    channel_id, user_id, int(user_id in admins),
                )
            self._state.insert_message(channel_id, date=now, action={"kind": "channel_create", "title": title})
        return channel_id

    def add_member(self, channel_id: int, user_id: int, *, admin: bool = False) -> None:
        with self._lock, self._state.transaction():
            self._require_channel(channel_id)
            self._require_user(user_id)
            self._state.run("INSERT OR REPLACE INTO members(channel_id, user_id, admin) VALUES(?,?,?)",
                            channel_id, user_id, int(admin))

    def create_topic(self, channel_id: int, title: str) -> int:
        with self._lock, self._state.transaction():
            channel = self._require_channel(channel_id)
            if not channel["forum"]:
                raise ValueError(f"channel {channel_id} is not a forum")
            admin = self._state.one("SELECT user_id FROM members WHERE channel_id=? AND admin=1"
                                    " ORDER BY user_id LIMIT 1", channel_id)
            creator = admin[0] if admin else None
            now = self.clock()
            topic_id = self._state.insert_message(
                channel_id, date=now, sender_id=creator, action={"kind": "topic_create", "title": title})
            self._state.run("UPDATE messages SET topic_id=? WHERE channel_id=? AND id=?",
                            topic_id, channel_id, topic_id)
            self._state.run("INSERT INTO topics(channel_id, id, title, created, creator_id) VALUES(?,?,?,?,?)",
                            channel_id, topic_id, title, now, creator)
        return topic_id

    def post_document(self, channel_id: int, sender_id: int | None, file_name: str,
                      data: bytes | Path, *, caption: str = "", topic_id: int | None = None,
                      mime_type: str | None = None, grouped_id: int | None = None) -> int:
        import mimetypes
        with self._lock, self._state.transaction():
            self._check_post(channel_id, topic_id)
            doc_id = self.new_document_id()
            path = self._state.doc_path(doc_id)
            tmp = path.with_suffix(".tmp")
            if isinstance(data, (bytes, bytearray, memoryview)):
                tmp.write_bytes(bytes(data))
            else:
                shutil.copyfile(data, tmp)
            size = tmp.stat().st_size
            os.replace(tmp, path)
            mime = mime_type or mimetypes.guess_type(file_name)[0] or "application/octet-stream"
            now = self.clock()
            self._state.run("INSERT INTO documents(id, size, mime_type, file_name, date) VALUES(?,?,?,?,?)",
                            doc_id, size, mime, file_name, now)
            return self._state.insert_message(channel_id, date=now, sender_id=sender_id, text=caption,
                                              topic_id=topic_id, document_id=doc_id, grouped_id=grouped_id)

    def post_photo(self, channel_id: int, sender_id: int | None, data: bytes, *, caption: str = "",
                   topic_id: int | None = None, grouped_id: int | None = None, label: str = "",
                   thumbs: dict[str, bytes] | None = None) -> int:
        """A photo message (MessageMediaPhoto). ``data`` is the largest rendition, its size
        type named by its dimensions (``photo_size_type``); ``thumbs`` adds smaller ones
        (type -> bytes). Each size is a file of its own, fetched with upload.getFile
        through InputPhotoFileLocation(thumb_size=type), as on Telegram. ``grouped_id``
        puts the message in an album with the others carrying it. ``label`` names the
        photo for ``inspect()`` only (photos have no file name on Telegram)."""
        data = bytes(data)
        if not data:
            raise ValueError("a photo needs bytes")
        width, height = image_dimensions(data)
        renditions = {photo_size_type(width, height): (width, height, data)}
        for kind, thumb in (thumbs or {}).items():
            tw, th = image_dimensions(thumb)
            renditions.setdefault(kind, (tw, th, bytes(thumb)))
        with self._lock, self._state.transaction():
            self._check_post(channel_id, topic_id)
            photo_id = self._state.next_id("photos", PHOTO_ID_BASE)
            now = self.clock()
            self._state.run("INSERT INTO photos(id, date, label) VALUES(?,?,?)", photo_id, now, label)
            for kind, (w, h, blob) in renditions.items():
                path = self._state.photo_path(photo_id, kind)
                tmp = path.with_suffix(".tmp")
                tmp.write_bytes(blob)
                os.replace(tmp, path)
                self._state.run("INSERT INTO photo_sizes(photo_id, type, w, h, size) VALUES(?,?,?,?,?)",
                                photo_id, kind, w, h, len(blob))
            return self._state.insert_message(channel_id, date=now, sender_id=sender_id, text=caption,
                                              topic_id=topic_id, photo_id=photo_id, grouped_id=grouped_id)

    def photo_bytes(self, channel_id: int, msg_id: int, size_type: str | None = None) -> bytes | None:
        """The bytes of a photo message's rendition (the largest when size_type is None)."""
        with self._lock:
            row = self._state.message(channel_id, msg_id)
            if row is None or not row["photo_id"]:
                return None
            sizes = self._state.photo_sizes(row["photo_id"])
            chosen = sizes[-1]["type"] if size_type is None else size_type
            return self._state.photo_path(row["photo_id"], chosen).read_bytes()

    def post_text(self, channel_id: int, sender_id: int | None, text: str, *,
                  topic_id: int | None = None) -> int:
        with self._lock, self._state.transaction():
            self._check_post(channel_id, topic_id)
            return self._state.insert_message(channel_id, date=self.clock(), sender_id=sender_id,
                                              text=text, topic_id=topic_id)

    def delete_messages(self, channel_id: int, ids: Iterable[int]) -> int:
        with self._lock, self._state.transaction():
            self._require_channel(channel_id)
            live = [i for i in ids if (row := self._state.message(channel_id, i)) is not None
                    and not row["deleted"]]
            self.delete_live_messages(channel_id, live)
            return len(live)

    def expire_parts(self) -> int:
        """Forget uploaded parts older than part_ttl_seconds now (normally lazy)."""
        with self._lock, self._state.transaction():
            return self._state.prune_parts(self.clock() - self.part_ttl_seconds)

    def document_bytes(self, channel_id: int, msg_id: int) -> bytes | None:
        with self._lock:
            row = self._state.message(channel_id, msg_id)
            if row is None or not row["document_id"]:
                return None
            return self._state.doc_path(row["document_id"]).read_bytes()

    def inspect(self) -> dict:
        with self._lock:
            st = self._state
            signed_in = {r[0] for r in st.all("SELECT DISTINCT user_id FROM auth_keys WHERE user_id IS NOT NULL")}
            users = [{"id": r["id"], "first_name": r["first_name"], "username": r["username"],
                      "phone": _redact(r["phone"]), "premium": bool(r["premium"]),
                      "signed_in": r["id"] in signed_in} for r in st.all("SELECT * FROM users ORDER BY id")]
            channels = []
            for r in st.all("SELECT * FROM channels ORDER BY id"):
                members = st.all("SELECT user_id, admin FROM members WHERE channel_id=? ORDER BY user_id", r["id"])
                channels.append({
                    "id": r["id"], "title": r["title"], "username": r["username"], "forum": bool(r["forum"]),
                    "members": [m[0] for m in members], "admins": [m[0] for m in members if m[1]],
                    "pts": r["pts"], "last_message_id": r["last_msg_id"],
                })
            topics = [{"channel_id": r["channel_id"], "id": r["id"], "title": r["title"]}
                      for r in st.all("SELECT * FROM topics ORDER BY channel_id, id")]
            messages = []
            for r in st.all("SELECT m.*, d.size, d.file_name, d.mime_type FROM messages m"
                            " LEFT JOIN documents d ON d.id=m.document_id ORDER BY m.channel_id, m.id"):
                doc = None
                if r["document_id"]:
                    doc = {"id": r["document_id"], "size": r["size"], "file_name": r["file_name"],
                           "mime_type": r["mime_type"]}
                photo = None
                if r["photo_id"]:
                    prow = st.photo(r["photo_id"])
                    photo = {"id": r["photo_id"], "label": prow["label"] if prow else "",
                             "sizes": {s["type"]: s["size"] for s in st.photo_sizes(r["photo_id"])}}
                messages.append({
                    "channel_id": r["channel_id"], "id": r["id"], "date": r["date"],
                    "sender_id": r["sender_id"], "text": r["text"], "topic_id": r["topic_id"],
                    "document": doc, "photo": photo, "grouped_id": r["grouped_id"],
                    "deleted": bool(r["deleted"]),
                    "service": json.loads(r["action"])["kind"] if r["action"] else None,
                })
            return {"users": users, "channels": channels, "topics": topics, "messages": messages,
                    "faults": [f.to_dict() for f in self._faults.faults]}

    # -- internal checks ------------------------------------------------------------
    def _require_user(self, user_id: int):
        row = self._state.user(user_id)
        if row is None:
            raise ValueError(f"no such user {user_id}")
        return row

    def _require_channel(self, channel_id: int):
        row = self._state.channel(channel_id)
        if row is None:
            raise ValueError(f"no such channel {channel_id}")
        return row

    def _check_post(self, channel_id: int, topic_id: int | None) -> None:
        channel = self._require_channel(channel_id)
        if topic_id is not None:
            if not channel["forum"]:
                raise ValueError(f"channel {channel_id} is not a forum")
            if topic_id != 1 and self._state.one(
                    "SELECT 1 FROM topics WHERE channel_id=? AND id=?", channel_id, topic_id) is None:
                raise ValueError(f"no topic {topic_id} in channel {channel_id}")


def write_session_file(path: Path, auth_key: bytes, *, dc_id: int = 2, host: str = "127.0.0.1",
                       port: int = 443) -> Path:
    """Write a Telethon SQLiteSession file holding auth_key (mode 0600)."""
    from telethon.sessions import SQLiteSession

    path = Path(path)
    if path.suffix != ".session":
        path = path.with_name(path.name + ".session")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    os.close(fd)
    os.chmod(path, 0o600)
    session = SQLiteSession(str(path))
    try:
        session.set_dc(dc_id, host, port)
        session.auth_key = AuthKey(auth_key)
        session.save()
    finally:
        session.close()
    os.chmod(path, 0o600)
    return path
