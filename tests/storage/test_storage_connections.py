"""storage.database keeps the connections it opened for Storage.close(), and prunes those
of ended threads (and closed ones) when a new one opens: 50 admin-style requests, each on
a thread of its own, do not grow the list (SQLite file and PostgreSQL)."""
from __future__ import annotations

import gc
import os
import threading

import pytest

from storage import open_storage
from storage.database import prune_connections

pytestmark = pytest.mark.timeout(60)


def db_fds(path: str) -> int:
    """Open file descriptors of this process on the SQLite file ``path``."""
    n = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}") == path:
                n += 1
        except OSError:
            pass
    return n


def pg_backends(url: str) -> int:
    import psycopg2

    con = psycopg2.connect(url)
    try:
        with con.cursor() as cur:
            cur.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()")
            return cur.fetchone()[0] - 1  # not this one
    finally:
        con.close()


def one_request_per_thread(store, n: int) -> None:
    for i in range(n):
        errors: list = []

        def request():
            try:
                store.transfers_by_state()     # what an admin command does on its thread
            except Exception as exc:  # noqa: BLE001
                errors.append(exc)

        t = threading.Thread(target=request, name=f"admin-{i}")
        t.start()
        t.join()
        assert errors == []


def test_connections_of_ended_threads_are_pruned(db_url):
    store = open_storage(db_url)
    try:
        store.transfers_by_state()                 # this thread's connection
        one_request_per_thread(store, 50)
        store.transfers_by_state()
        # the last admin thread's connection is pruned when the next one opens
        one_request_per_thread(store, 1)
        assert len(store._connections) <= 3, len(store._connections)
        gc.collect()
        if db_url.startswith("sqlite"):
            assert db_fds(store.url.path) <= 4
        else:
            assert pg_backends(db_url) <= 3
    finally:
        store.close()


def test_a_closed_connection_is_pruned_and_a_live_thread_keeps_its_own():
    class Con:
        def __init__(self, closed=0):
            self.closed = closed

        def close(self):
            self.closed = 1

    ended = threading.Thread(target=lambda: None)
    ended.start()
    ended.join()
    alive, closed, orphan = Con(), Con(closed=1), Con()
    connections = [alive, closed, orphan]
    owners = {id(alive): threading.current_thread(), id(closed): threading.current_thread(),
              id(orphan): ended}
    assert prune_connections(connections, owners) == 2
    assert connections == [alive] and orphan.closed == 1 and list(owners) == [id(alive)]
