"""The manifest's hashing pass (two threads, each reading what it hashes): errors
in either thread, a file that shrinks or is replaced while it is read."""
from __future__ import annotations

import errno
import threading

import pytest

from storage import manifest as mf
from storage.manifest import HASH_BLOCK_SIZE, SourceError, build_manifest

MiB = 1024 * 1024


def _file(tmp_path, size, name="big.bin"):
    path = tmp_path / name
    path.write_bytes(bytes(range(256)) * (size // 256))
    return path


def _hash_threads():
    return [t for t in threading.enumerate() if t.name == "manifest-hash"]


@pytest.mark.parametrize("limit", [2**31, 3 * MiB])
def test_a_file_that_shrinks_after_it_was_planned_is_a_source_error(tmp_path, monkeypatch, limit):
    path = _file(tmp_path, 8 * MiB)
    real_plan = mf.plan_split

    def plan_then_truncate(size, limit_bytes):
        spans = real_plan(size, limit_bytes)
        with open(path, "r+b") as fh:
            fh.truncate(5 * MiB + 3)
        return spans

    monkeypatch.setattr(mf, "plan_split", plan_then_truncate)
    with pytest.raises(SourceError, match="shrank while it was read"):
        build_manifest(path, "d", limit)
    assert _hash_threads() == []


def test_a_failure_in_the_other_thread_reaches_the_caller(tmp_path, monkeypatch):
    def broken(self):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(mf._TailHasher, "_hash", broken)
    with pytest.raises(SourceError, match="cannot read source: Input/output error"):
        build_manifest(_file(tmp_path, 3 * MiB), "d", 2**31)
    assert _hash_threads() == []


def test_a_failure_in_this_thread_stops_the_other_before_it_reads_on(tmp_path, monkeypatch):
    path = _file(tmp_path, 16 * MiB)
    real_fill, tail_reads, tail_reading = mf._Concatenation.fill, [], threading.Event()

    def fill(self, view):
        me = threading.current_thread()
        if isinstance(me, mf._TailHasher):
            tail_reads.append(len(view))
            if len(tail_reads) == 1:
                tail_reading.set()
                me.stop.wait(10)    # released once the caller's thread has failed
            return real_fill(self, view)
        assert tail_reading.wait(10)
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(mf._Concatenation, "fill", fill)
    with pytest.raises(SourceError, match="Input/output error"):
        build_manifest(path, "d", 2**31)
    assert tail_reads == [HASH_BLOCK_SIZE]   # 16 without the stop
    assert _hash_threads() == []


def test_a_file_replaced_between_the_two_opens_is_refused(tmp_path, monkeypatch):
    path, other = _file(tmp_path, MiB), _file(tmp_path, MiB, "other.bin")
    opened = []

    def open_(file, *args, **kw):
        opened.append(file)
        return open(other if len(opened) == 2 else file, *args, **kw)

    monkeypatch.setattr(mf, "open", open_, raising=False)
    with pytest.raises(SourceError, match="changed while it was read"):
        build_manifest(path, "d", 2**31)
    assert opened == [path, path]
