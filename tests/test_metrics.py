"""Metrics on a fresh registry, and the /metrics endpoint over real HTTP."""
from __future__ import annotations

import urllib.error
import urllib.request

import pytest
from prometheus_client import CollectorRegistry

from actors import metrics as metrics_mod
from actors.metrics import ACCOUNT_STATES, Metrics, start_metrics_server


@pytest.fixture
def metrics():
    return Metrics(CollectorRegistry())


def value(m: Metrics, name: str, **labels):
    return m.registry.get_sample_value(name, labels)


def test_names_follow_prometheus_conventions(metrics):
    metrics.actor_restarts.labels(actor="account:alice").inc()
    metrics.record_request("alice", "GetHistoryRequest", "ok")
    metrics.record_flood_wait("alice", "SaveBigFilePartRequest", 3)
    metrics.set_account_state("alice", "ready")
    metrics.inbox_depth.labels(actor="account:alice").set(2)
    metrics.actors_alive.set(3)
    families = {f.name: f for f in metrics.registry.collect()}
    assert set(families) == {
        "stashd_build", "stashd_actor_restarts", "stashd_account_state", "stashd_floodwait_seconds",
        "stashd_telegram_requests", "stashd_actor_inbox_depth", "stashd_actors_alive",
    }
    for family in families.values():
        for sample in family.samples:
            assert sample.name.startswith("stashd_")
            if family.type == "counter" and not sample.name.endswith("_created"):
                assert sample.name.endswith("_total"), sample.name


def test_each_instance_has_its_own_registry():
    a, b = Metrics(CollectorRegistry()), Metrics(CollectorRegistry())
    a.actor_restarts.labels(actor="x").inc(2)
    assert value(a, "stashd_actor_restarts_total", actor="x") == 2
    assert value(b, "stashd_actor_restarts_total", actor="x") is None


def test_account_state_is_one_hot(metrics):
    metrics.set_account_state("alice", "ready")
    states = {s: value(metrics, "stashd_account_state", account="alice", state=s) for s in ACCOUNT_STATES}
    assert states == {s: (1.0 if s == "ready" else 0.0) for s in ACCOUNT_STATES}
    metrics.set_account_state("alice", "cooling_down")
    assert value(metrics, "stashd_account_state", account="alice", state="ready") == 0
    assert value(metrics, "stashd_account_state", account="alice", state="cooling_down") == 1
    metrics.set_account_state("alice", "weird")  # an unforeseen state still shows, alone
    assert value(metrics, "stashd_account_state", account="alice", state="weird") == 1
    assert value(metrics, "stashd_account_state", account="alice", state="cooling_down") == 0
    metrics.forget_account("alice")
    assert value(metrics, "stashd_account_state", account="alice", state="weird") is None


def test_counters(metrics):
    metrics.record_flood_wait("bob", "SendMediaRequest", 30)
    metrics.record_flood_wait("bob", "SendMediaRequest", 12.5)
    metrics.record_request("bob", "SendMediaRequest", "flood_wait")
    assert value(metrics, "stashd_floodwait_seconds_total", account="bob", method="SendMediaRequest") == 42.5
    assert value(metrics, "stashd_telegram_requests_total", account="bob",
                 method="SendMediaRequest", result="flood_wait") == 1


def test_build_info_version(metrics, monkeypatch):
    assert value(metrics, "stashd_build_info", version=metrics_mod.stashd_version(),
                 python=metrics_mod.platform.python_version()) == 1

    def missing(name):
        raise metrics_mod.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(metrics_mod.metadata, "version", missing)
    assert metrics_mod.stashd_version() == "0+unknown"


def test_metrics_over_http(metrics):
    metrics.set_account_state("bob", "ready")
    server = start_metrics_server(metrics, "127.0.0.1", 0)
    try:
        assert server.host == "127.0.0.1" and server.port > 0
        url = f"http://127.0.0.1:{server.port}/metrics"
        text = urllib.request.urlopen(url, timeout=5).read().decode()
        lines = text.splitlines()
        assert f'stashd_build_info{{python="{metrics_mod.platform.python_version()}",' \
               f'version="{metrics_mod.stashd_version()}"}} 1.0' in lines
        assert 'stashd_account_state{account="bob",state="ready"} 1.0' in lines
        assert any(line.startswith("stashd_actors_alive ") for line in lines)
    finally:
        server.stop()
    server.stop()  # idempotent
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(url, timeout=5)


def test_port_in_use_is_an_error(metrics):
    first = start_metrics_server(metrics, "127.0.0.1", 0)
    try:
        with pytest.raises(OSError):
            start_metrics_server(Metrics(CollectorRegistry()), "127.0.0.1", first.port)
    finally:
        first.stop()
