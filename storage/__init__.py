"""Database models and queries (Pony ORM) behind a small repository API.

    from storage import open_storage
    store = open_storage("sqlite:///var/lib/stashd/stashd.db")
    store.upsert_account("alice", phone="+15551234567", premium=True)
"""
from storage.database import open_storage
from storage.errors import SchemaVersionError, StorageError
from storage.migrations import CURRENT_VERSION
from storage.records import ACCOUNT_STATES, AccountRecord, ChannelRecord, FloodWaitRecord
from storage.repository import Storage
from storage.transfers import (
    TRANSFER_STATES,
    TRANSFER_TRANSITIONS,
    ClaimResult,
    LeaseLostError,
    PackageRecord,
    PartConflictError,
    PartRecord,
    TransferExistsError,
    TransferNotFoundError,
    TransferRecord,
    TransferStateError,
)

__all__ = [
    "ACCOUNT_STATES",
    "AccountRecord",
    "ChannelRecord",
    "CURRENT_VERSION",
    "FloodWaitRecord",
    "SchemaVersionError",
    "Storage",
    "StorageError",
    "open_storage",
    "TRANSFER_STATES",
    "TRANSFER_TRANSITIONS",
    "ClaimResult",
    "LeaseLostError",
    "PackageRecord",
    "PartConflictError",
    "PartRecord",
    "TransferExistsError",
    "TransferNotFoundError",
    "TransferRecord",
    "TransferStateError",
]
