"""Many writers at once: never "database is locked", and the end state adds up."""
from __future__ import annotations

import multiprocessing
import re
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from storage.database import open_storage
from storage.records import ACCOUNT_STATES

THREADS = 16
WRITES = 200
CHANNELS = 10
KINDS = 5
T0 = 1_000_000.0


def fixed_clock() -> float:
    return T0


def ops(worker: int, writes: int):
    """The deterministic write sequence of one worker: (method, args, kwargs)."""
    for j in range(writes):
        step = j % 4
        if step == 0:
            yield "record_flood_wait", (f"acc{worker % 4}", f"kind{j % KINDS}", float(worker * 1000 + j)), {}
        elif step == 1:
            yield "upsert_account", (f"acc{worker}",), dict(user_id=worker * 10**10 + j, phone=f"+1555{worker:03d}{j:04d}")
        elif step == 2:
            yield "set_account_state", (f"acc{worker}", ACCOUNT_STATES[j % len(ACCOUNT_STATES)]), {}
        else:
            yield "upsert_channel", (-(10**12) - j % CHANNELS,), dict(title=f"c{j % CHANNELS}", username=None, seen_by=f"acc{worker}")


def run_worker(store, worker: int, writes: int, start: threading.Barrier | None = None) -> int:
    if start is not None:
        start.wait(timeout=30)
    n = 0
    for method, args, kwargs in ops(worker, writes):
        getattr(store, method)(*args, **kwargs)
        n += 1
    return n


def expected_state(workers, writes: int):
    accounts, waits, channels = {}, {}, {}
    for w in workers:
        for method, args, kwargs in ops(w, writes):
            if method == "record_flood_wait":
                key = (args[0], args[1])
                waits[key] = max(waits.get(key, 0.0), T0 + args[2])
            elif method == "upsert_account":
                accounts.setdefault(args[0], {})["user_id"] = kwargs["user_id"]
            elif method == "set_account_state":
                accounts.setdefault(args[0], {})["state"] = args[1]
            else:
                channels.setdefault(args[0], set()).add(kwargs["seen_by"])
    return accounts, waits, channels


def check_final_state(store, workers, writes):
    accounts, waits, channels = expected_state(workers, writes)
    got = {a.name: a for a in store.list_accounts()}
    assert set(got) == set(accounts)
    for name, fields in accounts.items():
        assert got[name].user_id == fields["user_id"], name
        assert got[name].state == fields["state"], name
        assert re.fullmatch(r"\+155\*{5}\d\d", got[name].phone_redacted), name
    for account in {a for a, _ in waits}:
        want = {k: u for (a, k), u in waits.items() if a == account}
        assert store.active_flood_waits(account) == want, account
    got_channels = {c.channel_id: set(c.seen_by) for c in store.list_channels()}
    assert got_channels == channels


def test_threads_hammer_one_storage(db_url):
    store = open_storage(db_url, clock=fixed_clock)
    start = threading.Barrier(THREADS)
    try:
        with ThreadPoolExecutor(THREADS) as pool:
            futures = [pool.submit(run_worker, store, w, WRITES, start) for w in range(THREADS)]
            assert [f.result(timeout=100) for f in futures] == [WRITES] * THREADS
        check_final_state(store, range(THREADS), WRITES)
    finally:
        store.close()


def test_threads_hammer_separate_storages(db_url):
    """Each thread with its own Storage: no shared in-process lock to hide behind."""
    n = 8
    stores = [open_storage(db_url, clock=fixed_clock) for _ in range(n)]
    start = threading.Barrier(n)
    try:
        with ThreadPoolExecutor(n) as pool:
            futures = [pool.submit(run_worker, stores[w], w, 100, start) for w in range(n)]
            assert [f.result(timeout=100) for f in futures] == [100] * n
        check_final_state(stores[0], range(n), 100)
    finally:
        for s in stores:
            s.close()


def _process_main(url: str, worker: int, writes: int, start) -> int:
    store = open_storage(url, clock=fixed_clock)
    try:
        start.wait(timeout=60)
        return run_worker(store, worker, writes)
    finally:
        store.close()


def _process_entry(url, worker, writes, start, results):
    try:
        results.put((worker, _process_main(url, worker, writes, start)))
    except BaseException as exc:  # report, do not hang the parent
        results.put((worker, f"{type(exc).__name__}: {exc}"))


@pytest.mark.slow
def test_processes_hammer_one_database(db_url):
    ctx = multiprocessing.get_context("spawn")
    n, writes = 3, 120
    start = ctx.Barrier(n)
    results = ctx.Queue()
    procs = [ctx.Process(target=_process_entry, args=(db_url, w, writes, start, results))
             for w in range(n)]
    for p in procs:
        p.start()
    try:
        got = dict(results.get(timeout=90) for _ in procs)
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    assert got == {w: writes for w in range(n)}
    store = open_storage(db_url, clock=fixed_clock)
    try:
        check_final_state(store, range(n), writes)
    finally:
        store.close()
