"""A simulated Telegram world with real AccountActors (real Telethon over the
in-process transport), real storage and a real BudgetActor, for the ingest
engine's tests (scanner, downloader, pipeline, IngestActor)."""
from __future__ import annotations

import os
from pathlib import Path

import pykka

from actors.account import AccountActor
from actors.budget import BudgetActor
from actors.telegram.client import build_client
from actors.telegram.sim.local import LocalTransport
from actors.telegram.sim.world import SimWorld, write_session_file
from config.loader import settings_from_dict
from storage.database import open_storage

MIB = 1024 * 1024


class FakeClock:
    def __init__(self, now: float = 1_700_000_000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


class SimEnv:
    """alice (regular) and bob (Premium) read ``source_a`` (and ``source_b``,
    ``forum``); both are admins of ``dest`` (username stash_archive)."""

    def __init__(self, tmp_path: Path, db_url: str | None = None, *, ingest: dict | None = None,
                 budget_bytes: int = 64 * MIB, accounts=("alice", "bob")):
        self.tmp = tmp_path
        self.clock = FakeClock()
        self.world = SimWorld(tmp_path / "sim", clock=self.clock)
        w = self.world
        self.users = {
            "alice": w.create_user("Alice", username="alice", phone="+15550001111"),
            "bob": w.create_user("Bob", username="bob", phone="+15550002222", premium=True),
        }
        ids = [u.user_id for u in self.users.values()]
        self.dest = w.create_channel("Stash", username="stash_archive", admins=ids)
        self.source_a = w.create_channel("Source A", username="sim_source_a", members=ids)
        self.source_b = w.create_channel("Source B", username="sim_source_b", members=ids)
        self.forum = w.create_channel("Forum", username="sim_forum", forum=True, members=ids)
        self.poster = w.create_user("Poster", username="poster")
        for ch in (self.source_a, self.source_b, self.forum):
            w.add_member(ch, self.poster.user_id, admin=True)
        config = {"daemon": {"state_dir": str(tmp_path)}, "telegram": {"mode": "simulated"},
                  "upload": {"destination": "stash_archive", "budget_bytes": budget_bytes},
                  "accounts": [{"session": a} for a in accounts]}
        if ingest is not None:
            config["ingest"] = ingest
        self.settings = settings_from_dict(config, base_dir=tmp_path, env={})
        self.storage = open_storage(db_url or f"sqlite:///{tmp_path / 'stashd.db'}", clock=self.clock)
        self.refs: dict[str, pykka.ActorRef] = {}
        for name in accounts:
            self.start_account(name)
        up = self.settings.upload
        self.budget = BudgetActor.start(up.budget_bytes, up.global_slots, up.window, {},
                                        clock=self.clock)

    def start_account(self, name: str) -> pykka.ActorRef:
        session = write_session_file(self.tmp / "sessions" / name, self.users[name].auth_key)
        factory = lambda: build_client(self.settings, session,  # noqa: E731
                                       transport_factory=lambda: LocalTransport(self.world))
        ref = AccountActor.start(name, session, self.settings, self.storage, None, self.clock,
                                 client_factory=factory)
        self.refs[name] = ref
        return ref

    def post(self, name: str, data: bytes | None = None, size: int = 0, *, channel: int | None = None,
             caption: str = "", topic_id: int | None = None) -> int:
        data = data if data is not None else os.urandom(size)
        return self.world.post_document(channel or self.source_a, self.poster.user_id, name, data,
                                        caption=caption, topic_id=topic_id)

    def forward(self, src_channel: int, msg_id: int, dst_channel: int) -> int:
        """A forward: a new message in ``dst_channel`` sharing the same document."""
        w = self.world
        with w._lock, w._state.transaction():  # noqa: SLF001 - no forward API in the sim yet
            row = w._state.message(src_channel, msg_id)  # noqa: SLF001
            return w._state.insert_message(dst_channel, date=self.clock(),  # noqa: SLF001
                                           sender_id=self.poster.user_id, text=row["text"],
                                           document_id=row["document_id"])

    def count(self, account: str, request: str) -> int:
        from actors.telegram.sim.world import auth_key_id
        key = auth_key_id(self.users[account].auth_key)
        return sum(1 for k, n, _ in self.world.request_log if k == key and n == request)

    def close(self) -> None:
        pykka.ActorRegistry.stop_all(block=True, timeout=10)
        self.storage.close()
        self.world.close()
