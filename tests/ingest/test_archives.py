"""Archive names, set grouping and completeness (actors.ingest.archives): pure, no threads."""
from __future__ import annotations

import dataclasses
import io
import random
import zipfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from actors.ingest.archives import (
    ConcatFile, SetPart, detect_archive, parse_archive_name, rar_volume_flag, set_key, set_status,
    sniff_format, zip_disk_count,
)
from actors.telegram.sim import samples

FIXTURES = Path(samples.__file__).parent / "fixtures"  # rarfile's test volumes (ISC)

FS = settings(max_examples=60, deadline=None,
              suppress_health_check=[HealthCheck.function_scoped_fixture])


# --------------------------------------------------------------------------- names


@pytest.mark.parametrize("name, fmt, scheme, base, number", [
    ("holiday.zip", "zip", "zip", "holiday", None),
    ("Holiday.ZIP", "zip", "zip", "Holiday", None),
    ("holiday.z01", "zip", "zip", "holiday", 1),
    ("holiday.z12", "zip", "zip", "holiday", 12),
    ("holiday.zip.001", "zip", "zip.nnn", "holiday", 1),
    ("holiday.zip.0010", "zip", "zip.nnn", "holiday", 10),
    ("scans.rar", "rar", "rar", "scans", 1),
    ("scans.r00", "rar", "rar", "scans", 2),
    ("scans.r17", "rar", "rar", "scans", 19),
    ("scans.part1.rar", "rar", "rar.part", "scans", 1),
    ("scans.part01.rar", "rar", "rar.part", "scans", 1),
    ("scans.Part003.RAR", "rar", "rar.part", "scans", 3),
    ("box.7z", "7z", "7z", "box", 1),
    ("box.7z.001", "7z", "7z.nnn", "box", 1),
    ("box.7z.002", "7z", "7z.nnn", "box", 2),
    ("my.files.v2.zip", "zip", "zip", "my.files.v2", None),
    ("dir/sub/box.7z", "7z", "7z", "box", 1),
])
def test_every_naming_scheme_is_recognised(name, fmt, scheme, base, number):
    parsed = parse_archive_name(name)
    assert parsed is not None
    assert (parsed.format, parsed.scheme, parsed.base, parsed.number) == (fmt, scheme, base, number)


@pytest.mark.parametrize("name", [
    "photo.jpg", "notes.txt", "zip", ".zip", "archive.zip.txt", "a.z00", "a.zip.000",
    "a.part0.rar", "a.tar.gz", "", "a.7z.01", "rar",
])
def test_other_names_are_not_archives(name):
    assert parse_archive_name(name) is None


def test_magic_bytes():
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("a.txt", b"x")
    assert sniff_format(buf.getvalue()) == "zip"
    assert sniff_format(b"PK\x07\x08rest") == "zip"  # spanned first volume
    assert sniff_format(b"Rar!\x1a\x07\x01\x00....") == "rar"
    assert sniff_format(b"Rar!\x1a\x07\x00....") == "rar"
    assert sniff_format(b"7z\xbc\xaf\x27\x1c\x00\x04") == "7z"
    assert sniff_format(b"\x89PNG\r\n") is None
    assert sniff_format(b"") is None


def test_detect_uses_the_magic_when_the_name_says_nothing():
    assert detect_archive("download.bin", b"7z\xbc\xaf\x27\x1c\x00\x04").format == "7z"
    assert detect_archive("download", b"Rar!\x1a\x07\x01\x00").scheme == "rar"
    assert detect_archive("download.bin", b"hello") is None
    assert detect_archive("download.bin") is None
    assert detect_archive("x.zip", b"not a zip").scheme == "zip"  # the name wins


def test_set_key_groups_the_volumes_of_one_set_and_nothing_else():
    key = lambda name, channel=5, topic=None: set_key(channel, topic, parse_archive_name(name))
    assert key("Scans.z01") == key("scans.z02") == key("SCANS.zip") == "5:0:zip:scans"
    assert key("scans.rar") == key("scans.r00")
    assert key("scans.part1.rar") == key("scans.part2.rar") != key("scans.rar")
    assert key("box.7z.001") == key("box.7z.002") != key("box.7z")
    assert key("box.zip.001") != key("box.zip")
    assert key("box.7z.001", channel=6) != key("box.7z.001")
    assert key("box.7z.001", topic=3) != key("box.7z.001", topic=4)


# --------------------------------------------------------------------------- completeness


def _parts(*named_sizes):
    return [SetPart(parse_archive_name(n), s, ref=i) for i, (n, s) in enumerate(named_sizes)]


def test_spanned_zip_is_complete_when_the_final_zip_closes_a_gap_free_run():
    st_ = set_status(_parts(("a.z02", 100), ("a.zip", 40), ("a.z01", 100)))
    assert st_.complete and st_.expected_parts == 3
    assert [p.name.file_name for p in st_.ordered] == ["a.z01", "a.z02", "a.zip"]
    assert st_.numbers == (1, 2, 3)
    waiting = set_status(_parts(("a.z01", 100), ("a.z02", 100)))
    assert not waiting.complete and "final .zip" in waiting.reason
    gap = set_status(_parts(("a.z01", 100), ("a.z03", 100), ("a.zip", 10)))
    assert not gap.complete and gap.missing == (2,) and gap.expected_parts == 4


def test_a_lone_zip_rar_or_7z_is_a_complete_single_archive():
    for name in ("a.zip", "a.rar", "a.7z"):
        s = set_status(_parts((name, 1234)))
        assert s.complete and s.expected_parts == 1 and s.total_size == 1234


@pytest.mark.parametrize("names", [
    ["a.zip.001", "a.zip.002", "a.zip.003"],
    ["a.7z.001", "a.7z.002", "a.7z.003"],
    ["a.part1.rar", "a.part2.rar", "a.part3.rar"],
    ["a.rar", "a.r00", "a.r01"],
])
def test_volume_sets_end_at_the_short_volume(names):
    full = set_status(_parts((names[0], 100), (names[1], 100), (names[2], 30)))
    assert full.complete and full.expected_parts == 3 and full.total_size == 230
    assert [p.name.file_name for p in full.ordered] == names
    no_end = set_status(_parts((names[0], 100), (names[1], 100)))
    assert not no_end.complete and no_end.expected_parts is None
    assert set_status(_parts((names[0], 100), (names[1], 100)), settled=True).complete
    gap = set_status(_parts((names[0], 100), (names[2], 30)), settled=True)
    assert not gap.complete and gap.missing == (2,) and gap.expected_parts == 3
    no_first = set_status(_parts((names[1], 100), (names[2], 30)), settled=True)
    assert not no_first.complete and 1 in no_first.missing


def test_irregular_volume_sizes_wait_for_the_set_to_settle():
    parts = _parts(("a.7z.001", 100), ("a.7z.002", 50), ("a.7z.003", 100))
    assert not set_status(parts).complete
    assert set_status(parts, settled=True).complete


def test_duplicate_volumes_are_kept_once_and_reported():
    parts = _parts(("a.7z.001", 100), ("a.7z.001", 100), ("a.7z.002", 7))
    s = set_status(parts)
    assert s.complete and len(s.ordered) == 2 and [d.ref for d in s.duplicates] == [1]


def test_parts_of_different_schemes_are_a_caller_error():
    with pytest.raises(ValueError):
        set_status(_parts(("a.7z.001", 1), ("a.zip.001", 1)))
    assert not set_status([]).complete


def test_names_alone_cannot_tell_these_but_the_volume_bytes_can(tmp_path):
    # z01 + z02 + .zip looks whole when z03 is missing ...
    names_only = set_status(_parts(("a.z01", 100), ("a.z02", 100), ("a.zip", 10)))
    assert names_only.complete
    # ... the tail's end record says 4 disks
    tail = dataclasses.replace(_parts(("a.zip", 10))[0], disks=4)
    told = set_status(_parts(("a.z01", 100), ("a.z02", 100)) + [tail])
    assert not told.complete and told.missing == (3,) and told.expected_parts == 4
    # a lone .rar is a single archive, unless its header says it is a volume
    assert set_status(_parts(("a.rar", 100))).complete
    head = dataclasses.replace(_parts(("a.rar", 100))[0], more_volumes=True)
    assert not set_status([head]).complete


def test_volume_header_readers_on_real_files(tmp_path):
    assert rar_volume_flag((FIXTURES / "rar3-old.rar").read_bytes()[:200]) is True
    assert rar_volume_flag((FIXTURES / "rar5-vols.part1.rar").read_bytes()[:200]) is True
    assert rar_volume_flag((FIXTURES / "rar5-hpsw.rar").read_bytes()[:200]) is None
    assert rar_volume_flag((Path(__file__).parent / "fixtures" / "rar5-crc.rar")
                           .read_bytes()[:200]) is False
    assert rar_volume_flag(b"PK\x03\x04") is None and rar_volume_flag(b"Rar!\x1a\x07\x01\x00") is None
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("a", b"x")
    assert zip_disk_count(buf.getvalue()) == 1
    assert zip_disk_count(b"no end record here") is None


SCHEMES = {
    "zip.nnn": lambda base, n, count: f"{base}.zip.{n:03d}",
    "7z.nnn": lambda base, n, count: f"{base}.7z.{n:03d}",
    "rar.part": lambda base, n, count: f"{base}.part{n}.rar",
    "rar": lambda base, n, count: f"{base}.rar" if n == 1 else f"{base}.r{n - 2:02d}",
    "zip": lambda base, n, count: f"{base}.zip" if n == count else f"{base}.z{n:02d}",
}


@st.composite
def volume_sets(draw):
    scheme = draw(st.sampled_from(sorted(SCHEMES)))
    count = draw(st.integers(2, 12))
    volume = draw(st.integers(2, 10_000))
    last = draw(st.integers(1, volume - 1))  # writers fill every volume but the last
    base = draw(st.from_regex(r"[A-Za-z0-9][A-Za-z0-9 _.-]{0,12}[A-Za-z0-9]", fullmatch=True))
    names = [SCHEMES[scheme](base, n, count) for n in range(1, count + 1)]
    sizes = [volume] * (count - 1) + [last]
    return scheme, names, sizes


@FS
@given(volume_sets(), st.randoms(use_true_random=False), st.data())
def test_property_a_set_is_complete_exactly_when_every_volume_is_seen(case, rnd, data):
    scheme, names, sizes = case
    assume(all(parse_archive_name(n) is not None and parse_archive_name(n).scheme == scheme
               for n in names))
    parts = _parts(*zip(names, sizes))
    keys = {set_key(1, None, p.name) for p in parts}
    assert len(keys) == 1  # every volume lands in the same set
    shuffled = parts[:]
    rnd.shuffle(shuffled)
    whole = set_status(shuffled)
    assert whole.complete and whole.expected_parts == len(names)
    assert [p.ref for p in whole.ordered] == list(range(len(names)))  # content order
    # take any volume away: never complete, and it is named as missing when known
    drop = data.draw(st.integers(0, len(names) - 1))
    # What the bytes say (as a real set's would): the .zip tail counts its
    # disks, the .rar head says more volumes follow. Names alone cannot tell
    # these two cases (test_names_alone_cannot_tell_these).
    hinted = [dataclasses.replace(p, disks=len(names)) if p.name.number is None else
              dataclasses.replace(p, more_volumes=True) if p.name.scheme == "rar" and p.ref == 0
              else p for p in shuffled]
    rest = [p for p in hinted if p.ref != drop]
    partial = set_status(rest)
    assert not partial.complete
    if drop < len(names) - 1:  # a gap below the end is named
        assert drop + 1 in partial.missing
    # a duplicate of a seen volume never completes a partial set
    again = set_status(rest + [rest[0]])
    assert not again.complete


# --------------------------------------------------------------------------- content


@FS
@given(sizes=st.lists(st.integers(0, 5000), min_size=1, max_size=5),
       ops=st.lists(st.tuples(st.integers(0, 30_000), st.integers(-1, 9000)), max_size=15))
def test_concat_file_reads_and_seeks_like_the_joined_bytes(tmp_path_factory, sizes, ops):
    tmp = tmp_path_factory.mktemp("c")
    rng = random.Random(sum(sizes))
    paths, blobs = [], []
    for i, size in enumerate(sizes):
        blob = rng.randbytes(size)
        (tmp / f"p{i}").write_bytes(blob)
        paths.append(tmp / f"p{i}")
        blobs.append(blob)
    joined = io.BytesIO(b"".join(blobs))
    with ConcatFile(paths) as fh:
        assert fh.size == len(joined.getvalue())
        for pos, n in ops:
            assert fh.seek(pos) == joined.seek(pos)
            assert fh.read(n) == joined.read(n)
            assert fh.tell() == joined.tell()
        end = len(joined.getvalue())
        if end >= 3:
            fh.seek(-3, io.SEEK_END)
            assert fh.read() == joined.getvalue()[-3:]
        fh.seek(2, io.SEEK_SET)
        fh.seek(1, io.SEEK_CUR)
        assert fh.tell() == 3 and fh.read(2) == joined.getvalue()[3:5]
        with pytest.raises(ValueError):
            fh.seek(-1)


def test_concat_file_is_what_zipfile_reads_for_a_byte_split_zip(tmp_path):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("docs/readme.txt", b"hello " * 5000)
    data = buf.getvalue()
    third = len(data) // 3
    for i, chunk in enumerate([data[:third], data[third:2 * third], data[2 * third:]]):
        (tmp_path / f"d.zip.{i + 1:03d}").write_bytes(chunk)
    with ConcatFile(sorted(tmp_path.glob("d.zip.*"))) as fh:
        with zipfile.ZipFile(fh) as zf:
            assert zf.read("docs/readme.txt") == b"hello " * 5000


def test_concat_file_of_a_missing_file_raises_and_leaks_nothing(tmp_path):
    (tmp_path / "a").write_bytes(b"x")
    with pytest.raises(FileNotFoundError):
        ConcatFile([tmp_path / "a", tmp_path / "b"])
