"""Prometheus metrics of the replicator, named drctl_replication_<name>_<unit>.

Each component owns its metrics and registers them on an explicit registry; the daemon serves
that registry on --metrics-listen HOST:PORT (--metrics-port PORT: 127.0.0.1:PORT), over HTTPS
with the process's certificate and client certificates required when --metrics-tls is given.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from drctl.metrics_http import MetricsEndpoint as MetricsEndpoint
from drctl.metrics_http import serve_registry

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

NS = "drctl"
SUB = "replication"
ACK_LAG_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                   30.0, 60.0, 300.0)


@dataclass
class Family:
    """One metric family kept as plain numbers (cheap to update from the hot path)."""

    name: str
    doc: str
    kind: str  # "counter" | "gauge" | "histogram"
    extra_labels: tuple[str, ...] = ()
    values: dict[tuple[str, ...], float] = field(default_factory=dict)
    buckets: tuple[float, ...] = ()  # a histogram's upper bounds (+Inf is implied)
    # a histogram's observations by labels: a count per bucket (not cumulative), then the sum
    hist: dict[tuple[str, ...], list[float]] = field(default_factory=dict)


class SourceMetrics:
    """The source agent's metrics. prometheus_client is imported only when they are served
    (a one-shot `push --once` starts faster without it)."""

    def __init__(self, volume: str) -> None:
        self.volume = volume
        self.families: list[Family] = []
        self.refresh: Callable[[], None] | None = None  # recomputes gauges at scrape time

        def fam(name: str, doc: str, kind: str, *extra: str,
                buckets: tuple[float, ...] = ()) -> Family:
            f = Family(name, doc, kind, extra, buckets=buckets)
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
        self.ack_lag = fam("ack_lag_seconds", "Lag at acknowledgement: the age of the oldest "
                           "write of each consistency point when the target's ack for it "
                           "arrives (write capture; without it, of each pass).", "histogram",
                           buckets=ACK_LAG_BUCKETS)
        self.acked_seq = fam("acked_sequence", "Highest batch sequence acknowledged durable.",
                             "gauge")
        self.rate_limit = fam("rate_limit_bytes_per_second", "Configured bandwidth cap (0: none).",
                              "gauge")
        self.rpo_budget = fam("rpo_budget_seconds", "The volume's RPO budget (alerting "
                              "threshold for the lag; 0: none configured).", "gauge")
        # write capture only (push --nbd-listen)
        self.journal_bytes = fam("journal_bytes", "Writes the target has not acknowledged yet, "
                                 "with their data, as the change journal holds them: its file "
                                 "and the large writes it keeps in memory.", "gauge")
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
        # background verify (write capture: capture/scrub.py)
        self.verify_rate = fam("verify_rate_bytes_per_second", "Configured rate of the "
                               "background verify (0: disabled).", "gauge")
        self.verify_checked = fam("verify_checked_bytes", "Bytes of the volume the background "
                                  "verify compared with the replica's disk.", "counter")
        self.verify_mismatched = fam("verify_mismatched_blocks", "Blocks whose replica content "
                                     "differed from the volume (shipped again).", "counter")
        self.verify_repaired = fam("verify_repaired_blocks", "Mismatched blocks found equal "
                                   "again after they were shipped again (or rewritten).",
                                   "counter")
        self.verify_unrepaired = fam("verify_unrepaired_blocks", "Known mismatched blocks not "
                                     "yet confirmed repaired (the lag counts from the oldest).",
                                     "gauge")
        self.verify_last_pass_duration = fam(
            "verify_last_pass_duration_seconds", "Duration of the last complete background "
            "verify pass over the volume.", "gauge")
        self.verify_pass_end = fam("verify_last_pass_timestamp_seconds", "When the last "
                                   "complete background verify pass over the volume ended "
                                   "(0: none yet).", "gauge")
        for f in (self.written, self.shipped_raw, self.shipped_compressed, self.reconnects,
                  self.pending, self.lag, self.acked_seq, self.rate_limit, self.rpo_budget):
            f.values[(volume,)] = 0.0
        for reason in ("zero", "dedup"):
            self.skipped.values[(volume, reason)] = 0.0
        self.ack_lag.hist[(volume,)] = [0.0] * (len(ACK_LAG_BUCKETS) + 2)

    def add(self, family: Family, amount: float, *extra: str) -> None:
        key = (self.volume, *extra)
        family.values[key] = family.values.get(key, 0.0) + amount

    def set(self, family: Family, value: float) -> None:
        family.values[(self.volume,)] = float(value)

    def value(self, family: Family, *extra: str) -> float:
        return family.values.get((self.volume, *extra), 0.0)

    def observe(self, family: Family, value: float) -> None:
        """One observation of a histogram family."""
        h = family.hist.get((self.volume,))
        if h is None:
            h = family.hist[(self.volume,)] = [0.0] * (len(family.buckets) + 2)
        h[bisect.bisect_left(family.buckets, value)] += 1
        h[-1] += value



def serve_sources(sources: list[SourceMetrics], endpoint: MetricsEndpoint | int) -> None:
    """Expose one or more volumes' metrics (a consistency group: one set of families)."""
    from prometheus_client import CollectorRegistry

    registry = CollectorRegistry()
    registry.register(_Collector(sources))
    serve_metrics(registry, endpoint)


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
            if f.kind == "histogram":
                yield self._histogram(full, f, pos, labels)
                continue
            cls = CounterMetricFamily if f.kind == "counter" else GaugeMetricFamily
            mf = cls(full, f.doc, labels=labels)
            for m in self.sources:
                for key, value in list(m.families[pos].values.items()):
                    mf.add_metric(list(key), value)
            yield mf

    def _histogram(self, full: str, f: Family, pos: int, labels: list[str]) -> Any:
        from prometheus_client.core import HistogramMetricFamily

        mf = HistogramMetricFamily(full, f.doc, labels=labels)
        bounds = [*(f"{b:g}" for b in f.buckets), "+Inf"]
        for m in self.sources:
            for key, counts in list(m.families[pos].hist.items()):
                cumulative, total = [], 0.0
                for bound, n in zip(bounds, counts[:-1], strict=True):
                    total += n
                    cumulative.append((bound, total))
                mf.add_metric(list(key), cumulative, counts[-1])
        return mf

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


def serve_metrics(registry: CollectorRegistry, endpoint: MetricsEndpoint | int) -> None:
    """Expose ``registry`` on a daemon thread (prometheus_client's own server); a bare port
    is 127.0.0.1:port."""
    from drctl.listening import BIND_ERRNOS, describe
    from replicator.errors import UsageError

    if isinstance(endpoint, int):
        endpoint = MetricsEndpoint("127.0.0.1", endpoint)
    try:
        serve_registry(registry, endpoint)
    except OSError as exc:  # taken since the CLI checked it
        if exc.errno not in BIND_ERRNOS:
            raise
        raise UsageError(f"metrics endpoint {endpoint.host}:{endpoint.port}: cannot listen "
                         f"there: {describe(exc)}") from None
