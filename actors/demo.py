"""``stashd demo``: a whole stashd on SQLite against the simulated Telegram, in one command.

    stashd demo --dir DIR [--keep-running]

Writes ``DIR/stashd.toml`` (simulated mode, everything under DIR), starts the
simulated Telegram server (``stashd sim serve --dir DIR/sim``) as a subprocess,
seeds it (sessions into ``DIR/sessions``; seeding is idempotent, so a second
demo on the same DIR reuses the world), runs the daemon in-process, waits
until every account is ready, runs the demo steps (:data:`DEMO_STEPS`), prints a
summary and stops everything (exit 0; 1 when an account or a step failed).
With ``--keep-running`` it stays up like ``stashd run`` until SIGTERM/SIGINT.

Steps.  Each is ``step(daemon, demo_dir) -> DemoSection`` (a title, the lines
printed under it, ``ok``), run in order after the accounts are ready; its
section is printed after the accounts.  To add one (verification, ingest...),
write the function here and append it to :data:`DEMO_STEPS`.

- :func:`upload_step`: writes a few sample files under ``DIR/files`` (an upload
  root; the same bytes every time, so a second demo on the same DIR shows them
  completed by reference), one of them larger than the demo's split size
  (:data:`DEMO_SPLIT_BYTES`, a lowered account limit so the demo stays small),
  queues them like ``stashctl upload``, waits until each transfer is uploaded
  and lists what landed where: file -> account, documents, message ids, channel.

- :func:`ingest_step`: the daemon ingests the seeded source channels (Source A
  and B each read by two accounts, the forum's topics by one; see
  :data:`DEMO_INGEST_TOML`), and the summary lists each ingested archive with
  its index, the skipped messages by reason, the sets still waiting for parts
  and how many archives are verified.

- :func:`verify_step` (last): every transfer is checked when due (asked at once,
  like ``stashctl verify ID``) and cleaned after the demo's short grace period
  (:data:`DEMO_VERIFY_TOML`); the summary says per transfer what was verified
  and what the cleanup removed (the manifest) or kept (originals, per policy).

Metrics: the config says port 9464; when that port is taken at the moment
the daemon binds it (another demo, a test suite), the demo's daemon serves on
a free port instead (``Daemon(metrics_port_fallback=True)``, no check-then-bind
race) and the summary prints the URL actually served.

``stashd run --config DIR/stashd.toml`` runs the same daemon again on the same
state: in simulated mode it starts the sim server itself when none answers
(see :func:`ensure_sim_server`).
"""
from __future__ import annotations

import os
import random
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, TextIO

from loguru import logger

DEMO_METRICS_PORT = 9464   # preferred; when taken the daemon binds a free one (printed)
READY_TIMEOUT = 60.0
SIM_START_TIMEOUT = 30.0
UPLOAD_TIMEOUT = 60.0
DEMO_SPLIT_BYTES = 1024 * 1024   # the demo's lowered account limit: larger files are split
DEMO_TICK_SECONDS = 0.1
MIB = 1024 * 1024
# (name, size, seed): the demo's sample files; the last one is over DEMO_SPLIT_BYTES
SAMPLE_FILES = (("notes.txt", 3 * 1024, 1), ("photos/holiday.jpg", 300 * 1024, 2),
                ("backup.tar", 2 * MIB + MIB // 2, 3))

log = logger.bind(actor="demo")


# ------------------------------------------------------------------ sim server subprocess


class SimServerProcess:
    """``stashd sim serve --dir DIR`` as a child process, stopped with SIGTERM."""

    def __init__(self, state_dir: Path, socket_path: Path):
        self.state_dir = Path(state_dir)
        self.socket_path = Path(socket_path)
        self.proc: subprocess.Popen | None = None
        self.log_path = self.state_dir / "server.log"

    def start(self, timeout: float = SIM_START_TIMEOUT) -> "SimServerProcess":
        self.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        project_root = str(Path(__file__).resolve().parent.parent)
        env = dict(os.environ)
        env["PYTHONPATH"] = project_root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        env.pop("NOTIFY_SOCKET", None)  # the server is not the notifying service
        cmd = [sys.executable, "-c",
               "import sys; from actors.telegram.sim.cli import main; sys.exit(main(sys.argv[1:]))",
               "serve", "--dir", str(self.state_dir), "--socket", str(self.socket_path)]
        with open(self.log_path, "ab") as logf:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=logf, stderr=logf,
                                         env=env, start_new_session=True)
        log.info("started the simulated Telegram server (pid {}) on {}", self.proc.pid, self.socket_path)
        deadline = time.monotonic() + timeout
        while not sim_answers(self.socket_path):
            if self.proc.poll() is not None:
                raise RuntimeError(f"sim server exited with {self.proc.returncode}; see {self.log_path}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"sim server did not answer on {self.socket_path} within {timeout:g}s")
            time.sleep(0.05)  # bounded polling of the socket condition
        return self

    def stop(self, timeout: float = 10.0) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            log.warning("sim server did not stop within {}s; killing it", timeout)
            proc.kill()
            proc.wait(5)
        log.info("stopped the simulated Telegram server")


def sim_answers(socket_path: Path) -> bool:
    """True when a simulated Telegram server answers a ping on ``socket_path``."""
    if not Path(socket_path).exists():
        return False
    try:
        from actors.telegram.sim.remote import SimControl
        return SimControl(socket_path, timeout=5).is_running()
    except ImportError:  # pragma: no cover
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            try:
                s.connect(str(socket_path))
                return True
            except OSError:
                return False


def ensure_sim_server(settings) -> SimServerProcess | None:
    """In simulated mode, start a sim server when none answers on telegram.sim_socket.

    Its state dir is the socket's parent (the demo's layout: DIR/sim/sim.sock).
    Returns the process to stop later, or None when one was already running
    (or the mode is "real").
    """
    tg = settings.telegram
    if tg.mode != "simulated" or tg.sim_socket is None:
        return None
    sock = Path(tg.sim_socket)
    if sim_answers(sock):
        return None
    return SimServerProcess(sock.parent, sock).start()


# ------------------------------------------------------------------ config


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def port_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
            return True
        except OSError:
            return False


def demo_config_text(demo_dir: Path, metrics_port: int) -> str:
    d = demo_dir.resolve()
    return f"""\
# Written by `stashd demo --dir {d}`: a simulated Telegram, SQLite, everything in this directory.
# Run the same daemon again with: stashd run --config {d / 'stashd.toml'}
# (it starts the simulated Telegram server itself when none answers on telegram.sim_socket).

[daemon]
state_dir = "{d}"
sessions_dir = "sessions"
log_level = "INFO"

[database]
url = "sqlite:///{d / 'stashd.db'}"

[telegram]
mode = "simulated"
sim_socket = "sim/sim.sock"

[admin]
socket = "stashd.sock"

[metrics]
enabled = true
host = "127.0.0.1"
port = {metrics_port}

[supervisor]
max_restarts = 5
restart_window_seconds = 60
stop_timeout_seconds = 10

[upload]
roots = ["{d / 'files'}"]
destination = "stash_archive"
uploaders = 2
""" + DEMO_INGEST_TOML + DEMO_VERIFY_TOML


# ------------------------------------------------------------------ the demo


def wait_until_ready(daemon, timeout: float = READY_TIMEOUT) -> dict[str, dict]:
    """Ask every account for its info until each is ready (or in error); bounded by ``timeout``."""
    deadline = time.monotonic() + timeout
    infos: dict[str, dict] = {}
    while True:
        infos = {name: daemon.account_info(name, timeout=10) for name in daemon.account_names()}
        if all(i.get("state") in ("ready", "paused", "error") for i in infos.values()):
            return infos
        if time.monotonic() > deadline:
            return infos
        time.sleep(0.1)  # bounded polling of the accounts' state


def visible_channels(daemon, name: str) -> list[str]:
    """Channels the account can see (asks it; falls back to what storage recorded)."""
    ref = daemon.account_ref(name)
    if ref is not None:
        try:
            from actors.account_messages import GetDialogs
            result = ref.ask(GetDialogs(), timeout=30)
            return [_channel_label(c.title, c.username, c.is_forum, getattr(c, "is_admin", False))
                    for c in result.channels]
        except Exception as exc:
            log.warning("dialogs of {} failed: {}", name, exc)
    if daemon.storage is not None:
        return [_channel_label(c.title, c.username, c.is_forum, False)
                for c in daemon.storage.list_channels() if name in c.seen_by]
    return []


def _channel_label(title: str, username: str | None, forum: bool, admin: bool) -> str:
    label = title + (f" (@{username})" if username else "")
    if forum:
        label += " [forum]"
    if admin:
        label += " [admin]"
    return label


def _mib(n: int | None) -> str:
    return "?" if not n else f"{n / (1024 * 1024):,.0f} MiB"


@dataclass
class DemoSection:
    """What one demo step prints: a title line and the lines under it."""

    title: str
    lines: list[str] = field(default_factory=list)
    ok: bool = True


def write_samples(files_dir: Path) -> list[Path]:
    """The sample files (same bytes on every run; existing ones are kept)."""
    paths = []
    for name, size, seed in SAMPLE_FILES:
        path = files_dir / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.exists() or path.stat().st_size != size:
            data = random.Random(seed).randbytes(size)
            if name.endswith(".txt"):
                data = bytes(65 + b % 26 if i % 64 != 63 else 10 for i, b in enumerate(data))
            path.write_bytes(data)
        paths.append(path)
    return paths


FINISHED = ("uploaded", "verifying", "verified", "cleaned", "failed")


def wait_for_transfers(daemon, ids: list[str], timeout: float = UPLOAD_TIMEOUT) -> dict[str, dict]:
    """The transfer views once each is uploaded (or failed), or as they are at ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        views = {tid: daemon.dispatch("transfer", {"id": tid}) for tid in ids}
        if all(v["state"] in FINISHED for v in views.values()) or time.monotonic() > deadline:
            return views
        time.sleep(0.1)  # bounded polling of the transfers' state


def _size(n: int) -> str:
    if n >= MIB:
        return f"{n / MIB:.1f}".removesuffix(".0") + " MiB"
    return f"{n / 1024:.0f} KiB" if n >= 1024 else f"{n} B"


def _channel_name(daemon, destination: str) -> str:
    for c in daemon.storage.list_channels():
        if c.username == destination.lstrip("@") or str(c.channel_id) == destination:
            return _channel_label(c.title, c.username, False, False)
    return destination


def upload_step(daemon, demo_dir: Path) -> DemoSection:
    """Upload the sample files and tell what landed where (see module doc)."""
    files_dir = demo_dir / "files"
    paths = write_samples(files_dir)
    reply = daemon.dispatch("upload", {"paths": [str(p) for p in paths]})
    ids = [t["id"] for t in reply["transfers"]]
    views = wait_for_transfers(daemon, ids)
    section = DemoSection(f"Uploads from {files_dir} (split at {_size(DEMO_SPLIT_BYTES)} for the demo, "
                          f"instead of the account limits above):")
    width = max(len(str(p.relative_to(files_dir))) for p in paths)
    for path, tid in zip(paths, ids):
        v = views[tid]
        name = str(path.relative_to(files_dir)).ljust(width)
        head = f"  {name}  {_size(v['size']):>9}  "
        if v["state"] not in FINISHED or v["state"] == "failed":
            section.ok = False
            section.lines.append(head + f"NOT uploaded: {v['state']}"
                                 + (f" ({v['reason']})" if v.get("reason") else ""))
            continue
        shown = v
        if v.get("duplicate_of"):
            shown = daemon.dispatch("transfer", {"id": v["duplicate_of"]})
        parts = shown.get("parts", [])
        accounts = ", ".join(sorted({p["account"] for p in parts if p.get("account")})) or "?"
        docs = ", ".join(f"{p['file_name']} (message {p['message_id']})" for p in parts)
        where = _channel_name(daemon, shown["destination"])
        if v.get("duplicate_of"):
            section.lines.append(head + f"stored already (same content as transfer "
                                        f"{v['duplicate_of'][:8]}): nothing uploaded; it is {docs} in {where}")
        else:
            plural = "1 document" if len(parts) == 1 else f"{len(parts)} documents"
            section.lines.append(head + f"-> {accounts}: {plural} in {where}: {docs}")
    return section


# -- ingest (issue 5): the seeded source channels into @stash_archive ----------------------

INGEST_TIMEOUT = 90.0
# Source A and B are each read by two accounts (each archive is still uploaded once).
DEMO_INGEST_TOML = """
[ingest]
scan_interval_seconds = 600
scan_jitter_seconds = 0.5
mappings = [
  {account = "alice", channel = "sim_source_a"},
  {account = "bob", channel = "sim_source_a"},
  {account = "bob", channel = "sim_source_b"},
  {account = "carol", channel = "sim_source_b"},
  {account = "carol", channel = "sim_forum", topics = ["Games", "Software"], creator = "Sim Forum", tags = ["forum"]},
]

# Named so the mappings are valid before the first seeding writes the session files.
[[accounts]]
session = "alice"
[[accounts]]
session = "bob"
[[accounts]]
session = "carol"
"""
_ACTIVE_SETS = ("ready", "downloading", "uploading")
_VERIFIED = ("verified", "cleaned")


def _ingest_settled(store, labels: set[str], since: float) -> bool:
    """Every mapping scanned since ``since``, no set in flight, every package indexed."""
    runs = [r for r in store.list_runs(limit=200) if r.started_at >= since]
    if any(r.state == "running" for r in runs) or not labels <= {r.mapping for r in runs}:
        return False
    sets = store.archive_sets_by_state()
    return not any(sets.get(state) for state in _ACTIVE_SETS) and not store.index_states().get("pending")


def ingest_step(daemon, demo_dir: Path) -> DemoSection:
    """Scan the seeded source channels now, wait until what they hold is ingested,
    and tell what became of each archive: ingested (with its index), skipped and
    why, waiting (an incomplete set), verified so far."""
    from actors.ingest.actor import mapping_label

    store, settings = daemon.storage, daemon.settings
    mappings = settings.ingest.mappings
    section = DemoSection(f"Ingest from the source channels ({len(mappings)} mappings, "
                          f"{len({m.account for m in mappings})} accounts):")
    since = time.time() - 1.0
    daemon.dispatch("scan", {})
    labels = {mapping_label(m) for m in mappings}
    deadline = time.monotonic() + INGEST_TIMEOUT
    while not _ingest_settled(store, labels, since) and time.monotonic() < deadline:
        time.sleep(0.2)  # bounded polling of the ingest's progress in storage
    sets = store.list_archive_sets(limit=1000)
    ingested = [x for x in sets if x.state == "ingested"]
    delay = settings.verify.first_check_delay_seconds
    if settings.verify.enabled and delay <= 10:   # a demo-sized delay: wait for the checks
        until = time.monotonic() + delay + 30.0
        while time.monotonic() < until and not all(
                (t := store.get_transfer(x.transfer_id)) is not None and t.state in _VERIFIED
                for x in ingested):
            time.sleep(0.2)  # bounded polling of the verifier's results
    verified = sum(1 for x in ingested if (t := store.get_transfer(x.transfer_id)) is not None
                   and t.state in _VERIFIED)
    width = max((len(x.base_name) + len(x.archive_format) + 1 for x in sets), default=10)
    for x in sorted(ingested, key=lambda r: (r.channel_id, r.topic_id or 0, r.created_at)):
        meta = store.get_package_meta(x.sha256) if x.sha256 else None
        index = "index pending"
        if meta is not None and meta.index_state != "pending":
            count = meta.entry_count
            index = (f"{count} {'entry' if count == 1 else 'entries'}" if meta.index_state == "ok"
                     else f"{meta.index_state}: {meta.index_reason}")
            if meta.preview_name:
                index += f", preview {meta.preview_name}"
        parts = "1 part" if x.seen_parts == 1 else f"{x.seen_parts} parts"
        name = f"{x.base_name}.{x.archive_format}".ljust(width)
        section.lines.append(f"  {name}  {_size(x.total_size):>9}  {x.scheme:<8} {parts:<8} {index}")
    total = sum(x.total_size for x in ingested)
    section.lines.append(f"  ingested {len(ingested)} archive(s), {_size(total)}, each uploaded once "
                         f"into {_channel_name(daemon, settings.upload.destination)}")
    skipped = store.skips_by_reason()
    reasons = ", ".join(f"{reason} {n}" for reason, n in sorted(skipped.items()) if n) or "none"
    section.lines.append(f"  skipped message(s): {reasons}")
    waiting = [x for x in sets if x.state == "waiting"]
    if waiting:
        section.lines.append("  waiting for missing parts: " + ", ".join(
            f"{x.base_name} ({x.seen_parts} of {x.expected_parts or '?'} parts)" for x in waiting))
    failed = [x for x in sets if x.state == "failed"]
    if failed:
        section.lines.append("  FAILED: " + ", ".join(f"{x.base_name} ({x.reason})" for x in failed))
    note = "" if verified == len(ingested) else (
        f" (the first check comes {delay:g}s after each upload)" if settings.verify.enabled
        else " (verification is off)")
    section.lines.append(f"  verified {verified} of {len(ingested)}{note}")
    section.ok = bool(ingested) and not failed and not any(
        store.archive_sets_by_state().get(state) for state in _ACTIVE_SETS)
    return section


# -- verification and cleanup (issue 4): every transfer verified, then cleaned per policy ----

VERIFY_TIMEOUT = 60.0
# Demo-sized: checked a second after upload, cleaned two seconds after the newest message.
DEMO_VERIFY_TOML = """
[verify]
first_check_delay_seconds = 1
interval_seconds = 5
cleanup_grace_seconds = 2
"""
_SETTLED = ("cleaned", "failed")
_CHECKED = ("uploaded", "verifying", "verified")


def _label(demo_dir: Path, source_path: str) -> tuple[int, str]:
    """(0, path under DIR/files) for an upload, (1, "name (ingested)") for a staged archive."""
    path = Path(source_path)
    try:
        return 0, str(path.relative_to(demo_dir / "files"))
    except ValueError:
        return 1, f"{path.name} (ingested)"


def verify_step(daemon, demo_dir: Path) -> DemoSection:
    """Every transfer checked when due (asked at once, as ``stashctl verify ID`` does, rather
    than at the verifier's next idle pass), then cleaned after the grace period; the summary
    says, per transfer, what was verified and what the cleanup removed or kept."""
    store, settings = daemon.storage, daemon.settings
    v = settings.verify
    section = DemoSection(f"Verification and cleanup (first check {v.first_check_delay_seconds:g}s after "
                          f"upload, cleanup {v.cleanup_grace_seconds:g}s after the newest message):")
    if not v.enabled:
        section.lines.append("  verification is off ([verify] enabled = false): nothing is cleaned")
        return section
    everything = store.list_transfers(limit=10_000)
    ids = [t.id for t in everything]
    started = getattr(daemon, "started_at", 0.0)
    fresh = {t.id for t in everything if t.created_at >= started}   # shown: this run's transfers
    checks: dict[str, int] = {tid: 0 for tid in ids}
    deadline = time.monotonic() + VERIFY_TIMEOUT
    while time.monotonic() < deadline:
        records = [store.get_transfer(tid) for tid in ids]
        if all(r.state in _SETTLED for r in records):
            break
        now = time.time()
        for r in records:
            if r.state in _CHECKED and r.lease_owner is None and (r.next_check_at or 0.0) <= now:
                try:
                    daemon.dispatch("verify", {"id": r.id})
                    checks[r.id] += 1
                except Exception as exc:  # the verifier restarting: the next round asks again
                    log.warning("demo: verify {} failed: {}", r.id, exc)
        time.sleep(0.2)  # bounded polling: uploads of re-sent parts, the grace period
    records = sorted((store.get_transfer(tid) for tid in ids),
                     key=lambda r: (_label(demo_dir, r.source_path), r.created_at))
    shown = [r for r in records if r.id in fresh]
    width = max((len(_label(demo_dir, r.source_path)[1]) for r in shown), default=10)
    for r in shown:
        parts = store.list_parts(r.id)
        kind, label = _label(demo_dir, r.source_path)
        name = label.ljust(width)
        count = "1 part " if len(parts) == 1 else f"{len(parts)} parts"
        if r.duplicate_of:
            what = f"same content as {r.duplicate_of[:8]}: verified through it"
        else:
            what = f"{sum(1 for p in parts if p.verified_at is not None)}/{len(parts)} verified"
        if r.state == "cleaned":
            files = ["manifest removed" if not Path(r.manifest_path).exists() else "manifest kept"]
            original = "staged copy" if kind else "original"
            gone = r.delete_original and not Path(r.source_path).exists()
            files.append(f"{original} {'deleted' if gone else 'kept'}")
            what += ", cleaned: " + ", ".join(files)
        else:
            what += f", {r.state.upper()}" + (f": {r.reason}" if r.reason else "")
        section.lines.append(f"  {name}  {count}  {what}")
    cleaned = sum(1 for r in records if r.state == "cleaned")
    failed = sum(1 for r in records if r.state == "failed")
    verdict = ("every transfer verified and cleaned" if cleaned == len(records)
               else "NOT every transfer verified and cleaned")
    earlier = f" ({len(records) - len(shown)} from earlier runs)" if len(shown) < len(records) else ""
    section.lines.append(f"  {verdict}: {cleaned} of {len(records)} cleaned{earlier}, {failed} failed")
    section.ok = bool(records) and cleaned == len(records)
    return section


# The demo's steps, in order (see the module doc); later issues append theirs.
DEMO_STEPS: list[Callable[[Any, Path], DemoSection]] = [upload_step, ingest_step, verify_step]


def format_summary(infos: dict[str, dict], channels: dict[str, list[str]], demo_dir: Path,
                   sections: list[DemoSection] | tuple = (), metrics_url: str | None = None) -> str:
    lines = [f"stashd demo in {demo_dir}", "", f"{len(infos)} account(s):"]
    for name, info in sorted(infos.items()):
        premium = "Premium" if info.get("premium") else "regular"
        lines.append(f"  {name:<10} {premium:<8} upload limit {_mib(info.get('upload_limit_bytes')):>10}"
                     f"  state {info.get('state')}" + (f"  ({info['error']})" if info.get("error") else ""))
        for ch in channels.get(name, []):
            lines.append(f"      sees {ch}")
    premium = [n for n, i in infos.items() if i.get("premium")]
    lines += ["", f"Premium: {', '.join(sorted(premium)) or 'none'}"]
    for section in sections:
        lines += ["", section.title, *section.lines]
    lines.append("")
    if metrics_url:
        lines.append(f"Metrics: {metrics_url}")
    lines.append(f"Config: {demo_dir / 'stashd.toml'}  (stashd run --config {demo_dir / 'stashd.toml'})")
    return "\n".join(lines)


def run_demo(demo_dir: Path, *, keep_running: bool = False, out: TextIO | None = None,
             setup_logging: Callable[[object], None] | None = None) -> int:
    """The ``stashd demo`` command; returns the exit code."""
    from config import ConfigError, load_config

    from actors.daemon import Daemon

    out = out or sys.stdout
    demo_dir = Path(demo_dir).absolute()
    demo_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    config_path = demo_dir / "stashd.toml"
    config_path.write_text(demo_config_text(demo_dir, DEMO_METRICS_PORT))
    try:
        settings = load_config(config_path)
    except ConfigError as exc:  # a bug in demo_config_text
        print(str(exc), file=sys.stderr)
        return 2
    if setup_logging is not None:
        setup_logging(settings)
    sim = None
    daemon = Daemon(settings, config_path=config_path, upload_limit_bytes=DEMO_SPLIT_BYTES,
                    tick_seconds=DEMO_TICK_SECONDS, metrics_port_fallback=True)
    if keep_running:  # before the sim server starts, so a SIGTERM never orphans it
        daemon.install_signal_handlers()
    try:
        sim = ensure_sim_server(settings)
        from actors.telegram.sim.remote import SimControl
        seeded = SimControl(settings.telegram.sim_socket).seed(settings.daemon.sessions_dir)
        log.info("seeded the simulated Telegram: {}", seeded.get("created", seeded) if isinstance(seeded, dict)
                 else seeded)
        daemon.start()
        infos = wait_until_ready(daemon)
        channels = {name: visible_channels(daemon, name) for name in infos}
        sections = [step(daemon, demo_dir) for step in DEMO_STEPS]
        server = daemon.metrics_server
        url = f"http://{settings.metrics.host}:{server.port}/metrics" if server is not None else None
        print(format_summary(infos, channels, demo_dir, sections, url), file=out)
        if keep_running:
            print(f"\nRunning; admin socket {settings.admin.socket}. "
                  f"Stop with SIGTERM or Ctrl-C.", file=out)
            out.flush()
            code = daemon.run()
        else:
            daemon.stop()
            code = 0 if infos and all(i.get("state") == "ready" for i in infos.values()) else 1
            if not all(section.ok for section in sections):
                code = 1
        return code
    except Exception as exc:
        log.opt(exception=exc).error("demo failed")
        print(f"stashd demo: failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    finally:
        daemon.stop()
        daemon.restore_signal_handlers()
        if sim is not None:
            sim.stop()
