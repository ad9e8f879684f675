"""Fixtures shared by the whole suite.

PostgreSQL: tests that need it take the ``pg_url`` fixture, which creates a
fresh database per test on the server named by ``STASHD_TEST_PG`` (default
``postgresql://postgres@127.0.0.1:5432/test``) and drops it afterwards.  When
the server is unreachable the test is skipped on a laptop but *fails* when the
``CI`` environment variable is set.
"""
from __future__ import annotations

import os
import uuid
from urllib.parse import urlsplit, urlunsplit

import pykka
import pytest

PG_ADMIN_URL = os.environ.get("STASHD_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")


def _pg_connect(url: str):
    import psycopg2

    parts = urlsplit(url)
    return psycopg2.connect(
        host=parts.hostname or "127.0.0.1",
        port=parts.port or 5432,
        user=parts.username or "postgres",
        password=parts.password or None,
        dbname=(parts.path or "/test").lstrip("/") or "test",
        connect_timeout=5,
    )


def _pg_unavailable(reason: str):
    if os.environ.get("CI"):
        pytest.fail(f"PostgreSQL is required under CI but unavailable: {reason}")
    pytest.skip(f"PostgreSQL unavailable: {reason}")


@pytest.fixture
def pg_url():
    """URL of a fresh, empty PostgreSQL database, dropped after the test."""
    try:
        admin = _pg_connect(PG_ADMIN_URL)
    except Exception as exc:  # psycopg2 missing or server down
        _pg_unavailable(str(exc).strip())
    admin.autocommit = True
    name = f"stashd_t_{uuid.uuid4().hex[:12]}"
    with admin.cursor() as cur:
        cur.execute(f'CREATE DATABASE "{name}"')
    parts = urlsplit(PG_ADMIN_URL)
    yield urlunsplit((parts.scheme, parts.netloc, f"/{name}", "", ""))
    with admin.cursor() as cur:
        cur.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = %s AND pid <> pg_backend_pid()",
            (name,),
        )
        cur.execute(f'DROP DATABASE IF EXISTS "{name}"')
    admin.close()


@pytest.fixture
def sqlite_url(tmp_path):
    return f"sqlite:///{tmp_path / 'stashd.db'}"


@pytest.fixture(params=["sqlite", "postgres"])
def db_url(request, tmp_path):
    """Runs a test once on a SQLite file and once on a real PostgreSQL."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'stashd.db'}"
    return request.getfixturevalue("pg_url")


@pytest.fixture(autouse=True)
def _stop_all_actors():
    yield
    pykka.ActorRegistry.stop_all(block=True, timeout=10)
