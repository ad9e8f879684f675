"""stashd process entry: ``stashd run | demo | login | sim | check-config``.

    stashd run --config FILE          the daemon (systemd Type=notify)
    stashd check-config --config FILE validate FILE, print every error
    stashd demo --dir DIR [--keep-running]
    stashd login NAME [--config FILE] interactive sign-in, writes NAME.session (0600)
    stashd sim ...                    the simulated Telegram (serve, seed, inspect, delete, fault)
    stashd --version

``--config`` defaults to $STASHD_CONFIG, else /etc/stashd/stashd.toml.

Exit codes: 0 clean stop; 1 runtime failure (restart intensity exceeded, an
actor or the storage failing at start, unexpected errors); 2 refused to start:
configuration errors (every one printed, nothing started) or a database whose
schema is newer than this stashd (restarting cannot fix either, so a unit may
list 2 in RestartPreventExitStatus).

Signals (``run`` and ``demo --keep-running``): SIGTERM/SIGINT stop cleanly
(exit 0), SIGHUP reloads (log level, accounts added/removed/paused), SIGUSR1
logs every thread's stack. Handlers only set flags; the main thread does the work.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Sequence

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_REFUSED = 2
DEFAULT_CONFIG = "/etc/stashd/stashd.toml"


def _version() -> str:
    from actors.daemon import stashd_version
    return stashd_version()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="stashd", description="Telegram archive daemon.")
    parser.add_argument("--version", action="version", version=f"stashd {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    default_config = os.environ.get("STASHD_CONFIG", DEFAULT_CONFIG)

    run = sub.add_parser("run", help="run the daemon")
    run.add_argument("--config", type=Path, default=Path(default_config), help="stashd.toml")

    check = sub.add_parser("check-config", help="validate a config file")
    check.add_argument("--config", type=Path, default=Path(default_config))
    check.add_argument("--show", action="store_true", help="print the effective config (secrets masked)")

    demo = sub.add_parser("demo", help="run stashd against a seeded simulated Telegram")
    demo.add_argument("--dir", type=Path, default=Path("stashd-demo"), help="demo directory (default ./stashd-demo)")
    demo.add_argument("--keep-running", action="store_true", help="stay up until SIGTERM")

    login = sub.add_parser("login", help="sign a session in interactively")
    login.add_argument("name", help="session name (file NAME.session in daemon.sessions_dir)")
    login.add_argument("--config", type=Path, default=Path(default_config))

    sub.add_parser("sim", help="the simulated Telegram (stashd sim --help)", add_help=False)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["sim"]:  # everything after "sim" belongs to the sim CLI
        from actors.telegram.sim.cli import main as sim_main
        return sim_main(argv[1:])
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    if args.command == "run":
        return cmd_run(args.config)
    if args.command == "check-config":
        from config import check_main
        return check_main(args.config, show=args.show)
    if args.command == "demo":
        return cmd_demo(args.dir, keep_running=args.keep_running)
    if args.command == "login":
        from actors.login import login_main
        return login_main(args.name, args.config)
    parser.print_help(sys.stderr)
    return EXIT_REFUSED


def _configure_logging(settings) -> None:
    from actors.logsetup import setup_logging
    d = settings.daemon
    setup_logging(d.log_level, log_file=d.log_file, json=d.log_json)


def _load(config_path: Path):
    from config import load_or_report
    return load_or_report(config_path)


def cmd_run(config_path: Path) -> int:
    settings = _load(config_path)
    if settings is None:
        return EXIT_REFUSED
    _configure_logging(settings)
    from loguru import logger

    from actors.daemon import Daemon
    from storage import SchemaVersionError

    log = logger.bind(actor="supervisor")
    daemon = Daemon(settings, config_path=config_path, on_reload_logging=_configure_logging,
                    sim_autostart=True)
    daemon.install_signal_handlers()
    try:
        try:
            daemon.start()
        except SchemaVersionError as exc:
            log.error("refusing to start: {}", exc)
            print(f"stashd: {exc}", file=sys.stderr)
            return EXIT_REFUSED
        except OSError as exc:  # a socket or port taken, a directory not writable: no traceback
            log.error("start-up failed: {}", exc)
            print(f"stashd: start-up failed: {exc}", file=sys.stderr)
            return EXIT_FAILURE
        except Exception as exc:
            log.opt(exception=exc).error("start-up failed: {}", exc)
            return EXIT_FAILURE
        _crash_hook(daemon)
        return daemon.run()
    finally:
        daemon.stop()
        daemon.restore_signal_handlers()


def _crash_hook(daemon) -> None:
    """Test fault hook: STASHD_TEST_CRASH_ACTOR=name[,count] crashes that actor right after READY.

    The actor is stopped from outside (as an unhandled failure would), ``count``
    times in a row (default 1), each time as soon as its replacement is up.
    """
    spec = os.environ.get("STASHD_TEST_CRASH_ACTOR")
    if not spec:
        return
    import threading
    import time

    name, _, count = spec.partition(",")
    times = int(count or 1)

    def crash() -> None:
        crashed: set[str] = set()
        for _ in range(times):
            deadline = time.monotonic() + 30
            ref = None
            while time.monotonic() < deadline:  # wait for a live incarnation not crashed yet
                try:
                    ref = daemon.account_ref(name)
                except Exception:  # the supervisor is gone: nothing left to crash
                    return
                if ref is not None and ref.actor_urn not in crashed and ref.is_alive():
                    break
                ref = None
                time.sleep(0.02)
            if ref is None:
                return
            crashed.add(ref.actor_urn)
            ref.stop(block=True, timeout=10)

    threading.Thread(target=crash, name="test-crash-hook", daemon=True).start()


def cmd_demo(demo_dir: Path, *, keep_running: bool) -> int:
    from actors.demo import run_demo
    return run_demo(demo_dir, keep_running=keep_running, setup_logging=_demo_logging(demo_dir))


def _demo_logging(demo_dir: Path):
    def setup(settings) -> None:
        # The demo talks to a human on stdout: full logs go to DIR/stashd.log, warnings to stderr.
        from loguru import logger

        from actors.logsetup import setup_logging
        setup_logging("INFO", log_file=Path(demo_dir).absolute() / "stashd.log")
        logger.add(sys.stderr, level="WARNING", format="{level}: {message}")
    return setup


if __name__ == "__main__":
    sys.exit(main())
