"""Prometheus metrics of the replicator, named drctl_replication_<name>_<unit>.

Each component owns its metrics and registers them on an explicit registry; the daemon serves
that registry on --metrics-port.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

NS = "drctl"
SUB = "replication"


@dataclass
class Family:
    """One metric family kept as plain numbers (cheap to update from the hot path)."""

    name: str
    doc: str
    kind: str  # "counter" | "gauge"
    extra_labels: tuple[str, ...] = ()
    values: dict[tuple[str, ...], float] = field(default_factory=dict)


class SourceMetrics:
    """The source agent's metrics. prometheus_client is imported only when they are served
    (a one-shot `push --once` starts faster without it)."""

    def __init__(self, volume: str) -> None:
        self.volume = volume
        self.families: list[Family] = []
        self.refresh: Callable[[], None] | None = None  # recomputes gauges at scrape time

        def fam(name: str, doc: str, kind: str, *extra: str) -> Family:
            f = Family(name, doc, kind, extra)
            self.families.append(f)
            return f

        self.written = fam("written_bytes", "Bytes of volume writes detected (changed blocks).",
                           "counter")
        self.shipped_raw = fam("shipped_raw_bytes", "Block bytes shipped before compression.",
                               "counter")
        self.shipped_compressed = fam("shipped_compressed_bytes",
                                      "Payload bytes put on the wire after compression.", "counter")
        self.skipped = fam("skipped_blocks", "Changed blocks not shipped as data, by reason "
                           "(zero, dedup).", "counter", "reason")
        self.resent = fam("resent_batches", "Batches sent again after a rejection or a "
                          "reconnect, by reason.", "counter", "reason")
        self.reconnects = fam("reconnects", "Streams re-established after a failure.", "counter")
        self.pending = fam("pending_bytes", "Bytes of changed blocks not yet acknowledged.",
                           "gauge")
        self.lag = fam("lag_seconds", "Seconds since the oldest unacknowledged write; 0 when "
                       "idle and caught up.", "gauge")
        self.acked_seq = fam("acked_sequence", "Highest batch sequence acknowledged durable.",
                             "gauge")
        self.rate_limit = fam("rate_limit_bytes_per_second", "Configured bandwidth cap (0: none).",
                              "gauge")
        self.rpo_budget = fam("rpo_budget_seconds", "The volume's RPO budget (alerting "
                              "threshold for the lag; 0: none configured).", "gauge")
        # write capture only (push --nbd-listen)
        self.journal_bytes = fam("journal_bytes", "Size of the change journal (writes not yet "
                                 "acknowledged by the target, with their data).", "gauge")
        self.bitmap_blocks = fam("bitmap_blocks", "Blocks tracked only in the change bitmap "
                                 "(journal overflowed) or being resynced.", "gauge")
        self.consistency_point = fam("consistency_point", "Last consistency point the target "
                                     "acknowledged.", "gauge")
        # re-protection and planned switchover (write capture)
        self.protected = fam("protected", "1 while the replica holds a verified consistency "
                             "point of this volume and receives its writes; 0 while it is "
                             "resynced, unreachable or unknown.", "gauge")
        self.resync_size = fam("resync_size_bytes", "Bytes the current resync covers (0: no "
                               "resync running).", "gauge")
        self.resync_remaining = fam("resync_remaining_bytes", "Bytes of the current resync "
                                    "not yet compared or acknowledged.", "gauge")
        self.resync_eta = fam("resync_eta_seconds", "Estimated seconds until the current "
                              "resync is acknowledged (-1: unknown).", "gauge")
        self.resync_exact = fam("resync_exact", "1: the running or last resync ships the "
                                "journals' exact delta; 0: it compares both images (hashes).",
                                "gauge")
        self.write_barrier = fam("write_barrier", "1 while the export holds new writes (a "
                                 "planned switchover drains the replica).", "gauge")
        for f in (self.written, self.shipped_raw, self.shipped_compressed, self.reconnects,
                  self.pending, self.lag, self.acked_seq, self.rate_limit, self.rpo_budget):
            f.values[(volume,)] = 0.0
        for reason in ("zero", "dedup"):
            self.skipped.values[(volume, reason)] = 0.0

    def add(self, family: Family, amount: float, *extra: str) -> None:
        key = (self.volume, *extra)
        family.values[key] = family.values.get(key, 0.0) + amount

    def set(self, family: Family, value: float) -> None:
        family.values[(self.volume,)] = float(value)

    def value(self, family: Family, *extra: str) -> float:
        return family.values.get((self.volume, *extra), 0.0)



def serve_sources(sources: list[SourceMetrics], port: int) -> None:
    """Expose one or more volumes' metrics (a consistency group: one set of families)."""
    from prometheus_client import CollectorRegistry

    registry = CollectorRegistry()
    registry.register(_Collector(sources))
    serve_metrics(registry, port)


class _Collector:
    def __init__(self, sources: list[SourceMetrics]) -> None:
        self.sources = sources

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        for m in self.sources:
            if m.refresh is not None:
                m.refresh()
        for pos, f in enumerate(self.sources[0].families):
            full = f"{NS}_{SUB}_{f.name}"
            labels = ["volume", *f.extra_labels]
            cls = CounterMetricFamily if f.kind == "counter" else GaugeMetricFamily
            mf = cls(full, f.doc, labels=labels)
            for m in self.sources:
                for key, value in list(m.families[pos].values.items()):
                    mf.add_metric(list(key), value)
            yield mf

    def describe(self) -> Iterator[Any]:
        return iter(())


class TargetMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        from prometheus_client import Counter, Gauge, Histogram

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
        self.applied_cp = Gauge("applied_consistency_point", "Last consistency point written "
                                "into the replica image.", ["volume"], namespace=NS,
                                subsystem=SUB, registry=registry)
        self.staged_batches = Gauge("staged_batches", "Batches held in the redo journal, not "
                                    "yet in the image.", ["volume"], namespace=NS, subsystem=SUB,
                                    registry=registry)
        self.cp_apply_seconds = Histogram("cp_apply_duration_seconds", "Writing complete "
                                          "consistency points from the redo journal into the "
                                          "image.", ["volume"], namespace=NS, subsystem=SUB,
                                          registry=registry,
                                          buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5))


def serve_metrics(registry: CollectorRegistry, port: int, addr: str = "127.0.0.1") -> None:
    """Expose ``registry`` over HTTP on a daemon thread (prometheus_client's own server)."""
    from prometheus_client import start_http_server

    start_http_server(port, addr=addr, registry=registry)
