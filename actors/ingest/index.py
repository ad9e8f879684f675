"""List what an archive holds (phase 2 of an ingest): zip, 7z and rar, single or multi-volume.

API::

    INDEX_STATES = ("ok", "encrypted", "corrupt", "unreadable")
    index_archive(paths, *, names=None, fmt=None, max_entries=100_000,
                  preview_max_bytes=1 MiB) -> IndexResult
        paths: the staged volume files in content order (archives.set_status
        .ordered); names: their original file names (default: the basenames),
        needed for RAR volume sets, whose reader finds the next volume by name;
        fmt: "zip" / "rar" / "7z" (default: the first file's magic, then its name).
        Never raises for a bad archive: every failure is a result with a reason.

    IndexResult(state, reason, format, entries, preview, preview_name, truncated)
    IndexEntry(path, size, crc, is_dir)      # crc: CRC-32 where the format has one

States:

- ``ok``: the listing is complete (``truncated`` when over ``max_entries``).
- ``encrypted``: a password is needed. With plain headers the entries are
  listed anyway (names, sizes, CRCs are readable); with encrypted headers
  (7z ``-mhe``, rar ``-hp``) there are no entries.
- ``corrupt``: the format is recognised but its structure is broken
  (truncated, bad central directory, a missing or wrong volume).
- ``unreadable``: not an archive we can read (unknown format, I/O error, a
  reader failure we did not expect -- the reason names the exception).

Readers: ``zipfile`` (stdlib) over the concatenated volumes (``.zip.001`` byte
splits, and ``.z01``+``.zip`` spanned sets, whose entries are relative to their
volume: handled for the preview); ``py7zr`` over the concatenated volumes;
``rarfile`` on the volume files (it lists headers without the unrar tool, and
reads stored members for a preview). Only headers are read: the content is not
decompressed or CRC-checked, so a damaged member body is not detected here.

Preview: the first image member (by name: .jpg .jpeg .png .gif .webp) of at
most ``preview_max_bytes``, read only when the reader can without an external
tool and the bytes carry an image magic; otherwise none.
"""
from __future__ import annotations

import lzma
import os
import struct
import tempfile
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from actors.ingest.archives import ConcatFile, parse_archive_name, sniff_format

INDEX_STATES = ("ok", "encrypted", "corrupt", "unreadable")
PREVIEW_MAX_BYTES = 1024 * 1024
MAX_ENTRIES = 100_000
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".gif", ".webp")
# What a damaged archive makes the readers raise (beyond their own error types).
_DAMAGE = (EOFError, ValueError, KeyError, IndexError, TypeError, lzma.LZMAError, zlib.error,
           struct.error, UnicodeDecodeError)
_IMAGE_MAGIC = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF87a", b"GIF89a", b"RIFF")


@dataclass(frozen=True)
class IndexEntry:
    path: str
    size: int
    crc: int | None
    is_dir: bool


@dataclass(frozen=True)
class IndexResult:
    state: str
    reason: str | None
    format: str | None
    entries: tuple[IndexEntry, ...] = ()
    preview: bytes | None = None
    preview_name: str | None = None
    truncated: bool = False

    @property
    def ok(self) -> bool:
        return self.state == "ok"


def _fail(state: str, fmt: str | None, reason: str) -> IndexResult:
    return IndexResult(state, reason, fmt)


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_SUFFIXES)


def _looks_like_image(data: bytes | None) -> bool:
    if not data:
        return False
    if data.startswith(b"RIFF"):
        return data[8:12] == b"WEBP"
    return data.startswith(_IMAGE_MAGIC)


def _describe(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}"[:300] if text else type(exc).__name__


def guess_format(paths: Sequence[str | os.PathLike], names: Sequence[str]) -> str | None:
    """The first volume's magic, else what its name says."""
    try:
        with open(paths[0], "rb") as fh:
            fmt = sniff_format(fh.read(16))
    except OSError:
        fmt = None
    if fmt is not None:
        return fmt
    parsed = parse_archive_name(names[0])
    return parsed.format if parsed is not None else None


def index_archive(
    paths: Iterable[str | os.PathLike], *, names: Sequence[str] | None = None,
    fmt: str | None = None, max_entries: int = MAX_ENTRIES,
    preview_max_bytes: int = PREVIEW_MAX_BYTES,
) -> IndexResult:
    """List the archive made of ``paths`` (its volumes, in order). Never raises for bad input."""
    paths = [Path(p) for p in paths]
    if not paths:
        return _fail("unreadable", fmt, "no files")
    names = list(names) if names is not None else [p.name for p in paths]
    if len(names) != len(paths):
        raise ValueError(f"{len(names)} names for {len(paths)} files")
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        return _fail("unreadable", fmt, f"missing file(s): {', '.join(missing[:3])}")
    fmt = fmt or guess_format(paths, names)
    reader = {"zip": _index_zip, "7z": _index_7z, "rar": _index_rar}.get(fmt or "")
    if reader is None:
        return _fail("unreadable", fmt, "not a zip, rar or 7z archive")
    try:
        return reader(paths, names, max_entries, preview_max_bytes)
    except MemoryError:
        raise
    except OSError as exc:
        return _fail("unreadable", fmt, f"cannot read: {_describe(exc)}")
    except Exception as exc:  # a reader bug or an input it did not expect
        return _fail("unreadable", fmt, f"reader failed: {_describe(exc)}")


# --------------------------------------------------------------------------- zip


def _index_zip(paths, names, max_entries, preview_max) -> IndexResult:
    with ConcatFile(paths) as fh:
        try:
            zf = zipfile.ZipFile(fh)
        except zipfile.BadZipFile as exc:
            return _fail("corrupt", "zip", f"bad zip: {exc}")
        except (NotImplementedError, *_DAMAGE) as exc:
            return _fail("corrupt", "zip", _describe(exc))
        with zf:
            infos = zf.infolist()
            truncated = len(infos) > max_entries
            entries = tuple(IndexEntry(i.filename, i.file_size, i.CRC, i.is_dir())
                            for i in infos[:max_entries])
            encrypted = any(i.flag_bits & 0x1 for i in infos)
            if encrypted:
                return IndexResult("encrypted", "members are encrypted (password needed)", "zip",
                                   entries, truncated=truncated)
            disks = _zip_disk_count(fh)
            if disks != len(paths) and disks > 1:
                return IndexResult("corrupt", f"spanned zip of {disks} volumes, {len(paths)} "
                                   "given", "zip", entries, truncated=truncated)
            if disks > 1:
                _rebase_spanned(zf, fh, paths)
            preview, preview_name = _zip_preview(zf, infos, preview_max)
            return IndexResult("ok", None, "zip", entries, preview, preview_name, truncated)


def _zip_disk_count(fh: ConcatFile) -> int:
    """How many disks (spanned volumes) the end record says the zip has (1: not spanned).

    A byte split (.zip.001...) is one logical disk cut anywhere: 1.
    """
    endrec = zipfile._EndRecData(fh)  # noqa: SLF001 - the stdlib keeps no public accessor
    return 1 if endrec is None else int(endrec[zipfile._ECD_DISK_NUMBER]) + 1  # noqa: SLF001


def _rebase_spanned(zf: zipfile.ZipFile, fh: ConcatFile, paths) -> None:
    """Spanned volumes (.z01...zip): member offsets are relative to their volume."""
    endrec = zipfile._EndRecData(fh)  # noqa: SLF001
    if endrec is None:
        return
    concat = zf.start_dir - endrec[zipfile._ECD_OFFSET]  # noqa: SLF001
    starts, total = [], 0
    for p in paths:
        starts.append(total)
        total += p.stat().st_size
    for info in zf.infolist():
        if 0 <= info.volume < len(starts):
            info.header_offset = starts[info.volume] + (info.header_offset - concat)


def _zip_preview(zf, infos, preview_max):
    for info in infos:
        if info.is_dir() or not _is_image(info.filename) or not 0 < info.file_size <= preview_max:
            continue
        try:
            data = zf.read(info)
        except Exception:  # a damaged member: no preview, the listing stands
            return None, None
        if _looks_like_image(data):
            return data, info.filename
        return None, None
    return None, None


# --------------------------------------------------------------------------- 7z


def _index_7z(paths, names, max_entries, preview_max) -> IndexResult:
    import py7zr
    from py7zr import exceptions as e7

    with ConcatFile(paths) as fh:
        try:
            archive = py7zr.SevenZipFile(fh, mode="r")
        except e7.PasswordRequired:
            return _fail("encrypted", "7z", "headers are encrypted (password needed to list)")
        except (e7.Bad7zFile, e7.UnsupportedCompressionMethodError, e7.InternalError,
                *_DAMAGE) as exc:
            return _fail("corrupt", "7z", f"bad 7z: {_describe(exc)}")
        with archive:
            infos = archive.list()
            truncated = len(infos) > max_entries
            entries = tuple(
                IndexEntry(i.filename, int(i.uncompressed or 0), i.crc32, bool(i.is_directory))
                for i in infos[:max_entries])
            if archive.needs_password():
                return IndexResult("encrypted", "members are encrypted (password needed)", "7z",
                                   entries, truncated=truncated)
            preview, preview_name = _7z_preview(archive, infos, preview_max)
            return IndexResult("ok", None, "7z", entries, preview, preview_name, truncated)


def _7z_preview(archive, infos, preview_max):
    from py7zr.io import BytesIOFactory

    for info in infos:
        if info.is_directory or not _is_image(info.filename):
            continue
        if not 0 < (info.uncompressed or 0) <= preview_max:
            return None, None
        try:
            archive.reset()
            factory = BytesIOFactory(preview_max)
            archive.extract(targets=[info.filename], factory=factory)
            data = factory.get(info.filename).read()
        except Exception:
            return None, None
        if _looks_like_image(data):
            return data, info.filename
        return None, None
    return None, None


# --------------------------------------------------------------------------- rar


def _index_rar(paths, names, max_entries, preview_max) -> IndexResult:
    import rarfile

    with tempfile.TemporaryDirectory(prefix="stashd-rar-") as tmp:
        first = _rar_volumes(paths, names, Path(tmp))
        try:
            rf = rarfile.RarFile(str(first), errors="strict")  # a missing volume raises
        except rarfile.NeedFirstVolume as exc:
            return _fail("corrupt", "rar", f"not the first volume: {_describe(exc)}")
        except rarfile.PasswordRequired:
            return _fail("encrypted", "rar", "headers are encrypted (password needed to list)")
        except (rarfile.BadRarFile, rarfile.NotRarFile, rarfile.Error) as exc:
            reason = _describe(exc).replace(f"{tmp}{os.sep}", "")  # no temp paths in reasons
            return _fail("corrupt", "rar", f"bad rar: {reason}")
        with rf:
            infos = rf.infolist()
            truncated = len(infos) > max_entries
            entries = tuple(IndexEntry(i.filename, int(i.file_size or 0), i.CRC, i.is_dir())
                            for i in infos[:max_entries])
            if rf.needs_password():
                if not infos:
                    return _fail("encrypted", "rar",
                                 "headers are encrypted (password needed to list)")
                return IndexResult("encrypted", "members are encrypted (password needed)", "rar",
                                   entries, truncated=truncated)
            used = rf.volumelist()
            if len(paths) > 1 and len(used) < len(paths):
                return IndexResult("corrupt", f"the listing used {len(used)} of {len(paths)} "
                                   "volumes", "rar", entries, truncated=truncated)
            preview, preview_name = _rar_preview(rf, infos, preview_max)
            return IndexResult("ok", None, "rar", entries, preview, preview_name, truncated)


def _rar_volumes(paths: list[Path], names: list[str], tmp: Path) -> Path:
    """The first volume, under a name from which rarfile finds the next ones.

    Symlinks with the original names go in ``tmp``, so rarfile sees exactly
    the volumes given (never a stray sibling beside a staged file).
    """
    for path, name in zip(paths, names):
        os.symlink(os.path.abspath(path), tmp / os.path.basename(name))
    return tmp / os.path.basename(names[0])


def _rar_preview(rf, infos, preview_max):
    for info in infos:
        if info.is_dir() or not _is_image(info.filename):
            continue
        if not 0 < (info.file_size or 0) <= preview_max:
            return None, None
        try:
            data = rf.read(info)  # stored members need no tool; others may fail
        except Exception:
            return None, None
        if _looks_like_image(data):
            return data, info.filename
        return None, None
    return None, None
