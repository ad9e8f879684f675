"""Shared by the simulated-Telegram tests: a settable clock and raw calls into a SimWorld."""
from __future__ import annotations

from telethon.extensions import BinaryReader
from telethon.tl import functions, types

from actors.telegram.sim.world import auth_key_id


class Clock:
    def __init__(self, now: float = 1_700_000_000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


def call(world, user, request):
    """Send one TL request as user straight into the world and read its result."""
    raw = world.handle_bytes(auth_key_id(user.auth_key), bytes(request))
    return request.read_result(BinaryReader(raw))


def peer(world, user, channel_id):
    """The InputPeerChannel user sees for channel_id (from its dialogs)."""
    result = call(world, user, functions.messages.GetDialogsRequest(None, 0, types.InputPeerEmpty(), 100, 0))
    chat = next(c for c in result.chats if c.id == channel_id)
    return types.InputPeerChannel(chat.id, chat.access_hash)
