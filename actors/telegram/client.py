"""Build the TelegramClient an AccountActor owns (real Telegram or the simulation).

Call `build_client` on the thread whose loop will run the client (the account
actor's): Telethon binds the client to the loop it connects on.  The flood sleep
threshold is always 0, so every FloodWait reaches the account actor, which records
it in the persisted ledger instead of sleeping through it.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from telethon import TelegramClient
from telethon.crypto import rsa
from telethon.sessions import SQLiteSession

__all__ = ["build_client", "open_session", "load_rsa_key", "DEFAULT_DC", "TEST_DC_HOST"]

DEFAULT_DC = (2, "149.154.167.50", 443)
TEST_DC_HOST = "149.154.167.40"  # Telegram's test DC 2
DEVICE_MODEL = "stashd"

_loaded_rsa: set[Path] = set()


def open_session(session_path: Path | str) -> SQLiteSession:
    """Telethon SQLite session for a `.session` file (the suffix is optional)."""
    path = Path(session_path)
    if path.suffix == ".session":
        path = path.with_suffix("")
    return SQLiteSession(str(path))


def load_rsa_key(path: Path) -> None:
    """Add an extra server RSA public key (PEM, PKCS#1) to Telethon's key table, once."""
    path = Path(path)
    if path in _loaded_rsa:
        return
    rsa.add_key(path.read_text(), old=False)
    _loaded_rsa.add(path)


def _endpoint(tg: Any) -> tuple[int, str, int]:
    host = tg.host
    if tg.test_servers and host == DEFAULT_DC[1]:
        host = TEST_DC_HOST
    return int(tg.dc_id), host, int(tg.port)


def build_client(
    settings: Any,
    session_path: Path | str,
    *,
    transport_factory: Callable[[], Any] | None = None,
) -> TelegramClient:
    """A not yet connected client for one session, per `settings.telegram.mode`.

    simulated: the simulated Telegram's client over `transport_factory()` (default:
    the standalone sim server at `settings.telegram.sim_socket`).
    real: Telethon's client on the configured endpoint.  A non-default endpoint is
    written into the session only while it has no auth key yet or already points at
    the same DC (a session that migrated to its home DC keeps it).
    """
    tg = settings.telegram
    if tg.mode not in ("real", "simulated"):
        raise ValueError(f"telegram.mode must be 'real' or 'simulated', not {tg.mode!r}")
    session = open_session(session_path)
    if tg.mode == "simulated":
        from actors.telegram.sim.client import make_sim_client

        if transport_factory is None:
            from actors.telegram.sim.remote import RemoteTransport

            socket_path = tg.sim_socket

            def transport_factory() -> Any:
                return RemoteTransport(socket_path)

        return make_sim_client(session, transport_factory, flood_sleep_threshold=0)
    if tg.rsa_key_file:
        load_rsa_key(tg.rsa_key_file)
    endpoint = _endpoint(tg)
    if endpoint != DEFAULT_DC and (session.auth_key is None or session.dc_id == endpoint[0]):
        session.set_dc(*endpoint)
    return TelegramClient(
        session,
        int(tg.api_id),
        tg.api_hash,
        flood_sleep_threshold=0,
        request_retries=3,
        connection_retries=3,
        retry_delay=1,
        timeout=int(max(1, tg.request_timeout_seconds)),
        device_model=DEVICE_MODEL,
        receive_updates=True,
    )
