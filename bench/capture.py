"""Benchmark: writes through the NBD capture front end.

1. fio random 4 KiB writes for 10 s through drctl's NBD export vs fio straight on a file of the
   same size with O_DSYNC (the same durability: drctl answers a write only once it and its
   journal record are on disk) and, for reference, buffered: write IOPS and their ratio.
2. Replication lag while fio writes at half the rate limit through the export: the agent's
   drctl_replication_lag_seconds sampled every 100 ms: p50, p99, max.

Run: python bench/capture.py [--seconds 10] [--rate-limit-mb 40]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.common import DRCTL, REPO, free_port, stop, wait_port

SIZE = 256 << 20


def fio(args: list[str], seconds: int) -> float:
    p = subprocess.run(["fio", "--name=b", "--rw=randwrite", "--bs=4k", "--iodepth=16",
                        f"--runtime={seconds}", "--time_based", "--randrepeat=0",
                        "--output-format=json", *args], capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"fio failed: {p.stderr[-2000:]}")
    out = p.stdout[p.stdout.index("{"):]  # the nbd engine prints a line before the JSON
    return float(json.loads(out)["jobs"][0]["write"]["iops"])


def lag(port: int) -> float | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=1) as r:
            for line in r.read().decode().splitlines():
                if line.startswith("drctl_replication_lag_seconds{"):
                    return float(line.rsplit(" ", 1)[1])
    except OSError:
        return None
    return None


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[max(0, min(len(xs) - 1, round(p / 100 * (len(xs) - 1))))]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=int, default=10)
    ap.add_argument("--rate-limit-mb", type=int, default=40)
    ap.add_argument("--cp-interval", type=float, default=0.05,
                    help="push --cp-interval: how long writes wait for a FLUSH before a cut")
    args = ap.parse_args()
    if not shutil.which("fio"):
        raise SystemExit("fio is not installed (scripts/install-deps.sh installs it)")
    work = tempfile.mkdtemp(prefix="drctl-capbench-")
    plain = os.path.join(work, "plain.img")
    vol = os.path.join(work, "vol.img")
    for path in (plain, vol):
        with open(path, "wb") as fh:
            fh.truncate(SIZE)
    procs = []
    try:
        file_dsync = fio([f"--filename={plain}", "--ioengine=psync", "--iodepth=1",
                          "--sync=dsync", f"--size={SIZE}"], args.seconds)
        file_dsync16 = fio([f"--filename={plain}", "--ioengine=libaio", "--direct=0",
                            "--sync=dsync", f"--size={SIZE}"], args.seconds)
        file_buffered = fio([f"--filename={plain}", "--ioengine=psync", "--iodepth=1",
                             f"--size={SIZE}"], args.seconds)
        tport, nport, mport = free_port(), free_port(), free_port()
        procs.append(subprocess.Popen([*DRCTL, "replicate", "serve", "--listen",
                                       f"127.0.0.1:{tport}", "--dir", os.path.join(work, "t")],
                                      cwd=REPO, stdout=subprocess.DEVNULL))
        wait_port(tport)
        procs.append(subprocess.Popen(
            [*DRCTL, "replicate", "push", vol, "--to", f"127.0.0.1:{tport}", "--volume", "v",
             "--nbd-listen", f"127.0.0.1:{nport}", "--metrics-port", str(mport),
             "--rate-limit", f"{args.rate_limit_mb}MB/s", "--interval", "0.05",
             "--cp-interval", str(args.cp_interval),
             "--state-dir", os.path.join(work, "st"), "--no-progress"],
            cwd=REPO, stdout=subprocess.DEVNULL))
        wait_port(nport)
        time.sleep(1.0)
        uri = f"nbd://127.0.0.1:{nport}/v"
        nbd = fio(["--ioengine=nbd", f"--uri={uri}", f"--size={SIZE}"], args.seconds)
        time.sleep(2.0)  # let the replica catch up
        samples: list[float] = []
        done = threading.Event()

        def sample() -> None:
            while not done.is_set():
                v = lag(mport)
                if v is not None:
                    samples.append(v)
                time.sleep(0.1)

        t = threading.Thread(target=sample)
        t.start()
        half = args.rate_limit_mb // 2
        paced = fio(["--ioengine=nbd", f"--uri={uri}", f"--size={SIZE}", f"--rate={half}m"],
                    args.seconds)
        done.set()
        t.join()
    finally:
        for p in reversed(procs):
            stop(p)
        shutil.rmtree(work, ignore_errors=True)
    report(args, file_dsync, file_dsync16, file_buffered, nbd, paced, samples)


def report(args: argparse.Namespace, file_dsync: float, file_dsync16: float,
           file_buffered: float, nbd: float, paced: float, samples: list[float]) -> None:
    half = args.rate_limit_mb // 2
    print(json.dumps({"file_dsync_qd1_iops": round(file_dsync),
                      "file_dsync_qd16_iops": round(file_dsync16),
                      "file_buffered_iops": round(file_buffered), "nbd_qd16_iops": round(nbd),
                      "paced_iops": round(paced), "lag_samples": len(samples)}))
    print("\n| writes (4 KiB random, 16 in flight unless noted) | IOPS | drctl / this |")
    print("|---|---|---|")
    print(f"| through drctl's NBD export (durable before reply) | {nbd:.0f} | 1.00 |")
    print(f"| file, O_DSYNC, 16 in flight (libaio) | {file_dsync16:.0f} | "
          f"{nbd / file_dsync16:.2f} |")
    print(f"| file, O_DSYNC, one at a time | {file_dsync:.0f} | {nbd / file_dsync:.2f} |")
    print(f"| file, buffered (no durability) | {file_buffered:.0f} | {nbd / file_buffered:.3f} |")
    print(f"\nlag while writing at {half} MB/s (half the {args.rate_limit_mb} MB/s cap; "
          f"achieved {paced * 4096 / 1e6:.1f} MB/s), {len(samples)} samples: p50 "
          f"{pct(samples, 50):.3f} s, p99 {pct(samples, 99):.3f} s, max {max(samples):.3f} s, "
          f"mean {statistics.mean(samples):.3f} s")


if __name__ == "__main__":
    main()
