"""Progress bars for ``stashctl upload --wait``.

The daemon reports how many bytes of each transfer Telegram has acknowledged
(``bytes_done``); the rate and ETA are computed here, on the client, from the
differences between polls, smoothed so that one slow or fast poll does not
make the ETA jump.

Everything but :func:`wait_for_transfers` is pure: :func:`update_rate` and
:func:`progress_line` take the time they are given, and :class:`ProgressView`
turns snapshots into the text to write, so tests feed them a fake clock and
made-up snapshots.  :func:`wait_for_transfers` is the polling loop, with the
request function, ``sleep`` and ``clock`` injected.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence, TextIO

DONE_STATES = frozenset({"uploaded", "verifying", "verified", "cleaned"})
"""Telegram holds the file: ``--wait`` is over for this transfer."""
FAILED_STATE = "failed"

POLL_SECONDS = 0.5
PLAIN_EVERY_SECONDS = 10.0
"""Without a terminal, a still-running transfer is reported this often (and on every state change)."""
RATE_TIME_CONSTANT = 5.0
"""Seconds over which the rate average forgets (exponential smoothing)."""
BAR_WIDTH = 20
PATH_WIDTH = 40

CURSOR_UP = "\x1b[{n}A"
CLEAR_LINE = "\r\x1b[2K"


def is_finished(transfer: dict) -> bool:
    return transfer.get("state") in DONE_STATES or transfer.get("state") == FAILED_STATE


def short_id(transfer_id: Any) -> str:
    """The first 12 characters of a long id (a uuid hex): enough to tell transfers apart."""
    text = "-" if transfer_id is None else str(transfer_id)
    return text if len(text) <= 16 else text[:12]


def shorten_left(path: Any, width: int = PATH_WIDTH) -> str:
    """``.../dir/file.bin``: the end of a path says more than its start."""
    text = "-" if path is None else str(path)
    if len(text) <= width:
        return text
    return "..." + text[len(text) - (width - 3):] if width > 3 else text[-width:]


# ---------------------------------------------------------------- units


def human_bytes(n: Any) -> str | None:
    """Sizes as Telegram states its limits: MiB up to 64 GiB (2000 MiB, not "2 GiB")."""
    if not isinstance(n, (int, float)) or isinstance(n, bool):
        return None
    for unit, size in (("GiB", 64 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(n) >= size:
            div = 1 << 30 if unit == "GiB" else size
            value = n / div
            return f"{value:.0f} {unit}" if value == int(value) else f"{value:.1f} {unit}"
    return f"{n:.0f} B"


def human_duration(seconds: Any) -> str | None:
    if not isinstance(seconds, (int, float)) or isinstance(seconds, bool):
        return None
    s = max(0, int(seconds))
    d, s = divmod(s, 86400)
    h, s = divmod(s, 3600)
    m, s = divmod(s, 60)
    if d:
        return f"{d}d{h:02d}h{m:02d}m"
    if h:
        return f"{h}h{m:02d}m{s:02d}s"
    if m:
        return f"{m}m{s:02d}s"
    return f"{s}s"


# ---------------------------------------------------------------- rate


@dataclass(frozen=True)
class Rate:
    """The last sample of one transfer and the smoothed rate so far (None until two samples)."""

    at: float
    bytes_done: int
    bytes_per_second: float | None = None


def update_rate(prev: Rate | None, bytes_done: int, now: float, *,
                time_constant: float = RATE_TIME_CONSTANT) -> Rate:
    """Fold a new ``bytes_done`` sample taken at ``now`` into the average.

    Exponential smoothing weighted by the time between samples, so irregular
    polls count for what they cover.  A sample at the same instant is ignored;
    ``bytes_done`` going down (parts the server dropped are sent again) starts
    counting afresh from there but keeps the rate.
    """
    if prev is None:
        return Rate(now, bytes_done, None)
    dt = now - prev.at
    if dt <= 0:
        return prev
    if bytes_done < prev.bytes_done:
        return Rate(now, bytes_done, prev.bytes_per_second)
    instant = (bytes_done - prev.bytes_done) / dt
    if prev.bytes_per_second is None:
        return Rate(now, bytes_done, instant)
    weight = 1.0 - math.exp(-dt / time_constant)
    return Rate(now, bytes_done, prev.bytes_per_second + weight * (instant - prev.bytes_per_second))


def eta_seconds(transfer: dict, rate: Rate | None) -> float | None:
    size, done = transfer.get("size"), transfer.get("bytes_done")
    if not isinstance(size, int) or not isinstance(done, int):
        return None
    if done >= size:
        return 0.0
    if rate is None or not rate.bytes_per_second or rate.bytes_per_second <= 0:
        return None
    return (size - done) / rate.bytes_per_second


# ---------------------------------------------------------------- rendering


def fraction_done(transfer: dict) -> float:
    size, done = transfer.get("size"), transfer.get("bytes_done")
    if transfer.get("state") in DONE_STATES:
        return 1.0
    if not isinstance(size, int) or not isinstance(done, int) or size <= 0:
        return 0.0
    return min(1.0, max(0.0, done / size))


def bar(fraction: float, width: int = BAR_WIDTH) -> str:
    filled = int(fraction * width + 1e-9)
    return "[" + "#" * filled + "-" * (width - filled) + "]"


def progress_line(transfer: dict, rate: Rate | None, *, path_width: int = PATH_WIDTH) -> str:
    """One transfer: ``id  state  [####----]  42%  420 MiB/1000 MiB  12 MiB/s  ETA 47s  path``."""
    state = str(transfer.get("state") or "-")
    frac = fraction_done(transfer)
    done = human_bytes(transfer.get("bytes_done")) or "-"
    size = human_bytes(transfer.get("size")) or "-"
    head = f"{short_id(transfer.get('id'))}  {state:<9}  {bar(frac)} {frac * 100:3.0f}%  {done}/{size}"
    path = shorten_left(transfer.get("source_path"), path_width)
    if transfer.get("duplicate_of"):
        return f"{head}  duplicate of {short_id(transfer['duplicate_of'])}  {path}"
    if state == FAILED_STATE:
        return f"{head}  failed: {transfer.get('reason') or 'no reason given'}  {path}"
    if state in DONE_STATES:
        return f"{head}  done  {path}"
    speed = rate.bytes_per_second if rate is not None else None
    speed_text = "-" if speed is None else f"{human_bytes(speed)}/s"
    eta = eta_seconds(transfer, rate)
    eta_text = ("stalled" if speed == 0 else "-") if eta is None else human_duration(math.ceil(eta))
    return f"{head}  {speed_text}  ETA {eta_text}  {path}"


class ProgressView:
    """Latest snapshot and rate per transfer, and the text that shows them.

    On a terminal each :meth:`frame` redraws every line in place (cursor up,
    clear line); otherwise it writes plain lines: a transfer whose state
    changed at once, every running one each ``plain_every`` seconds.
    """

    def __init__(self, transfers: Sequence[dict], *, tty: bool, width: int | None = None,
                 plain_every: float = PLAIN_EVERY_SECONDS):
        self.tty = tty
        self.width = width
        self.plain_every = plain_every
        self.order = [t.get("id") for t in transfers]
        self.latest: dict[Any, dict] = {t.get("id"): t for t in transfers}
        self.rates: dict[Any, Rate] = {}
        self._drawn = 0                        # lines on screen to redraw (tty)
        self._shown_state: dict[Any, str] = {}  # state last written (plain)
        self._plain_at: float | None = None

    def update(self, transfer: dict, now: float, tid: Any = None) -> None:
        """Record a snapshot (of transfer ``tid``, by default its own ``id``) taken at ``now``."""
        tid = transfer.get("id") if tid is None else tid
        self.latest[tid] = transfer
        done = transfer.get("bytes_done")
        if isinstance(done, int):
            self.rates[tid] = update_rate(self.rates.get(tid), done, now)

    def pending(self) -> list[Any]:
        return [tid for tid in self.order if not is_finished(self.latest[tid])]

    def transfers(self) -> list[dict]:
        return [self.latest[tid] for tid in self.order]

    def line(self, tid: Any) -> str:
        text = progress_line(self.latest[tid], self.rates.get(tid))
        if self.tty and self.width:
            text = text[: max(1, self.width - 1)]  # a wrapped line would break cursor-up
        return text

    def frame(self, now: float) -> str:
        if self.tty:
            up = CURSOR_UP.format(n=self._drawn) if self._drawn else ""
            self._drawn = len(self.order)
            return up + "".join(CLEAR_LINE + self.line(tid) + "\n" for tid in self.order)
        periodic = self._plain_at is None or now - self._plain_at >= self.plain_every
        if periodic:
            self._plain_at = now
        lines = []
        for tid in self.order:
            state = self.latest[tid].get("state")
            changed = self._shown_state.get(tid, object()) != state
            if changed or (periodic and not is_finished(self.latest[tid])):
                lines.append(self.line(tid))
                self._shown_state[tid] = state
        return "".join(line + "\n" for line in lines)


# ---------------------------------------------------------------- polling


def wait_for_transfers(
    call: Callable[[str, dict], Any],
    transfers: Sequence[dict],
    out: TextIO | None,
    *,
    tty: bool = False,
    width: int | None = None,
    interval: float = POLL_SECONDS,
    plain_every: float = PLAIN_EVERY_SECONDS,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> list[dict]:
    """Poll ``call("transfer", {"id": ...})`` for every unfinished transfer
    each ``interval`` seconds until each one is done or failed; write progress
    to ``out`` (None: silent).  Returns the last snapshot of each, in order.

    Errors from ``call`` and KeyboardInterrupt propagate; nothing is cancelled.
    """
    view = ProgressView(transfers, tty=tty, width=width, plain_every=plain_every)
    now = clock()
    for t in transfers:
        view.update(t, now)

    def draw(at: float) -> None:
        if out is not None:
            out.write(view.frame(at))
            out.flush()

    draw(now)
    next_poll = now + interval
    while view.pending():
        sleep(max(0.0, next_poll - clock()))
        next_poll = clock() + interval
        for tid in view.pending():
            snapshot = call("transfer", {"id": tid})
            if isinstance(snapshot, dict):
                view.update(snapshot, clock(), tid)
        draw(clock())
    return view.transfers()
