"""Prometheus metrics of the replicator, named drctl_replication_<name>_<unit>.

Each component owns its metrics and registers them on an explicit registry; the daemon serves
that registry on --metrics-port.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

NS = "drctl"
SUB = "replication"


class SourceMetrics:
    def __init__(self, registry: CollectorRegistry, volume: str) -> None:
        labels = ["volume"]
        self.volume = volume

        def counter(name: str, doc: str, extra: list[str] | None = None) -> Counter:
            return Counter(name, doc, labels + (extra or []), namespace=NS, subsystem=SUB,
                           registry=registry)

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(name, doc, labels, namespace=NS, subsystem=SUB, registry=registry)

        self.written = counter("written_bytes", "Bytes of volume writes detected (changed blocks).")
        self.shipped_raw = counter("shipped_raw_bytes", "Block bytes shipped before compression.")
        self.shipped_compressed = counter(
            "shipped_compressed_bytes", "Payload bytes put on the wire after compression."
        )
        self.skipped = counter("skipped_blocks", "Changed blocks not shipped as data.", ["reason"])
        self.resent = counter("resent_batches", "Batches sent again after a rejection or a "
                              "reconnect.", ["reason"])
        self.reconnects = counter("reconnects", "Streams re-established after a failure.")
        self.pending = gauge("pending_bytes", "Bytes of changed blocks not yet acknowledged.")
        self.lag = gauge("lag_seconds", "Seconds since the oldest unacknowledged write; 0 when "
                         "idle and caught up.")
        self.acked_seq = gauge("acked_sequence", "Highest batch sequence acknowledged durable.")
        self.rate_limit = gauge("rate_limit_bytes_per_second", "Configured bandwidth cap (0: none).")
        for g in (self.pending, self.lag, self.acked_seq, self.rate_limit):
            g.labels(volume).set(0)

    def add(self, counter: Counter, amount: float, *extra: str) -> None:
        counter.labels(self.volume, *extra).inc(amount)

    def set(self, gauge: Gauge, value: float) -> None:
        gauge.labels(self.volume).set(value)


class TargetMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.applied_bytes = Counter("applied_bytes", "Bytes written to replicas.", ["volume"],
                                     namespace=NS, subsystem=SUB, registry=registry)
        self.received_bytes = Counter("received_bytes", "Delta payload bytes received.",
                                      ["volume"], namespace=NS, subsystem=SUB, registry=registry)
        self.rejected = Counter("rejected_batches", "Batches rejected, by reason.",
                                ["volume", "reason"], namespace=NS, subsystem=SUB,
                                registry=registry)
        self.applied_seq = Gauge("applied_sequence", "Highest batch sequence made durable.",
                                 ["volume"], namespace=NS, subsystem=SUB, registry=registry)
        self.epoch = Gauge("epoch", "Highest epoch the replica accepted.", ["volume"],
                           namespace=NS, subsystem=SUB, registry=registry)
        self.commit_seconds = Histogram("commit_duration_seconds", "fdatasync + commit record.",
                                        ["volume"], namespace=NS, subsystem=SUB,
                                        registry=registry,
                                        buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5))


def serve_metrics(registry: CollectorRegistry, port: int, addr: str = "127.0.0.1") -> None:
    """Expose ``registry`` over HTTP on a daemon thread (prometheus_client's own server)."""
    start_http_server(port, addr=addr, registry=registry)
