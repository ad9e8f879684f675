"""From scanned messages to uploaded, indexed packages (plain logic; the IngestActor drives it).

Three steps, each resumable from storage alone (storage.ingest, storage.transfers):

:class:`SetRecorder` -- a scanned page becomes rows. Every document whose name
is an archive name (actors.ingest.archives) is recorded as a source message
(first writer wins: a message another account or process recorded already is
not processed again) with its set key; each touched set is re-evaluated
(``set_status``) and upserted: complete sets become "ready", the others wait.
A set over ``max_archive_bytes`` is skipped (``too_large``); a set still
incomplete when a scan has reached the present is reported (``incomplete_set``
skip rows; it keeps waiting, and becomes ready when the rest arrives, which
removes the skip rows). A byte-split set whose last volume happens to be
full-size counts as complete once its newest part is ``settle_seconds`` old
(archives.set_status ``settled``). A document without a file name (or with a
bare name, no extension) is an archive when its mime type says so
(:data:`ARCHIVE_MIME_TYPES`) or, for an unspecific mime type, when the magic
bytes of its first 4 KiB do (:meth:`SetRecorder.sniff`, one ranged read); it is
named ``telegram_<document id>.<format>``. Documents that are no archives are
recorded as "seen" (no set, no skip), so no account examines them again.

:class:`SetWorker` -- a claimed set (storage ``claim_ready_sets``) is ingested:

1. *Before any byte*: every part's Telegram document id already ingested
   (a forward of an ingested archive) -> skipped ``duplicate`` of that transfer.
2. Fresh DocumentInfos (file references) are fetched with GetMessages; the
   parts are downloaded in content order into ``staging_dir/<set>/`` by
   :func:`actors.ingest.download.download_document` (parallel chunks, budget
   leases, resumable), one sha256 streamed over the whole set.
3. The content is claimed (``claim_content``, owner per node and transfer as
   the dispatcher uses it; the transfer id is derived from the set key and the
   sha256, so a restart or another process finds the same one) and checked
   again: a package with that sha256 exists -> skipped ``duplicate``; another
   owner holds the claim -> left for later.
4. Otherwise the transfer is created through the durable pipeline: manifest
   first (multi-source for multi-part sets), split at the largest upload limit
   among this node's ready accounts (a Premium account takes up to its larger
   limit, so re-splitting is rare; the dispatcher gives the transfer to an
   account whose limit fits), ``delete_original=True`` so the verifier's
   cleanup removes the staged files once verified; the package metadata
   (format, creator, tags, source) is registered "pending"; the set moves to
   "uploading". The dispatcher and the uploaders do the rest.

A ready set that names a transfer was put back by the verifier: its package was
lost after cleanup, and :meth:`SetWorker._refetch` fetches it again from the
source messages into that same transfer (actors.ingest.refetch).

:class:`Phase2` -- after the upload (phase 1, by the uploader):
``follow_uploads`` moves sets whose transfer is uploaded to "ingested" (or
``duplicate`` when the dispatcher completed it by reference, "failed" when the
transfer failed); ``index_pending`` lists the contents of packages still
"pending" (claimed, so one process does each) with actors.ingest.index and
records them; a crash in between leaves them pending for the next round.
"""
from __future__ import annotations

import asyncio
import hashlib
import re
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from loguru import logger

from actors.account_messages import DocumentInfo, GetMessages, MessagesResult
from actors.asking import ask_async
from actors.faults import fault_point
from actors.ingest.archives import SetPart, parse_archive_name, set_key, set_status, sniff_format
from actors.ingest.download import (
    AccountRangePort, DownloadError, download_document, journal_path,
)
from actors.ingest.scan import AccountScanPort, Page, Target
from actors.ingest.preview import choose_preview, discard_staged_photo, stage_source_photo
from actors.transfers import CLAIM_LEASE_SECONDS, claim_owner

__all__ = ["IngestAccountPort", "SetRecorder", "SetWorker", "Phase2", "SetOutcome", "RecordOutcome",
           "SETTLE_SECONDS", "SET_LEASE_SECONDS", "marked_channel", "transfer_id_for", "set_backoff",
           "remove_empty_staging_dirs"]

ARCHIVE_MIME_TYPES = {
    "application/zip": "zip", "application/x-zip-compressed": "zip",
    "application/x-rar-compressed": "rar", "application/vnd.rar": "rar",
    "application/x-7z-compressed": "7z",
}
_NOT_ARCHIVE_MIME = ("image/", "video/", "audio/", "text/")
SNIFF_BYTES = 4096   # one aligned ranged read: enough for every archive magic
SETTLE_SECONDS = 3600.0
SET_LEASE_SECONDS = 600.0
INDEX_LEASE_SECONDS = 600.0
# packages indexed per phase-2 round (one a second): all that were just uploaded, so the
# index reads the staged files well before the verifier's cleanup removes them
INDEX_BATCH = 32
INDEX_GIVE_UP_SECONDS = 86400.0
UPLOADED_STATES = ("uploaded", "verifying", "verified", "cleaned")
_NAMESPACE = uuid.UUID("6f1d1b7e-5a36-4f0e-9a59-1d0c6f0a7e55")

log = logger.bind(actor="ingest")


def marked_channel(channel_id: int) -> int:
    """The -100... form of a bare channel id (what an AccountActor resolves)."""
    return int(f"-100{int(channel_id)}")


def transfer_id_for(key: str, sha256: str) -> str:
    """The transfer of one set's content: the same on every restart and process."""
    return str(uuid.uuid5(_NAMESPACE, f"{key}\n{sha256}"))


def set_backoff(attempts: int, initial: float, maximum: float) -> float:
    """Seconds a set waits after its ``attempts``-th failure: initial, doubling, capped."""
    return min(float(maximum), float(initial) * 2 ** max(0, int(attempts) - 1))


def remove_empty_staging_dirs(staging_dir: Path, *, keep: set[Path] | frozenset = frozenset(),
                              older_than: float = 60.0, now: float | None = None) -> int:
    """Remove the empty per-set folders of ``staging_dir`` (the verifier's cleanup
    deletes the staged files, not their folder). A folder in ``keep`` (a set being
    worked on) or changed in the last ``older_than`` seconds (just made) stays."""
    now = time.time() if now is None else now
    removed = 0
    try:
        folders = [p for p in Path(staging_dir).iterdir() if p.is_dir() and not p.is_symlink()]
    except OSError:
        return 0
    for folder in folders:
        if folder in keep:
            continue
        try:
            if now - folder.stat().st_mtime < older_than or any(folder.iterdir()):
                continue
            folder.rmdir()  # fails (and stays) if a file appeared meanwhile
            removed += 1
        except OSError:
            continue
    return removed


def _safe(text: str) -> str:
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._") or "set"
    return cleaned[:80] + "-" + hashlib.sha1(text.encode()).hexdigest()[:10]


class IngestAccountPort(AccountScanPort, AccountRangePort):
    """Scan + download + GetMessages through one AccountActor."""

    def __init__(self, account_ref: Any, *, timeout: float = 120.0):
        AccountScanPort.__init__(self, account_ref, timeout=timeout)

    async def messages(self, channel: Any, ids: tuple[int, ...]) -> MessagesResult:
        return await ask_async(self.ref, GetMessages(channel, tuple(ids)), self.timeout)


# ------------------------------------------------------------------ recording


@dataclass
class RecordOutcome:
    seen: int = 0              # archive volumes recorded for the first time
    known: int = 0             # recorded before (another account, process or scan)
    others: int = 0            # documents that are no archives
    set_keys: set = field(default_factory=set)
    skipped: dict = field(default_factory=dict)   # reason -> sets newly skipped

    def skip(self, reason: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1


def _unnamed(doc: Any) -> bool:
    """No file name to go by: none at all, or a bare one without an extension."""
    name = Path(str(doc.file_name or "")).name.strip()
    return not name or "." not in name.strip(".")


def _needs_sniff(doc: Any) -> bool:
    mime = (doc.mime_type or "").lower()
    return (_unnamed(doc) and mime not in ARCHIVE_MIME_TYPES
            and not mime.startswith(_NOT_ARCHIVE_MIME) and doc.size > 0)


def archive_name_of(doc: Any, sniffed: dict | None = None):
    """The ArchiveName of a document: from its file name, else (unnamed) from its
    mime type or sniffed magic bytes (``sniffed``: document id -> format or None)."""
    name = parse_archive_name(doc.file_name or "")
    if name is not None or not _unnamed(doc):
        return name
    fmt = ARCHIVE_MIME_TYPES.get((doc.mime_type or "").lower()) or (sniffed or {}).get(doc.id)
    return parse_archive_name(f"telegram_{doc.id}.{fmt}") if fmt else None


class SetRecorder:
    def __init__(self, storage: Any, *, max_archive_bytes: int, clock: Callable[[], float] = time.time,
                 settle_seconds: float = SETTLE_SECONDS):
        self.storage, self.max_bytes, self.clock = storage, max_archive_bytes, clock
        self.settle_seconds = settle_seconds

    async def sniff(self, target: Target, page: Page, port: Any) -> dict[int, str | None]:
        """Magic bytes of the page's unnamed documents whose mime type says nothing
        (one 4 KiB ranged read each; messages recorded before are not read again)."""
        todo = [m for m in page.messages if m.document is not None and _needs_sniff(m.document)]
        if not todo:
            return {}
        known = self.storage.seen_message_ids(target.channel_id, [m.id for m in todo])
        found: dict[int, str | None] = {}
        for m in todo:
            if m.id in known:
                continue
            try:
                head = await port.read(m.document, 0, SNIFF_BYTES)
            except Exception as exc:  # noqa: BLE001 - unknown: counted as no archive
                log.warning("message {}: could not read the head of its document: {!r}", m.id, exc)
                head = b""
            found[m.document.id] = sniff_format(head)
        return found

    def record_page(self, target: Target, page: Page, *, account: str, run_id: str | None = None,
                    outcome: RecordOutcome | None = None,
                    sniffed: dict[int, str | None] | None = None) -> RecordOutcome:
        out = outcome or RecordOutcome()
        for m in page.messages:
            doc = m.document
            if doc is None:
                continue
            name = archive_name_of(doc, sniffed)
            if name is None:  # recorded as seen: nobody examines it again
                res = self.storage.record_source_message(
                    target.channel_id, m.id, account=account, file_name=doc.file_name or "",
                    size=doc.size, document_id=doc.id, topic_id=target.topic_id, posted_at=m.date,
                    run_id=run_id, status="seen", reason="not_archive")
                if res.created or not res.record.set_key:
                    out.others += 1
                else:  # an archive another account sniffed before (this one did not read it)
                    out.known += 1
                continue
            key = set_key(target.channel_id, target.topic_id, name)
            res = self.storage.record_source_message(
                target.channel_id, m.id, account=account,
                file_name=name.file_name if _unnamed(doc) else doc.file_name, size=doc.size,
                document_id=doc.id, topic_id=target.topic_id, posted_at=m.date, set_key=key,
                part_number=name.number, run_id=run_id)
            if res.created:
                out.seen += 1
                out.set_keys.add(res.record.set_key or key)
            else:
                out.known += 1
        return out

    def refresh_set(self, key: str, *, at_present: bool, run_id: str | None = None,
                    account: str | None = None, outcome: RecordOutcome | None = None):
        """Re-evaluate one set from its recorded messages; returns its ArchiveSetRecord."""
        out = outcome or RecordOutcome()
        store = self.storage
        messages = store.set_messages(key)
        parts = [SetPart(n, m.size, m) for m in messages
                 if (n := parse_archive_name(m.file_name)) is not None]
        if not parts:
            return None
        newest = max((m.posted_at or 0.0) for m in messages)
        waited = self.clock() - newest
        settled = at_present and waited >= self.settle_seconds
        status = set_status(parts, settled=settled)
        head = (status.ordered or parts)[0]
        first = messages[0]
        rec = store.upsert_archive_set(
            key, channel_id=first.channel_id, topic_id=first.topic_id, base_name=head.name.base,
            archive_format=head.name.format, scheme=head.name.scheme,
            expected_parts=status.expected_parts, seen_parts=status.seen_parts,
            complete=status.complete, total_size=status.total_size)
        too_large = status.total_size > self.max_bytes
        if too_large and (rec.state in ("waiting", "ready")
                          or (rec.state == "skipped" and rec.reason == "too_large")):
            fresh = rec.state != "skipped"
            rec = store.mark_set_skipped(
                key, "too_large", run_id=run_id, account=account,
                detail=f"{status.total_size} bytes > ingest.max_archive_bytes {self.max_bytes}")
            if fresh:
                out.skip("too_large")
                log.info("set {} skipped: too large ({} bytes)", key, status.total_size)
        elif rec.state == "waiting" and at_present:
            fresh = any(m.reason != "incomplete_set" for m in messages)
            for m in messages:
                store.record_skip(m.channel_id, m.message_id, "incomplete_set", detail=status.reason,
                                  set_key=key, run_id=run_id, account=account)
            if fresh:
                out.skip("incomplete_set")
                log.info("set {} is incomplete: {}", key, status.reason)
        return rec

    def refresh_waiting(self, channel_id: int, *, at_present: bool, run_id: str | None = None,
                        account: str | None = None, outcome: RecordOutcome | None = None) -> None:
        """Sets of a channel still waiting: time may have settled them."""
        for s in self.storage.list_archive_sets("waiting", channel_id=channel_id, limit=1000):
            self.refresh_set(s.set_key, at_present=at_present, run_id=run_id, account=account,
                             outcome=outcome)


# ------------------------------------------------------------------ ingesting one set


@dataclass(frozen=True)
class SetOutcome:
    set_key: str
    result: str              # "queued" | "duplicate" | "too_large" | "unreadable" | "busy" | "failed"
    transfer_id: str | None = None
    sha256: str | None = None
    downloaded_bytes: int = 0
    detail: str = ""


class SetWorker:
    """Downloads, de-duplicates and queues one claimed set (see the module doc)."""

    def __init__(self, storage: Any, planner: Any, settings: Any, *, node: str,
                 staging_dir: Path, budget_for: Callable[[str], Any] | None = None,
                 limit_for: Callable[[], int] | None = None, window: int = 8,
                 clock: Callable[[], float] = time.time, chunk_size: int = 1024 * 1024,
                 set_lease_seconds: float = SET_LEASE_SECONDS,
                 claim_lease_seconds: float = CLAIM_LEASE_SECONDS,
                 sleep: Callable[[float], Any] = asyncio.sleep,
                 lease_sleep: Callable[[float], Any] = asyncio.sleep, metrics: Any = None):
        self.storage, self.planner, self.settings = storage, planner, settings
        self.metrics = metrics
        self.node, self.staging_dir = node, Path(staging_dir)
        self.budget_for, self.limit_for = budget_for, limit_for
        self.window, self.clock, self.chunk_size = window, clock, chunk_size
        self.set_lease_seconds, self.claim_lease_seconds = set_lease_seconds, claim_lease_seconds
        self.sleep, self.lease_sleep = sleep, lease_sleep
        self.max_bytes = settings.ingest.max_archive_bytes
        self.active: set[str] = set()   # set keys being processed here (their folders stay)

    def set_owner(self, account: str) -> str:
        return f"{self.node}/ingest:{account}"

    def staged_dir(self, key: str) -> Path:
        return self.staging_dir / _safe(key)

    def active_dirs(self) -> set[Path]:
        return {self.staged_dir(key) for key in self.active}

    async def process(self, rec: Any, port: IngestAccountPort, *, account: str, mapping: Any = None,
                      run_id: str | None = None,
                      on_bytes: Callable[[int], None] | None = None) -> SetOutcome:
        """Ingest one claimed set. Its lease is renewed every third of
        ``set_lease_seconds`` while this runs (a stalled download or a long
        manifest build too), so a live worker never loses it; a renewal that
        finds it lost (it expired and another worker took the set) stops the
        work with SetLeaseLostError. A worker that dies renews nothing: the set
        is claimable by others once the lease has run out."""
        from storage.ingest import SetLeaseLostError

        key, owner = rec.set_key, self.set_owner(account)
        lost: list[bool] = []
        self.active.add(key)
        work = asyncio.ensure_future(self._process(rec, port, account=account, mapping=mapping,
                                                   run_id=run_id, on_bytes=on_bytes))
        beat = asyncio.ensure_future(self._keep_lease(key, owner, work, lost))
        try:
            return await work
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if lost and not (task is not None and task.cancelling()):
                raise SetLeaseLostError(key, owner, None) from None
            raise
        finally:
            beat.cancel()
            self.active.discard(key)

    async def _keep_lease(self, key: str, owner: str, work: asyncio.Future, lost: list) -> None:
        every = self.set_lease_seconds / 3
        while not work.done():
            await self.lease_sleep(every)
            if work.done():
                return
            try:
                ok = self.storage.renew_set_lease(key, owner, self.set_lease_seconds)
            except Exception as exc:  # noqa: BLE001 - a transient DB error: try again next beat
                log.warning("set {}: lease renewal failed: {!r}", key, exc)
                continue
            if not ok:
                log.warning("set {}: lease lost (expired and taken over): stopping", key)
                lost.append(True)
                work.cancel()
                return

    async def _process(self, rec: Any, port: IngestAccountPort, *, account: str, mapping: Any = None,
                       run_id: str | None = None,
                       on_bytes: Callable[[int], None] | None = None) -> SetOutcome:
        store, key, owner = self.storage, rec.set_key, self.set_owner(account)
        if rec.state == "uploading" and rec.transfer_id:
            store.release_set_lease(key, owner)  # phase 2 follows the transfer
            return SetOutcome(key, "queued", rec.transfer_id, rec.sha256)
        messages = store.set_messages(key)
        parts = [SetPart(n, m.size, m) for m in messages
                 if (n := parse_archive_name(m.file_name)) is not None]
        ordered = [p.ref for p in set_status(parts, settled=True).ordered]
        total = sum(m.size for m in ordered)
        if rec.transfer_id is not None:  # requeued by the verifier: a lost package (refetch.py)
            return await self._refetch(rec, ordered, port, account=account, mapping=mapping,
                                       run_id=run_id, on_bytes=on_bytes)
        doc_ids = [m.document_id for m in ordered if m.document_id is not None]
        # 1. before any byte: the same Telegram documents were ingested already
        if doc_ids and len(doc_ids) == len(ordered) and set(doc_ids) <= store.ingested_document_ids(doc_ids):
            first = store.find_ingested_document(doc_ids[0])
            store.mark_set_skipped(key, "duplicate", duplicate_of=first.transfer_id, run_id=run_id,
                                   account=account, lease_owner=owner,
                                   detail=f"document already ingested from channel {first.channel_id} "
                                          f"message {first.message_id}")
            log.info("set {} skipped before download: document {} already ingested", key, doc_ids[0])
            return SetOutcome(key, "duplicate", first.transfer_id, detail="document id")
        if total > self.max_bytes:
            store.mark_set_skipped(key, "too_large", run_id=run_id, account=account, lease_owner=owner,
                                   detail=f"{total} bytes > ingest.max_archive_bytes {self.max_bytes}")
            return SetOutcome(key, "too_large")
        store.set_archive_set_state(key, "downloading", expected=("ready", "downloading"),
                                    lease_owner=owner)
        # 2. download, one sha256 over the whole set
        channel = marked_channel(rec.channel_id)
        got = await self._download(rec, ordered, port, account=account, on_bytes=on_bytes)
        if isinstance(got, str):
            store.mark_set_skipped(key, "unreadable", run_id=run_id, account=account,
                                   lease_owner=owner, detail=got)
            return SetOutcome(key, "unreadable", detail=got)
        paths, sha, downloaded, fresh = got
        folder = self.staged_dir(key)
        # 3. claim the content, then look again
        tid = transfer_id_for(key, sha)
        claim = store.claim_content(sha, claim_owner(self.node, tid), self.claim_lease_seconds, tid)
        if claim.existing_package and claim.existing_package != tid:
            store.mark_set_skipped(key, "duplicate", duplicate_of=claim.existing_package, run_id=run_id,
                                   account=account, lease_owner=owner,
                                   detail=f"same content (sha256 {sha[:12]}...) already stored")
            self._remove_staged(paths, folder)
            log.info("set {} skipped after download: content stored as transfer {}", key,
                     claim.existing_package)
            return SetOutcome(key, "duplicate", claim.existing_package, sha, downloaded, "sha256")
        if not claim.granted and not claim.existing_package:
            # the same content is on its way (another set): Phase2 settles this one as a
            # duplicate once that is stored, or a later round claims it again
            store.set_archive_set_state(key, "downloading", sha256=sha, lease_owner=owner,
                                        release_lease=True)
            return SetOutcome(key, "busy", None, sha, downloaded, f"content claimed by {claim.holder}")
        # a transfer of this content already on its way is reused; never one completed by
        # reference (it holds no copy of its own) nor a failed (lost) one
        existing = [t for t in store.transfer_for_sha256(sha)
                    if t.state != "failed" and t.duplicate_of is None]
        if existing:
            tid = existing[0].id
        else:
            # 4. manifest first, then the transfer row
            await self._create_transfer(tid, paths, sha, rec, mapping)
        if tid == transfer_id_for(key, sha):  # our staged files: a Telegram photo for phase 2
            await stage_source_photo(port, channel, fresh.messages, folder)
        first_msg = ordered[0]
        store.register_package_meta(
            sha, tid, archive_format=rec.archive_format,
            creator=getattr(mapping, "creator", None), tags=tuple(getattr(mapping, "tags", ()) or ()),
            source_channel_id=rec.channel_id, source_topic_id=rec.topic_id,
            source_message_id=first_msg.message_id)
        store.set_archive_set_state(key, "uploading", sha256=sha, transfer_id=tid, lease_owner=owner,
                                    release_lease=True)
        # its documents count as ingested from now on: a forward elsewhere is skipped
        # before any byte even while this upload is still running
        store.record_ingested_documents([(m.document_id, m.channel_id, m.message_id)
                                         for m in ordered if m.document_id is not None],
                                        set_key=key, transfer_id=tid)
        for path in paths:
            journal_path(path).unlink(missing_ok=True)
        log.info("set {} ({} part(s), {} bytes) queued as transfer {}", key, len(paths), total, tid)
        return SetOutcome(key, "queued", tid, sha, downloaded)

    async def _refetch(self, rec: Any, ordered: list, port: IngestAccountPort, *, account: str,
                       mapping: Any = None, run_id: str | None = None,
                       on_bytes: Callable[[int], None] | None = None) -> SetOutcome:
        """Fetch the set of a transfer lost after cleanup again and queue the lost parts
        (actors.ingest.refetch)."""
        from actors.ingest.refetch import RefetchError, marked_reason, restored_manifest, same_split_limit
        from storage.manifest import write_manifest

        store, key, owner = self.storage, rec.set_key, self.set_owner(account)
        t = store.get_transfer(rec.transfer_id)
        if t is None:
            store.set_archive_set_state(key, "failed", reason=f"re-fetch: transfer {rec.transfer_id} "
                                        f"does not exist", lease_owner=owner, release_lease=True)
            return SetOutcome(key, "failed", rec.transfer_id, detail="re-fetch: no such transfer")
        if t.state != "failed":  # put back meanwhile (stashctl retry): phase 2 follows it
            store.set_archive_set_state(key, "uploading", sha256=t.sha256, reason="",
                                        lease_owner=owner, release_lease=True)
            return SetOutcome(key, "queued", t.id, t.sha256, detail="re-fetch: no longer failed")
        package = store.find_package(t.sha256)
        if package is not None and package.transfer_id != t.id:
            return self._stored_again(rec, t, owner, package.transfer_id)
        store.set_archive_set_state(key, "downloading", expected=("ready", "downloading"),
                                    lease_owner=owner)
        got = await self._download(rec, ordered, port, account=account, on_bytes=on_bytes)
        why: str | None = got if isinstance(got, str) else None
        folder = self.staged_dir(key)
        if why is None:
            paths, sha, downloaded, _ = got
            if sha != t.sha256:
                why = f"the source now holds other content (sha256 {sha[:12]}...)"
        if why is not None:
            if not isinstance(got, str):
                self._remove_staged(got[0], folder)
            return self._lost_for_good(rec, t, owner, why)
        claim = store.claim_content(sha, claim_owner(self.node, t.id), self.claim_lease_seconds, t.id)
        if claim.existing_package:  # stored again meanwhile (another copy of the content)
            self._remove_staged(paths, folder)
            return self._stored_again(rec, t, owner, claim.existing_package, sha, downloaded)
        if not claim.granted:  # someone else works on this content now: a later round
            store.release_set_lease(key, owner)
            return SetOutcome(key, "busy", t.id, sha, downloaded,
                              f"content claimed by {claim.holder or claim.existing_package}")
        parts = store.list_parts(t.id)
        try:
            limit = same_split_limit([p.stat().st_size for p in paths], parts)
            built = await asyncio.to_thread(_build_set_manifest, paths, t.destination, limit,
                                            _caption(rec, mapping), self.clock, t.id,
                                            f"{rec.base_name}.{rec.archive_format}")
            manifest, lost = restored_manifest(t, parts, built)
        except RefetchError as exc:
            store.release_claim(sha, claim_owner(self.node, t.id))
            self._remove_staged(paths, folder)
            return self._lost_for_good(rec, t, owner, str(exc), label="CANNOT BE RESTORED",
                                       result="refused")
        write_manifest(manifest, t.manifest_path)  # manifest first, then the rows
        for index in lost:
            store.set_part_random_id(t.id, index, manifest.parts[index].random_id)
        store.set_transfer_state(t.id, "uploading", expected=("failed",), attempts=0, account=None,
                                 reason=marked_reason(t, f"fetched again from channel "
                                                         f"{rec.channel_id}, part(s) "
                                                         f"{[i + 1 for i in lost]} sent again"))
        store.set_archive_set_state(key, "uploading", sha256=sha, transfer_id=t.id, reason="",
                                    lease_owner=owner, release_lease=True)
        for path in paths:
            journal_path(path).unlink(missing_ok=True)
        self._metric("record_refetch", "queued")
        log.warning("set {}: lost transfer {} fetched again from its source; part(s) {} queued "
                    "for upload", key, t.id, [i + 1 for i in lost])
        return SetOutcome(key, "queued", t.id, sha, downloaded, "re-fetched")

    def _lost_for_good(self, rec: Any, t: Any, owner: str, why: str, *,
                       label: str = "SOURCE GONE", result: str = "source_gone") -> SetOutcome:
        from actors.ingest.refetch import marked_reason

        store = self.storage
        store.set_transfer_state(t.id, "failed", reason=marked_reason(t, f"{label}: {why}"))
        store.set_archive_set_state(rec.set_key, "failed", reason=f"re-fetch of lost transfer "
                                    f"{t.id} failed: {why}", lease_owner=owner, release_lease=True)
        self._metric("record_refetch", result)
        log.error("TRANSFER {} LOST FOR GOOD: it was lost after cleanup and cannot be fetched "
                  "again from channel {} (set {}): {}", t.id, rec.channel_id, rec.set_key, why)
        return SetOutcome(rec.set_key, "lost", t.id, detail=why)

    def end_unmapped_refetches(self, channel_id: int) -> list[SetOutcome]:
        """The re-fetches waiting in ``channel_id``, which no mapping scans any more, end
        (actors.ingest.refetch): each set "failed", its lost transfer stays failed saying
        what to do. Claimed first, so a set another worker holds is left to it."""
        from actors.ingest.refetch import marked_reason, no_mapping_reason

        store, owner = self.storage, f"{self.node}/ingest:no-mapping"
        out = []
        for rec in store.claim_ready_sets(owner, 100, self.set_lease_seconds, channel_id=channel_id,
                                          states=("ready",)):
            t = store.get_transfer(rec.transfer_id) if rec.transfer_id else None
            if t is None or t.state != "failed":  # not a re-fetch (or retried meanwhile)
                store.release_set_lease(rec.set_key, owner)
                continue
            store.set_transfer_state(t.id, "failed", expected="failed",
                                     reason=marked_reason(t, no_mapping_reason(channel_id, t.id)))
            self._metric("record_refetch", "no_mapping")
            store.set_archive_set_state(
                rec.set_key, "failed", lease_owner=owner, release_lease=True,
                reason=f"re-fetch of lost transfer {t.id} impossible: no ingest mapping for "
                       f"source channel {channel_id} any more")
            log.error("TRANSFER {} LOST: it cannot be fetched again from channel {} (set {}): no "
                      "ingest mapping for that channel any more; add it back and run stashctl "
                      "retry {}", t.id, channel_id, rec.set_key, t.id)
            out.append(SetOutcome(rec.set_key, "lost", t.id, detail="no mapping"))
        return out

    def _stored_again(self, rec: Any, t: Any, owner: str, package: str, sha: str | None = None,
                      downloaded: int = 0) -> SetOutcome:
        """While the lost transfer ``t`` waited for its re-fetch, another copy of its content
        was found and uploaded (a failed package does not count as stored: storage
        ``claim_content``), and that copy is the package now: the set is its duplicate, the
        lost transfer stays failed (its reason says where the content is) and nothing is
        uploaded twice."""
        from actors.ingest.refetch import marked_reason

        store = self.storage
        store.set_transfer_state(t.id, "failed", reason=marked_reason(
            t, f"not needed, the content was stored again as transfer {package}"))
        store.mark_set_skipped(rec.set_key, "duplicate", duplicate_of=package, lease_owner=owner,
                               detail=f"lost transfer {t.id}: the same content was stored again "
                                      f"as transfer {package}")
        self._metric("record_refetch", "stored_again")
        log.warning("set {}: lost transfer {} is not fetched again: its content was stored again "
                    "as transfer {}", rec.set_key, t.id, package)
        return SetOutcome(rec.set_key, "duplicate", package, sha, downloaded, "stored again")

    def _metric(self, name: str, *args) -> None:
        fn = getattr(self.metrics, name, None) if self.metrics is not None else None
        if fn is not None:
            try:
                fn(*args)
            except Exception as exc:  # noqa: BLE001 - metrics never break ingest
                log.debug("metric {} failed: {}", name, exc)

    async def _download(self, rec: Any, ordered: list, port: IngestAccountPort, *, account: str,
                        on_bytes: Callable[[int], None] | None = None):
        """The set's documents, fetched fresh and downloaded in content order into its staging
        folder with one sha256 over the whole content: (paths, sha256 hex, bytes downloaded,
        the fresh MessagesResult), or why not (str: a source message is gone or changed)."""
        store, key, owner = self.storage, rec.set_key, self.set_owner(account)
        channel = marked_channel(rec.channel_id)
        fresh = await port.messages(channel, tuple(m.message_id for m in ordered))
        documents: list[DocumentInfo] = []
        for m, info in zip(ordered, fresh.messages):
            if info is None or info.document is None or info.document.id != m.document_id:
                return f"source message {m.message_id} is gone or changed"
            documents.append(info.document)
        folder = self.staged_dir(key)
        set_hash = hashlib.sha256()
        paths: list[Path] = []
        downloaded = 0
        last_renew = [self.clock()]
        budget = self.budget_for(account) if self.budget_for is not None else None

        def progress(nbytes: int) -> None:
            if on_bytes is not None:
                on_bytes(nbytes)
            if self.clock() - last_renew[0] >= self.set_lease_seconds / 3:
                last_renew[0] = self.clock()
                store.renew_set_lease(key, owner, self.set_lease_seconds)

        try:
            for m, document in zip(ordered, documents):
                path = folder / _safe_name(m.file_name)

                async def refresh(m=m) -> DocumentInfo:
                    again = await port.messages(channel, (m.message_id,))
                    if not again.messages or again.messages[0] is None or again.messages[0].document is None:
                        raise DownloadError(f"source message {m.message_id} is gone")
                    return again.messages[0].document

                result = await download_document(
                    port, document, path, budget=budget, window=self.window, chunk_size=self.chunk_size,
                    extra_hashers=[set_hash], refresh=refresh, on_progress=progress, clock=self.clock,
                    sleep=self.sleep)
                downloaded += result.downloaded_bytes
                paths.append(path)
        finally:
            if budget is not None and hasattr(budget, "close"):
                budget.close()
        return paths, set_hash.hexdigest(), downloaded, fresh

    async def _create_transfer(self, tid: str, paths: list[Path], sha: str, rec: Any,
                               mapping: Any) -> None:
        from storage.manifest import write_manifest
        from storage.transfers import TransferExistsError

        destination = getattr(mapping, "destination", None) or self.settings.upload.destination
        limit = self.limit_for() if self.limit_for is not None else self.planner.default_limit()
        caption = _caption(rec, mapping)
        manifest = await asyncio.to_thread(_build_set_manifest, paths, destination, limit, caption,
                                           self.clock, tid, f"{rec.base_name}.{rec.archive_format}")
        if manifest.sha256 != sha:
            raise DownloadError(f"set {rec.set_key}: staged files hash to {manifest.sha256}, "
                                f"downloaded as {sha} (changed on disk?)")
        path = write_manifest(manifest, self.planner.manifest_path(tid))
        fault_point("ingest_after_manifest")
        try:
            self.storage.create_transfer(
                tid, source_path=manifest.sources[0].path, size=manifest.total_size, sha256=sha,
                destination=destination, manifest_path=str(path), delete_original=True,
                parts=[(p.index, p.offset, p.length, p.sha256, p.file_name, p.random_id)
                       for p in manifest.parts])
        except TransferExistsError:  # another process (or our crashed self) made it
            pass

    @staticmethod
    def _remove_staged(paths: list[Path], folder: Path) -> None:
        for path in paths:
            path.unlink(missing_ok=True)
            journal_path(path).unlink(missing_ok=True)
        try:
            folder.rmdir()
        except OSError:
            pass


def _safe_name(file_name: str) -> str:
    name = Path(file_name or "file").name
    return name if name not in ("", ".", "..") else "file"


def _caption(rec: Any, mapping: Any) -> str | None:
    lines = []
    creator = getattr(mapping, "creator", None)
    if creator:
        lines.append(f"by {creator}")
    tags = [re.sub(r"\W+", "_", t).strip("_") for t in (getattr(mapping, "tags", ()) or ())]
    if any(tags):
        lines.append(" ".join(f"#{t}" for t in tags if t))
    return "\n".join(lines) or None


def _build_set_manifest(paths: list[Path], destination: str, limit: int, caption: str | None,
                        clock: Callable[[], float], transfer_id: str, split_name: str | None = None):
    """The manifest of a set: one source per staged file, in content order."""
    from storage import manifest as mf
    if len(paths) == 1:
        m = mf.build_manifest(paths[0], destination, limit, caption, clock=clock)
    else:  # each volume one document when it fits, else the whole content re-split
        m = mf.build_multi_manifest(paths, destination, limit, caption, split_name=split_name,
                                    clock=clock)
    return _with_transfer_id(m, transfer_id) if m.transfer_id != transfer_id else m


def _with_transfer_id(m: Any, transfer_id: str):
    """The manifest with our (deterministic) transfer id, captions re-marked."""
    import dataclasses
    old = m.transfer_id
    parts = tuple(dataclasses.replace(p, caption=p.caption.replace(old, transfer_id))
                  if hasattr(p, "caption") else p for p in m.parts)
    changes = {"transfer_id": transfer_id, "parts": parts}
    for name in ("caption", "caption_marker"):
        if hasattr(m, name) and isinstance(getattr(m, name), str):
            changes[name] = getattr(m, name).replace(old, transfer_id)
    return dataclasses.replace(m, **changes)


# ------------------------------------------------------------------ phase 2


@dataclass
class Phase2Outcome:
    ingested: int = 0
    skipped: dict = field(default_factory=dict)
    failed: int = 0
    indexed: dict = field(default_factory=dict)   # index state -> count


class Phase2:
    def __init__(self, storage: Any, *, node: str, clock: Callable[[], float] = time.time,
                 index_lease_seconds: float = INDEX_LEASE_SECONDS,
                 give_up_seconds: float = INDEX_GIVE_UP_SECONDS, staging_dir: Path | None = None):
        self.storage, self.node, self.clock = storage, node, clock
        self.staging_dir = staging_dir
        self.index_lease_seconds, self.give_up_seconds = index_lease_seconds, give_up_seconds

    @property
    def owner(self) -> str:
        return f"{self.node}/index"

    def follow_uploads(self, limit: int = 200) -> Phase2Outcome:
        """Sets in "uploading" whose transfer has moved on."""
        out = Phase2Outcome()
        store = self.storage
        for s in store.list_archive_sets("uploading", limit=limit):
            t = store.get_transfer(s.transfer_id) if s.transfer_id else None
            if t is None:
                continue
            if t.state in UPLOADED_STATES:
                if t.duplicate_of:
                    store.mark_set_skipped(s.set_key, "duplicate", duplicate_of=t.duplicate_of,
                                           detail="the content was stored meanwhile (by reference)")
                    out.skipped["duplicate"] = out.skipped.get("duplicate", 0) + 1
                else:
                    store.mark_set_ingested(s.set_key, transfer_id=t.id, sha256=s.sha256 or t.sha256)
                    out.ingested += 1
                    log.info("set {} ingested as transfer {}", s.set_key, t.id)
            elif t.state == "failed":
                store.set_archive_set_state(s.set_key, "failed", reason=f"transfer failed: {t.reason}")
                out.failed += 1
        now = self.clock()
        for s in store.list_archive_sets("downloading", limit=limit):
            # downloaded while the same content was claimed by another set ("busy")
            if not s.sha256 or (s.lease_until is not None and s.lease_until > now):
                continue
            package = store.find_package(s.sha256)
            if package is None:
                continue
            store.mark_set_skipped(s.set_key, "duplicate", duplicate_of=package.transfer_id,
                                   detail=f"same content (sha256 {s.sha256[:12]}...) already stored")
            out.skipped["duplicate"] = out.skipped.get("duplicate", 0) + 1
            if self.staging_dir is not None:
                folder = Path(self.staging_dir) / _safe(s.set_key)
                SetWorker._remove_staged(list(folder.glob("*")) if folder.is_dir() else [], folder)
            log.info("set {} skipped: its content was stored meanwhile as transfer {}", s.set_key,
                     package.transfer_id)
        return out

    async def index_pending(self, limit: int = INDEX_BATCH) -> Phase2Outcome:
        from actors.ingest.index import index_archive
        from storage.manifest import ManifestError, read_manifest

        out = Phase2Outcome()
        store = self.storage
        for meta in store.claim_index_work(self.owner, limit, self.index_lease_seconds):
            t = store.get_transfer(meta.transfer_id)
            paths: list[str] = []
            if t is not None:
                try:
                    paths = [s.path for s in read_manifest(t.manifest_path).sources]
                except ManifestError:
                    paths = []
            if not paths or not all(Path(p).exists() for p in paths):
                if self.clock() - meta.created_at >= self.give_up_seconds:
                    store.record_package_index(meta.sha256, state="unreadable",
                                               reason="staged files were removed before indexing",
                                               lease_owner=self.owner)
                    out.indexed["unreadable"] = out.indexed.get("unreadable", 0) + 1
                    discard_staged_photo(paths)
                continue  # not on this node (yet): the lease expires, another may do it
            result = await asyncio.to_thread(index_archive, paths, fmt=meta.archive_format)
            fault_point("ingest_before_index")
            preview, preview_name = choose_preview(result, paths)  # the archive's own image first
            store.record_package_index(
                meta.sha256, state=result.state, reason=result.reason or None, entries=result.entries,
                preview=preview, preview_name=preview_name,
                archive_format=result.format or meta.archive_format, lease_owner=self.owner)
            discard_staged_photo(paths)
            out.indexed[result.state] = out.indexed.get(result.state, 0) + 1
            log.info("package {} indexed: {} ({} entries){}", meta.sha256[:12], result.state,
                     len(result.entries), f": {result.reason}" if result.reason else "")
        return out
