"""Shared by the actor tests that run real AccountActors (real Telethon) over the
in-process simulated Telegram: settings, starting one account, tearing down."""
from __future__ import annotations

import queue

import pykka

from actors.account import AccountActor
from actors.telegram.client import build_client
from actors.telegram.sim.local import LocalTransport
from actors.telegram.sim.world import write_session_file
from config.loader import settings_from_dict
from tests.telegram.sim_helpers import Clock  # noqa: F401  (the 1_700_000_000.0 clock these tests use)


def sim_settings(tmp_path):
    """Daemon settings in simulated-Telegram mode, state under tmp_path."""
    return settings_from_dict(
        {"daemon": {"state_dir": str(tmp_path)}, "telegram": {"mode": "simulated"}},
        base_dir=tmp_path, env={})


def start_sim_account(name, user, *, tmp, world, settings, storage, clock):
    """An AccountActor for a sim user, its session file under tmp/sessions, talking
    to world in-process through real Telethon."""
    session = write_session_file(tmp / "sessions" / name, user.auth_key)
    factory = lambda: build_client(settings, session,  # noqa: E731
                                   transport_factory=lambda: LocalTransport(world))
    return AccountActor.start(name, session, settings, storage, None, clock,
                              client_factory=factory)


def stop_sim(storage, world):
    pykka.ActorRegistry.stop_all(block=True, timeout=10)
    storage.close()
    world.close()


def sim_account_starter(world):
    """A Daemon account_starter: real AccountActors talking to world in-process."""
    def starter(name, session_path, settings, storage, metrics, clock, *, listener=None):
        factory = lambda: build_client(settings, session_path,  # noqa: E731
                                       transport_factory=lambda: LocalTransport(world))
        return AccountActor.start(name, session_path, settings, storage, metrics, clock,
                                  listener=listener, client_factory=factory)
    return starter


def uploaded_queue(monkeypatch) -> queue.Queue:
    """A queue of transfer ids, put the moment storage marks one uploaded (no polling)."""
    from storage.transfers import TransferStore

    done: queue.Queue = queue.Queue()
    original = TransferStore.mark_transfer_uploaded

    def mark(self, transfer_id, **kw):
        record = original(self, transfer_id, **kw)
        done.put(transfer_id)
        return record

    monkeypatch.setattr(TransferStore, "mark_transfer_uploaded", mark)
    return done


def daemon_settings(tmp_path, db_url, **sections):
    """Settings of an in-process daemon over the sim: state in ``tmp_path``, no metrics
    port, restarts without back-off; ``sections`` add or replace whole sections."""
    return settings_from_dict({
        "daemon": {"state_dir": str(tmp_path), "sessions_dir": "sessions"},
        "database": {"url": db_url},
        "telegram": {"mode": "simulated"},
        "metrics": {"enabled": False},
        "supervisor": {"backoff_initial_seconds": 0.0, "backoff_max_seconds": 0.0,
                       "stop_timeout_seconds": 5},
        **sections,
    }, base_dir=tmp_path, env={})
