"""Listing archives (actors.ingest.index) on real archives: zip, 7z, rar; encrypted, corrupt.

RAR files are real volumes from rarfile's test suite (ISC): the multi-volume
and header-encrypted ones in actors/telegram/sim/fixtures, two small ones in
tests/ingest/fixtures.
"""
from __future__ import annotations

import io
import os
import struct
import zipfile
import zlib
from pathlib import Path

import py7zr
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from actors.ingest.archives import SetPart, parse_archive_name, set_status
from actors.ingest.index import INDEX_STATES, IndexEntry, index_archive
from actors.telegram.sim import samples

SIM_FIXTURES = Path(samples.__file__).parent / "fixtures"
FIXTURES = Path(__file__).parent / "fixtures"
PNG = samples.png_image("test-cover", 8, 8)


def _write(tmp_path, name, data) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def _zip_bytes(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


def _7z(path: Path, src: Path, **kw) -> Path:
    with py7zr.SevenZipFile(path, "w", **kw) as z:
        z.writeall(src, "d")
    return path


@pytest.fixture
def tree(tmp_path):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "a.txt").write_bytes(b"hello " * 1000)
    (src / "sub" / "cover.png").write_bytes(PNG)
    (src / "big.bin").write_bytes(os.urandom(200_000))
    return src


# --------------------------------------------------------------------------- zip


def test_zip_lists_paths_sizes_crcs_and_takes_the_image_preview(tmp_path):
    data = {"docs/": b"", "docs/readme.txt": b"read me\n" * 100, "docs/cover.png": PNG}
    path = _write(tmp_path, "a.zip", _zip_bytes(data))
    r = index_archive([path])
    assert (r.state, r.reason, r.format, r.truncated) == ("ok", None, "zip", False)
    assert r.entries == (
        IndexEntry("docs/", 0, 0, True),
        IndexEntry("docs/readme.txt", 800, zlib.crc32(b"read me\n" * 100), False),
        IndexEntry("docs/cover.png", len(PNG), zlib.crc32(PNG), False),
    )
    assert r.preview == PNG and r.preview_name == "docs/cover.png"


def test_preview_respects_the_size_cap_and_the_image_magic(tmp_path):
    path = _write(tmp_path, "a.zip", _zip_bytes({"x.png": PNG, "y.jpg": b"not an image"}))
    assert index_archive([path], preview_max_bytes=len(PNG) - 1).preview is None
    fake = _write(tmp_path, "b.zip", _zip_bytes({"y.jpg": b"not an image"}))
    r = index_archive([fake])
    assert r.ok and r.preview is None


def test_byte_split_zip_is_read_across_its_volumes(tmp_path):
    data = _zip_bytes({"big.bin": os.urandom(50_000), "pic.png": PNG})
    cut = len(data) // 3
    paths = [_write(tmp_path, f"s.zip.{i + 1:03d}", chunk)
             for i, chunk in enumerate([data[:cut], data[cut:2 * cut], data[2 * cut:]])]
    r = index_archive(paths)
    assert r.ok and [e.path for e in r.entries] == ["big.bin", "pic.png"]
    assert r.preview == PNG
    # the first volume alone: the end record is missing
    assert index_archive(paths[:1]).state == "corrupt"


def test_spanned_zip_volumes_and_a_missing_volume(tmp_path):
    volumes = samples.spanned_zip_volumes("span", {"one.bin": 3000, "two.bin": 2000,
                                                    "three.bin": 1000})
    names = [f"span.z{i:02d}" for i in range(1, len(volumes))] + ["span.zip"]
    paths = [_write(tmp_path, n, v) for n, v in zip(names, volumes)]
    r = index_archive(paths)
    assert r.ok and [(e.path, e.size) for e in r.entries] == [
        ("one.bin", 3000), ("two.bin", 2000), ("three.bin", 1000)]
    lacking = index_archive([paths[0], paths[2]])
    assert lacking.state == "corrupt" and "3 volumes, 2 given" in lacking.reason


def test_spanned_zip_preview_reads_the_member_from_its_volume(tmp_path):
    writer = samples._ZipWriter()  # the sim's spanned writer (as zip -s lays it out)
    writer.start_spanned()
    writer.add("filler.bin", os.urandom(4000))
    writer.next_volume()
    writer.add("cover.png", PNG)
    volumes = writer.finish()
    names = [f"p.z{i:02d}" for i in range(1, len(volumes))] + ["p.zip"]
    r = index_archive([_write(tmp_path, n, v) for n, v in zip(names, volumes)])
    assert r.ok and r.preview == PNG and r.preview_name == "cover.png"


def test_encrypted_zip_is_listed_and_flagged(tmp_path):
    path = _write(tmp_path, "locked.zip", samples.encrypted_zip("locked", {"secret.txt": 500}))
    r = index_archive([path])
    assert r.state == "encrypted" and "password" in r.reason
    assert [(e.path, e.size) for e in r.entries] == [("secret.txt", 500)]
    assert r.preview is None


def test_a_zip_with_only_the_encryption_flag_set_is_encrypted(tmp_path):
    """Craft it: stdlib cannot write encrypted zips; set bit 0 in both headers."""
    data = bytearray(_zip_bytes({"a.txt": b"abc"}))
    local = data.find(b"PK\x03\x04")
    central = data.find(b"PK\x01\x02")
    for at, flag_offset in ((local, 6), (central, 8)):
        flags = struct.unpack_from("<H", data, at + flag_offset)[0]
        struct.pack_into("<H", data, at + flag_offset, flags | 0x1)
    assert index_archive([_write(tmp_path, "e.zip", bytes(data))]).state == "encrypted"


@pytest.mark.parametrize("damage", ["truncate", "garbage", "central"])
def test_corrupt_zips_come_back_as_corrupt_never_as_exceptions(tmp_path, damage):
    data = _zip_bytes({"a.txt": b"abc" * 100, "b.txt": b"xyz" * 100})
    if damage == "truncate":
        data = data[: len(data) // 2]
    elif damage == "garbage":
        data = b"PK\x03\x04" + os.urandom(500)
    else:  # a broken central directory entry
        at = data.find(b"PK\x01\x02")
        data = data[:at] + b"XXXX" + data[at + 4:]
    r = index_archive([_write(tmp_path, "c.zip", data)])
    assert r.state == "corrupt" and r.reason and r.entries == ()


def test_sim_corrupt_sample_is_corrupt(tmp_path):
    [part] = samples.corrupt_zip("broken", 20_000, 1.0)
    assert index_archive([_write(tmp_path, part.file_name, part.data)]).state == "corrupt"


# --------------------------------------------------------------------------- 7z


def test_7z_lists_entries_with_crcs_and_a_preview(tmp_path, tree):
    r = index_archive([_7z(tmp_path / "n.7z", tree)])
    assert r.ok and r.format == "7z"
    by_path = {e.path: e for e in r.entries}
    assert by_path["d/a.txt"] == IndexEntry("d/a.txt", 6000, zlib.crc32(b"hello " * 1000), False)
    assert by_path["d/sub"].is_dir and by_path["d/big.bin"].size == 200_000
    assert r.preview == PNG and r.preview_name == "d/sub/cover.png"


def test_7z_with_encrypted_headers_cannot_be_listed(tmp_path, tree):
    path = _7z(tmp_path / "e.7z", tree, password="pw", header_encryption=True)
    r = index_archive([path])
    assert r.state == "encrypted" and r.entries == () and "headers" in r.reason


def test_7z_with_encrypted_content_is_listed_and_flagged(tmp_path, tree):
    r = index_archive([_7z(tmp_path / "f.7z", tree, password="pw")])
    assert r.state == "encrypted" and {e.path for e in r.entries} >= {"d/a.txt", "d/big.bin"}
    assert r.preview is None


def test_7z_volumes_by_byte_split_and_a_missing_volume(tmp_path, tree):
    data = _7z(tmp_path / "whole.7z", tree).read_bytes()
    step = len(data) // 3 + 1
    paths = [_write(tmp_path, f"v.7z.{i + 1:03d}", data[i * step:(i + 1) * step])
             for i in range(3)]
    r = index_archive(paths)
    assert r.ok and "d/big.bin" in {e.path for e in r.entries} and r.preview == PNG
    assert index_archive(paths[:2]).state == "corrupt"
    assert index_archive([paths[0], paths[2]]).state in ("corrupt", "unreadable")


def test_7z_garbage_after_the_magic_is_corrupt(tmp_path):
    path = _write(tmp_path, "g.7z", b"7z\xbc\xaf\x27\x1c\x00\x04" + os.urandom(300))
    assert index_archive([path]).state == "corrupt"


# --------------------------------------------------------------------------- rar


def test_rar5_single_is_listed_with_crcs(tmp_path):
    r = index_archive([FIXTURES / "rar5-crc.rar"])
    assert r.ok and r.format == "rar"
    assert [(e.path, e.size, e.crc) for e in r.entries] == [
        ("stest1.txt", 2048, 0xC5B7E6A2), ("stest2.txt", 2048, 0xC5B7E6A2)]


def test_rar_with_encrypted_content_is_listed_and_flagged():
    r = index_archive([FIXTURES / "rar5-psw.rar"])
    assert r.state == "encrypted" and [e.path for e in r.entries] == ["stest1.txt", "stest2.txt"]


def test_rar_with_encrypted_headers_cannot_be_listed():
    r = index_archive([SIM_FIXTURES / "rar5-hpsw.rar"])
    assert r.state == "encrypted" and r.entries == ()


@pytest.mark.parametrize("names", [
    ["rar5-vols.part1.rar", "rar5-vols.part2.rar", "rar5-vols.part3.rar"],
    ["rar3-old.rar", "rar3-old.r00", "rar3-old.r01"],
])
def test_rar_volume_sets_from_staged_files_with_other_names(tmp_path, names):
    """Staged files need not carry the posted names: the names are given."""
    staged = []
    for i, name in enumerate(names):
        staged.append(_write(tmp_path, f"staged-{i}", (SIM_FIXTURES / name).read_bytes()))
    posted = [n.replace("rar5-vols", "documents").replace("rar3-old", "old-scans") for n in names]
    r = index_archive(staged, names=posted)
    assert r.ok and [(e.path, e.size) for e in r.entries] == [
        ("vols/bigfile.txt", 205000), ("vols/smallfile.txt", 2050)]
    missing_last = index_archive(staged[:2], names=posted[:2])
    assert missing_last.state == "corrupt" and "next volume" in missing_last.reason
    assert str(tmp_path) not in missing_last.reason  # no temp paths in reasons
    not_first = index_archive(staged[1:], names=posted[1:])
    assert not_first.state == "corrupt"


def test_rar_volumes_in_place_ignore_stray_siblings(tmp_path):
    """Only the volumes given count, even if the next one sits beside them."""
    for name in ("rar5-vols.part1.rar", "rar5-vols.part2.rar", "rar5-vols.part3.rar"):
        _write(tmp_path, name, (SIM_FIXTURES / name).read_bytes())
    r = index_archive([tmp_path / "rar5-vols.part1.rar", tmp_path / "rar5-vols.part2.rar"])
    assert r.state == "corrupt"


# --------------------------------------------------------------------------- the rest


def test_unknown_or_unreadable_input_is_a_result(tmp_path):
    assert index_archive([_write(tmp_path, "x.bin", b"hello")]).state == "unreadable"
    assert index_archive([tmp_path / "missing.zip"]).state == "unreadable"
    assert index_archive([]).state == "unreadable"
    empty = index_archive([_write(tmp_path, "empty.zip", b"")])
    assert empty.state in ("corrupt", "unreadable")
    with pytest.raises(ValueError):
        index_archive([tmp_path / "x.bin"], names=["a", "b"])


def test_max_entries_truncates_the_listing(tmp_path):
    path = _write(tmp_path, "many.zip", _zip_bytes({f"f{i}.txt": b"x" for i in range(50)}))
    r = index_archive([path], max_entries=10)
    assert r.ok and r.truncated and len(r.entries) == 10


def test_every_sim_sample_set_groups_completes_and_indexes_as_expected(tmp_path):
    """The sim's sample sets (W7) through the set rule and the indexer."""
    sets = samples.expected_sets(scale=0.05)
    assert len({s.scheme for s in sets}) >= 7  # every naming scheme is in there
    for archive_set in sets:
        where = tmp_path / archive_set.channel / archive_set.name
        where.mkdir(parents=True, exist_ok=True)
        parts = [SetPart(parse_archive_name(p.file_name), p.size, _write(where, p.file_name, p.data))
                 for p in archive_set.parts]
        status = set_status(parts)
        label = f"{archive_set.channel}/{archive_set.name}"
        if archive_set.reason == "incomplete_set":
            assert not status.complete, label
            continue
        assert status.complete, (label, status.reason)
        result = index_archive([p.ref for p in status.ordered],
                               names=[p.name.file_name for p in status.ordered])
        expected_state = archive_set.reason if archive_set.reason in ("encrypted", "corrupt") else "ok"
        assert result.state == expected_state, (label, result.reason)
        if archive_set.has_preview:
            assert result.preview is not None, label


# --------------------------------------------------------------------------- never raises


def _seed_archives() -> list[bytes]:
    zipped = _zip_bytes({"a/b.txt": b"x" * 5000, "c.png": PNG})
    buf = io.BytesIO()
    with py7zr.SevenZipFile(buf, "w") as z:
        z.writestr(b"hello" * 300, "f.txt")
    return [zipped, buf.getvalue(), (FIXTURES / "rar5-crc.rar").read_bytes()]


SEEDS = _seed_archives()


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.sampled_from(range(len(SEEDS))),
       edits=st.lists(st.tuples(st.sampled_from(["flip", "cut", "insert"]),
                                st.floats(0, 1), st.binary(min_size=1, max_size=16)),
                      min_size=1, max_size=6))
def test_damaged_archives_always_come_back_as_a_result(tmp_path_factory, seed, edits):
    data = bytearray(SEEDS[seed])
    for op, where, blob in edits:
        at = int(where * len(data))
        if op == "flip" and data:
            data[min(at, len(data) - 1)] ^= blob[0] or 1
        elif op == "cut":
            del data[at:]
        else:
            data[at:at] = blob
    path = tmp_path_factory.mktemp("fuzz") / "x.bin"
    path.write_bytes(bytes(data))
    result = index_archive([path])  # must not raise
    assert result.state in INDEX_STATES
    assert (result.reason is None) == (result.state == "ok")
