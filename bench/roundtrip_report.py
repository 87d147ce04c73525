"""A run of bench/failover_roundtrip.py: its results (one row per phase, where the time went,
the service record as polled) and their report: a markdown table, the targets met or not, and
a RESULT line of JSON."""

from __future__ import annotations

import json
from dataclasses import dataclass, field


@dataclass
class Row:
    phase: str
    seconds: float
    block_bytes: int | None = None  # the tool's own count of data shipped
    tcp_bytes: int | None = None
    note: str = ""


@dataclass
class RunResult:
    size: int
    rows: list[Row] = field(default_factory=list)
    breakdown: dict[str, list[tuple[str, float]]] = field(default_factory=dict)
    timelines: dict[str, list[tuple[float, str]]] = field(default_factory=dict)
    load: dict[str, tuple[float, float, float]] = field(default_factory=dict)
    verify_ok: bool | None = None
    problems: list[str] = field(default_factory=list)

    def row(self, phase: str) -> Row:
        return next(r for r in self.rows if r.phase == phase)


# -- report ---------------------------------------------------------------------------------

def fmt_bytes(n: int | None) -> str:
    return "" if n is None else f"{n:,}"


def table(res: RunResult) -> str:
    full = res.row("full copy: `drctl replicate push --once` to an empty target")
    full_bytes = full.tcp_bytes if full.tcp_bytes is not None else full.block_bytes
    out = ["| phase | seconds | block bytes shipped | TCP bytes | % of volume | bytes vs full "
           "copy | time vs full copy | note |", "|---|---|---|---|---|---|---|---|"]
    for r in res.rows:
        shipped = r.tcp_bytes if r.tcp_bytes is not None else r.block_bytes
        pct = f"{100 * r.block_bytes / res.size:.2f}%" if r.block_bytes is not None else ""
        br = (f"{shipped / full_bytes:.4f}" if shipped is not None and full_bytes
              and r.block_bytes is not None else "")
        tr = f"{r.seconds / full.seconds:.3f}"
        out.append(f"| {r.phase} | {r.seconds:.2f} | {fmt_bytes(r.block_bytes)} | "
                   f"{fmt_bytes(r.tcp_bytes)} | {pct} | {br} | {tr} | {r.note} |")
    return "\n".join(out)


def targets(res: RunResult) -> list[str]:
    rp = res.row("re-protect (east agent restart -> healthy at west, lag 0)")
    full = res.row("full copy: `drctl replicate push --once` to an empty target")
    out = []
    if rp.block_bytes is not None:
        frac = rp.block_bytes / res.size
        out.append(f"re-protect ships under 2% of the volume: {100 * frac:.2f}% "
                   f"({'met' if frac < 0.02 else 'NOT met'})")
    ratio = rp.seconds / full.seconds
    out.append(f"re-protect under a tenth of the full copy's time: {rp.seconds:.2f}s / "
               f"{full.seconds:.2f}s = {ratio:.3f} ({'met' if ratio < 0.1 else 'NOT met'})")
    return out


def report(n: int, res: RunResult) -> None:
    print(f"\n=== run {n}: volume {res.size:,} bytes ===")
    print(table(res))
    print()
    for line in targets(res):
        print(line)
    for phase, steps in res.breakdown.items():
        print(f"\n{phase}: where the time goes (seconds from the phase's start)")
        for label, t in steps:
            print(f"  {t:8.2f}  {label}")
    for phase, tl in res.timelines.items():
        print(f"\n{phase}: service record as polled")
        for t, s in tl:
            print(f"  {t:8.2f}  {s}")
    print("\nload average before each phase (1/5/15 min): "
          + "; ".join(f"{k} {v[0]:.2f}/{v[1]:.2f}/{v[2]:.2f}" for k, v in res.load.items()))
    print(f"replica verified equal at the end (`drctl replicate verify`): {res.verify_ok}")
    if res.problems:
        print("\nproblems seen:")
        for p in res.problems:
            print(f"  - {p}")
    print("\nRESULT " + json.dumps({
        "size": res.size, "rows": [r.__dict__ for r in res.rows],
        "breakdown": res.breakdown, "load": res.load, "verify_ok": res.verify_ok,
        "problems": res.problems}), flush=True)
