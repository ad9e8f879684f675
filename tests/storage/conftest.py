"""Helpers for the storage tests: an injectable clock and raw catalog access."""
from __future__ import annotations

import pytest

from storage.migrations import MigrationConnection
from storage.url import parse_url


class FakeClock:
    def __init__(self, now: float = 1_000_000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock():
    return FakeClock()


class RawDb:
    """A plain DB-API connection beside Pony, to look at what really is stored."""

    def __init__(self, url: str):
        self.url = parse_url(url)
        self.conn = MigrationConnection(self.url.connect_raw(create=True), self.url.dialect)

    def rows(self, sql: str, params=()) -> list[tuple]:
        return [tuple(r) for r in self.conn.execute(sql, params).fetchall()]

    def execute(self, sql: str, params=()) -> None:
        self.conn.execute(sql, params)

    def tables(self) -> list[str]:
        if self.url.dialect == "sqlite":
            return [r[0] for r in self.rows(
                "SELECT name FROM sqlite_master WHERE type = 'table' "
                "AND name NOT LIKE 'sqlite_%' ORDER BY name")]
        return [r[0] for r in self.rows(
            "SELECT table_name FROM information_schema.tables "
            "WHERE table_schema = 'public' ORDER BY table_name")]

    def catalog(self) -> dict:
        """Tables with their columns, indexes and constraints, from the catalog."""
        if self.url.dialect == "sqlite":
            columns = {
                t: [(r[1], r[2].upper(), r[3], r[5]) for r in self.rows(f'PRAGMA table_info("{t}")')]
                for t in self.tables()
            }
            indexes = self.rows(
                "SELECT tbl_name, name, sql FROM sqlite_master WHERE type = 'index' ORDER BY name")
            fks = {t: self.rows(f'PRAGMA foreign_key_list("{t}")') for t in self.tables()}
            return {"columns": columns, "indexes": indexes, "fks": fks}
        columns = {
            t: self.rows(
                "SELECT column_name, data_type, is_nullable, column_default "
                "FROM information_schema.columns WHERE table_schema = 'public' "
                "AND table_name = ? ORDER BY ordinal_position", (t,))
            for t in self.tables()
        }
        indexes = self.rows(
            "SELECT tablename, indexname, indexdef FROM pg_indexes "
            "WHERE schemaname = 'public' ORDER BY indexname")
        constraints = self.rows(
            "SELECT conrelid::regclass::text, conname, pg_get_constraintdef(oid) "
            "FROM pg_constraint WHERE connamespace = 'public'::regnamespace ORDER BY conname")
        return {"columns": columns, "indexes": indexes, "constraints": constraints}

    def drop_all(self) -> None:
        for table in self.tables():
            suffix = "" if self.url.dialect == "sqlite" else " CASCADE"
            self.execute(f'DROP TABLE IF EXISTS "{table}"{suffix}')

    def dump_text(self) -> str:
        """Every value in every table, as one string (for "is X stored anywhere")."""
        out = []
        for table in self.tables():
            for row in self.rows(f'SELECT * FROM "{table}"'):
                out.append(repr(row))
        return "\n".join(out)

    def close(self) -> None:
        self.conn.raw.close()


@pytest.fixture
def raw_db(db_url):
    raw = RawDb(db_url)
    yield raw
    raw.close()


@pytest.fixture
def stores(request, db_url, clock):
    """One Storage per racing thread (its own connections, as separate processes
    would have); the test module's THREADS says how many."""
    from storage import open_storage

    opened = [open_storage(db_url, clock=clock) for _ in range(request.module.THREADS)]
    yield opened
    for s in opened:
        s.close()
