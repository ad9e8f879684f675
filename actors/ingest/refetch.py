"""Fetching a lost package again from its source channel (plain logic, no threads).

An ingested archive is uploaded with ``delete_original=True``: once verified,
the cleanup deletes its staged copy and its manifest.  When a message of such a
transfer disappears later, the verifier has nothing to re-upload from and marks
it failed, "lost after cleanup: ..."; its ``on_lost`` hook (wired by the
daemon, :func:`requeue_lost`) puts the archive set(s) ingested as that transfer
back to "ready" (storage ``requeue_lost_package``: durable, so a crash before
the re-fetch loses nothing; the set keeps its transfer id, which marks it as a
re-fetch).  The IngestActor claims it on the next scan of its channel like any
ready set, and :meth:`actors.ingest.pipeline.SetWorker.process` hands it to
:meth:`SetWorker._refetch`, which

1. downloads the set again from its source messages (fresh file references,
   the usual resumable download into the same staging folder).  A source
   message that is gone or carries another document, or a content whose
   sha256 is not the transfer's: the package is lost for good -- an ERROR log
   line, ``stashd_ingest_refetch_total{result="source_gone"}``, the set
   "failed" and the transfer stays failed with that added to its reason;
   nothing of other content is uploaded in its place;
2. claims the content hash for the lost transfer itself
   (``claim_content(sha, owner, lease, transfer_id)``: the package row of the
   lost transfer does not count as "already stored" for its own re-fetch,
   while any *other* set with the same content still finds the package and is
   skipped as its duplicate -- it is being restored, never uploaded twice);
   another live claim -> left for a later round;
3. rebuilds the manifest with :func:`restored_manifest`: the same split as
   the stored parts (offset, length, sha256 and file name of every part are
   compared; any difference refuses the re-fetch), the random_id of every part
   that still has its message kept, a fresh random_id for each lost part
   (written into the manifest first, then ``set_part_random_id``, as for any
   re-upload), the caption rebuilt from the mapping with the transfer's
   marker;
4. moves the transfer failed -> uploading (attempts reset) and the set to
   "uploading": the dispatcher sends only the parts without a message, phase 2
   marks the set ingested again, the verifier checks and, after the grace
   period, cleans the staged copy again.

Lost parts are the parts the verifier did not see since the loss: no message
id, or no ``verified_at`` (``record_check`` clears it on a miss).  A part that
is re-sent although it was present would be a second copy; a part that went
missing after the loss is found by the next check and re-uploaded from the
restored manifest while the staged copy is there.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

from loguru import logger

from storage.manifest import UPLOAD_CHUNK_SIZE, Manifest, plan_sources, plan_split, random_int64

__all__ = ["LOST_PREFIX", "RefetchError", "lost_parts", "marked_reason", "requeue_lost",
           "restored_manifest", "same_split_limit"]

LOST_PREFIX = "lost after cleanup"

log = logger.bind(actor="ingest")


class RefetchError(Exception):
    """The set fetched again cannot be the lost transfer (another split, another content)."""


def lost_parts(parts: Sequence[Any]) -> list[int]:
    """Indexes of the parts to send again: no message, or not seen since the loss."""
    return [p.index for p in parts if p.message_id is None or p.verified_at is None]


def _round_up(n: int) -> int:
    return max(UPLOAD_CHUNK_SIZE, -(-n // UPLOAD_CHUNK_SIZE) * UPLOAD_CHUNK_SIZE)


def same_split_limit(sizes: Sequence[int], parts: Sequence[Any]) -> int:
    """A size limit under which the manifest builder plans exactly the stored parts'
    (offset, length) for sources of ``sizes``; RefetchError when there is none."""
    spans = [(p.offset, p.length) for p in sorted(parts, key=lambda p: p.index)]
    if not spans:
        raise RefetchError("the transfer has no parts")
    total = sum(sizes)
    candidates = [_round_up(max(length for _, length in spans)), spans[0][1]]
    for limit in candidates:
        if limit < UPLOAD_CHUNK_SIZE:
            continue
        if len(sizes) > 1:
            planned = plan_sources(list(sizes), limit) or plan_split(total, limit)
        else:
            planned = plan_split(total, limit)
        if planned == spans:
            return limit
    raise RefetchError(f"no size limit plans the stored split {spans[:3]}... for sources of {list(sizes)}")


def restored_manifest(transfer: Any, parts: Sequence[Any], built: Manifest, *,
                      rng: Any = None) -> tuple[Manifest, list[int]]:
    """``built`` (a manifest planned from the files fetched again, with the transfer's id)
    made the lost transfer's: checked part by part against the stored parts, random_ids of
    parts that keep their message kept, a fresh one for each lost part. Returns the
    manifest and the lost part indexes. RefetchError when it is not the same content/split."""
    if built.sha256 != transfer.sha256 or built.total_size != transfer.size:
        raise RefetchError(f"the source now holds other content (sha256 {built.sha256[:12]}..., "
                           f"{built.total_size} bytes; lost: {transfer.sha256[:12]}..., "
                           f"{transfer.size} bytes)")
    if built.transfer_id != transfer.id:
        raise RefetchError(f"manifest of {built.transfer_id}, not {transfer.id}")
    stored = sorted(parts, key=lambda p: p.index)
    if len(built.parts) != len(stored):
        raise RefetchError(f"{len(built.parts)} parts planned, {len(stored)} stored")
    for plan, part in zip(built.parts, stored):
        mine = (plan.offset, plan.length, plan.sha256, plan.file_name)
        theirs = (part.offset, part.length, part.sha256, part.file_name)
        if mine != theirs:
            raise RefetchError(f"part {part.index + 1}: planned {mine}, stored {theirs}")
    lost = lost_parts(stored)
    manifest = built
    for part in stored:
        if part.index in lost:
            rid = random_int64(rng) if rng is not None else random_int64()
            manifest = manifest.with_random_id(part.index, rid)
        else:
            manifest = manifest.with_random_id(part.index, part.random_id)
    return manifest, lost


def requeue_lost(storage: Any, *, wake: Callable[[list[int]], Any] | None = None,
                 metrics: Any = None) -> Callable[..., list[str]]:
    """The verifier's ``on_lost(transfer, parts, missing)`` hook: the archive set(s) that
    were ingested as the lost transfer go back to "ready" to be fetched again from their
    source (storage ``requeue_lost_package``); then ``wake(channel_ids)`` (the daemon: a
    ScanNow per source channel to the IngestActor, whose scan claims ready sets). A transfer
    that did not come from ingest: nothing."""

    def on_lost(transfer: Any, parts: Sequence[Any], missing: Sequence[int]) -> list[str]:
        keys = storage.requeue_lost_package(
            transfer.id, reason=f"fetching again: transfer {transfer.id} lost after cleanup "
                                f"(part(s) {[i + 1 for i in missing]})")
        if not keys:
            return keys
        log.warning("transfer {} lost after cleanup came from ingest: set(s) {} queued to be "
                    "fetched again from the source channel", transfer.id, keys)
        fn = getattr(metrics, "record_refetch", None) if metrics is not None else None
        if fn is not None:
            fn("requeued", len(keys))
        if wake is not None:
            try:
                sets = [storage.get_archive_set(k) for k in keys]
                wake(sorted({s.channel_id for s in sets if s is not None}))
            except Exception as exc:  # noqa: BLE001 - the next scheduled scan claims it anyway
                log.warning("could not wake ingest for the re-fetch: {}", exc)
        return keys

    return on_lost


def marked_reason(transfer: Any, why: str) -> str:
    """The lost transfer's reason with the re-fetch's verdict added once."""
    base = transfer.reason or LOST_PREFIX
    base = base.split("; re-fetch: ", 1)[0]
    return f"{base}; re-fetch: {why}"

