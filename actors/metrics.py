"""Every stashd metric, defined in one place on a registry the caller passes.

Names: prefix ``stashd_``, base units, counters end in ``_total``, bounded
labels only (account and actor names, Telegram method names, never file names
or ids).  The HTTP endpoint binds to 127.0.0.1 unless told otherwise.
"""
from __future__ import annotations

import platform
import threading
from importlib import metadata

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, start_http_server

ACCOUNT_STATES = ("starting", "ready", "paused", "cooling_down", "error", "stopped")


def stashd_version() -> str:
    try:
        return metadata.version("stashd")
    except metadata.PackageNotFoundError:
        return "0+unknown"


class Metrics:
    def __init__(self, registry: CollectorRegistry):
        self.registry = registry
        self.build_info = Info(
            "stashd_build", "stashd version and Python it runs on", registry=registry
        )
        self.build_info.info({"version": stashd_version(), "python": platform.python_version()})
        self.actor_restarts = Counter(
            "stashd_actor_restarts_total", "Actors restarted by the supervisor",
            ["actor"], registry=registry,
        )
        self.account_state = Gauge(
            "stashd_account_state", "1 for the state each account is in, 0 for the others",
            ["account", "state"], registry=registry,
        )
        self.floodwait_seconds = Counter(
            "stashd_floodwait_seconds_total", "Seconds of FloodWait imposed by Telegram",
            ["account", "method"], registry=registry,
        )
        self.telegram_requests = Counter(
            "stashd_telegram_requests_total", "Telegram requests by method and result",
            ["account", "method", "result"], registry=registry,
        )
        self.inbox_depth = Gauge(
            "stashd_actor_inbox_depth", "Messages waiting in an actor's inbox",
            ["actor"], registry=registry,
        )
        self.actors_alive = Gauge(
            "stashd_actors_alive", "Actors currently running", registry=registry
        )
        self.upload_bytes = self.upload_parts = self.transfers = self.upload_part_seconds = None
        self._states_lock = threading.Lock()
        self._states: dict[str, set[str]] = {}

    def set_account_state(self, account: str, state: str) -> None:
        """The account's ``state`` series goes to 1, every other state to 0."""
        with self._states_lock:
            known = self._states.setdefault(account, set(ACCOUNT_STATES))
            known.add(state)
            for s in known:
                self.account_state.labels(account=account, state=s).set(1 if s == state else 0)

    def forget_account(self, account: str) -> None:
        """Drop an account's state series (account removed)."""
        with self._states_lock:
            for s in self._states.pop(account, ()):
                try:
                    self.account_state.remove(account, s)
                except KeyError:
                    pass

    def record_request(self, account: str, method: str, result: str) -> None:
        self.telegram_requests.labels(account=account, method=method, result=result).inc()

    def add_upload_metrics(self) -> "Metrics":
        """Register the upload pipeline's metrics (once; the daemon calls it when uploads run)."""
        if self.upload_bytes is not None:
            return self
        registry = self.registry
        self.upload_bytes = Counter(
            "stashd_upload_bytes_total", "Bytes of documents uploaded (recorded parts)",
            ["account"], registry=registry,
        )
        self.upload_parts = Counter(
            "stashd_upload_parts_total", "Telegram documents (transfer parts) by result",
            ["account", "result"], registry=registry,
        )
        self.transfers = Gauge(
            "stashd_transfers", "Transfers in each state", ["state"], registry=registry,
        )
        self.upload_part_seconds = Histogram(
            "stashd_upload_part_seconds", "Time to upload and send one document (transfer part)",
            registry=registry,
            buckets=(0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1200, 2400, float("inf")),
        )
        return self

    def record_part(self, account: str, nbytes: int, seconds: float | None, result: str = "ok") -> None:
        """One document of a transfer finished (``result`` "ok") or failed."""
        if self.upload_parts is None:
            return
        self.upload_parts.labels(account=account, result=result).inc()
        if result == "ok":
            self.upload_bytes.labels(account=account).inc(max(0, nbytes))
            if seconds is not None:
                self.upload_part_seconds.observe(max(0.0, seconds))

    def record_flood_wait(self, account: str, method: str, seconds: float) -> None:
        self.floodwait_seconds.labels(account=account, method=method).inc(max(0.0, seconds))


class MetricsServer:
    """The /metrics HTTP endpoint; ``port`` is the bound port (useful with port 0)."""

    def __init__(self, httpd, thread: threading.Thread):
        self._httpd = httpd
        self._thread = thread
        self.host = httpd.server_address[0]
        self.port = httpd.server_address[1]

    def stop(self, timeout: float = 5.0) -> None:
        if self._httpd is None:
            return
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout)
        self._httpd = None


def start_metrics_server(metrics: Metrics, host: str = "127.0.0.1", port: int = 9464) -> MetricsServer:
    """Serve ``metrics.registry`` on http://host:port/metrics in a daemon thread.

    Raises OSError when the address is taken.
    """
    started = start_http_server(port, addr=host, registry=metrics.registry)
    if not isinstance(started, tuple):  # prometheus_client < 0.20 returned nothing
        raise RuntimeError("prometheus_client >= 0.20 is required (start_http_server must return the server)")
    httpd, thread = started
    return MetricsServer(httpd, thread)
