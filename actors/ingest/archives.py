"""Archive names, multi-part sets and their completeness (pure: no I/O but what you pass).

API::

    FORMATS = ("zip", "rar", "7z")
    parse_archive_name(file_name) -> ArchiveName | None
        # None: not an archive name. Schemes (``ArchiveName.scheme``):
        #   "zip"        name.zip            single zip, or the *last* volume of a
        #                                    spanned set name.z01, name.z02, ... name.zip
        #   "zip"        name.zNN            spanned volume NN (1-based)
        #   "zip.nnn"    name.zip.001 ...    a zip cut into byte pieces
        #   "rar"        name.rar            single rar, or the *first* volume of an
        #                                    old-style set name.rar, name.r00, name.r01 ...
        #   "rar"        name.rNN            old-style volume: part NN + 2
        #   "rar.part"   name.partN.rar      RAR3+/RAR5 volume N (part1, part01, part001)
        #   "7z"         name.7z             single 7z
        #   "7z.nnn"     name.7z.001 ...     a 7z cut into byte pieces (7-Zip "-v")
    sniff_format(head: bytes) -> str | None         # "zip" / "rar" / "7z" from magic bytes
    zip_disk_count(tail: bytes) -> int | None        # disks per a .zip's end record
    rar_volume_flag(head: bytes) -> bool | None      # a .rar's main header: "volume"
    detect_archive(file_name, head=None) -> ArchiveName | None
        # by name; a name that is no archive name but whose head has archive
        # magic is a single archive of that format
    set_key(channel_id, topic_id, name: ArchiveName) -> str
        # "<channel>:<topic or 0>:<scheme family>:<base name, casefolded>"
        # (all volumes of one set, and only they, share the key)
    set_status(parts: Iterable[SetPart], *, settled=False) -> SetStatus
        # ordered parts, completeness, expected part count, missing numbers
    # SetStatus.ordered is the content order: the content of a set is its parts
    # concatenated in that order (storage.manifest.open_source reads across the
    # staged files for the upload; ConcatFile is a seekable file object over them)
    ConcatFile(paths)                                # io.RawIOBase, read-only, seekable

Completeness rule (names say where a set starts, rarely where it ends):

- ``zip`` spanned (``.z01``... + ``.zip``): complete when the ``.zip`` (always the
  last volume) is seen and the ``.zNN`` volumes are exactly 1..k; expected = k+1.
  A lone ``.zip`` is a single archive (complete).
- ``7z`` / lone ``.rar`` / lone ``.zip``: one part, complete.
- Byte-split and volume sets (``zip.nnn``, ``7z.nnn``, ``rar.part``, ``.rar`` +
  ``.rNN``): volumes are written at one fixed size, only the last is smaller.
  A part smaller than part 1 therefore marks the end: expected = its number.
  The set is complete when parts 1..n are all seen (no gap), every part but the
  last has the size of part 1, and the last is strictly smaller. When the last
  volume happens to be exactly full-size the names cannot tell: the caller
  passes ``settled=True`` (no new part for its settle time, or the scan of the
  channel has reached the present) and a gap-free run 1..n counts as complete.
- What names cannot tell, bytes can: a lone ``.rar`` may be the head of
  ``.rNN`` volumes, and ``.z01..zk + .zip`` looks whole when the last ``.zNN``
  is missing. A caller that has the first bytes of the ``.rar`` / the last
  64 KiB of the ``.zip`` passes ``SetPart(more_volumes=rar_volume_flag(head))``
  / ``SetPart(disks=zip_disk_count(tail))`` and the rule uses them; the index
  reports a spanned zip with missing volumes as corrupt in any case.
- Duplicated numbers (the same volume posted twice) keep the first and are
  listed in ``SetStatus.duplicates``; they never make a set complete.

A set that is not complete is "waiting" (the pipeline reports it as
``incomplete_set`` when it has waited too long).
"""
from __future__ import annotations

import io
import os
import re
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

FORMATS = ("zip", "rar", "7z")

# scheme -> (format, family used in the set key)
SCHEMES = {
    "zip": ("zip", "zip"),
    "zip.nnn": ("zip", "zip.nnn"),
    "rar": ("rar", "rar"),
    "rar.part": ("rar", "rar.part"),
    "7z": ("7z", "7z"),
    "7z.nnn": ("7z", "7z.nnn"),
}
BYTE_SPLIT_SCHEMES = ("zip.nnn", "7z.nnn", "rar.part", "rar")

_MAGIC = (
    (b"PK\x03\x04", "zip"),
    (b"PK\x05\x06", "zip"),   # empty zip (end of central directory only)
    (b"PK\x07\x08", "zip"),   # first volume of a spanned zip
    (b"Rar!\x1a\x07\x01\x00", "rar"),  # RAR5
    (b"Rar!\x1a\x07\x00", "rar"),      # RAR 1.5-4.x
    (b"7z\xbc\xaf\x27\x1c", "7z"),
)

_PATTERNS = (
    (re.compile(r"^(?P<base>.+)\.zip\.(?P<n>\d{3,})$", re.I), "zip.nnn"),
    (re.compile(r"^(?P<base>.+)\.7z\.(?P<n>\d{3,})$", re.I), "7z.nnn"),
    (re.compile(r"^(?P<base>.+)\.part(?P<n>\d{1,4})\.rar$", re.I), "rar.part"),
    (re.compile(r"^(?P<base>.+)\.z(?P<n>\d{2,})$", re.I), "zip"),
    (re.compile(r"^(?P<base>.+)\.r(?P<n>\d{2,})$", re.I), "rar"),
    (re.compile(r"^(?P<base>.+)\.zip$", re.I), "zip"),
    (re.compile(r"^(?P<base>.+)\.rar$", re.I), "rar"),
    (re.compile(r"^(?P<base>.+)\.7z$", re.I), "7z"),
)


@dataclass(frozen=True)
class ArchiveName:
    """What a file name says about an archive volume."""

    file_name: str
    format: str          # "zip" / "rar" / "7z"
    scheme: str          # see the module docstring
    base: str            # the name without volume/format suffixes
    number: int | None   # 1-based position in the set; None: the ``.zip`` tail of a
                         # spanned set (its number is "after the last .zNN")
    last: bool           # the name alone says this is the last (or only) volume

    @property
    def family(self) -> str:
        return SCHEMES[self.scheme][1]


@dataclass(frozen=True)
class SetPart:
    """One seen volume: its parsed name, size, and whatever the caller needs back."""

    name: ArchiveName
    size: int
    ref: Any = None  # e.g. (channel_id, message_id); returned untouched
    # What the volume's own bytes say, when the caller has read them (optional):
    # the .zip tail's end record counts the disks (zip_disk_count), the first
    # RAR volume's main header says whether more volumes follow (rar_volume_flag).
    disks: int | None = None
    more_volumes: bool | None = None


@dataclass(frozen=True)
class SetStatus:
    complete: bool
    expected_parts: int | None       # known count, else None
    ordered: tuple[SetPart, ...]     # seen parts in content order (duplicates left out)
    missing: tuple[int, ...]         # numbers known to be missing (gaps below the end)
    duplicates: tuple[SetPart, ...] = ()
    reason: str = ""                 # why it is not complete ("" when complete)
    numbers: tuple[int, ...] = field(default=())  # the number of each ordered part

    @property
    def seen_parts(self) -> int:
        return len(self.ordered)

    @property
    def total_size(self) -> int:
        return sum(p.size for p in self.ordered)


# --------------------------------------------------------------------------- names


def parse_archive_name(file_name: str) -> ArchiveName | None:
    name = os.path.basename(str(file_name or "")).strip()
    for pattern, scheme in _PATTERNS:
        m = pattern.match(name)
        if not m or not m.group("base").strip(" ."):
            continue
        fmt = SCHEMES[scheme][0]
        base = m.group("base")
        digits = m.groupdict().get("n")
        if digits is None:
            if scheme == "zip":     # name.zip: single, or the tail of a spanned set
                return ArchiveName(name, fmt, scheme, base, None, True)
            if scheme == "rar":     # name.rar: single, or the head of .rNN volumes
                return ArchiveName(name, fmt, scheme, base, 1, False)
            return ArchiveName(name, fmt, scheme, base, 1, True)  # name.7z
        n = int(digits)
        if scheme == "rar":         # .r00 is the second volume
            return ArchiveName(name, fmt, scheme, base, n + 2, False)
        if n < 1:                   # .z00 / .zip.000 / .part0.rar do not exist
            return None
        return ArchiveName(name, fmt, scheme, base, n, False)
    return None


def sniff_format(head: bytes) -> str | None:
    head = bytes(head or b"")
    for magic, fmt in _MAGIC:
        if head.startswith(magic):
            return fmt
    return None


def detect_archive(file_name: str, head: bytes | None = None) -> ArchiveName | None:
    parsed = parse_archive_name(file_name)
    if parsed is not None or head is None:
        return parsed
    fmt = sniff_format(head)
    if fmt is None:
        return None
    name = os.path.basename(str(file_name or "")) or "archive"
    base = name.rsplit(".", 1)[0] if "." in name.strip(".") else name
    scheme = {"zip": "zip", "rar": "rar", "7z": "7z"}[fmt]
    number = None if fmt == "zip" else 1
    return ArchiveName(name, fmt, scheme, base, number, fmt != "rar")


def set_key(channel_id: int, topic_id: int | None, name: ArchiveName) -> str:
    return f"{int(channel_id)}:{int(topic_id or 0)}:{name.family}:{name.base.casefold()}"


# --------------------------------------------------------------------------- sets


def set_status(parts: Iterable[SetPart], *, settled: bool = False) -> SetStatus:
    """Order the seen volumes of one set and decide whether it is complete."""
    parts = list(parts)
    if not parts:
        return SetStatus(False, None, (), (), (), "no parts")
    schemes = {p.name.scheme for p in parts}
    if len(schemes) != 1:
        raise ValueError(f"parts of different schemes in one set: {sorted(schemes)}")
    scheme = schemes.pop()
    if scheme == "zip":
        return _spanned_zip(parts)
    if scheme == "7z":
        kept, dups = _dedupe(parts, key=lambda p: 1)
        return SetStatus(True, 1, tuple(kept), (), tuple(dups), "", (1,))
    return _byte_split(parts, settled=settled)


def _dedupe(parts: Sequence[SetPart], key) -> tuple[list[SetPart], list[SetPart]]:
    seen, kept, dups = set(), [], []
    for p in parts:
        k = key(p)
        if k in seen:
            dups.append(p)
        else:
            seen.add(k)
            kept.append(p)
    return kept, dups


def _spanned_zip(parts: list[SetPart]) -> SetStatus:
    kept, dups = _dedupe(parts, key=lambda p: p.name.number)  # None = the tail
    tail = [p for p in kept if p.name.number is None]
    volumes = sorted((p for p in kept if p.name.number is not None), key=lambda p: p.name.number)
    numbers = [p.name.number for p in volumes]
    top = max(numbers, default=0)
    missing = tuple(sorted(set(range(1, top + 1)) - set(numbers)))
    ordered = tuple(volumes + tail)
    nums = tuple(numbers + ([top + 1] if tail else []))
    if not tail:
        return SetStatus(False, None, ordered, missing, tuple(dups),
                         f"waiting for the final .zip after {len(volumes)} volume(s)", nums)
    expected = top + 1
    declared = tail[0].disks
    if declared is not None and declared > expected:  # the tail counts more disks
        expected = declared
        missing = tuple(sorted(set(range(1, declared)) - set(numbers)))
    if missing:
        return SetStatus(False, expected, ordered, missing, tuple(dups),
                         f"missing volume(s) {_numbers_text(missing)}", nums)
    return SetStatus(True, expected, ordered, (), tuple(dups), "", nums)


def _byte_split(parts: list[SetPart], *, settled: bool) -> SetStatus:
    kept, dups = _dedupe(parts, key=lambda p: p.name.number)
    kept.sort(key=lambda p: p.name.number)
    numbers = [p.name.number for p in kept]
    by_number = {p.name.number: p for p in kept}
    first = by_number.get(1)
    expected = None
    if first is not None:
        smaller = [p.name.number for p in kept if p.size < first.size]
        if len(smaller) == 1 and smaller[0] == max(numbers):
            expected = smaller[0]  # the one short volume is the last
    lone_rar = kept[0].name.scheme == "rar" and numbers == [1]
    if lone_rar and kept[0].more_volumes:
        return SetStatus(False, None, tuple(kept), (), tuple(dups),
                         "the .rar says more volumes follow (.r00...)", tuple(numbers))
    if lone_rar:
        expected = 1  # a .rar without .rNN volumes is a single archive
    top = expected or max(numbers)
    missing = tuple(sorted(set(range(1, top + 1)) - set(numbers)))
    nums = tuple(numbers)
    if missing:
        return SetStatus(False, expected, tuple(kept), missing, tuple(dups),
                         f"missing part(s) {_numbers_text(missing)}", nums)
    full_size = all(p.size == first.size for p in kept[:-1])
    if expected is not None and full_size:
        return SetStatus(True, expected, tuple(kept), (), tuple(dups), "", nums)
    if settled:
        return SetStatus(True, len(kept), tuple(kept), (), tuple(dups), "", nums)
    if not full_size:
        why = "volume sizes are irregular; waiting until the set has settled"
    else:
        why = f"{len(kept)} full-size part(s), the last one not seen yet"
    return SetStatus(False, expected, tuple(kept), (), tuple(dups), why, nums)


def _numbers_text(numbers: Sequence[int]) -> str:
    shown = ", ".join(str(n) for n in numbers[:10])
    return shown + (f" and {len(numbers) - 10} more" if len(numbers) > 10 else "")


# --------------------------------------------------------------------------- volume headers


def zip_disk_count(tail: bytes) -> int | None:
    """Disks of a zip according to its end of central directory record, found in
    ``tail`` (the last up to 64 KiB + 22 bytes of the final volume); None if absent.

    1 for an ordinary (or byte-split) zip; k + 1 for a spanned set .z01...zk + .zip.
    """
    tail = bytes(tail)
    at = tail.rfind(b"PK\x05\x06")
    if at < 0 or len(tail) - at < 22:
        return None
    disk = int.from_bytes(tail[at + 4:at + 6], "little")
    if disk == 0xFFFF:  # zip64: the real number is in the zip64 locator before it
        loc = tail.rfind(b"PK\x06\x07", 0, at)
        if loc < 0 or at - loc < 20:
            return None
        return int.from_bytes(tail[loc + 16:loc + 20], "little")
    return disk + 1


def _vint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while pos < len(data):
        byte = data[pos]
        value |= (byte & 0x7F) << shift
        pos += 1
        if not byte & 0x80:
            return value, pos
        shift += 7
    raise ValueError("truncated vint")


def rar_volume_flag(head: bytes) -> bool | None:
    """Whether a RAR file's main header says it is a volume of a multi-volume set.

    ``head``: the first few hundred bytes. None when it cannot tell (not RAR,
    too short, or RAR5 with encrypted headers).
    """
    head = bytes(head)
    try:
        if head.startswith(b"Rar!\x1a\x07\x01\x00"):  # RAR5: crc32, size, type, flags ...
            pos = 8 + 4
            _, pos = _vint(head, pos)           # header size
            kind, pos = _vint(head, pos)
            if kind != 1:                       # 4 = encryption header: cannot tell
                return None
            flags, pos = _vint(head, pos)
            if flags & 0x0001:
                _, pos = _vint(head, pos)       # extra area size
            if flags & 0x0002:
                _, pos = _vint(head, pos)       # data size
            archive_flags, pos = _vint(head, pos)
            return bool(archive_flags & 0x0001)
        if head.startswith(b"Rar!\x1a\x07\x00"):      # RAR 1.5-4: crc16, type 0x73, flags
            if len(head) < 7 + 5 or head[9] != 0x73:
                return None
            return bool(int.from_bytes(head[10:12], "little") & 0x0001)
    except ValueError:
        return None
    return None


# --------------------------------------------------------------------------- content


class ConcatFile(io.RawIOBase):
    """A read-only, seekable file object over several files laid end to end.

    The logical content of a multi-part set (for zipfile and py7zr, which take
    a file object). Opens each file once; use as a context manager.
    """

    def __init__(self, paths: Iterable[str | os.PathLike]):
        super().__init__()
        self._fds: list[int] = []
        self._starts: list[int] = []
        self._sizes: list[int] = []
        total = 0
        try:
            for path in paths:
                fd = os.open(path, os.O_RDONLY)
                self._fds.append(fd)
                size = os.fstat(fd).st_size
                self._starts.append(total)
                self._sizes.append(size)
                total += size
        except BaseException:
            self.close()
            raise
        self._size = total
        self._pos = 0

    @property
    def size(self) -> int:
        return self._size

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if whence == io.SEEK_SET:
            pos = offset
        elif whence == io.SEEK_CUR:
            pos = self._pos + offset
        elif whence == io.SEEK_END:
            pos = self._size + offset
        else:
            raise ValueError(f"invalid whence {whence}")
        if pos < 0:
            raise ValueError("negative seek position")
        self._pos = pos
        return pos

    def pread(self, offset: int, length: int) -> bytes:
        """Up to ``length`` bytes at ``offset`` (short only at the end)."""
        out = []
        end = min(self._size, offset + max(0, length))
        i = 0
        while offset < end:
            while i + 1 < len(self._starts) and self._starts[i + 1] <= offset:
                i += 1
            local = offset - self._starts[i]
            want = min(end - offset, self._sizes[i] - local)
            if want <= 0:
                i += 1
                if i >= len(self._fds):
                    break
                continue
            data = os.pread(self._fds[i], want, local)
            if not data:
                break  # the file shrank under us
            out.append(data)
            offset += len(data)
        return b"".join(out)

    def readinto(self, buffer) -> int:
        data = self.pread(self._pos, len(buffer))
        n = len(data)
        buffer[:n] = data
        self._pos += n
        return n

    def read(self, size: int = -1) -> bytes:
        if size is None or size < 0:
            size = max(0, self._size - self._pos)
        data = self.pread(self._pos, size)
        self._pos += len(data)
        return data

    def close(self) -> None:
        for fd in self._fds:
            try:
                os.close(fd)
            except OSError:  # pragma: no cover - already closed
                pass
        self._fds = []
        super().close()
