"""``stashd sim``: run, seed, inspect and disturb the simulated Telegram.

    stashd sim serve   --dir DIR [--socket PATH]
    stashd sim seed    --dir DIR [--sessions DIR2] [--size-scale F]
    stashd sim inspect --dir DIR [--channel NAME]
    stashd sim delete  --dir DIR --channel NAME (--ids 1,2,3 | --fraction F) [--seed N]
    stashd sim fault   --dir DIR {flood,error,drop,latency,bandwidth,clear} [options]

Every command but ``serve`` goes through the running server's socket when one
answers (so faults reach the live world) and opens the world in DIR directly
otherwise.  Exit codes: 0 ok, 1 runtime failure (one line on stderr), 2 usage.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path
from typing import Any, Sequence

from actors.telegram.sim.remote import SimControl, SimControlError
from actors.telegram.sim.server import WorldControl, channel_id_of, default_socket_path

FAULT_KINDS = ("flood", "error", "drop", "latency", "bandwidth", "clear")
DEFAULT_FLOOD_SECONDS = 30.0


class CliError(Exception):
    """A runtime failure reported as one line and exit code 1."""


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be within 0..1, got {value:g}")
    return value


def _ids(text: str) -> list[int]:
    try:
        ids = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated message ids, got {text!r}") from None
    if not ids or any(i <= 0 for i in ids):
        raise argparse.ArgumentTypeError(f"expected positive message ids, got {text!r}")
    return ids


def _non_negative(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must not be negative, got {value:g}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="stashd sim", description="The simulated Telegram.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--dir", required=True, type=Path, help="state directory of the simulated Telegram")
        p.add_argument("--socket", type=Path, help="server socket (default DIR/sim.sock)")
        return p

    command("serve", "Serve the world in DIR on a Unix socket until SIGTERM.")

    seed = command("seed", "Create the demo accounts, channels and sample archives (idempotent).")
    seed.add_argument("--sessions", type=Path, help="where to write session files (default DIR/sessions)")
    seed.add_argument("--size-scale", type=_non_negative, default=1.0,
                      help="multiply sample archive sizes (default 1.0, a few MiB in all)")

    inspect = command("inspect", "Print channels, topics and messages as JSON.")
    inspect.add_argument("--channel", help="only this channel (username, title or id)")

    delete = command("delete", "Delete messages of a channel, as one of its admins might.")
    delete.add_argument("--channel", required=True, help="channel username, title or id")
    which = delete.add_mutually_exclusive_group(required=True)
    which.add_argument("--ids", type=_ids, help="comma-separated message ids")
    which.add_argument("--fraction", type=_fraction, help="delete this fraction of the live messages")
    delete.add_argument("--seed", type=int, default=None, help="random seed for --fraction")

    fault = command("fault", "Inject a fault into the live world, or clear all faults.")
    fault.add_argument("kind", choices=FAULT_KINDS)
    fault.add_argument("--request", help="Telethon request class, e.g. SaveBigFilePartRequest (default: all)")
    fault.add_argument("--fraction", type=_fraction, default=1.0, help="share of matching requests hit")
    fault.add_argument("--seconds", type=_non_negative, default=None,
                       help=f"FloodWait length or latency (flood default {DEFAULT_FLOOD_SECONDS:g})")
    fault.add_argument("--error", help="RPC error message for 'error', e.g. RPC_CALL_FAIL")
    fault.add_argument("--code", type=int, default=400, help="RPC error code for 'error' (default 400)")
    fault.add_argument("--account", help="only requests of this user (username)")
    fault.add_argument("--bps", type=int, default=None, help="bytes per second for 'bandwidth'")
    parser.set_defaults(fault_parser=fault)
    return parser


def _check_fault_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.kind == "error" and not args.error:
        parser.error("fault error needs --error MESSAGE (e.g. RPC_CALL_FAIL)")
    if args.kind == "latency" and args.seconds is None:
        parser.error("fault latency needs --seconds S")
    if args.kind == "bandwidth" and (args.bps is None or args.bps <= 0):
        parser.error("fault bandwidth needs --bps N (N > 0)")
    if args.kind != "error" and args.error:
        parser.error("--error only applies to fault error")
    if args.kind != "bandwidth" and args.bps is not None:
        parser.error("--bps only applies to fault bandwidth")


def _socket_of(args: argparse.Namespace) -> Path:
    return args.socket or default_socket_path(args.dir)


def open_control(state_dir: Path, socket_path: Path, *, create: bool = False) -> Any:
    """A ``SimControl`` when a server answers, else a ``WorldControl`` on DIR."""
    remote = SimControl(socket_path)
    if remote.is_running():
        return remote
    if not create and not (Path(state_dir) / "world.sqlite3").exists():
        raise CliError(f"no simulated Telegram in {state_dir} (run 'stashd sim seed --dir {state_dir}' "
                       "or 'stashd sim serve --dir ...' first)")
    from actors.telegram.sim.world import SimWorld

    return WorldControl(SimWorld(Path(state_dir)))


def _close(control: Any) -> None:
    world = getattr(control, "world", None)
    if world is not None and hasattr(world, "close"):
        world.close()


def _print_json(value: Any) -> None:
    json.dump(value, sys.stdout, indent=2, sort_keys=True, default=str)
    sys.stdout.write("\n")


def pick_fraction(message_ids: list[int], fraction: float, seed: int | None) -> list[int]:
    """A random ``fraction`` of ``message_ids`` (at least one when fraction > 0)."""
    if fraction <= 0 or not message_ids:
        return []
    count = min(len(message_ids), max(1, int(len(message_ids) * fraction + 0.5)))
    return sorted(random.Random(seed).sample(sorted(message_ids), count))


def _live_ids(snapshot: dict, channel_id: int) -> list[int]:
    return [int(m["id"]) for m in snapshot.get("messages", [])
            if int(m.get("channel_id", channel_id)) == channel_id and not m.get("deleted")
            and not m.get("action") and not m.get("service")]


def _run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    if args.command == "serve":
        from actors.telegram.sim.server import run_server

        return run_server(args.dir, args.socket)
    control = open_control(args.dir, _socket_of(args), create=args.command == "seed")
    try:
        if args.command == "seed":
            sessions = (args.sessions or args.dir / "sessions").resolve()
            _print_json(control.seed(sessions, size_scale=args.size_scale))
        elif args.command == "inspect":
            _print_json(control.inspect(args.channel))
        elif args.command == "delete":
            ids = args.ids
            if ids is None:
                snapshot = control.inspect(args.channel)
                ids = pick_fraction(_live_ids(snapshot, channel_id_of(snapshot["channels"][0])),
                                    args.fraction, args.seed)
            count = control.delete(args.channel, ids) if ids else 0
            _print_json({"channel": args.channel, "ids": ids, "deleted": count})
        elif args.command == "fault":
            if args.kind == "clear":
                _print_json(control.clear_faults())
            else:
                seconds = args.seconds
                if seconds is None:
                    seconds = DEFAULT_FLOOD_SECONDS if args.kind == "flood" else 0.0
                _print_json(control.set_fault(
                    args.kind, request=args.request, fraction=args.fraction, seconds=seconds,
                    error=args.error or "", code=args.code, account=args.account,
                    bytes_per_second=args.bps or 0))
    finally:
        _close(control)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["sim"]:
        argv = argv[1:]
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    if args.command == "fault":
        try:
            _check_fault_args(args.fault_parser, args)
        except SystemExit as exc:
            return int(exc.code or 0)
    try:
        return _run(args, parser)
    except (CliError, SimControlError, ConnectionError, LookupError, ValueError, OSError) as exc:
        message = str(exc).strip("'\"") or type(exc).__name__
        print(f"stashd sim {args.command}: {message}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
