"""Short db_sessions with retry on transient conflicts.

SQLite: Pony serialises writers inside one process and ``busy_timeout`` makes
other processes wait, so "database is locked" should not surface; if it does
(a busy timeout ran out, a checkpoint race) the whole transaction is retried.
PostgreSQL: serialization failures, deadlocks, optimistic-check failures and
insert races on a unique key are retried the same way.
"""
from __future__ import annotations

import random
import time
from typing import Callable, TypeVar

from pony.orm import db_session
from pony.orm.core import OrmError, TransactionError
from pony.orm.dbapiprovider import DBException, IntegrityError

from storage.errors import StorageError

T = TypeVar("T")

MAX_ATTEMPTS = 12
_PG_RETRY_CODES = {"40001", "40P01"}  # serialization_failure, deadlock_detected


def _is_transient(exc: BaseException) -> bool:
    seen = 0
    while exc is not None and seen < 8:
        if isinstance(exc, (TransactionError, IntegrityError)):
            return True
        if getattr(exc, "pgcode", None) in _PG_RETRY_CODES:
            return True
        text = str(exc).lower()
        if "database is locked" in text or "database table is locked" in text or "busy" in text:
            return True
        original = getattr(exc, "original_exc", None)
        exc = original if original is not None else exc.__cause__
        seen += 1
    return False


def run_in_session(
    fn: Callable[[], T],
    *,
    write: bool,
    what: str,
    attempts: int = MAX_ATTEMPTS,
    sleep: Callable[[float], None] = time.sleep,
) -> T:
    """Call ``fn`` inside its own db_session; retry it when the conflict is transient.

    ``write=True`` starts the transaction immediately (SQLite ``BEGIN IMMEDIATE``),
    so a read-modify-write never upgrades a read lock. Database errors that are
    not transient, or still failing after ``attempts``, become StorageError.
    """
    for attempt in range(1, attempts + 1):
        try:
            with db_session(immediate=write):
                return fn()
        except (DBException, OrmError) as exc:
            if attempt < attempts and _is_transient(exc):
                sleep(min(0.5, 0.005 * 2 ** attempt) * (0.5 + random.random()))
                continue
            raise StorageError(f"{what} failed: {type(exc).__name__}: {exc}") from exc
    raise AssertionError("unreachable")  # pragma: no cover
