"""Deterministic sample archives for the simulated Telegram.

Every sample is generated from its name and size alone (fixed timestamps, a
seeded PRNG), so seeding the same world twice, or two worlds on two machines,
yields byte-identical documents. All archives are real:

- zip: ``zipfile``; ``.zip.001/.002`` is a real zip cut in two (byte split,
  fixed-size volumes and a smaller last one, as archivers cut: ``volume_split``);
- ``.z01`` + ``.zip``: a real spanned zip as ``zip -s`` writes it (spanning
  signature, per-disk offsets in the central directory), built by ``_ZipWriter``
  because ``zipfile`` cannot write one; ``zip -s 0`` joins it back;
- encrypted zip: traditional PKWARE encryption (ZipCrypto), also written by
  ``_ZipWriter``; ``zipfile`` reads it with the password ``PASSWORD``;
- 7z: ``py7zr`` (stored, fixed mtimes); ``.7z.001/.002`` is a 7z cut in two, as
  7-Zip writes volumes;
- RAR: there is no RAR writer in Python, so ``.partN.rar``, ``.rar`` + ``.rNN``
  and an encrypted-headers RAR are the rarfile project's test volumes from
  ``fixtures/`` (ISC licence, see fixtures/README.md). They do not scale.

``channel_posts(scale)`` is what the seeder posts where (documents, texts,
messages deleted afterwards to leave holes, forwards that share a document id,
photos, two of them in an archive's album); ``expected_sets(scale)`` says for each archive set what a correct
ingest does with it (ingest, or skip and why), with the sha256 of the set (its
parts concatenated in order), so tests can count it in the destination.
``bench_sets`` makes the benchmark's channel of many archives.
"""
from __future__ import annotations

import functools
import hashlib
import io
import os
import random
import struct
import tempfile
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

KIB = 1024
MIB = 1024 * KIB

FIXTURES = Path(__file__).resolve().parent / "fixtures"
PASSWORD = b"stashd"
RAR_HEADERS_PASSWORD = "password"
_FIXED_DATE = (2024, 1, 2, 3, 4, 6)
_FIXED_TS = 1704164646  # 2024-01-02 03:04:06 UTC

SOURCE_A = "sim_source_a"
SOURCE_B = "sim_source_b"
FORUM = "sim_forum"


@dataclass(frozen=True)
class Sample:
    """One document to post: its file name, bytes and caption."""

    file_name: str
    data: bytes
    caption: str = ""
    mime_type: str | None = None

    @property
    def size(self) -> int:
        return len(self.data)

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()


@dataclass(frozen=True)
class Post:
    """One message the seeder posts into a channel (and topic, by title).

    kind: ``document`` (``sample``), ``text``, ``deleted`` (a text posted then
    deleted, leaving a hole in the history), ``forward`` (the document posted
    as ``forward_of.file_name`` in channel ``forward_of.channel``, re-posted
    with the *same* document id, as a forward is), ``photo`` (a photo message,
    MessageMediaPhoto, with the sample's bytes and caption; its file name only
    labels it in ``inspect()``). Posts with the same ``album`` in one channel
    share a ``grouped_id`` (``album_grouped_id``): they were sent together.
    """

    kind: str
    sample: Sample | None = None
    text: str = ""
    topic: str | None = None
    forward_of: str | None = None  # channel username the forwarded document was posted in
    album: str | None = None

    @property
    def file_name(self) -> str | None:
        return self.sample.file_name if self.sample else None


@dataclass(frozen=True)
class ArchiveSet:
    """One archive (all its parts) as posted in one channel, and what ingest should do.

    expect: ``ingest`` (uploaded once; ``reason`` says ``encrypted`` or
    ``corrupt`` when it is delivered without a listing) or ``skip`` with
    ``reason`` ``incomplete_set`` / ``duplicate`` (the skip reasons of
    storage/ingest.py). A duplicate is another post of a set that is ingested
    once: the same document id for a forward, the same sha256 for a re-upload.
    Which of the posts is the one ingested depends on which account gets there
    first (an account reading Source B may ingest the forward and skip the
    original): count by ``sha256``, not by channel.
    """

    name: str
    scheme: str
    channel: str
    topic: str | None
    parts: tuple[Sample, ...]
    expect: str = "ingest"
    reason: str = ""
    members: tuple[str, ...] = ()
    has_preview: bool = False          # the archive holds an image: the index's preview
    album_photo: Sample | None = None  # a photo message posted before it in the same album

    @property
    def file_names(self) -> tuple[str, ...]:
        return tuple(p.file_name for p in self.parts)

    @property
    def size(self) -> int:
        return sum(p.size for p in self.parts)

    @property
    def sha256(self) -> str:
        digest = hashlib.sha256()
        for part in self.parts:
            digest.update(part.data)
        return digest.hexdigest()


def album_grouped_id(channel: str, album: str) -> int:
    """The grouped_id of the album ``album`` in ``channel``: stable, positive, 63 bits."""
    return int.from_bytes(hashlib.sha256(f"{channel}/{album}".encode()).digest()[:8], "big") >> 1


# -- bytes -----------------------------------------------------------------------------------

def pseudo_random_bytes(label: str, size: int) -> bytes:
    """``size`` incompressible bytes that depend only on ``label``."""
    seed = int.from_bytes(hashlib.sha256(label.encode()).digest()[:8], "big")
    return random.Random(seed).randbytes(max(0, size))


def scaled(size: int, scale: float) -> int:
    """``size`` times ``scale``, at least 1 KiB, so tiny scales still make files."""
    return max(KIB, int(size * scale))


def split_bytes(data: bytes, parts: int) -> list[bytes]:
    """Cut ``data`` into ``parts`` pieces, all equal but the last (like ``split -n``)."""
    step = -(-len(data) // parts)
    return [data[i * step:(i + 1) * step] for i in range(parts)]


def volume_split(data: bytes, parts: int) -> list[bytes]:
    """Cut ``data`` into ``parts`` volumes the way archivers do (``7z -v``, ``zip``
    byte splits, ``split -b``): every volume but the last has one fixed, rounded
    size and the last is strictly smaller, so the names plus the sizes tell where
    a set ends."""
    if parts <= 1:
        return [data]
    step = -(-(len(data) // parts + 1) // KIB) * KIB
    if (parts - 1) * step >= len(data):  # too small to round: no rounding
        step = len(data) // parts + 1
    pieces = [data[i * step:(i + 1) * step] for i in range(parts - 1)]
    return pieces + [data[(parts - 1) * step:]]


def png_image(label: str, width: int = 48, height: int = 32) -> bytes:
    """A small valid RGB PNG (a gradient tinted by ``label``)."""
    tint = hashlib.sha256(label.encode()).digest()
    rows = b"".join(
        b"\x00" + bytes(v for x in range(width)
                        for v in ((x * 5 + tint[0]) & 255, (y * 7 + tint[1]) & 255, tint[2]))
        for y in range(height))

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(rows, 9))
            + chunk(b"IEND", b""))


# -- zip -------------------------------------------------------------------------------------

def make_zip(label: str, members: dict[str, int], extra: dict[str, bytes] | None = None) -> bytes:
    """A valid zip holding ``members`` (name -> size) of deterministic content,
    plus ``extra`` (name -> bytes) first (e.g. a cover image)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as zf:
        for name, data in (extra or {}).items():
            zf.writestr(_zipinfo(name), data)
        for name, size in members.items():
            zf.writestr(_zipinfo(name), pseudo_random_bytes(f"{label}/{name}", size))
    return buf.getvalue()


def _zipinfo(name: str) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name, date_time=_FIXED_DATE)
    info.external_attr = 0o644 << 16
    return info


def _dos_time() -> tuple[int, int]:
    y, mo, d, h, mi, s = _FIXED_DATE
    return (h << 11) | (mi << 5) | (s // 2), ((y - 1980) << 9) | (mo << 5) | d


class _ZipCrypto:
    """Traditional PKWARE encryption (APPNOTE 6.1), the inverse of zipfile's decrypter."""

    def __init__(self, password: bytes):
        self.keys = [0x12345678, 0x23456789, 0x34567890]
        for byte in password:
            self._update(byte)

    @staticmethod
    def _crc(crc: int, byte: int) -> int:
        return zlib.crc32(bytes([byte]), crc ^ 0xFFFFFFFF) ^ 0xFFFFFFFF

    def _update(self, byte: int) -> None:
        k0, k1, k2 = self.keys
        k0 = self._crc(k0, byte)
        k1 = ((k1 + (k0 & 0xFF)) * 134775813 + 1) & 0xFFFFFFFF
        k2 = self._crc(k2, k1 >> 24)
        self.keys = [k0, k1, k2]

    def encrypt(self, data: bytes) -> bytes:
        out = bytearray(len(data))
        for i, byte in enumerate(data):
            temp = (self.keys[2] | 2) & 0xFFFF
            out[i] = byte ^ (((temp * (temp ^ 1)) >> 8) & 0xFF)
            self._update(byte)
        return bytes(out)


class _ZipWriter:
    """A minimal stored-only zip writer for what zipfile cannot write: ZipCrypto
    members and spanned volumes (``.z01`` ... + ``.zip``)."""

    def __init__(self):
        self.volumes: list[bytearray] = [bytearray()]
        self.entries: list[tuple[str, int, int, int, int, int]] = []  # name, flags, crc, csize, usize, disk/offset

    def start_spanned(self) -> None:
        self.volumes[0] += b"PK\x07\x08"  # the spanning signature opens the first volume

    def next_volume(self) -> None:
        self.volumes.append(bytearray())

    def add(self, name: str, data: bytes, *, password: bytes | None = None, label: str = "") -> None:
        crc = zlib.crc32(data)
        flags = 0
        payload = data
        if password is not None:
            flags = 0x1
            header = pseudo_random_bytes(f"zipcrypto/{label}/{name}", 11) + bytes([crc >> 24])
            payload = _ZipCrypto(password).encrypt(header + data)
        vol = self.volumes[-1]
        disk, offset = len(self.volumes) - 1, len(vol)
        mtime, mdate = _dos_time()
        raw = name.encode()
        vol += struct.pack("<IHHHHHIIIHH", 0x04034B50, 20, flags, 0, mtime, mdate, crc,
                           len(payload), len(data), len(raw), 0) + raw + payload
        self.entries.append((name, flags, crc, len(payload), len(data), (disk << 32) | offset))

    def finish(self) -> list[bytes]:
        vol = self.volumes[-1]
        disk = len(self.volumes) - 1
        cd_offset = len(vol)
        mtime, mdate = _dos_time()
        for name, flags, crc, csize, usize, where in self.entries:
            raw = name.encode()
            vol += struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 20 | (3 << 8), 20, flags, 0,
                               mtime, mdate, crc, csize, usize, len(raw), 0, 0, where >> 32,
                               0, 0o644 << 16, where & 0xFFFFFFFF) + raw
        cd_size = len(vol) - cd_offset
        vol += struct.pack("<IHHHHIIH", 0x06054B50, disk, disk, len(self.entries),
                           len(self.entries), cd_size, cd_offset, 0)
        return [bytes(v) for v in self.volumes]


def encrypted_zip(label: str, members: dict[str, int]) -> bytes:
    """A zip whose members are ZipCrypto-encrypted with ``PASSWORD`` (names stay visible)."""
    writer = _ZipWriter()
    for name, size in members.items():
        writer.add(name, pseudo_random_bytes(f"{label}/{name}", size), password=PASSWORD, label=label)
    return writer.finish()[0]


def spanned_zip_volumes(label: str, members: dict[str, int]) -> list[bytes]:
    """A real spanned zip: each member in its own volume, the central directory in
    the last one (``.z01``, ``.z02``, ..., then ``.zip``), as ``zip -s`` makes it."""
    writer = _ZipWriter()
    writer.start_spanned()
    for i, (name, size) in enumerate(members.items()):
        if i:
            writer.next_volume()
        writer.add(name, pseudo_random_bytes(f"{label}/{name}", size))
    return writer.finish()


# -- 7z and RAR ------------------------------------------------------------------------------

def make_7z(label: str, members: dict[str, int], extra: dict[str, bytes] | None = None) -> bytes:
    """A real stored 7z archive (py7zr), deterministic: members written from files
    with a fixed mtime (py7zr's writestr stamps the current time)."""
    import py7zr

    with tempfile.TemporaryDirectory(prefix="stashd-7z-") as tmp:
        out = Path(tmp) / "out.7z"
        with py7zr.SevenZipFile(out, "w", filters=[{"id": py7zr.FILTER_COPY}]) as archive:
            items = list((extra or {}).items())
            items += [(name, pseudo_random_bytes(f"{label}/{name}", size)) for name, size in members.items()]
            for i, (name, data) in enumerate(items):
                path = Path(tmp) / f"m{i}"
                path.write_bytes(data)
                os.utime(path, (_FIXED_TS, _FIXED_TS))
                archive.write(path, name)
        return out.read_bytes()


@functools.lru_cache(maxsize=None)
def fixture(name: str) -> bytes:
    return (FIXTURES / name).read_bytes()


# -- sets, by naming scheme ------------------------------------------------------------------

def _members(name: str, total: int, count: int = 3) -> dict[str, int]:
    return {f"{name}/part-{i}.bin": total // count for i in range(count)}


def single_zip(name: str, size: int, scale: float, caption: str = "", *,
               cover: bool = False) -> list[Sample]:
    """``name.zip``: a real zip of roughly ``size`` bytes (times ``scale``); with
    ``cover`` a PNG ``name/cover.png`` comes first (an archive with a preview)."""
    extra = {f"{name}/cover.png": png_image(name)} if cover else None
    return [Sample(f"{name}.zip", make_zip(name, _members(name, scaled(size, scale)), extra), caption)]


def split_zip(name: str, size: int, scale: float, caption: str = "", parts: int = 2) -> list[Sample]:
    """``name.zip.001``, ``.002``, ...: a real zip cut into ``parts`` pieces."""
    whole = make_zip(name, {f"{name}/data.bin": scaled(size, scale)})
    return [Sample(f"{name}.zip.{i + 1:03d}", piece, caption if i == 0 else "")
            for i, piece in enumerate(volume_split(whole, parts))]


def spanned_zip(name: str, size: int, scale: float, caption: str = "") -> list[Sample]:
    """``name.z01`` + ``name.zip``: a real spanned zip (the last volume is the ``.zip``)."""
    total = scaled(size, scale)
    volumes = spanned_zip_volumes(name, {f"{name}/side-a.bin": total * 2 // 3,
                                         f"{name}/side-b.bin": total // 3})
    names = [f"{name}.z{i + 1:02d}" for i in range(len(volumes) - 1)] + [f"{name}.zip"]
    return [Sample(n, v, caption if i == 0 else "") for i, (n, v) in enumerate(zip(names, volumes))]


def rar_parts(name: str, caption: str = "") -> list[Sample]:
    """``name.part1.rar`` .. ``part3.rar``: a real RAR5 volume set (fixture, fixed size)."""
    return [Sample(f"{name}.part{i}.rar", fixture(f"rar5-vols.part{i}.rar"), caption if i == 1 else "")
            for i in (1, 2, 3)]


def rar_old_style(name: str, caption: str = "") -> list[Sample]:
    """``name.rar`` + ``name.r00``, ``name.r01``: a real RAR3 volume set, old naming (fixture)."""
    return [Sample(f"{name}.rar", fixture("rar3-old.rar"), caption),
            Sample(f"{name}.r00", fixture("rar3-old.r00")),
            Sample(f"{name}.r01", fixture("rar3-old.r01"))]


def single_7z(name: str, size: int, scale: float, caption: str = "") -> list[Sample]:
    """``name.7z``: a real 7z."""
    return [Sample(f"{name}.7z", make_7z(name, _members(name, scaled(size, scale), 2)), caption)]


def sevenzip_parts(name: str, size: int, scale: float, caption: str = "") -> list[Sample]:
    """``name.7z.001``, ``name.7z.002``: a real 7z cut in two (7-Zip volumes)."""
    whole = make_7z(name, {f"{name}/data.bin": scaled(size, scale)})
    return [Sample(f"{name}.7z.{i + 1:03d}", piece, caption if i == 0 else "")
            for i, piece in enumerate(volume_split(whole, 2))]


def corrupt_zip(name: str, size: int, scale: float, caption: str = "") -> list[Sample]:
    """``name.zip``: a zip whose end (central directory) was cut off: unreadable."""
    whole = make_zip(name, _members(name, scaled(size, scale), 2))
    return [Sample(f"{name}.zip", whole[: len(whole) - 200], caption)]


def locked_zip(name: str, size: int, scale: float, caption: str = "") -> list[Sample]:
    """``name.zip`` with ZipCrypto-encrypted members (password ``PASSWORD``)."""
    return [Sample(f"{name}.zip", encrypted_zip(name, _members(name, scaled(size, scale), 2)), caption)]


def locked_rar(name: str, caption: str = "") -> list[Sample]:
    """``name.rar``: RAR5 with encrypted headers (fixture): not even listable."""
    return [Sample(f"{name}.rar", fixture("rar5-hpsw.rar"), caption)]


# -- the seeded world ------------------------------------------------------------------------

@dataclass(frozen=True)
class _Catalogue:
    posts: dict[str, tuple[Post, ...]]
    sets: tuple[ArchiveSet, ...]


def _set(name: str, scheme: str, channel: str, parts: list[Sample], *, topic: str | None = None,
         expect: str = "ingest", reason: str = "", preview: bool = False,
         album_photo: Sample | None = None) -> ArchiveSet:
    return ArchiveSet(name, scheme, channel, topic, tuple(parts), expect, reason, has_preview=preview,
                      album_photo=album_photo)


def album_photo(name: str, caption: str, width: int = 320, height: int = 200) -> Sample:
    """The photo posted with an archive in one album (``name`` labels it)."""
    return Sample(f"{name}-photo.png", png_image(f"album/{name}", width, height), caption, "image/png")


@functools.lru_cache(maxsize=8)
def _catalogue(scale: float) -> _Catalogue:
    s = scale
    a_sets = [
        _set("holiday-photos", "zip", SOURCE_A,
             single_zip("holiday-photos", 600 * KIB, s, "Holiday photos 2023", cover=True), preview=True,
             album_photo=album_photo("holiday-photos", "Holiday photos: the beach")),
        _set("project-backup", "zip.001", SOURCE_A,
             split_zip("project-backup", 700 * KIB, s, "Project backup, 2 parts")),
        _set("music-collection", "z01", SOURCE_A,
             spanned_zip("music-collection", 400 * KIB, s, "Music (spanned zip)")),
        _set("documents", "partN.rar", SOURCE_A, rar_parts("documents", "Documents, RAR5 volumes")),
        _set("old-scans", "rNN", SOURCE_A, rar_old_style("old-scans", "Old scans, .r00 volumes")),
        _set("dataset", "7z.001", SOURCE_A, sevenzip_parts("dataset", 512 * KIB, s, "Dataset, 7z volumes")),
        _set("shared-ebooks", "zip", SOURCE_A,
             single_zip("shared-ebooks", 256 * KIB, s, "Ebooks (also in Source B)")),
    ]
    by_name = {x.name: x for x in a_sets}
    readme = Sample("README.txt", b"Sim Source A: one archive of every naming scheme.\n" * 8,
                    "Read me first", "text/plain")
    a_posts: list[Post] = [Post("text", text="Sim Source A: archives of every kind, posted weekly.")]
    a_posts += _documents(by_name["holiday-photos"])
    a_posts += _documents(by_name["project-backup"])
    a_posts += [Post("deleted", text=f"(deleted announcement {i})") for i in range(3)]
    a_posts += _documents(by_name["music-collection"]) + _documents(by_name["documents"])
    a_posts += _documents(by_name["old-scans"])
    a_posts += [Post("deleted", text=f"(deleted spam {i})") for i in range(2)]
    a_posts += _documents(by_name["dataset"]) + _documents(by_name["shared-ebooks"])
    a_posts += [Post("document", sample=readme)]

    shared = by_name["shared-ebooks"]
    partial = split_zip("partial-set", 300 * KIB, s, "Partial set (part 2 never posted)", parts=3)
    b_sets = [
        _set("shared-ebooks", "zip", SOURCE_B, list(shared.parts), expect="skip", reason="duplicate"),
        _set("wallpapers", "zip", SOURCE_B, single_zip("wallpapers", 200 * KIB, s, "Wallpapers pack"),
             album_photo=album_photo("wallpapers", "Wallpapers: a preview", 480, 270)),
        _set("fonts", "7z", SOURCE_B, single_7z("fonts", 160 * KIB, s, "Fonts, one 7z")),
        _set("private", "zip", SOURCE_B, locked_zip("private", 64 * KIB, s, "Private (password)"),
             reason="encrypted"),
        _set("broken", "zip", SOURCE_B, corrupt_zip("broken", 96 * KIB, s, "Broken upload"),
             reason="corrupt"),
        _set("partial-set", "zip.001", SOURCE_B, [partial[0], partial[2]], expect="skip",
             reason="incomplete_set"),
    ]
    b_by = {x.name: x for x in b_sets}
    cover = Sample("cover.png", png_image("sim-source-b-cover", 96, 64), "This week's cover", "image/png")
    b_posts: list[Post] = [
        Post("text", text="Welcome to Sim Source B. Archives are posted every week."),
        Post("forward", sample=shared.parts[0], forward_of=SOURCE_A),
        Post("text", text="Reminder: multi-part sets are posted in order."),
        Post("photo", sample=cover),
    ]
    b_posts += _documents(b_by["wallpapers"]) + _documents(b_by["fonts"])
    b_posts += [Post("deleted", text="(deleted duplicate post)")]
    b_posts += _documents(b_by["private"]) + _documents(b_by["broken"]) + _documents(b_by["partial-set"])

    f_sets = [
        _set("retro-games", "zip", FORUM, single_zip("retro-games", 300 * KIB, s, "Retro games"),
             topic="Games"),
        _set("game-mods", "7z.001", FORUM, sevenzip_parts("game-mods", 256 * KIB, s, "Mods, 7z volumes"),
             topic="Games"),
        _set("toolkit", "zip.001", FORUM, split_zip("toolkit", 300 * KIB, s, "Toolkit installer"),
             topic="Software"),
        _set("locked-notes", "rar", FORUM, locked_rar("locked-notes", "Notes (RAR, locked headers)"),
             topic="Software", reason="encrypted"),
        _set("shared-ebooks", "zip", FORUM, list(shared.parts), topic="Software", expect="skip",
             reason="duplicate"),
    ]
    f_posts: list[Post] = [Post("text", text="Welcome to the Sim Forum: archives live in the topics.")]
    for archive_set in f_sets:
        f_posts += _documents(archive_set, topic=archive_set.topic)
    f_posts.insert(3, Post("deleted", text="(deleted off-topic)", topic="Games"))
    return _Catalogue({SOURCE_A: tuple(a_posts), SOURCE_B: tuple(b_posts), FORUM: tuple(f_posts)},
                      tuple(a_sets + b_sets + f_sets))


def _documents(archive_set: ArchiveSet, topic: str | None = None) -> list[Post]:
    """The set's parts, after its album photo when it has one (then all in that album)."""
    album = archive_set.name if archive_set.album_photo is not None else None
    posts = [Post("photo", sample=archive_set.album_photo, topic=topic, album=album)] if album else []
    return posts + [Post("document", sample=part, topic=topic, album=album) for part in archive_set.parts]


def channel_posts(scale: float = 1.0) -> dict[str, tuple[Post, ...]]:
    """Channel username -> its posts in order (the forum's carry a topic title).

    The forum's "shared-ebooks.zip" is a re-upload: the same bytes as Source A's
    as a new document (same sha256, another document id); Source B's is a forward
    of Source A's (the same document id)."""
    return _catalogue(float(scale)).posts


def forum_topic_titles() -> tuple[str, ...]:
    return ("Games", "Software")


def expected_sets(scale: float = 1.0) -> tuple[ArchiveSet, ...]:
    """Every archive set posted by the seeder, with what ingest must do with it."""
    return _catalogue(float(scale)).sets


def expected_ingested(scale: float = 1.0) -> dict[str, ArchiveSet]:
    """sha256 -> the set that must end up in the destination exactly once."""
    return {x.sha256: x for x in expected_sets(scale) if x.expect == "ingest"}


def source_a_samples(scale: float = 1.0) -> list[Sample]:
    """The documents of "Sim Source A", in posting order."""
    return [p.sample for p in channel_posts(scale)[SOURCE_A] if p.sample is not None]


# -- the benchmark's channel -----------------------------------------------------------------

BENCH_SCHEMES = ("zip", "zip", "zip.001", "zip", "7z.001")


def bench_sets(count: int, total_bytes: int, *, label: str = "bench") -> Iterator[ArchiveSet]:
    """``count`` distinct archive sets of about ``total_bytes`` in all, one at a time
    (a few GiB never sit in memory together): zips, ``.zip.001..`` sets of 3 and
    ``.7z.001/.002`` pairs, sizes varying +-50 % around the mean."""
    mean = max(64 * KIB, total_bytes // max(1, count))
    rng = random.Random(f"{label}/{count}/{total_bytes}")
    for i in range(count):
        size = int(mean * rng.uniform(0.5, 1.5))
        scheme = BENCH_SCHEMES[i % len(BENCH_SCHEMES)]
        name = f"{label}-{i:04d}"
        if scheme == "zip":
            parts = [Sample(f"{name}.zip", make_zip(name, {f"{name}/data.bin": size}))]
        elif scheme == "zip.001":
            parts = split_zip(name, size, 1.0, parts=3)
        else:
            parts = sevenzip_parts(name, size, 1.0)
        yield ArchiveSet(name, scheme, "bench_source", None, tuple(parts))


__all__ = [
    "ArchiveSet", "Post", "Sample", "PASSWORD", "RAR_HEADERS_PASSWORD", "FIXTURES",
    "bench_sets", "channel_posts", "volume_split", "expected_sets", "expected_ingested", "source_a_samples",
    "forum_topic_titles", "pseudo_random_bytes", "split_bytes", "make_zip", "make_7z", "album_grouped_id",
    "png_image", "encrypted_zip", "spanned_zip_volumes",
]
