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

    def add_verify_metrics(self) -> "Metrics":
        """Register the verifier's metrics (once; the daemon calls it when the verifier runs).
        Transfers by state is ``stashd_transfers`` (add_upload_metrics)."""
        if getattr(self, "verify_checks", None) is not None:
            return self
        registry = self.registry
        self.verify_checks = Counter(
            "stashd_verify_checks_total",
            "Message checks by result (present, missing, error: not checked, retried later)",
            ["result"], registry=registry,
        )
        self.verify_misses = Counter(
            "stashd_verify_misses_total", "Parts found missing or not carrying our document",
            registry=registry,
        )
        self.verify_reuploads = Counter(
            "stashd_verify_reuploads_total", "Parts queued for re-upload from their manifest",
            registry=registry,
        )
        self.verify_cleanups = Counter(
            "stashd_verify_cleanups_total", "Transfers cleaned up after verification",
            registry=registry,
        )
        self.verify_lost = Counter(
            "stashd_verify_lost_total",
            "Parts lost after cleanup (nothing left to re-upload from)", registry=registry,
        )
        self.verify_lag = Gauge(
            "stashd_verify_lag_seconds", "Age of the oldest due check (0 when none is due)",
            registry=registry,
        )
        for result in ("present", "missing", "error"):
            self.verify_checks.labels(result=result)
        return self

    def record_verify_check(self, result: str, n: int = 1) -> None:
        if getattr(self, "verify_checks", None) is not None:
            self.verify_checks.labels(result=result).inc(n)

    def record_verify_miss(self, n: int = 1) -> None:
        if getattr(self, "verify_misses", None) is not None:
            self.verify_misses.inc(n)

    def record_reupload(self, n: int = 1) -> None:
        if getattr(self, "verify_reuploads", None) is not None:
            self.verify_reuploads.inc(n)

    def record_cleanup(self, n: int = 1) -> None:
        if getattr(self, "verify_cleanups", None) is not None:
            self.verify_cleanups.inc(n)

    def record_lost(self, n: int = 1) -> None:
        if getattr(self, "verify_lost", None) is not None:
            self.verify_lost.inc(n)

    def set_verify_lag(self, seconds: float) -> None:
        if getattr(self, "verify_lag", None) is not None:
            self.verify_lag.set(max(0.0, seconds))

    def add_ingest_metrics(self) -> "Metrics":
        """Register the ingest engine's metrics (once; the daemon calls it when ingest runs).
        ``mapping`` labels are the configured mappings (``account:channel[#topics]``)."""
        if getattr(self, "ingest_seen", None) is not None:
            return self
        registry = self.registry
        self.ingest_seen = Counter(
            "stashd_ingest_archives_seen_total", "Archive volumes seen for the first time in sources",
            ["account"], registry=registry,
        )
        self.ingest_ingested = Counter(
            "stashd_ingest_archives_ingested_total", "Archive sets uploaded to their destination",
            registry=registry,
        )
        self.ingest_skipped = Counter(
            "stashd_ingest_skipped_total", "Archive sets skipped, by reason", ["reason"],
            registry=registry,
        )
        self.ingest_download_bytes = Counter(
            "stashd_ingest_download_bytes_total", "Bytes downloaded from source channels",
            ["account"], registry=registry,
        )
        self.ingest_scan_lag = Gauge(
            "stashd_ingest_scan_lag_seconds",
            "Seconds since the mapping's last scan that reached the present", ["mapping"],
            registry=registry,
        )
        self.ingest_stalled = Gauge(
            "stashd_ingest_scan_stalled", "1 while the mapping's pagination is stalled",
            ["mapping"], registry=registry,
        )
        self.ingest_runs = Counter(
            "stashd_ingest_runs_total", "Scans of a mapping by result (finished, failed)",
            ["result"], registry=registry,
        )
        self.ingest_refetch = Counter(
            "stashd_ingest_refetch_total",
            "Packages lost after cleanup fetched again from their source: requeued (by the "
            "verifier), queued (downloaded again, lost parts queued), source_gone (lost for good), "
            "refused (fetched, but not the stored split: lost for good), stored_again (not "
            "needed: another copy of the content was uploaded meanwhile and holds it), "
            "no_mapping (no ingest mapping scans its source channel any more)",
            ["result"], registry=registry,
        )
        for reason in ("too_large", "incomplete_set", "duplicate", "unreadable", "failed"):
            self.ingest_skipped.labels(reason=reason)
        for result in ("requeued", "queued", "source_gone", "refused", "stored_again", "no_mapping"):
            self.ingest_refetch.labels(result=result)
        return self

    def record_refetch(self, result: str, n: int = 1) -> None:
        if getattr(self, "ingest_refetch", None) is not None:
            self.ingest_refetch.labels(result=result).inc(n)

    def record_ingest(self, *, account: str | None = None, seen: int = 0, ingested: int = 0,
                      skipped: dict | None = None, downloaded: int = 0) -> None:
        if getattr(self, "ingest_seen", None) is None:
            return
        if seen:
            self.ingest_seen.labels(account=account or "").inc(seen)
        if ingested:
            self.ingest_ingested.inc(ingested)
        for reason, n in (skipped or {}).items():
            self.ingest_skipped.labels(reason=reason).inc(n)
        if downloaded:
            self.ingest_download_bytes.labels(account=account or "").inc(downloaded)

    def set_scan_lag(self, mapping: str, seconds: float, stalled: bool = False) -> None:
        if getattr(self, "ingest_scan_lag", None) is not None:
            self.ingest_scan_lag.labels(mapping=mapping).set(max(0.0, seconds))
            self.ingest_stalled.labels(mapping=mapping).set(1 if stalled else 0)

    def record_ingest_run(self, result: str) -> None:
        if getattr(self, "ingest_runs", None) is not None:
            self.ingest_runs.labels(result=result).inc()

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
