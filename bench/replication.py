"""Benchmark: drctl replicate push --once vs rsync (daemon on 127.0.0.1), same run, same data.

Scenarios (1 GiB image by default, see bench/common.py:make_image for its content):
  initial  first full sync to an empty target
  delta    1% of the 4 KiB blocks rewritten at random, then sync again
  bulk     a 512 MiB region rewritten with fresh random data: changed-block throughput
  agent    the same 1% delta picked up by a running agent (no process start): time from the
           write to the replica verified equal

Both tools run from a warm page cache, each after a `sync` so that neither pays for flushing the
other's dirty pages. Bytes on the wire are counted by iptables rules on the
two loopback ports (TCP payload and headers, both directions) when run as root; the
application's own counts are printed too.

drctl runs over mutual TLS (its default; rsync's daemon protocol is plaintext). Each scenario
also runs drctl in plaintext (`--insecure`) against a second target, right after the TLS run
and on the same data, so the cost of TLS is measured in the same run: the table's "TLS cost"
column is (TLS time / plaintext time - 1). --no-plain skips the plaintext runs.

Run: python bench/replication.py [--size-mib 1024] [--keep] [--no-plain]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (
    DRCTL,
    REPO,
    WireCounter,
    change_blocks,
    free_port,
    make_image,
    security_flags,
    stop,
    wait_port,
)


def cpu_children() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def run_timed(cmd: list[str]) -> tuple[float, str]:
    """Wall time and stdout; the command's CPU seconds (user + system, less sensitive to other
    jobs on the machine than the wall time) are left in ``run_timed.cpu``."""
    c0, t0 = cpu_children(), time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    dt = time.perf_counter() - t0
    run_timed.cpu = cpu_children() - c0  # type: ignore[attr-defined]
    if p.returncode != 0:
        raise SystemExit(f"{cmd[:4]} failed ({p.returncode}): {p.stderr[-2000:]}")
    return dt, p.stdout


def rsync_app_bytes(out: str) -> int:
    total = 0
    for line in out.splitlines():
        if line.startswith(("Total bytes sent:", "Total bytes received:")):
            total += int(line.split(":")[1].replace(",", ""))
    return total


def delta(counter: WireCounter, before: int | None) -> int | None:
    after = counter.read()
    return after - before if after is not None and before is not None else None


@dataclass
class Bench:
    work: str
    src: str
    size: int
    plain: bool = True  # also run drctl in plaintext, against its own target
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    results: list[dict[str, object]] = field(default_factory=list)

    def start(self) -> None:
        self.rs_dir = os.path.join(self.work, "rsync-dst")
        os.makedirs(self.rs_dir)
        self.rs_port = free_port()
        conf = os.path.join(self.work, "rsyncd.conf")
        with open(conf, "w") as fh:
            fh.write(f"pid file = {self.work}/rsyncd.pid\nuse chroot = no\nuid = root\n"
                     f"gid = root\n[dst]\n  path = {self.rs_dir}\n  read only = no\n")
        self.procs.append(subprocess.Popen(["rsync", "--daemon", "--no-detach",
                                            f"--config={conf}", f"--port={self.rs_port}",
                                            "--address=127.0.0.1"]))
        self.drctl_cmd, self.client_flags, self.dr_port, self.dr_wire = self._target("tls", True)
        if self.plain:
            self.plain_cmd, _f, _p, self.plain_wire = self._target("plain", False)
        wait_port(self.rs_port)
        self.rs_wire = WireCounter(self.rs_port)
        self.rsync_cmd = ["rsync", "--inplace", "--no-whole-file", "--stats", self.src,
                          f"rsync://127.0.0.1:{self.rs_port}/dst/img"]

    def _target(self, name: str, tls: bool
                ) -> tuple[list[str], list[str], int, WireCounter]:
        """A drctl target of its own (mutual TLS or plaintext) and the push command to it."""
        port = free_port()
        serve_flags, client_flags = security_flags(os.path.join(self.work, name), tls)
        self.procs.append(subprocess.Popen(
            [*DRCTL, "replicate", "serve", "--listen", f"127.0.0.1:{port}", "--dir",
             os.path.join(self.work, f"drctl-dst-{name}"), *serve_flags], cwd=REPO,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        wait_port(port)
        cmd = [*DRCTL, "replicate", "push", self.src, "--to", f"127.0.0.1:{port}", "--volume",
               "bench", "--once", "--json", "--no-progress", "--state-dir",
               os.path.join(self.work, f"state-{name}"), *client_flags]
        return cmd, client_flags, port, WireCounter(port)

    def close(self) -> None:
        self.rs_wire.close()
        self.dr_wire.close()
        if self.plain:
            self.plain_wire.close()
        for p in self.procs:
            stop(p)

    def both(self, name: str, changed_bytes: int) -> None:
        subprocess.run(["sync"])
        w0 = self.rs_wire.read()
        rs_t, rs_out = run_timed(self.rsync_cmd)
        rs_bytes = delta(self.rs_wire, w0)
        subprocess.run(["sync"])  # neither tool pays for flushing the other's writes
        d0 = self.dr_wire.read()
        dr_t, dr_out = run_timed(self.drctl_cmd)
        dr_cpu = run_timed.cpu  # type: ignore[attr-defined]
        dr_bytes = delta(self.dr_wire, d0)
        rep = json.loads(dr_out.strip().splitlines()[-1])
        plain: dict[str, object] = {}
        if self.plain:
            subprocess.run(["sync"])
            p0 = self.plain_wire.read()
            pl_t, pl_out = run_timed(self.plain_cmd)
            pl_cpu = run_timed.cpu  # type: ignore[attr-defined]
            pl_bytes = delta(self.plain_wire, p0)
            pl_rep = json.loads(pl_out.strip().splitlines()[-1])
            plain = {"drctl_plain_s": round(pl_t, 3),
                     "tls_cost_pct": round((dr_t / pl_t - 1) * 100, 1),
                     "drctl_cpu_s": round(dr_cpu, 3), "drctl_plain_cpu_s": round(pl_cpu, 3),
                     "tls_cpu_cost_pct": round((dr_cpu / max(pl_cpu, 1e-6) - 1) * 100, 1),
                     "drctl_plain_tcp_bytes": pl_bytes,
                     "drctl_plain_changed_MB_per_s": round(pl_rep["raw_bytes"] / 1e6 / pl_t, 1)}
        row: dict[str, object] = {
            "scenario": name, "changed_mib": round(changed_bytes / 2**20, 1),
            "rsync_s": round(rs_t, 3), "drctl_s": round(dr_t, 3),
            "speedup": round(rs_t / dr_t, 2),
            "rsync_app_bytes": rsync_app_bytes(rs_out), "drctl_app_bytes": rep["wire_bytes"],
            "rsync_tcp_bytes": rs_bytes, "drctl_tcp_bytes": dr_bytes,
            "drctl_in_process_s": rep["seconds"],
            "drctl_changed_MB_per_s": round(rep["raw_bytes"] / 1e6 / dr_t, 1),
            "drctl_blocks": {k: rep[k] for k in ("data_blocks", "zero_blocks", "dedup_blocks")},
            **plain,
        }
        self.results.append(row)
        print(json.dumps(row), flush=True)

    def rsync_fsync_initial(self) -> None:
        """rsync does not fsync by default; drctl acknowledges only fsynced data. The same
        initial copy with rsync --fsync, for a like-for-like durability comparison."""
        os.unlink(os.path.join(self.rs_dir, "img"))
        subprocess.run(["sync"])
        cmd = [*self.rsync_cmd[:1], "--fsync", *self.rsync_cmd[1:]]
        rs_t, _out = run_timed(cmd)
        drctl_t = float(self.results[0]["drctl_s"])  # type: ignore[arg-type]
        row = {"scenario": "initial, rsync --fsync", "rsync_s": round(rs_t, 3),
               "drctl_s": drctl_t, "speedup": round(rs_t / drctl_t, 2),
               "rsync_app_bytes": self.results[0]["rsync_app_bytes"],
               "drctl_app_bytes": self.results[0]["drctl_app_bytes"],
               "rsync_tcp_bytes": None, "drctl_tcp_bytes": None}
        self.results.append(row)
        print(json.dumps(row), flush=True)

    def agent(self, rsync_delta_s: float) -> None:
        """A running agent picks up a fresh 1% delta: write -> replica verified equal."""
        mport = free_port()
        agent_cmd = [a for a in self.drctl_cmd if a not in ("--once", "--json")]
        agent = subprocess.Popen([*agent_cmd, "--interval", "0.05", "--metrics-port", str(mport)],
                                 cwd=REPO, stderr=subprocess.DEVNULL)
        self.procs.append(agent)
        wait_port(mport)
        time.sleep(1.0)  # idle and caught up
        n = change_blocks(self.src, 0.01, seed=12)
        t0 = time.perf_counter()
        while True:
            out = subprocess.run(["curl", "-s", f"http://127.0.0.1:{mport}/metrics"],
                                 capture_output=True, text=True).stdout
            lag = [ln for ln in out.splitlines() if ln.startswith("drctl_replication_lag")]
            pend = [ln for ln in out.splitlines()
                    if ln.startswith("drctl_replication_pending_bytes")]
            shipped = [ln for ln in out.splitlines()
                       if ln.startswith("drctl_replication_written_bytes_total")]
            if (lag and pend and lag[0].endswith(" 0.0") and pend[0].endswith(" 0.0")
                    and shipped and float(shipped[0].split()[-1]) >= n * 4096):
                break
            time.sleep(0.01)
        dt = time.perf_counter() - t0
        row = {"scenario": "agent-delta-1pct", "drctl_s": round(dt, 3),
               "speedup": round(rsync_delta_s / dt, 2), "note": "write -> acked, agent running"}
        self.results.append(row)
        print(json.dumps(row), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--no-plain", action="store_true",
                    help="skip the plaintext drctl runs that measure what TLS costs")
    args = ap.parse_args()
    if not shutil.which("rsync"):
        raise SystemExit("rsync not installed (scripts/install-deps.sh installs it)")
    work = tempfile.mkdtemp(prefix="drctl-bench-")
    size = args.size_mib << 20
    b = Bench(work, os.path.join(work, "src.img"), size, plain=not args.no_plain)
    print("drctl channel: mutual TLS" + ("" if args.no_plain else
                                          ", and plaintext (--insecure) for the TLS cost"))
    t0 = time.perf_counter()
    kinds = make_image(b.src, size)
    print(f"image: {args.size_mib} MiB in {time.perf_counter() - t0:.1f}s, 1 MiB regions: {kinds}")
    b.start()
    try:
        b.both("initial", size)
        n = change_blocks(b.src, 0.01)
        b.both("delta-1pct", n * 4096)
        region = min(size // 2, 512 << 20)
        with open(b.src, "r+b") as fh:
            fh.seek(size // 4)
            for _ in range(region // (8 << 20)):
                fh.write(os.urandom(8 << 20))
        b.both("bulk-rewrite", region)
        ok = subprocess.run([*DRCTL, "replicate", "verify", b.src, "--to",
                             f"127.0.0.1:{b.dr_port}", "--volume", "bench", *b.client_flags],
                            cwd=REPO).returncode
        same = subprocess.run(["cmp", b.src, os.path.join(b.rs_dir, "img")]).returncode
        print(f"verify: drctl replica equal={ok == 0}, rsync copy equal={same == 0}")
        if ok != 0 or same != 0:
            raise SystemExit("a copy differs from the source: the figures above do not count")
        rsync_delta = float(b.results[1]["rsync_s"])  # type: ignore[arg-type]
        b.agent(rsync_delta)
        b.rsync_fsync_initial()
    finally:
        b.close()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    report(b.results)


def report(results: list[dict[str, object]]) -> None:
    print("\n| scenario | rsync s | drctl s (TLS) | speedup | drctl s (plain) | TLS cost "
          "| push CPU s TLS / plain (cost) | rsync bytes | drctl bytes | bytes ratio |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        plain = (f"{r['drctl_plain_s']} | {r['tls_cost_pct']:+}% | "  # type: ignore[str-format]
                 f"{r['drctl_cpu_s']} / {r['drctl_plain_cpu_s']} ({r['tls_cpu_cost_pct']:+}%)"
                 if "drctl_plain_s" in r else " | | ")
        if "rsync_s" not in r:
            print(f"| {r['scenario']} | (see delta) | {r['drctl_s']} | {r['speedup']}x | "
                  f"{plain} | | | |")
            continue
        rb = r["rsync_tcp_bytes"] or r["rsync_app_bytes"]
        db = r["drctl_tcp_bytes"] or r["drctl_app_bytes"]
        print(f"| {r['scenario']} | {r['rsync_s']} | {r['drctl_s']} | {r['speedup']}x | {plain} | "
              f"{rb:,} | {db:,} | {int(rb) / max(1, int(db)):.2f} |")  # type: ignore[call-overload]


if __name__ == "__main__":
    main()
