"""Progress bars of ``stashctl upload --wait``: pure rendering and the polling loop, with a fake clock."""
from __future__ import annotations

import io

import pytest

from actors.admin import progress as pg

MiB = 1 << 20


def snap(tid="t1", state="uploading", done=0, size=100 * MiB, **kw) -> dict:
    t = {"id": tid, "state": state, "source_path": f"/data/{tid}.bin", "size": size,
         "destination": "stash_archive", "account": "alice", "parts_total": 1, "parts_sent": 0,
         "bytes_done": done, "duplicate_of": None, "reason": None, "created_at": 0.0, "updated_at": 0.0}
    t.update(kw)
    return t


class FakeClock:
    def __init__(self, t: float = 1000.0):
        self.t = t
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.t

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.t += seconds


# ---------------------------------------------------------------- rate


def test_rate_needs_two_samples_then_follows_the_deltas():
    r = pg.update_rate(None, 0, 10.0)
    assert r.bytes_per_second is None
    r = pg.update_rate(r, 4 * MiB, 12.0)
    assert r.bytes_per_second == pytest.approx(2 * MiB)
    # a sample at the same instant adds nothing (and divides by nothing)
    assert pg.update_rate(r, 9 * MiB, 12.0) is r


def test_rate_is_smoothed_and_converges():
    r = pg.update_rate(pg.update_rate(None, 0, 0.0), 10 * MiB, 1.0)   # 10 MiB/s
    r = pg.update_rate(r, 10 * MiB + 2 * MiB, 2.0)                   # one poll at 2 MiB/s
    assert 2 * MiB < r.bytes_per_second < 10 * MiB                    # not a jump to 2
    done, t = r.bytes_done, r.at
    for _ in range(200):                                              # a long steady 2 MiB/s
        t += 0.5
        done += MiB
        r = pg.update_rate(r, done, t)
    assert r.bytes_per_second == pytest.approx(2 * MiB, rel=1e-3)


def test_rate_survives_bytes_done_going_down():
    r = pg.update_rate(pg.update_rate(None, 0, 0.0), 8 * MiB, 1.0)
    r2 = pg.update_rate(r, 2 * MiB, 2.0)   # parts sent again after the server dropped them
    assert r2.bytes_per_second == r.bytes_per_second and r2.bytes_done == 2 * MiB
    assert pg.update_rate(r2, 4 * MiB, 3.0).bytes_per_second > 0


# ---------------------------------------------------------------- lines


def test_progress_line_shows_bar_percent_bytes_rate_and_eta():
    rate = pg.Rate(at=0.0, bytes_done=25 * MiB, bytes_per_second=5 * MiB)
    line = pg.progress_line(snap(done=25 * MiB), rate)
    assert "[#####---------------]  25%" in line
    assert "25 MiB/100 MiB" in line and "5 MiB/s" in line and "ETA 15s" in line
    assert line.startswith("t1  uploading") and line.endswith("/data/t1.bin")


def test_progress_line_without_rate_stalled_done_failed_duplicate():
    assert "-  ETA -" in pg.progress_line(snap(done=0), None)
    assert "0 B/s  ETA stalled" in pg.progress_line(snap(done=MiB), pg.Rate(0.0, MiB, 0.0))
    done = pg.progress_line(snap(state="uploaded", done=100 * MiB), None)
    assert "[" + "#" * 20 + "] 100%" in done and "done" in done
    failed = pg.progress_line(snap(state="failed", done=MiB, reason="FILE_PARTS_INVALID"), None)
    assert "failed: FILE_PARTS_INVALID" in failed
    dup = pg.progress_line(snap(state="uploaded", duplicate_of="f" * 32), None)
    assert "duplicate of ffffffffffff" in dup and "100%" in dup


def test_ids_and_paths_are_shortened():
    assert pg.short_id("0123456789abcdef0123456789abcdef") == "0123456789ab"
    assert pg.short_id("t1") == "t1"
    long = "/srv/inbox/" + "x" * 60 + "/movie.mkv"
    short = pg.shorten_left(long, 30)
    assert len(short) == 30 and short.startswith("...") and short.endswith("/movie.mkv")
    assert pg.shorten_left("/a/b", 30) == "/a/b"


# ---------------------------------------------------------------- frames


def test_tty_frames_redraw_in_place():
    view = pg.ProgressView([snap("a"), snap("b")], tty=True, width=60)
    first = view.frame(0.0)
    assert "\x1b[" not in first.replace(pg.CLEAR_LINE, "")  # nothing to move up over yet
    assert first.count("\n") == 2
    view.update(snap("a", done=50 * MiB), 1.0)
    second = view.frame(1.0)
    assert second.startswith("\x1b[2A")                     # back over both lines
    assert second.count(pg.CLEAR_LINE) == 2 and "50%" in second
    assert all(len(line) <= 59 for line in second.replace(pg.CLEAR_LINE, "\n").split("\n"))


def test_plain_frames_on_state_change_and_periodically():
    view = pg.ProgressView([snap("a"), snap("b")], tty=False, plain_every=10.0)
    assert view.frame(0.0).count("\n") == 2             # everything once at the start
    view.update(snap("a", done=10 * MiB), 1.0)
    assert view.frame(1.0) == ""                         # no news: stay quiet
    view.update(snap("b", state="uploaded", done=100 * MiB), 2.0)
    out = view.frame(2.0)
    assert out.count("\n") == 1 and out.startswith("b  uploaded")
    view.update(snap("a", done=20 * MiB), 10.0)
    out = view.frame(10.0)                               # periodic: only the running one
    assert out.count("\n") == 1 and out.startswith("a  uploading") and "20%" in out
    assert "\x1b" not in out


# ---------------------------------------------------------------- polling loop


def test_wait_polls_every_half_second_until_done():
    clock = FakeClock()
    polls: list[tuple[str, dict]] = []
    state = {"a": 0, "b": 0}

    def call(cmd, args):
        polls.append((cmd, args))
        tid = args["id"]
        state[tid] += 40 if tid == "a" else 100
        done = min(state[tid], 100) * MiB
        return snap(tid, state="uploaded" if done == 100 * MiB else "uploading", done=done)

    out = io.StringIO()
    final = pg.wait_for_transfers(call, [snap("a"), snap("b")], out, sleep=clock.sleep, clock=clock)
    assert [t["state"] for t in final] == ["uploaded", "uploaded"]
    assert clock.sleeps == [0.5, 0.5, 0.5]
    # b finished on the first poll and was not asked about again
    assert [a["id"] for _, a in polls] == ["a", "b", "a", "a"]
    assert {c for c, _ in polls} == {"transfer"}
    assert out.getvalue().splitlines()[-1].startswith("a  uploaded")


def test_wait_returns_at_once_when_nothing_is_pending():
    clock = FakeClock()

    def call(cmd, args):
        raise AssertionError("nothing to poll")

    final = pg.wait_for_transfers(call, [snap(state="uploaded", duplicate_of="x")], None,
                                  sleep=clock.sleep, clock=clock)
    assert final[0]["duplicate_of"] == "x" and clock.sleeps == []


def test_wait_stops_on_failure_and_keys_by_the_asked_id():
    clock = FakeClock()
    # the daemon answers without an "id": the loop still knows whose snapshot it is
    final = pg.wait_for_transfers(
        lambda cmd, args: {**snap(state="failed", reason="boom"), "id": None},
        [snap("a")], None, sleep=clock.sleep, clock=clock)
    assert final[0]["state"] == "failed" and final[0]["reason"] == "boom"
