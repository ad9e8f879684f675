"""Planning uploads: paths -> manifests -> transfer rows (plain logic, no actors).

:class:`TransferPlanner` is what the ``upload`` admin command and the inbox
call.  It refuses the whole request when any path is refused (outside the
upload roots once symlinks are resolved, missing, not a regular file, empty,
unreadable): nothing is queued then.  Every accepted file gets a manifest
written atomically *before* its transfer row exists (manifest first), then its
content is claimed:

- a package with that sha256 is stored already -> the transfer is created and
  completed by reference at once (``mark_transfer_duplicate``), nothing is
  uploaded;
- another transfer holds a live claim -> created "planned" anyway; the
  dispatcher claims again before uploading and completes it by reference
  once the other one is stored;
- else -> created "planned" holding the claim.

Split size: ``limit_bytes`` given to :meth:`plan` or to the planner wins;
otherwise the smallest upload limit among the ready accounts (so any account
can take every part; AccountActor already took ``telegram.upload_limit_margin_bytes``
off), or a regular account's 2000 MiB minus that margin when no account is ready.

Claim owners are per transfer and per node (:func:`claim_owner`), so a
restarted daemon on the same state dir re-takes its own claims while another
process on a shared database is kept out until the lease expires.

Orphan manifests: a crash between the manifest write and the row (fault point
``after_manifest_write``) leaves a manifest no transfer refers to; nothing was
uploaded for it (the uploader needs the row).  At start the daemon calls
:meth:`TransferPlanner.recover_orphans`: an orphan whose source is unchanged
and not queued meanwhile is queued *with that manifest* (same transfer id,
split, random_ids; delete_original from the config, since the request's flag
is not in the manifest); one whose source changed, vanished or left the roots,
or whose content was queued again from the same path (the inbox, a retried
``stashctl upload``), is removed.  An unreadable one is left for the operator,
and an ingest set's manifest (several sources, or its source in the ingest
staging dir) is left to the ingest pipeline, which rewrites and queues it.
"""
from __future__ import annotations

import hashlib
import os
import socket
import stat
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

from loguru import logger

from actors.faults import fault_point
from storage.manifest import (
    UPLOAD_CHUNK_SIZE, Manifest, ManifestError, build_manifest, read_manifest, write_manifest,
)

__all__ = ["PathRefusedError", "TransferPlanner", "claim_owner", "node_id", "transfer_dict",
           "part_dict", "DEFAULT_LIMIT_BYTES", "CLAIM_LEASE_SECONDS", "MANIFEST_SUFFIX"]

MIB = 1024 * 1024
DEFAULT_LIMIT_BYTES = 2000 * MIB          # a regular account's cap (4000 x 512 KiB)
CLAIM_LEASE_SECONDS = 1800.0
MANIFEST_SUFFIX = ".stashd-manifest"
UPLOAD_STATES = ("ready", "cooling_down")

log = logger.bind(actor="planner")


class PathRefusedError(ValueError):
    """Some paths cannot be uploaded; ``refused`` lists (path, reason) for every one."""

    def __init__(self, refused: list[tuple[str, str]]):
        self.refused = list(refused)
        lines = "; ".join(f"{p}: {why}" for p, why in self.refused)
        super().__init__(f"refused {len(self.refused)} path(s), nothing queued: {lines}")


def node_id(settings: Any) -> str:
    """Stable id of this daemon: host name + a digest of its state dir."""
    digest = hashlib.sha1(str(Path(settings.daemon.state_dir).resolve()).encode()).hexdigest()[:10]
    return f"{socket.gethostname()}#{digest}"


def claim_owner(node: str, transfer_id: str) -> str:
    return f"{node}/{transfer_id}"


@dataclass(frozen=True)
class _Source:
    path: Path          # resolved
    caption: str | None


class TransferPlanner:
    def __init__(self, storage: Any, settings: Any, clock: Callable[[], float] = time.time, *,
                 limit_bytes: int | None = None, node: str | None = None,
                 lease_seconds: float = CLAIM_LEASE_SECONDS):
        self.storage, self.settings, self.clock = storage, settings, clock
        self.limit_bytes = limit_bytes
        self.node = node or node_id(settings)
        self.lease_seconds = lease_seconds

    # -- the split size -----------------------------------------------------------
    def default_limit(self) -> int:
        """Smallest upload limit of the ready accounts minus the margin (any account fits)."""
        if self.limit_bytes is not None:
            return self.limit_bytes
        limits = [a.upload_limit_bytes for a in self.storage.list_accounts()
                  if a.state in UPLOAD_STATES and a.upload_limit_bytes]
        if limits:  # the accounts' limits have the margin taken off already
            return max(UPLOAD_CHUNK_SIZE, min(limits))
        margin = int(getattr(self.settings.telegram, "upload_limit_margin_bytes", 0) or 0)
        return max(UPLOAD_CHUNK_SIZE, DEFAULT_LIMIT_BYTES - margin)

    # -- paths ----------------------------------------------------------------------
    def roots(self) -> list[Path]:
        return [Path(os.path.realpath(r)) for r in self.settings.upload.roots]

    def _check_file(self, given: str, real: Path, roots: list[Path]) -> str | None:
        """Why ``real`` cannot be uploaded, or None."""
        if not any(real == r or real.is_relative_to(r) for r in roots):
            return "outside the upload roots" if roots else "no upload roots are configured"
        try:
            st = os.stat(real)
        except FileNotFoundError:
            return "missing"
        except OSError as exc:
            return f"unreadable ({exc.strerror or exc})"
        if not stat.S_ISREG(st.st_mode):
            return "not a regular file"
        if st.st_size == 0:
            return "empty"
        if not os.access(real, os.R_OK):
            return "unreadable"
        return None

    def resolve(self, paths: Iterable[str | os.PathLike], caption: str | None = None
                ) -> list[_Source]:
        """Every file to upload; raises PathRefusedError listing every refused path."""
        roots = self.roots()
        refused: list[tuple[str, str]] = []
        out: list[_Source] = []
        seen: set[Path] = set()
        for given in paths:
            given = os.fspath(given)
            real = Path(os.path.realpath(os.path.expanduser(given)))
            if not os.path.isabs(os.path.expanduser(given)):
                refused.append((given, "not an absolute path"))
                continue
            if not any(real == r or real.is_relative_to(r) for r in roots):
                refused.append((given, "outside the upload roots" if roots
                                else "no upload roots are configured"))
                continue
            if real.is_dir():
                files = sorted(p for p in real.rglob("*") if not p.is_dir())
                if not files:
                    refused.append((given, "directory has no files"))
                for f in files:
                    rel = f.relative_to(real).as_posix()
                    freal = Path(os.path.realpath(f))
                    why = self._check_file(str(f), freal, roots)
                    if why:
                        refused.append((str(f), why))
                    elif freal not in seen:
                        seen.add(freal)
                        out.append(_Source(freal, f"{caption}\n{rel}" if caption else rel))
                continue
            why = self._check_file(given, real, roots)
            if why:
                refused.append((given, why))
            elif real not in seen:
                seen.add(real)
                out.append(_Source(real, caption))
        if refused:
            raise PathRefusedError(refused)
        return out

    # -- planning -------------------------------------------------------------------
    def plan(self, paths: Iterable[str | os.PathLike], *, dest: str | None = None,
             caption: str | None = None, delete_original: bool | None = None,
             limit_bytes: int | None = None) -> list:
        """Queue one transfer per file; returns the TransferRecords (see module doc)."""
        up = self.settings.upload
        destination = dest or up.destination
        if not destination:
            raise ValueError("no destination: pass dest or set upload.destination")
        delete = up.delete_original if delete_original is None else bool(delete_original)
        limit = limit_bytes or self.default_limit()
        sources = self.resolve(list(paths), caption)
        manifests: list[Manifest] = []
        refused: list[tuple[str, str]] = []
        for src in sources:  # hash everything before queueing anything
            try:
                manifests.append(build_manifest(src.path, destination, limit, src.caption,
                                                clock=self.clock))
            except ManifestError as exc:
                refused.append((str(src.path), str(exc)))
        if refused:
            raise PathRefusedError(refused)
        return [self._queue(m, delete) for m in manifests]

    def manifest_path(self, transfer_id: str) -> Path:
        d = Path(self.settings.upload.manifests_dir or Path(self.settings.daemon.state_dir) / "manifests")
        d.mkdir(parents=True, exist_ok=True, mode=0o700)
        return d / f"{transfer_id}{MANIFEST_SUFFIX}"

    def _queue(self, m: Manifest, delete_original: bool):
        path = write_manifest(m, self.manifest_path(m.transfer_id))
        fault_point("after_manifest_write")
        return self._insert(m, path, delete_original)

    def recover_orphans(self, *, older_than: float | None = None) -> list:
        """Queue or remove manifests without a transfer row (see module doc).

        ``older_than``: only manifests last written before this time (epoch
        seconds), so one being planned right now is never touched.
        Returns the TransferRecords queued.
        """
        d = Path(self.settings.upload.manifests_dir or Path(self.settings.daemon.state_dir) / "manifests")
        if not d.is_dir():
            return []
        queued = []
        roots = self.roots()
        staging = getattr(getattr(self.settings, "ingest", None), "staging_dir", None)
        staging = Path(os.path.realpath(staging)) if staging else None
        for path in sorted(d.glob(f"*{MANIFEST_SUFFIX}")):
            tid = path.name[: -len(MANIFEST_SUFFIX)]
            try:
                if self.storage.get_transfer(tid) is not None:
                    continue
                if older_than is not None and path.stat().st_mtime >= older_than:
                    continue
            except FileNotFoundError:
                continue
            try:
                m = read_manifest(path)
            except ManifestError as exc:
                log.error("orphan manifest {} cannot be read, left for the operator: {}", path, exc)
                continue
            src = m.sources[0]
            if len(m.sources) != 1 or (staging is not None and Path(src.path).is_relative_to(staging)):
                continue   # an ingest set's manifest: the ingest pipeline rewrites and queues it
            why = self._check_file(src.path, Path(os.path.realpath(src.path)), roots)
            if why is None:
                st = os.stat(src.path)
                if (st.st_size, st.st_mtime_ns) != (src.size, src.mtime_ns):
                    why = "changed since it was planned"
            if why is None and any(t.source_path == src.path
                                   for t in self.storage.transfer_for_sha256(m.sha256)):
                why = "queued again meanwhile"
            if why is not None:
                log.info("orphan manifest {} ({}): source {}; removed, nothing was uploaded for it",
                         path.name, src.path, why)
                path.unlink(missing_ok=True)
                continue
            log.info("orphan manifest {}: queueing {} with it (a crash came before its row)",
                     path.name, src.path)
            queued.append(self._insert(m, path, bool(self.settings.upload.delete_original)))
        return queued

    def _insert(self, m: Manifest, path: Path, delete_original: bool):
        store, tid = self.storage, m.transfer_id
        claim = store.claim_content(m.sha256, claim_owner(self.node, tid), self.lease_seconds, tid)
        src = m.sources[0]
        record = store.create_transfer(
            tid, source_path=src.path, size=m.total_size, sha256=m.sha256,
            destination=m.destination, manifest_path=str(path), delete_original=delete_original,
            parts=[(p.index, p.offset, p.length, p.sha256, p.file_name, p.random_id) for p in m.parts])
        if claim.existing_package:
            record = store.mark_transfer_duplicate(tid, claim.existing_package)
            log.info("{} is stored already as transfer {}: completed by reference",
                     src.path, claim.existing_package)
        else:
            log.info("queued {} ({} bytes, {} part(s)) as transfer {}{}", src.path, m.total_size,
                     len(m.parts), tid, "" if claim.granted else f" (content claimed by {claim.holder})")
        return record


# -- admin views ------------------------------------------------------------------------
def transfer_dict(t: Any, parts: list | None = None, journaled: Callable[[int], int] | None = None) -> dict:
    """A transfer as the admin protocol shows it (see daemon ``transfers``)."""
    parts = parts or []
    sent = [p for p in parts if p.message_id is not None]
    done = sum(p.length for p in sent)
    if journaled is not None:
        for p in parts:
            if p.message_id is None:
                done += min(p.length, journaled(p.index) * UPLOAD_CHUNK_SIZE)
    return {"id": t.id, "state": t.state, "source_path": t.source_path, "size": t.size,
            "destination": t.destination, "account": t.account,
            "parts_total": t.part_count, "parts_sent": len(sent),
            "bytes_done": min(t.size, done) if t.state not in ("uploaded", "verifying", "verified",
                                                                "cleaned") else t.size,
            "duplicate_of": t.duplicate_of, "reason": t.reason,
            "created_at": t.created_at, "updated_at": t.updated_at}


def part_dict(p: Any) -> dict:
    return {"index": p.index, "offset": p.offset, "length": p.length, "file_name": p.file_name,
            "message_id": p.message_id, "account": p.account, "sent_at": p.sent_at}
