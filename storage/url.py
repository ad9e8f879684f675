"""Database URLs: parsing, a password-free display form, raw DB-API connections."""
from __future__ import annotations

import os
import sqlite3
from dataclasses import dataclass, field
from urllib.parse import unquote, urlsplit

from storage.errors import StorageError

SQLITE_BUSY_TIMEOUT_MS = 30_000
PG_CONNECT_TIMEOUT_S = 10


@dataclass(frozen=True)
class DatabaseUrl:
    """A parsed ``sqlite:///abs/path`` or ``postgresql://user[:pw]@host:port/db``."""

    dialect: str  # "sqlite" | "postgres"
    path: str | None = None
    host: str | None = None
    port: int | None = None
    user: str | None = None
    password: str | None = field(default=None, repr=False)
    database: str | None = None

    def __str__(self) -> str:
        return self.safe

    @property
    def safe(self) -> str:
        """The URL with the password masked: fit for logs and error messages."""
        if self.dialect == "sqlite":
            return f"sqlite:///{self.path}"
        auth = self.user or ""
        if self.password:
            auth += ":***"
        if auth:
            auth += "@"
        return f"postgresql://{auth}{self.host}:{self.port}/{self.database}"

    def pony_bind_args(self, *, create: bool) -> dict:
        if self.dialect == "sqlite":
            return dict(
                provider="sqlite",
                filename=self.path,
                create_db=create,
                timeout=SQLITE_BUSY_TIMEOUT_MS / 1000,
                check_same_thread=False,
            )
        args = dict(
            provider="postgres",
            host=self.host,
            port=self.port,
            user=self.user,
            database=self.database,
            connect_timeout=PG_CONNECT_TIMEOUT_S,
            application_name="stashd",
        )
        if self.password:
            args["password"] = self.password
        return args

    def connect_raw(self, *, create: bool):
        """A plain DB-API connection in autocommit mode (for migrations)."""
        if self.dialect == "sqlite":
            if not create and not os.path.exists(self.path):
                raise StorageError(f"database file does not exist: {self.path}")
            parent = os.path.dirname(self.path)
            if not os.path.isdir(parent):
                raise StorageError(f"directory for the database does not exist: {parent}")
            try:
                con = sqlite3.connect(
                    self.path,
                    isolation_level=None,
                    timeout=SQLITE_BUSY_TIMEOUT_MS / 1000,
                    check_same_thread=False,
                )
                con.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}")
            except sqlite3.Error as exc:
                raise StorageError(f"cannot open SQLite database {self.path}: {exc}") from None
            return con
        try:
            import psycopg2
        except ImportError:  # pragma: no cover - extras not installed
            raise StorageError("PostgreSQL support needs psycopg2 (pip install stashd[postgres])") from None
        try:
            con = psycopg2.connect(
                host=self.host,
                port=self.port,
                user=self.user,
                password=self.password,
                dbname=self.database,
                connect_timeout=PG_CONNECT_TIMEOUT_S,
                application_name="stashd",
            )
        except psycopg2.Error as exc:
            raise StorageError(f"cannot connect to {self.safe}: {_first_line(exc)}") from None
        con.autocommit = True
        return con


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def parse_url(url: str) -> DatabaseUrl:
    """Parse a database URL; raise StorageError (password-free) when it is unusable."""
    if not isinstance(url, str) or not url:
        raise StorageError("database URL is empty")
    if url.startswith("sqlite:"):
        # Both sqlite:///abs/path.db and SQLAlchemy's sqlite:////abs/path.db
        # name the absolute path /abs/path.db; relative paths are not accepted.
        if not url.startswith("sqlite:///"):
            raise StorageError("SQLite URL must look like sqlite:///absolute/path.db")
        path = unquote(url[len("sqlite:///"):])
        if "?" in path or "#" in path:
            raise StorageError("SQLite URL takes no query string: sqlite:///absolute/path.db")
        path = "/" + path.lstrip("/")
        if path == "/" or path.endswith("/") or ":memory:" in path:
            raise StorageError(
                f"SQLite URL needs an absolute file path (sqlite:///abs/path.db), got {url!r}"
            )
        return DatabaseUrl("sqlite", path=os.path.normpath(path))
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise StorageError("database URL is malformed (bad port?)") from None
    if parts.scheme in ("postgresql", "postgres"):
        database = unquote(parts.path.lstrip("/"))
        if not parts.hostname or not database or "/" in database:
            safe = DatabaseUrl(
                "postgres", host=parts.hostname or "?", port=port or 5432,
                user=unquote(parts.username or ""), password="x" if parts.password else None,
                database=database or "?",
            ).safe
            raise StorageError(
                f"PostgreSQL URL must look like postgresql://user[:pw]@host:port/db, got {safe}"
            )
        return DatabaseUrl(
            "postgres",
            host=parts.hostname,
            port=port or 5432,
            user=unquote(parts.username) if parts.username else None,
            password=unquote(parts.password) if parts.password else None,
            database=database,
        )
    scheme = parts.scheme or "(none)"
    raise StorageError(
        f"unsupported database URL scheme {scheme!r}: use sqlite:///abs/path.db or "
        "postgresql://user[:pw]@host:port/db"
    )
