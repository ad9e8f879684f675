"""Storage errors: one base class for the package."""
from __future__ import annotations


class StorageError(Exception):
    """Anything that goes wrong opening or using the database.

    Messages never contain passwords or full phone numbers.
    """


class SchemaVersionError(StorageError):
    """The database was written by a newer stashd than this one."""

    def __init__(self, db_version: int, supported: int):
        self.db_version = db_version
        self.supported = supported
        super().__init__(
            f"database schema is version {db_version}, this stashd supports up to "
            f"{supported}; upgrade stashd"
        )
