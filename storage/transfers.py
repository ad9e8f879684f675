"""Durable transfers: states, parts, the chunk journal, content claims, packages.

``Storage`` inherits :class:`TransferStore`, so every method below is called on
the Storage returned by ``storage.open_storage``. Each call is one short
transaction (its own db_session, retried on transient conflicts) and returns
frozen records; time comes from the Storage's injected clock (``now`` below).

API (all on ``Storage``)::

    TRANSFER_STATES = ("planned", "uploading", "uploaded", "verifying",
                       "verified", "cleaned", "failed")
    TRANSFER_TRANSITIONS: dict[state, frozenset[state]]   # allowed moves

    # transfers
    create_transfer(transfer_id, *, source_path, size, sha256, destination,
                    manifest_path, delete_original, parts, account=None)
        -> TransferRecord            # state "planned", next_check_at = now (due at once)
        parts: iterable of (index, offset, length, sha256, file_name, random_id)
        raises TransferExistsError if the id is taken
    get_transfer(transfer_id) -> TransferRecord | None
    list_transfers(state=None, limit=100) -> list[TransferRecord]   # oldest first
    list_parts(transfer_id) -> list[PartRecord]                      # by index
    set_transfer_state(transfer_id, state, *, reason=None, expected=None,
                       next_check_at=UNSET, attempts=None, account=UNSET,
                       release_lease=False, lease_owner=None) -> TransferRecord
        compare-and-set: ``expected`` (a state or a tuple of states) must match
        the current state, else TransferStateError(.current); a move not in
        TRANSFER_TRANSITIONS raises TransferStateError too (same state -> same
        state is always allowed). ``reason`` replaces the stored reason (None
        keeps it, "" clears it). ``release_lease`` clears lease_owner/until.
        ``lease_owner``: refuse (LeaseLostError) unless the transfer is still
        leased to this owner -- a verifier passes its owner id.
    transfers_by_state() -> dict[state, int]      # every state present, zeros too
    transfer_for_sha256(sha256) -> list[TransferRecord]   # oldest first

    # content claims (de-duplication, DESIGN "Claims instead of races")
    claim_content(sha256, owner, lease_seconds, transfer_id=None) -> ClaimResult
        ClaimResult(granted, existing_package, holder, lease_until)
        - a package with that hash exists -> granted False, existing_package =
          its transfer id (checked again after the claim row is written); a
          package whose transfer is "failed" (lost after cleanup, its re-fetch
          pending or impossible; or given up) holds nothing and does not count
        - someone else holds a live lease -> granted False, holder = owner
        - no claim, an expired lease, or our own claim -> granted True
        - the package is ``transfer_id`` itself (a re-upload of a lost part of
          a stored transfer) -> claimed like any other work (granted True
          unless another owner holds a live claim)
    renew_claim(sha256, owner, lease_seconds) -> bool     # False: we lost it
    release_claim(sha256, owner) -> bool
    find_package(sha256) -> PackageRecord | None   # None too when its transfer failed

    # upload progress (phase 1 of the two-phase write)
    record_part_sent(transfer_id, index, *, message_id, document_id, account)
        -> PartRecord   # idempotent for the same message id;
                        # PartConflictError if another message id is recorded
    parts_without_message(transfer_id) -> list[PartRecord]
    set_part_random_id(transfer_id, index, random_id) -> PartRecord
        # for a re-upload: new random_id, clears message_id/document_id/
        # account/sent_at/verified_at (misses kept)
    mark_transfer_uploaded(transfer_id, *, first_check_delay=0.0) -> TransferRecord
        # every part must have a message id (else TransferStateError);
        # state -> "uploaded", next_check_at = now + first_check_delay,
        # lease released, packages row sha256 -> transfer inserted (an existing
        # package for the hash is kept, unless its transfer failed: then this
        # transfer holds the content, the row points here and so do the
        # transfers completed by reference to the failed one and the package
        # metadata still naming it: its index is read from this copy), the
        # content claim of this transfer is released -- all in one transaction
    mark_transfer_duplicate(transfer_id, duplicate_of) -> TransferRecord
        # completed by reference: duplicate_of set, state -> "uploaded",
        # next_check_at = now (the verifier follows duplicate_of)

    # chunk journal (resume inside a part)
    journal_chunk(transfer_id, part_index, chunk_index, account) -> None  (idempotent)
    journal_chunk_many(transfer_id, part_index, chunk_indexes, account) -> None
        # one transaction, one upsert statement per 1000 chunks (idempotent)
    journaled_chunks(transfer_id, part_index, *, account=None, max_age=None) -> set[int]
        # account: only chunks that account sent (uploaded parts are per
        # session); max_age: only chunks acknowledged within that many seconds
    clear_journal(transfer_id, part_index=None) -> int   # None: every part

    # verification (issue 4)
    claim_due_transfers(owner, limit, lease_seconds,
                        states=("uploaded", "verified", "verifying"))
        -> list[TransferRecord]  # next_check_at <= now and no live lease;
        # leased to owner until now + lease_seconds. Two claimers never get
        # the same transfer (PostgreSQL: UPDATE ... FOR UPDATE SKIP LOCKED;
        # SQLite: BEGIN IMMEDIATE, the lease condition re-checked in the UPDATE)
    renew_transfer_lease(transfer_id, owner, lease_seconds) -> bool
    release_transfer_lease(transfer_id, owner, *, next_check_at=UNSET) -> bool
    record_check(transfer_id, *, present=(), missing=(), next_check_at=UNSET,
                 lease_owner=None, state=None, reason=None, release_lease=False)
        -> TransferRecord   # parts in present: verified_at = now unless set
        # (verified_at is "verified since": the first passing check after the
        # part was sent, kept by later passes, so the cleanup grace can count
        # from it); parts in missing: misses += 1, verified_at = None;
        # last_check_at = now; next_check_at set when given; state/reason/
        # release_lease as in set_transfer_state, all in one transaction

    # verifier support (issue 4, W3)
    list_parts_many(transfer_ids) -> dict[transfer_id, list[PartRecord]]  # one query
    record_passes(passes, *, lease_owner) -> list[transfer_id written]
        # many passing checks in one transaction: (transfer_id, state,
        # next_check_at, clear_reason) each; every part verified_at = now
        # unless set (verified since),
        # last_check_at = now, lease released; skipped when the lease is not
        # lease_owner's any more or the state may not move so
    VERIFY_STATES = ("uploaded", "verifying", "verified", "cleaned")   # re-checked states
    schedule_check(transfer_id=None, at=None, states=VERIFY_STATES) -> int
        # next_check_at = at (default now) for one transfer (if in states) or
        # for every transfer in states; leases untouched; returns the count
    oldest_due_check(states=VERIFY_STATES) -> float | None
        # smallest next_check_at that is <= now (lag = now - it), None if none due
    next_check_time(states=VERIFY_STATES) -> float | None
        # smallest next_check_at, due or not (the verifier's idle back-off)
    count_due_checks(states=VERIFY_STATES) -> int   # due now, leased or not
    release_transfer_leases(owner_prefix, *, keep=None) -> int
        # recovery on start: drop leases whose owner starts with owner_prefix
        # (a previous incarnation of this node's verifier), except owners
        # starting with ``keep`` (this process's verifiers)
    mark_transfer_cleaned(transfer_id, *, next_check_at=UNSET, lease_owner=None)
        -> TransferRecord   # verified -> cleaned; refused (TransferStateError)
        # unless state is verified and every part has verified_at (a duplicate:
        # its duplicate_of transfer is verified or cleaned); rows are kept
    retry_transfer(transfer_id) -> TransferRecord     # operator retry of a failed one
        # failed -> uploaded (a duplicate: follows duplicate_of again, due now;
        # if that transfer failed, the live package of its content instead, or
        # with none duplicate_of is dropped and it is uploaded itself, below),
        # -> verifying (every part has a message id; due now: a miss re-uploads),
        # -> uploading (some parts sent), -> planned (none sent); attempts = 0,
        # reason cleared, lease released. TransferStateError unless failed.
        # (stashctl retry asks first whether anything is left to upload from:
        # actors.manifest_restore.nothing_to_upload_from, actors.daemon)

Records: TransferRecord, PartRecord, ClaimResult, PackageRecord (frozen).
Errors (all StorageError): TransferNotFoundError, TransferExistsError,
TransferStateError, LeaseLostError, PartConflictError.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

from pony.orm import count, exists, select

from storage.errors import StorageError
from storage.ingest import take_over_index

TRANSFER_STATES = (
    "planned", "uploading", "uploaded", "verifying", "verified", "cleaned", "failed"
)

# Who may go where. "failed" is reachable from anywhere and is left only by an
# operator's retry; "cleaned" only from "verified" (never delete before that).
TRANSFER_TRANSITIONS: dict[str, frozenset[str]] = {
    "planned": frozenset({"uploading", "uploaded", "failed"}),
    "uploading": frozenset({"planned", "uploaded", "failed"}),
    "uploaded": frozenset({"verifying", "verified", "uploading", "failed"}),
    "verifying": frozenset({"verified", "uploading", "uploaded", "failed"}),
    "verified": frozenset({"verifying", "cleaned", "failed"}),
    "cleaned": frozenset({"verifying", "failed"}),
    "failed": frozenset({"planned", "uploading", "uploaded", "verifying"}),
}

DUE_STATES = ("uploaded", "verified", "verifying")
VERIFY_STATES = ("uploaded", "verifying", "verified", "cleaned")

UNSET = object()


class TransferNotFoundError(StorageError):
    def __init__(self, transfer_id: str):
        self.transfer_id = transfer_id
        super().__init__(f"transfer {transfer_id!r} does not exist")


class TransferExistsError(StorageError):
    def __init__(self, transfer_id: str):
        self.transfer_id = transfer_id
        super().__init__(f"transfer {transfer_id!r} already exists")


class TransferStateError(StorageError):
    """A compare-and-set or a state move was refused; ``current`` is the stored state."""

    def __init__(self, transfer_id: str, current: str, wanted: str, message: str):
        self.transfer_id = transfer_id
        self.current = current
        self.wanted = wanted
        super().__init__(f"transfer {transfer_id!r}: {message}")


class LeaseLostError(StorageError):
    """The caller's lease on a transfer is gone (expired and taken over, or released)."""

    def __init__(self, transfer_id: str, owner: str, holder: str | None):
        self.transfer_id = transfer_id
        self.owner = owner
        self.holder = holder
        super().__init__(
            f"transfer {transfer_id!r}: lease of {owner!r} is lost (held by {holder!r})")


class PartConflictError(StorageError):
    """A part already carries a different message id."""

    def __init__(self, transfer_id: str, index: int, recorded: int, offered: int):
        self.transfer_id = transfer_id
        self.index = index
        self.recorded = recorded
        self.offered = offered
        super().__init__(
            f"transfer {transfer_id!r} part {index}: message {recorded} is recorded, "
            f"refusing {offered}"
        )


@dataclass(frozen=True)
class TransferRecord:
    id: str
    state: str
    source_path: str
    size: int
    sha256: str
    destination: str
    manifest_path: str
    delete_original: bool
    account: str | None
    reason: str | None
    attempts: int
    created_at: float
    updated_at: float
    next_check_at: float | None
    last_check_at: float | None
    lease_owner: str | None
    lease_until: float | None
    duplicate_of: str | None
    part_count: int


@dataclass(frozen=True)
class PartRecord:
    transfer_id: str
    index: int
    offset: int
    length: int
    sha256: str
    file_name: str
    random_id: int
    message_id: int | None
    document_id: int | None
    account: str | None
    sent_at: float | None
    verified_at: float | None
    misses: int


@dataclass(frozen=True)
class ClaimResult:
    granted: bool
    existing_package: str | None  # transfer id of the package already stored
    holder: str | None  # owner of the live claim (ours when granted)
    lease_until: float | None = None


@dataclass(frozen=True)
class PackageRecord:
    sha256: str
    transfer_id: str
    destination: str
    created_at: float


def _check_state(state: str) -> None:
    if state not in TRANSFER_STATES:
        raise ValueError(f"unknown transfer state {state!r}; expected one of {TRANSFER_STATES}")


def _check_lease(t, owner: str | None) -> None:
    """With ``owner`` given, the transfer must still be leased to it."""
    if owner is not None and t.lease_owner != owner:
        raise LeaseLostError(t.id, owner, t.lease_owner)


def _transfer_record(t, part_count: int | None = None) -> TransferRecord:
    return TransferRecord(
        id=t.id,
        state=t.state,
        source_path=t.source_path,
        size=t.size,
        sha256=t.sha256,
        destination=t.destination,
        manifest_path=t.manifest_path,
        delete_original=t.delete_original,
        account=t.account,
        reason=t.reason,
        attempts=t.attempts,
        created_at=t.created_at,
        updated_at=t.updated_at,
        next_check_at=t.next_check_at,
        last_check_at=t.last_check_at,
        lease_owner=t.lease_owner,
        lease_until=t.lease_until,
        duplicate_of=t.duplicate_of,
        part_count=t.parts.count() if part_count is None else part_count,
    )


def _part_record(p) -> PartRecord:
    return PartRecord(
        transfer_id=p.transfer.id,
        index=p.part_index,
        offset=p.offset,
        length=p.length,
        sha256=p.sha256,
        file_name=p.file_name,
        random_id=p.random_id,
        message_id=p.message_id,
        document_id=p.document_id,
        account=p.account,
        sent_at=p.sent_at,
        verified_at=p.verified_at,
        misses=p.misses,
    )


class TransferStore:
    """Mixin for storage.repository.Storage (uses its _run, entities, _clock, db)."""

    _run: Callable
    _clock: Callable[[], float]

    # -- helpers (inside a session) -------------------------------------------

    def _now(self) -> float:
        return float(self._clock())

    def _transfer_for_update(self, transfer_id: str):
        t = self.entities.Transfer.get_for_update(id=transfer_id)
        if t is None:
            raise TransferNotFoundError(transfer_id)
        return t

    def _part_for_update(self, transfer_id: str, index: int):
        t = self._transfer_for_update(transfer_id)
        p = self.entities.TransferPart.get_for_update(transfer=t, part_index=int(index))
        if p is None:
            raise StorageError(f"transfer {transfer_id!r} has no part {index}")
        return t, p

    def _part_counts(self, ids: list[str]) -> dict[str, int]:
        """transfer id -> number of parts, in one query (no N+1)."""
        if not ids:
            return {}
        Part = self.entities.TransferPart
        return {tid: int(n) for tid, n in
                select((p.transfer.id, count(p)) for p in Part if p.transfer.id in ids)}

    # -- transfers --------------------------------------------------------------

    def create_transfer(
        self,
        transfer_id: str,
        *,
        source_path: str,
        size: int,
        sha256: str,
        destination: str,
        manifest_path: str,
        delete_original: bool,
        parts: Iterable[Sequence],
        account: str | None = None,
    ) -> TransferRecord:
        """Insert a transfer in state "planned" with its parts (due at once)."""
        if not transfer_id:
            raise ValueError("transfer id must not be empty")
        plan = []
        for part in parts:
            index, offset, length, part_sha, file_name, random_id = part
            plan.append((int(index), int(offset), int(length), str(part_sha),
                         str(file_name), int(random_id)))
        indexes = [p[0] for p in plan]
        if len(set(indexes)) != len(indexes):
            raise ValueError(f"transfer {transfer_id!r}: duplicate part indexes {indexes}")
        Transfer, Part = self.entities.Transfer, self.entities.TransferPart

        def tx():
            if Transfer.get(id=transfer_id) is not None:
                raise TransferExistsError(transfer_id)
            now = self._now()
            t = Transfer(
                id=transfer_id, state="planned", source_path=str(source_path),
                size=int(size), sha256=str(sha256).lower(), destination=str(destination),
                manifest_path=str(manifest_path), delete_original=bool(delete_original),
                account=account, reason=None, attempts=0, created_at=now, updated_at=now,
                next_check_at=now,
            )
            for index, offset, length, part_sha, file_name, random_id in plan:
                Part(transfer=t, part_index=index, offset=offset, length=length,
                     sha256=part_sha, file_name=file_name, random_id=random_id, misses=0)
            return _transfer_record(t, part_count=len(plan))

        return self._run(tx, write=True, what=f"create transfer {transfer_id!r}")

    def get_transfer(self, transfer_id: str) -> TransferRecord | None:
        Transfer = self.entities.Transfer

        def tx():
            t = Transfer.get(id=transfer_id)
            return None if t is None else _transfer_record(t)

        return self._run(tx, write=False, what=f"read transfer {transfer_id!r}")

    def list_transfers(self, state: str | None = None, limit: int = 100) -> list[TransferRecord]:
        """Transfers (optionally in one state), oldest first."""
        if state is not None:
            _check_state(state)
        Transfer = self.entities.Transfer

        def tx():
            q = Transfer.select()
            if state is not None:
                q = q.filter(lambda t: t.state == state)
            rows = list(q.order_by(Transfer.created_at, Transfer.id).limit(int(limit)))
            counts = self._part_counts([t.id for t in rows])
            return [_transfer_record(t, counts.get(t.id, 0)) for t in rows]

        return self._run(tx, write=False, what="list transfers")

    def transfer_for_sha256(self, sha256: str) -> list[TransferRecord]:
        Transfer = self.entities.Transfer
        sha = str(sha256).lower()

        def tx():
            q = Transfer.select(lambda t: t.sha256 == sha).order_by(Transfer.created_at)
            return [_transfer_record(t) for t in q]

        return self._run(tx, write=False, what="find transfers by hash")

    def list_parts(self, transfer_id: str) -> list[PartRecord]:
        Part = self.entities.TransferPart

        def tx():
            q = Part.select(lambda p: p.transfer.id == transfer_id).order_by(Part.part_index)
            return [_part_record(p) for p in q]

        return self._run(tx, write=False, what=f"list parts of {transfer_id!r}")

    def set_transfer_state(
        self,
        transfer_id: str,
        state: str,
        *,
        reason: str | None = None,
        expected: str | Sequence[str] | None = None,
        next_check_at=UNSET,
        attempts: int | None = None,
        account=UNSET,
        release_lease: bool = False,
        lease_owner: str | None = None,
    ) -> TransferRecord:
        """Move a transfer to ``state`` (compare-and-set when ``expected`` is given)."""
        _check_state(state)
        if isinstance(expected, str):
            expected = (expected,)
        if expected is not None:
            for e in expected:
                _check_state(e)

        def tx():
            t = self._transfer_for_update(transfer_id)
            _check_lease(t, lease_owner)
            current = t.state
            if expected is not None and current not in expected:
                raise TransferStateError(
                    transfer_id, current, state,
                    f"state is {current!r}, expected {' or '.join(map(repr, expected))}")
            if state != current and state not in TRANSFER_TRANSITIONS[current]:
                raise TransferStateError(
                    transfer_id, current, state, f"cannot move from {current!r} to {state!r}")
            changes = dict(state=state, updated_at=self._now())
            if reason is not None:
                changes["reason"] = reason or None
            if next_check_at is not UNSET:
                changes["next_check_at"] = None if next_check_at is None else float(next_check_at)
            if attempts is not None:
                changes["attempts"] = int(attempts)
            if account is not UNSET:
                changes["account"] = account
            if release_lease:
                changes.update(lease_owner=None, lease_until=None)
            t.set(**changes)
            return _transfer_record(t)

        return self._run(tx, write=True, what=f"set state of transfer {transfer_id!r}")

    def transfers_by_state(self) -> dict[str, int]:
        Transfer = self.entities.Transfer

        def tx():
            counts = dict.fromkeys(TRANSFER_STATES, 0)
            for state, n in select((t.state, count(t)) for t in Transfer):
                counts[state] = int(n)
            return counts

        return self._run(tx, write=False, what="count transfers by state")

    # -- content claims -----------------------------------------------------------

    def claim_content(
        self, sha256: str, owner: str, lease_seconds: float, transfer_id: str | None = None
    ) -> ClaimResult:
        """Claim the work on one content hash (see the module docstring)."""
        if not owner:
            raise ValueError("claim owner must not be empty")
        sha = str(sha256).lower()
        Claim = self.entities.ContentClaim

        def package_of() -> str | None:
            # The package of the claiming transfer itself does not count: that is a
            # re-upload of a lost part of the stored package (the verifier, a re-fetch).
            found = self._live_package(sha)
            return None if transfer_id is not None and found == transfer_id else found

        def tx():
            existing = package_of()
            if existing is not None:
                return ClaimResult(False, existing, None, None)
            now = self._now()
            until = now + float(lease_seconds)
            claim = Claim.get_for_update(sha256=sha)  # row lock on PostgreSQL
            if claim is None:  # a racing insert fails on the primary key -> retried
                claim = Claim(sha256=sha, owner=owner, lease_until=until,
                              transfer_id=transfer_id, claimed_at=now)
            elif claim.owner == owner or claim.lease_until <= now:  # ours, or expired
                claim.set(owner=owner, lease_until=until, transfer_id=transfer_id,
                          claimed_at=now)
            else:
                return ClaimResult(False, None, claim.owner, claim.lease_until)
            # Re-check after claiming: a package stored between the first look
            # and the claim row (its transfer released its claim) wins.
            existing = package_of()
            if existing is not None:
                claim.delete()
                return ClaimResult(False, existing, None, None)
            return ClaimResult(True, None, owner, until)

        return self._run(tx, write=True, what="claim content")

    def renew_claim(self, sha256: str, owner: str, lease_seconds: float) -> bool:
        """Extend our claim; False when it is no longer ours (taken over or released)."""
        sha = str(sha256).lower()
        Claim = self.entities.ContentClaim

        def tx():
            claim = Claim.get_for_update(sha256=sha)
            if claim is None or claim.owner != owner:
                return False
            claim.lease_until = self._now() + float(lease_seconds)
            return True

        return self._run(tx, write=True, what="renew content claim")

    def release_claim(self, sha256: str, owner: str) -> bool:
        sha = str(sha256).lower()
        Claim = self.entities.ContentClaim

        def tx():
            claim = Claim.get_for_update(sha256=sha)
            if claim is None or claim.owner != owner:
                return False
            claim.delete()
            return True

        return self._run(tx, write=True, what="release content claim")

    def find_package(self, sha256: str) -> PackageRecord | None:
        """The package that holds this content; None when there is none or its transfer
        failed (see :meth:`_live_package`)."""
        sha = str(sha256).lower()
        Package = self.entities.Package

        def tx():
            if self._live_package(sha) is None:
                return None
            p = Package.get(sha256=sha)
            return PackageRecord(p.sha256, p.transfer_id, p.destination, p.created_at)

        return self._run(tx, write=False, what="find package")

    def _live_package(self, sha: str) -> str | None:
        """Inside a session: the transfer id of the package of ``sha`` unless that transfer
        is "failed" -- lost after cleanup (its re-fetch pending or impossible) or given up:
        its content is not in the channel, so the same content found again must be uploaded
        rather than skipped as a duplicate. A query, not Package.get: always asks the
        database again. A package being restored (failed -> uploading) counts again."""
        Package, Transfer = self.entities.Package, self.entities.Transfer
        return select(p.transfer_id for p in Package if p.sha256 == sha and not exists(
            t for t in Transfer if t.id == p.transfer_id and t.state == "failed")).first()

    # -- upload progress ------------------------------------------------------------

    def record_part_sent(
        self, transfer_id: str, index: int, *, message_id: int, document_id: int | None,
        account: str,
    ) -> PartRecord:
        """Phase 1: Telegram returned ``message_id`` for this part; write it now."""
        message_id = int(message_id)
        document_id = None if document_id is None else int(document_id)

        def tx():
            _, p = self._part_for_update(transfer_id, index)
            if p.message_id is not None:
                if p.message_id != message_id:
                    raise PartConflictError(transfer_id, int(index), p.message_id, message_id)
                if p.document_id is None and document_id is not None:
                    p.document_id = document_id
                return _part_record(p)
            p.set(message_id=message_id, document_id=document_id, account=account,
                  sent_at=self._now())
            return _part_record(p)

        return self._run(tx, write=True, what=f"record part {index} of {transfer_id!r}")

    def parts_without_message(self, transfer_id: str) -> list[PartRecord]:
        Part = self.entities.TransferPart

        def tx():
            q = Part.select(
                lambda p: p.transfer.id == transfer_id and p.message_id is None
            ).order_by(Part.part_index)
            return [_part_record(p) for p in q]

        return self._run(tx, write=False, what=f"parts to send of {transfer_id!r}")

    def set_part_random_id(self, transfer_id: str, index: int, random_id: int) -> PartRecord:
        """Prepare a re-upload: a fresh random_id, and the old message forgotten."""

        def tx():
            _, p = self._part_for_update(transfer_id, index)
            p.set(random_id=int(random_id), message_id=None, document_id=None, account=None,
                  sent_at=None, verified_at=None)
            return _part_record(p)

        return self._run(tx, write=True, what=f"new random_id for part {index} of {transfer_id!r}")

    def mark_transfer_uploaded(
        self, transfer_id: str, *, first_check_delay: float = 0.0
    ) -> TransferRecord:
        """Every part has its message: state "uploaded", package row, claim released."""
        Package, Claim = self.entities.Package, self.entities.ContentClaim
        Transfer, Meta = self.entities.Transfer, self.entities.PackageMeta

        def tx():
            t = self._transfer_for_update(transfer_id)
            if t.state != "uploaded" and "uploaded" not in TRANSFER_TRANSITIONS[t.state]:
                raise TransferStateError(
                    transfer_id, t.state, "uploaded", f"cannot move from {t.state!r} to 'uploaded'")
            parts = list(t.parts)
            missing = sorted(p.part_index for p in parts if p.message_id is None)
            if missing or not parts:
                raise TransferStateError(
                    transfer_id, t.state, "uploaded",
                    f"parts without a message id: {missing}" if parts else "has no parts")
            now = self._now()
            t.set(state="uploaded", updated_at=now, next_check_at=now + float(first_check_delay),
                  lease_owner=None, lease_until=None)
            # the first stored copy stays the package, unless its transfer failed (lost):
            # then this copy holds the content (one row per hash: one live package)
            package = Package.get_for_update(sha256=t.sha256)
            if package is None:
                Package(sha256=t.sha256, transfer_id=t.id, destination=t.destination,
                        created_at=now)
            elif package.transfer_id != t.id and self._live_package(t.sha256) is None:
                lost, tid = package.transfer_id, t.id
                package.set(transfer_id=tid, destination=t.destination, created_at=now)
                # transfers completed by reference to the lost copy follow this one now
                for d in Transfer.select(lambda d: d.duplicate_of == lost and d.id != tid):
                    d.set(duplicate_of=tid, updated_at=now)
                # and the index is read from this copy's files (storage.ingest)
                meta = Meta.get_for_update(sha256=t.sha256)
                if meta is not None and meta.transfer_id == lost:
                    meta.set(transfer_id=tid, created_at=now, updated_at=now)
                    take_over_index(meta)
            claim = Claim.get_for_update(sha256=t.sha256)
            if claim is not None and claim.transfer_id == t.id:
                claim.delete()
            return _transfer_record(t, part_count=len(parts))

        return self._run(tx, write=True, what=f"mark transfer {transfer_id!r} uploaded")

    def mark_transfer_duplicate(self, transfer_id: str, duplicate_of: str) -> TransferRecord:
        """Complete a transfer by reference to an already stored one."""
        Transfer = self.entities.Transfer

        def tx():
            t = self._transfer_for_update(transfer_id)
            if duplicate_of == transfer_id or Transfer.get(id=duplicate_of) is None:
                raise TransferNotFoundError(duplicate_of)
            if t.state != "uploaded" and "uploaded" not in TRANSFER_TRANSITIONS[t.state]:
                raise TransferStateError(
                    transfer_id, t.state, "uploaded", f"cannot move from {t.state!r} to 'uploaded'")
            now = self._now()
            t.set(state="uploaded", duplicate_of=duplicate_of, updated_at=now, next_check_at=now,
                  lease_owner=None, lease_until=None)
            return _transfer_record(t)

        return self._run(tx, write=True, what=f"mark transfer {transfer_id!r} duplicate")

    # -- chunk journal --------------------------------------------------------------

    def journal_chunk(self, transfer_id: str, part_index: int, chunk_index: int,
                      account: str) -> None:
        """Remember that the server acknowledged one upload chunk of a part."""
        self.journal_chunk_many(transfer_id, part_index, (chunk_index,), account)

    JOURNAL_ROWS_PER_STATEMENT = 500   # 5 parameters a row: 2500, under SQLite's 32766

    def journal_chunk_many(self, transfer_id: str, part_index: int,
                           chunk_indexes: Iterable[int], account: str) -> None:
        """Journal many chunks in one transaction: one upsert statement per 500 chunks
        (INSERT ... ON CONFLICT DO UPDATE on both backends), idempotent: a chunk journaled
        again takes the new account and acked_at."""
        chunks = sorted({int(c) for c in chunk_indexes})
        part_index = int(part_index)
        if not chunks:
            return
        step = self.JOURNAL_ROWS_PER_STATEMENT

        def tx():
            self._part_for_update(transfer_id, part_index)  # clear error, not an FK failure
            params = {"tid": transfer_id, "part": part_index, "account": account, "now": self._now()}
            for start in range(0, len(chunks), step):
                batch = chunks[start:start + step]
                params.update((f"c{i}", c) for i, c in enumerate(batch))
                self.db.execute(_journal_upsert_sql(len(batch)), {}, params)

        self._run(tx, write=True, what=f"journal chunks of {transfer_id!r} part {part_index}")

    def journaled_chunks(self, transfer_id: str, part_index: int, *,
                         account: str | None = None,
                         max_age: float | None = None) -> set[int]:
        """Chunk indexes acknowledged for a part (optionally: by ``account``,
        acknowledged within the last ``max_age`` seconds, i.e. the part TTL)."""
        part_index = int(part_index)
        Journal = self.entities.PartJournal

        def tx():
            q = Journal.select(
                lambda j: j.transfer_id == transfer_id and j.part_index == part_index)
            if account is not None:
                q = q.filter(lambda j: j.account == account)
            if max_age is not None:
                oldest = self._now() - float(max_age)
                q = q.filter(lambda j: j.acked_at >= oldest)
            return {j.chunk_index for j in q}

        return self._run(tx, write=False, what=f"read journal of {transfer_id!r}")

    def clear_journal(self, transfer_id: str, part_index: int | None = None) -> int:
        Journal = self.entities.PartJournal

        def tx():
            q = Journal.select(lambda j: j.transfer_id == transfer_id)
            if part_index is not None:
                index = int(part_index)
                q = q.filter(lambda j: j.part_index == index)
            return q.delete(bulk=True)

        return self._run(tx, write=True, what=f"clear journal of {transfer_id!r}")

    # -- verification leases --------------------------------------------------------

    def claim_due_transfers(
        self, owner: str, limit: int, lease_seconds: float,
        states: Sequence[str] = DUE_STATES,
    ) -> list[TransferRecord]:
        """Lease up to ``limit`` due transfers to ``owner``; never one leased to another."""
        if not owner:
            raise ValueError("lease owner must not be empty")
        states = tuple(states)
        for s in states:
            _check_state(s)
        if int(limit) <= 0 or not states:
            return []
        Transfer = self.entities.Transfer
        params: dict = {"owner": owner, "lim": int(limit)}
        params.update({f"s{i}": s for i, s in enumerate(states)})
        in_states = ", ".join(f"$s{i}" for i in range(len(states)))
        due = (f"state IN ({in_states}) AND next_check_at IS NOT NULL "
               "AND next_check_at <= $now AND (lease_until IS NULL OR lease_until <= $now)")

        def tx():
            now = self._now()
            params.update(now=now, until=now + float(lease_seconds))
            if self.dialect == "postgres":
                # The CTE is materialised, so the locking subquery runs once
                # (a plain "id IN (SELECT ... LIMIT n)" may be re-run per row
                # and lease more than n).
                cur = self.db.execute(
                    "WITH due AS MATERIALIZED (SELECT id FROM transfers "
                    f"WHERE {due} ORDER BY next_check_at, id LIMIT $lim "
                    "FOR UPDATE SKIP LOCKED) "
                    "UPDATE transfers SET lease_owner = $owner, lease_until = $until "
                    f"FROM due WHERE transfers.id = due.id AND {due} "
                    "RETURNING transfers.id", {}, params)
                ids = [r[0] for r in cur.fetchall()]
            else:
                # BEGIN IMMEDIATE (write=True) serialises writers on SQLite;
                # the UPDATE re-checks the lease anyway.
                cur = self.db.execute(
                    f"SELECT id FROM transfers WHERE {due} ORDER BY next_check_at, id "
                    "LIMIT $lim", {}, params)
                candidates = [r[0] for r in cur.fetchall()]
                ids = []
                for tid in candidates:
                    params["tid"] = tid
                    cur = self.db.execute(
                        "UPDATE transfers SET lease_owner = $owner, lease_until = $until "
                        f"WHERE id = $tid AND {due}", {}, params)
                    if cur.rowcount == 1:
                        ids.append(tid)
            if not ids:
                return []
            rows = list(Transfer.select(lambda t: t.id in ids and t.lease_owner == owner))
            counts = self._part_counts([t.id for t in rows])
            by_id = {t.id: _transfer_record(t, counts.get(t.id, 0)) for t in rows}
            return sorted(by_id.values(), key=lambda r: (r.next_check_at, r.id))

        return self._run(tx, write=True, what="claim due transfers")

    def renew_transfer_lease(self, transfer_id: str, owner: str, lease_seconds: float) -> bool:
        """Extend our lease on a transfer; False when another owner has it."""

        def tx():
            t = self._transfer_for_update(transfer_id)
            if t.lease_owner != owner:
                return False
            t.lease_until = self._now() + float(lease_seconds)
            return True

        return self._run(tx, write=True, what=f"renew lease on {transfer_id!r}")

    def release_transfer_lease(self, transfer_id: str, owner: str, *,
                               next_check_at=UNSET) -> bool:
        def tx():
            t = self._transfer_for_update(transfer_id)
            if t.lease_owner != owner:
                return False
            t.set(lease_owner=None, lease_until=None)
            if next_check_at is not UNSET:
                t.next_check_at = None if next_check_at is None else float(next_check_at)
            return True

        return self._run(tx, write=True, what=f"release lease on {transfer_id!r}")

    def record_check(
        self, transfer_id: str, *, present: Iterable[int] = (), missing: Iterable[int] = (),
        next_check_at=UNSET, lease_owner: str | None = None, state: str | None = None,
        reason: str | None = None, release_lease: bool = False,
    ) -> TransferRecord:
        """Record one verification pass: present parts verified, misses counted.

        In the same transaction (one write per checked transfer): ``state``
        moves the transfer (TRANSFER_TRANSITIONS apply), ``reason`` as in
        set_transfer_state, ``release_lease`` clears the lease.
        """
        if state is not None:
            _check_state(state)
        present = {int(i) for i in present}
        missing = {int(i) for i in missing}
        if present & missing:
            raise ValueError(f"parts both present and missing: {sorted(present & missing)}")

        def tx():
            t = self._transfer_for_update(transfer_id)
            _check_lease(t, lease_owner)
            now = self._now()
            known = set()
            for p in t.parts:
                known.add(p.part_index)
                if p.part_index in present:
                    if p.verified_at is None:  # verified since: kept by later passes
                        p.verified_at = now
                elif p.part_index in missing:
                    p.set(verified_at=None, misses=p.misses + 1)
            unknown = (present | missing) - known
            if unknown:
                raise StorageError(f"transfer {transfer_id!r} has no parts {sorted(unknown)}")
            if state is not None and state != t.state:
                if state not in TRANSFER_TRANSITIONS[t.state]:
                    raise TransferStateError(transfer_id, t.state, state,
                                             f"cannot move from {t.state!r} to {state!r}")
                t.state = state
            if reason is not None:
                t.reason = reason or None
            t.set(last_check_at=now, updated_at=now)
            if next_check_at is not UNSET:
                t.next_check_at = None if next_check_at is None else float(next_check_at)
            if release_lease:
                t.set(lease_owner=None, lease_until=None)
            return _transfer_record(t)

        return self._run(tx, write=True, what=f"record check of {transfer_id!r}")

    def record_passes(self, passes: Iterable[Sequence], *, lease_owner: str) -> list[str]:
        """Many passing checks in one transaction (the verifier's common case).

        ``passes``: (transfer_id, state, next_check_at, clear_reason) each: every
        part verified_at = now unless already set (verified since), last_check_at = now, state moved (transitions
        apply), reason cleared when asked, lease released. A transfer no longer
        leased to ``lease_owner``, or whose state may not move so, is skipped.
        Returns the ids written.
        """
        items = [(str(tid), str(state), None if nca is None else float(nca), bool(clear))
                 for tid, state, nca, clear in passes]
        for _, state, _, _ in items:
            _check_state(state)
        ids = [i[0] for i in items]

        def tx():
            # Plain SQL: one short UPDATE per transfer and one per 500 parts' transfers;
            # loading thousands of entities would cost more than the writes.
            if not ids:
                return []
            now = self._now()
            done = []
            for tid, state, nca, clear in items:
                sources = [st for st in TRANSFER_STATES
                           if st == state or state in TRANSFER_TRANSITIONS[st]]
                params = {"tid": tid, "owner": lease_owner, "state": state, "nca": nca,
                          "now": now, **{f"f{i}": st for i, st in enumerate(sources)}}
                allowed = ", ".join(f"$f{i}" for i in range(len(sources)))
                cur = self.db.execute(
                    "UPDATE transfers SET state = $state, last_check_at = $now, updated_at = $now, "
                    "next_check_at = $nca, lease_owner = NULL, lease_until = NULL"
                    + (", reason = NULL" if clear else "")
                    + f" WHERE id = $tid AND lease_owner = $owner AND state IN ({allowed})",
                    {}, params)
                if cur.rowcount == 1:
                    done.append(tid)
            for start in range(0, len(done), 500):
                chunk = done[start:start + 500]
                params = {"now": now, **{f"t{i}": tid for i, tid in enumerate(chunk)}}
                placeholders = ", ".join(f"$t{i}" for i in range(len(chunk)))
                self.db.execute(f"UPDATE transfer_parts SET verified_at = COALESCE(verified_at, $now) "
                                f"WHERE transfer_id IN ({placeholders})", {}, params)
            return done

        return self._run(tx, write=True, what=f"record {len(ids)} passing checks")

    def list_parts_many(self, transfer_ids: Iterable[str]) -> dict[str, list[PartRecord]]:
        """transfer id -> its parts by index, for many transfers in one query."""
        ids = list(dict.fromkeys(transfer_ids))

        def tx():
            out: dict[str, list[PartRecord]] = {tid: [] for tid in ids}
            for start in range(0, len(ids), 500):  # plain SQL: no entity per row
                chunk = ids[start:start + 500]
                params = {f"t{i}": tid for i, tid in enumerate(chunk)}
                placeholders = ", ".join(f"$t{i}" for i in range(len(chunk)))
                cur = self.db.execute(
                    "SELECT transfer_id, part_index, byte_offset, length, sha256, file_name, "
                    "random_id, message_id, document_id, account, sent_at, verified_at, misses "
                    f"FROM transfer_parts WHERE transfer_id IN ({placeholders}) "
                    "ORDER BY transfer_id, part_index", {}, params)
                for row in cur.fetchall():
                    out[row[0]].append(PartRecord(*row))
            return out

        return self._run(tx, write=False, what="list parts of many transfers")

    # -- verifier support -------------------------------------------------------------

    def _in_states_query(self, states: Sequence[str]):
        states = tuple(states)
        for st in states:
            _check_state(st)
        Transfer = self.entities.Transfer
        return Transfer.select(lambda t: t.state in states)

    def schedule_check(self, transfer_id: str | None = None, at: float | None = None,
                       states: Sequence[str] = VERIFY_STATES) -> int:
        """Make one transfer (or every transfer in ``states``) due at ``at`` (default now)."""
        states = tuple(states)

        def tx():
            when = self._now() if at is None else float(at)
            q = self._in_states_query(states)
            if transfer_id is not None:
                q = q.filter(lambda t: t.id == transfer_id)
            n = 0
            for t in q.without_distinct().for_update():
                t.next_check_at = when
                n += 1
            return n

        return self._run(tx, write=True, what="schedule checks")

    def oldest_due_check(self, states: Sequence[str] = VERIFY_STATES) -> float | None:
        """The smallest next_check_at that is due now (verification lag = now - it)."""
        states = tuple(states)

        def tx():
            now = self._now()
            q = self._in_states_query(states)
            return select(min(t.next_check_at) for t in q
                          if t.next_check_at is not None and t.next_check_at <= now).first()

        return self._run(tx, write=False, what="oldest due check")

    def next_check_time(self, states: Sequence[str] = VERIFY_STATES) -> float | None:
        """The smallest next_check_at, due or not (when a verifier has work next), or None."""
        states = tuple(states)

        def tx():
            q = self._in_states_query(states)
            return select(min(t.next_check_at) for t in q if t.next_check_at is not None).first()

        return self._run(tx, write=False, what="next check time")

    def count_due_checks(self, states: Sequence[str] = VERIFY_STATES) -> int:
        states = tuple(states)

        def tx():
            now = self._now()
            q = self._in_states_query(states)
            return int(q.filter(lambda t: t.next_check_at is not None
                                and t.next_check_at <= now).count())

        return self._run(tx, write=False, what="count due checks")

    def release_transfer_leases(self, owner_prefix: str, *, keep: str | None = None) -> int:
        """Drop the leases a previous incarnation (owner starting with the prefix) left,
        except those whose owner starts with ``keep`` (this process's own)."""
        if not owner_prefix:
            raise ValueError("owner prefix must not be empty")
        Transfer = self.entities.Transfer

        def tx():
            n = 0
            q = Transfer.select(lambda t: t.lease_owner is not None
                                and t.lease_owner.startswith(owner_prefix))
            for t in q.without_distinct().for_update():
                if keep is not None and t.lease_owner.startswith(keep):
                    continue
                t.set(lease_owner=None, lease_until=None)
                n += 1
            return n

        return self._run(tx, write=True, what="release stale transfer leases")

    def mark_transfer_cleaned(self, transfer_id: str, *, next_check_at=UNSET,
                              lease_owner: str | None = None) -> TransferRecord:
        """verified -> cleaned, only when every part (or the referenced transfer) is verified."""
        Transfer = self.entities.Transfer

        def tx():
            t = self._transfer_for_update(transfer_id)
            _check_lease(t, lease_owner)
            if t.state != "verified":
                raise TransferStateError(transfer_id, t.state, "cleaned",
                                         f"state is {t.state!r}, only a verified transfer is cleaned")
            if t.duplicate_of is not None:
                ref = Transfer.get(id=t.duplicate_of)
                if ref is None or ref.state not in ("verified", "cleaned"):
                    raise TransferStateError(
                        transfer_id, t.state, "cleaned",
                        f"referenced transfer {t.duplicate_of!r} is "
                        f"{'missing' if ref is None else ref.state!r}, not verified")
            else:
                parts = list(t.parts)
                unverified = sorted(p.part_index for p in parts
                                    if p.verified_at is None or p.message_id is None)
                if unverified or not parts:
                    raise TransferStateError(transfer_id, t.state, "cleaned",
                                             f"parts not verified: {unverified}")
            now = self._now()
            t.set(state="cleaned", updated_at=now)
            if next_check_at is not UNSET:
                t.next_check_at = None if next_check_at is None else float(next_check_at)
            return _transfer_record(t)

        return self._run(tx, write=True, what=f"mark transfer {transfer_id!r} cleaned")

    def retry_transfer(self, transfer_id: str) -> TransferRecord:
        """Operator retry: a failed transfer starts again (see the module docstring)."""
        Transfer = self.entities.Transfer

        def tx():
            t = self._transfer_for_update(transfer_id)
            if t.state != "failed":
                raise TransferStateError(transfer_id, t.state, "planned",
                                         f"state is {t.state!r}; only a failed transfer is retried")
            parts = list(t.parts)
            sent = [p for p in parts if p.message_id is not None]
            if t.duplicate_of is not None and Transfer[t.duplicate_of].state == "failed":
                # the referenced copy is lost: follow the copy that holds the content now,
                # or, with none, upload from this transfer's own original and manifest
                t.duplicate_of = self._live_package(t.sha256)
            if t.duplicate_of is not None:
                state = "uploaded"
            elif parts and len(sent) == len(parts):
                state = "verifying"
            elif sent:
                state = "uploading"
            else:
                state = "planned"
            now = self._now()
            t.set(state=state, attempts=0, reason=None, updated_at=now, next_check_at=now,
                  lease_owner=None, lease_until=None)
            if state == "uploading":
                t.account = None  # any eligible account may resume it
            return _transfer_record(t, part_count=len(parts))

        return self._run(tx, write=True, what=f"retry transfer {transfer_id!r}")


@functools.lru_cache(maxsize=64)
def _journal_upsert_sql(rows: int) -> str:
    """The upsert of ``rows`` journal rows, its text the same for every batch of that size:
    Pony parses a statement's text once and caches it, so the chunk indexes are parameters
    ($c0, $c1, ...), not inlined (a new text per batch cost ~2 ms of parsing per 64 rows)."""
    values = ", ".join(f"($tid, $part, $c{i}, $account, $now)" for i in range(rows))
    return ("INSERT INTO part_journal (transfer_id, part_index, chunk_index, account, acked_at) "
            f"VALUES {values} ON CONFLICT (transfer_id, part_index, chunk_index) "
            "DO UPDATE SET account = excluded.account, acked_at = excluded.acked_at")
