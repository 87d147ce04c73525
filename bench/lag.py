"""Replication-lag probes and statistics for bench/capture.py.

The probes read an agent's metrics endpoint; they run as their own process so that they can
run inside a network namespace (``ip netns exec NS python -m bench.lag ...``):

    python -m bench.lag wait-zero PORT TIMEOUT     exit 0 once lag is 0 (prints the wait, s)
    python -m bench.lag sample PORT INTERVAL OUT   sample the lag gauge every INTERVAL until
                                                   SIGTERM; OUT: JSON with the samples and the
                                                   ack-lag histogram at start and end
"""

from __future__ import annotations

import json
import math
import signal
import sys
import time
import urllib.request
from typing import Any

LAG = "drctl_replication_lag_seconds{"
PROTECTED = "drctl_replication_protected{"
ACK_BUCKET = "drctl_replication_ack_lag_seconds_bucket{"
# bounds (s) of the histogram printed for lag samples
SAMPLE_BOUNDS = (0.0, 0.005, 0.01, 0.02, 0.03, 0.04, 0.05, 0.06, 0.08, 0.1, 0.125, 0.15, 0.2,
                 0.3, 0.5, 1.0, math.inf)


def scrape(port: int) -> str | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=1) as r:
            return str(r.read().decode())
    except OSError:
        return None


def parse(text: str) -> tuple[float | None, dict[str, float]]:
    """The lag gauge (None until the capture agent reports a protected replica: before and
    during its initial resync the gauge reads 0 or counts the resync) and the ack-lag
    histogram's cumulative buckets (le -> count)."""
    lag = None
    protected = False
    buckets: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith(LAG):
            lag = float(line.rsplit(" ", 1)[1])
        elif line.startswith(PROTECTED):
            protected = float(line.rsplit(" ", 1)[1]) == 1.0
        elif line.startswith(ACK_BUCKET):
            le = line.split('le="', 1)[1].split('"', 1)[0]
            buckets[le] = buckets.get(le, 0.0) + float(line.rsplit(" ", 1)[1])
    return (lag if protected else None), buckets


def wait_zero(port: int, timeout: float) -> int:
    started = time.monotonic()
    last: float | None = None
    while time.monotonic() - started < timeout:
        text = scrape(port)
        if text is not None:
            last, _ = parse(text)
            if last == 0.0:
                print(json.dumps({"waited": round(time.monotonic() - started, 3)}))
                return 0
        time.sleep(0.02)
    print(json.dumps({"waited": round(time.monotonic() - started, 3), "last_lag": last}))
    return 1


def sample(port: int, interval: float, out: str) -> None:
    stop = False

    def on_term(_sig: int, _frame: Any) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    samples: list[tuple[float, float]] = []
    first = scrape(port)
    hist0 = parse(first)[1] if first else {}
    nxt = time.monotonic()
    while not stop:
        text = scrape(port)
        if text is not None:
            lag, _ = parse(text)
            if lag is not None:
                samples.append((round(time.monotonic(), 4), lag))
        nxt += interval
        time.sleep(max(0.0, nxt - time.monotonic()))
    last = scrape(port)
    with open(out, "w") as fh:
        json.dump({"samples": samples, "hist0": hist0, "hist1": parse(last)[1] if last else {}},
                  fh)


# -- statistics ------------------------------------------------------------------------------

def pct(xs: list[float], p: float) -> float:
    """Nearest-rank percentile (0 for no data)."""
    if not xs:
        return 0.0
    s = sorted(xs)
    return s[max(0, min(len(s) - 1, math.ceil(p / 100 * len(s)) - 1))]


def histogram(xs: list[float], bounds: tuple[float, ...] = SAMPLE_BOUNDS) -> list[tuple[str, int]]:
    """Counts per bucket (lo, hi]; the first bucket is exactly 0."""
    counts = [0] * len(bounds)
    for x in xs:
        for i, b in enumerate(bounds):
            if x <= b:
                counts[i] += 1
                break
    out = []
    for i, b in enumerate(bounds):
        label = "0" if i == 0 else (f"> {bounds[i - 1] * 1000:g} ms" if b == math.inf
                                    else f"<= {b * 1000:g} ms")
        out.append((label, counts[i]))
    return out


def bucket_quantile(q: float, hist0: dict[str, float], hist1: dict[str, float]) -> float:
    """histogram_quantile over the difference of two scrapes of cumulative buckets."""
    rows = sorted(((float(le), hist1.get(le, 0.0) - hist0.get(le, 0.0)) for le in hist1),
                  key=lambda r: r[0])
    if not rows or rows[-1][1] <= 0:
        return math.nan
    rank = q * rows[-1][1]
    lo_bound, lo_count = 0.0, 0.0
    for bound, count in rows:
        if count >= rank:
            if bound == math.inf:
                return lo_bound
            return lo_bound + (bound - lo_bound) * (rank - lo_count) / max(count - lo_count, 1e-9)
        lo_bound, lo_count = bound, count
    return rows[-1][0]


STAGES = ("write", "durable", "cut", "extracted", "planned", "sent", "acked", "released")


def read_trace(path: str, start: float, end: float) -> list[dict[str, float]]:
    """The traced points (DRCTL_CP_TRACE) whose oldest write falls in [start, end)."""
    out = []
    try:
        with open(path) as fh:
            for line in fh:
                try:
                    p = json.loads(line)
                except ValueError:
                    continue  # a line being written
                if "write" in p and start <= p["write"] < end:
                    out.append(p)
    except FileNotFoundError:
        pass
    return out


def stage_breakdown(points: list[dict[str, float]], top: float = 1.0) -> dict[str, Any]:
    """Mean time (ms) spent between consecutive stages, for all points and for the slowest
    ``top`` percent of them (by lag), plus where each slow point spent most."""
    if not points:
        return {}
    def steps(p: dict[str, float]) -> dict[str, float]:
        out = {}
        prev = None
        for s in STAGES:
            if p.get(s):
                if prev is not None:
                    out[f"{prev}->{s}"] = max(0.0, (p[s] - p[prev]) * 1000)
                prev = s
        return out

    ranked = sorted(points, key=lambda p: p.get("lag", 0.0))
    n_top = max(1, round(len(ranked) * top / 100))
    slow = ranked[-n_top:]

    def mean_steps(ps: list[dict[str, float]]) -> dict[str, float]:
        tot: dict[str, float] = {}
        for p in ps:
            for k, v in steps(p).items():
                tot[k] = tot.get(k, 0.0) + v
        return {k: round(v / len(ps), 2) for k, v in tot.items()}

    return {"points": len(points), "slow_points": n_top,
            "slow_min_lag_ms": round(slow[0].get("lag", 0.0) * 1000, 1),
            "all_mean_ms": mean_steps(ranked), "slow_mean_ms": mean_steps(slow),
            "slow_blocks_mean": round(sum(p.get("blocks", 0) for p in slow) / n_top, 1),
            "all_blocks_mean": round(sum(p.get("blocks", 0) for p in ranked) / len(ranked), 1),
            "slow_inflight_mean": round(sum(p.get("inflight", 0) for p in slow) / n_top, 2),
            "slow_flush": int(sum(p.get("flush", 0) for p in slow))}


if __name__ == "__main__":
    cmd = sys.argv[1]
    if cmd == "wait-zero":
        raise SystemExit(wait_zero(int(sys.argv[2]), float(sys.argv[3])))
    if cmd == "sample":
        sample(int(sys.argv[2]), float(sys.argv[3]), sys.argv[4])
    else:
        raise SystemExit(f"unknown command {cmd!r}")
