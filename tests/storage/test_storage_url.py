"""Database URLs: parsing, clear errors, no password in any message."""
from __future__ import annotations

import pytest

from storage.database import open_storage
from storage.errors import StorageError
from storage.url import parse_url


def test_sqlite_url_forms_name_the_same_absolute_file():
    assert parse_url("sqlite:///var/lib/stashd/stashd.db").path == "/var/lib/stashd/stashd.db"
    assert parse_url("sqlite:////var/lib/stashd/stashd.db").path == "/var/lib/stashd/stashd.db"
    assert parse_url("sqlite:////var/lib/x.db").safe == "sqlite:////var/lib/x.db"


def test_postgres_url_parts_and_masked_password():
    url = parse_url("postgresql://stash:s%40cret@db.example:6543/stashd")
    assert (url.host, url.port, url.user, url.password, url.database) == (
        "db.example", 6543, "stash", "s@cret", "stashd")
    assert url.safe == "postgresql://stash:***@db.example:6543/stashd"
    assert "s@cret" not in repr(url) and "s@cret" not in str(url)
    assert parse_url("postgres://u@h/d").port == 5432


@pytest.mark.parametrize(
    "url, message",
    [
        ("", "empty"),
        ("mysql://u:hunter2@h/d", "unsupported database URL scheme 'mysql'"),
        ("/var/lib/stashd.db", "unsupported database URL scheme"),
        ("sqlite:relative.db", "sqlite:///absolute/path.db"),
        ("sqlite:///", "absolute file path"),
        ("sqlite:///:memory:", "absolute file path"),
        ("sqlite:///tmp/x.db?mode=ro", "no query string"),
        ("postgresql://u:hunter2@host:5432/", "postgresql://user[:pw]@host:port/db"),
        ("postgresql://u:hunter2@host:notaport/db", "malformed"),
    ],
)
def test_bad_urls_are_refused_clearly(url, message):
    with pytest.raises(StorageError, match=None) as info:
        open_storage(url)
    assert message in str(info.value)
    assert "hunter2" not in str(info.value)


def test_missing_sqlite_directory(tmp_path):
    with pytest.raises(StorageError, match="directory for the database does not exist"):
        open_storage(f"sqlite:///{tmp_path}/no/such/dir/stashd.db")


def test_unreachable_postgres_is_a_clear_error_without_password():
    with pytest.raises(StorageError) as info:
        open_storage("postgresql://postgres:hunter2@127.0.0.1:1/stashd")
    text = str(info.value)
    assert text.startswith("cannot connect to postgresql://postgres:***@127.0.0.1:1/stashd")
    assert "hunter2" not in text
    assert info.value.__cause__ is None and info.value.__suppress_context__  # no psycopg2 chain


def test_missing_postgres_database_is_a_clear_error(pg_url):
    url = pg_url.rsplit("/", 1)[0] + "/stashd_no_such_database"
    with pytest.raises(StorageError, match="cannot connect to .*stashd_no_such_database"):
        open_storage(url)
