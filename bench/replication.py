"""Benchmark: drctl replicate push --once vs rsync (daemon on 127.0.0.1), same run, same data.

Scenarios (1 GiB image by default, see bench/common.py:make_image for its content):
  initial  first full sync to an empty target
  delta    1% of the 4 KiB blocks rewritten at random, then sync again
  bulk     a 512 MiB region rewritten with fresh random data: changed-block throughput

Run: python bench/replication.py [--size-mib 1024] [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (
    DRCTL,
    REPO,
    WireCounter,
    change_blocks,
    free_port,
    make_image,
    stop,
    wait_port,
)


def run_timed(cmd: list[str], **kw: object) -> tuple[float, str]:
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, **kw)  # type: ignore[call-overload]
    dt = time.perf_counter() - t0
    if p.returncode != 0:
        raise SystemExit(f"{cmd[:4]} failed ({p.returncode}): {p.stderr[-2000:]}")
    return dt, p.stdout


def rsync_stats(out: str) -> int:
    sent = recv = 0
    for line in out.splitlines():
        if line.startswith("Total bytes sent:"):
            sent = int(line.split(":")[1].replace(",", ""))
        if line.startswith("Total bytes received:"):
            recv = int(line.split(":")[1].replace(",", ""))
    return sent + recv


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()
    if not shutil.which("rsync"):
        raise SystemExit("rsync not installed (scripts/install-deps.sh installs it)")
    work = tempfile.mkdtemp(prefix="drctl-bench-")
    src = os.path.join(work, "src.img")
    size = args.size_mib << 20
    t0 = time.perf_counter()
    kinds = make_image(src, size)
    print(f"image: {args.size_mib} MiB in {time.perf_counter() - t0:.1f}s, 1 MiB regions: {kinds}")

    rs_dir = os.path.join(work, "rsync-dst")
    os.makedirs(rs_dir)
    rs_port = free_port()
    conf = os.path.join(work, "rsyncd.conf")
    with open(conf, "w") as fh:
        fh.write(f"pid file = {work}/rsyncd.pid\nuse chroot = no\nuid = root\ngid = root\n"
                 f"[dst]\n  path = {rs_dir}\n  read only = no\n")
    rsyncd = subprocess.Popen(["rsync", "--daemon", "--no-detach", f"--config={conf}",
                               f"--port={rs_port}", "--address=127.0.0.1"])
    dr_port = free_port()
    target = subprocess.Popen([*DRCTL, "replicate", "serve", "--listen", f"127.0.0.1:{dr_port}",
                               "--dir", os.path.join(work, "drctl-dst")], cwd=REPO,
                              stdout=subprocess.DEVNULL)
    wait_port(rs_port)
    wait_port(dr_port)
    rs_wire, dr_wire = WireCounter(rs_port), WireCounter(dr_port)
    rsync_cmd = ["rsync", "--inplace", "--no-whole-file", "--stats", src,
                 f"rsync://127.0.0.1:{rs_port}/dst/img"]
    drctl_cmd = [*DRCTL, "replicate", "push", src, "--to", f"127.0.0.1:{dr_port}", "--volume",
                 "bench", "--once", "--json", "--no-progress", "--state-dir",
                 os.path.join(work, "state")]
    results = []
    try:
        def both(name: str, changed_bytes: int) -> None:
            subprocess.run(["sync"])
            w0 = rs_wire.read()
            rs_t, rs_out = run_timed(rsync_cmd)
            w1 = rs_wire.read()
            rs_bytes = w1 - w0 if w1 is not None and w0 is not None else None
            d0 = dr_wire.read()
            dr_t, dr_out = run_timed(drctl_cmd, cwd=REPO)
            d1 = dr_wire.read()
            dr_bytes = d1 - d0 if d1 is not None and d0 is not None else None
            rep = json.loads(dr_out.strip().splitlines()[-1])
            row = {
                "scenario": name, "changed_mib": round(changed_bytes / 2**20, 1),
                "rsync_s": round(rs_t, 3), "drctl_s": round(dr_t, 3),
                "speedup": round(rs_t / dr_t, 2),
                "rsync_app_bytes": rsync_stats(rs_out), "drctl_app_bytes": rep["wire_bytes"],
                "rsync_tcp_bytes": rs_bytes, "drctl_tcp_bytes": dr_bytes,
                "drctl_in_process_s": rep["seconds"],
                "drctl_changed_mb_per_s": round(rep["raw_bytes"] / 1e6 / rep["seconds"], 1)
                if rep["seconds"] else None,
                "drctl_blocks": {k: rep[k] for k in ("data_blocks", "zero_blocks", "dedup_blocks")},
            }
            if rs_bytes and dr_bytes:
                row["wire_ratio_rsync_over_drctl"] = round(rs_bytes / dr_bytes, 2)
            results.append(row)
            print(json.dumps(row))

        both("initial", size)
        n = change_blocks(src, 0.01)
        both("delta-1pct", n * 4096)
        region = min(size // 2, 512 << 20)
        with open(src, "r+b") as fh:
            fh.seek(size // 4)
            left = region
            while left:
                chunk = os.urandom(min(left, 8 << 20))
                fh.write(chunk)
                left -= len(chunk)
        both("bulk-rewrite", region)
        ok = subprocess.run([*DRCTL, "replicate", "verify", src, "--to", f"127.0.0.1:{dr_port}",
                             "--volume", "bench"], cwd=REPO).returncode == 0
        same = subprocess.run(["cmp", src, os.path.join(rs_dir, "img")]).returncode == 0
        print(f"verify: drctl replica equal={ok}, rsync copy equal={same}")
    finally:
        rs_wire.close()
        dr_wire.close()
        stop(target)
        stop(rsyncd)
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print("\n| scenario | rsync s | drctl s | speedup | rsync bytes | drctl bytes | ratio |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        rb = r["rsync_tcp_bytes"] or r["rsync_app_bytes"]
        db = r["drctl_tcp_bytes"] or r["drctl_app_bytes"]
        print(f"| {r['scenario']} | {r['rsync_s']} | {r['drctl_s']} | {r['speedup']}x | "
              f"{rb:,} | {db:,} | {rb / db:.2f} |")


if __name__ == "__main__":
    main()
