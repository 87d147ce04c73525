"""sites/metrics.py: a site agent serves its children's metrics as one endpoint."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest, start_http_server
from prometheus_client.parser import text_string_to_metric_families

from drctl.localservers import free_port
from sites.metrics import ChildrenCollector, read_children


@pytest.fixture
def child() -> Iterator[Callable[[str, float], str]]:
    """Makes a child process's metrics endpoint (a capture agent or a target daemon)."""
    servers = []

    def make(volume: str, applied: float) -> str:
        url, server = _endpoint(volume, applied)
        servers.append(server)
        return url

    yield make
    for server in servers:
        server.shutdown()
        server.server_close()


def _endpoint(volume: str, applied: float) -> tuple[str, Any]:
    registry = CollectorRegistry()
    Gauge("drctl_replication_lag_seconds", "Lag.", ["volume"],
          registry=registry).labels(volume).set(0.5)
    Counter("drctl_replication_applied_bytes", "Applied.", ["volume"],
            registry=registry).labels(volume).inc(applied)
    port = free_port()
    server, _thread = start_http_server(port, addr="127.0.0.1", registry=registry)
    return f"http://127.0.0.1:{port}/metrics", server


def test_children_merge_into_one_family_per_name_labelled_by_site(
        child: Callable[[str, float], str]) -> None:
    a, b = child("db-data", 4096), child("uploads", 8192)
    gone = f"http://127.0.0.1:{free_port()}/metrics"  # a child restarting: left out
    families = {f.name: f for f in read_children([a, gone, b, a], "east")}
    lag = families["drctl_replication_lag_seconds"]
    assert sorted((s.labels["site"], s.labels["volume"]) for s in lag.samples) == [
        ("east", "db-data"), ("east", "uploads")]  # a's series once, though listed twice
    applied = {s.labels["volume"]: s.value
               for s in families["drctl_replication_applied_bytes"].samples
               if s.name == "drctl_replication_applied_bytes_total"}
    assert applied == {"db-data": 4096, "uploads": 8192}


def test_the_collector_serves_valid_exposition_text(
        child: Callable[[str, float], str]) -> None:
    urls = [child("db-data", 1)]
    registry = CollectorRegistry()
    registry.register(ChildrenCollector("west", lambda: urls))
    text = generate_latest(registry).decode()
    names = [f.name for f in text_string_to_metric_families(text)]
    assert len(names) == len(set(names)) and "drctl_replication_lag_seconds" in names
    assert 'drctl_replication_lag_seconds{site="west",volume="db-data"} 0.5' in text
    urls.clear()  # no child running (a fenced site): an empty scrape, not an error
    assert generate_latest(registry) == b""
