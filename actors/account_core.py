"""Account logic that needs no thread: FloodWait ledger, limits, conversions.

The AccountActor is a thin shell over these; tests drive them directly.
"""
from __future__ import annotations

import time
from typing import Any, Callable, Iterable

from telethon.errors import rpcerrorlist
from telethon.tl import types

from actors.account_messages import DocumentInfo, MessageInfo, PhotoInfo
from actors.telegram.errors import CoolingDownError, InvalidRangeError

KIB = 1024
PART_BYTES = 512 * KIB  # largest upload part Telegram accepts
DEFAULT_MAX_PARTS = 4000
DEFAULT_MAX_PARTS_PREMIUM = 8000
DOWNLOAD_ALIGN = 4 * KIB
DOWNLOAD_MAX = 1024 * KIB
MAX_IDS_PER_CALL = 100


# -- FloodWait ledger -------------------------------------------------------------------
class FloodLedger:
    """In-memory view of the persisted FloodWait ledger for one account.

    `check(kind)` refuses (CoolingDownError) while `kind` is cooling down;
    `record(kind, seconds)` keeps the later of the old and new deadline.
    The actor mirrors every record into storage, and loads storage at start.
    """

    def __init__(self, clock: Callable[[], float] = time.time):
        self._clock = clock
        self._until: dict[str, float] = {}

    def load(self, waits: dict[str, float]) -> None:
        for kind, until in waits.items():
            self._until[kind] = max(until, self._until.get(kind, 0.0))

    def record(self, kind: str, seconds: float) -> float:
        until = self._clock() + max(float(seconds), 1.0)  # FLOOD_WAIT_0 still means "not now"
        until = max(until, self._until.get(kind, 0.0))
        self._until[kind] = until
        return until

    def cooling_until(self, kind: str) -> float | None:
        until = self._until.get(kind)
        if until is None:
            return None
        if until <= self._clock():
            del self._until[kind]
            return None
        return until

    def check(self, kind: str) -> None:
        until = self.cooling_until(kind)
        if until is not None:
            raise CoolingDownError(kind, until)

    def active(self) -> dict[str, float]:
        now = self._clock()
        return {k: u for k, u in sorted(self._until.items()) if u > now}


# -- limits -----------------------------------------------------------------------------
def json_value(value: Any) -> Any:
    """A TL JSONValue (help.getAppConfig) as plain Python."""
    if isinstance(value, types.JsonObject):
        return {item.key: json_value(item.value) for item in value.value}
    if isinstance(value, types.JsonArray):
        return [json_value(v) for v in value.value]
    if isinstance(value, (types.JsonNumber, types.JsonString, types.JsonBool)):
        return value.value
    if isinstance(value, types.JsonNull):
        return None
    return value


def upload_limit_bytes(app_config: dict, premium: bool, margin_bytes: int) -> int:
    """Largest file this account may upload: max parts x 512 KiB, minus a safety margin."""
    key = "upload_max_fileparts_premium" if premium else "upload_max_fileparts_default"
    fallback = DEFAULT_MAX_PARTS_PREMIUM if premium else DEFAULT_MAX_PARTS
    try:
        parts = int(app_config.get(key, fallback))
    except (TypeError, ValueError):
        parts = fallback
    return max(parts * PART_BYTES - int(margin_bytes), 0)


# -- requests ---------------------------------------------------------------------------
def request_kind(request: Any) -> str:
    """The ledger/metrics name of a TL request: its class name, e.g. 'SaveBigFilePartRequest'."""
    if isinstance(request, (list, tuple)) and request:
        request = request[0]
    return type(request).__name__


_ERROR_NAMES = {cls: name for name, cls in rpcerrorlist.rpc_errors_dict.items()}


def rpc_error_name(exc: Exception) -> str:
    """Telegram's own error string for a Telethon RPC error.

    Telethon turns a known error into its own class whose ``message`` is only
    the generic 'BAD_REQUEST'; the name ('MEDIA_INVALID', 'FILE_PART_0_MISSING')
    is what callers must act on and what operators must see.
    """
    name = _ERROR_NAMES.get(type(exc))
    if name is not None:
        return name
    which = getattr(exc, "which", None)
    if type(exc).__name__ == "FilePartMissingError" and which is not None:
        return f"FILE_PART_{which}_MISSING"
    return str(getattr(exc, "message", "") or type(exc).__name__)


def check_download_range(offset: int, limit: int) -> None:
    """Telegram's upload.getFile rules, checked before anything is sent."""
    if offset < 0 or limit <= 0:
        raise InvalidRangeError(f"offset {offset} / limit {limit}: must be >= 0 / > 0")
    if offset % DOWNLOAD_ALIGN or limit % DOWNLOAD_ALIGN:
        raise InvalidRangeError(f"offset {offset} and limit {limit} must be multiples of 4096")
    if limit > DOWNLOAD_MAX or DOWNLOAD_MAX % limit:
        raise InvalidRangeError(f"limit {limit} must divide 1 MiB (1048576)")
    if offset // DOWNLOAD_MAX != (offset + limit - 1) // DOWNLOAD_MAX:
        raise InvalidRangeError(f"range {offset}+{limit} crosses a 1 MiB boundary")


def check_ids(ids: Iterable[int]) -> list[int]:
    ids = [int(i) for i in ids]
    if not ids:
        raise ValueError("no message ids given")
    if len(ids) > MAX_IDS_PER_CALL:
        raise ValueError(f"{len(ids)} ids: at most {MAX_IDS_PER_CALL} per call")
    return ids


def bare_channel_id(channel: int) -> int:
    """-1001234 -> 1234; 1234 -> 1234."""
    channel = int(channel)
    if channel < 0:
        text = str(-channel)
        return int(text[3:]) if text.startswith("100") and len(text) > 3 else -channel
    return channel


# -- conversions ------------------------------------------------------------------------
def _epoch(date: Any) -> float:
    if date is None:
        return 0.0
    if hasattr(date, "timestamp"):
        return float(date.timestamp())
    return float(date)


def document_info(doc: Any) -> DocumentInfo | None:
    if not isinstance(doc, types.Document):
        return None
    name = None
    for attr in doc.attributes or ():
        if isinstance(attr, types.DocumentAttributeFilename):
            name = attr.file_name
    return DocumentInfo(
        id=doc.id,
        access_hash=doc.access_hash,
        file_reference=bytes(doc.file_reference or b""),
        size=int(doc.size),
        file_name=name,
        mime_type=doc.mime_type or "application/octet-stream",
        dc_id=doc.dc_id,
    )


def photo_info(photo: Any) -> PhotoInfo | None:
    """A Photo -> PhotoInfo over its downloadable sizes (PhotoSize, PhotoSizeProgressive);
    None when it has none (PhotoEmpty, only inline stripped/cached sizes)."""
    if not isinstance(photo, types.Photo):
        return None
    sizes = []
    for s in photo.sizes or ():
        if isinstance(s, types.PhotoSize):
            sizes.append((s.type, int(s.size)))
        elif isinstance(s, types.PhotoSizeProgressive) and s.sizes:
            sizes.append((s.type, int(max(s.sizes))))
    if not sizes:
        return None
    sizes.sort(key=lambda t: t[1])
    return PhotoInfo(
        id=photo.id,
        access_hash=photo.access_hash,
        file_reference=bytes(photo.file_reference or b""),
        dc_id=photo.dc_id,
        size_type=sizes[-1][0],
        size=sizes[-1][1],
        sizes=tuple(sizes),
    )


def message_topic_id(msg: Any) -> int | None:
    reply = getattr(msg, "reply_to", None)
    if not isinstance(reply, types.MessageReplyHeader) or not reply.forum_topic:
        return None
    return reply.reply_to_top_id or reply.reply_to_msg_id


def message_info(msg: Any, topic_id: int | None = None) -> MessageInfo | None:
    if msg is None or isinstance(msg, types.MessageEmpty):
        return None
    media = getattr(msg, "media", None)
    doc = document_info(media.document) if isinstance(media, types.MessageMediaDocument) else None
    photo = photo_info(media.photo) if isinstance(media, types.MessageMediaPhoto) else None
    return MessageInfo(
        id=msg.id,
        date=_epoch(msg.date),
        text=getattr(msg, "message", "") or "",
        document=doc,
        topic_id=topic_id if topic_id is not None else message_topic_id(msg),
        photo=photo,
        grouped_id=getattr(msg, "grouped_id", None),
    )


def sent_message(updates: Any, random_id: int) -> tuple[int | None, Any]:
    """(message id, message) out of a messages.sendMedia result."""
    found = getattr(updates, "updates", None) or []
    msg_id = next(
        (u.id for u in found if isinstance(u, types.UpdateMessageID) and u.random_id == random_id), None
    )
    new = [
        u.message
        for u in found
        if isinstance(u, (types.UpdateNewChannelMessage, types.UpdateNewMessage))
        and isinstance(u.message, types.Message)
    ]
    if msg_id is None and new:
        msg_id = new[0].id
    message = next((m for m in new if m.id == msg_id), None)
    return msg_id, message


# -- metrics ----------------------------------------------------------------------------
class AccountMetrics:
    """Adapter over actors.metrics.Metrics (or None): never lets metrics break work."""

    def __init__(self, metrics: Any, account: str):
        self._m, self._account = metrics, account

    def request(self, method: str, result: str) -> None:
        if self._m is not None:
            self._m.telegram_requests.labels(account=self._account, method=method, result=result).inc()

    def flood(self, method: str, seconds: float) -> None:
        if self._m is not None:
            self._m.floodwait_seconds.labels(account=self._account, method=method).inc(seconds)

    def state(self, state: str) -> None:
        if self._m is None:
            return
        setter = getattr(self._m, "set_account_state", None)
        if setter is not None:
            setter(self._account, state)
        else:
            self._m.account_state.labels(account=self._account, state=state).set(1)
