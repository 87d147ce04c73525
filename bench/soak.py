"""Soak: lease timing under a CPU hog, on the demo's topology.

Starts N busy processes (``python -c 'while True: pass'``, default 2: a 2-core machine at a
load of 2 or more on top of the demo's own work), then the demo cluster (drctl.demo.DemoCluster:
etcd with TLS and authentication, named, two site agents running their data path, a
controller, the API, an application writing ~200 4 KiB writes/s through the primary's NBD
export) without its scripted lifecycle, and watches it for ``--minutes``. Nothing is killed, so
every lease loss and every move to primary_suspect is spurious.

Counted from the processes' logs when it ends:

  lease losses        "lease ... lost" (a keeper gave up), in the agents' and controller's logs
  step-downs          "stepping down" (controller), "fencing ..." (agents: self-fence)
  primary_suspect     "-> primary_suspect" transitions in the controller's log (the start-up
                      one included), and the service record's history (``drctl status --json``)
  keeper timings      the keepers' one-a-minute lines: scheduling delay (how late a refresh
                      woke after it was due) and refresh round trip, p50/p99/max per window

Run: python bench/soak.py [--minutes 10] [--hogs 2] [--logs DIR]   (exit 1 on any loss/flap)
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.common import DRCTL, stop
from drctl.demo import DemoCluster

LOGS = ("agent-east", "agent-west", "controller")
_KEEPER = re.compile(r"keeper: (\d+) refreshes in (\d+)s, (\d+) failed; scheduling delay "
                     r"(?:p50 (\d+) p99 (\d+) max (\d+) ms|-); round trip "
                     r"(?:p50 (\d+) p99 (\d+) max (\d+) ms|-)")
_LOST = re.compile(r"lease [0-9a-f]+ lost")


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def hogs(n: int) -> list[subprocess.Popen[bytes]]:
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]


def read_log(work: str, name: str) -> list[str]:
    try:
        with open(os.path.join(work, f"{name}.log"), errors="replace") as fh:
            return fh.read().splitlines()
    except OSError:
        return []


def keeper_figures(lines: list[str]) -> dict[str, Any]:
    """The keeper's windows, summed up: refreshes, failures, and for the scheduling delay and
    the round trip the median window p50, the highest window p99 and the maximum (ms)."""
    rows = [m.groups() for m in map(_KEEPER.search, lines) if m]
    out: dict[str, Any] = {"windows": len(rows),
                              "refreshes": sum(int(r[0]) for r in rows),
                              "failed": sum(int(r[2]) for r in rows)}
    for name, first in (("delay", 3), ("round_trip", 6)):
        vals = [r[first:first + 3] for r in rows if r[first] is not None]
        if vals:
            out[name] = {"p50": statistics.median(int(v[0]) for v in vals),
                         "p99_max": max(int(v[1]) for v in vals),
                         "max": max(int(v[2]) for v in vals)}
    return out


def history(demo: DemoCluster) -> list[str]:
    """The service record's history (its last 20 steps, "from->to"), from `drctl status
    --json`."""
    r = subprocess.run([*DRCTL, "status", "--config", demo.config, "--json"],
                       capture_output=True, text=True, timeout=60)
    if r.returncode != 0:
        return []
    steps: list[str] = json.loads(r.stdout)["services"]["app"].get("history", [])
    return steps


_ETCD_SLOW = ("took too long", "slow fdatasync", "failed to send out heartbeat on time",
              "waiting for ReadIndex response took too long")


def etcd_stalls(log: str) -> list[str]:
    """etcd's own warnings that it was slow (a request, a disk sync, its heartbeat)."""
    return [ln for ln in log.splitlines() if any(m in ln for m in _ETCD_SLOW)]


def count(work: str) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for name in LOGS:
        lines = read_log(work, name)
        out[name] = {
            "lease_lost": sum(1 for ln in lines if _LOST.search(ln)),
            "stepping_down": sum(1 for ln in lines if "stepping down" in ln),
            "self_fence": sum(1 for ln in lines if re.search(r"fencing \w+: ", ln)),
            "primary_suspect": sum(1 for ln in lines if "-> primary_suspect" in ln),
            "keeper": keeper_figures(lines),
        }
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--hogs", type=int, default=2, help="busy processes (0: none)")
    ap.add_argument("--logs", help="copy the processes' logs here before cleaning up")
    args = ap.parse_args()

    readings = [("before", uptime())]
    busy = hogs(args.hogs)
    demo = DemoCluster()
    try:
        time.sleep(5 if busy else 0)  # the hogs' load is there when the demo starts
        readings.append(("hogs started", uptime()))
        demo.start()
        started = time.monotonic()
        print(f"demo up (logs in {demo.work}); {args.hogs} hogs; {args.minutes:g} min",
              flush=True)
        end = started + 60 * args.minutes
        while time.monotonic() < end:
            time.sleep(min(60.0, max(0.0, end - time.monotonic())))
            c = count(demo.work)
            print(f"  {(time.monotonic() - started) / 60:4.1f} min  load "
                  f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}  lease lost "
                  f"{sum(int(v['lease_lost']) for v in c.values())}  primary_suspect "
                  f"{c['controller']['primary_suspect']}", flush=True)
            if len(readings) < 3 and time.monotonic() - started > 30 * args.minutes:
                readings.append(("half-way", uptime()))
        readings.append(("end", uptime()))
        result = count(demo.work)
        steps = history(demo)
        etcd_log = demo.etcd.log() if demo.etcd is not None else ""
        stalls = etcd_stalls(etcd_log)
        if args.logs:
            os.makedirs(args.logs, exist_ok=True)
            for name in (*LOGS, "api"):
                if os.path.exists(os.path.join(demo.work, f"{name}.log")):
                    shutil.copy(os.path.join(demo.work, f"{name}.log"), args.logs)
            with open(os.path.join(args.logs, "etcd.log"), "w") as fh:
                fh.write(etcd_log)
    finally:
        demo.stop()
        for p in busy:
            stop(p)
    suspects = [s for s in steps if s.endswith("->primary_suspect")]
    print("\nuptime:")
    for when, line in readings:
        print(f"  {when:>13}: {line}")
    print(f"\n{'process':<12} {'lost':>5} {'down':>5} {'fence':>6} {'suspect':>8}  keeper "
          "(ms: delay p50/p99/max | round trip p50/p99/max, refreshes, failed)")
    for name, c in result.items():
        k = c["keeper"]
        d, t = k.get("delay", {}), k.get("round_trip", {})
        print(f"{name:<12} {c['lease_lost']:>5} {c['stepping_down']:>5} {c['self_fence']:>6} "
              f"{c['primary_suspect']:>8}  {d.get('p50', '-')}/{d.get('p99_max', '-')}/"
              f"{d.get('max', '-')} | {t.get('p50', '-')}/{t.get('p99_max', '-')}/"
              f"{t.get('max', '-')}, {k['refreshes']}, {k['failed']}")
    print(f"record history: {', '.join(steps) or 'empty'} ({len(suspects)} to primary_suspect)")
    print(f"etcd reported itself slow {len(stalls)} times"
          + "".join(f"\n  {ln[:200]}" for ln in stalls[-5:]))
    print(json.dumps({"minutes": args.minutes, "hogs": args.hogs, "counts": result,
                      "history_suspects": len(suspects), "etcd_slow": len(stalls),
                      "uptime": readings}))
    losses = sum(int(c["lease_lost"]) for c in result.values())
    return 1 if losses or result["controller"]["primary_suspect"] or suspects else 0


if __name__ == "__main__":
    sys.exit(main())
