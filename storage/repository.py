"""The Storage repository: accounts, FloodWaits, channels.

Each method runs in its own short db_session (see storage.session) and returns
frozen records; ORM entities never escape. Time comes from the injected clock.
"""
from __future__ import annotations

import threading
import time
from typing import Callable

from pony.orm import Database, select

from storage.errors import StorageError
from storage.ingest import IngestStore
from storage.records import ACCOUNT_STATES, AccountRecord, ChannelRecord, FloodWaitRecord
from storage.redact import redact_phone
from storage.session import run_in_session
from storage.transfers import TransferStore
from storage.url import DatabaseUrl

_UNSET = object()


def _account_record(a) -> AccountRecord:
    return AccountRecord(
        name=a.name,
        user_id=a.user_id,
        phone_redacted=a.phone_redacted,
        premium=a.premium,
        upload_limit_bytes=a.upload_limit_bytes,
        state=a.state,
        cooldown_until=a.cooldown_until,
        updated_at=a.updated_at,
    )


def _check_state(state: str) -> None:
    if state not in ACCOUNT_STATES:
        raise ValueError(f"unknown account state {state!r}; expected one of {ACCOUNT_STATES}")


class Storage(TransferStore, IngestStore):
    """Repository over one database. Build it with ``storage.open_storage``.

    Transfer methods (issue 3/4) come from storage.transfers.TransferStore,
    ingest methods (issue 5) from storage.ingest.IngestStore.
    """

    def __init__(
        self,
        db: Database,
        entities,
        url: DatabaseUrl,
        *,
        schema_version: int,
        clock: Callable[[], float] = time.time,
        connections: list | None = None,
    ):
        self.db = db  # for other storage modules; not for actors
        self.entities = entities
        self.url = url
        self.schema_version = schema_version
        self._clock = clock
        self._connections = connections if connections is not None else []
        self._closed = threading.Event()

    def __repr__(self) -> str:
        return f"<Storage {self.url.safe} v{self.schema_version}>"

    @property
    def dialect(self) -> str:
        return self.url.dialect

    # -- plumbing -----------------------------------------------------------

    def _run(self, fn, *, write: bool, what: str):
        if self._closed.is_set():
            raise StorageError(f"{what}: storage is closed")
        return run_in_session(fn, write=write, what=what)

    def close(self) -> None:
        """Close every connection this Storage opened (any thread). Idempotent."""
        if self._closed.is_set():
            return
        self._closed.set()
        try:
            self.db.disconnect()
        except Exception:  # pragma: no cover - best effort
            pass
        for con in list(self._connections):
            try:
                con.close()
            except Exception:  # pragma: no cover - best effort
                pass
        self._connections.clear()

    def __enter__(self) -> "Storage":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- accounts -----------------------------------------------------------

    def _upsert_account(self, name: str, **changes) -> AccountRecord:
        if not name:
            raise ValueError("account name must not be empty")
        changes = {k: v for k, v in changes.items() if v is not _UNSET}
        if "state" in changes:
            _check_state(changes["state"])
        Account = self.entities.Account

        def tx():
            now = float(self._clock())
            account = Account.get_for_update(name=name)
            if account is None:
                fields = dict(state="starting")
                fields.update(changes)
                account = Account(name=name, updated_at=now, **fields)
            else:
                account.set(updated_at=now, **changes)
            return _account_record(account)

        return self._run(tx, write=True, what=f"update account {name!r}")

    def upsert_account(
        self,
        name: str,
        *,
        user_id: int | None = None,
        phone: str | None = None,
        premium: bool | None = None,
        upload_limit_bytes: int | None = None,
        state: str | None = None,
    ) -> AccountRecord:
        """Create or update an account; None leaves a field as it is.

        The phone is stored only in redacted form. A new account starts in
        state "starting" unless ``state`` says otherwise.
        """
        given = dict(
            user_id=user_id,
            phone_redacted=redact_phone(phone),
            premium=None if premium is None else bool(premium),
            upload_limit_bytes=upload_limit_bytes,
            state=state,
        )
        return self._upsert_account(
            name, **{k: (_UNSET if v is None else v) for k, v in given.items()}
        )

    def get_account(self, name: str) -> AccountRecord | None:
        Account = self.entities.Account

        def tx():
            account = Account.get(name=name)
            return None if account is None else _account_record(account)

        return self._run(tx, write=False, what=f"read account {name!r}")

    def list_accounts(self) -> list[AccountRecord]:
        Account = self.entities.Account

        def tx():
            return [_account_record(a) for a in Account.select().order_by(Account.name)]

        return self._run(tx, write=False, what="list accounts")

    def set_account_state(self, name: str, state: str) -> AccountRecord:
        """Set the state (creating the account row if needed)."""
        _check_state(state)
        return self._upsert_account(name, state=state)

    def set_account_cooldown(self, name: str, until: float | None) -> AccountRecord:
        """Set or clear (None) the account-wide cooldown (creating the row if needed)."""
        return self._upsert_account(name, cooldown_until=None if until is None else float(until))

    # -- FloodWaits ---------------------------------------------------------

    def record_flood_wait(self, account: str, request_kind: str, seconds: float) -> FloodWaitRecord:
        """Remember "no ``request_kind`` from ``account`` until clock()+seconds".

        An existing wait that ends later is kept; the stored record is returned.
        """
        if not account or not request_kind:
            raise ValueError("account and request_kind must not be empty")
        if seconds < 0:
            raise ValueError(f"FloodWait seconds must not be negative, got {seconds}")
        FloodWait = self.entities.FloodWait

        def tx():
            until = float(self._clock()) + float(seconds)
            row = FloodWait.get_for_update(account=account, request_kind=request_kind)
            if row is None:
                row = FloodWait(account=account, request_kind=request_kind, until=until)
            elif until > row.until:
                row.until = until
            return FloodWaitRecord(row.account, row.request_kind, row.until)

        return self._run(tx, write=True, what=f"record FloodWait for {account!r}")

    def active_flood_waits(self, account: str) -> dict[str, float]:
        """request_kind -> until, for the waits of ``account`` still running."""
        FloodWait = self.entities.FloodWait

        def tx():
            now = float(self._clock())
            rows = select(
                (f.request_kind, f.until)
                for f in FloodWait
                if f.account == account and f.until > now
            )
            return {kind: until for kind, until in rows}

        return self._run(tx, write=False, what=f"read FloodWaits of {account!r}")

    def prune_flood_waits(self) -> int:
        """Delete expired FloodWaits; return how many went."""
        FloodWait = self.entities.FloodWait

        def tx():
            now = float(self._clock())
            return FloodWait.select(lambda f: f.until <= now).delete(bulk=True)

        return self._run(tx, write=True, what="prune FloodWaits")

    # -- channels -----------------------------------------------------------

    def upsert_channel(
        self,
        channel_id: int,
        *,
        title: str,
        username: str | None,
        is_forum: bool = False,
        seen_by: str | None = None,
    ) -> ChannelRecord:
        """Create or update a channel; ``seen_by`` adds an account that can see it."""
        Channel, SeenBy = self.entities.Channel, self.entities.ChannelSeenBy
        channel_id = int(channel_id)

        def tx():
            now = float(self._clock())
            channel = Channel.get_for_update(channel_id=channel_id)
            fields = dict(title=title or "", username=username or None,
                          is_forum=bool(is_forum), updated_at=now)
            if channel is None:
                channel = Channel(channel_id=channel_id, **fields)
            else:
                channel.set(**fields)
            if seen_by and SeenBy.get(channel=channel, account=seen_by) is None:
                SeenBy(channel=channel, account=seen_by)
            return ChannelRecord(
                channel_id=channel.channel_id,
                title=channel.title,
                username=channel.username,
                is_forum=channel.is_forum,
                seen_by=tuple(sorted(s.account for s in channel.seen_by)),
            )

        return self._run(tx, write=True, what=f"update channel {channel_id}")

    def list_channels(self) -> list[ChannelRecord]:
        Channel, SeenBy = self.entities.Channel, self.entities.ChannelSeenBy

        def tx():
            seen: dict[int, list[str]] = {}
            for cid, account in select((s.channel.channel_id, s.account) for s in SeenBy):
                seen.setdefault(cid, []).append(account)
            return [
                ChannelRecord(
                    channel_id=c.channel_id,
                    title=c.title,
                    username=c.username,
                    is_forum=c.is_forum,
                    seen_by=tuple(sorted(seen.get(c.channel_id, ()))),
                )
                for c in Channel.select().order_by(Channel.channel_id)
            ]

        return self._run(tx, write=False, what="list channels")
