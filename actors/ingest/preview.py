"""A set's preview from Telegram: the photo of its source message or of its album.

The rule (issue 5, "take a preview image when the archive or the source
message has one"): **the archive's own image wins**; only when the index of the
archive gives no preview (no image member, or an encrypted/corrupt archive) is
the Telegram photo used, in this order:

1. a photo on one of the set's own messages (MessageInfo.photo);
2. a photo message in the same album (the same ``grouped_id`` as one of the
   set's messages), the nearest one to the set's first message, earlier first.

Album neighbours are found with one GetMessages over the ids around the set
(an album is at most 10 messages, sent with consecutive ids).

Phase 1 (``SetWorker.process``, which has the account) downloads the photo when
it queues the set's transfer and keeps it beside the staged archive files as
``.preview-<origin>-<message id>.jpg`` (``stage_source_photo``); phase 2 (the
index, which has no account) takes it when the archive has no image of its own
(``choose_preview``) and removes it (``discard_staged_photo``). The rendition is
the largest one of at most ``PREVIEW_MAX_BYTES`` (the cap of archive previews);
a photo with none that small gives no preview. ``preview_name`` records where
the preview came from: an archive member path, or ``"album photo of message N"``
/ ``"photo of message N"`` (N in the package's source channel).

Fetching the photo never fails a set: an error is logged and the set goes on
without it.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Sequence

from loguru import logger

from actors.account_messages import DownloadPhoto, MessageInfo, PhotoInfo
from actors.asking import ask_async
from actors.ingest.index import PREVIEW_MAX_BYTES

__all__ = ["ALBUM_MAX", "STAGED_PREFIX", "SourcePhoto", "choose_preview", "discard_staged_photo",
           "find_source_photo", "preview_size_type", "stage_source_photo", "staged_photo"]

ALBUM_MAX = 10            # messages in one Telegram album
STAGED_PREFIX = ".preview-"
ORIGINS = {"album": "album photo of message {}", "message": "photo of message {}"}

log = logger.bind(actor="ingest")


class SourcePhoto:
    """A photo found for a set: the message that carries it and how it is related."""

    __slots__ = ("photo", "message_id", "origin")

    def __init__(self, photo: PhotoInfo, message_id: int, origin: str):
        self.photo, self.message_id, self.origin = photo, message_id, origin

    def __repr__(self) -> str:
        return f"SourcePhoto({self.origin}, message {self.message_id}, {self.photo.size_type})"


def preview_size_type(photo: PhotoInfo, cap: int = PREVIEW_MAX_BYTES) -> str | None:
    """The largest rendition of at most ``cap`` bytes (None: every one is larger)."""
    sizes = photo.sizes or ((photo.size_type, photo.size),)
    fitting = [(size, kind) for kind, size in sizes if 0 < size <= cap]
    return max(fitting)[1] if fitting else None


async def find_source_photo(port: Any, channel: Any,
                            messages: Sequence[MessageInfo | None]) -> SourcePhoto | None:
    """The photo of the set's messages themselves, else of their album (see the module doc)."""
    present = [m for m in messages if m is not None]
    for m in present:
        if m.photo is not None:
            return SourcePhoto(m.photo, m.id, "message")
    groups = {m.grouped_id for m in present if m.grouped_id}
    if not groups:
        return None
    own = {m.id for m in present}
    low, high = min(own), max(own)
    ids = tuple(i for i in range(max(1, low - ALBUM_MAX + 1), high + ALBUM_MAX) if i not in own)[:100]
    if not ids:
        return None
    around = await port.messages(channel, ids)
    found = [m for m in around.messages
             if m is not None and m.photo is not None and m.grouped_id in groups]
    if not found:
        return None
    best = min(found, key=lambda m: (abs(m.id - low), m.id > low))
    return SourcePhoto(best.photo, best.id, "album")


def _staged(folder: Path) -> list[Path]:
    try:
        return sorted(p for p in Path(folder).iterdir() if p.name.startswith(STAGED_PREFIX))
    except OSError:
        return []


async def stage_source_photo(port: Any, channel: Any, messages: Sequence[MessageInfo | None],
                             folder: Path, *, cap: int = PREVIEW_MAX_BYTES,
                             timeout: float | None = None) -> Path | None:
    """Download the set's Telegram photo (if any) next to its staged files; returns its
    path. Idempotent (an already staged photo is kept); never raises."""
    try:
        if _staged(folder):
            return _staged(folder)[0]
        found = await find_source_photo(port, channel, messages)
        if found is None:
            return None
        size_type = preview_size_type(found.photo, cap)
        if size_type is None:
            log.info("photo of message {} is larger than the preview cap ({} bytes): no preview",
                     found.message_id, cap)
            return None
        request = DownloadPhoto(found.photo, size_type, max_bytes=cap)
        data = await ask_async(port.ref, request, timeout if timeout is not None else port.timeout)
        if not data or len(data) > cap:
            return None
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{STAGED_PREFIX}{found.origin}-{found.message_id}.jpg"
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(data)
        tmp.replace(path)
        return path
    except Exception as exc:  # noqa: BLE001 - a preview is never worth a failed set
        log.warning("no preview from the source message(s): {!r}", exc)
        return None


def staged_photo(paths: Iterable[str | Path]) -> tuple[bytes, str] | None:
    """(bytes, preview_name) of the photo staged beside ``paths`` (a set's staged files)."""
    for folder in dict.fromkeys(Path(p).parent for p in paths):
        for path in _staged(folder):
            stem = path.name[len(STAGED_PREFIX):].rsplit(".", 1)[0]
            origin, _, message_id = stem.rpartition("-")
            if origin not in ORIGINS or not message_id.isdigit() or path.name.endswith(".tmp"):
                continue
            try:
                return path.read_bytes(), ORIGINS[origin].format(int(message_id))
            except OSError:
                continue
    return None


def choose_preview(result: Any, paths: Iterable[str | Path]) -> tuple[bytes | None, str | None]:
    """The index's own preview when it has one, else the staged Telegram photo."""
    if result.preview is not None:
        return result.preview, result.preview_name
    staged = staged_photo(paths)
    return staged if staged is not None else (None, None)


def discard_staged_photo(paths: Iterable[str | Path]) -> None:
    for folder in dict.fromkeys(Path(p).parent for p in paths):
        for path in _staged(folder):
            path.unlink(missing_ok=True)
