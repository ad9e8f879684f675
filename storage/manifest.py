"""Transfer manifests: the plan of one transfer, written before the first byte.

A manifest is a versioned msgpack document that fixes everything a retry or a
restart must reuse exactly: the source file (path, size, mtime, sha256), the
split plan (one Telegram document per part, each with its offset, length,
sha256 and 1 MiB block hashes for deep verification), the client-side upload
``file_id`` and the ``random_id`` of ``messages.sendMedia`` of every part, and
the captions with their marker.

The content may be several files laid end to end (an archive set's volumes):
``build_multi_manifest`` lists them in ``sources`` and writes version 2;
``open_source(manifest)`` reads across them. Version 1 (one source) stays
readable, and a reader that only knows version 1 refuses version 2.

On disk the file is an envelope ``{"format", "version", "sha256", "body"}``
whose ``body`` is the packed manifest and ``sha256`` its digest, so a flipped
bit is detected and the version can be read before the body is trusted.
It is written atomically (temp file in the same directory, write, flush,
fsync, rename, fsync of the directory): a crash leaves either the old
manifest or the new one, never a mix.

Every failure to read a manifest is a :class:`ManifestError` with a message
that says which file and what is wrong; nothing else escapes ``read_manifest``.
"""
from __future__ import annotations

import bisect
import contextlib
import dataclasses
import hashlib
import itertools
import os
import re
import secrets
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import msgpack

from storage.errors import StorageError

MANIFEST_VERSION = 1                  # written for one source
MULTI_SOURCE_VERSION = 2              # written for several sources (build_multi_manifest)
SUPPORTED_VERSION = 2                 # the newest version this stashd reads
MANIFEST_FORMAT = "stashd-manifest"
UPLOAD_CHUNK_SIZE = 512 * 1024        # Telegram upload part size
HASH_BLOCK_SIZE = 1024 * 1024         # block hashes: one sha256 per MiB of a part
CAPTION_LIMIT = 1024                  # Telegram caption cap for regular accounts
MARKER_PREFIX = "#stashd:"
_MARKER_RE = re.compile(r"#stashd:([0-9a-f-]{36}):(\d+)/(\d+)")
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1


class ManifestError(StorageError):
    """Base class: a manifest cannot be built, read or trusted."""


class ManifestNotFoundError(ManifestError):
    """The manifest file does not exist."""


class ManifestCorruptError(ManifestError):
    """The file is truncated, not msgpack, or fails its checksum."""


class ManifestVersionError(ManifestError):
    """The manifest was written by a newer stashd."""

    def __init__(self, path, version: int):
        self.version = version
        super().__init__(
            f"{path}: manifest version {version} is newer than supported "
            f"{SUPPORTED_VERSION}; upgrade stashd"
        )


class ManifestShapeError(ManifestError):
    """Valid msgpack, but fields are missing, mistyped or inconsistent."""


class SourceError(ManifestError):
    """The source file cannot be planned (empty, unreadable, changed while hashed)."""


@dataclass(frozen=True)
class SourceFile:
    path: str
    size: int
    mtime_ns: int
    sha256: str  # hex


@dataclass(frozen=True)
class PartPlan:
    index: int            # 0-based; captions and file names count from 1
    offset: int
    length: int
    sha256: str           # hex digest of the part's bytes
    file_name: str        # "name.001" when split, else the original name
    file_id: int          # client-side upload file id (int64), chosen once
    random_id: int        # sendMedia random_id (int64), chosen once
    caption: str
    chunk_hashes: tuple[bytes, ...]  # sha256 of each 1 MiB block of the part

    @property
    def end(self) -> int:
        return self.offset + self.length

    @property
    def upload_parts(self) -> int:
        """Number of 512 KiB upload calls this document needs."""
        return -(-self.length // UPLOAD_CHUNK_SIZE)


@dataclass(frozen=True)
class Manifest:
    version: int
    transfer_id: str
    sources: tuple[SourceFile, ...]
    total_size: int
    sha256: str
    chunk_size: int
    parts: tuple[PartPlan, ...]
    caption_marker: str   # "#stashd:<transfer_id>": search key for adoption
    destination: str
    created_at: float

    @property
    def split(self) -> bool:
        return len(self.parts) > 1

    def with_part(self, part_index: int, **changes) -> Manifest:
        parts = list(self.parts)
        parts[part_index] = dataclasses.replace(parts[part_index], **changes)
        return dataclasses.replace(self, parts=tuple(parts))

    def with_random_id(self, part_index: int, new_random_id: int) -> Manifest:
        """For a re-upload after the message was lost: a fresh random_id."""
        _check_int64("random_id", new_random_id)
        return self.with_part(part_index, random_id=new_random_id)

    def with_file_id(self, part_index: int, new_file_id: int) -> Manifest:
        _check_int64("file_id", new_file_id)
        return self.with_part(part_index, file_id=new_file_id)


# --------------------------------------------------------------------------- planning


def plan_split(size: int, limit_bytes: int) -> list[tuple[int, int]]:
    """(offset, length) of each document for a file of ``size`` bytes.

    Every part but the last is the largest multiple of 512 KiB not above
    ``limit_bytes``; the parts are contiguous and cover ``[0, size)``.
    An empty file has no parts.
    """
    if size < 0:
        raise ValueError(f"size must be >= 0, got {size}")
    if limit_bytes < UPLOAD_CHUNK_SIZE:
        raise ValueError(f"limit_bytes must be at least {UPLOAD_CHUNK_SIZE}, got {limit_bytes}")
    step = limit_bytes // UPLOAD_CHUNK_SIZE * UPLOAD_CHUNK_SIZE
    return [(off, min(step, size - off)) for off in range(0, size, step)]


def random_int64(rng=secrets) -> int:
    """A non-zero signed 64-bit id (Telegram's ``long``)."""
    while True:
        value = _randbits(rng, 64)
        if value:
            return value - 2**64 if value >= 2**63 else value


def _randbits(rng, k: int) -> int:
    """``secrets`` has randbits, ``random.Random`` getrandbits: take either."""
    return (getattr(rng, "getrandbits", None) or rng.randbits)(k)


def part_marker(caption_marker: str, index: int, count: int) -> str:
    return f"{caption_marker}:{index + 1}/{count}"


def parse_marker(text: str) -> tuple[str, int, int] | None:
    """(transfer_id, 0-based part index, part count) found in a caption, or None."""
    m = _MARKER_RE.search(text or "")
    if not m:
        return None
    number, count = int(m.group(2)), int(m.group(3))
    if not 1 <= number <= count:
        return None
    return m.group(1), number - 1, count


def part_file_name(name: str, index: int, count: int) -> str:
    if count == 1:
        return name
    return f"{name}.{index + 1:0{max(3, len(str(count)))}d}"


def _caption(user_caption: str | None, marker: str) -> str:
    if not user_caption:
        return marker
    room = CAPTION_LIMIT - len(marker) - 1
    text = user_caption if len(user_caption) <= room else user_caption[: room - 1] + "…"
    return f"{text}\n{marker}"


def _hash_spans(sources: list[tuple[Path, int]], spans: list[tuple[int, int]]):
    """Hash the concatenation of ``sources`` ((path, planned size), laid end to
    end) in one pass on two threads; returns (sha256 hex of everything,
    [(offset, length, part sha256 hex, block digests)] per span, [sha256 hex of
    each source]).

    Four kinds of hash: the whole content's (one sequential stream), each
    part's, each source's and the per-MiB block hashes. Part 0 and source 0 are
    prefixes of the content, so their hashes are the whole stream's state at
    their ends: only parts 1.. and sources 1.. need streams of their own (and
    sources not at all when they are the parts, or when there is one). Work is
    split in two halves of equal size, each thread reading with its own handles
    what it hashes (a 1 MiB buffer each):

    - this thread: the whole content, plus the first block hashes up to half
      the size of the other streams;
    - the other: from there to the end, the remaining block hashes and the
      streams of parts 1.. and sources 1.. (for one part from one source:
      every block hash).

    Reading twice is cheaper than sharing: handing each buffer from a reader to
    hashing threads cost ~0.03 s of CPU per 200 MiB and left the reader the
    busiest thread, a second read of pages just read costs ~0.02 s (page-cache
    hits). Two threads, not three: with three on two cores the scheduler left
    the whole-file stream sharing a core. hashlib releases the GIL on large
    buffers, so on two free cores a one-part file takes about one read+sha256.
    """
    blocks = [(part, offset, min(HASH_BLOCK_SIZE, start + length - offset))
              for part, (start, length) in enumerate(spans)
              for offset in range(start, start + length, HASH_BLOCK_SIZE)]
    source_spans, total = [], 0
    for _, size in sources:
        source_spans.append((total, size))
        total += size
    # the ways the content is cut whose pieces each need a sha256: the parts, and
    # the sources unless they are the parts
    tilings = [spans] if source_spans == spans else [spans, source_spans]
    streams = sum(total - t[0][1] for t in tilings)
    mine = bisect.bisect_right([offset + length for _, offset, length in blocks], streams // 2)
    digests: list[bytes | None] = [None] * len(blocks)
    with contextlib.ExitStack() as files:
        heads, tails = [], []
        for path, _ in sources:
            heads.append(files.enter_context(open(path, "rb", buffering=0)))
            tails.append(files.enter_context(open(path, "rb", buffering=0)))
            if not os.path.samestat(os.fstat(heads[-1].fileno()), os.fstat(tails[-1].fileno())):
                raise SourceError(f"{path}: file changed while it was read; try again when it is complete")
        other = _TailHasher(_Concatenation(sources, tails), blocks, mine, tilings, digests)
        other.start()
        try:
            head = _Concatenation(sources, heads)
            whole = hashlib.sha256()
            prefix_ends = sorted({t[0][1] for t in tilings})
            prefixes, next_end = {}, 0       # end of a tiling's first piece -> its sha256
            buf = memoryview(bytearray(HASH_BLOCK_SIZE))
            for i, (_, offset, length) in enumerate(blocks):
                if other.failure is not None:
                    break            # raised below, once the other thread is joined
                view, at = head.fill(buf[:length]), offset
                while next_end < len(prefix_ends) and prefix_ends[next_end] <= offset + length:
                    cut = prefix_ends[next_end]
                    whole.update(view[at - offset:cut - offset])
                    prefixes[cut], at, next_end = whole.hexdigest(), cut, next_end + 1
                whole.update(view[at - offset:])
                if i < mine:
                    digests[i] = hashlib.sha256(view).digest()
        except BaseException:
            other.stop.set()
            raise
        finally:
            other.join()
        other.raise_failure()
    hashes = [[prefixes[t[0][1]], *pieces.digests] for t, pieces in zip(tilings, other.piece_hashes)]
    part_hashes, source_hashes = hashes[0], hashes[-1]
    part_blocks: list[list[bytes]] = [[] for _ in spans]
    for (part, _, _), digest in zip(blocks, digests):
        part_blocks[part].append(digest)
    return (whole.hexdigest(),
            [(offset, length, part_hashes[i], tuple(part_blocks[i]))
             for i, (offset, length) in enumerate(spans)],
            source_hashes)


class _Concatenation:
    """Files read in order as one content, through handles opened by the caller:
    ``fill`` a buffer from the current position (across file boundaries),
    ``seek`` to an offset of the content. A file ends at its planned size: bytes
    it gained are not read (the size check after the pass sees them); one that
    ends before has shrunk."""

    def __init__(self, sources: list[tuple[Path, int]], handles: list):
        self._paths = [path for path, _ in sources]
        self._sizes = [size for _, size in sources]
        self._ends = list(itertools.accumulate(self._sizes))
        self._handles = handles
        self._index, self._left = 0, self._sizes[0]

    def seek(self, offset: int) -> None:
        self._index = bisect.bisect_right(self._ends, offset)
        self._left = self._ends[self._index] - offset
        self._handles[self._index].seek(self._sizes[self._index] - self._left)

    def fill(self, view: memoryview) -> memoryview:
        got = 0
        while got < len(view):
            if not self._left:
                self._index += 1
                self._left = self._sizes[self._index]
                self._handles[self._index].seek(0)
            n = self._handles[self._index].readinto(view[got:got + self._left])
            if not n:
                raise SourceError(f"{self._paths[self._index]}: file shrank while it was read")
            got += n
            self._left -= n
        return view


class _PieceHashes:
    """sha256 of the pieces 1.. of a tiling (contiguous (offset, length) spans
    from 0), fed the content in order from a position inside piece 0 (whose
    hash is the whole stream's)."""

    def __init__(self, spans: list[tuple[int, int]]):
        self._ends = [offset + length for offset, length in spans]
        self._index, self._hash = 0, None
        self.digests: list[str] = []

    def update(self, offset: int, view: memoryview) -> None:
        at, end = offset, offset + len(view)
        while at < end:
            cut = min(end, self._ends[self._index])
            if self._index:
                self._hash.update(view[at - offset:cut - offset])
            at = cut
            if at == self._ends[self._index]:
                if self._index:
                    self.digests.append(self._hash.hexdigest())
                self._index, self._hash = self._index + 1, hashlib.sha256()


class _TailHasher(threading.Thread):
    """The second half of :func:`_hash_spans`: block hashes from index ``first``
    on and the hashes of pieces 1.. of each tiling in ``tilings``, reading
    ``reader`` from the first byte it needs."""

    def __init__(self, reader: _Concatenation, blocks, first: int, tilings, digests: list):
        super().__init__(name="manifest-hash", daemon=True)
        self._reader, self._blocks, self._first, self._digests = reader, blocks, first, digests
        self._needed_from = min((t[1][0] for t in tilings if len(t) > 1), default=None)
        self.piece_hashes = [_PieceHashes(t) for t in tilings]
        self.stop = threading.Event()
        self.failure: BaseException | None = None

    def run(self) -> None:
        try:
            self._hash()
        except BaseException as exc:   # handed to the caller by raise_failure
            self.failure = exc

    def _hash(self) -> None:
        blocks, first, needed_from = self._blocks, self._first, self._needed_from
        start = next((i for i, (_, offset, length) in enumerate(blocks)
                      if i >= first or (needed_from is not None and offset + length > needed_from)),
                     len(blocks))
        if start == len(blocks):
            return
        self._reader.seek(blocks[start][1])
        buf = memoryview(bytearray(HASH_BLOCK_SIZE))
        for i in range(start, len(blocks)):
            if self.stop.is_set():
                return
            _, offset, length = blocks[i]
            view = self._reader.fill(buf[:length])
            if i >= first:
                self._digests[i] = hashlib.sha256(view).digest()
            for pieces in self.piece_hashes:
                pieces.update(offset, view)

    def raise_failure(self) -> None:
        if self.failure is not None:
            raise self.failure


def build_manifest(path, destination: str, limit_bytes: int, caption: str | None = None,
                   *, rng=secrets, clock=time.time) -> Manifest:
    """Plan a transfer of one file, reading it once (hashes of file, parts, blocks: one pass,
    see :func:`_hash_spans`).

    Raises :class:`SourceError` when the file is missing, empty, or changes
    while it is read.
    """
    path = Path(path)
    try:
        before = path.stat()
        spans = plan_split(before.st_size, limit_bytes)
        if not spans:
            raise SourceError(f"{path}: file is empty; Telegram refuses empty documents")
        whole, hashed, _ = _hash_spans([(path, before.st_size)], spans)
        after = path.stat()
    except OSError as exc:
        raise SourceError(f"{path}: cannot read source: {exc.strerror or exc}") from exc
    if (after.st_size, after.st_mtime_ns) != (before.st_size, before.st_mtime_ns):
        raise SourceError(f"{path}: file changed while it was read; try again when it is complete")

    transfer_id = str(uuid.UUID(int=_randbits(rng, 128), version=4))
    marker = f"{MARKER_PREFIX}{transfer_id}"
    count = len(hashed)
    parts = tuple(
        PartPlan(
            index=i, offset=offset, length=length, sha256=digest,
            file_name=part_file_name(path.name, i, count),
            file_id=random_int64(rng), random_id=random_int64(rng),
            caption=_caption(caption, part_marker(marker, i, count)),
            chunk_hashes=blocks,
        )
        for i, (offset, length, digest, blocks) in enumerate(hashed)
    )
    return Manifest(
        version=MANIFEST_VERSION, transfer_id=transfer_id,
        sources=(SourceFile(str(path.resolve()), before.st_size, before.st_mtime_ns, whole),),
        total_size=before.st_size, sha256=whole, chunk_size=UPLOAD_CHUNK_SIZE,
        parts=parts, caption_marker=marker, destination=destination, created_at=float(clock()),
    )


def _check_int64(name: str, value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not _INT64_MIN <= value <= _INT64_MAX:
        raise ValueError(f"{name} must be a signed 64-bit integer, got {value!r}")


# --------------------------------------------------------------------------- codec


def encode_body(m: Manifest) -> bytes:
    return msgpack.packb({
        "transfer_id": m.transfer_id,
        "sources": [dataclasses.asdict(s) for s in m.sources],
        "total_size": m.total_size, "sha256": m.sha256, "chunk_size": m.chunk_size,
        "parts": [{**dataclasses.asdict(p), "chunk_hashes": list(p.chunk_hashes)} for p in m.parts],
        "caption_marker": m.caption_marker, "destination": m.destination,
        "created_at": m.created_at,
    }, use_bin_type=True)


def decode_body(body: bytes, version: int, source="manifest") -> Manifest:
    try:
        doc = msgpack.unpackb(body, raw=False, strict_map_key=True)
    except Exception as exc:
        raise ManifestCorruptError(f"{source}: manifest body unreadable ({type(exc).__name__})") from None
    get = _Getter(source)
    sources = tuple(
        SourceFile(get(s, "path", str, f"sources[{i}]"), get(s, "size", int, f"sources[{i}]"),
                   get(s, "mtime_ns", int, f"sources[{i}]"), get(s, "sha256", str, f"sources[{i}]"))
        for i, s in enumerate(get(doc, "sources", list, "manifest"))
    )
    parts = tuple(_decode_part(get, p, i) for i, p in enumerate(get(doc, "parts", list, "manifest")))
    m = Manifest(
        version=version, transfer_id=get(doc, "transfer_id", str, "manifest"), sources=sources,
        total_size=get(doc, "total_size", int, "manifest"), sha256=get(doc, "sha256", str, "manifest"),
        chunk_size=get(doc, "chunk_size", int, "manifest"), parts=parts,
        caption_marker=get(doc, "caption_marker", str, "manifest"),
        destination=get(doc, "destination", str, "manifest"),
        created_at=float(get(doc, "created_at", float, "manifest")),
    )
    _check_consistent(m, source)
    return m


def _decode_part(get, p, i: int) -> PartPlan:
    where = f"parts[{i}]"
    hashes = get(p, "chunk_hashes", list, where)
    if not all(isinstance(h, bytes) and len(h) == 32 for h in hashes):
        raise ManifestShapeError(f"{get.source}: {where}.chunk_hashes: expected 32-byte digests")
    return PartPlan(
        index=get(p, "index", int, where), offset=get(p, "offset", int, where),
        length=get(p, "length", int, where), sha256=get(p, "sha256", str, where),
        file_name=get(p, "file_name", str, where), file_id=get(p, "file_id", int, where),
        random_id=get(p, "random_id", int, where), caption=get(p, "caption", str, where),
        chunk_hashes=tuple(hashes),
    )


class _Getter:
    """Typed field access that turns every surprise into a ManifestShapeError."""

    def __init__(self, source):
        self.source = source

    def __call__(self, obj, key, kind, where):
        if not isinstance(obj, dict):
            raise ManifestShapeError(f"{self.source}: {where}: expected a map, got {type(obj).__name__}")
        if key not in obj:
            raise ManifestShapeError(f"{self.source}: {where}.{key}: missing")
        value = obj[key]
        if kind is float:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        elif kind is int:
            ok = isinstance(value, int) and not isinstance(value, bool)
        else:
            ok = isinstance(value, kind)
        if not ok:
            raise ManifestShapeError(
                f"{self.source}: {where}.{key}: expected {kind.__name__}, got {type(value).__name__}")
        return value


_HEX64 = re.compile(r"[0-9a-f]{64}")


def _check_consistent(m: Manifest, source) -> None:
    def bad(msg):
        raise ManifestShapeError(f"{source}: {msg}")

    try:
        uuid.UUID(m.transfer_id)
    except ValueError:
        bad(f"transfer_id {m.transfer_id!r} is not a UUID")
    if not m.sources or sum(s.size for s in m.sources) != m.total_size:
        bad("sources do not add up to total_size")
    if not m.parts or m.chunk_size <= 0:
        bad("no parts or invalid chunk_size")
    if not all(_HEX64.fullmatch(h) for h in [m.sha256, *(s.sha256 for s in m.sources),
                                             *(p.sha256 for p in m.parts)]):
        bad("sha256 fields must be 64 lowercase hex digits")
    offset = 0
    for i, p in enumerate(m.parts):
        if p.index != i or p.offset != offset or p.length <= 0:
            bad(f"parts[{i}]: split plan is not contiguous (index {p.index}, offset {p.offset}, length {p.length})")
        if len(p.chunk_hashes) != -(-p.length // HASH_BLOCK_SIZE):
            bad(f"parts[{i}]: {len(p.chunk_hashes)} block hashes for {p.length} bytes")
        if not (_INT64_MIN <= p.file_id <= _INT64_MAX and _INT64_MIN <= p.random_id <= _INT64_MAX):
            bad(f"parts[{i}]: file_id/random_id out of int64 range")
        offset += p.length
    if offset != m.total_size:
        bad(f"parts cover {offset} bytes, total_size is {m.total_size}")


# --------------------------------------------------------------------------- on disk

def pack_manifest(manifest: Manifest) -> bytes:
    body = encode_body(manifest)
    return msgpack.packb(
        {"format": MANIFEST_FORMAT, "version": manifest.version,
         "sha256": hashlib.sha256(body).digest(), "body": body},
        use_bin_type=True,
    )


def unpack_manifest(data: bytes, source="manifest") -> Manifest:
    """Decode bytes written by :func:`pack_manifest`; only ManifestError escapes."""
    try:
        envelope = msgpack.unpackb(data, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises many types for bad input
        raise ManifestCorruptError(f"{source}: not a readable manifest (truncated or corrupt: {type(exc).__name__})") from None
    if not isinstance(envelope, dict) or envelope.get("format") != MANIFEST_FORMAT:
        raise ManifestCorruptError(f"{source}: not a stashd manifest")
    version, body, digest = envelope.get("version"), envelope.get("body"), envelope.get("sha256")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise ManifestShapeError(f"{source}: manifest version {version!r} is invalid")
    if version > SUPPORTED_VERSION:
        raise ManifestVersionError(source, version)
    if not isinstance(body, bytes) or not isinstance(digest, bytes):
        raise ManifestShapeError(f"{source}: manifest envelope lacks body or checksum")
    if hashlib.sha256(body).digest() != digest:
        raise ManifestCorruptError(f"{source}: manifest checksum mismatch (file is corrupt)")
    return decode_body(body, version, source)


def write_manifest(manifest: Manifest, path) -> Path:
    """Atomically replace ``path`` with ``manifest`` (mode 0600)."""
    path = Path(path)
    tmp = _write_temp(pack_manifest(manifest), path)
    try:
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def _write_temp(data: bytes, path: Path) -> Path:
    """Write and fsync ``data`` to a fresh temp file beside ``path``."""
    tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_manifest(path) -> Manifest:
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ManifestNotFoundError(f"{path}: manifest not found") from None
    except OSError as exc:
        raise ManifestError(f"{path}: cannot read manifest: {exc.strerror or exc}") from None
    return unpack_manifest(data, path)


def rewrite_part_random_id(path, part_index: int, random_id: int) -> Manifest:
    """Re-upload of a lost part: read the manifest, give part ``part_index`` a
    fresh ``random_id`` (the old one maps to the deleted message) and replace
    the file atomically. Returns the new manifest. Raises ManifestError.
    """
    manifest = read_manifest(path)
    if not 0 <= part_index < len(manifest.parts):
        raise ManifestShapeError(f"{path}: no part {part_index} (has {len(manifest.parts)})")
    updated = manifest.with_random_id(part_index, random_id)
    write_manifest(updated, path)
    return updated


def discard_stale_temps(path) -> int:
    """Remove temp files a crash left beside ``path``; returns how many."""
    path = Path(path)
    removed = 0
    for stray in path.parent.glob(f".{glob_escape(path.name)}.*.tmp"):
        stray.unlink(missing_ok=True)
        removed += 1
    return removed


def glob_escape(name: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", name)


# --------------------------------------------------------------------------- several sources
#
# A transfer whose content is several files laid end to end (an archive set
# downloaded from a source channel: foo.z01, foo.z02, foo.zip). The manifest's
# ``sources`` lists them in content order; offsets in the split plan are
# offsets in that concatenation. Such a manifest is written as version 2, so
# a stashd that only knows version 1 (one source) refuses it instead of
# uploading the first file alone.


def plan_sources(sizes: list[int], limit_bytes: int) -> list[tuple[int, int]] | None:
    """One part per source when every source fits ``limit_bytes``, else None."""
    if limit_bytes < UPLOAD_CHUNK_SIZE:
        raise ValueError(f"limit_bytes must be at least {UPLOAD_CHUNK_SIZE}, got {limit_bytes}")
    if not sizes or any(s <= 0 or s > limit_bytes for s in sizes):
        return None
    spans, offset = [], 0
    for size in sizes:
        spans.append((offset, size))
        offset += size
    return spans


def build_multi_manifest(paths, destination: str, limit_bytes: int, caption: str | None = None,
                         *, names=None, split_name: str | None = None, rng=secrets,
                         clock=time.time) -> Manifest:
    """Plan a transfer of several files as one content, reading them once (hashes
    of the content, files, parts and blocks: one pass over the concatenation,
    see :func:`_hash_spans`).

    Each file becomes one document under its original name (``names``, default
    the file names) when every file fits ``limit_bytes``; otherwise the whole
    concatenation is re-split byte-level into ``split_name.001``, ... (default
    ``split_name``: the first name). One source gives an ordinary version-1
    manifest. Raises :class:`SourceError` when a file is missing, empty, or
    changes while it is read.
    """
    paths = [Path(p) for p in paths]
    if not paths:
        raise SourceError("no source files")
    names = [p.name for p in paths] if names is None else [str(n) for n in names]
    if len(names) != len(paths):
        raise ValueError(f"{len(names)} names for {len(paths)} files")
    try:
        before = [p.stat() for p in paths]
    except OSError as exc:
        raise SourceError(f"cannot read source: {exc.strerror or exc}") from exc
    for p, st in zip(paths, before):
        if st.st_size == 0:
            raise SourceError(f"{p}: file is empty; Telegram refuses empty documents")
    sizes = [st.st_size for st in before]
    total = sum(sizes)
    spans = plan_sources(sizes, limit_bytes)
    whole_files = spans is not None
    if spans is None:
        spans = plan_split(total, limit_bytes)
    try:
        whole, hashed, source_hashes = _hash_spans(list(zip(paths, sizes)), spans)
        after = [p.stat() for p in paths]
    except OSError as exc:
        where = f"{exc.filename}: " if exc.filename else ""
        raise SourceError(f"{where}cannot read source: {exc.strerror or exc}") from exc
    for p, b, a in zip(paths, before, after):
        if (a.st_size, a.st_mtime_ns) != (b.st_size, b.st_mtime_ns):
            raise SourceError(f"{p}: file changed while it was read; try again when it is complete")

    transfer_id = str(uuid.UUID(int=_randbits(rng, 128), version=4))
    marker = f"{MARKER_PREFIX}{transfer_id}"
    count = len(hashed)
    base = split_name or names[0]
    parts = tuple(
        PartPlan(
            index=i, offset=offset, length=length, sha256=digest,
            file_name=names[i] if whole_files else part_file_name(base, i, count),
            file_id=random_int64(rng), random_id=random_int64(rng),
            caption=_caption(caption, part_marker(marker, i, count)),
            chunk_hashes=blocks,
        )
        for i, (offset, length, digest, blocks) in enumerate(hashed)
    )
    sources = tuple(SourceFile(str(p.resolve()), st.st_size, st.st_mtime_ns, digest)
                    for p, st, digest in zip(paths, before, source_hashes))
    return Manifest(
        version=MANIFEST_VERSION if len(sources) == 1 else MULTI_SOURCE_VERSION,
        transfer_id=transfer_id, sources=sources, total_size=total, sha256=whole,
        chunk_size=UPLOAD_CHUNK_SIZE, parts=parts, caption_marker=marker,
        destination=destination, created_at=float(clock()),
    )


class SourceReader:
    """``reader(offset, length) -> bytes`` across a manifest's sources laid end to end.

    Opens every file once (use as a context manager); a read is short only at
    the end of the content. ``read`` is the same as calling it.
    """

    def __init__(self, paths, sizes=None):
        self._fds: list[int] = []
        self._starts: list[int] = []
        self._sizes: list[int] = []
        total = 0
        try:
            for i, path in enumerate(paths):
                fd = os.open(path, os.O_RDONLY)
                self._fds.append(fd)
                size = os.fstat(fd).st_size if sizes is None else int(sizes[i])
                self._starts.append(total)
                self._sizes.append(size)
                total += size
        except OSError as exc:
            self.close()
            raise SourceError(f"cannot open source: {exc.strerror or exc}") from exc
        self.size = total

    def __call__(self, offset: int, length: int) -> bytes:
        out, end = [], min(self.size, offset + max(0, length))
        i = max(0, bisect.bisect_right(self._starts, offset) - 1)
        while offset < end and i < len(self._fds):
            local = offset - self._starts[i]
            want = min(end - offset, self._sizes[i] - local)
            if want <= 0:
                i += 1
                continue
            data = os.pread(self._fds[i], want, local)
            if not data:
                break  # the file shrank: a short read tells the caller
            out.append(data)
            offset += len(data)
            if len(data) == want:
                i += 1
        return b"".join(out)

    read = __call__

    def close(self) -> None:
        for fd in self._fds:
            try:
                os.close(fd)
            except OSError:  # pragma: no cover
                pass
        self._fds = []

    def __enter__(self) -> SourceReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_sources(paths, sizes=None) -> SourceReader:
    return SourceReader(paths, sizes)


def open_source(manifest: Manifest) -> SourceReader:
    """A reader over the manifest's sources (one or several), sizes checked first.

    Raises :class:`SourceError` when a source is missing or its size is not
    the planned one (a changed file must not be uploaded under the old plan).
    """
    for s in manifest.sources:
        try:
            size = os.stat(s.path).st_size
        except OSError as exc:
            raise SourceError(f"{s.path}: cannot read source: {exc.strerror or exc}") from exc
        if size != s.size:
            raise SourceError(f"{s.path}: size {size} differs from the planned {s.size}")
    return SourceReader([s.path for s in manifest.sources], [s.size for s in manifest.sources])
