"""Marker-based adoption: find the messages an earlier attempt sent but never recorded.

``random_id`` makes a repeated ``messages.sendMedia`` idempotent *per account*
(DESIGN "Idempotent send").  When a transfer (or a re-upload) must continue with
another account than the one that started it, a crash of the first account
between "Telegram accepted the document" and "the message id is recorded" may
have left a message in the destination that the new account's send would
duplicate.  So before the new account uploads anything, the destination is
searched for the transfer's caption marker and every part still without a
message id whose message is found is *adopted*: its message id and document id
are recorded as if the send had just returned.

API (what the uploader and the verifier call)::

    await adopt_orphans(storage, account, transfer_id, *, channel=None,
                        manifest=None, sent_by=None, timeout=60.0,
                        max_pages=20) -> list[int]
        # the 0-based indexes of the parts adopted now (recorded with
        # record_part_sent); parts that already have a message are left alone.
        # ``account``: an AccountActor ref (asked with SearchMessages) or any
        #   object with ``async search(SearchMessages) -> HistoryResult``.
        # ``channel``: where to search (default: the transfer's destination).
        # ``manifest``: the transfer's Manifest when the caller has it (else
        #   read from transfer.manifest_path; only its caption_marker is used,
        #   "#stashd:<transfer id>" is assumed when it cannot be read).
        # ``sent_by``: the account recorded on adopted parts (default: the
        #   transfer's account, i.e. the one that started it, else ``account``'s
        #   name when it has one).
        # Raises what the search raises (TelegramError, FloodWaitError, ...);
        # nothing is recorded for a part unless its message checks out.

    adoptable(parts, messages, transfer_id) -> dict[index, MessageInfo]
        # plain logic (no I/O): for every part without a message id, the
        # message that carries exactly its marker "#stashd:<id>:<n>/<count>"
        # and a document whose size and file name match the part; when several
        # do (duplicates already), the oldest (lowest id).

What is searched: the transfer marker ``#stashd:<transfer id>`` (one search,
paged newest first with ``max_id``, documents only), then each caption is parsed
with :func:`storage.manifest.parse_marker`, so a part is only matched by its own
``<n>/<count>``.  A message whose marker matches but whose document does not
(size or file name differ) is never adopted: the part is uploaded again.

When the dispatcher hands a transfer to another account: see
actors/dispatcher.py (an account that is unconfigured at once; one that is
configured but not running, in error, paused or too small for the parts after
``handover_after`` seconds; never to dodge a FloodWait or a quota).
"""
from __future__ import annotations

from typing import Any, Iterable

from loguru import logger

from actors.account_messages import HistoryResult, MessageInfo, SearchMessages
from storage.manifest import MARKER_PREFIX, ManifestError, parse_marker, read_manifest

__all__ = ["adopt_orphans", "adoptable", "search_marker"]

log = logger.bind(actor="adoption")


def adoptable(parts: Iterable[Any], messages: Iterable[MessageInfo],
              transfer_id: str) -> dict[int, MessageInfo]:
    """Part index -> the message to adopt for it (see module doc)."""
    parts = list(parts)
    count = len(parts)
    wanted = {p.index: p for p in parts if p.message_id is None}
    found: dict[int, MessageInfo] = {}
    for m in sorted(messages, key=lambda m: m.id):
        marker = parse_marker(m.text)
        if marker is None:
            continue
        tid, index, n = marker
        part = wanted.get(index)
        if tid != transfer_id or n != count or part is None:
            continue
        doc = m.document
        if doc is None or doc.size != part.length or doc.file_name != part.file_name:
            log.warning("transfer {} part {}: message {} carries its marker but not its document "
                        "({}); not adopted", transfer_id, index, m.id,
                        "no document" if doc is None else f"{doc.file_name!r}, {doc.size} bytes")
            continue
        if index in found:
            log.warning("transfer {} part {}: message {} duplicates message {}; the oldest is kept",
                        transfer_id, index, m.id, found[index].id)
            continue
        found[index] = m
    return found


async def search_marker(account: Any, channel: Any, marker: str, *, timeout: float = 60.0,
                        max_pages: int = 20) -> list[MessageInfo]:
    """Every document message whose text matches ``marker`` (paged newest first)."""
    out: list[MessageInfo] = []
    max_id = 0
    for _ in range(max_pages):
        res: HistoryResult = await _search(account, SearchMessages(
            channel, marker, documents_only=True, max_id=max_id, limit=100), timeout)
        out.extend(res.messages)
        if not res.next_since_id:
            break
        max_id = res.next_since_id
    return out


async def adopt_orphans(storage: Any, account: Any, transfer_id: str, *, channel: Any = None,
                        manifest: Any = None, sent_by: str | None = None, timeout: float = 60.0,
                        max_pages: int = 20) -> list[int]:
    """Record the messages of parts sent but not recorded; returns the adopted indexes."""
    transfer = storage.get_transfer(transfer_id)
    if transfer is None:
        raise LookupError(f"transfer {transfer_id} not found")
    parts = storage.list_parts(transfer_id)
    if all(p.message_id is not None for p in parts):
        return []
    marker = _caption_marker(transfer, manifest)
    messages = await search_marker(account, channel or transfer.destination, marker,
                                   timeout=timeout, max_pages=max_pages)
    found = adoptable(parts, messages, transfer_id)
    who = sent_by or transfer.account or getattr(account, "name", None) or "unknown"
    adopted = []
    for index, m in sorted(found.items()):
        storage.record_part_sent(transfer_id, index, message_id=m.id, document_id=m.document.id,
                                 account=who)
        storage.clear_journal(transfer_id, index)
        adopted.append(index)
    if adopted:
        log.info("transfer {}: adopted part(s) {} already in {} (sent by {})", transfer_id,
                 [i + 1 for i in adopted], channel or transfer.destination, who)
    return adopted


def _caption_marker(transfer: Any, manifest: Any) -> str:
    if manifest is None:
        try:
            manifest = read_manifest(transfer.manifest_path)
        except ManifestError:
            return f"{MARKER_PREFIX}{transfer.id}"
    return manifest.caption_marker


async def _search(account: Any, message: SearchMessages, timeout: float) -> HistoryResult:
    search = getattr(account, "search", None)
    if callable(search):
        return await search(message)
    from actors.uploader import ask_async  # an AccountActor ref
    return await ask_async(account, message, timeout)
