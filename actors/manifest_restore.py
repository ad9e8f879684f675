"""Rebuilding the manifest of a stored transfer from its content (plain logic, no threads).

The manifest is the exact plan of what was sent.  When it is gone -- removed by
the cleanup of an ingested archive, or by the cleanup of a stashd before the
manifest of a kept original was kept (actors.cleanup) -- and the content is at
hand again (fetched again from the source channel, or the kept original), a
manifest is planned from the files and made the stored transfer's:

- :func:`same_split_limit`: the size limit under which the builder plans
  exactly the stored parts' (offset, length);
- :func:`restored_manifest`: the planned manifest checked part by part against
  the stored parts (offset, length, sha256, file name; the whole sha256 and
  size against the transfer's) -- any difference is a :class:`RestoreError`,
  nothing of other content is ever sent in the transfer's name -- with the
  stored random_ids of the parts that keep their message;
- :func:`rebuild_from_original`: both for a one-file transfer whose original
  is still at its source path (the verifier, on its hashing thread);
- :func:`nothing_to_upload_from`: before ``stashctl retry``, whether a retry
  that must upload has anything to upload from (the manifest, or for a
  retry the verifier serves, a one-file original it can plan again from).

The captions of a rebuilt manifest carry the transfer's marker; a user caption
given at upload is not stored in the database and is not restored (for an
ingested archive it is rebuilt from the mapping).
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Sequence

from storage.manifest import (
    UPLOAD_CHUNK_SIZE, Manifest, ManifestError, ManifestNotFoundError, build_manifest, plan_sources,
    plan_split, random_int64, read_manifest,
)

__all__ = ["RestoreError", "lost_parts", "nothing_to_upload_from", "rebuild_from_original",
           "restored_manifest", "same_split_limit", "with_transfer_id"]


class RestoreError(Exception):
    """The files at hand cannot be the stored transfer (another split, another content)."""


def lost_parts(parts: Sequence[Any]) -> list[int]:
    """Indexes of the parts to send again: no message, or not seen since the loss."""
    return [p.index for p in parts if p.message_id is None or p.verified_at is None]


def _round_up(n: int) -> int:
    return max(UPLOAD_CHUNK_SIZE, -(-n // UPLOAD_CHUNK_SIZE) * UPLOAD_CHUNK_SIZE)


def same_split_limit(sizes: Sequence[int], parts: Sequence[Any]) -> int:
    """A size limit under which the manifest builder plans exactly the stored parts'
    (offset, length) for sources of ``sizes``; RestoreError when there is none."""
    spans = [(p.offset, p.length) for p in sorted(parts, key=lambda p: p.index)]
    if not spans:
        raise RestoreError("the transfer has no parts")
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
    raise RestoreError(f"no size limit plans the stored split {spans[:3]}... for sources of {list(sizes)}")


def restored_manifest(transfer: Any, parts: Sequence[Any], built: Manifest, *,
                      rng: Any = None, fresh_for_lost: bool = True) -> tuple[Manifest, list[int]]:
    """``built`` (a manifest planned from the files fetched again, with the transfer's id)
    made the lost transfer's: checked part by part against the stored parts, random_ids of
    parts that keep their message kept, a fresh one for each lost part. Returns the
    manifest and the lost part indexes. RestoreError when it is not the same content/split."""
    if built.sha256 != transfer.sha256 or built.total_size != transfer.size:
        raise RestoreError(f"the content differs (sha256 {built.sha256[:12]}..., "
                           f"{built.total_size} bytes; stored: {transfer.sha256[:12]}..., "
                           f"{transfer.size} bytes)")
    if built.transfer_id != transfer.id:
        raise RestoreError(f"manifest of {built.transfer_id}, not {transfer.id}")
    stored = sorted(parts, key=lambda p: p.index)
    if len(built.parts) != len(stored):
        raise RestoreError(f"{len(built.parts)} parts planned, {len(stored)} stored")
    for plan, part in zip(built.parts, stored):
        mine = (plan.offset, plan.length, plan.sha256, plan.file_name)
        theirs = (part.offset, part.length, part.sha256, part.file_name)
        if mine != theirs:
            raise RestoreError(f"part {part.index + 1}: planned {mine}, stored {theirs}")
    lost = lost_parts(stored)
    manifest = built
    for part in stored:
        if part.index in lost and fresh_for_lost:
            rid = random_int64(rng) if rng is not None else random_int64()
            manifest = manifest.with_random_id(part.index, rid)
        else:
            manifest = manifest.with_random_id(part.index, part.random_id)
    return manifest, lost


def with_transfer_id(m: Manifest, transfer_id: str) -> Manifest:
    """``m`` planned under a random id, given ``transfer_id`` (captions re-marked)."""
    old = m.transfer_id
    parts = tuple(dataclasses.replace(p, caption=p.caption.replace(old, transfer_id))
                  for p in m.parts)
    return dataclasses.replace(m, transfer_id=transfer_id, parts=parts,
                               caption_marker=m.caption_marker.replace(old, transfer_id))


def rebuild_from_original(transfer: Any, parts: Sequence[Any], *, clock: Any = None) -> Manifest | str:
    """The manifest of one-file ``transfer`` planned again from its original at
    ``transfer.source_path`` (reads the whole file): the stored split, every stored
    random_id; or why not ("original gone/changed: ..."), never another content."""
    import os
    import time

    try:
        size = os.stat(transfer.source_path).st_size
    except FileNotFoundError:
        return f"original gone: {transfer.source_path}"
    except OSError as exc:
        return f"original unreadable: {transfer.source_path}: {exc.strerror or exc}"
    if size != transfer.size:
        return f"original changed: {transfer.source_path}: size {size}, uploaded {transfer.size}"
    try:
        limit = same_split_limit([size], parts)
        built = build_manifest(transfer.source_path, transfer.destination, limit, None,
                               clock=clock or time.time)
        manifest, _ = restored_manifest(transfer, parts, with_transfer_id(built, transfer.id),
                                        fresh_for_lost=False)
    except RestoreError as exc:
        return f"original changed: {exc}"
    except ManifestError as exc:  # SourceError: unreadable, changed while read
        return f"original unreadable: {exc}"
    return manifest


def nothing_to_upload_from(transfer: Any, parts: Sequence[Any]) -> str | None:
    """Why a retry of failed ``transfer`` that must upload (some part unsent or lost: the
    caller knows it does not just follow another copy) has nothing to upload from; None
    when it has. Cheap (no hashing): the manifest must be there and be this content's; a
    transfer whose every part was sent is served by the verifier, which plans a removed
    manifest again from a one-file original, so its original at its path with its size
    will do too (the verifier still compares every part's sha256 before it sends)."""
    path = transfer.manifest_path
    try:
        m = read_manifest(path)
    except ManifestNotFoundError:
        manifest = f"its manifest {path} is gone"
    except ManifestError as exc:
        manifest = f"its manifest is unreadable: {exc}"
    else:
        if m.sha256 == transfer.sha256 and m.total_size == transfer.size:
            return None
        manifest = f"its manifest {path} is not of this content"
    sent = bool(parts) and all(p.message_id is not None for p in parts)
    try:
        size = os.stat(transfer.source_path).st_size
    except OSError:
        return f"{manifest} and its original {transfer.source_path} is gone"
    if not sent:
        return (f"{manifest} (an upload is planned only from it; the original "
                f"{transfer.source_path} is still there: upload it again as a new transfer)")
    if size != transfer.size:
        return (f"{manifest} and its original {transfer.source_path} changed (size {size}, "
                f"uploaded {transfer.size})")
    return None
