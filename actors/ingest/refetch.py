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
   skipped as its duplicate once it is being restored -- never uploaded
   twice); another live claim -> left for a later round.  Until then the
   failed package holds nothing: another copy of the content found meanwhile
   (a set in another channel, a local upload) is uploaded and becomes the
   package (storage ``claim_content``, ``mark_transfer_uploaded``), and the
   re-fetch, before or after its download, finds that package: the set is
   skipped as its duplicate, the transfer stays failed ("not needed, the
   content was stored again as ..."), ``result="stored_again"``;
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

A requeued set is claimed only by the scan of its channel.  When no mapping of
the IngestActor scans that channel any more (its ``[[ingest.mappings]]`` entry or
its account removed from the config) and no other process has scanned it
lately, the set would wait "ready" for ever: the IngestActor ends it
(:func:`unmapped_channels`, :meth:`SetWorker.end_unmapped_refetches`): an ERROR
log line, ``result="no_mapping"``, the set "failed" and the transfer's reason
"... re-fetch: IMPOSSIBLE, no ingest mapping for source channel <id> any more;
add it back and run stashctl retry <transfer>".  ``stashctl retry`` of a
transfer lost after cleanup whose re-fetch failed puts its set(s) back to
"ready" (``requeue_lost_package(states=("failed",))``) and wakes the scan of the
channel: the re-fetch runs again (and ends the same way while the mapping is
still missing).

Lost parts are the parts the verifier did not see since the loss: no message
id, or no ``verified_at`` (``record_check`` clears it on a miss).  A part that
is re-sent although it was present would be a second copy; a part that went
missing after the loss is found by the next check and re-uploaded from the
restored manifest while the staged copy is there.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping, Sequence

from loguru import logger

from actors.manifest_restore import RestoreError as RefetchError
from actors.manifest_restore import lost_parts, restored_manifest, same_split_limit

__all__ = ["LOST_PREFIX", "RefetchError", "lost_parts", "marked_reason", "no_mapping_reason",
           "requeue_lost", "restored_manifest", "same_split_limit", "unmapped_channels"]

LOST_PREFIX = "lost after cleanup"

log = logger.bind(actor="ingest")


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


def unmapped_channels(channel_ids: Iterable[int],
                      resolved: Mapping[str, Iterable[int] | None]) -> set[int]:
    """Of ``channel_ids`` (of sets waiting for a re-fetch), those no current mapping scans.

    ``resolved``: each current mapping label -> the channel ids it scans, or None while
    that is not known yet (a mapping by username before its first scan resolved it): then
    none is declared unmapped, as it may be any of them."""
    if any(ids is None for ids in resolved.values()):
        return set()
    mapped = {int(c) for ids in resolved.values() for c in ids}
    return {int(c) for c in channel_ids} - mapped


def no_mapping_reason(channel_id: int, transfer_id: str) -> str:
    """The re-fetch verdict of a lost transfer whose source channel is not mapped any more."""
    return (f"IMPOSSIBLE, no ingest mapping for source channel {channel_id} any more; add it "
            f"back and run stashctl retry {transfer_id}")


def marked_reason(transfer: Any, why: str) -> str:
    """The lost transfer's reason with the re-fetch's verdict added once."""
    base = transfer.reason or LOST_PREFIX
    base = base.split("; re-fetch: ", 1)[0]
    return f"{base}; re-fetch: {why}"

