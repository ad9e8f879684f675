"""Transfer manifests: split plan, build, atomic write, refusal of bad files."""
from __future__ import annotations

import dataclasses
import hashlib
import os
import random

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from storage import manifest as mf
from storage.errors import StorageError
from storage.manifest import (
    HASH_BLOCK_SIZE, MANIFEST_VERSION, UPLOAD_CHUNK_SIZE, ManifestCorruptError, ManifestError,
    ManifestNotFoundError, ManifestShapeError, ManifestVersionError, SourceError, build_manifest,
    discard_stale_temps, pack_manifest, parse_marker, plan_split, read_manifest, unpack_manifest,
    write_manifest,
)

KiB, MiB = 1024, 1024 * 1024
FS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


# ---------------------------------------------------------------- plan_split


@st.composite
def size_and_limit(draw):
    limit = draw(st.integers(UPLOAD_CHUNK_SIZE, 5 * 1024**3))
    return draw(st.integers(0, limit * 3000)), limit


@given(size_and_limit())
def test_plan_split_covers_file_exactly(args):
    size, limit = args
    spans = plan_split(size, limit)
    offset = 0
    for off, length in spans:
        assert off == offset and 0 < length <= limit
        offset += length
    assert offset == size
    if spans:
        first = spans[0][1]
        assert all(length == first for _, length in spans[:-1])
        assert all(length % UPLOAD_CHUNK_SIZE == 0 for _, length in spans[:-1])
        assert spans[-1][1] <= first
        assert len(spans) == -(-size // (limit // UPLOAD_CHUNK_SIZE * UPLOAD_CHUNK_SIZE))


def test_plan_split_refuses_limit_below_one_upload_chunk():
    with pytest.raises(ValueError, match="at least 524288"):
        plan_split(10, UPLOAD_CHUNK_SIZE - 1)


def test_plan_split_2000_mib_limit_with_margin():
    limit = 2000 * MiB - 64 * MiB
    spans = plan_split(4 * 1024 * MiB, limit)
    assert [length for _, length in spans] == [limit, limit, 4096 * MiB - 2 * limit]


# ---------------------------------------------------------------- build


def _file(tmp_path, data, name="photos.zip"):
    path = tmp_path / name
    path.write_bytes(data)
    return path


def test_build_splits_over_limit_and_parts_concatenate_to_original(tmp_path):
    data = random.Random(1).randbytes(2 * MiB + 700 * KiB)
    path = _file(tmp_path, data)
    m = build_manifest(path, "stash_archive", limit_bytes=MiB + 100, caption="holiday",
                       rng=random.Random(7), clock=lambda: 1234.5)
    assert [p.file_name for p in m.parts] == ["photos.zip.001", "photos.zip.002", "photos.zip.003"]
    assert [p.length for p in m.parts] == [MiB, MiB, 700 * KiB]
    assert b"".join(data[p.offset:p.end] for p in m.parts) == data
    assert m.sha256 == hashlib.sha256(data).hexdigest() == m.sources[0].sha256
    assert m.total_size == len(data) and m.created_at == 1234.5 and m.split
    assert m.sources[0].path == str(path.resolve()) and m.sources[0].mtime_ns == path.stat().st_mtime_ns
    for p in m.parts:
        chunk = data[p.offset:p.end]
        assert p.sha256 == hashlib.sha256(chunk).hexdigest()
        assert list(p.chunk_hashes) == [hashlib.sha256(chunk[i:i + HASH_BLOCK_SIZE]).digest()
                                        for i in range(0, len(chunk), HASH_BLOCK_SIZE)]
        assert p.caption == f"holiday\n{m.caption_marker}:{p.index + 1}/3"
        assert parse_marker(p.caption) == (m.transfer_id, p.index, 3)
    ids = [p.file_id for p in m.parts] + [p.random_id for p in m.parts]
    assert len(set(ids)) == len(ids) and all(-(2**63) <= i < 2**63 and i for i in ids)


def test_build_single_part_keeps_name_and_is_deterministic_with_rng(tmp_path):
    path = _file(tmp_path, b"x" * 1000, "notes.7z")
    a = build_manifest(path, "dest", MiB, rng=random.Random(3), clock=lambda: 1.0)
    b = build_manifest(path, "dest", MiB, rng=random.Random(3), clock=lambda: 1.0)
    assert a == b
    assert [p.file_name for p in a.parts] == ["notes.7z"] and not a.split
    assert a.parts[0].caption == f"#stashd:{a.transfer_id}:1/1"
    assert a.parts[0].upload_parts == 1


def test_long_caption_is_cut_to_fit_telegram_with_marker_intact(tmp_path):
    path = _file(tmp_path, b"x")
    m = build_manifest(path, "dest", MiB, caption="y" * 5000)
    assert len(m.parts[0].caption) <= mf.CAPTION_LIMIT
    assert parse_marker(m.parts[0].caption) == (m.transfer_id, 0, 1)


def test_build_refuses_empty_and_missing_files(tmp_path):
    with pytest.raises(SourceError, match="empty"):
        build_manifest(_file(tmp_path, b""), "dest", MiB)
    with pytest.raises(SourceError, match="cannot read source"):
        build_manifest(tmp_path / "nope", "dest", MiB)


def test_build_refuses_a_file_that_changes_while_read(tmp_path, monkeypatch):
    path = _file(tmp_path, b"a" * 100)
    real_stat, calls = type(path).stat, []

    def stat(self, *a, **kw):
        calls.append(self)
        if len(calls) == 2:
            path.write_bytes(b"b" * 101)
        return real_stat(self, *a, **kw)

    monkeypatch.setattr(type(path), "stat", stat)
    with pytest.raises(SourceError, match="changed while it was read"):
        build_manifest(path, "dest", MiB)


# ---------------------------------------------------------------- write / read


@FS
@given(data=st.binary(min_size=1, max_size=3 * MiB // 2), limit=st.integers(UPLOAD_CHUNK_SIZE, 2 * MiB),
       caption=st.none() | st.text(max_size=50), seed=st.integers(0, 2**32))
def test_write_read_round_trip(tmp_path, data, limit, caption, seed):
    src = _file(tmp_path, data)
    m = build_manifest(src, "chan", limit, caption=caption, rng=random.Random(seed))
    target = tmp_path / "t.manifest"
    write_manifest(m, target)
    assert read_manifest(target) == m
    assert os.stat(target).st_mode & 0o777 == 0o600
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def test_with_random_id_returns_new_manifest_and_round_trips(tmp_path):
    m = build_manifest(_file(tmp_path, b"z" * (MiB + 1)), "d", UPLOAD_CHUNK_SIZE)
    m2 = m.with_random_id(1, 42)
    assert m2.parts[1].random_id == 42 and m.parts[1].random_id != 42
    assert m2.parts[0] == m.parts[0] and m2.parts[2] == m.parts[2]
    assert unpack_manifest(pack_manifest(m2)) == m2
    with pytest.raises(ValueError):
        m.with_random_id(0, 2**63)


def test_crash_before_rename_leaves_old_manifest(tmp_path, monkeypatch):
    src = _file(tmp_path, b"q" * 5000)
    old = build_manifest(src, "d", MiB)
    target = write_manifest(old, tmp_path / "t.manifest")
    new = old.with_random_id(0, 7)

    # the process dies after writing the temp file, before the rename
    mf._write_temp(pack_manifest(new), target)
    assert read_manifest(target) == old

    # a failure at the rename itself cleans its temp file
    def boom(*a):
        raise OSError("disk gone")
    monkeypatch.setattr(mf.os, "replace", boom)
    with pytest.raises(OSError):
        write_manifest(new, target)
    monkeypatch.undo()
    assert read_manifest(target) == old
    assert discard_stale_temps(target) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["photos.zip", "t.manifest"]
    write_manifest(new, target)
    assert read_manifest(target) == new


def test_missing_manifest(tmp_path):
    with pytest.raises(ManifestNotFoundError, match="manifest not found"):
        read_manifest(tmp_path / "absent.manifest")


def _envelope(body: bytes, version=MANIFEST_VERSION, digest=None) -> bytes:
    return msgpack.packb({"format": mf.MANIFEST_FORMAT, "version": version,
                          "sha256": digest or hashlib.sha256(body).digest(), "body": body})


def test_newer_version_is_refused_with_clear_message(tmp_path):
    m = build_manifest(_file(tmp_path, b"v"), "d", MiB)
    path = tmp_path / "v.manifest"
    path.write_bytes(_envelope(mf.encode_body(m), version=9))
    with pytest.raises(ManifestVersionError, match=f"manifest version 9 is newer than supported {mf.SUPPORTED_VERSION}"):
        read_manifest(path)


def test_truncated_manifest_is_corrupt(tmp_path):
    m = build_manifest(_file(tmp_path, b"v"), "d", MiB)
    raw = pack_manifest(m)
    path = tmp_path / "t.manifest"
    path.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ManifestCorruptError, match="truncated or corrupt"):
        read_manifest(path)


def test_wrong_shape_names_the_field(tmp_path):
    m = build_manifest(_file(tmp_path, b"v" * 10), "d", MiB)
    doc = msgpack.unpackb(mf.encode_body(m))
    doc["parts"][0]["length"] = "ten"
    with pytest.raises(ManifestShapeError, match=r"parts\[0\]\.length: expected int, got str"):
        unpack_manifest(_envelope(msgpack.packb(doc)))
    doc["parts"][0]["length"] = 11
    with pytest.raises(ManifestShapeError, match="block hashes|cover"):
        unpack_manifest(_envelope(msgpack.packb(doc)))


def test_all_errors_share_one_base():
    for cls in (ManifestNotFoundError, ManifestCorruptError, ManifestVersionError,
                ManifestShapeError, SourceError):
        assert issubclass(cls, ManifestError) and issubclass(cls, StorageError)


@pytest.fixture(scope="module")
def valid_raw(tmp_path_factory):
    src = tmp_path_factory.mktemp("m") / "f.bin"
    src.write_bytes(random.Random(2).randbytes(MiB + 5))
    return pack_manifest(build_manifest(src, "d", UPLOAD_CHUNK_SIZE, caption="c"))


@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_mutated_bytes_raise_manifest_error_only(valid_raw, data):
    raw = bytearray(valid_raw)
    how = data.draw(st.sampled_from(["truncate", "flip", "insert", "garbage"]))
    if how == "truncate":
        raw = raw[: data.draw(st.integers(0, len(raw) - 1))]
    elif how == "flip":
        i = data.draw(st.integers(0, len(raw) - 1))
        raw[i] ^= data.draw(st.integers(1, 255))
    elif how == "insert":
        i = data.draw(st.integers(0, len(raw)))
        raw[i:i] = data.draw(st.binary(min_size=1, max_size=8))
    else:
        raw = data.draw(st.binary(max_size=200))
    try:
        result = unpack_manifest(bytes(raw))
    except ManifestError:
        return
    # a change that survives decoding can only be a harmless re-encoding
    assert isinstance(result, mf.Manifest)


msgpack_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats(allow_nan=False)
    | st.text(max_size=10) | st.binary(max_size=10),
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=12), kids, max_size=5),
    max_leaves=20,
)


@settings(max_examples=200, deadline=None)
@given(value=msgpack_values, keys=st.lists(st.sampled_from(
    ["transfer_id", "sources", "parts", "total_size", "sha256", "chunk_size",
     "caption_marker", "destination", "created_at"]), max_size=9))
def test_arbitrary_bodies_with_valid_checksum_raise_manifest_error_only(value, keys):
    bodies = [value, dict.fromkeys(keys, value)]
    for body in bodies:
        with pytest.raises(ManifestError):
            unpack_manifest(_envelope(msgpack.packb(body)))
        with pytest.raises(ManifestError):
            unpack_manifest(msgpack.packb(body))


def test_decoded_manifest_is_not_another_exception_on_bad_uuid(tmp_path):
    m = build_manifest(_file(tmp_path, b"v"), "d", MiB)
    bad = dataclasses.replace(m, transfer_id="not-a-uuid")
    with pytest.raises(ManifestShapeError, match="not a UUID"):
        unpack_manifest(pack_manifest(bad))


@pytest.mark.parametrize("size,limit", [(18 * MiB + 3, 2**31), (20 * MiB + 77, 11 * 512 * KiB),
                                        (9 * MiB + 5, 5 * MiB), (3 * MiB, 3 * MiB - 512 * KiB)])
def test_one_pass_hashing_matches_plain_hashes_across_batches(tmp_path, size, limit):
    """The two-thread pass (work split at half of parts 1..; parts of 5.5 MiB
    put that split inside part 1) gives the same file, part and per-MiB block
    hashes as hashing each piece on its own."""
    data = random.Random(size).randbytes(size)
    m = build_manifest(_file(tmp_path, data), "d", limit_bytes=limit)
    assert m.sha256 == hashlib.sha256(data).hexdigest()
    assert len(m.parts) == len(plan_split(size, limit))
    for p in m.parts:
        chunk = data[p.offset:p.end]
        assert p.sha256 == hashlib.sha256(chunk).hexdigest()
        assert list(p.chunk_hashes) == [hashlib.sha256(chunk[i:i + HASH_BLOCK_SIZE]).digest()
                                        for i in range(0, len(chunk), HASH_BLOCK_SIZE)]
