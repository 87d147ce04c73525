"""Benchmark: drctl's capture export against qemu-nbd, the same fio jobs through NBD.

qemu-nbd (C) serves its file with ``--cache=writethrough``: every write is on disk (written
and flushed) before its reply, the durability drctl's export gives (a write is in the
fdatasynced change journal before the reply). drctl runs as it does in production: a capture
agent (``drctl replicate push --nbd-listen``) replicating every write to a target
(``drctl replicate serve``) on loopback while fio runs.

* Two files of the same size and content (``--size-mib``, 256 MiB; written in full with
  random data before the first run, so no job writes into holes), on the same file system,
  one per server: qemu-nbd writing into drctl's volume behind the agent's back would make the
  replica differ (the background verify would then repair it during the measurements).
* The jobs (fio's nbd engine, one connection, ``--refill_buffers`` so that written data is
  neither compressible nor repeated, ``--lat_percentiles``: latency from submission to
  completion): 4 KiB random writes at 16 and at 1 in flight, 1 MiB sequential writes at 4 in
  flight, 4 KiB random reads at 16 in flight, 1 MiB sequential reads at 4 in flight;
  ``--seconds`` each (10), one run per server per job, the servers alternated (the one that
  goes first changes from job to job). Every run is printed as a JSON line, with the CPU
  time each server process used per request (drctl: agent and target, until the agent had
  shipped the run's writes).
* Quiet state before every run (either server): the drctl agent reports lag 0 and a
  protected replica (``bench.lag wait-zero``; a run that does not drain within
  ``--drain-timeout`` fails the bench), then ``sync`` (no run pays for the writeback of the
  one before), then the server's file is read in full: **page cache warm** for both servers
  (reads are served from memory; writes still go to the disk before their reply). After a
  drctl write run the bench also notes how long the agent took to ship and get acknowledged
  everything the run wrote (``drain_after_s``).
* nbdkit's file plugin as well (when installed: Debian's ``nbdkit``), every write made FUA
  by its fua filter (``--filter=fua ... fuamode=force``: written, then fdatasynced, before
  the reply, one fdatasync per write as strace shows), so the same durability again.

* ``--servers qemu-nbd,drctl-export``: drctl's export alone (its NBD server and change
  journal in a process of their own, nothing shipped): the per-request path without the
  replication's work beside it.

* ``--rate-iops N``: every job submits at most N requests a second. At a load every server
  keeps up with, the CPU each spends per request (``cpu_us_per_req``, and of it in the kernel
  ``cpu_sys_us_per_req``) is compared at equal work: it varies far less from run to run than
  the top speed on this machine's shared disk.

Run: python bench/nbd_peer.py [--seconds 10] [--size-mib 256] [--jobs randwrite-4k-qd1,...]
[--servers qemu-nbd,drctl,nbdkit] [--rate-iops N] [--json OUT]; prints a markdown table at
the end.
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
from dataclasses import dataclass, replace
from typing import Any, Protocol

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.common import DRCTL, REPO, stop
from drctl.localservers import free_port, wait_port


@dataclass(frozen=True)
class Job:
    name: str
    rw: str
    bs: str
    iodepth: int
    rate_iops: int = 0  # fio --rate_iops (--rate-iops): 0 as fast as it goes

    @property
    def writes(self) -> bool:
        return "write" in self.rw

    @property
    def label(self) -> str:
        kind = "random" if self.rw.startswith("rand") else "sequential"
        what = "write" if self.writes else "read"
        return f"{self.bs.replace('k', ' KiB').replace('m', ' MiB')} {kind} {what}, " \
               f"{self.iodepth} in flight"


JOBS = [
    Job("randwrite-4k-qd16", "randwrite", "4k", 16),
    Job("randwrite-4k-qd1", "randwrite", "4k", 1),
    Job("write-1m-qd4", "write", "1m", 4),
    Job("randread-4k-qd16", "randread", "4k", 16),
    Job("read-1m-qd4", "read", "1m", 4),
]


class Server(Protocol):
    name: str
    path: str

    @property
    def uri(self) -> str: ...

    @property
    def pids(self) -> dict[str, int]: ...

    def quiet(self) -> float: ...

    def after_run(self, job: Job) -> dict[str, Any]: ...

    def stop(self) -> None: ...


class QemuNbd:
    """qemu-nbd on a raw file, write-through cache: every write flushed before its reply."""

    name = "qemu-nbd"

    def __init__(self, work: str, path: str) -> None:
        self.path = path
        self.port = free_port()
        self.log = open(os.path.join(work, "qemu-nbd.log"), "wb")
        self.proc = subprocess.Popen(
            ["qemu-nbd", "--format=raw", "--cache=writethrough", "--export-name=v",
             "--bind=127.0.0.1", f"--port={self.port}", "--persistent", "--shared=8", path],
            stdout=self.log, stderr=subprocess.STDOUT)
        wait_port(self.port, 30)

    @property
    def uri(self) -> str:
        return f"nbd://127.0.0.1:{self.port}/v"

    @property
    def pids(self) -> dict[str, int]:
        return {self.name: self.proc.pid}

    def quiet(self) -> float:
        return 0.0

    def after_run(self, job: Job) -> dict[str, Any]:
        return {}

    def stop(self) -> None:
        stop(self.proc)
        self.log.close()


class NbdkitFile(QemuNbd):
    """nbdkit's file plugin; fio's nbd engine sends no FUA flag, so the fua filter forces it
    on every write (the plugin then fdatasyncs before the reply)."""

    name = "nbdkit"

    def __init__(self, work: str, path: str) -> None:
        self.path = path
        self.port = free_port()
        self.log = open(os.path.join(work, "nbdkit.log"), "wb")
        self.proc = subprocess.Popen(
            ["nbdkit", "--foreground", "--exportname=v", "-i", "127.0.0.1", "-p",
             str(self.port), "--filter=fua", "file", path, "fuamode=force"],
            stdout=self.log, stderr=subprocess.STDOUT)
        wait_port(self.port, 30)


class DrctlExport(QemuNbd):
    """drctl's export alone (``--servers ...,drctl-export``): its NBD server over its change
    journal, nothing shipped (a point is cut, read back and released every 50 ms, so the
    journal stays small): the per-request path without the replication's work beside it."""

    name = "drctl-export"

    def __init__(self, work: str, path: str) -> None:
        self.path = path
        self.port = free_port()
        self.log = open(os.path.join(work, "export.log"), "wb")
        self.proc = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--serve-export", path, str(self.port),
             os.path.join(work, "journal")], cwd=REPO, stdout=self.log, stderr=subprocess.STDOUT)
        wait_port(self.port, 60)


def serve_export(path: str, port: int, journal_path: str) -> None:
    """The process of ``DrctlExport``."""
    import asyncio

    from replicator.capture.nbd import NbdExport, NbdServer

    async def run() -> None:
        exports = NbdExport.open_group([("v", path)], journal_path, 4096)
        journal = exports[0].journal
        server = NbdServer(exports)
        await server.start("127.0.0.1", port)
        try:
            while True:
                await asyncio.sleep(0.05)
                if journal.open_first_at is not None:
                    cp = journal.cut()
                    journal.extract()
                    journal.release(cp)
        finally:
            await server.close()
            journal.close()
            for e in exports:
                e.close()

    asyncio.run(run())


class Drctl:
    """A capture agent serving the file over NBD and replicating to a target on loopback."""

    name = "drctl"

    def __init__(self, work: str, path: str, drain_timeout: float,
                 target_dir: str | None = None) -> None:
        self.path = path
        self.work = work
        self.drain_timeout = drain_timeout
        self.tport, self.nport, self.mport = free_port(), free_port(), free_port()
        self.logs = [open(os.path.join(work, f"{n}.log"), "wb")
                     for n in ("target", "agent")]
        self.procs = [subprocess.Popen(
            [*DRCTL, "replicate", "serve", "--listen", f"127.0.0.1:{self.tport}", "--dir",
             os.path.join(target_dir or work, "replicas"), "--insecure"],
            cwd=REPO, stdout=self.logs[0], stderr=subprocess.STDOUT)]
        self.procs.append(subprocess.Popen(
            [*DRCTL, "replicate", "push", path, "--to", f"127.0.0.1:{self.tport}",
             "--volume", "v", "--nbd-listen", f"127.0.0.1:{self.nport}",
             "--metrics-port", str(self.mport), "--state-dir", os.path.join(work, "state"),
             "--no-progress", "--insecure"],
            cwd=REPO, stdout=self.logs[1], stderr=subprocess.STDOUT))
        wait_port(self.nport, 60)
        self.quiet()  # the initial sync

    @property
    def uri(self) -> str:
        return f"nbd://127.0.0.1:{self.nport}/v"

    @property
    def pids(self) -> dict[str, int]:
        return {"target": self.procs[0].pid, "agent": self.procs[1].pid}

    def quiet(self) -> float:
        """Until the agent reports lag 0 and a protected replica (the seconds waited); fails
        the bench after the drain timeout."""
        p = subprocess.run([sys.executable, "-m", "bench.lag", "wait-zero", str(self.mport),
                            str(self.drain_timeout)], cwd=REPO, capture_output=True, text=True)
        got = json.loads(p.stdout or "{}")
        if p.returncode != 0:
            codes = [q.poll() for q in self.procs]
            raise SystemExit(f"drctl: lag did not return to 0 within {self.drain_timeout:g} s "
                             f"({got}, exit codes {codes}): failing the run")
        return float(got["waited"])

    def after_run(self, job: Job) -> dict[str, Any]:
        if not job.writes:
            return {}
        return {"drain_after_s": round(self.quiet(), 3)}

    def stop(self) -> None:
        for p in reversed(self.procs):
            stop(p)
        for fh in self.logs:
            fh.close()


def prepare(path: str, size: int, seed: bytes) -> None:
    """``size`` bytes of pseudo-random data (the same for every file made with ``seed``)."""
    import hashlib

    chunk = 1 << 20
    with open(path, "wb") as fh:
        for i in range(size // chunk):
            block = hashlib.shake_128(seed + i.to_bytes(8, "little")).digest(chunk)
            fh.write(block)
        fh.flush()
        os.fsync(fh.fileno())


def warm(path: str) -> None:
    """Read the file in full: its pages are in the page cache."""
    with open(path, "rb", buffering=0) as fh:
        buf = bytearray(8 << 20)
        while fh.readinto(buf):
            pass


def loadavg() -> str:
    with open("/proc/loadavg") as fh:
        return " ".join(fh.read().split()[:3])


def fio(job: Job, uri: str, size: int, seconds: int) -> dict[str, Any]:
    args = ["fio", "--name=j", "--ioengine=nbd", f"--uri={uri}", f"--rw={job.rw}",
            f"--bs={job.bs}", f"--iodepth={job.iodepth}", f"--size={size}",
            f"--runtime={seconds}", "--time_based", "--randrepeat=0", "--lat_percentiles=1",
            "--output-format=json"]
    if job.writes:
        args.append("--refill_buffers")
    if job.rate_iops:
        args.append(f"--rate_iops={job.rate_iops}")
    p = subprocess.run(args, capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"fio failed: {p.stderr[-2000:]}")
    out = json.loads(p.stdout[p.stdout.index("{"):])  # the engine may print a line first
    side = out["jobs"][0]["write" if job.writes else "read"]
    pcts = side["lat_ns"].get("percentile", {})
    return {
        "iops": round(side["iops"], 1),
        "mb_s": round(side["bw_bytes"] / 1e6, 1),
        "p50_ms": round(pcts.get("50.000000", 0) / 1e6, 3),
        "p99_ms": round(pcts.get("99.000000", 0) / 1e6, 3),
        "max_ms": round(side["lat_ns"]["max"] / 1e6, 3),
        "errors": out["jobs"][0].get("error", 0),
        "ios": side["total_ios"],
    }


def cpu_seconds(pid: int) -> tuple[float, float]:
    """CPU time of a process (all its threads) so far: (user + system, system)."""
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / tick, int(fields[12]) / tick


def run(server: Server, job: Job, size: int, seconds: int) -> dict[str, Any]:
    """One fio run from the quiet state. ``cpu_us_per_req``: CPU time of each of the server's
    processes per request, from the start of the run until the agent had shipped it all
    (drctl: the capture agent and the target)."""
    waited = server.quiet()
    subprocess.run(["sync"], check=True)
    warm(server.path)
    load0 = loadavg()
    t0 = time.time()
    cpu0 = {k: cpu_seconds(pid) for k, pid in server.pids.items()}
    got = fio(job, server.uri, size, seconds)
    after = server.after_run(job)
    n = max(1, got.pop("ios"))
    cpu1 = {k: cpu_seconds(pid) for k, pid in server.pids.items()}
    cpu = {k: round((cpu1[k][0] - cpu0[k][0]) / n * 1e6) for k in cpu1}
    # of which in the kernel (system calls, loopback TCP, the file system)
    after["cpu_sys_us_per_req"] = {k: round((cpu1[k][1] - cpu0[k][1]) / n * 1e6) for k in cpu1}
    if job.rate_iops:
        after["rate_iops"] = job.rate_iops
    rec = {"job": job.name, "server": server.name, "started": time.strftime(
        "%H:%M:%S", time.localtime(t0)), "load_before": load0, "load_after": loadavg(),
        "waited_quiet_s": round(waited, 3), **got, **after, "cpu_us_per_req": cpu}
    print(json.dumps(rec), flush=True)
    return rec


def ratio(a: dict[str, Any], b: dict[str, Any], key: str) -> float:
    return round(b[key] / a[key], 2) if a.get(key) else 0.0


def table(results: list[dict[str, Any]], base: str, jobs: list[Job]) -> str:
    """One row per job: each server's IOPS, MB/s, latency and CPU per request (all its
    processes), and each other server's IOPS relative to ``base``."""
    by = {(r["job"], r["server"]): r for r in results}
    others = [s for s in dict.fromkeys(r["server"] for r in results) if s != base]
    head = ["job"]
    for s in [base, *others]:
        head += [f"{s} IOPS", f"{s} MB/s", f"{s} p50 / p99 ms", f"{s} CPU us/req"]
        if s != base:
            head.append(f"{s} / {base}")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for j in jobs:
        b = by.get((j.name, base))
        if b is None:
            continue
        row = [j.label]
        for s in [base, *others]:
            o = by.get((j.name, s))
            if o is None:
                row += [""] * (4 if s == base else 5)
                continue
            row += [f"{o['iops']:,.0f}", f"{o['mb_s']:,.1f}",
                    f"{o['p50_ms']:.2f} / {o['p99_ms']:.2f}",
                    f"{sum(o['cpu_us_per_req'].values()):,}"]
            if s != base:
                row.append(f"{ratio(b, o, 'iops'):.2f}x")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--seconds", type=int, default=10, help="per fio run")
    ap.add_argument("--size-mib", type=int, default=256)
    ap.add_argument("--jobs", default=",".join(j.name for j in JOBS),
                    help="comma-separated, from: " + ", ".join(j.name for j in JOBS))
    ap.add_argument("--servers", default="qemu-nbd,drctl,nbdkit",
                    help="comma-separated, from qemu-nbd, drctl, nbdkit (left out when not "
                    "installed), drctl-export (the export alone, nothing shipped); the first "
                    "is the baseline of the ratios")
    ap.add_argument("--serve-export", nargs=3, metavar=("PATH", "PORT", "JOURNAL"),
                    help=argparse.SUPPRESS)
    ap.add_argument("--drain-timeout", type=float, default=180.0)
    ap.add_argument("--dir", default=None, help="work directory (default: a new one under "
                    "/var/tmp, removed at the end); keep it for the servers' logs")
    ap.add_argument("--target-dir", default=None,
                    help="where the drctl target keeps its replica (default: in the work "
                    "directory, on the volume's disk). Another device, or a tmpfs standing in "
                    "for the standby site's own disk, keeps the two sites from sharing one "
                    "disk's bandwidth; the report says which")
    ap.add_argument("--hold", action="store_true",
                    help="start the servers, print their URIs and pids, wait for Enter (to "
                    "profile with py-spy or run fio by hand)")
    ap.add_argument("--rate-iops", type=int, default=0,
                    help="submit at most this many requests a second in every job (fio "
                    "--rate_iops): the CPU each server spends per request at the same load, "
                    "which varies far less from run to run than how fast each can go")
    ap.add_argument("--json", default=None, help="write every run here too")
    return ap.parse_args()


def start(names: list[str], work: str, size: int, drain_timeout: float,
          target_dir: str | None = None) -> list[Server]:
    """The servers, each on its own copy of the same file (started in order; on a failure
    the ones started are stopped)."""
    servers: list[Server] = []
    try:
        for n in names:
            d = os.path.join(work, n)
            os.makedirs(d, exist_ok=True)
            path = os.path.join(d, "vol.img")
            prepare(path, size, b"nbd-peer")
            if n == "qemu-nbd":
                servers.append(QemuNbd(d, path))
            elif n == "nbdkit":
                servers.append(NbdkitFile(d, path))
            elif n == "drctl-export":
                servers.append(DrctlExport(d, path))
            else:
                servers.append(Drctl(d, path, drain_timeout, target_dir))
    except BaseException:
        for s in servers:
            s.stop()
        raise
    return servers


def measure(servers: list[Server], jobs: list[Job], size: int,
            seconds: int) -> list[dict[str, Any]]:
    """Each job once per server, the servers alternated; the drctl agent quiet before every
    run (its replication idle while another server runs too)."""
    drctl = next((s for s in servers if isinstance(s, Drctl)), None)
    results = []
    for k, job in enumerate(jobs):
        for s in servers if k % 2 == 0 else list(reversed(servers)):
            if drctl is not None and s is not drctl:
                drctl.quiet()
            results.append(run(s, job, size, seconds))
    return results


def uptime() -> str:
    got = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    return f"# {time.strftime('%Y-%m-%d %H:%M:%S')} uptime: {got}"


def main() -> int:
    args = parse_args()
    if args.serve_export:
        path, port, journal = args.serve_export
        serve_export(path, int(port), journal)
        return 0
    names = args.servers.split(",")
    if "nbdkit" in names and shutil.which("nbdkit") is None:
        print("nbdkit is not installed: left out", flush=True)
        names.remove("nbdkit")
    jobs = [replace(j, rate_iops=args.rate_iops) for j in JOBS
            if j.name in args.jobs.split(",")]
    size = args.size_mib << 20
    work = args.dir or tempfile.mkdtemp(prefix="nbd-peer-", dir="/var/tmp")
    os.makedirs(work, exist_ok=True)
    print(uptime(), flush=True)
    target_dir = None
    if args.target_dir:
        target_dir = tempfile.mkdtemp(prefix="nbd-peer-target-", dir=args.target_dir)
        fs = subprocess.run(["df", "--output=source,fstype", target_dir], capture_output=True,
                            text=True).stdout.split("\n")[1:2]
        print(f"# drctl's target keeps its replica in {target_dir} ({' '.join(fs).strip()})",
              flush=True)
    servers = start(names, work, size, args.drain_timeout, target_dir)
    try:
        if args.hold:
            for s in servers:
                print(s.name, s.uri, getattr(s, "pids", ""), flush=True)
            input("servers up; Enter stops them\n")
            return 0
        results = measure(servers, jobs, size, args.seconds)
        print(uptime())
        print(table(results, servers[0].name, jobs))
        if args.json:
            with open(args.json, "w") as fh:
                json.dump(results, fh, indent=1)
        return 0
    finally:
        for s in servers:
            s.stop()
        if args.dir is None and not args.hold:
            shutil.rmtree(work, ignore_errors=True)
        if target_dir is not None:
            shutil.rmtree(target_dir, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
