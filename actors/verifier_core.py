"""The verifier's logic, without threads: claim due checks, check, act (issue 4).

:class:`Verifier` is driven by the VerifierActor (one pass per Tick) and by
tests with fake ports and an injected clock.  One :meth:`Verifier.run_pass`:

1. ``storage.claim_due_transfers(owner, claim_limit, lease_seconds,
   VERIFY_STATES)`` (uploaded, verifying, verified, cleaned; owner unique per
   process and actor; an expired lease is taken over; a long pass renews the
   leases it has not finished every lease/3);
2. the parts of the claimed transfers are grouped per destination channel and
   their message ids asked in batches of at most ``batch_size`` (<= 100) per
   GetMessages, through the first account of ``port.readers(channel,
   preferred)`` that answers (the accounts that sent the parts first); a part
   is present only when its message exists and carries the expected document
   (:func:`document_mismatch`: size, file name, and the document id recorded
   at send) and, with ``deep_check``, sampled whole 1 MiB blocks downloaded
   with DownloadRange hash to the manifest's block hashes ("not our document"
   is a miss);
3. an error or timeout (every reader failed, or none can read the channel now)
   is NOT a pass: nothing is recorded for the transfer, it is due again after
   ``compute_backoff(consecutive errors)`` (uploaded -> verifying);
4. every part present -> parts verified_at = now unless set ("verified
   since"), state -> verified, next check on the slow cycle
   (``verified_interval_seconds``), or at the end of the cleanup grace period
   when that comes first.  Cleanup is never done by the check that first
   saw the transfer complete: only a transfer claimed as verified whose
   parts were all verified at least ``cleanup_grace_seconds`` ago (and sent
   that long ago) is cleaned, and :class:`actors.cleanup.Cleaner` asks for
   the transfer's messages again (GetMessages, the same present rules, no
   deep check) right before it deletes anything: a miss there takes the
   miss path of step 5, an error the error path of step 3, nothing deleted
   (state -> cleaned only after a fresh pass; still re-checked on the slow
   cycle);
5. misses are recorded (``record_check(missing=...)``: misses += 1; nothing is
   written for a pass but verified_at), then:

   - a cleaned transfer whose original was kept: the Cleaner kept its
     manifest (actors.cleanup), so when the manifest matches the transfer and
     the original is still that content (size, mtime and the sha256 of the
     whole content, equal to the transfer's) the miss takes the rules below
     like any other (cleaned -> verifying; attempts, back-off, adoption, a
     fresh random_id written into the manifest first, then uploading);
     A manifest removed by an older cleanup (before it kept them) is planned
     again from the kept original of a one-file transfer
     (actors.manifest_restore: the stored split, every part's sha256 compared,
     the stored random_ids; captions carry only the marker), on the hashing
     thread; the same rebuild serves a re-upload after ``stashctl retry``;
   - any other cleaned transfer (original deleted or changed, manifest gone
     or not matching) -> failed "lost after cleanup: <miss>; nothing left to
     re-upload from: <why>" (log error, metric, ``on_lost`` hook: where ingest
     fetches an archive again from its source); nothing of other content is
     ever uploaded in its place.  ``stashctl retry`` puts such a transfer
     back to verifying: with the original back as it was (the manifest kept)
     the re-upload follows, else it fails again saying why (with neither the
     manifest nor the original at its path with its size, the daemon refuses
     the retry; an ingested archive's retry fetches it again from its source);
   - ``attempts`` (re-uploads so far; reset only by ``stashctl retry``) >=
     ``max_attempts`` -> failed, everything kept;
   - the next re-upload is not allowed yet (``reupload_allowed_at``: the first
     at once, then ``compute_backoff(attempts)`` after the newest send) ->
     verifying, due when it is;
   - else the original is checked (:func:`check_original`: size, mtime,
     sha256 of the missing parts' ranges; the sha256 of more than 4 MiB runs
     on the actor's hashing thread, :class:`OriginalChecks`: meanwhile the
     transfer is "waiting", nothing recorded, lease released, due again when
     the hash ends): gone or changed -> failed with that
     reason, nothing uploaded; an unreadable manifest -> failed; else the
     ``adopt(transfer, parts, manifest)`` hook (caption-marker search, the
     lost message never counts) may supply an orphan copy, recorded as is;
     every other missing part gets a fresh random_id written into the
     manifest first (``storage.manifest.rewrite_part_random_id``) then into
     storage (``set_part_random_id``: message forgotten); the transfer ->
     uploading (attempts + 1, account cleared): the DispatcherActor resumes
     the parts without a message, and the uploader marks it uploaded again;

6. duplicates (``duplicate_of``, completed by reference) follow the
   referenced transfer after it was checked in the same pass: verified or
   cleaned -> verified (and cleaned per their own policy after the grace
   period of the reference's messages), failed -> failed, else look again
   after ``interval_seconds``.

States therefore move uploaded -> verified (a clean first check) or uploaded
-> verifying (miss or error) -> uploading (re-upload) -> uploaded -> ...;
verified -> verifying when a part goes missing; verified -> cleaned; cleaned
-> failed when a message is lost.

Functions (pure unless noted): ``compute_backoff(attempt, initial, maximum)``,
``batched(items, size)``, ``document_mismatch(part, info)``,
``reupload_allowed_at(transfer, parts, initial, maximum)``,
``sample_blocks(length, samples, rng)``, ``stat_original(manifest)`` (stat
only), ``check_original(manifest, part_indexes=None, cancelled=None)`` (reads
the files).

Ports: :class:`MessagePort` -- ``readers(channel, preferred)`` -> account
names to try, ``get_messages(account, channel, ids)`` -> tuple of MessageInfo |
None (raises on error/timeout), ``download_range(account, document, offset,
limit)`` -> bytes.  :class:`actors.verifier.AccountsMessagePort` implements it
over AccountActor refs.

Metrics (optional, ``Metrics.add_verify_metrics``): record_verify_check(result)
for present/missing/error, record_verify_miss, record_reupload, record_cleanup,
record_lost, set_verify_lag (oldest due check).
"""
from __future__ import annotations

import hashlib
import math
import os
import random
import secrets
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, replace
from typing import Any, Callable, Iterable, Iterator, Protocol, Sequence

from loguru import logger

from actors.cleanup import CleanupDeferredError, CleanupRefusedError
from actors.verifier_messages import TransferOutcome
from storage.errors import StorageError
from storage.manifest import (
    HASH_BLOCK_SIZE, Manifest, ManifestError, ManifestNotFoundError, random_int64, read_manifest,
    rewrite_part_random_id, write_manifest,
)
from storage.transfers import (
    UNSET, VERIFY_STATES, LeaseLostError, PartRecord, TransferRecord, TransferStateError,
)

UNCHECKED = object()           # the original not looked at yet in this check

__all__ = ["MessagePort", "OriginalChecks", "PENDING", "PartCheck", "Verifier", "batched",
           "check_original", "compute_backoff", "document_mismatch", "reupload_allowed_at",
           "sample_blocks", "stat_original", "MAX_IDS_PER_CALL"]

MAX_IDS_PER_CALL = 100          # channels.getMessages returns at most 100 messages
DEFAULT_CLAIM_FACTOR = 5        # transfers claimed per pass = batch_size * this


# -- pure helpers -------------------------------------------------------------------------
def compute_backoff(attempt: int, initial: float, maximum: float) -> float:
    """Delay before try number ``attempt + 1``: 0 for attempt 0, then initial * 2**(attempt-1),
    capped at ``maximum``."""
    if attempt <= 0 or initial <= 0:
        return 0.0
    exponent = min(attempt - 1, 62)  # no float overflow for absurd attempt counts
    return float(min(maximum, initial * math.pow(2, exponent)))


def batched(items: Sequence[Any], size: int) -> Iterator[tuple[Any, ...]]:
    if size <= 0:
        raise ValueError(f"batch size must be > 0, got {size}")
    for start in range(0, len(items), size):
        yield tuple(items[start:start + size])


def document_mismatch(part: PartRecord, info: Any) -> str | None:
    """Why the message ``info`` (MessageInfo or None) does not carry ``part``'s document."""
    if info is None:
        return f"message {part.message_id} is gone"
    doc = getattr(info, "document", None)
    if doc is None:
        return f"message {part.message_id} has no document"
    if doc.size != part.length:
        return f"message {part.message_id}: document size {doc.size}, expected {part.length}"
    if (doc.file_name or "") != part.file_name:
        return f"message {part.message_id}: file name {doc.file_name!r}, expected {part.file_name!r}"
    if part.document_id is not None and doc.id != part.document_id:
        return f"message {part.message_id}: document {doc.id}, expected {part.document_id}"
    return None


def reupload_allowed_at(transfer: TransferRecord, parts: Sequence[PartRecord],
                        initial: float, maximum: float) -> float:
    """Earliest time of the next re-upload: at once for the first one, then
    ``compute_backoff(attempts)`` after the newest send of the transfer."""
    if transfer.attempts <= 0:
        return -math.inf
    sent = [p.sent_at for p in parts if p.sent_at is not None]
    last = max(sent) if sent else transfer.updated_at
    return last + compute_backoff(transfer.attempts, initial, maximum)


def sample_blocks(length: int, samples: int, rng: Any = random) -> list[int]:
    """Distinct 1 MiB block indexes of a document of ``length`` bytes to download
    (sorted; every block when there are no more than ``samples``)."""
    count = -(-length // HASH_BLOCK_SIZE)
    if count <= samples:
        return list(range(count))
    return sorted(rng.sample(range(count), samples))


class OriginalCheckCancelledError(Exception):
    """The verifier stopped while the original was being hashed."""


def _read_range(sources: Sequence[Any], offset: int, length: int,
                cancelled: Any = None) -> Iterator[bytes]:
    """Bytes [offset, offset+length) of the concatenation of ``sources`` (manifest SourceFiles)."""
    start = 0
    for src in sources:
        end = start + src.size
        lo, hi = max(offset, start), min(offset + length, end)
        if lo < hi:
            with open(src.path, "rb") as fh:
                fh.seek(lo - start)
                remaining = hi - lo
                while remaining:
                    if cancelled is not None and cancelled.is_set():
                        raise OriginalCheckCancelledError(src.path)
                    block = fh.read(min(HASH_BLOCK_SIZE, remaining))
                    if not block:
                        raise OSError(f"{src.path}: shorter than expected")
                    remaining -= len(block)
                    yield block
        start = end


def stat_original(manifest: Manifest) -> str | None:
    """Why the original no longer matches the manifest by its metadata (gone, size,
    mtime), or None: the cheap part of :func:`check_original`, no byte read."""
    for src in manifest.sources:
        try:
            st = os.stat(src.path)
        except FileNotFoundError:
            return f"original gone: {src.path}"
        except OSError as exc:
            return f"original unreadable: {src.path}: {exc.strerror or exc}"
        if st.st_size != src.size:
            return f"original changed: {src.path}: size {st.st_size}, uploaded {src.size}"
        if st.st_mtime_ns != src.mtime_ns:
            return f"original changed: {src.path}: modified since it was uploaded (mtime)"
    return None


def hash_bytes(manifest: Manifest, part_indexes: Iterable[int] | None = None) -> int:
    """How many bytes :func:`check_original` reads for ``part_indexes``."""
    if part_indexes is None:
        return manifest.total_size
    return sum(manifest.parts[i].length for i in set(part_indexes))


def check_original(manifest: Manifest, part_indexes: Iterable[int] | None = None, *,
                   cancelled: Any = None) -> str | None:
    """Why the original no longer matches the manifest (gone, size, mtime, sha256), or None.

    ``part_indexes``: hash only those parts' ranges (against their sha256);
    None: the whole content against the manifest's sha256.  ``cancelled``: a
    threading.Event that stops the hashing (OriginalCheckCancelledError).
    """
    changed = stat_original(manifest)
    if changed is not None:
        return changed
    try:
        if part_indexes is None:
            digest = hashlib.sha256()
            for block in _read_range(manifest.sources, 0, manifest.total_size, cancelled):
                digest.update(block)
            if digest.hexdigest() != manifest.sha256:
                return "original changed: content differs from the uploaded sha256"
            return None
        for index in sorted(set(part_indexes)):
            plan = manifest.parts[index]
            digest = hashlib.sha256()
            for block in _read_range(manifest.sources, plan.offset, plan.length, cancelled):
                digest.update(block)
            if digest.hexdigest() != plan.sha256:
                return f"original changed: part {index + 1} differs from the uploaded sha256"
    except OSError as exc:
        return f"original unreadable: {exc.strerror or exc}"
    return None


# -- hashing originals off the verifier's thread ----------------------------------------------
PENDING = object()             # OriginalChecks.verdict: the hash is still running
INLINE_HASH_BYTES = 4 * 1024 * 1024  # hashed on the caller's thread up to this (milliseconds)


class OriginalChecks:
    """The verdict of :func:`check_original` for a re-upload, hashed by ``executor`` (a
    one-thread pool of the VerifierActor) so the actor answers status and VerifyNow while
    a multi-GB original is read; ``executor=None`` (tests of the core): on the caller's
    thread. The metadata (gone, size, mtime) is always looked at at once, on the caller's
    thread: only the sha256 is deferred, and only above ``inline_bytes``.

    ``verdict(transfer_id, manifest, part_indexes)`` -> reason | None | PENDING. PENDING
    starts the hash (one per transfer and question); ``on_done(transfer_id)`` is called
    from the hashing thread when it ends, and the next ``verdict`` with the same question
    (same manifest hash, parts and original size/mtime) returns its result once. A stale
    question of a transfer is dropped when another is asked.
    """

    def __init__(self, executor: Any = None, *, on_done: Callable[[str], Any] | None = None,
                 inline_bytes: int = INLINE_HASH_BYTES, cancelled: Any = None):
        self.executor, self.on_done, self.inline_bytes = executor, on_done, inline_bytes
        self.cancelled = cancelled
        self._futures: dict[tuple, Any] = {}

    @property
    def running(self) -> int:
        return sum(1 for f in self._futures.values() if not f.done())

    def verdict(self, transfer_id: str, manifest: Manifest,
                part_indexes: Iterable[int] | None = None) -> Any:
        changed = stat_original(manifest)
        if changed is not None:
            self._forget(transfer_id)
            return changed
        indexes = None if part_indexes is None else tuple(sorted(set(part_indexes)))
        question = ("hash", manifest.sha256, indexes,
                    tuple((src.path, src.size, src.mtime_ns) for src in manifest.sources))
        return self.deferred(transfer_id, question, hash_bytes(manifest, indexes),
                             check_original, manifest, indexes, cancelled=self.cancelled)

    def deferred(self, transfer_id: str, question: tuple, nbytes: int,
                 fn: Callable[..., Any], *args, **kwargs) -> Any:
        """``fn(*args, **kwargs)`` -- work that reads ``nbytes`` of ``transfer_id``'s
        original -- at once when small or without executor, else on the executor: PENDING
        until it has ended, then its result once (an exception: "original unreadable")."""
        if self.executor is None or nbytes <= self.inline_bytes:
            return fn(*args, **kwargs)
        key = (transfer_id, *question)
        future = self._futures.get(key)
        if future is None:
            self._forget(transfer_id)
            future = self._futures[key] = self.executor.submit(fn, *args, **kwargs)
            if self.on_done is not None:
                future.add_done_callback(lambda _f, tid=transfer_id: self.on_done(tid))
            return PENDING
        if not future.done():
            return PENDING
        del self._futures[key]
        try:
            return future.result()
        except Exception as exc:  # noqa: BLE001 - e.g. cancelled: ask again next time
            return f"original unreadable: {type(exc).__name__}: {exc}"

    def _forget(self, transfer_id: str) -> None:
        for key in [k for k in self._futures if k[0] == transfer_id]:
            self._futures.pop(key).cancel()


# -- ports -----------------------------------------------------------------------------------
class MessagePort(Protocol):
    def readers(self, channel: str, preferred: Sequence[str] = ()) -> list[str]:
        """Account names that may read ``channel`` now, the preferred ones first."""

    def get_messages(self, account: str, channel: str, ids: tuple[int, ...]) -> tuple[Any, ...]:
        """MessageInfo | None per id, in order; raises on error or timeout."""

    def download_range(self, account: str, document: Any, offset: int, limit: int) -> bytes:
        """Raises on error or timeout."""


@dataclass(frozen=True)
class PartCheck:
    transfer_id: str
    index: int
    result: str          # "present" | "missing" | "error"
    detail: str = ""
    account: str | None = None
    info: Any = None     # the MessageInfo seen (present parts)


# -- the verifier --------------------------------------------------------------------------------
class Verifier:
    """One verifier's logic (see the module docstring). Not thread-safe: one caller."""

    def __init__(self, storage: Any, port: MessagePort, settings: Any, *, owner: str,
                 clock: Callable[[], float] = time.time, rng: Any = None, metrics: Any = None,
                 cleaner: Any = None, adopt: Callable[..., Any] | None = None,
                 on_lost: Callable[..., Any] | None = None, claim_limit: int | None = None,
                 originals: OriginalChecks | None = None):
        if not owner:
            raise ValueError("verifier owner must not be empty")
        self.storage, self.port, self.settings = storage, port, settings
        self.owner, self.clock = owner, clock
        self.rng = rng if rng is not None else random.Random(secrets.randbits(64))
        self.metrics = metrics
        if cleaner is None:
            from actors.cleanup import Cleaner
            cleaner = Cleaner(storage, grace_seconds=settings.cleanup_grace_seconds, clock=clock)
        self.cleaner = cleaner
        self.adopt, self.on_lost = adopt, on_lost
        self.originals = originals if originals is not None else OriginalChecks()
        self.batch_size = max(1, min(int(settings.batch_size), MAX_IDS_PER_CALL))
        # a deep check downloads deep_check_samples MiB per document: smaller passes
        factor = 1 if settings.deep_check else DEFAULT_CLAIM_FACTOR
        self.claim_limit = claim_limit or self.batch_size * factor
        self._errors: dict[str, int] = {}   # consecutive failed checks per transfer (memory only)
        self._pending: set[str] = set()     # leased transfers of the running pass not done yet
        self._passes: list[tuple] = []
        self._lost_leases: set[str] = set()
        self._renewed_at = 0.0
        self.calls = 0                      # GetMessages calls made
        self.checks: Counter = Counter()    # part checks by result
        self.outcomes: Counter = Counter()  # transfer outcomes by result
        self.reuploads = self.cleanups = self.lost = 0
        self.last_error: str | None = None
        self._log = logger.bind(actor="verifier")

    # -- a pass ----------------------------------------------------------------------------
    def run_pass(self) -> list[TransferOutcome]:
        """Claim due transfers (one batch), check them, act; returns the outcomes."""
        claimed = self.storage.claim_due_transfers(
            self.owner, self.claim_limit, self.settings.lease_seconds, states=VERIFY_STATES)
        outcomes = self.check(claimed) if claimed else []
        self._update_lag()
        return outcomes

    def run_until_idle(self, max_passes: int = 1000) -> list[TransferOutcome]:
        """Passes until nothing is due (for VerifyNow and tests)."""
        out: list[TransferOutcome] = []
        for _ in range(max_passes):
            got = self.run_pass()
            if not got:
                break
            out += got
        return out

    def check(self, transfers: Sequence[TransferRecord]) -> list[TransferOutcome]:
        """Check transfers leased to us (claim_due_transfers) and act on the results."""
        outcomes: list[TransferOutcome] = []
        self._pending = {t.id for t in transfers}
        self._lost_leases: set[str] = set()
        self._renewed_at = self.clock()
        own = [t for t in transfers if t.duplicate_of is None]
        parts = self.storage.list_parts_many(t.id for t in own)
        results = self._check_parts(own, parts)
        self._passes: list[tuple] = []  # plain passes, written together (record_passes)
        for t in own:
            self._keep_leases()
            self._pending.discard(t.id)
            if t.id in self._lost_leases:
                outcomes.append(TransferOutcome(t.id, "skipped", detail="lease lost during the pass"))
            else:
                outcomes.append(self._guard(t, self._act, t, parts[t.id], results.get(t.id, {})))
        outcomes = self._flush_passes(outcomes)
        for t in transfers:  # duplicates last: they see this pass's verdict on their reference
            if t.duplicate_of is None:
                continue
            self._keep_leases()
            self._pending.discard(t.id)
            if t.id in self._lost_leases:
                outcomes.append(TransferOutcome(t.id, "skipped", detail="lease lost during the pass"))
            else:
                outcomes.append(self._guard(t, self._follow, t))
        self._pending = set()
        for o in outcomes:
            self.outcomes[o.result] += 1
        return outcomes

    def _guard(self, t: TransferRecord, fn: Callable[..., TransferOutcome], *args) -> TransferOutcome:
        """Lease lost or state changed under us: skip this transfer, nothing else."""
        try:
            return fn(*args)
        except LeaseLostError as exc:
            self._log.warning("transfer {}: lease lost, skipped: {}", t.id, exc)
            return TransferOutcome(t.id, "skipped", detail=str(exc))
        except TransferStateError as exc:
            self._log.warning("transfer {}: state changed under the check, skipped: {}", t.id, exc)
            self._release(t.id)
            return TransferOutcome(t.id, "skipped", exc.current, detail=str(exc))
        except (OSError, StorageError) as exc:  # disk full, database hiccup: try again later
            delay = max(self.settings.backoff_initial_seconds, 1.0)
            self._log.error("transfer {}: {} while acting on the check; again in {:.0f}s: {}",
                            t.id, type(exc).__name__, delay, exc)
            self._release(t.id, next_check_at=self.clock() + delay)
            return TransferOutcome(t.id, "error", detail=f"{type(exc).__name__}: {exc}")

    def _flush_passes(self, outcomes: list[TransferOutcome]) -> list[TransferOutcome]:
        """Write the plain passes of this pass in one transaction; a transfer whose lease
        was lost meanwhile becomes "skipped"."""
        batch, self._passes = self._passes, []
        if not batch:
            return outcomes
        written = set(self.storage.record_passes(batch, lease_owner=self.owner))
        out = []
        for o in outcomes:
            if o.result == "verified" and o.transfer_id in {b[0] for b in batch} \
                    and o.transfer_id not in written:
                self._log.warning("transfer {}: lease lost before the pass was written", o.transfer_id)
                o = TransferOutcome(o.transfer_id, "skipped", detail="lease lost before the pass was written")
            out.append(o)
        return out

    def _keep_leases(self) -> None:
        """A long pass (slow accounts, deep checks) renews the leases of the transfers it has
        not finished every lease/3, so no other verifier takes them over meanwhile; a lease
        that could not be renewed is dropped from the pass."""
        lease = self.settings.lease_seconds
        now = self.clock()
        if now - self._renewed_at < lease / 3:
            return
        self._renewed_at = now
        for tid in sorted(self._pending - self._lost_leases):
            try:
                ok = self.storage.renew_transfer_lease(tid, self.owner, lease)
            except StorageError as exc:
                self._log.warning("transfer {}: renewing the lease failed: {}", tid, exc)
                ok = False
            if not ok:
                self._lost_leases.add(tid)

    def _release(self, transfer_id: str, next_check_at=UNSET) -> None:
        try:
            self.storage.release_transfer_lease(transfer_id, self.owner, next_check_at=next_check_at)
        except StorageError as exc:
            self._log.warning("transfer {}: releasing the lease failed: {}", transfer_id, exc)

    # -- looking at the channel -----------------------------------------------------------
    def _check_parts(self, transfers: Sequence[TransferRecord],
                     parts: dict[str, list[PartRecord]]) -> dict[str, dict[int, PartCheck]]:
        """Every sent part of ``transfers``: present / missing / error, batched per channel."""
        by_channel: dict[str, list[tuple[TransferRecord, PartRecord]]] = defaultdict(list)
        for t in transfers:
            for p in parts.get(t.id, []):
                if p.message_id is not None:
                    by_channel[t.destination].append((t, p))
        results: dict[str, dict[int, PartCheck]] = defaultdict(dict)
        for channel, items in by_channel.items():
            preferred = [a for a, _ in Counter(p.account for _, p in items if p.account).most_common()]
            for batch in batched(items, self.batch_size):
                self._keep_leases()
                for check in self._check_batch(channel, batch, preferred):
                    results[check.transfer_id][check.index] = check
        return results

    def _check_batch(self, channel: str, batch: Sequence[tuple[TransferRecord, PartRecord]],
                     preferred: Sequence[str]) -> list[PartCheck]:
        ids = tuple(p.message_id for _, p in batch)
        readers = self.port.readers(channel, preferred)
        errors = []
        for account in readers:
            self.calls += 1
            try:
                found = tuple(self.port.get_messages(account, channel, ids))
            except Exception as exc:  # noqa: BLE001 - any failure is "not checked", never a pass
                errors.append(f"{account}: {type(exc).__name__}: {exc}")
                continue
            if len(found) != len(ids):
                errors.append(f"{account}: {len(found)} replies for {len(ids)} ids")
                continue
            checks = []
            for (t, p), info in zip(batch, found):
                why = document_mismatch(p, info)
                if why is None:
                    checks.append(PartCheck(t.id, p.index, "present", account=account, info=info))
                else:
                    checks.append(PartCheck(t.id, p.index, "missing", why, account=account))
            return checks
        detail = "; ".join(errors) if errors else f"no account can read {channel} now"
        self.last_error = detail
        self._log.warning("checking {} message(s) in {} failed (retried later): {}", len(ids),
                          channel, detail)
        return [PartCheck(t.id, p.index, "error", detail) for t, p in batch]

    def _deep_check(self, t: TransferRecord, checks: dict[int, PartCheck]) -> dict[int, PartCheck]:
        """Sampled 1 MiB blocks of each present document against the manifest's block hashes."""
        try:
            manifest = read_manifest(t.manifest_path)
        except ManifestError as exc:  # cleaned (manifest removed): metadata check only
            self._log.debug("transfer {}: no deep check ({})", t.id, exc)
            return checks
        out = dict(checks)
        for index, c in checks.items():
            if c.result != "present" or c.info is None or index >= len(manifest.parts):
                continue
            plan = manifest.parts[index]
            for block in sample_blocks(plan.length, self.settings.deep_check_samples, self.rng):
                try:
                    data = self.port.download_range(c.account, c.info.document,
                                                    block * HASH_BLOCK_SIZE, HASH_BLOCK_SIZE)
                except Exception as exc:  # noqa: BLE001
                    out[index] = replace(c, result="error", detail=f"deep check download: "
                                                                   f"{type(exc).__name__}: {exc}")
                    break
                if hashlib.sha256(data).digest() != plan.chunk_hashes[block]:
                    out[index] = replace(c, result="missing",
                                         detail=f"message {c.info.id}: not our document "
                                                f"(block {block} differs)")
                    break
        return out

    # -- acting on one transfer -------------------------------------------------------------
    def _act(self, t: TransferRecord, parts: list[PartRecord],
             checks: dict[int, PartCheck]) -> TransferOutcome:
        now = self.clock()
        s = self.settings
        if s.deep_check and checks and all(c.result == "present" for c in checks.values()):
            checks = self._deep_check(t, checks)
        for c in checks.values():
            self.checks[c.result] += 1
            self._metric("record_verify_check", c.result)
        unsent = [p.index for p in parts if p.message_id is None]
        errored = sorted(i for i, c in checks.items() if c.result == "error")
        missing = sorted(i for i, c in checks.items() if c.result == "missing")
        if errored:
            n = self._errors[t.id] = self._errors.get(t.id, 0) + 1
            delay = max(compute_backoff(n, s.backoff_initial_seconds, s.backoff_max_seconds), 0.0)
            detail = checks[errored[0]].detail
            self.storage.record_check(
                t.id, next_check_at=now + delay, lease_owner=self.owner, release_lease=True,
                state="verifying" if t.state == "uploaded" else None)
            return TransferOutcome(t.id, "error", "verifying" if t.state == "uploaded" else t.state,
                                   detail=f"check {n} not made, next in {delay:.0f}s: {detail}")
        self._errors.pop(t.id, None)
        if not missing and not unsent:
            return self._passed(t, parts, sorted(checks), now)
        why = "; ".join(checks[i].detail for i in missing) or \
            f"part(s) {[i + 1 for i in unsent]} have no message"
        if missing:
            self._metric("record_verify_miss", len(missing))
            self._log.warning("transfer {}: part(s) {} missing: {}", t.id,
                              [i + 1 for i in missing], why)
        present = sorted(i for i, c in checks.items() if c.result == "present")
        changed: Any = UNCHECKED  # the verdict on the original, once asked (hashed once)
        if t.state == "cleaned":
            kept = self._kept_original(t)
            if kept is PENDING:
                return self._hashing(t, missing, why)
            if kept is not None:
                return self._lost(t, parts, present, missing, why, kept)
            changed = None
            self._log.warning("transfer {}: part(s) {} lost after cleanup; the original was kept "
                              "and is unchanged: re-uploaded from its manifest", t.id,
                              [i + 1 for i in missing])
        if t.attempts >= s.max_attempts:
            reason = (f"part(s) {[i + 1 for i in missing + unsent]} missing after "
                      f"{t.attempts} re-upload(s): {why}")
            rec = self.storage.record_check(t.id, present=present, missing=missing, state="failed",
                                            reason=reason, next_check_at=None,
                                            lease_owner=self.owner, release_lease=True)
            self._log.error("transfer {} failed: {}", t.id, reason)
            return TransferOutcome(t.id, "failed", rec.state, tuple(missing), reason)
        allowed = reupload_allowed_at(t, parts, s.backoff_initial_seconds, s.backoff_max_seconds)
        if now < allowed:
            rec = self.storage.record_check(t.id, present=present, missing=missing,
                                            state="verifying", next_check_at=allowed,
                                            lease_owner=self.owner, release_lease=True)
            return TransferOutcome(t.id, "waiting", rec.state, tuple(missing),
                                   f"re-upload {t.attempts + 1} in {allowed - now:.0f}s: {why}")
        if changed is UNCHECKED:
            changed = self._original_verdict(t, missing + unsent)
            if changed is PENDING:
                return self._hashing(t, missing, why)
        self.storage.record_check(t.id, present=present, missing=missing, state="verifying",
                                  lease_owner=self.owner)
        return self._reupload(t, parts, missing, unsent, why, changed=changed)

    def _original_verdict(self, t: TransferRecord, indexes: list[int]) -> Any:
        """check_original of the parts to send again (off this thread when large): reason,
        None, PENDING, or UNCHECKED when the manifest cannot be read (_reupload says why)."""
        try:
            manifest = read_manifest(t.manifest_path)
        except ManifestNotFoundError:
            return self._rebuild(t)
        except ManifestError:
            return UNCHECKED
        return self.originals.verdict(t.id, manifest, indexes)

    def _rebuild(self, t: TransferRecord) -> Any:
        """No manifest (a cleanup by a stashd that did not keep it): a one-file transfer
        whose original was kept gets it planned again from the original
        (actors.manifest_restore: the stored split, every part's sha256 compared, the
        stored random_ids) and written: None; or why not (str); PENDING while it is read
        on the hashing thread; UNCHECKED when there is no original to rebuild from."""
        if t.delete_original or t.duplicate_of is not None:
            return UNCHECKED
        from actors.manifest_restore import rebuild_from_original

        parts = self.storage.list_parts(t.id)
        got = self.originals.deferred(t.id, ("rebuild", t.sha256, t.size), t.size,
                                      rebuild_from_original, t, parts, clock=self.clock)
        if got is PENDING or isinstance(got, str):
            return got
        changed = stat_original(got)  # changed since it was read?
        if changed is not None:
            return changed
        write_manifest(got, t.manifest_path)
        self._log.warning("transfer {}: manifest rebuilt from the kept original {} (removed at "
                          "an earlier cleanup; same split and content, captions carry only the "
                          "marker)", t.id, t.source_path)
        return None

    def _hashing(self, t: TransferRecord, missing: list[int], why: str) -> TransferOutcome:
        """The original is being hashed on the hashing thread: nothing recorded but the
        check time; the lease is released and the transfer due again when the hash ends
        (OriginalChecked to the actor) or, should that never come, after interval_seconds."""
        state = "verifying" if t.state in ("uploaded", "verified") else None
        rec = self.storage.record_check(t.id, state=state,
                                        next_check_at=self.clock() + self.settings.interval_seconds,
                                        lease_owner=self.owner, release_lease=True)
        return TransferOutcome(t.id, "waiting", rec.state, tuple(missing),
                               f"checking the original (sha256) before re-uploading: {why}")

    def _passed(self, t: TransferRecord, parts: list[PartRecord], present: list[int],
                now: float) -> TransferOutcome:
        s = self.settings
        slow = now + s.verified_interval_seconds
        if t.state == "cleaned":
            self._passes.append((t.id, "cleaned", slow, False))
            return TransferOutcome(t.id, "verified", "cleaned")
        # verified in an earlier pass, every part for the grace period: clean, after a
        # fresh look at the messages (a check is a snapshot; the deletion comes later)
        if t.state == "verified" and self.cleaner.cleanup_due_at(t, parts) <= now:
            rec = self.storage.record_check(
                t.id, present=present, state="verified", reason="" if t.reason else None,
                next_check_at=slow, lease_owner=self.owner)
            return self._clean_own(rec, slow)
        after = [p if p.verified_at is not None else replace(p, verified_at=now) for p in parts]
        due = max(self.cleaner.cleanup_due_at(t, after), now)
        self._passes.append((t.id, "verified", min(slow, due), bool(t.reason)))
        return TransferOutcome(t.id, "verified", "verified")

    def _fresh_checks(self, t: TransferRecord, parts: Sequence[PartRecord]) -> dict[int, PartCheck]:
        """The messages of ``parts`` asked again now (the present rules of a check, no deep
        check): index -> PartCheck; a part without a message is missing."""
        checks: dict[int, PartCheck] = {}
        sent = [(t, p) for p in parts if p.message_id is not None]
        preferred = [a for a, _ in Counter(p.account for _, p in sent if p.account).most_common()]
        for batch in batched(sent, self.batch_size):
            for c in self._check_batch(t.destination, batch, preferred):
                checks[c.index] = c
        for p in parts:
            if p.message_id is None:
                checks[p.index] = PartCheck(t.id, p.index, "missing", f"part {p.index + 1} has no message")
        return checks

    @staticmethod
    def _refusal(checks: dict[int, PartCheck]) -> str | None:
        bad = [c for _, c in sorted(checks.items()) if c.result != "present"]
        return "; ".join(f"part {c.index + 1} {c.result}: {c.detail}" for c in bad) if bad else None

    def _clean_own(self, t: TransferRecord, next_check_at: float) -> TransferOutcome:
        """Clean ``t`` if its messages are all there right before the deletion; else act on
        that fresh check (miss path, or error path: nothing recorded as a pass)."""
        fresh: dict[int, PartCheck] = {}
        seen: list[list[PartRecord]] = []

        def confirm(current: TransferRecord, parts: Sequence[PartRecord]) -> str | None:
            seen.append(list(parts))
            fresh.update(self._fresh_checks(current, parts))
            return self._refusal(fresh)

        try:
            return self._clean(t, [], next_check_at, confirm=confirm)
        except CleanupRefusedError as exc:
            self._log.warning("transfer {}: not cleaned, the fresh check before deleting did "
                              "not pass: {}", t.id, exc.reason)
            current = self.storage.get_transfer(t.id) or t
            return self._act(current, seen[-1] if seen else self.storage.list_parts(t.id), fresh)

    def _clean(self, t: TransferRecord, parts: list[PartRecord], next_check_at: float,
               confirm: Callable[..., str | None] | None = None) -> TransferOutcome:
        try:
            result = self.cleaner.clean(t, parts, lease_owner=self.owner,
                                        next_check_at=next_check_at, confirm=confirm)
        except (TransferStateError, LeaseLostError, CleanupRefusedError):
            raise
        except CleanupDeferredError as exc:  # e.g. an ingested archive not indexed yet
            self._log.info("transfer {}: {}; again in {:.0f}s", t.id, exc.reason,
                           self.settings.interval_seconds)
            self._release(t.id, next_check_at=self.clock() + self.settings.interval_seconds)
            return TransferOutcome(t.id, "verified", t.state, detail=f"cleanup deferred: {exc.reason}")
        except Exception as exc:  # noqa: BLE001 - cleanup retried on a later check
            self._log.error("transfer {}: cleanup failed, retried later: {}", t.id, exc)
            self._release(t.id, next_check_at=self.clock() + self.settings.interval_seconds)
            return TransferOutcome(t.id, "verified", t.state, detail=f"cleanup failed: {exc}")
        self._release(t.id)
        self.cleanups += 1
        self._metric("record_cleanup")
        return TransferOutcome(t.id, "cleaned", "cleaned", detail=result.summary())

    def _kept_original(self, t: TransferRecord) -> str | None:
        """None when a cleaned transfer can be re-uploaded like any miss: its manifest was
        kept (the original was kept at cleanup) and matches the transfer, and the original is
        still that content (size, mtime, sha256 of the whole content); else why not."""
        try:
            manifest = read_manifest(t.manifest_path)
        except ManifestNotFoundError:
            rebuilt = self._rebuild(t)
            if rebuilt is PENDING or rebuilt is None:
                return rebuilt
            if isinstance(rebuilt, str):
                return f"nothing left to re-upload from: {rebuilt}"
            return ("nothing left to re-upload from: the manifest was removed at cleanup "
                    "(the original was deleted or had changed)")
        except ManifestError as exc:
            return f"nothing left to re-upload from: {exc}"
        if manifest.sha256 != t.sha256 or manifest.total_size != t.size:
            return "nothing left to re-upload from: the manifest does not match the transfer"
        changed = self.originals.verdict(t.id, manifest)
        if changed is PENDING or changed is None:
            return changed
        return f"nothing left to re-upload from: {changed}"

    def _lost(self, t: TransferRecord, parts: list[PartRecord], present: list[int],
              missing: list[int], why: str, unrecoverable: str) -> TransferOutcome:
        reason = f"lost after cleanup: {why}; {unrecoverable}"
        rec = self.storage.record_check(t.id, present=present, missing=missing, state="failed",
                                        reason=reason, next_check_at=None,
                                        lease_owner=self.owner, release_lease=True)
        self.lost += 1
        self._metric("record_lost", len(missing))
        self._log.error("TRANSFER {} LOST: {} (source {})", t.id, reason, t.source_path)
        if self.on_lost is not None:  # e.g. ingest fetches an archive again from its source
            try:
                self.on_lost(rec, parts, missing)
            except Exception as exc:  # noqa: BLE001
                self._log.error("transfer {}: on_lost hook failed: {}", t.id, exc)
        return TransferOutcome(t.id, "lost", rec.state, tuple(missing), reason)

    def _fail(self, t: TransferRecord, reason: str, missing: Sequence[int]) -> TransferOutcome:
        rec = self.storage.set_transfer_state(t.id, "failed", reason=reason, next_check_at=None,
                                              lease_owner=self.owner, release_lease=True)
        self._log.error("transfer {} failed: {}", t.id, reason)
        return TransferOutcome(t.id, "failed", rec.state, tuple(missing), reason)

    def _reupload(self, t: TransferRecord, parts: list[PartRecord], missing: list[int],
                  unsent: list[int], why: str, *, changed: Any = UNCHECKED) -> TransferOutcome:
        """Re-upload ``missing`` parts from the manifest (``unsent`` ones already have a fresh id)."""
        if isinstance(changed, str):  # the original, looked at before: gone or changed
            return self._fail(t, changed, missing)
        try:
            manifest = read_manifest(t.manifest_path)
        except ManifestNotFoundError as exc:
            return self._fail(t, f"cannot re-upload: {exc} (cleanup removes the manifest of a "
                                 f"transfer whose original it deleted or found changed)", missing)
        except ManifestError as exc:
            return self._fail(t, f"cannot re-upload: {exc}", missing)
        if changed is UNCHECKED:
            changed = check_original(manifest, missing + unsent)
        if changed is not None:
            return self._fail(t, changed, missing)
        by_index = {p.index: p for p in parts}
        adopted = self._adopt(t, [by_index[i] for i in missing + unsent], manifest)
        for index in missing:
            part = by_index[index]
            if index in adopted:  # an orphan carries this part already: record it, send nothing
                self.storage.set_part_random_id(t.id, index, part.random_id)  # forget the lost one
            else:
                random_id = random_int64(self.rng)
                rewrite_part_random_id(t.manifest_path, index, random_id)  # manifest first
                self.storage.set_part_random_id(t.id, index, random_id)
        for index, (message_id, document_id, account) in sorted(adopted.items()):
            self.storage.record_part_sent(t.id, index, message_id=message_id,
                                          document_id=document_id, account=account)
            self._log.info("transfer {} part {}: adopted message {} (caption marker)", t.id,
                           index + 1, message_id)
        todo = [i for i in missing + unsent if i not in adopted]
        if not todo:
            rec = self.storage.mark_transfer_uploaded(
                t.id, first_check_delay=self.settings.first_check_delay_seconds)
            return TransferOutcome(t.id, "reuploading", rec.state, tuple(missing),
                                   f"adopted existing message(s) for part(s) "
                                   f"{[i + 1 for i in sorted(adopted)]}")
        attempt = t.attempts + 1
        rec = self.storage.set_transfer_state(
            t.id, "uploading", expected=("verifying",), attempts=attempt, account=None,
            reason=f"re-upload {attempt}: {why}", lease_owner=self.owner, release_lease=True)
        self.reuploads += len(todo)
        self._metric("record_reupload", len(todo))
        self._log.warning("transfer {}: re-uploading part(s) {} (attempt {}/{})", t.id,
                          [i + 1 for i in todo], attempt, self.settings.max_attempts)
        return TransferOutcome(t.id, "reuploading", rec.state, tuple(missing), why)

    def _adopt(self, t: TransferRecord, parts: list[PartRecord],
               manifest: Manifest) -> dict[int, tuple[int, int | None, str]]:
        """Messages already carrying these parts (the ``adopt`` hook: a caption-marker
        search), never the lost message itself: index -> (message id, document id, account)."""
        if self.adopt is None or not parts:
            return {}
        try:
            found = dict(self.adopt(t, parts, manifest) or {})
        except Exception as exc:  # noqa: BLE001 - no adoption: upload again
            self._log.warning("transfer {}: adoption search failed, uploading again: {}", t.id, exc)
            return {}
        lost = {p.index: p.message_id for p in parts}
        return {i: v for i, v in found.items() if i in lost and v[0] != lost[i]}

    # -- duplicates ------------------------------------------------------------------------------
    def _follow(self, t: TransferRecord) -> TransferOutcome:
        """A transfer completed by reference takes the referenced transfer's verdict."""
        now = self.clock()
        s = self.settings
        ref = self.storage.get_transfer(t.duplicate_of)
        if ref is None:
            return self._fail(t, f"referenced transfer {t.duplicate_of} does not exist", ())
        if ref.state == "failed":
            return self._fail(t, f"referenced transfer {ref.id} failed: {ref.reason}", ())
        if ref.state in ("verified", "cleaned"):
            slow = now + s.verified_interval_seconds
            if t.state == "cleaned":
                self.storage.record_check(t.id, next_check_at=slow, lease_owner=self.owner,
                                          release_lease=True)
                return TransferOutcome(t.id, "verified", t.state)
            ref_parts = self.storage.list_parts(ref.id)
            due = self.cleaner.cleanup_due_at(t, ref_parts)
            if t.state != "verified" or due > now:  # never cleaned by the check that verified it
                rec = self.storage.record_check(
                    t.id, state="verified", next_check_at=min(slow, max(due, now)),
                    lease_owner=self.owner, release_lease=True)
                return TransferOutcome(t.id, "verified", rec.state)
            rec = self.storage.record_check(t.id, state="verified", next_check_at=slow,
                                            lease_owner=self.owner)
            fresh: dict[int, PartCheck] = {}

            def confirm(*_: Any) -> str | None:  # the reference's messages back this copy
                fresh.update(self._fresh_checks(ref, self.storage.list_parts(ref.id)))
                return self._refusal(fresh)

            try:
                return self._clean(rec, [], slow, confirm=confirm)
            except CleanupRefusedError as exc:
                missing = any(c.result == "missing" for c in fresh.values())
                if missing:  # the reference's own check re-uploads (or reports it lost)
                    self.storage.schedule_check(ref.id)
                self._log.warning("duplicate {}: not cleaned, the fresh check of {} did not "
                                  "pass: {}", t.id, ref.id, exc.reason)
                rec = self.storage.record_check(
                    t.id, state="verifying" if missing else None,
                    next_check_at=now + s.interval_seconds, lease_owner=self.owner,
                    release_lease=True)
                return TransferOutcome(t.id, "following", rec.state, detail=exc.reason)
        # the reference is still on its way (or being re-uploaded): look again later
        state = "verifying" if t.state == "verified" else None
        rec = self.storage.record_check(t.id, state=state, next_check_at=now + s.interval_seconds,
                                        lease_owner=self.owner, release_lease=True)
        return TransferOutcome(t.id, "following", rec.state, detail=f"{ref.id} is {ref.state}")

    # -- metrics -----------------------------------------------------------------------------------
    def _metric(self, name: str, *args) -> None:
        fn = getattr(self.metrics, name, None) if self.metrics is not None else None
        if fn is not None:
            try:
                fn(*args)
            except Exception as exc:  # noqa: BLE001 - metrics never break a check
                self._log.debug("metric {} failed: {}", name, exc)

    def lag_seconds(self) -> float:
        oldest = self.storage.oldest_due_check()
        return 0.0 if oldest is None else max(0.0, self.clock() - oldest)

    def _update_lag(self) -> None:
        if self.metrics is not None and getattr(self.metrics, "set_verify_lag", None):
            try:
                self._metric("set_verify_lag", self.lag_seconds())
            except StorageError:
                pass
