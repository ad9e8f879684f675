"""Messages the VerifierActor receives and its replies (all frozen; pykka does not copy).

- :class:`Tick` (tell, from the daemon's ticker): run one pass over the due work.
- :class:`VerifyNow` (ask): make one transfer (or every verifiable transfer) due
  now and run a pass at once; replied with :class:`VerifyResult`.  This is what
  ``stashctl verify [TRANSFER]`` asks (give the ask a timeout of a minute or so:
  a pass asks AccountActors).
- :class:`GetVerifierStatus` (ask): replied with :class:`VerifierStatusResult`
  (for ``stashctl status``; ``to_dict()`` is msgpack-safe).  Answered while an
  original is hashed: that runs on the actor's hashing thread.
- :class:`OriginalChecked` (tell, from the actor's own hashing thread): a hash
  before a re-upload ended; the transfer is checked again at once.

Outcome of one transfer's check, :class:`TransferOutcome`, ``result`` one of:

    "verified"    every part present (state -> verified)
    "cleaned"     verified, then cleaned up (originals per policy; the manifest
                  removed unless the original was kept)
    "reuploading" parts missing; re-upload queued (state -> uploading)
    "waiting"     parts missing, re-upload delayed by backoff, or the original
                  still being hashed before it (state verifying; cleaned kept)
    "failed"      max attempts reached, original gone/changed, manifest unusable
    "lost"        a message of a cleaned transfer is gone and its original was
                  deleted or changed (nothing to re-upload from; a kept, unchanged
                  original is re-uploaded: "reuploading")
    "error"       the check could not be made (error/timeout/no account): NOT a
                  pass; retried later with backoff, nothing recorded
    "following"   a duplicate whose referenced transfer is not verified yet
    "skipped"     the lease was lost or the state changed under us
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

__all__ = ["Tick", "VerifyNow", "GetVerifierStatus", "OriginalChecked", "TransferOutcome",
           "VerifyResult", "VerifierStatusResult", "OUTCOMES"]

OUTCOMES = ("verified", "cleaned", "reuploading", "waiting", "failed", "lost", "error",
            "following", "skipped")


@dataclass(frozen=True)
class Tick:
    """Look for due checks (told by the daemon's ticker)."""


@dataclass(frozen=True)
class VerifyNow:
    """Check ``transfer_id`` now (None: every transfer that can be verified)."""

    transfer_id: str | None = None


@dataclass(frozen=True)
class GetVerifierStatus:
    pass


@dataclass(frozen=True)
class OriginalChecked:
    """The hashing thread finished checking ``transfer_id``'s original (told to itself):
    the transfer is due now, and a pass acts on the verdict."""

    transfer_id: str


@dataclass(frozen=True)
class TransferOutcome:
    transfer_id: str
    result: str                      # one of OUTCOMES
    state: str | None = None         # the transfer's state afterwards, when known
    missing: tuple[int, ...] = ()    # part indexes found missing
    detail: str = ""                 # why (failed/lost/error reasons)

    def __str__(self) -> str:
        extra = f" missing={list(self.missing)}" if self.missing else ""
        why = f": {self.detail}" if self.detail else ""
        return f"{self.transfer_id} {self.result}{extra}{why}"

    def to_dict(self) -> dict:
        d = asdict(self)
        d["missing"] = list(self.missing)
        return d


@dataclass(frozen=True)
class VerifyResult:
    """Reply to VerifyNow: how many transfers were made due, what the pass did."""

    scheduled: int
    outcomes: tuple[TransferOutcome, ...] = ()

    def to_dict(self) -> dict:
        return {"scheduled": self.scheduled, "outcomes": [o.to_dict() for o in self.outcomes]}


@dataclass(frozen=True)
class VerifierStatusResult:
    owner: str                       # lease owner id of this verifier
    enabled: bool
    passes: int                      # passes run since start
    last_pass_at: float | None       # clock time the last pass ended
    due: int                         # transfers due for a check now
    lag_seconds: float               # now - oldest due check (0 when none is due)
    checks: dict[str, int] = field(default_factory=dict)     # part checks by result since start
    outcomes: dict[str, int] = field(default_factory=dict)   # transfer outcomes since start
    reuploads: int = 0
    cleanups: int = 0
    lost: int = 0
    last_error: str | None = None
    hashing: int = 0                 # originals being hashed now (off the actor's thread)

    def to_dict(self) -> dict:
        return asdict(self)
