"""Shared by the storage race tests: release one call per Storage at once."""
from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor


def race(stores, fn):
    """Run fn(i, store) in one thread per store, all released at once."""
    barrier = threading.Barrier(len(stores))

    def run(i):
        barrier.wait(timeout=20)
        return fn(i, stores[i])

    with ThreadPoolExecutor(len(stores)) as pool:
        futures = [pool.submit(run, i) for i in range(len(stores))]
        return [f.result(timeout=90) for f in futures]
