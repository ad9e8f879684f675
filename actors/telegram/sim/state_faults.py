"""Injected faults: FloodWait, RPC errors, dropped connections, latency, bandwidth."""

from __future__ import annotations

import dataclasses
import json
import random
from dataclasses import dataclass

from .errors import SimRpcError, flood_wait

FAULT_KINDS = ("flood", "error", "drop", "latency", "bandwidth")


@dataclass(frozen=True)
class Fault:
    """One fault rule. ``request`` is a Telethon request class name such as
    ``"SaveBigFilePartRequest"`` (None = every request); ``account`` a user id
    (None = every account); ``fraction`` of matching requests is affected."""

    kind: str
    request: str | None = None
    fraction: float = 1.0
    seconds: float = 0
    error: str = ""
    code: int = 400
    account: int | None = None
    bytes_per_second: int = 0

    def __post_init__(self):
        if self.kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault kind {self.kind!r}; expected one of {FAULT_KINDS}")
        if not 0.0 <= self.fraction <= 1.0:
            raise ValueError("fraction must be within 0..1")
        if self.kind == "error" and not self.error:
            raise ValueError("an error fault needs error=, e.g. 'RPC_CALL_FAIL'")
        if self.kind == "bandwidth" and self.bytes_per_second <= 0:
            raise ValueError("a bandwidth fault needs bytes_per_second > 0")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Fault":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def matches(self, request_name: str, user_id: int | None) -> bool:
        if self.request is not None and self.request != request_name:
            return False
        return self.account is None or self.account == user_id


class FaultSet:
    """The active faults, mirrored in the ``faults`` table of the world db."""

    def __init__(self, state, seed: int = 0):
        self._state = state
        self._rng = random.Random(seed)
        self.faults: list[Fault] = [
            Fault.from_dict(json.loads(r["spec"])) for r in state.all("SELECT spec FROM faults ORDER BY id")
        ]

    def add(self, fault: Fault) -> None:
        self._state.run("INSERT INTO faults(spec) VALUES(?)", json.dumps(fault.to_dict()))
        self.faults.append(fault)

    def clear(self) -> None:
        self._state.run("DELETE FROM faults")
        self.faults = []

    def _hit(self, fault: Fault) -> bool:
        return fault.fraction >= 1.0 or self._rng.random() < fault.fraction

    def _matching(self, kind: str, request_name: str, user_id: int | None):
        return [f for f in self.faults if f.kind == kind and f.matches(request_name, user_id)]

    def raise_for(self, request_name: str, user_id: int | None) -> None:
        """Raise the RPC error of the first flood/error fault that fires."""
        for fault in self.faults:
            if fault.kind not in ("flood", "error") or not fault.matches(request_name, user_id):
                continue
            if not self._hit(fault):
                continue
            if fault.kind == "flood":
                raise flood_wait(fault.seconds)
            raise SimRpcError(fault.code, fault.error)

    def should_drop(self, request_name: str, user_id: int | None) -> bool:
        return any(self._hit(f) for f in self._matching("drop", request_name, user_id))

    def delay_for(self, request_name: str, user_id: int | None, nbytes: int) -> float:
        delay = 0.0
        for fault in self._matching("latency", request_name, user_id):
            if self._hit(fault):
                delay += float(fault.seconds)
        for fault in self._matching("bandwidth", request_name, user_id):
            delay += nbytes / float(fault.bytes_per_second)
        return delay
