"""A TelegramClient whose every request goes to the simulated Telegram."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from telethon import TelegramClient
from telethon.tl import functions
from telethon.tl.alltlobjects import LAYER

from .sender import SimSender
from .world import write_session_file  # noqa: F401  (re-exported for callers)


class SimTelegramClient(TelegramClient):
    """TelegramClient with ``_sender`` (and every exported sender) a SimSender."""

    def __init__(self, session, api_id, api_hash, *, transport_factory: Callable[[], object], **kwargs):
        super().__init__(session, api_id, api_hash, **kwargs)
        self._transport_factory = transport_factory
        self._sender = self._new_sim_sender(self.session.auth_key, main=True)

    def _new_sim_sender(self, auth_key, *, main: bool) -> SimSender:
        extra = {}
        if main:
            extra = dict(auth_key_callback=self._auth_key_callback, updates_queue=self._updates_queue,
                         auto_reconnect_callback=self._handle_auto_reconnect)
        return SimSender(
            auth_key, loggers=self._log, transport_factory=self._transport_factory,
            retries=self._connection_retries, delay=self._retry_delay,
            auto_reconnect=self._auto_reconnect, connect_timeout=self._timeout, **extra,
        )

    async def _create_exported_sender(self, dc_id):
        # Same steps as TelegramClient._create_exported_sender, with a SimSender.
        dc = await self._get_dc(dc_id)
        sender = self._new_sim_sender(None, main=False)
        await sender.connect(self._connection(
            dc.ip_address, dc.port, dc.id, loggers=self._log, proxy=self._proxy,
            local_addr=self._local_addr,
        ))
        auth = await self(functions.auth.ExportAuthorizationRequest(dc_id))
        self._init_request.query = functions.auth.ImportAuthorizationRequest(id=auth.id, bytes=auth.bytes)
        await sender.send(functions.InvokeWithLayerRequest(LAYER, self._init_request))
        return sender


def make_sim_client(session, transport_factory: Callable[[], object], *, api_id: int = 1,
                    api_hash: str = "sim", **kw) -> TelegramClient:
    """Build a client talking to the simulated Telegram through transport_factory().

    ``session`` is a path (str/Path) or a Telethon Session. Call this on the
    thread whose event loop will own the client. ``kw`` goes to TelegramClient
    (e.g. ``flood_sleep_threshold=0``, ``receive_updates=False``).
    """
    if isinstance(session, Path):
        session = str(session)
    kw.setdefault("retry_delay", 0)
    return SimTelegramClient(session, api_id, api_hash, transport_factory=transport_factory, **kw)
