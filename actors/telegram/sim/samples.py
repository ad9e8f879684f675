"""Deterministic sample archives for the simulated Telegram.

Every sample is generated from its name and size alone, so seeding the same
world twice (or two worlds on two machines) yields byte-identical documents.
Zip samples are real archives (``zipfile``, fixed timestamps); the split sets
``.zip.001/.zip.002`` are a real zip cut in two.  RAR and 7z samples only carry
the right magic bytes: nothing needs to open them yet.
"""
from __future__ import annotations

import hashlib
import io
import random
import zipfile
from dataclasses import dataclass

KIB = 1024

RAR5_MAGIC = b"Rar!\x1a\x07\x01\x00"
SEVENZIP_MAGIC = b"7z\xbc\xaf\x27\x1c\x00\x04"
ZIP_SPAN_MAGIC = b"PK\x07\x08"
_FIXED_DATE = (2024, 1, 2, 3, 4, 6)


@dataclass(frozen=True)
class Sample:
    """One document to post: its file name, bytes and caption."""

    file_name: str
    data: bytes
    caption: str = ""

    @property
    def size(self) -> int:
        return len(self.data)


def pseudo_random_bytes(label: str, size: int) -> bytes:
    """``size`` incompressible bytes that depend only on ``label``."""
    seed = int.from_bytes(hashlib.sha256(label.encode()).digest()[:8], "big")
    return random.Random(seed).randbytes(max(0, size))


def scaled(size: int, scale: float) -> int:
    """``size`` times ``scale``, at least 1 KiB, so tiny scales still make files."""
    return max(KIB, int(size * scale))


def make_zip(label: str, members: dict[str, int]) -> bytes:
    """A valid zip holding ``members`` (name -> size) of deterministic content."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as zf:
        for name, size in members.items():
            info = zipfile.ZipInfo(name, date_time=_FIXED_DATE)
            info.external_attr = 0o644 << 16
            zf.writestr(info, pseudo_random_bytes(f"{label}/{name}", size))
    return buf.getvalue()


def split_bytes(data: bytes, parts: int) -> list[bytes]:
    """Cut ``data`` into ``parts`` pieces, all equal but the last (like ``split -n``)."""
    step = -(-len(data) // parts)
    return [data[i * step:(i + 1) * step] for i in range(parts)]


def _with_magic(magic: bytes, label: str, size: int) -> bytes:
    return magic + pseudo_random_bytes(label, max(0, size - len(magic)))


def single_zip(name: str, size: int, scale: float, caption: str = "") -> Sample:
    """A real zip of roughly ``size`` bytes (times ``scale``) in one file."""
    total = scaled(size, scale)
    members = {f"{name}/part-{i}.bin": total // 3 for i in range(3)}
    return Sample(f"{name}.zip", make_zip(name, members), caption)


def split_zip(name: str, size: int, scale: float, caption: str = "") -> list[Sample]:
    """``name.zip.001``, ``name.zip.002``: a real zip cut in two."""
    total = scaled(size, scale)
    whole = make_zip(name, {f"{name}/data.bin": total})
    return [Sample(f"{name}.zip.{i + 1:03d}", piece, caption if i == 0 else "")
            for i, piece in enumerate(split_bytes(whole, 2))]


def spanned_zip(name: str, size: int, scale: float, caption: str = "") -> list[Sample]:
    """``name.z01`` + ``name.zip`` (the last volume carries the plain ``.zip`` name)."""
    part = scaled(size, scale) // 2
    return [
        Sample(f"{name}.z01", _with_magic(ZIP_SPAN_MAGIC, f"{name}.z01", part), caption),
        Sample(f"{name}.zip", _with_magic(b"PK\x03\x04", f"{name}.zip", part // 2 + 333)),
    ]


def rar_parts(name: str, size: int, scale: float, caption: str = "") -> list[Sample]:
    """``name.part1.rar``, ``name.part2.rar`` (RAR5 naming)."""
    part = scaled(size, scale) // 2
    return [
        Sample(f"{name}.part1.rar", _with_magic(RAR5_MAGIC, f"{name}.part1", part), caption),
        Sample(f"{name}.part2.rar", _with_magic(RAR5_MAGIC, f"{name}.part2", part // 3 + 77)),
    ]


def rar_old_style(name: str, size: int, scale: float, caption: str = "") -> list[Sample]:
    """``name.r00`` + ``name.rar`` (old RAR volume naming)."""
    part = scaled(size, scale) // 2
    return [
        Sample(f"{name}.r00", _with_magic(RAR5_MAGIC, f"{name}.r00", part), caption),
        Sample(f"{name}.rar", _with_magic(RAR5_MAGIC, f"{name}.rar", part // 2 + 5)),
    ]


def sevenzip_parts(name: str, size: int, scale: float, caption: str = "") -> list[Sample]:
    """``name.7z.001``, ``name.7z.002``: a 7z byte stream cut in two."""
    whole = _with_magic(SEVENZIP_MAGIC, f"{name}.7z", scaled(size, scale))
    return [Sample(f"{name}.7z.{i + 1:03d}", piece, caption if i == 0 else "")
            for i, piece in enumerate(split_bytes(whole, 2))]


def source_a_samples(scale: float = 1.0) -> list[Sample]:
    """Archives of "Sim Source A": one of each naming scheme."""
    samples = [single_zip("holiday-photos", 600 * KIB, scale, "Holiday photos 2023")]
    samples += split_zip("project-backup", 700 * KIB, scale, "Project backup, 2 parts")
    samples += spanned_zip("music-collection", 400 * KIB, scale, "Music (spanned zip)")
    samples += rar_parts("documents", 500 * KIB, scale, "Documents, RAR5 volumes")
    samples += rar_old_style("old-scans", 300 * KIB, scale, "Old scans, .r00 volumes")
    samples += sevenzip_parts("dataset", 512 * KIB, scale, "Dataset, 7z volumes")
    return samples


def shared_sample(scale: float = 1.0) -> Sample:
    """The archive that appears in both source channels (forwarded from A to B)."""
    return single_zip("shared-ebooks", 256 * KIB, scale, "Ebooks (also in Source B)")


def source_b_texts() -> list[str]:
    return [
        "Welcome to Sim Source B. Archives are posted every week.",
        "Reminder: multi-part sets are posted in order.",
    ]


def source_b_samples(scale: float = 1.0) -> list[Sample]:
    """Archives of "Sim Source B" besides the shared one."""
    return [single_zip("wallpapers", 200 * KIB, scale, "Wallpapers pack")]


def forum_topics(scale: float = 1.0) -> dict[str, list[Sample]]:
    """Topic title -> archives posted in that topic of "Sim Forum"."""
    return {
        "Games": [single_zip("retro-games", 300 * KIB, scale, "Retro games")]
        + sevenzip_parts("game-mods", 256 * KIB, scale, "Mods, 7z volumes"),
        "Software": split_zip("toolkit", 300 * KIB, scale, "Toolkit installer")
        + rar_parts("drivers", 200 * KIB, scale, "Drivers, RAR5 volumes"),
    }
