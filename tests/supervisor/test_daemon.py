"""The daemon in-process with fake account actors: order, admin commands, reload, signals, exit codes."""
from __future__ import annotations

import io
import os
import queue
import signal
import socket
import threading

import pykka
import pytest

from actors.account_messages import AccountInfoResult, GetAccountInfo, Pause, Resume
from actors.admin.client import call as admin_call
from actors.daemon import Daemon, discover_accounts
from actors.notify import Notifier
from config import settings_from_dict


class FakeAccount(pykka.ThreadingActor):
    crash_on_start: set = set()

    def __init__(self, name, session_path, settings, storage, metrics, clock):
        super().__init__()
        self.name = name
        self.state = "ready"

    def on_start(self):
        if self.name in self.crash_on_start:
            raise RuntimeError("cannot connect")

    def on_receive(self, message):
        if isinstance(message, GetAccountInfo):
            return AccountInfoResult(self.name, 42, self.name == "bob", 4000 << 20, "+155*****67",
                                     self.state, ())
        if isinstance(message, Pause):
            self.state = "paused"
            return None
        if isinstance(message, Resume):
            self.state = "ready"
            return None
        if message == "crash":
            raise RuntimeError("boom")
        return super().on_receive(message)


def make_settings(tmp_path, *, sessions=("alice", "bob"), accounts=(), **supervisor):
    sessions_dir = tmp_path / "sessions"
    sessions_dir.mkdir(exist_ok=True)
    for name in sessions:
        (sessions_dir / f"{name}.session").write_bytes(b"")
    sup = {"backoff_initial_seconds": 0.0, "backoff_max_seconds": 0.0, "stop_timeout_seconds": 5}
    sup.update(supervisor)
    return settings_from_dict({
        "daemon": {"state_dir": str(tmp_path), "sessions_dir": "sessions", "log_level": "INFO"},
        "telegram": {"mode": "simulated"},
        "metrics": {"enabled": False},
        "supervisor": sup,
        "accounts": list(accounts),
    }, base_dir=tmp_path, env={})


@pytest.fixture
def notify_sock(tmp_path):
    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(10)
    yield path, sock
    sock.close()


def start_daemon(settings, **kw):
    kw.setdefault("account_starter", FakeAccount.start)
    d = Daemon(settings, **kw)
    d.start()
    return d


def test_discover_accounts_applies_overrides(tmp_path):
    s = make_settings(tmp_path, sessions=("a", "b", "c"),
                      accounts=[{"session": "b", "enabled": False}, {"session": "c", "paused": True}])
    (s.daemon.sessions_dir / "a.session").chmod(0o644)
    plans = discover_accounts(s)
    assert [(p.name, p.paused) for p in plans] == [("a", False), ("c", True)]
    assert (s.daemon.sessions_dir / "a.session").stat().st_mode & 0o777 == 0o600


def test_discover_accounts_skips_configured_account_without_session(tmp_path):
    s = make_settings(tmp_path, sessions=("a",), accounts=[{"session": "ghost"}])
    assert [p.name for p in discover_accounts(s)] == ["a"]


def test_start_ready_admin_commands_and_stop(tmp_path, notify_sock):
    path, sock = notify_sock
    settings = make_settings(tmp_path)
    d = start_daemon(settings, notifier=Notifier({"NOTIFY_SOCKET": str(path)}))
    try:
        msgs = [sock.recv(4096) for _ in range(3)]
        assert msgs[-1].startswith(b"READY=1")
        assert settings.admin.socket.exists()
        status = admin_call(settings.admin.socket, "status")
        assert status["state"] == "running" and status["pid"] == os.getpid()
        assert [a["name"] for a in status["accounts"]] == ["alice", "bob"]
        assert {a["name"]: a["premium"] for a in status["accounts"]} == {"alice": False, "bob": True}
        assert [a["name"] for a in status["actors"]] == ["account:alice", "account:bob"]
        paused = admin_call(settings.admin.socket, "pause", {"account": "alice"})
        assert paused["state"] == "paused"
        assert admin_call(settings.admin.socket, "resume", {"account": "alice"})["state"] == "ready"
        with pytest.raises(Exception, match="unknown account"):
            admin_call(settings.admin.socket, "pause", {"account": "mallory"})
        assert admin_call(settings.admin.socket, "shutdown") == {"stopping": True}
        assert d.run() == 0  # the shutdown command already asked it to stop
    finally:
        d.stop()
    assert sock.recv(4096).startswith(b"STOPPING=1")
    assert not settings.admin.socket.exists()
    assert not any(r.is_alive() for r in pykka.ActorRegistry.get_all())


def recording_starter(started: queue.Queue):
    """FakeAccount.start that also reports (name, actor urn) of every incarnation."""
    def start(name, *args):
        ref = FakeAccount.start(name, *args)
        started.put((name, ref.actor_urn))
        return ref
    return start


def wait_restarted(d, started: queue.Queue, name: str, old_urn: str) -> pykka.ActorRef:
    """The next incarnation of ``name``, once the supervisor has it running.

    The starter reports it from inside the supervisor's restart handling, so the
    GetChild ask behind account_ref is answered only after that handling finished."""
    while True:
        got, urn = started.get(timeout=20)
        if got == name and urn != old_urn:
            break
    ref = d.account_ref(name)
    assert ref is not None and ref.actor_urn == urn
    return ref


def test_crashed_account_is_restarted(tmp_path):
    started: queue.Queue = queue.Queue()
    d = start_daemon(make_settings(tmp_path), account_starter=recording_starter(started))
    try:
        first = d.account_ref("alice")
        first.tell("crash")
        ref = wait_restarted(d, started, "alice", first.actor_urn)
        assert ref.actor_urn != first.actor_urn
        assert d.account_info("alice")["state"] == "ready"
        restarts = {a["name"]: a["restarts"] for a in d.status()["actors"]}
        assert restarts == {"account:alice": 1, "account:bob": 0}
    finally:
        d.stop()


def test_restart_intensity_makes_run_return_nonzero(tmp_path):
    d = start_daemon(make_settings(tmp_path, max_restarts=1))
    try:
        d.account_ref("alice").tell("crash")
        d.account_ref("bob").tell("crash")
        done = {}
        t = threading.Thread(target=lambda: done.setdefault("code", d.run()))
        t.start()
        t.join(20)
        assert done.get("code") == 1
    finally:
        d.stop()


def test_account_failing_to_start_does_not_stop_others(tmp_path, monkeypatch):
    monkeypatch.setattr(FakeAccount, "crash_on_start", {"bob"})
    d = start_daemon(make_settings(tmp_path, max_restarts=100, backoff_initial_seconds=5,
                                   backoff_max_seconds=5))
    try:
        assert d.account_info("alice")["state"] == "ready"
        assert d.account_info("bob")["state"] == "restarting"
        assert d.status()["state"] == "running"
    finally:
        d.stop()


def test_reload_adds_removes_and_pauses_accounts(tmp_path):
    settings = make_settings(tmp_path)
    config = tmp_path / "stashd.toml"
    config.write_text(f"""
[daemon]
state_dir = "{tmp_path}"
log_level = "DEBUG"
[telegram]
mode = "simulated"
[metrics]
enabled = false
[[accounts]]
session = "carol"
paused = true
""")
    logged = []
    d = start_daemon(settings, config_path=config, on_reload_logging=lambda s: logged.append(s.daemon.log_level))
    try:
        (tmp_path / "sessions" / "bob.session").unlink()
        (tmp_path / "sessions" / "carol.session").write_bytes(b"")
        changes = d.reload()
        assert "account bob removed" in changes
        assert "account carol added (paused)" in changes
        assert logged == ["DEBUG"]
        assert d.account_names() == ["alice", "carol"]
        assert d.account_info("carol")["state"] == "paused"
        config.write_text("[daemon]\nbogus = 1\n")
        assert d.reload() == []  # errors logged, running config kept
        assert d.account_names() == ["alice", "carol"]
    finally:
        d.stop()


def test_signals_dump_stacks_and_stop(tmp_path):
    from loguru import logger

    from actors.logsetup import close_logging, setup_logging

    buf = io.StringIO()
    setup_logging("INFO", stream=buf)
    d = start_daemon(make_settings(tmp_path))
    d.install_signal_handlers()
    try:
        os.kill(os.getpid(), signal.SIGUSR1)
        os.kill(os.getpid(), signal.SIGTERM)
        assert d.run() == 0
    finally:
        d.stop()
        d.restore_signal_handlers()
        close_logging()
        logger.add(__import__("sys").stderr)
    out = buf.getvalue()
    assert "thread dump" in out and "MainThread" in out and "test_signals_dump_stacks_and_stop" in out
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_metrics_endpoint_shows_actor_gauges(tmp_path):
    import urllib.request

    from actors.demo import free_port

    port = free_port()
    settings = make_settings(tmp_path)
    settings = settings.__class__(**{**settings.__dict__,
                                     "metrics": settings.metrics.__class__(enabled=True, host="127.0.0.1", port=port)})
    started: queue.Queue = queue.Queue()
    d = start_daemon(settings, account_starter=recording_starter(started))
    try:
        first = d.account_ref("alice")
        first.tell("crash")
        wait_restarted(d, started, "alice", first.actor_urn)  # gauges are set in the same handling
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        assert 'stashd_actor_restarts_total{actor="account:alice"} 1.0' in body
        assert "stashd_actors_alive 2.0" in body
        assert 'stashd_actor_inbox_depth{actor="account:bob"} 0.0' in body
    finally:
        d.stop()
