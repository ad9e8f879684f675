"""Cleanup after verification (issue 4): plain logic, called by the Verifier.

:class:`Cleaner`:

    Cleaner(storage, *, grace_seconds, clock=time.time, unlink=os.unlink)
    cleanup_due_at(transfer, parts, reference_parts=None) -> float
        # when the grace period ends: newest sent_at of the messages that
        # back the transfer (the referenced transfer's for a duplicate) + grace
    clean(transfer, parts, *, lease_owner=None, next_check_at=UNSET) -> CleanupResult
        # only a "verified" transfer whose every part is verified (storage
        # refuses otherwise: mark_transfer_cleaned); order: the state moves to
        # "cleaned" first, then the original is deleted if transfer.delete_original
        # (and it still matches the manifest's size/mtime), temporary split files
        # (manifest-listed temp sources, none today) and the manifest removed;
        # the transfer and parts rows (message ids) stay as the compact record.
        # A failed/unverified transfer keeps everything.

CleanupResult(transfer_id, deleted_original: bool, removed: tuple[str, ...],
              kept: tuple[str, ...] (files left and why)).
"""
