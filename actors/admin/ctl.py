"""stashctl: talk to a running stashd over its admin socket.

    stashctl [--socket PATH | --config FILE] [--json] [--timeout S] COMMAND [ARGS]

Commands: status, accounts, pause ACCOUNT, resume ACCOUNT, shutdown,
upload PATH... [--dest CHANNEL] [--caption TEXT] [--delete-original] [--wait],
transfers [--state S] [--limit N], transfer ID, budget,
verify [TRANSFER | --all], retry TRANSFER.

Exit codes: 0 ok, 1 the command failed (or an awaited upload failed), 2 usage
error, 3 daemon not reachable, 130 interrupted (Ctrl-C; nothing is cancelled).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import tomllib
from pathlib import Path
from typing import Any, Callable, Sequence, TextIO

from .client import AdminClient, AdminUnreachableError
from .progress import (
    DONE_STATES,
    fraction_done,
    human_bytes,
    human_duration,
    shorten_left,
    short_id,
    wait_for_transfers,
)
from .protocol import AdminCommandError, did_you_mean

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_UNREACHABLE = 0, 1, 2, 3
DEFAULT_SOCKET = Path("/run/stashd/stashd.sock")
TRANSFER_STATES = ("planned", "uploading", "uploaded", "verifying", "verified", "cleaned", "failed")
"""storage.transfers.TRANSFER_STATES, repeated so stashctl starts without importing storage."""
ENV_SOCKET = "STASHD_SOCKET"


class UsageError(Exception):
    pass


# ---------------------------------------------------------------- arguments


def _add_common(parser: argparse.ArgumentParser, default: Any) -> None:
    """Global options, accepted before or after the command (``stashctl status --json``)."""
    d = (lambda v: v) if default is None else (lambda v: default)
    parser.add_argument("--socket", metavar="PATH", default=d(None),
                        help="admin socket (default: $STASHD_SOCKET, else the config's "
                        f"admin.socket, else {DEFAULT_SOCKET})")
    parser.add_argument("--config", metavar="FILE", default=d(None),
                        help="read admin.socket from this stashd.toml")
    parser.add_argument("--json", action="store_true", default=d(False),
                        help="print the raw result as JSON")
    parser.add_argument("--timeout", type=float, default=d(10.0), metavar="S",
                        help="seconds to wait for the daemon (default 10)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="stashctl",
        usage="stashctl [--socket PATH | --config FILE] [--json] [--timeout S] COMMAND [ARGS]",
        description="Control a running stashd through its admin socket.",
        epilog="Exit codes: 0 ok, 1 command failed (or an awaited upload failed), 2 usage error, "
        "3 daemon not reachable, 130 interrupted (Ctrl-C cancels nothing).",
    )
    _add_common(parser, None)
    # The same options after the command must not reset what came before it.
    common = argparse.ArgumentParser(add_help=False)
    _add_common(common, argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="cmd", metavar="COMMAND", required=True)

    def command(name: str, text: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, parents=[common], help=text, description=text, prog=f"stashctl {name}")

    command("status", "daemon version, uptime, actors, accounts")
    command("accounts", "each account: state, Premium, upload limit, cooldowns")
    command("pause", "stop giving an account work").add_argument("account", metavar="ACCOUNT")
    command("resume", "give a paused account work again").add_argument("account", metavar="ACCOUNT")
    command("shutdown", "graceful stop, like SIGTERM")
    up = command("upload", "queue files or directories for upload (a directory: one transfer per file)")
    up.add_argument("paths", nargs="+", metavar="PATH",
                    help="files or directories under the daemon's upload roots")
    up.add_argument("--dest", metavar="CHANNEL", help="destination channel (default: the configured one)")
    up.add_argument("--caption", metavar="TEXT", help="caption for the documents")
    up.add_argument("--delete-original", action="store_true",
                    help="delete each file once its upload is verified")
    up.add_argument("--wait", action="store_true",
                    help="show a progress bar per file until each is uploaded (Ctrl-C stops "
                    "waiting, not the upload); exit 1 if one fails")
    tr = command("transfers", "transfers, oldest first: state, size, progress, account")
    tr.add_argument("--state", metavar="S", help="only transfers in this state "
                    "(planned, uploading, uploaded, verifying, verified, cleaned, failed)")
    tr.add_argument("--limit", type=int, default=100, metavar="N", help="at most N (default 100)")
    command("transfer", "one transfer in detail, with its parts").add_argument("id", metavar="ID")
    command("budget", "upload budget: bytes in flight, slots, waiters, per-account quotas")
    ve = command("verify", "check uploaded transfers now: one (TRANSFER; waits for the outcome, "
                 "exit 1 unless every part is there), every due one (no argument), or every "
                 "uploaded/verified/cleaned one (--all)")
    ve.add_argument("id", nargs="?", metavar="TRANSFER", help="the transfer to check now")
    ve.add_argument("--all", action="store_true",
                    help="make every uploaded, verifying, verified and cleaned transfer due now")
    command("retry", "put a failed transfer back into the pipeline (upload what is missing, "
            "then verify; a lost ingested archive: fetch it again from its source channel)"
            ).add_argument("id", metavar="TRANSFER")
    command("scan", "scan the ingest mappings now: all, or those reading CHANNEL").add_argument(
        "channel", nargs="?", metavar="CHANNEL", help="a mapped source channel (username or -100 id)")
    ru = command("runs", "ingest runs (one per scan of a mapping), newest first, with counters")
    ru.add_argument("--state", metavar="S", help="only runs in this state "
                    "(running, finished, failed, interrupted)")
    ru.add_argument("--limit", type=int, default=20, metavar="N", help="at most N (default 20)")
    return parser


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse, or raise SystemExit like argparse (2 for usage errors, 0 for --help)."""
    parser = build_parser()
    ns = parser.parse_args(argv)
    if ns.socket and ns.config:
        parser.error("--socket and --config are mutually exclusive")
    if ns.timeout <= 0:
        parser.error("--timeout must be positive")
    if ns.cmd == "transfers" and ns.limit <= 0:
        parser.error("--limit must be positive")
    if ns.cmd == "transfers" and ns.state is not None and ns.state not in TRANSFER_STATES:
        parser.error(f"--state: unknown transfer state {ns.state!r}{did_you_mean(ns.state, TRANSFER_STATES)}; "
                     f"one of {', '.join(TRANSFER_STATES)}")
    if ns.cmd == "runs" and ns.limit <= 0:
        parser.error("--limit must be positive")
    if ns.cmd == "verify" and ns.id and ns.all:
        parser.error("verify: give a TRANSFER or --all, not both")
    return ns


def command_args(ns: argparse.Namespace) -> dict:
    if ns.cmd in ("pause", "resume"):
        return {"account": ns.account}
    if ns.cmd == "upload":
        # Absolute here, where the relative path means something; the daemon
        # resolves symlinks and checks the upload roots itself.
        return {"paths": [os.path.abspath(p) for p in ns.paths], "dest": ns.dest,
                "caption": ns.caption, "delete_original": ns.delete_original}
    if ns.cmd == "transfers":
        return {"state": ns.state, "limit": ns.limit}
    if ns.cmd in ("transfer", "retry"):
        return {"id": ns.id}
    if ns.cmd == "verify":
        return {"id": ns.id, "all": ns.all}
    if ns.cmd == "scan":
        return {} if ns.channel is None else {"channel": ns.channel}
    if ns.cmd == "runs":
        return {"state": ns.state, "limit": ns.limit}
    return {}


def resolve_socket(ns: argparse.Namespace, env: dict | os._Environ = os.environ) -> Path:
    if ns.socket:
        return Path(ns.socket)
    if env.get(ENV_SOCKET):
        return Path(env[ENV_SOCKET])
    if ns.config:
        return socket_from_config(Path(ns.config))
    return DEFAULT_SOCKET


def socket_from_config(path: Path) -> Path:
    """admin.socket of a stashd.toml, through config.load_config when it can,
    else by a minimal read (stashctl needs no secrets the daemon gets from its
    environment, so a full validation may fail here where the daemon does not)."""
    try:
        from config import load_config  # lazy: stashctl must start fast and never need it

        return Path(load_config(path).admin.socket)
    except Exception:
        pass
    try:
        with open(path.expanduser(), "rb") as fh:
            data = tomllib.load(fh)
    except OSError as exc:
        raise UsageError(f"cannot read config {path}: {exc.strerror or exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"config {path} is not valid TOML: {exc}") from exc
    daemon = data.get("daemon") if isinstance(data.get("daemon"), dict) else {}
    admin = data.get("admin") if isinstance(data.get("admin"), dict) else {}
    # Same rules as config.loader: state_dir against the file's directory,
    # admin.socket (default "stashd.sock") against state_dir, "~" expanded.
    state_dir = path.expanduser().resolve().parent / Path(str(daemon.get("state_dir", "."))).expanduser()
    return state_dir / Path(str(admin.get("socket", "stashd.sock"))).expanduser()


# ---------------------------------------------------------------- formatting


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Left-aligned columns separated by two spaces; ``None`` shows as '-'."""
    cells = [[("-" if v is None else str(v)) for v in row] for row in rows]
    widths = [len(h) for h in headers]
    for row in cells:
        for i, v in enumerate(row):
            widths[i] = max(widths[i], len(v))
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths)).rstrip()]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip() for row in cells]
    return "\n".join(lines)


def _yes_no(v: Any) -> str | None:
    return None if v is None else ("yes" if v else "no")


def cooldown_text(account: dict, now: float) -> str | None:
    """The longest wait still running: the account cooldown or a FloodWait per request kind."""
    waits = []
    until = account.get("cooldown_until")
    if isinstance(until, (int, float)) and until > now:
        waits.append((until, "account"))
    flood = account.get("flood_waits")
    if isinstance(flood, dict):
        waits += [(u, str(k)) for k, u in flood.items() if isinstance(u, (int, float)) and u > now]
    if not waits:
        return None
    until, kind = max(waits)
    more = f" +{len(waits) - 1}" if len(waits) > 1 else ""
    return f"{human_duration(until - now)} ({kind}){more}"


ACCOUNT_HEADERS = ("NAME", "STATE", "PREMIUM", "LIMIT", "USER", "PHONE", "COOLDOWN")


def format_accounts(accounts: Any, now: float) -> str:
    if not accounts:
        return "no accounts"
    rows = []
    for a in accounts:
        if not isinstance(a, dict):
            rows.append((str(a),) + (None,) * 6)
            continue
        rows.append((
            a.get("name"), a.get("state"), _yes_no(a.get("premium")),
            human_bytes(a.get("upload_limit_bytes")), a.get("user_id"), a.get("phone"),
            cooldown_text(a, now),
        ))
    return table(ACCOUNT_HEADERS, rows)


def format_actors(actors: Any) -> str:
    if not actors:
        return "no actors"
    if not all(isinstance(a, dict) for a in actors):
        return "\n".join(str(a) for a in actors)
    keys: list[str] = []
    for a in actors:
        keys += [k for k in a if k not in keys]
    return table([k.upper() for k in keys], [[_cell(a.get(k)) for k in keys] for a in actors])


def _cell(v: Any) -> Any:
    if isinstance(v, bool):
        return _yes_no(v)
    if isinstance(v, (dict, list)):
        return json.dumps(v, default=str)
    return v


def format_status(status: Any, now: float) -> str:
    if not isinstance(status, dict):
        return format_generic(status)
    header = [
        ("version", status.get("version")),
        ("pid", status.get("pid")),
        ("uptime", human_duration(status.get("uptime_seconds"))),
        ("state", status.get("state")),
    ]
    header += [(k, _cell(v)) for k, v in status.items()
               if k not in ("version", "pid", "uptime_seconds", "state", "accounts", "actors",
                            "ingest")]
    width = max(len(k) for k, _ in header)
    parts = ["\n".join(f"{k + ':':<{width + 1}}  {'-' if v is None else v}" for k, v in header)]
    parts.append("ACCOUNTS\n" + format_accounts(status.get("accounts"), now))
    if "actors" in status:
        parts.append("ACTORS\n" + format_actors(status.get("actors")))
    if isinstance(status.get("ingest"), dict):
        parts.append("INGEST\n" + format_ingest(status["ingest"], now))
    return "\n\n".join(parts)


# ---------------------------------------------------------------- ingest


def _counts(d: Any) -> str:
    if not isinstance(d, dict) or not any(d.values()):
        return "none"
    return ", ".join(f"{k} {v}" for k, v in d.items() if v)


def format_ingest(ingest: dict, now: float) -> str:
    """The ingest part of ``status``: totals, what each account is doing, the schedule."""
    lines = [f"sets:     {_counts(ingest.get('sets'))}",
             f"skipped:  {_counts(ingest.get('skipped'))}",
             f"index:    {_counts(ingest.get('index'))}"]
    if ingest.get("error"):
        lines.append(f"error:    {ingest['error']}")
    retrying = [r for r in ingest.get("retrying") or [] if isinstance(r, dict)]
    if retrying:  # failed sets waiting for their next try; at the cap they show as skipped: failed
        rows = []
        for r in retrying:
            at = r.get("next_attempt_at")
            nxt = None if not isinstance(at, (int, float)) else (
                "due" if at <= now else f"in {human_duration(at - now)}")
            rows.append((r.get("set"), r.get("attempts"), nxt, r.get("last_error")))
        lines += ["", table(("FAILED SET", "ATTEMPTS", "NEXT TRY", "LAST ERROR"), rows)]
    running = ingest.get("running") or []
    if running:
        rows = []
        for r in running:
            if not isinstance(r, dict):
                continue
            done = ""
            if r.get("set"):
                total = r.get("bytes_total") or 0
                done = f"{r['set']} {human_bytes(r.get('bytes_done'))}/{human_bytes(total)}"
            rows.append((r.get("account"), r.get("mapping"), r.get("phase"), r.get("cursor"),
                         r.get("pages"), done or None))
        lines += ["", table(("ACCOUNT", "MAPPING", "PHASE", "CURSOR", "PAGES", "DOWNLOADING"), rows)]
    mappings = ingest.get("mappings") or []
    if mappings:
        rows = []
        for m in mappings:
            if not isinstance(m, dict):
                continue
            at = m.get("next_scan_at")
            nxt = "now" if m.get("running") else (
                None if not isinstance(at, (int, float)) else
                ("due" if at <= now else f"in {human_duration(at - now)}"))
            rows.append((m.get("label"), m.get("destination"), nxt,
                         "stalled" if m.get("stalled") else None))
        lines += ["", table(("MAPPING", "DESTINATION", "NEXT SCAN", "NOTE"), rows)]
    return "\n".join(lines)


def format_scan(result: Any, now: float) -> str:
    started = result.get("started") if isinstance(result, dict) else None
    if not isinstance(started, list):
        return format_generic(result)
    if not started:
        return "no mappings to scan"
    return "scanning: " + ", ".join(str(m) for m in started)


def format_runs(result: Any, now: float) -> str:
    runs = result.get("runs") if isinstance(result, dict) else result
    if not isinstance(runs, list):
        return format_generic(result)
    if not runs:
        return "no runs"
    rows = []
    for r in runs:
        if not isinstance(r, dict):
            rows.append((str(r),) + (None,) * 8)
            continue
        skipped = r.get("skipped_by_reason") or {}
        skip_text = str(r.get("skipped", 0)) + (f" ({_counts(skipped)})" if skipped else "")
        note = r.get("error") or r.get("progress")
        rows.append((_short_id(r.get("id")), r.get("mapping"), r.get("state"),
                     _timestamp(r.get("started_at"), now), r.get("seen"), r.get("ingested"),
                     skip_text, human_bytes(r.get("bytes_downloaded")), note))
    return table(("ID", "MAPPING", "STATE", "STARTED", "SEEN", "INGESTED", "SKIPPED", "DOWNLOADED",
                  "NOTE"), rows)


def format_generic(result: Any) -> str:
    if result is None or result is True:
        return "ok"
    if isinstance(result, str):
        return result
    if isinstance(result, dict):
        width = max((len(str(k)) for k in result), default=0)
        return "\n".join(f"{str(k) + ':':<{width + 1}}  {_cell(v)}" for k, v in result.items()) or "ok"
    if isinstance(result, list) and result and all(isinstance(r, dict) for r in result):
        return format_actors(result)
    return json.dumps(result, default=str)


# ---------------------------------------------------------------- transfers


def _short_id(v: Any) -> str | None:
    return None if v is None else short_id(v)


def _percent(t: dict) -> str | None:
    if t.get("duplicate_of"):
        return "dup"
    if not isinstance(t.get("size"), int):
        return None
    return f"{fraction_done(t) * 100:.0f}%"


def _timestamp(at: Any, now: float) -> str | None:
    if not isinstance(at, (int, float)) or isinstance(at, bool):
        return None
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(at))
    delta = now - at
    return f"{stamp} ({human_duration(delta)} ago)" if delta >= 0 else f"{stamp} (in {human_duration(-delta)})"


def _transfer_list(result: Any) -> Any:
    return result.get("transfers") if isinstance(result, dict) else result


def format_upload(result: Any, now: float) -> str:
    """One line per queued transfer: id, state, size, path (and what it duplicates)."""
    transfers = _transfer_list(result)
    if not isinstance(transfers, list):
        return format_generic(result)
    if not transfers:
        return "nothing to upload"
    rows = []
    for t in transfers:
        if not isinstance(t, dict):
            rows.append((str(t), None, None, None))
            continue
        dup = f"duplicate of {_short_id(t['duplicate_of'])}" if t.get("duplicate_of") else ""
        rows.append((_short_id(t.get("id")), t.get("state"), human_bytes(t.get("size")),
                     f"{t.get('source_path')}  {dup}".rstrip()))
    return "\n".join(table(("ID", "STATE", "SIZE", "PATH"), rows).splitlines()[1:])


TRANSFER_HEADERS = ("ID", "STATE", "SIZE", "DONE", "ACCOUNT", "DEST", "PATH")


def format_transfers(result: Any, now: float) -> str:
    transfers = _transfer_list(result)
    if not isinstance(transfers, list):
        return format_generic(result)
    if not transfers:
        return "no transfers"
    rows = []
    for t in transfers:
        if not isinstance(t, dict):
            rows.append((str(t),) + (None,) * 6)
            continue
        rows.append((_short_id(t.get("id")), t.get("state"), human_bytes(t.get("size")), _percent(t),
                     t.get("account"), t.get("destination"), shorten_left(t.get("source_path"), 50)))
    return table(TRANSFER_HEADERS, rows)


PART_HEADERS = ("PART", "OFFSET", "LENGTH", "FILE", "MESSAGE", "ACCOUNT", "SENT")
CHECKED_PART_HEADERS = PART_HEADERS + ("VERIFIED", "MISSES")
"""When the daemon reports verification per part (``verified_at``, ``misses``)."""


def _ago(at: Any, now: float) -> str | None:
    if not isinstance(at, (int, float)) or isinstance(at, bool):
        return None
    return f"{human_duration(now - at)} ago" if now >= at else f"in {human_duration(at - now)}"


def verification_lines(t: dict, now: float) -> list[tuple[str, Any]]:
    """The verifier's view of a transfer: attempts, last/next check, lease, cleanup."""
    lines: list[tuple[str, Any]] = []
    if "attempts" in t:
        lines.append(("attempts", t.get("attempts")))
    if "last_check_at" in t:
        lines.append(("last check", _timestamp(t.get("last_check_at"), now) or "never"))
    if "next_check_at" in t:
        nxt, state = t.get("next_check_at"), t.get("state")
        if state in ("planned", "uploading"):
            lines.append(("next check", "after the upload"))
        elif state == "failed":
            lines.append(("next check", "none (failed: stashctl retry)"))
        else:
            due = isinstance(nxt, (int, float)) and nxt <= now
            lines.append(("next check", "due now" if due else _timestamp(nxt, now)))
    if t.get("lease_owner"):
        lines.append(("checking", f"{t['lease_owner']} (lease {_ago(t.get('lease_until'), now) or '-'})"))
    parts = t.get("parts") if isinstance(t.get("parts"), list) else []
    misses = sum(p.get("misses") or 0 for p in parts if isinstance(p, dict))
    if parts and any(isinstance(p, dict) and "misses" in p for p in parts):
        verified = sum(1 for p in parts if isinstance(p, dict) and p.get("verified_at") is not None)
        lines.append(("verified", f"{verified} of {len(parts)} parts"))
        lines.append(("misses", misses))
    if "cleaned" in t or "cleaned_at" in t or t.get("state") == "cleaned":
        at = t.get("cleaned_at")
        cleaned = bool(t.get("cleaned")) or t.get("state") == "cleaned" or at is not None
        lines.append(("cleaned", (_timestamp(at, now) or "yes") if cleaned else "no"))
    return lines




def format_transfer(t: Any, now: float) -> str:
    if not isinstance(t, dict):
        return format_generic(t)
    done, size = t.get("bytes_done"), t.get("size")
    progress = f"{human_bytes(done) or '-'} of {human_bytes(size) or '-'}"
    if _percent(t) not in (None, "dup"):
        progress += f" ({_percent(t)})"
    header = [
        ("id", t.get("id")),
        ("state", t.get("state")),
        ("path", t.get("source_path")),
        ("size", f"{human_bytes(size)} ({size} bytes)" if isinstance(size, int) else None),
        ("done", progress),
        ("parts", f"{t.get('parts_sent', '-')} of {t.get('parts_total', '-')} sent"),
        ("destination", t.get("destination")),
        ("account", t.get("account")),
    ]
    header += [(k, t.get(k)) for k in ("duplicate_of", "reason") if t.get(k) is not None]
    header += [("created", _timestamp(t.get("created_at"), now)),
               ("updated", _timestamp(t.get("updated_at"), now))]
    header += verification_lines(t, now)
    width = max(len(k) for k, _ in header)
    text = "\n".join(f"{k + ':':<{width + 1}}  {'-' if v is None else v}" for k, v in header)
    parts = t.get("parts")
    if not isinstance(parts, list):
        return text
    if not parts:
        return text + "\n\nno parts"
    checked = any(isinstance(p, dict) and "misses" in p for p in parts)
    headers = CHECKED_PART_HEADERS if checked else PART_HEADERS
    rows = []
    for p in parts:
        if not isinstance(p, dict):
            rows.append((str(p),) + (None,) * (len(headers) - 1))
            continue
        sent = p.get("sent_at")
        row = (p.get("index"), human_bytes(p.get("offset")), human_bytes(p.get("length")),
               p.get("file_name"), p.get("message_id"), p.get("account"),
               f"{human_duration(now - sent)} ago" if isinstance(sent, (int, float)) else None)
        if checked:
            row += (_ago(p.get("verified_at"), now) or "no", p.get("misses"))
        rows.append(row)
    return text + "\n\nPARTS\n" + table(headers, rows)


# ---------------------------------------------------------------- budget


def _used(used: Any, cap: Any, fmt: Callable[[Any], Any] = str) -> str:
    return f"{fmt(used)}/{fmt(cap)}" if cap is not None else f"{fmt(used)}"


def quota_text(a: dict, window: str) -> str:
    """``3/10 files, 400 MiB/1000 MiB`` (no ``/cap`` where the quota is unlimited)."""
    q = a.get("quota") if isinstance(a.get("quota"), dict) else {}
    files = _used(a.get(f"{window}_files", 0), q.get(f"{window}_files"))
    nbytes = _used(a.get(f"{window}_bytes", 0), q.get(f"{window}_bytes"), human_bytes)
    return f"{files} files, {nbytes}"


BUDGET_HEADERS = ("ACCOUNT", "IN-FLIGHT", "RESERVED", "WAITING", "COOLDOWN", "HOURLY", "DAILY")


def format_budget(b: Any, now: float) -> str:
    if not isinstance(b, dict):
        return format_generic(b)
    reserved, limit = b.get("reserved_bytes"), b.get("limit_bytes")
    share = f" ({reserved / limit * 100:.0f}%)" if isinstance(reserved, int) and limit else ""
    header = [
        ("reserved", f"{human_bytes(reserved)} of {human_bytes(limit)}{share}"),
        ("slots", f"{b.get('slots_in_use', '-')} of {b.get('global_slots', '-')} in use, "
                  f"{b.get('per_account_slots', '-')} per account"),
        ("waiting", b.get("waiting")),
    ]
    text = "\n".join(f"{k + ':':<9}  {'-' if v is None else v}" for k, v in header)
    accounts = b.get("accounts")
    if not accounts:
        return text + "\n\nno account has asked for budget yet"
    rows = []
    for a in accounts:
        if not isinstance(a, dict):
            rows.append((str(a),) + (None,) * 6)
            continue
        until = a.get("cooldown_until")
        cooling = isinstance(until, (int, float)) and until > now
        rows.append((a.get("account"), a.get("parts_in_flight"), human_bytes(a.get("reserved_bytes")),
                     f"{a.get('waiting_parts', 0)} parts, {a.get('waiting_files', 0)} files",
                     human_duration(until - now) if cooling else None,
                     quota_text(a, "hourly"), quota_text(a, "daily")))
    return text + "\n\nACCOUNTS\n" + table(BUDGET_HEADERS, rows)


# ---------------------------------------------------------------- verify / retry

VERIFY_HEADERS = ("ID", "STATE", "LAST CHECK", "MISSES", "PATH")


def format_verify(result: Any, now: float) -> str:
    """``verify``: how many transfers were made due, and the first of them."""
    if not isinstance(result, dict) or not isinstance(result.get("scheduled"), int):
        return format_generic(result)
    n = result["scheduled"]
    if n == 0:
        return "nothing to check: no uploaded or verified transfer is due (stashctl verify --all re-checks them all)"
    text = (f"{n} transfer(s) made due: being checked now" if result.get("all") else
            f"{n} transfer(s) due: the verifier checks them on its next pass")
    rows = []
    for t in result.get("transfers") or []:
        if isinstance(t, dict):
            rows.append((_short_id(t.get("id")), t.get("state"), _ago(t.get("last_check_at"), now) or "never",
                         t.get("misses"), shorten_left(t.get("source_path"), 50)))
    if rows:
        text += "\n" + table(VERIFY_HEADERS, rows)
        if n > len(rows):
            text += f"\n... and {n - len(rows)} more"
    return text


CHECK_OK = frozenset({"verified", "cleaned", "following", "skipped"})
"""Outcomes of ``verify TRANSFER`` that exit 0 (skipped: another verifier holds it)."""


def format_check(result: Any, now: float) -> str:
    """``verify TRANSFER``: the transfer after its check, then one line per outcome."""
    lines = []
    for o in result.get("outcomes") or []:
        if not isinstance(o, dict):
            continue
        missing = o.get("missing") or []
        text = f"check: {o.get('result')}"
        if missing:
            text += f", part(s) {', '.join(str(i) for i in missing)} missing"
        if o.get("detail"):
            text += f": {o['detail']}"
        lines.append(text)
    if not lines:
        lines.append("check: nothing checked (not due, or another verifier holds it)")
    return format_transfer(result.get("transfer"), now) + "\n\n" + "\n".join(lines)


def check_ok(result: Any) -> bool:
    outcomes = result.get("outcomes") if isinstance(result, dict) else None
    return bool(outcomes) and all(isinstance(o, dict) and o.get("result") in CHECK_OK for o in outcomes)


def format_retry(result: Any, now: float) -> str:
    if not isinstance(result, dict) or not isinstance(result.get("transfer"), dict):
        return format_generic(result)
    t = result["transfer"]
    was = result.get("previous_reason")
    refetch = result.get("refetch")
    if isinstance(refetch, dict):
        channels = ", ".join(str(c) for c in refetch.get("channels") or ()) or "?"
        return (f"transfer {t.get('id')}: to be fetched again from source channel {channels} "
                f"(stays failed until the re-fetch has the content)"
                + (f" (it had failed: {was})" if was else ""))
    return (f"transfer {t.get('id')}: failed -> {t.get('state')}"
            + (f" (it had failed: {was})" if was else ""))


def run_verify(client: AdminClient, ns: argparse.Namespace, stdout: TextIO) -> int:
    """``verify``: with a TRANSFER the daemon answers after the check; exit 1 unless it passed."""
    result = client.call("verify", command_args(ns))
    if not ns.id:
        print(render("verify", result, as_json=ns.json, now=time.time()), file=stdout)
        return EXIT_OK
    if ns.json:
        print(render("verify", result, as_json=True, now=time.time()), file=stdout)
    else:
        print(format_check(result, time.time()) if isinstance(result, dict) else format_generic(result),
              file=stdout)
    return EXIT_OK if check_ok(result) else EXIT_FAILED


FORMATTERS: dict[str, Callable[[Any, float], str]] = {
    "status": format_status,
    "accounts": format_accounts,
    "upload": format_upload,
    "transfers": format_transfers,
    "transfer": format_transfer,
    "budget": format_budget,
    "verify": format_verify,
    "retry": format_retry,
    "scan": format_scan,
    "runs": format_runs,
}


def render(cmd: str, result: Any, *, as_json: bool, now: float) -> str:
    if as_json:
        return json.dumps(result, indent=2, sort_keys=True, default=str)
    formatter = FORMATTERS.get(cmd)
    return formatter(result, now) if formatter else format_generic(result)


# ---------------------------------------------------------------- upload --wait

EXIT_INTERRUPTED = 130
PATH_REFUSED = "path_refused"


def _isatty(stream: TextIO) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def _terminal_width(stream: TextIO) -> int | None:
    try:
        return os.get_terminal_size(stream.fileno()).columns
    except (AttributeError, ValueError, OSError):
        return None


def run_upload(client: AdminClient, ns: argparse.Namespace, stdout: TextIO, stderr: TextIO, *,
               sleep: Callable[[float], None], clock: Callable[[], float]) -> int:
    """``upload``: queue, print what was queued, and with ``--wait`` follow it to the end."""
    result = client.call("upload", command_args(ns))
    if not ns.wait:
        print(render("upload", result, as_json=ns.json, now=time.time()), file=stdout)
        return EXIT_OK
    transfers = [t for t in (_transfer_list(result) or []) if isinstance(t, dict)]
    tty = _isatty(stdout)
    if not ns.json:
        print(format_upload(result, time.time()), file=stdout)

    def poll(cmd: str, args: dict) -> Any:
        # A wait can outlive the daemon's idle timeout (a laptop asleep):
        # one fresh connection is worth a try before giving up.
        try:
            return client.call(cmd, args)
        except AdminUnreachableError:
            return client.call(cmd, args)

    final = wait_for_transfers(
        poll, transfers, None if ns.json else stdout, tty=tty,
        width=_terminal_width(stdout) if tty else None,
        sleep=sleep, clock=clock,
    )
    if ns.json:
        print(render("upload", {"transfers": final}, as_json=True, now=time.time()), file=stdout)
    failed = [t for t in final if t.get("state") not in DONE_STATES]
    for t in failed:
        print(f"stashctl: transfer {t.get('id')} ({t.get('source_path')}) failed: "
              f"{t.get('reason') or 'no reason given'}", file=stderr)
    return EXIT_FAILED if failed else EXIT_OK


# ---------------------------------------------------------------- main


def main(argv: Sequence[str] | None = None, *, stdout: TextIO | None = None, stderr: TextIO | None = None,
         sleep: Callable[[float], None] = time.sleep, clock: Callable[[], float] = time.monotonic) -> int:
    """Run one stashctl command; returns the exit code.  ``sleep`` and
    ``clock`` pace ``upload --wait`` (tests pass fakes)."""
    stdout = stdout or sys.stdout
    stderr = stderr or sys.stderr
    try:
        ns = parse_args(argv)
    except SystemExit as exc:  # argparse: --help -> 0, bad usage -> 2
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    try:
        path = resolve_socket(ns)
    except UsageError as exc:
        print(f"stashctl: {exc}", file=stderr)
        return EXIT_USAGE
    try:
        with AdminClient(path, timeout=ns.timeout) as client:
            if ns.cmd == "upload":
                return run_upload(client, ns, stdout, stderr, sleep=sleep, clock=clock)
            if ns.cmd == "verify":
                return run_verify(client, ns, stdout)
            result = client.call(ns.cmd, command_args(ns))
    except AdminUnreachableError as exc:
        print(f"stashctl: {exc}", file=stderr)
        return EXIT_UNREACHABLE
    except AdminCommandError as exc:
        if exc.code == PATH_REFUSED:  # the message lists each refused path; nothing was queued
            print(f"stashctl: upload refused, nothing queued: {exc.message}", file=stderr)
        else:
            print(f"stashctl: {ns.cmd} failed: {exc.message} [{exc.code}]", file=stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        stdout.flush()
        if ns.cmd == "upload":
            print("\nstashctl: stopped waiting; the uploads go on (see stashctl transfers)", file=stderr)
        return EXIT_INTERRUPTED
    print(render(ns.cmd, result, as_json=ns.json, now=time.time()), file=stdout)
    return EXIT_OK


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
