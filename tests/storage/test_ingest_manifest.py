"""Multi-source manifests: a transfer whose content is several files laid end to end."""
from __future__ import annotations

import hashlib
import os
import random

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from storage import manifest as mf
from storage.manifest import (
    HASH_BLOCK_SIZE, MANIFEST_VERSION, MULTI_SOURCE_VERSION, UPLOAD_CHUNK_SIZE,
    ManifestVersionError, SourceError, build_manifest, build_multi_manifest, open_source,
    open_sources, read_manifest, unpack_manifest, write_manifest,
)

KiB, MiB = 1024, 1024 * 1024
FS = settings(max_examples=30, deadline=None,
              suppress_health_check=[HealthCheck.function_scoped_fixture])


def _files(tmp_path, sizes, names=None, seed=1):
    rng = random.Random(seed)
    paths = []
    for i, size in enumerate(sizes):
        name = names[i] if names else f"set.z{i + 1:02d}"
        path = tmp_path / name
        path.write_bytes(rng.randbytes(size))
        paths.append(path)
    return paths


def _content(paths) -> bytes:
    return b"".join(p.read_bytes() for p in paths)


def _check_hashes(m, data: bytes):
    assert m.sha256 == hashlib.sha256(data).hexdigest()
    assert m.total_size == len(data)
    for p in m.parts:
        chunk = data[p.offset:p.end]
        assert p.sha256 == hashlib.sha256(chunk).hexdigest()
        assert p.chunk_hashes == tuple(hashlib.sha256(chunk[i:i + HASH_BLOCK_SIZE]).digest()
                                       for i in range(0, len(chunk), HASH_BLOCK_SIZE))


def test_parts_keep_the_original_files_when_each_fits(tmp_path):
    names = ["scans.z01", "scans.z02", "scans.zip"]
    paths = _files(tmp_path, [MiB + 5, MiB + 5, 300 * KiB], names)
    m = build_multi_manifest(paths, "stash", limit_bytes=2 * MiB, caption="scans",
                             rng=random.Random(3), clock=lambda: 7.0)
    assert m.version == MULTI_SOURCE_VERSION
    assert [p.file_name for p in m.parts] == names
    assert [(p.offset, p.length) for p in m.parts] == [
        (0, MiB + 5), (MiB + 5, MiB + 5), (2 * MiB + 10, 300 * KiB)]
    assert [s.path for s in m.sources] == [str(p.resolve()) for p in paths]
    assert [s.sha256 for s in m.sources] == [hashlib.sha256(p.read_bytes()).hexdigest()
                                             for p in paths]
    assert [s.size for s in m.sources] == [p.stat().st_size for p in paths]
    _check_hashes(m, _content(paths))
    assert [mf.parse_marker(p.caption)[1:] for p in m.parts] == [(0, 3), (1, 3), (2, 3)]
    assert m.parts[0].caption.startswith("scans\n#stashd:")


def test_a_file_over_the_limit_resplits_the_whole_set_byte_level(tmp_path):
    paths = _files(tmp_path, [3 * MiB, 3 * MiB, MiB], ["a.7z.001", "a.7z.002", "a.7z.003"])
    m = build_multi_manifest(paths, "stash", limit_bytes=2 * MiB, split_name="a.7z",
                             rng=random.Random(4))
    assert [p.file_name for p in m.parts] == ["a.7z.001", "a.7z.002", "a.7z.003", "a.7z.004"]
    assert [p.length for p in m.parts] == [2 * MiB, 2 * MiB, 2 * MiB, MiB]
    _check_hashes(m, _content(paths))
    # the default split name is the first file's name
    m2 = build_multi_manifest(paths, "stash", limit_bytes=2 * MiB, rng=random.Random(4))
    assert m2.parts[0].file_name == "a.7z.001.001"


def test_names_override_the_staged_file_names(tmp_path):
    paths = _files(tmp_path, [10, 20], ["staged-1", "staged-2"])
    m = build_multi_manifest(paths, "d", MiB, names=["x.part1.rar", "x.part2.rar"])
    assert [p.file_name for p in m.parts] == ["x.part1.rar", "x.part2.rar"]
    with pytest.raises(ValueError):
        build_multi_manifest(paths, "d", MiB, names=["only-one"])


def test_one_source_is_an_ordinary_version_1_manifest(tmp_path):
    [path] = _files(tmp_path, [3 * MiB + 1], ["one.zip"])
    multi = build_multi_manifest([path], "d", 2 * MiB, rng=random.Random(5))
    single = build_manifest(path, "d", 2 * MiB, rng=random.Random(5))
    assert multi.version == MANIFEST_VERSION
    assert [(p.offset, p.length, p.sha256, p.file_name, p.chunk_hashes) for p in multi.parts] == [
        (p.offset, p.length, p.sha256, p.file_name, p.chunk_hashes) for p in single.parts]
    assert multi.sha256 == single.sha256


def test_multi_manifest_round_trips_on_disk_and_the_reader_returns_the_concatenation(tmp_path):
    paths = _files(tmp_path, [MiB + 3, 17, 2 * MiB])
    m = build_multi_manifest(paths, "d", 4 * MiB)
    target = write_manifest(m, tmp_path / "t.manifest")
    again = read_manifest(target)
    assert again == m
    data = _content(paths)
    with open_source(again) as reader:
        assert reader.size == len(data)
        for offset, length in [(0, 10), (MiB, 10), (MiB + 1, 20), (MiB + 3, 17), (0, len(data)),
                               (len(data) - 5, 100), (len(data), 10), (MiB + 10, 0)]:
            assert reader(offset, length) == data[offset:offset + length]
            assert reader.read(offset, length) == data[offset:offset + length]
        for p in again.parts:  # what the uploader sends, part by part, in 512 KiB calls
            sent = b"".join(reader(p.offset + i * UPLOAD_CHUNK_SIZE,
                                   min(UPLOAD_CHUNK_SIZE, p.length - i * UPLOAD_CHUNK_SIZE))
                            for i in range(p.upload_parts))
            assert hashlib.sha256(sent).hexdigest() == p.sha256


@FS
@given(sizes=st.lists(st.integers(1, 70_000), min_size=1, max_size=6),
       reads=st.lists(st.tuples(st.integers(0, 450_000), st.integers(0, 100_000)), max_size=20))
def test_reader_is_the_concatenation_for_any_reads(tmp_path_factory, sizes, reads):
    tmp = tmp_path_factory.mktemp("r")
    paths = _files(tmp, sizes)
    data = _content(paths)
    with open_sources(paths) as reader:
        for offset, length in reads:
            assert reader(offset, length) == data[offset:offset + length]


@FS
@given(sizes=st.lists(st.integers(1, 3 * UPLOAD_CHUNK_SIZE), min_size=2, max_size=4),
       limit_chunks=st.integers(1, 5))
def test_plan_covers_the_content_in_order_whatever_the_sizes(tmp_path_factory, sizes,
                                                             limit_chunks):
    tmp = tmp_path_factory.mktemp("p")
    paths = _files(tmp, sizes, seed=len(sizes))
    limit = limit_chunks * UPLOAD_CHUNK_SIZE
    m = build_multi_manifest(paths, "d", limit)
    data = _content(paths)
    assert b"".join(data[p.offset:p.end] for p in m.parts) == data
    assert all(p.length <= limit for p in m.parts)
    if all(s <= limit for s in sizes):
        assert [p.length for p in m.parts] == sizes
    _check_hashes(m, data)
    assert unpack_manifest(mf.pack_manifest(m)) == m


def test_a_changed_source_is_refused_by_the_reader(tmp_path):
    paths = _files(tmp_path, [100, 200])
    m = build_multi_manifest(paths, "d", MiB)
    with open(paths[1], "ab") as fh:
        fh.write(b"more")
    with pytest.raises(SourceError, match="differs from the planned 200"):
        open_source(m)
    paths[0].unlink()
    with pytest.raises(SourceError, match="cannot read source"):
        open_source(m)


def test_empty_or_missing_sources_are_refused(tmp_path):
    paths = _files(tmp_path, [100, 0])
    with pytest.raises(SourceError, match="empty"):
        build_multi_manifest(paths, "d", MiB)
    with pytest.raises(SourceError, match="cannot read"):
        build_multi_manifest([tmp_path / "nope"], "d", MiB)
    with pytest.raises(SourceError):
        build_multi_manifest([], "d", MiB)


def test_a_version_1_reader_refuses_a_multi_source_manifest(tmp_path, monkeypatch):
    """An older stashd (supports only version 1) must not upload the first file alone."""
    m = build_multi_manifest(_files(tmp_path, [10, 20]), "d", MiB)
    data = mf.pack_manifest(m)
    assert msgpack.unpackb(data)["version"] == MULTI_SOURCE_VERSION
    monkeypatch.setattr(mf, "SUPPORTED_VERSION", 1)
    with pytest.raises(ManifestVersionError, match="version 2 is newer than supported 1"):
        unpack_manifest(data)


def test_old_single_source_manifests_stay_readable(tmp_path):
    path = tmp_path / "old.bin"
    path.write_bytes(os.urandom(1000))
    m = build_manifest(path, "d", MiB)
    assert m.version == MANIFEST_VERSION == 1
    data = mf.pack_manifest(m)
    assert msgpack.unpackb(data)["version"] == 1
    assert unpack_manifest(data) == m
    with open_source(m) as reader:
        assert reader(0, 2000) == path.read_bytes()
