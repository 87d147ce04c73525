"""Benchmark: writes through the NBD capture front end, and the replication lag they see.

1. fio random 4 KiB writes for 10 s through drctl's NBD export vs fio straight on a file of the
   same size with O_DSYNC (the same durability: drctl answers a write only once it and its
   journal record are on disk) and, for reference, buffered: write IOPS and their ratio.
2. Replication lag while fio writes (incompressible data, ``--refill_buffers``) at half and at
   80% of the rate limit through the export, on loopback: every phase starts only once the
   agent reports lag 0 (after the unpaced run of step 1 that is a backlog of its own; a phase
   that does not drain within ``--drain-timeout`` fails the run), each is repeated ``--runs``
   times. Per run: the agent's drctl_replication_lag_seconds sampled every 20 ms (p50, p99,
   max, and a histogram), the lag at acknowledgement of every consistency point (from the
   drctl_replication_ack_lag_seconds histogram and, exactly, from the agent's per-point trace,
   DRCTL_CP_TRACE) and the stage breakdown of the slowest 1% of points.
3. The same over a WAN link between two network namespaces (``--wan-rate``, ``--wan-delay-ms``
   each way; bench/netns/): the target in one, agent and fio in the other. The floor there is
   one round trip. Skipped, with the exact reason, where namespaces cannot be made.

Run: python bench/capture.py [--seconds 10] [--rate-limit-mb 10] [--runs 3] [--no-wan]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.common import DRCTL, REPO, free_port, stop
from bench.lag import bucket_quantile, histogram, pct, read_trace, stage_breakdown
from bench.netns.wan import DST_IP, WanLink, WanUnavailable

SIZE = 256 << 20


def fio(args: list[str], seconds: int, wrap: list[str] | None = None) -> float:
    p = subprocess.run([*(wrap or []), "fio", "--name=b", "--rw=randwrite", "--bs=4k",
                        "--iodepth=16", f"--runtime={seconds}", "--time_based", "--randrepeat=0",
                        "--output-format=json", *args], capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"fio failed: {p.stderr[-2000:]}")
    out = p.stdout[p.stdout.index("{"):]  # the nbd engine prints a line before the JSON
    return float(json.loads(out)["jobs"][0]["write"]["iops"])


def tls_flags(work: str, host: str) -> tuple[list[str], list[str]]:
    """(serve's, push's) security flags: plaintext (``--insecure``) on loopback; off loopback,
    where drctl refuses plaintext, mutual TLS with a deployment made here (site east pushes to
    site west at ``host``); none for a drctl without TLS flags."""
    out = subprocess.run([*DRCTL, "replicate", "serve", "--help"], cwd=REPO,
                         capture_output=True, text=True).stdout
    if "--insecure" not in out:
        return [], []
    if host.startswith("127."):
        return ["--insecure"], ["--insecure"]
    pki = os.path.join(work, "pki")
    for cmd in (["init", "--dir", pki, "--deployment", "bench"],
                ["issue", "--dir", pki, "--site", "west", "--host", host],
                ["issue", "--dir", pki, "--site", "east"]):
        subprocess.run([*DRCTL, "certs", *cmd], cwd=REPO, check=True, stdout=subprocess.DEVNULL)
    return (["--tls-dir", pki, "--site", "west", "--allow", "east"],
            ["--tls-dir", pki, "--site", "east", "--target-site", "west"])


class Pair:
    """A target and a capture agent (in network namespaces when ``wrap_*`` are given)."""

    def __init__(self, work: str, name: str, cap: int, args: argparse.Namespace,
                 target_host: str = "127.0.0.1", wrap_src: list[str] | None = None,
                 wrap_dst: list[str] | None = None) -> None:
        self.work = os.path.join(work, name)
        os.makedirs(self.work)
        self.name, self.cap, self.args = name, cap, args
        self.target_host = target_host
        self.wrap_src, self.wrap_dst = wrap_src or [], wrap_dst or []
        self.vol = os.path.join(self.work, "vol.img")
        with open(self.vol, "wb") as fh:
            fh.truncate(SIZE)
        self.trace = os.path.join(self.work, "points.jsonl")
        self.tport, self.nport, self.mport = free_port(), free_port(), free_port()
        self.procs: list[subprocess.Popen[bytes]] = []
        self.tls = False

    def start(self) -> None:
        serve_tls, push_tls = tls_flags(self.work, self.target_host)
        self.tls = "--tls-dir" in push_tls
        self.procs.append(subprocess.Popen(
            [*self.wrap_dst, *DRCTL, "replicate", "serve", "--listen",
             f"{self.target_host}:{self.tport}", "--dir", os.path.join(self.work, "t"),
             *serve_tls], cwd=REPO, stdout=subprocess.DEVNULL))
        env = dict(os.environ, DRCTL_CP_TRACE=self.trace) if self.args.trace else None
        self.procs.append(subprocess.Popen(
            [*self.wrap_src, *DRCTL, "replicate", "push", self.vol, "--to",
             f"{self.target_host}:{self.tport}", "--volume", "v",
             "--nbd-listen", f"127.0.0.1:{self.nport}", "--metrics-port", str(self.mport),
             "--rate-limit", f"{self.cap}B/s", "--interval", "0.05",
             "--cp-interval", str(self.args.cp_interval),
             "--state-dir", os.path.join(self.work, "st"), "--no-progress", *push_tls],
            cwd=REPO, stdout=subprocess.DEVNULL, env=env))
        self.wait_drained("start (initial sync)")

    def probe(self, *args: str) -> list[str]:
        return [*self.wrap_src, sys.executable, "-m", "bench.lag", *args]

    def wait_drained(self, phase: str) -> float:
        """Until the agent reports lag 0 and a protected replica; fails the run after the
        drain timeout."""
        p = subprocess.run(self.probe("wait-zero", str(self.mport), str(self.args.drain_timeout)),
                           cwd=REPO, capture_output=True, text=True)
        result = json.loads(p.stdout or "{}")
        if p.returncode != 0:
            for proc in self.procs:
                if proc.poll() is not None:
                    result["exited"] = proc.returncode
            raise SystemExit(f"{self.name}: lag did not return to 0 within "
                             f"{self.args.drain_timeout:g} s before {phase} ({result}): failing "
                             "the run")
        return float(result["waited"])

    @property
    def uri(self) -> str:
        return f"nbd://127.0.0.1:{self.nport}/v"

    def measure(self, frac: int) -> dict[str, Any]:
        """One paced fio run at ``frac`` percent of the cap, from lag 0."""
        rate = self.cap * frac // 100
        waited = self.wait_drained(f"the {frac}% run")
        out = os.path.join(self.work, f"samples-{time.monotonic_ns()}.json")
        sampler = subprocess.Popen(self.probe("sample", str(self.mport), "0.02", out), cwd=REPO)
        time.sleep(0.3)
        t0 = time.monotonic()
        iops = fio(["--ioengine=nbd", f"--uri={self.uri}", f"--size={SIZE}", f"--rate={rate}",
                    "--refill_buffers"], self.args.seconds, self.wrap_src)
        t1 = time.monotonic()
        self.wait_drained(f"the end of the {frac}% run")  # its last points acknowledged
        sampler.send_signal(signal.SIGTERM)
        sampler.wait(30)
        with open(out) as fh:
            got = json.load(fh)
        lags = [v for t, v in got["samples"] if t0 <= t <= t1]
        points = read_trace(self.trace, t0, t1)
        point_lags = [p["lag"] for p in points if "lag" in p]
        return {
            "link": self.name, "tls": self.tls, "percent_of_cap": frac, "rate_bytes": rate,
            "achieved_mb_s": round(iops * 4096 / 1e6, 2), "iops": round(iops),
            "drained_before_s": round(waited, 2), "samples": len(lags),
            "p50": pct(lags, 50), "p99": pct(lags, 99), "max": max(lags, default=0.0),
            "mean": statistics.mean(lags) if lags else 0.0,
            "sample_histogram": histogram(lags),
            "ack_hist_p50": bucket_quantile(0.5, got["hist0"], got["hist1"]),
            "ack_hist_p99": bucket_quantile(0.99, got["hist0"], got["hist1"]),
            "points": len(point_lags), "point_p50": pct(point_lags, 50),
            "point_p99": pct(point_lags, 99), "point_max": max(point_lags, default=0.0),
            "breakdown": stage_breakdown(points),
        }

    def stop(self) -> None:
        for p in reversed(self.procs):
            stop(p)


def lag_runs(pair: Pair, args: argparse.Namespace) -> list[dict[str, Any]]:
    runs = []
    for frac in (50, 80):
        for _ in range(args.runs):
            r = pair.measure(frac)
            print(json.dumps({k: v for k, v in r.items() if k not in ("sample_histogram",
                                                                         "breakdown")}),
                  flush=True)
            runs.append(r)
    return runs


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=int, default=10)
    ap.add_argument("--rate-limit-mb", type=float, default=10,
                    help="the loopback agent's --rate-limit (MB/s); runs pace at 50%% and 80%%")
    ap.add_argument("--cp-interval", type=float, default=0.0,
                    help="push --cp-interval (0, the default: cut as soon as the previous "
                    "point is sent)")
    ap.add_argument("--runs", type=int, default=3, help="repeats of each paced phase")
    ap.add_argument("--drain-timeout", type=float, default=120.0,
                    help="seconds a phase may wait for lag 0 before the run fails")
    ap.add_argument("--no-iops", action="store_true", help="skip the IOPS comparison")
    ap.add_argument("--no-wan", action="store_true", help="skip the network-namespace link")
    ap.add_argument("--no-loopback", action="store_true", help="skip the loopback lag runs")
    ap.add_argument("--wan-rate", default="50mbit", help="tbf rate of each direction")
    ap.add_argument("--wan-delay-ms", type=float, default=40.0, help="delay of each direction")
    ap.add_argument("--wan-no-slow-start-after-idle", action="store_true",
                    help="net.ipv4.tcp_slow_start_after_idle=0 in the namespaces (Linux: 1)")
    ap.add_argument("--wan-congestion", default="",
                    help="TCP congestion control on the namespaces' routes (congctl; default: "
                         "the host's net.ipv4.tcp_congestion_control; cubic is Linux's "
                         "default, bbr is BBR v1)")
    ap.add_argument("--no-trace", dest="trace", action="store_false",
                    help="no per-point stage trace (DRCTL_CP_TRACE) in the agent")
    ap.add_argument("--json", help="also write every figure to this file")
    ap.add_argument("--keep", metavar="DIR",
                    help="copy the per-point traces (DRCTL_CP_TRACE) into DIR")
    return ap.parse_args()


def main() -> None:
    args = parse_args()
    if not shutil.which("fio"):
        raise SystemExit("fio is not installed (scripts/install-deps.sh installs it)")
    print(f"uptime before: {uptime()}", flush=True)
    work = tempfile.mkdtemp(prefix="drctl-capbench-")
    result: dict[str, Any] = {"args": vars(args), "uptime_before": uptime()}
    try:
        cap = int(args.rate_limit_mb * 1e6)
        if not args.no_iops:
            result["iops"] = iops_phase(work, args)
        if not args.no_loopback:
            pair = Pair(work, "loopback", cap, args)
            try:
                pair.start()
                if not args.no_iops:
                    result["iops"]["nbd_qd16"] = round(fio(
                        ["--ioengine=nbd", f"--uri={pair.uri}", f"--size={SIZE}"], args.seconds))
                result["loopback"] = lag_runs(pair, args)
            finally:
                pair.stop()
        if not args.no_wan:
            result["wan"] = wan_phase(work, args)
    finally:
        if args.keep:
            os.makedirs(args.keep, exist_ok=True)
            for link in ("loopback", "wan"):
                trace = os.path.join(work, link, "points.jsonl")
                if os.path.exists(trace):
                    shutil.copy(trace, os.path.join(args.keep, f"{link}-points.jsonl"))
        shutil.rmtree(work, ignore_errors=True)
    result["uptime_after"] = uptime()
    print(f"uptime after: {result['uptime_after']}", flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=1)
    report(args, result)


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def iops_phase(work: str, args: argparse.Namespace) -> dict[str, Any]:
    plain = os.path.join(work, "plain.img")
    with open(plain, "wb") as fh:
        fh.truncate(SIZE)
    return {
        "file_dsync_qd1": round(fio([f"--filename={plain}", "--ioengine=psync", "--iodepth=1",
                                     "--sync=dsync", f"--size={SIZE}"], args.seconds)),
        "file_dsync_qd16": round(fio([f"--filename={plain}", "--ioengine=libaio", "--direct=0",
                                      "--sync=dsync", f"--size={SIZE}"], args.seconds)),
        "file_buffered": round(fio([f"--filename={plain}", "--ioengine=psync", "--iodepth=1",
                                    f"--size={SIZE}"], args.seconds)),
    }


def wan_phase(work: str, args: argparse.Namespace) -> dict[str, Any]:
    link = WanLink(args.wan_rate, args.wan_delay_ms, python=sys.executable,
                   slow_start_after_idle=not args.wan_no_slow_start_after_idle,
                   congestion=args.wan_congestion)
    try:
        link.up()
    except WanUnavailable as exc:
        print(f"WAN phase skipped: {exc}", flush=True)
        return {"skipped": str(exc)}
    out: dict[str, Any] = {"rate": args.wan_rate, "delay_ms_each_way": args.wan_delay_ms,
                           "tcp_slow_start_after_idle": not args.wan_no_slow_start_after_idle,
                           "tcp_congestion_control": link.congestion}
    try:
        out["rtt_ms"] = link.rtt_ms()
        print(f"WAN link {args.wan_rate}, {args.wan_delay_ms:g} ms each way, TCP congestion "
              f"control {link.congestion}: round trip {out['rtt_ms']}", flush=True)
        bits = float(args.wan_rate.removesuffix("mbit")) * 1e6
        cap = int(bits / 8)  # "the link": pace at 50% and 80% of it
        pair = Pair(work, "wan", cap, args, target_host=DST_IP, wrap_src=link.exec("src", []),
                    wrap_dst=link.exec("dst", []))
        try:
            pair.start()
            # warm-up, not measured: a fresh connection's TCP window and HTTP/2 flow-control
            # window first grow over a few round trips (the first 0.4 s of points waited
            # 2-3 round trips in the first run without it)
            fio(["--ioengine=nbd", f"--uri={pair.uri}", f"--size={SIZE}",
                 f"--rate={cap * 8 // 10}", "--refill_buffers"], 3, pair.wrap_src)
            out["runs"] = lag_runs(pair, args)
        finally:
            pair.stop()
    finally:
        link.down()
    return out


def report(args: argparse.Namespace, result: dict[str, Any]) -> None:
    report_iops(result.get("iops") or {})
    runs = list(result.get("loopback", []))
    wan = result.get("wan", {})
    runs += wan.get("runs", [])
    if wan.get("skipped"):
        print(f"\nWAN: skipped: {wan['skipped']}")
    if runs:
        report_lag(runs)


def report_iops(iops: dict[str, Any]) -> None:
    if "nbd_qd16" in iops:
        nbd = iops["nbd_qd16"]
        print("\n| writes (4 KiB random, 16 in flight unless noted) | IOPS | drctl / this |")
        print("|---|---|---|")
        print(f"| through drctl's NBD export (durable before reply) | {nbd} | 1.00 |")
        for key, label in (("file_dsync_qd16", "file, O_DSYNC, 16 in flight (libaio)"),
                           ("file_dsync_qd1", "file, O_DSYNC, one at a time"),
                           ("file_buffered", "file, buffered (no durability)")):
            print(f"| {label} | {iops[key]} | {nbd / iops[key]:.3f} |")


def report_lag(runs: list[dict[str, Any]]) -> None:
    ms = 1000
    print("\n| link | load | achieved MB/s | drained before (s) | samples | lag p50 / p99 / max "
          "(ms, sampled 20 ms) | points | point lag at ack p50 / p99 / max (ms) | ack-lag "
          "histogram p99 (ms) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in runs:
        print(f"| {r['link']} | {r['percent_of_cap']}% | {r['achieved_mb_s']:.2f} | "
              f"{r['drained_before_s']:.1f} | {r['samples']} | {r['p50'] * ms:.0f} / "
              f"{r['p99'] * ms:.0f} / {r['max'] * ms:.0f} | {r['points']} | "
              f"{r['point_p50'] * ms:.0f} / {r['point_p99'] * ms:.0f} / "
              f"{r['point_max'] * ms:.0f} | {r['ack_hist_p99'] * ms:.0f} |")
    for link in ("loopback", "wan"):
        for frac in (50, 80):
            group = [r for r in runs if r["link"] == link and r["percent_of_cap"] == frac]
            if not group:
                continue
            merged: dict[str, int] = {}
            for r in group:
                for label, n in r["sample_histogram"]:
                    merged[label] = merged.get(label, 0) + n
            total = sum(merged.values()) or 1
            print(f"\nlag samples, {link} at {frac}% ({len(group)} runs, every 20 ms):")
            for label, n in merged.items():
                print(f"  {label:>10} {n:6d} {'#' * round(60 * n / total)}")
            report_stages(group)


def report_stages(group: list[dict[str, Any]]) -> None:
    for r in group:
        b = r["breakdown"]
        if b:
            print(f"  stages (ms), slowest {b['slow_points']} of {b['points']} points "
                  f"(lag >= {b['slow_min_lag_ms']} ms): {b['slow_mean_ms']}; "
                  f"all: {b['all_mean_ms']}; blocks/point {b['slow_blocks_mean']} "
                  f"(all {b['all_blocks_mean']}), in flight at cut {b['slow_inflight_mean']}")


if __name__ == "__main__":
    main()
