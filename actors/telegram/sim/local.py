"""LocalTransport: the simulated Telegram answered in this process."""

from __future__ import annotations

import asyncio
import threading


class LocalTransport:
    """Calls ``world.handle_bytes`` inline on the caller's loop, then sleeps for
    the injected latency/bandwidth delay. A ``drop`` fault raises ConnectionError
    before the request reaches the world (the request was never delivered)."""

    def __init__(self, world):
        self.world = world
        self.closed = False

    async def invoke(self, auth_key_id: int, request_name: str, data: bytes) -> bytes:
        if self.closed:
            raise ConnectionError("transport closed")
        world = self.world
        world.log_request(auth_key_id, request_name, threading.current_thread().name)
        if world.should_drop(auth_key_id, request_name):
            raise ConnectionError(f"simulated connection drop on {request_name}")
        result = world.handle_bytes(auth_key_id, data)
        delay = world.delay_for(auth_key_id, request_name, len(data) + len(result))
        await asyncio.sleep(delay)
        return result

    async def close(self) -> None:
        self.closed = True
