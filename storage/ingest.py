"""Ingest from source channels (issue 5): cursors, source messages, sets, skips, runs, index.

``Storage`` inherits :class:`IngestStore`, so every method below is called on the
Storage returned by ``storage.open_storage``. Each call is one short transaction
(its own db_session, retried on transient conflicts: a lost insert race on a
unique key is retried and the retry sees the winner's row) and returns frozen
records. Time comes from the Storage's injected clock (``now`` below).

``topic_id=None`` means "the whole channel"; it is stored as 0 (a key column
cannot be NULL) and read back as None.

API (all on ``Storage``)::

    SOURCE_STATUSES = ("pending", "ingested", "skipped", "seen")
        # "seen" (migration 5): a document that is no archive, recorded only so
        # that it is not examined again (no set, no skip row)
    SET_STATES = ("waiting", "ready", "downloading", "uploading", "ingested",
                  "skipped", "failed")
    SKIP_REASONS = ("too_large", "incomplete_set", "duplicate", "unreadable",
                    "not_archive", "failed")      # known reasons; any short text is kept
    INDEX_STATES = ("pending", "ok", "encrypted", "corrupt", "unreadable")
    RUN_STATES = ("running", "finished", "failed", "interrupted")

    # scan cursors, one per (account, channel, topic)
    get_cursor(account, channel_id, topic_id=None) -> CursorRecord | None
    list_cursors(account=None) -> list[CursorRecord]
    advance_cursor(account, channel_id, topic_id=None, *, last_message_id) -> CursorRecord
        # creates the row; never moves backwards (keeps the larger id);
        # last_scan_at = now; clears stalled/stalled_reason
    mark_cursor_stalled(account, channel_id, topic_id=None, *, reason) -> CursorRecord
        # pagination stopped advancing / history hidden: stalled=True + reason,
        # last_scan_at = now, last_message_id kept (0 for a new row)

    # source messages (PK channel_id, message_id): first writer wins
    record_source_message(channel_id, message_id, *, account, file_name, size,
                          document_id=None, topic_id=None, posted_at=None,
                          set_key=None, part_number=None, run_id=None,
                          status="pending", reason=None)
        -> SourceMessageResult(record, created)
        # created False: another account/process recorded it first; the stored
        # record is returned unchanged (status tells whether it is done)
    get_source_message(channel_id, message_id) -> SourceMessageRecord | None
    seen_message_ids(channel_id, message_ids) -> set[int]   # which are recorded
    set_messages(set_key) -> list[SourceMessageRecord]      # by part_number, message_id
    list_source_messages(status=None, channel_id=None, limit=100)
        -> list[SourceMessageRecord]                        # oldest first
    set_message_status(channel_id, message_id, status, *, reason=None,
                       transfer_id=UNSET) -> SourceMessageRecord
        # reason replaces the stored one (None clears it)

    # Telegram document ids already ingested (checked *before* a download;
    # a forward in another channel carries the same document id)
    find_ingested_document(document_id) -> IngestedDocumentRecord | None
    ingested_document_ids(document_ids) -> set[int]
        # not those ingested as a transfer that is "failed" (lost): a forward
        # of a lost package's document is downloaded, not skipped
    record_ingested_documents(entries, *, set_key=None, transfer_id=None) -> int
        # entries: iterable of (document_id, channel_id, message_id);
        # returns how many were new; an existing row is kept (first wins)
        # unless its transfer failed: then it names this one (counted too)

    # archive sets (a single archive is a set of one part)
    upsert_archive_set(set_key, *, channel_id, topic_id=None, base_name,
                       archive_format, scheme, expected_parts, seen_parts,
                       complete, total_size) -> ArchiveSetRecord
        # new: state "ready" when complete else "waiting"; existing: counts and
        # completeness updated, "waiting" -> "ready" when complete; a set past
        # "ready" keeps its state; a complete set never becomes incomplete (an
        # incomplete view of a complete set changes nothing but updated_at)
    get_archive_set(set_key) -> ArchiveSetRecord | None
    list_archive_sets(state=None, channel_id=None, limit=100)
        -> list[ArchiveSetRecord]    # oldest update first
    archive_sets_by_state() -> dict[state, int]   # every state, zeros too
    claim_ready_sets(owner, limit, lease_seconds, *, channel_id=None,
                     states=("ready", "downloading", "uploading"))
        -> list[ArchiveSetRecord]
        # sets in those states with no live lease, leased to owner until now +
        # lease_seconds; two claimers never get the same set (PostgreSQL:
        # FOR UPDATE SKIP LOCKED; SQLite: BEGIN IMMEDIATE + re-checked UPDATE).
        # "downloading"/"uploading" come back only after their lease expired
        # (the worker died): resume or reconcile with the transfer.
        # (migration 5) never a set whose next_attempt_at lies in the future
    renew_set_lease(set_key, owner, lease_seconds) -> bool
    release_set_lease(set_key, owner) -> bool
    record_set_failure(set_key, owner, *, error, max_attempts, backoff,
                       run_id=None, account=None) -> ArchiveSetRecord
        # (migration 5) attempts += 1, last_error = error, lease released;
        # below max_attempts: next_attempt_at = now + backoff(attempts);
        # at the cap: "skipped", reason "failed", a skip row per message whose
        # detail holds the last error
    set_archive_set_state(set_key, state, *, expected=None, reason=None,
                          sha256=UNSET, transfer_id=UNSET, lease_owner=None,
                          release_lease=False) -> ArchiveSetRecord
        # compare-and-set on ``expected`` (state or tuple) -> SetStateError;
        # lease_owner given: refuse (SetLeaseLostError) unless still ours
    mark_set_ingested(set_key, *, transfer_id, sha256, lease_owner=None)
        -> ArchiveSetRecord
        # one transaction: set "ingested" (sha256, transfer_id, lease released);
        # its messages "ingested" with transfer_id; their document ids into
        # ingested_documents (existing rows kept); their skip rows removed
    requeue_lost_package(transfer_id, *, reason, states=("ingested",)) -> list[set_key]
        # a package lost after cleanup: its "ingested" set(s) (stashctl retry of
        # a failed re-fetch: its "failed" ones) -> "ready" again, transfer id
        # kept (the re-fetch marker), sha256 cleared, attempts, backoff and lease
        # reset; one transaction
    mark_set_skipped(set_key, reason, *, detail=None, duplicate_of=None,
                     run_id=None, account=None, lease_owner=None) -> ArchiveSetRecord
        # one transaction: set "skipped" (reason); each message "skipped" with
        # an ingest_skips row; duplicate_of (a transfer id): the document ids
        # are recorded as ingested by that transfer, so forwards are skipped
        # before download next time

    # skips: the current skip reason per message (a later ingest removes it)
    record_skip(channel_id, message_id, reason, *, detail=None, set_key=None,
                run_id=None, account=None) -> SkipRecord
        # upsert; the source message (if recorded) becomes "skipped" + reason
    clear_skip(channel_id, message_id) -> bool
    list_skips(reason=None, channel_id=None, limit=100) -> list[SkipRecord]  # newest first
    skips_by_reason(channel_id=None) -> dict[reason, int]

    # runs: one per scan of a mapping, counters updated live
    start_run(*, mapping, channel_id, account, topic_id=None, owner=None,
              run_id=None) -> IngestRunRecord          # state "running"
    update_run(run_id, *, seen=0, ingested=0, skipped=None, bytes_downloaded=0,
               progress=UNSET) -> IngestRunRecord
        # counters are *added*; skipped: a reason (counts 1) or {reason: n}
    finish_run(run_id, *, state="finished", error=None) -> IngestRunRecord
    get_run(run_id) -> IngestRunRecord | None
    list_runs(state=None, limit=20) -> list[IngestRunRecord]     # newest first
    refetch_waiting_channels() -> set[int]
        # channels with a set "ready" to be fetched again for a lost package
        # (the set names a transfer that is "failed"); one query
    channel_scanned_by_others(channel_id, owner, since) -> bool
        # a run of that channel started at or after since by another owner
        # (another process maps it)
    interrupt_stale_runs(*, older_than, owner=None) -> int
        # "running" runs not updated for older_than seconds (optionally only
        # this owner's, e.g. at start-up) -> "interrupted"

    # download journal (resume): which 1 MiB chunks of a staged file are on
    # disk. Journal a chunk only after its bytes are written *and fsynced*;
    # a crash may lose a written chunk (re-downloaded), never journal an
    # unwritten one. Keyed by the staged file's path, so another process
    # (with its own staging directory) simply finds nothing to resume.
    journal_download(path, chunk_indexes) -> None          # idempotent
    downloaded_chunks(path) -> set[int]
    clear_download_journal(path) -> int

    # phase 2: the package index. Phase 1 is mark_transfer_uploaded (the
    # packages row with the destination messages). The pipeline registers the
    # metadata (state "pending") when it creates the transfer; a crash between
    # phase 1 and phase 2 leaves it pending, and packages_awaiting_index finds it.
    register_package_meta(sha256, transfer_id, *, archive_format=None,
                          creator=None, tags=(), source_channel_id=None,
                          source_topic_id=None, source_message_id=None)
        -> PackageMetaRecord     # idempotent: an existing row is kept as it is,
        # unless its transfer failed (lost): then this transfer and source take
        # it over (created_at = now), and an "unreadable" index is pending again
    get_package_meta(sha256) -> PackageMetaRecord | None
    packages_awaiting_index(limit=100) -> list[PackageMetaRecord]
        # index_state "pending" and the packages row exists (upload done)
    claim_index_work(owner, limit, lease_seconds) -> list[PackageMetaRecord]
        # the same, leased (never one with a live lease of another owner)
    record_package_index(sha256, *, state, reason=None, entries=(),
                         preview=None, preview_path=None, preview_name=None,
                         archive_format=UNSET, lease_owner=None) -> PackageMetaRecord
        # one transaction: entries replaced, index_state/reason, preview,
        # attempts += 1, indexed_at = now, lease released.
        # entries: iterable of IndexEntry-like objects (path, size, crc, is_dir)
        # or tuples in that order
    package_entries(sha256, limit=None) -> list[PackageEntryRecord]   # by index
    index_states() -> dict[state, int]     # every state, zeros too

Records (frozen): CursorRecord, SourceMessageRecord, SourceMessageResult,
IngestedDocumentRecord, ArchiveSetRecord, SkipRecord, IngestRunRecord,
PackageMetaRecord, PackageEntryRecord.
Errors (all StorageError): IngestNotFoundError, SetStateError, SetLeaseLostError.
"""
from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

from pony.orm import count, exists, select

from storage.errors import StorageError

SOURCE_STATUSES = ("pending", "ingested", "skipped", "seen")
SET_STATES = ("waiting", "ready", "downloading", "uploading", "ingested", "skipped", "failed")
SKIP_REASONS = ("too_large", "incomplete_set", "duplicate", "unreadable", "not_archive", "failed")
INDEX_STATES = ("pending", "ok", "encrypted", "corrupt", "unreadable")
RUN_STATES = ("running", "finished", "failed", "interrupted")
CLAIMABLE_SET_STATES = ("ready", "downloading", "uploading")
DOWNLOAD_CHUNK_SIZE = 1024 * 1024

UNSET = object()


class IngestNotFoundError(StorageError):
    def __init__(self, what: str):
        super().__init__(f"{what} does not exist")


class SetStateError(StorageError):
    """A compare-and-set on an archive set was refused; ``current`` is the stored state."""

    def __init__(self, set_key: str, current: str, wanted: str):
        self.set_key, self.current, self.wanted = set_key, current, wanted
        super().__init__(f"archive set {set_key!r} is {current!r}, not {wanted}")


class SetLeaseLostError(StorageError):
    def __init__(self, set_key: str, owner: str, holder: str | None):
        self.set_key, self.owner, self.holder = set_key, owner, holder
        super().__init__(f"archive set {set_key!r}: lease of {owner!r} is lost (held by {holder!r})")


# --------------------------------------------------------------------------- records


@dataclass(frozen=True)
class CursorRecord:
    account: str
    channel_id: int
    topic_id: int | None
    last_message_id: int
    last_scan_at: float | None
    stalled: bool
    stalled_reason: str | None
    updated_at: float


@dataclass(frozen=True)
class SourceMessageRecord:
    channel_id: int
    message_id: int
    topic_id: int | None
    account: str
    document_id: int | None
    file_name: str
    size: int
    posted_at: float | None
    set_key: str | None
    part_number: int | None
    status: str
    reason: str | None
    transfer_id: str | None
    run_id: str | None
    created_at: float
    updated_at: float


@dataclass(frozen=True)
class SourceMessageResult:
    record: SourceMessageRecord
    created: bool  # False: it was recorded before (by us or another account/process)


@dataclass(frozen=True)
class IngestedDocumentRecord:
    document_id: int
    channel_id: int
    message_id: int
    set_key: str | None
    transfer_id: str | None
    created_at: float


@dataclass(frozen=True)
class ArchiveSetRecord:
    set_key: str
    channel_id: int
    topic_id: int | None
    base_name: str
    archive_format: str
    scheme: str
    state: str
    expected_parts: int | None
    seen_parts: int
    complete: bool
    total_size: int
    sha256: str | None
    transfer_id: str | None
    reason: str | None
    lease_owner: str | None
    lease_until: float | None
    created_at: float
    updated_at: float
    attempts: int = 0                      # failed tries (record_set_failure)
    next_attempt_at: float | None = None   # not claimed before this (backoff)
    last_error: str | None = None


@dataclass(frozen=True)
class SkipRecord:
    channel_id: int
    message_id: int
    reason: str
    detail: str | None
    set_key: str | None
    run_id: str | None
    account: str | None
    created_at: float


@dataclass(frozen=True)
class IngestRunRecord:
    id: str
    mapping: str
    channel_id: int
    topic_id: int | None
    account: str
    owner: str | None
    state: str
    started_at: float
    finished_at: float | None
    updated_at: float
    seen: int
    ingested: int
    skipped: int
    skipped_by_reason: dict  # reason -> count (a fresh dict per record)
    bytes_downloaded: int
    progress: str | None
    error: str | None

    def __hash__(self) -> int:  # the dict field would make the default hash fail
        return hash((self.id, self.updated_at))


@dataclass(frozen=True)
class PackageMetaRecord:
    sha256: str
    transfer_id: str
    archive_format: str | None
    index_state: str
    index_reason: str | None
    entry_count: int
    preview: bytes | None
    preview_path: str | None
    preview_name: str | None
    creator: str | None
    tags: tuple[str, ...]
    source_channel_id: int | None
    source_topic_id: int | None
    source_message_id: int | None
    attempts: int
    lease_owner: str | None
    lease_until: float | None
    indexed_at: float | None
    created_at: float
    updated_at: float


@dataclass(frozen=True)
class PackageEntryRecord:
    sha256: str
    index: int
    path: str
    size: int
    crc: int | None
    is_dir: bool


# --------------------------------------------------------------------------- converters


def _topic_in(topic_id: int | None) -> int:
    return 0 if topic_id is None else int(topic_id)


def _topic_out(topic_id: int) -> int | None:
    return None if not topic_id else int(topic_id)


def _cursor_record(c) -> CursorRecord:
    return CursorRecord(c.account, c.channel_id, _topic_out(c.topic_id), c.last_message_id,
                        c.last_scan_at, c.stalled, c.stalled_reason, c.updated_at)


def _message_record(m) -> SourceMessageRecord:
    return SourceMessageRecord(
        channel_id=m.channel_id, message_id=m.message_id, topic_id=_topic_out(m.topic_id),
        account=m.account, document_id=m.document_id, file_name=m.file_name or "",
        size=m.size, posted_at=m.posted_at, set_key=m.set_key, part_number=m.part_number,
        status=m.status, reason=m.reason, transfer_id=m.transfer_id, run_id=m.run_id,
        created_at=m.created_at, updated_at=m.updated_at)


def _document_record(d) -> IngestedDocumentRecord:
    return IngestedDocumentRecord(d.document_id, d.channel_id, d.message_id, d.set_key,
                                  d.transfer_id, d.created_at)


def _set_record(s) -> ArchiveSetRecord:
    return ArchiveSetRecord(
        set_key=s.set_key, channel_id=s.channel_id, topic_id=_topic_out(s.topic_id),
        base_name=s.base_name, archive_format=s.archive_format, scheme=s.scheme, state=s.state,
        expected_parts=s.expected_parts, seen_parts=s.seen_parts, complete=s.complete,
        total_size=s.total_size, sha256=s.sha256, transfer_id=s.transfer_id, reason=s.reason,
        lease_owner=s.lease_owner, lease_until=s.lease_until, created_at=s.created_at,
        updated_at=s.updated_at, attempts=s.attempts, next_attempt_at=s.next_attempt_at,
        last_error=s.last_error)


def _skip_record(k) -> SkipRecord:
    return SkipRecord(k.channel_id, k.message_id, k.reason, k.detail, k.set_key, k.run_id,
                      k.account, k.created_at)


def _run_record(r) -> IngestRunRecord:
    return IngestRunRecord(
        id=r.id, mapping=r.mapping, channel_id=r.channel_id, topic_id=_topic_out(r.topic_id),
        account=r.account, owner=r.owner, state=r.state, started_at=r.started_at,
        finished_at=r.finished_at, updated_at=r.updated_at, seen=r.seen, ingested=r.ingested,
        skipped=r.skipped, skipped_by_reason=_load_counts(r.skipped_by_reason),
        bytes_downloaded=r.bytes_downloaded, progress=r.progress, error=r.error)


def _meta_record(p) -> PackageMetaRecord:
    return PackageMetaRecord(
        sha256=p.sha256, transfer_id=p.transfer_id, archive_format=p.archive_format,
        index_state=p.index_state, index_reason=p.index_reason, entry_count=p.entry_count,
        preview=None if p.preview is None else bytes(p.preview), preview_path=p.preview_path,
        preview_name=p.preview_name, creator=p.creator, tags=tuple(json.loads(p.tags or "[]")),
        source_channel_id=p.source_channel_id, source_topic_id=p.source_topic_id,
        source_message_id=p.source_message_id, attempts=p.attempts, lease_owner=p.lease_owner,
        lease_until=p.lease_until, indexed_at=p.indexed_at, created_at=p.created_at,
        updated_at=p.updated_at)


def take_over_index(p) -> None:
    """Inside a session: the metadata ``p`` names a new copy of the content now. An index
    the lost copy could not take (its staged files were gone: "unreadable") is taken again
    from the new copy's files; one taken from the same bytes (ok, encrypted, corrupt) is
    kept."""
    if p.index_state == "unreadable":
        p.set(index_state="pending", index_reason=None, lease_owner=None, lease_until=None)


def _entry_record(e) -> PackageEntryRecord:
    return PackageEntryRecord(e.sha256, e.entry_index, e.path, e.size, e.crc, e.is_dir)


def _load_counts(text: str) -> dict:
    try:
        data = json.loads(text or "{}")
    except ValueError:
        return {}
    return {str(k): int(v) for k, v in data.items()} if isinstance(data, dict) else {}


def _check(value: str, allowed: tuple[str, ...], what: str) -> None:
    if value not in allowed:
        raise ValueError(f"unknown {what} {value!r}; expected one of {allowed}")


def _as_states(states) -> tuple[str, ...]:
    return (states,) if isinstance(states, str) else tuple(states)


def _entry_tuple(entry) -> tuple[str, int, int | None, bool]:
    if isinstance(entry, (tuple, list)):
        path, size, crc, is_dir = entry
    else:
        path, size, crc, is_dir = entry.path, entry.size, entry.crc, entry.is_dir
    return str(path), int(size), None if crc is None else int(crc), bool(is_dir)


# --------------------------------------------------------------------------- the mixin


class IngestStore:
    """Mixin for storage.repository.Storage (uses its _run, entities, _clock, db, dialect)."""

    _run: Callable
    _clock: Callable[[], float]

    def _ingest_now(self) -> float:
        return float(self._clock())

    # -- cursors -----------------------------------------------------------------------

    def get_cursor(self, account: str, channel_id: int,
                   topic_id: int | None = None) -> CursorRecord | None:
        Cursor = self.entities.IngestCursor
        key = dict(account=account, channel_id=int(channel_id), topic_id=_topic_in(topic_id))

        def tx():
            c = Cursor.get(**key)
            return None if c is None else _cursor_record(c)

        return self._run(tx, write=False, what="read scan cursor")

    def list_cursors(self, account: str | None = None) -> list[CursorRecord]:
        Cursor = self.entities.IngestCursor

        def tx():
            q = Cursor.select()
            if account is not None:
                q = q.filter(lambda c: c.account == account)
            q = q.order_by(Cursor.account, Cursor.channel_id, Cursor.topic_id)
            return [_cursor_record(c) for c in q]

        return self._run(tx, write=False, what="list scan cursors")

    def _cursor_tx(self, account, channel_id, topic_id, **changes) -> CursorRecord:
        if not account:
            raise ValueError("account must not be empty")
        Cursor = self.entities.IngestCursor
        key = dict(account=account, channel_id=int(channel_id), topic_id=_topic_in(topic_id))
        last = changes.pop("last_message_id", None)

        def tx():
            now = self._ingest_now()
            c = Cursor.get_for_update(**key)
            if c is None:
                c = Cursor(**key, last_message_id=int(last or 0), stalled=False, updated_at=now)
            elif last is not None and int(last) > c.last_message_id:
                c.last_message_id = int(last)
            c.set(last_scan_at=now, updated_at=now, **changes)
            return _cursor_record(c)

        return self._run(tx, write=True, what=f"update scan cursor of {account!r}")

    def advance_cursor(self, account: str, channel_id: int, topic_id: int | None = None, *,
                       last_message_id: int) -> CursorRecord:
        """A scan got up to ``last_message_id``: keep the larger id, clear the stall."""
        return self._cursor_tx(account, channel_id, topic_id, last_message_id=int(last_message_id),
                               stalled=False, stalled_reason=None)

    def mark_cursor_stalled(self, account: str, channel_id: int, topic_id: int | None = None, *,
                            reason: str) -> CursorRecord:
        return self._cursor_tx(account, channel_id, topic_id, stalled=True,
                               stalled_reason=str(reason) or "stalled")

    # -- source messages -----------------------------------------------------------------

    def record_source_message(
        self, channel_id: int, message_id: int, *, account: str, file_name: str, size: int,
        document_id: int | None = None, topic_id: int | None = None,
        posted_at: float | None = None, set_key: str | None = None,
        part_number: int | None = None, run_id: str | None = None,
        status: str = "pending", reason: str | None = None,
    ) -> SourceMessageResult:
        """Record a message seen in a source channel; the first writer wins."""
        if not account:
            raise ValueError("account must not be empty")
        _check(status, SOURCE_STATUSES, "source message status")
        Message = self.entities.SourceMessage
        key = dict(channel_id=int(channel_id), message_id=int(message_id))
        fields = dict(
            topic_id=_topic_in(topic_id), account=account,
            document_id=None if document_id is None else int(document_id),
            file_name=str(file_name or ""), size=int(size),
            posted_at=None if posted_at is None else float(posted_at), set_key=set_key,
            part_number=None if part_number is None else int(part_number), run_id=run_id)

        def tx():
            m = Message.get(**key)
            if m is not None:
                return SourceMessageResult(_message_record(m), False)
            now = self._ingest_now()
            m = Message(**key, **fields, status=status, reason=reason, created_at=now, updated_at=now)
            # flush now: a concurrent insert of the same key fails here (and the
            # session retries, finding the winner's row) instead of at commit
            m.flush()
            return SourceMessageResult(_message_record(m), True)

        return self._run(tx, write=True, what=f"record source message {channel_id}/{message_id}")

    def get_source_message(self, channel_id: int, message_id: int) -> SourceMessageRecord | None:
        Message = self.entities.SourceMessage

        def tx():
            m = Message.get(channel_id=int(channel_id), message_id=int(message_id))
            return None if m is None else _message_record(m)

        return self._run(tx, write=False, what="read source message")

    def seen_message_ids(self, channel_id: int, message_ids: Iterable[int]) -> set[int]:
        ids = sorted({int(i) for i in message_ids})
        if not ids:
            return set()
        Message = self.entities.SourceMessage
        cid = int(channel_id)

        def tx():
            found: set[int] = set()
            for start in range(0, len(ids), 500):
                batch = ids[start:start + 500]
                found.update(select(m.message_id for m in Message
                                    if m.channel_id == cid and m.message_id in batch))
            return found

        return self._run(tx, write=False, what="look up seen messages")

    def set_messages(self, set_key: str) -> list[SourceMessageRecord]:
        Message = self.entities.SourceMessage

        def tx():
            q = Message.select(lambda m: m.set_key == set_key)
            rows = [_message_record(m) for m in q]
            return sorted(rows, key=lambda r: (r.part_number is None, r.part_number or 0,
                                               r.message_id))

        return self._run(tx, write=False, what="read messages of a set")

    def list_source_messages(self, status: str | None = None, channel_id: int | None = None,
                             limit: int = 100) -> list[SourceMessageRecord]:
        if status is not None:
            _check(status, SOURCE_STATUSES, "source message status")
        Message = self.entities.SourceMessage

        def tx():
            q = Message.select()
            if status is not None:
                q = q.filter(lambda m: m.status == status)
            if channel_id is not None:
                cid = int(channel_id)
                q = q.filter(lambda m: m.channel_id == cid)
            q = q.order_by(Message.created_at, Message.channel_id, Message.message_id)
            return [_message_record(m) for m in q.limit(int(limit))]

        return self._run(tx, write=False, what="list source messages")

    def set_message_status(self, channel_id: int, message_id: int, status: str, *,
                           reason: str | None = None, transfer_id=UNSET) -> SourceMessageRecord:
        _check(status, SOURCE_STATUSES, "source message status")
        Message = self.entities.SourceMessage

        def tx():
            m = Message.get_for_update(channel_id=int(channel_id), message_id=int(message_id))
            if m is None:
                raise IngestNotFoundError(f"source message {channel_id}/{message_id}")
            m.set(status=status, reason=reason, updated_at=self._ingest_now())
            if transfer_id is not UNSET:
                m.transfer_id = transfer_id
            return _message_record(m)

        return self._run(tx, write=True, what="set source message status")

    # -- document ids --------------------------------------------------------------------

    def find_ingested_document(self, document_id: int) -> IngestedDocumentRecord | None:
        Document = self.entities.IngestedDocument

        def tx():
            d = Document.get(document_id=int(document_id))
            return None if d is None else _document_record(d)

        return self._run(tx, write=False, what="find ingested document")

    def ingested_document_ids(self, document_ids: Iterable[int]) -> set[int]:
        ids = sorted({int(i) for i in document_ids})
        if not ids:
            return set()
        Document, Transfer = self.entities.IngestedDocument, self.entities.Transfer

        def tx():
            found: set[int] = set()
            for start in range(0, len(ids), 500):
                batch = ids[start:start + 500]
                found.update(select(d.document_id for d in Document if d.document_id in batch
                                    and not exists(t for t in Transfer if t.id == d.transfer_id
                                                   and t.state == "failed")))
            return found

        return self._run(tx, write=False, what="look up ingested documents")

    def _insert_documents(self, entries, set_key, transfer_id) -> int:
        """Inside a session: insert the missing document rows, and point a row whose transfer
        failed (lost) at ``transfer_id``, the copy that holds the content now; return how many."""
        Document, Transfer = self.entities.IngestedDocument, self.entities.Transfer
        now, added = self._ingest_now(), 0
        fields = dict(set_key=set_key, transfer_id=transfer_id, created_at=now)
        for document_id, channel_id, message_id in entries:
            if document_id is None:
                continue
            row = dict(channel_id=int(channel_id), message_id=int(message_id), **fields)
            d = Document.get_for_update(document_id=int(document_id))
            if d is None:
                Document(document_id=int(document_id), **row)
            elif (transfer_id is not None and d.transfer_id not in (None, transfer_id)
                  and exists(t for t in Transfer if t.id == d.transfer_id and t.state == "failed")):
                d.set(**row)
            else:
                continue
            added += 1
        return added

    def record_ingested_documents(self, entries: Iterable[Sequence], *, set_key: str | None = None,
                                  transfer_id: str | None = None) -> int:
        rows = [tuple(e) for e in entries]

        def tx():
            return self._insert_documents(rows, set_key, transfer_id)

        return self._run(tx, write=True, what="record ingested documents")

    # -- archive sets --------------------------------------------------------------------

    def upsert_archive_set(
        self, set_key: str, *, channel_id: int, topic_id: int | None = None, base_name: str,
        archive_format: str, scheme: str, expected_parts: int | None, seen_parts: int,
        complete: bool, total_size: int,
    ) -> ArchiveSetRecord:
        if not set_key:
            raise ValueError("set key must not be empty")
        Set = self.entities.ArchiveSet
        counts = dict(expected_parts=None if expected_parts is None else int(expected_parts),
                      seen_parts=int(seen_parts), total_size=int(total_size))

        def tx():
            now = self._ingest_now()
            s = Set.get_for_update(set_key=set_key)
            if s is None:
                s = Set(set_key=set_key, channel_id=int(channel_id), topic_id=_topic_in(topic_id),
                        base_name=str(base_name), archive_format=str(archive_format),
                        scheme=str(scheme), state="ready" if complete else "waiting",
                        complete=bool(complete), created_at=now, updated_at=now, **counts)
                s.flush()  # a racing insert fails here and is retried as an update
                return _set_record(s)
            if s.complete and not complete:  # a stale view (a racing scan): keep the complete one
                s.updated_at = now
                return _set_record(s)
            s.set(updated_at=now, complete=bool(complete), **counts)
            if s.state == "waiting" and s.complete:
                s.state = "ready"
            return _set_record(s)

        return self._run(tx, write=True, what=f"update archive set {set_key!r}")

    def get_archive_set(self, set_key: str) -> ArchiveSetRecord | None:
        Set = self.entities.ArchiveSet

        def tx():
            s = Set.get(set_key=set_key)
            return None if s is None else _set_record(s)

        return self._run(tx, write=False, what="read archive set")

    def list_archive_sets(self, state: str | None = None, channel_id: int | None = None,
                          limit: int = 100) -> list[ArchiveSetRecord]:
        if state is not None:
            _check(state, SET_STATES, "archive set state")
        Set = self.entities.ArchiveSet

        def tx():
            q = Set.select()
            if state is not None:
                q = q.filter(lambda s: s.state == state)
            if channel_id is not None:
                cid = int(channel_id)
                q = q.filter(lambda s: s.channel_id == cid)
            q = q.order_by(Set.updated_at, Set.set_key)
            return [_set_record(s) for s in q.limit(int(limit))]

        return self._run(tx, write=False, what="list archive sets")

    def archive_sets_by_state(self) -> dict[str, int]:
        Set = self.entities.ArchiveSet

        def tx():
            found = dict(select((s.state, count(s)) for s in Set))
            return {state: int(found.get(state, 0)) for state in SET_STATES}

        return self._run(tx, write=False, what="count archive sets")

    def _lease(self, table: str, key: str, where: str, order: str, params: dict,
               owner: str, limit: int, lease_seconds: float) -> list:
        """Inside a write session: lease up to ``limit`` rows matching ``where``
        (which must include the "no live lease" condition); return their keys."""
        if self.dialect == "postgres":
            cur = self.db.execute(
                f"WITH due AS MATERIALIZED (SELECT {key} FROM {table} WHERE {where} "
                f"ORDER BY {order} LIMIT $lim FOR UPDATE SKIP LOCKED) "
                f"UPDATE {table} SET lease_owner = $owner, lease_until = $until "
                f"FROM due WHERE {table}.{key} = due.{key} AND {where} "
                f"RETURNING {table}.{key}", {}, params)
            return [r[0] for r in cur.fetchall()]
        cur = self.db.execute(
            f"SELECT {key} FROM {table} WHERE {where} ORDER BY {order} LIMIT $lim", {}, params)
        keys = []
        for candidate in [r[0] for r in cur.fetchall()]:
            params["candidate"] = candidate
            cur = self.db.execute(
                f"UPDATE {table} SET lease_owner = $owner, lease_until = $until "
                f"WHERE {key} = $candidate AND {where}", {}, params)
            if cur.rowcount == 1:
                keys.append(candidate)
        return keys

    def claim_ready_sets(self, owner: str, limit: int, lease_seconds: float, *,
                         channel_id: int | None = None,
                         states: Sequence[str] = CLAIMABLE_SET_STATES) -> list[ArchiveSetRecord]:
        """Lease up to ``limit`` sets to work on; never one with another's live lease."""
        if not owner:
            raise ValueError("lease owner must not be empty")
        states = _as_states(states)
        for s in states:
            _check(s, CLAIMABLE_SET_STATES, "claimable set state")
        if int(limit) <= 0 or not states:
            return []
        Set = self.entities.ArchiveSet
        params: dict = {"owner": owner, "lim": int(limit)}
        params.update({f"s{i}": s for i, s in enumerate(states)})
        where = (f"state IN ({', '.join(f'$s{i}' for i in range(len(states)))}) "
                 "AND (lease_until IS NULL OR lease_until <= $now) "
                 "AND (next_attempt_at IS NULL OR next_attempt_at <= $now)")
        if channel_id is not None:
            params["cid"] = int(channel_id)
            where += " AND channel_id = $cid"

        def tx():
            now = self._ingest_now()
            params.update(now=now, until=now + float(lease_seconds))
            keys = self._lease("archive_sets", "set_key", where, "updated_at, set_key", params,
                               owner, limit, lease_seconds)
            if not keys:
                return []
            rows = [_set_record(s) for s in Set.select(
                lambda s: s.set_key in keys and s.lease_owner == owner)]
            return sorted(rows, key=lambda r: (r.updated_at, r.set_key))

        return self._run(tx, write=True, what="claim archive sets")

    def _set_for_update(self, set_key: str):
        s = self.entities.ArchiveSet.get_for_update(set_key=set_key)
        if s is None:
            raise IngestNotFoundError(f"archive set {set_key!r}")
        return s

    def renew_set_lease(self, set_key: str, owner: str, lease_seconds: float) -> bool:
        def tx():
            s = self._set_for_update(set_key)
            if s.lease_owner != owner:
                return False
            s.lease_until = self._ingest_now() + float(lease_seconds)
            return True

        return self._run(tx, write=True, what="renew archive set lease")

    def record_set_failure(self, set_key: str, owner: str, *, error: str, max_attempts: int,
                           backoff: Callable[[int], float], run_id: str | None = None,
                           account: str | None = None) -> ArchiveSetRecord:
        """One failed try of a set (whoever holds it): attempts += 1, last_error kept.
        Below ``max_attempts`` the set waits ``backoff(attempts)`` seconds before it
        can be claimed again; at the cap it is skipped with reason "failed" and the
        error as the detail of its skip rows. The lease is released either way."""
        Message = self.entities.SourceMessage
        error = (error or "unknown error")[:2000]

        def tx():
            s = self._set_for_update(set_key)
            if s.lease_owner not in (owner, None):
                raise SetLeaseLostError(set_key, owner, s.lease_owner)
            now = self._ingest_now()
            attempts = int(s.attempts or 0) + 1
            s.set(attempts=attempts, last_error=error, lease_owner=None, lease_until=None,
                  updated_at=now)
            if attempts < int(max_attempts):
                s.next_attempt_at = now + float(backoff(attempts))
                return _set_record(s)
            s.set(state="skipped", reason="failed", next_attempt_at=None)
            detail = f"failed {attempts} time(s); last error: {error}"
            for m in Message.select(lambda m: m.set_key == set_key):
                m.set(status="skipped", reason="failed", updated_at=now)
                self._put_skip(m.channel_id, m.message_id, "failed", detail, set_key, run_id,
                               account or m.account, now)
            return _set_record(s)

        return self._run(tx, write=True, what=f"record a failure of archive set {set_key!r}")

    def release_set_lease(self, set_key: str, owner: str) -> bool:
        def tx():
            s = self._set_for_update(set_key)
            if s.lease_owner != owner:
                return False
            s.set(lease_owner=None, lease_until=None)
            return True

        return self._run(tx, write=True, what="release archive set lease")

    def set_archive_set_state(self, set_key: str, state: str, *, expected=None,
                              reason: str | None = None, sha256=UNSET, transfer_id=UNSET,
                              lease_owner: str | None = None,
                              release_lease: bool = False) -> ArchiveSetRecord:
        _check(state, SET_STATES, "archive set state")
        expected = None if expected is None else _as_states(expected)

        def tx():
            s = self._set_for_update(set_key)
            if lease_owner is not None and s.lease_owner != lease_owner:
                raise SetLeaseLostError(set_key, lease_owner, s.lease_owner)
            if expected is not None and s.state not in expected:
                raise SetStateError(set_key, s.state, " or ".join(map(repr, expected)))
            s.set(state=state, updated_at=self._ingest_now())
            if reason is not None:
                s.reason = reason or None
            if sha256 is not UNSET:
                s.sha256 = None if sha256 is None else str(sha256).lower()
            if transfer_id is not UNSET:
                s.transfer_id = transfer_id
            if release_lease:
                s.set(lease_owner=None, lease_until=None)
            return _set_record(s)

        return self._run(tx, write=True, what=f"set state of archive set {set_key!r}")

    def mark_set_ingested(self, set_key: str, *, transfer_id: str, sha256: str,
                          lease_owner: str | None = None) -> ArchiveSetRecord:
        Message, Skip = self.entities.SourceMessage, self.entities.IngestSkip

        def tx():
            s = self._set_for_update(set_key)
            if lease_owner is not None and s.lease_owner != lease_owner:
                raise SetLeaseLostError(set_key, lease_owner, s.lease_owner)
            now = self._ingest_now()
            s.set(state="ingested", sha256=str(sha256).lower(), transfer_id=transfer_id,
                  reason=None, lease_owner=None, lease_until=None, updated_at=now)
            messages = list(Message.select(lambda m: m.set_key == set_key))
            for m in messages:
                m.set(status="ingested", reason=None, transfer_id=transfer_id, updated_at=now)
                skip = Skip.get_for_update(channel_id=m.channel_id, message_id=m.message_id)
                if skip is not None:
                    skip.delete()
            self._insert_documents(
                [(m.document_id, m.channel_id, m.message_id) for m in messages],
                set_key, transfer_id)
            return _set_record(s)

        return self._run(tx, write=True, what=f"mark archive set {set_key!r} ingested")

    def mark_set_skipped(self, set_key: str, reason: str, *, detail: str | None = None,
                         duplicate_of: str | None = None, run_id: str | None = None,
                         account: str | None = None,
                         lease_owner: str | None = None) -> ArchiveSetRecord:
        if not reason:
            raise ValueError("a skip needs a reason")
        Message = self.entities.SourceMessage

        def tx():
            s = self._set_for_update(set_key)
            if lease_owner is not None and s.lease_owner != lease_owner:
                raise SetLeaseLostError(set_key, lease_owner, s.lease_owner)
            now = self._ingest_now()
            s.set(state="skipped", reason=reason, lease_owner=None, lease_until=None,
                  updated_at=now)
            if duplicate_of is not None:
                s.transfer_id = duplicate_of
            messages = list(Message.select(lambda m: m.set_key == set_key))
            for m in messages:
                m.set(status="skipped", reason=reason, updated_at=now)
                if duplicate_of is not None:
                    m.transfer_id = duplicate_of
                self._put_skip(m.channel_id, m.message_id, reason, detail, set_key, run_id,
                               account or m.account, now)
            if duplicate_of is not None:
                self._insert_documents(
                    [(m.document_id, m.channel_id, m.message_id) for m in messages],
                    set_key, duplicate_of)
            return _set_record(s)

        return self._run(tx, write=True, what=f"mark archive set {set_key!r} skipped")

    # -- skips -------------------------------------------------------------------------

    def requeue_lost_package(self, transfer_id: str, *, reason: str,
                             states: Sequence[str] = ("ingested",)) -> list[str]:
        """A package lost after cleanup (its staged copy deleted): the archive set(s) that
        were ingested as ``transfer_id`` go back to "ready" to be fetched again from their
        source messages (actors.ingest.pipeline ``SetWorker``: a ready set that names a
        transfer is a re-fetch of that transfer). One transaction; the set keeps its
        transfer id, its sha256 is cleared (so phase 2 never settles it as a duplicate of
        its own package while it is downloaded again), attempts/backoff/lease are reset.
        Returns the set keys requeued (none: the transfer did not come from ingest, or is
        being fetched again already). ``states``: the sets' states to take (the verifier:
        "ingested"; ``stashctl retry`` of a re-fetch that failed: "failed")."""
        ArchiveSet = self.entities.ArchiveSet
        states = _as_states(states)
        for state in states:
            _check(state, SET_STATES, "archive set state")

        def tx():
            now = self._ingest_now()
            keys = []
            for s in ArchiveSet.select(lambda a: a.transfer_id == transfer_id and a.state in states):
                s.set(state="ready", sha256=None, reason=reason, lease_owner=None, lease_until=None,
                      attempts=0, next_attempt_at=None, last_error=None, updated_at=now)
                keys.append(s.set_key)
            return sorted(keys)

        return self._run(tx, write=True, what=f"requeue the sets of lost transfer {transfer_id!r}")

    def _put_skip(self, channel_id, message_id, reason, detail, set_key, run_id, account, now):
        Skip = self.entities.IngestSkip
        k = Skip.get_for_update(channel_id=channel_id, message_id=message_id)
        fields = dict(reason=reason, detail=detail, set_key=set_key, run_id=run_id,
                      account=account, created_at=now)
        if k is None:
            k = Skip(channel_id=channel_id, message_id=message_id, **fields)
        else:
            k.set(**fields)
        return k

    def record_skip(self, channel_id: int, message_id: int, reason: str, *,
                    detail: str | None = None, set_key: str | None = None,
                    run_id: str | None = None, account: str | None = None) -> SkipRecord:
        if not reason:
            raise ValueError("a skip needs a reason")
        Message = self.entities.SourceMessage
        cid, mid = int(channel_id), int(message_id)

        def tx():
            now = self._ingest_now()
            k = self._put_skip(cid, mid, str(reason), detail, set_key, run_id, account, now)
            m = Message.get_for_update(channel_id=cid, message_id=mid)
            if m is not None:
                m.set(status="skipped", reason=str(reason), updated_at=now)
            k.flush()
            return _skip_record(k)

        return self._run(tx, write=True, what=f"record skip of {channel_id}/{message_id}")

    def clear_skip(self, channel_id: int, message_id: int) -> bool:
        Skip = self.entities.IngestSkip

        def tx():
            k = Skip.get_for_update(channel_id=int(channel_id), message_id=int(message_id))
            if k is None:
                return False
            k.delete()
            return True

        return self._run(tx, write=True, what="clear skip")

    def list_skips(self, reason: str | None = None, channel_id: int | None = None,
                   limit: int = 100) -> list[SkipRecord]:
        Skip = self.entities.IngestSkip

        def tx():
            q = Skip.select()
            if reason is not None:
                q = q.filter(lambda k: k.reason == reason)
            if channel_id is not None:
                cid = int(channel_id)
                q = q.filter(lambda k: k.channel_id == cid)
            q = q.order_by(lambda k: (-k.created_at, -k.message_id))
            return [_skip_record(k) for k in q.limit(int(limit))]

        return self._run(tx, write=False, what="list skips")

    def skips_by_reason(self, channel_id: int | None = None) -> dict[str, int]:
        Skip = self.entities.IngestSkip

        def tx():
            if channel_id is None:
                rows = select((k.reason, count(k)) for k in Skip)
            else:
                cid = int(channel_id)
                rows = select((k.reason, count(k)) for k in Skip if k.channel_id == cid)
            return {reason: int(n) for reason, n in rows}

        return self._run(tx, write=False, what="count skips")

    # -- runs --------------------------------------------------------------------------

    def start_run(self, *, mapping: str, channel_id: int, account: str,
                  topic_id: int | None = None, owner: str | None = None,
                  run_id: str | None = None) -> IngestRunRecord:
        Run = self.entities.IngestRun
        rid = run_id or str(uuid.uuid4())

        def tx():
            if Run.get(id=rid) is not None:
                raise StorageError(f"ingest run {rid!r} already exists")
            now = self._ingest_now()
            r = Run(id=rid, mapping=str(mapping), channel_id=int(channel_id),
                    topic_id=_topic_in(topic_id), account=account, owner=owner, state="running",
                    started_at=now, updated_at=now, seen=0, ingested=0, skipped=0,
                    skipped_by_reason="{}", bytes_downloaded=0)
            return _run_record(r)

        return self._run(tx, write=True, what="start ingest run")

    def _run_for_update(self, run_id: str):
        r = self.entities.IngestRun.get_for_update(id=run_id)
        if r is None:
            raise IngestNotFoundError(f"ingest run {run_id!r}")
        return r

    def update_run(self, run_id: str, *, seen: int = 0, ingested: int = 0, skipped=None,
                   bytes_downloaded: int = 0, progress=UNSET) -> IngestRunRecord:
        if isinstance(skipped, str):
            skipped = {skipped: 1}
        skipped = {str(k): int(v) for k, v in (skipped or {}).items()}

        def tx():
            r = self._run_for_update(run_id)
            by_reason = _load_counts(r.skipped_by_reason)
            for reason, n in skipped.items():
                by_reason[reason] = by_reason.get(reason, 0) + n
            r.set(seen=r.seen + int(seen), ingested=r.ingested + int(ingested),
                  skipped=r.skipped + sum(skipped.values()),
                  skipped_by_reason=json.dumps(by_reason, sort_keys=True),
                  bytes_downloaded=r.bytes_downloaded + int(bytes_downloaded),
                  updated_at=self._ingest_now())
            if progress is not UNSET:
                r.progress = progress
            return _run_record(r)

        return self._run(tx, write=True, what="update ingest run")

    def finish_run(self, run_id: str, *, state: str = "finished",
                   error: str | None = None) -> IngestRunRecord:
        _check(state, RUN_STATES, "run state")
        if state == "running":
            raise ValueError("finish_run needs a final state")

        def tx():
            r = self._run_for_update(run_id)
            now = self._ingest_now()
            r.set(state=state, finished_at=now, updated_at=now, error=error)
            return _run_record(r)

        return self._run(tx, write=True, what="finish ingest run")

    def get_run(self, run_id: str) -> IngestRunRecord | None:
        Run = self.entities.IngestRun

        def tx():
            r = Run.get(id=run_id)
            return None if r is None else _run_record(r)

        return self._run(tx, write=False, what="read ingest run")

    def list_runs(self, state: str | None = None, limit: int = 20) -> list[IngestRunRecord]:
        if state is not None:
            _check(state, RUN_STATES, "run state")
        Run = self.entities.IngestRun

        def tx():
            q = Run.select()
            if state is not None:
                q = q.filter(lambda r: r.state == state)
            q = q.order_by(lambda r: (-r.started_at, r.id))
            return [_run_record(r) for r in q.limit(int(limit))]

        return self._run(tx, write=False, what="list ingest runs")

    def refetch_waiting_channels(self) -> set[int]:
        """The channels of sets "ready" to be fetched again for a lost package: the set names
        a transfer, and that transfer is "failed" (actors.ingest.refetch)."""
        Set, Transfer = self.entities.ArchiveSet, self.entities.Transfer

        def tx():
            return {int(c) for c in select(
                s.channel_id for s in Set if s.state == "ready" and s.transfer_id is not None
                and exists(t for t in Transfer if t.id == s.transfer_id and t.state == "failed"))}

        return self._run(tx, write=False, what="list channels of waiting re-fetches")

    def channel_scanned_by_others(self, channel_id: int, owner: str, since: float) -> bool:
        """Whether a node other than ``owner`` started a scan run of ``channel_id`` at or
        after ``since`` (another process maps that channel)."""
        Run = self.entities.IngestRun
        cid, since = int(channel_id), float(since)

        def tx():
            return exists(r for r in Run if r.channel_id == cid and r.started_at >= since
                          and (r.owner is None or r.owner != owner))

        return self._run(tx, write=False, what="look for other nodes' runs")

    def interrupt_stale_runs(self, *, older_than: float, owner: str | None = None) -> int:
        Run = self.entities.IngestRun

        def tx():
            now = self._ingest_now()
            oldest = now - float(older_than)
            q = Run.select(lambda r: r.state == "running" and r.updated_at <= oldest)
            if owner is not None:
                q = q.filter(lambda r: r.owner == owner)
            n = 0
            for r in q.for_update():
                r.set(state="interrupted", finished_at=now, updated_at=now)
                n += 1
            return n

        return self._run(tx, write=True, what="interrupt stale ingest runs")

    # -- download journal ---------------------------------------------------------------

    def journal_download(self, path: str, chunk_indexes: Iterable[int]) -> None:
        chunks = sorted({int(c) for c in chunk_indexes})
        Chunk = self.entities.DownloadChunk
        key = str(path)

        def tx():
            now = self._ingest_now()
            for c in chunks:
                if Chunk.get(path=key, chunk_index=c) is None:
                    Chunk(path=key, chunk_index=c, done_at=now)

        if chunks:
            self._run(tx, write=True, what="journal downloaded chunks")

    def downloaded_chunks(self, path: str) -> set[int]:
        Chunk = self.entities.DownloadChunk
        key = str(path)

        def tx():
            return set(select(c.chunk_index for c in Chunk if c.path == key))

        return self._run(tx, write=False, what="read download journal")

    def clear_download_journal(self, path: str) -> int:
        Chunk = self.entities.DownloadChunk
        key = str(path)

        def tx():
            return Chunk.select(lambda c: c.path == key).delete(bulk=True)

        return self._run(tx, write=True, what="clear download journal")

    # -- phase 2: package index ------------------------------------------------------------

    def register_package_meta(
        self, sha256: str, transfer_id: str, *, archive_format: str | None = None,
        creator: str | None = None, tags: Iterable[str] = (),
        source_channel_id: int | None = None, source_topic_id: int | None = None,
        source_message_id: int | None = None,
    ) -> PackageMetaRecord:
        """The metadata of a package; the first entry is kept, unless its transfer failed
        (lost): then ``transfer_id``, the copy that holds the content now, takes it over."""
        Meta, Transfer = self.entities.PackageMeta, self.entities.Transfer
        sha = str(sha256).lower()
        tag_text = json.dumps([str(t) for t in tags])

        def tx():
            p = Meta.get_for_update(sha256=sha)
            if p is not None and (p.transfer_id == transfer_id or not exists(
                    t for t in Transfer if t.id == p.transfer_id and t.state == "failed")):
                return _meta_record(p)
            now = self._ingest_now()
            fields = dict(transfer_id=transfer_id, creator=creator, tags=tag_text,
                          source_channel_id=source_channel_id, source_topic_id=source_topic_id,
                          source_message_id=source_message_id, created_at=now, updated_at=now)
            if p is None:
                p = Meta(sha256=sha, archive_format=archive_format, index_state="pending",
                         entry_count=0, attempts=0, **fields)
                p.flush()
            else:
                p.set(archive_format=archive_format or p.archive_format, **fields)
                take_over_index(p)
            return _meta_record(p)

        return self._run(tx, write=True, what="register package metadata")

    def get_package_meta(self, sha256: str) -> PackageMetaRecord | None:
        Meta = self.entities.PackageMeta
        sha = str(sha256).lower()

        def tx():
            p = Meta.get(sha256=sha)
            return None if p is None else _meta_record(p)

        return self._run(tx, write=False, what="read package metadata")

    def packages_awaiting_index(self, limit: int = 100) -> list[PackageMetaRecord]:
        Meta, Package = self.entities.PackageMeta, self.entities.Package

        def tx():
            q = select(p for p in Meta if p.index_state == "pending"
                       and exists(k for k in Package if k.sha256 == p.sha256))
            q = q.order_by(lambda p: (p.created_at, p.sha256))
            return [_meta_record(p) for p in q.limit(int(limit))]

        return self._run(tx, write=False, what="packages awaiting their index")

    def claim_index_work(self, owner: str, limit: int,
                         lease_seconds: float) -> list[PackageMetaRecord]:
        if not owner:
            raise ValueError("lease owner must not be empty")
        if int(limit) <= 0:
            return []
        Meta = self.entities.PackageMeta
        params: dict = {"owner": owner, "lim": int(limit)}
        where = ("index_state = 'pending' AND (lease_until IS NULL OR lease_until <= $now "
                 "OR lease_owner = $owner) "
                 "AND EXISTS (SELECT 1 FROM packages k WHERE k.sha256 = package_meta.sha256)")

        def tx():
            now = self._ingest_now()
            params.update(now=now, until=now + float(lease_seconds))
            keys = self._lease("package_meta", "sha256", where, "created_at, sha256", params,
                               owner, limit, lease_seconds)
            if not keys:
                return []
            rows = [_meta_record(p) for p in Meta.select(
                lambda p: p.sha256 in keys and p.lease_owner == owner)]
            return sorted(rows, key=lambda r: (r.created_at, r.sha256))

        return self._run(tx, write=True, what="claim index work")

    def record_package_index(
        self, sha256: str, *, state: str, reason: str | None = None, entries: Iterable = (),
        preview: bytes | None = None, preview_path: str | None = None,
        preview_name: str | None = None, archive_format=UNSET, lease_owner: str | None = None,
    ) -> PackageMetaRecord:
        _check(state, INDEX_STATES, "index state")
        rows = [_entry_tuple(e) for e in entries]
        sha = str(sha256).lower()
        Meta, Entry = self.entities.PackageMeta, self.entities.PackageEntry

        def tx():
            p = Meta.get_for_update(sha256=sha)
            if p is None:
                raise IngestNotFoundError(f"package metadata {sha[:12]}")
            if lease_owner is not None and p.lease_owner != lease_owner:
                raise StorageError(
                    f"package {sha[:12]}: index lease of {lease_owner!r} is lost "
                    f"(held by {p.lease_owner!r})")
            Entry.select(lambda e: e.sha256 == sha).delete(bulk=True)
            for i, (path, size, crc, is_dir) in enumerate(rows):
                Entry(sha256=sha, entry_index=i, path=path, size=size, crc=crc, is_dir=is_dir)
            now = self._ingest_now()
            p.set(index_state=state, index_reason=reason, entry_count=len(rows),
                  preview=preview, preview_path=preview_path, preview_name=preview_name,
                  attempts=p.attempts + 1, indexed_at=now, updated_at=now,
                  lease_owner=None, lease_until=None)
            if archive_format is not UNSET:
                p.archive_format = archive_format
            return _meta_record(p)

        return self._run(tx, write=True, what="record package index")

    def package_entries(self, sha256: str, limit: int | None = None) -> list[PackageEntryRecord]:
        Entry = self.entities.PackageEntry
        sha = str(sha256).lower()

        def tx():
            q = Entry.select(lambda e: e.sha256 == sha).order_by(Entry.entry_index)
            if limit is not None:
                q = q.limit(int(limit))
            return [_entry_record(e) for e in q]

        return self._run(tx, write=False, what="read package entries")

    def index_states(self) -> dict[str, int]:
        Meta = self.entities.PackageMeta

        def tx():
            found = dict(select((p.index_state, count(p)) for p in Meta))
            return {state: int(found.get(state, 0)) for state in INDEX_STATES}

        return self._run(tx, write=False, what="count index states")
