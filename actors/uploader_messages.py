"""Messages an UploaderActor receives and its replies (frozen: pykka does not copy them)."""
from __future__ import annotations

from dataclasses import dataclass

from actors.uploader_core import UploadStats


@dataclass(frozen=True)
class UploadTransfer:
    """Upload every part of a planned/uploading transfer that has no message yet (ask).

    The transfer row and its manifest must exist (manifest first).  ``account``
    is the AccountActor chosen by the caller (idle, not cooling down, within
    quota, limit fits); ``channel`` defaults to the manifest's destination.
    Replied with TransferUploadedResult, or the error in the future.
    """

    transfer_id: str
    account: str
    channel: int | str | None = None


@dataclass(frozen=True)
class StopUpload:
    """Stop the upload of ``transfer_id`` if it runs now (tell; e.g. its content claim is lost).

    The running UploadTransfer ask fails with UploadStoppedError; what was sent
    is recorded, the transfer stays "uploading" (resumable).
    """

    transfer_id: str
    reason: str = ""


@dataclass(frozen=True)
class PartSent:
    index: int
    message_id: int
    document_id: int | None
    stats: UploadStats | None   # None: the part already had its message (resume)


@dataclass(frozen=True)
class TransferUploadedResult:
    transfer_id: str
    state: str                  # "uploaded"
    parts: tuple[PartSent, ...]
