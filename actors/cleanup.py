"""Cleanup after verification (issue 4): plain logic, called by the Verifier.

:class:`Cleaner`:

    Cleaner(storage, *, grace_seconds, clock=time.time, unlink=os.unlink)
    cleanup_due_at(transfer, parts) -> float
        # when the grace period ends: the newest sent_at and verified_at of
        # ``parts`` (the messages that back the transfer: the referenced
        # transfer's parts for a duplicate) + grace; inf while a part is not
        # verified (verified_at is "verified since", storage/transfers.py)
    clean(transfer, parts=None, *, lease_owner=None, next_check_at=UNSET,
          confirm=None) -> CleanupResult
        # only a transfer that storage says is "verified" with every part
        # verified at least ``grace`` ago (re-read before anything is touched;
        # a duplicate: its reference verified/cleaned); then ``confirm(transfer,
        # parts)`` -- the verifier's fresh GetMessages of the messages -- is
        # called right before the first file is removed: a reason (not None)
        # raises CleanupRefusedError and nothing is deleted; then the original
        # is deleted if
        # transfer.delete_original and it still matches the manifest's size and
        # mtime (never a file changed since), temporary files beside the
        # manifest removed, the manifest removed unless the original was kept
        # (below), and last the state -> "cleaned" (mark_transfer_cleaned; an
        # interrupted cleanup is simply repeated).
        # The transfer and parts rows (message ids) stay as the compact record.
        # A failed/unverified transfer keeps everything (TransferStateError).
        # Temporary split files: none exist today (parts are read from the
        # original with pread); sources of ingested archives are the staging
        # files and follow delete_original like any original.

CleanupResult(transfer_id, deleted_original: bool, removed: tuple[str, ...],
              kept: tuple[str, ...] (files left and why), manifest_kept: bool).

The manifest of a transfer whose original was kept (no delete_original, or
the policy deleted nothing) stays after cleanup, as long as every source is
still the uploaded file (size and mtime): it is the exact plan of what was
sent (split, file names, captions with their marker, block hashes), so a
message lost *after* cleanup is re-uploaded from it like any other miss --
the verifier first proves the original unchanged (size, mtime, sha256 of the
whole content against the transfer's) and writes a fresh random_id into it
(actors.verifier_core).  Keeping the file costs ~32 bytes per MiB of content
and keeps the exact captions and ids; rebuilding a plan from the original
(actors.manifest_restore) is only the fallback for manifests an older cleanup
removed, since it cannot restore a user caption.  An original that was deleted
or changed has nothing to re-upload from, so its manifest is removed as before.
CleanupRefusedError(transfer_id, reason): ``confirm`` said the messages are not
all there (or could not be read) just before the deletion.
CleanupDeferredError(transfer_id, reason): not yet, nothing touched -- an
ingested archive whose package index (phase 2, storage ``get_package_meta``)
is still "pending" needs its staged files; the verifier tries again later.
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from loguru import logger

from storage.manifest import ManifestError, discard_stale_temps, read_manifest
from storage.transfers import UNSET, TransferStateError

__all__ = ["Cleaner", "CleanupDeferredError", "CleanupRefusedError", "CleanupResult"]


class CleanupDeferredError(Exception):
    """Not cleaned yet (something still needs the files): nothing touched, try again later."""

    def __init__(self, transfer_id: str, reason: str):
        super().__init__(f"transfer {transfer_id}: cleanup deferred: {reason}")
        self.transfer_id, self.reason = transfer_id, reason


class CleanupRefusedError(Exception):
    """The fresh look at the messages right before the deletion did not pass: nothing deleted."""

    def __init__(self, transfer_id: str, reason: str):
        super().__init__(f"transfer {transfer_id}: not cleaned: {reason}")
        self.transfer_id, self.reason = transfer_id, reason


@dataclass(frozen=True)
class CleanupResult:
    transfer_id: str
    deleted_original: bool
    removed: tuple[str, ...] = ()     # paths removed (originals, temp files, manifest)
    kept: tuple[str, ...] = ()        # "path: why" for files left in place
    manifest_kept: bool = False       # the original was kept: a lost message can be re-uploaded

    def summary(self) -> str:
        bits = [f"removed {len(self.removed)} file(s)"]
        if self.deleted_original:
            bits.append("original deleted")
        if self.manifest_kept:
            bits.append("manifest kept with the original")
        if self.kept:
            bits.append("kept " + "; ".join(self.kept))
        return ", ".join(bits)


class Cleaner:
    """Deletes what a verified transfer no longer needs (see the module docstring)."""

    def __init__(self, storage: Any, *, grace_seconds: float, clock: Callable[[], float] = time.time,
                 unlink: Callable[[str], None] = os.unlink):
        self.storage, self.grace, self.clock, self._unlink = storage, float(grace_seconds), clock, unlink
        self._log = logger.bind(actor="cleanup")

    def cleanup_due_at(self, transfer: Any, parts: Sequence[Any]) -> float:
        """The newest message backing the transfer must be ``grace`` old, and every part
        verified (without a miss since) for ``grace`` too: a transfer is never cleaned by the
        check that first saw it complete."""
        if any(getattr(p, "verified_at", None) is None for p in parts):
            return math.inf
        times = [t for p in parts for t in (getattr(p, "sent_at", None), p.verified_at)
                 if t is not None]
        newest = max(times) if times else transfer.updated_at
        return newest + self.grace

    def clean(self, transfer: Any, parts: Sequence[Any] | None = None, *, lease_owner: str | None = None,
              next_check_at: Any = UNSET,
              confirm: Callable[[Any, Sequence[Any]], str | None] | None = None) -> CleanupResult:
        """Delete the original (policy), temp files and manifest of a verified transfer, then
        mark it cleaned. Files first, so a crash in between only repeats the (idempotent)
        deletion on the next check; the state check comes before anything is touched."""
        # What the database says now, not what the caller saw: nothing is deleted
        # unless the stored transfer is verified with every part verified.
        transfer = self.storage.get_transfer(transfer.id) or transfer
        parts = self.storage.list_parts(transfer.id)
        if transfer.state != "verified":
            raise TransferStateError(transfer.id, transfer.state, "cleaned",
                                     f"state is {transfer.state!r}; only a verified transfer is cleaned")
        if transfer.duplicate_of is None and (
                not parts or any(p.verified_at is None or p.message_id is None for p in parts)):
            raise TransferStateError(transfer.id, transfer.state, "cleaned", "parts not verified")
        if transfer.duplicate_of is None and self.cleanup_due_at(transfer, parts) > self.clock():
            raise TransferStateError(transfer.id, transfer.state, "cleaned",
                                     f"parts verified less than {self.grace:.0f}s ago")
        if transfer.duplicate_of is not None:
            ref = self.storage.get_transfer(transfer.duplicate_of)
            if ref is None or ref.state not in ("verified", "cleaned"):
                raise TransferStateError(transfer.id, transfer.state, "cleaned",
                                         f"referenced transfer {transfer.duplicate_of} is "
                                         f"{'gone' if ref is None else ref.state}, not verified")
        pending = self._index_pending(transfer)
        if pending:
            raise CleanupDeferredError(transfer.id, pending)
        removed: list[str] = []
        kept: list[str] = []
        deleted = False
        manifest_path = Path(transfer.manifest_path)
        try:
            manifest = read_manifest(manifest_path)
        except ManifestError as exc:
            manifest = None
            if transfer.delete_original and os.path.exists(transfer.source_path):
                kept.append(f"{transfer.source_path}: manifest unreadable, cannot prove it is "
                            f"the uploaded file ({exc})")
        if confirm is not None:  # a fresh look at the messages, right before deleting
            why = confirm(transfer, parts)
            if why is not None:
                raise CleanupRefusedError(transfer.id, why)
        if manifest is not None and transfer.delete_original:
            for src in manifest.sources:
                why = self._unchanged(src)
                if why == "already gone":  # a cleanup interrupted after the deletion
                    continue
                if why is not None:
                    kept.append(f"{src.path}: {why}")
                    continue
                if self._remove(src.path):
                    removed.append(src.path)
                    deleted = True
        manifest_kept = manifest is not None and all(
            self._unchanged(src) is None for src in manifest.sources)
        if manifest is not None:
            if not manifest_kept and self._remove(str(manifest_path)):
                removed.append(str(manifest_path))
            try:
                discard_stale_temps(manifest_path)
            except OSError:
                pass
        self.storage.mark_transfer_cleaned(transfer.id, lease_owner=lease_owner,
                                           next_check_at=next_check_at)
        result = CleanupResult(transfer.id, deleted, tuple(removed), tuple(kept), manifest_kept)
        log = self._log.warning if kept else self._log.info
        log("transfer {} cleaned: {}", transfer.id, result.summary())
        return result

    def _index_pending(self, transfer: Any) -> str | None:
        """Why the staged files are still needed: the package's index is pending."""
        get_meta = getattr(self.storage, "get_package_meta", None)
        if get_meta is None or not getattr(transfer, "sha256", None):
            return None
        meta = get_meta(transfer.sha256)
        if meta is not None and meta.transfer_id == transfer.id and meta.index_state == "pending":
            return "the package's contents are not indexed yet"
        return None

    @staticmethod
    def _unchanged(src: Any) -> str | None:
        """None when the original is still the file that was uploaded (size and mtime)."""
        try:
            st = os.stat(src.path)
        except FileNotFoundError:
            return "already gone"
        except OSError as exc:
            return f"cannot stat ({exc.strerror or exc})"
        if (st.st_size, st.st_mtime_ns) != (src.size, src.mtime_ns):
            return "changed since it was uploaded; not deleted"
        return None

    def _remove(self, path: str) -> bool:
        try:
            self._unlink(path)
            return True
        except FileNotFoundError:
            return False
