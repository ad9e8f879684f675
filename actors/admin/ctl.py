"""stashctl: talk to a running stashd over its admin socket.

    stashctl [--socket PATH | --config FILE] [--json] [--timeout S] COMMAND [ARGS]

Exit codes: 0 ok, 1 the command failed, 2 usage error, 3 daemon not reachable.
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
from .protocol import AdminCommandError

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_UNREACHABLE = 0, 1, 2, 3
DEFAULT_SOCKET = Path("/run/stashd/stashd.sock")
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
        epilog="Exit codes: 0 ok, 1 command failed, 2 usage error, 3 daemon not reachable.",
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
    return parser


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse, or raise SystemExit like argparse (2 for usage errors, 0 for --help)."""
    parser = build_parser()
    ns = parser.parse_args(argv)
    if ns.socket and ns.config:
        parser.error("--socket and --config are mutually exclusive")
    if ns.timeout <= 0:
        parser.error("--timeout must be positive")
    return ns


def command_args(ns: argparse.Namespace) -> dict:
    if ns.cmd in ("pause", "resume"):
        return {"account": ns.account}
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
               if k not in ("version", "pid", "uptime_seconds", "state", "accounts", "actors")]
    width = max(len(k) for k, _ in header)
    parts = ["\n".join(f"{k + ':':<{width + 1}}  {'-' if v is None else v}" for k, v in header)]
    parts.append("ACCOUNTS\n" + format_accounts(status.get("accounts"), now))
    if "actors" in status:
        parts.append("ACTORS\n" + format_actors(status.get("actors")))
    return "\n\n".join(parts)


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


FORMATTERS: dict[str, Callable[[Any, float], str]] = {
    "status": format_status,
    "accounts": format_accounts,
}


def render(cmd: str, result: Any, *, as_json: bool, now: float) -> str:
    if as_json:
        return json.dumps(result, indent=2, sort_keys=True, default=str)
    formatter = FORMATTERS.get(cmd)
    return formatter(result, now) if formatter else format_generic(result)


# ---------------------------------------------------------------- main


def main(argv: Sequence[str] | None = None, *, stdout: TextIO | None = None, stderr: TextIO | None = None) -> int:
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
            result = client.call(ns.cmd, command_args(ns))
    except AdminUnreachableError as exc:
        print(f"stashctl: {exc}", file=stderr)
        return EXIT_UNREACHABLE
    except AdminCommandError as exc:
        print(f"stashctl: {ns.cmd} failed: {exc.message} [{exc.code}]", file=stderr)
        return EXIT_FAILED
    print(render(ns.cmd, result, as_json=ns.json, now=time.time()), file=stdout)
    return EXIT_OK


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
