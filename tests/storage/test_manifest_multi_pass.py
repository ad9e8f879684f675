"""The hashing pass over several sources laid end to end (build_multi_manifest):
the two-thread pass gives what hashing the concatenation piece by piece gives,
and a source that is missing, shrinks or changes while it is read is refused
with no hashing thread left behind."""
from __future__ import annotations

import errno
import hashlib
import os
import random
import threading

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from storage import manifest as mf
from storage.manifest import (
    HASH_BLOCK_SIZE, MANIFEST_VERSION, MULTI_SOURCE_VERSION, UPLOAD_CHUNK_SIZE, SourceError,
    build_multi_manifest, plan_sources, plan_split,
)

KiB, MiB = 1024, 1024 * 1024
FS = settings(max_examples=25, deadline=None,
              suppress_health_check=[HealthCheck.function_scoped_fixture])


def _files(tmp_path, sizes, seed=1):
    rng = random.Random(seed)
    paths = []
    for i, size in enumerate(sizes):
        path = tmp_path / f"set.z{i + 1:02d}"
        path.write_bytes(rng.randbytes(size))
        paths.append(path)
    return paths


def _hash_threads():
    return [t for t in threading.enumerate() if t.name == "manifest-hash"]


def _reference(paths, limit):
    """The manifest's hash fields, single-threaded from the concatenation in memory."""
    contents = [p.read_bytes() for p in paths]
    data = b"".join(contents)
    spans = plan_sources([len(c) for c in contents], limit) or plan_split(len(data), limit)
    return {
        "sha256": hashlib.sha256(data).hexdigest(),
        "total_size": len(data),
        "sources": [(str(p.resolve()), len(c), hashlib.sha256(c).hexdigest())
                    for p, c in zip(paths, contents)],
        "parts": [(offset, length, hashlib.sha256(data[offset:offset + length]).hexdigest(),
                   tuple(hashlib.sha256(data[o:min(o + HASH_BLOCK_SIZE, offset + length)]).digest()
                         for o in range(offset, offset + length, HASH_BLOCK_SIZE)))
                  for offset, length in spans],
    }


def _hash_fields(m):
    return {
        "sha256": m.sha256,
        "total_size": m.total_size,
        "sources": [(s.path, s.size, s.sha256) for s in m.sources],
        "parts": [(p.offset, p.length, p.sha256, p.chunk_hashes) for p in m.parts],
    }


SHAPES = {
    # parts cross file boundaries; source 1 begins inside part 0
    "parts across files": ([3 * MiB + 100, 2 * MiB + 7, 5 * MiB - 3], 5 * UPLOAD_CHUNK_SIZE),
    "source 1 inside part 0": ([MiB + 3, 9 * MiB], 4 * MiB),
    # a one-part set: one source that fits
    "one part": ([5 * MiB + 1], 2**31),
    "one source, several parts": ([7 * MiB + 11], 2 * MiB),
    # every file fits: one document per file, source hashes are part hashes
    "uneven files that fit": ([1, 7 * MiB + 3, 17, 2 * MiB], 8 * MiB),
    "uneven files re-split": ([1, 7 * MiB + 3, 17, 2 * MiB], 3 * UPLOAD_CHUNK_SIZE),
    "several files in one block": ([10, 20, 30, 5 * MiB, 40], MiB),
    # file boundaries exactly on block and part boundaries
    "files are the parts, on block bounds": ([2 * MiB, 2 * MiB, MiB + 5], 2 * MiB),
    "file bound on a block bound in a part": ([3 * MiB, 3 * MiB], 2 * MiB),
    "file bound on a part bound": ([4 * MiB, 3 * MiB + 1], 2 * MiB),
    "half-block parts, file bound mid-block": ([UPLOAD_CHUNK_SIZE + 1, 3 * MiB], UPLOAD_CHUNK_SIZE),
}


@pytest.mark.parametrize("sizes,limit", list(SHAPES.values()), ids=list(SHAPES))
def test_multi_source_hashes_are_those_of_the_concatenation(tmp_path, sizes, limit):
    paths = _files(tmp_path, sizes, seed=len(sizes))
    m = build_multi_manifest(paths, "d", limit, rng=random.Random(9), clock=lambda: 5.0)
    assert _hash_fields(m) == _reference(paths, limit)
    assert m.version == (MANIFEST_VERSION if len(paths) == 1 else MULTI_SOURCE_VERSION)
    assert _hash_threads() == []


@FS
@given(sizes=st.lists(st.integers(1, 3 * MiB), min_size=1, max_size=4),
       limit_chunks=st.integers(1, 7), seed=st.integers(0, 2**16))
def test_multi_source_hashes_are_those_of_the_concatenation_whatever_the_sizes(
        tmp_path_factory, sizes, limit_chunks, seed):
    paths = _files(tmp_path_factory.mktemp("h"), sizes, seed=seed)
    limit = limit_chunks * UPLOAD_CHUNK_SIZE
    assert _hash_fields(build_multi_manifest(paths, "d", limit)) == _reference(paths, limit)


def test_the_rest_of_the_manifest_depends_only_on_the_inputs(tmp_path):
    paths = _files(tmp_path, [3 * MiB + 100, 2 * MiB + 7], seed=3)
    a, b = (build_multi_manifest(paths, "d", 2 * MiB, caption="c", rng=random.Random(2),
                                 clock=lambda: 5.0) for _ in range(2))
    assert mf.pack_manifest(a) == mf.pack_manifest(b)


# ---------------------------------------------------------------- sources that change


@pytest.mark.parametrize("victim", [0, 1, 2])
@pytest.mark.parametrize("limit", [2**31, 2 * MiB])
def test_a_source_that_shrinks_after_it_was_planned_is_named(tmp_path, monkeypatch, victim, limit):
    paths = _files(tmp_path, [5 * MiB + 1, 4 * MiB, 3 * MiB + 7])
    real_plan = mf.plan_sources

    def plan_then_truncate(sizes, limit_bytes):
        with open(paths[victim], "r+b") as fh:
            fh.truncate(MiB + 3)
        return real_plan(sizes, limit_bytes)

    monkeypatch.setattr(mf, "plan_sources", plan_then_truncate)
    with pytest.raises(SourceError, match=f"{paths[victim].name}: file shrank while it was read"):
        build_multi_manifest(paths, "d", limit)
    assert _hash_threads() == []


@pytest.mark.parametrize("grow", [True, False])
def test_a_source_written_to_while_it_is_read_is_refused(tmp_path, monkeypatch, grow):
    """Appended bytes are not read (each source is read to its planned size) and
    bytes rewritten in place keep the size: the mtime check after the pass sees both."""
    paths = _files(tmp_path, [3 * MiB, 2 * MiB, MiB])
    real_fill, written = mf._Concatenation.fill, []

    def fill(self, view):
        if not written and not isinstance(threading.current_thread(), mf._TailHasher):
            with open(paths[1], "ab" if grow else "r+b") as fh:
                fh.write(b"x" * 10)
            stat = paths[1].stat()
            os.utime(paths[1], ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
            written.append(True)
        return real_fill(self, view)

    monkeypatch.setattr(mf._Concatenation, "fill", fill)
    with pytest.raises(SourceError, match=f"{paths[1].name}: file changed while it was read"):
        build_multi_manifest(paths, "d", 2 * MiB)
    assert written and _hash_threads() == []


def test_a_source_removed_after_it_was_planned_is_named(tmp_path, monkeypatch):
    paths = _files(tmp_path, [MiB, MiB, MiB])
    real_plan = mf.plan_sources

    def plan_then_remove(sizes, limit_bytes):
        paths[1].unlink()
        return real_plan(sizes, limit_bytes)

    monkeypatch.setattr(mf, "plan_sources", plan_then_remove)
    with pytest.raises(SourceError, match=f"{paths[1].name}: cannot read source: No such file"):
        build_multi_manifest(paths, "d", 2 * MiB)
    assert _hash_threads() == []


def test_a_source_replaced_between_the_two_opens_is_refused(tmp_path, monkeypatch):
    paths = _files(tmp_path, [MiB, MiB])
    (tmp_path / "other").mkdir()
    [other] = _files(tmp_path / "other", [MiB], seed=5)
    opened = []

    def open_(file, *args, **kw):
        opened.append(file)
        return open(other if len(opened) == 4 else file, *args, **kw)

    monkeypatch.setattr(mf, "open", open_, raising=False)
    with pytest.raises(SourceError, match=f"{paths[1].name}: file changed while it was read"):
        build_multi_manifest(paths, "d", 2 * MiB)
    assert opened == [paths[0], paths[0], paths[1], paths[1]]
    assert _hash_threads() == []


def test_a_failure_in_the_other_thread_stops_this_one_at_the_next_block(tmp_path, monkeypatch):
    paths = _files(tmp_path, [4 * MiB, 4 * MiB])
    real_fill, head_reads, head_reading = mf._Concatenation.fill, [], threading.Event()

    def broken(self):
        assert head_reading.wait(10)
        raise OSError(errno.EIO, "Input/output error")

    def fill(self, view):
        head_reads.append(len(view))
        tails = [t for t in threading.enumerate() if isinstance(t, mf._TailHasher)]
        head_reading.set()
        for tail in tails:
            tail.join(10)            # it has failed by now
        return real_fill(self, view)

    monkeypatch.setattr(mf._TailHasher, "_hash", broken)
    monkeypatch.setattr(mf._Concatenation, "fill", fill)
    with pytest.raises(SourceError, match="cannot read source: Input/output error"):
        build_multi_manifest(paths, "d", 2**31)
    assert head_reads == [HASH_BLOCK_SIZE]   # 8 if it read on to the end
    assert _hash_threads() == []
