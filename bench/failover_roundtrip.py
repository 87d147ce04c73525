"""Benchmark: the protection round trip of one service on a 1 GiB volume, against a full copy
of the volume measured in the same run.

Real processes on loopback, as tests/integration/test_lifecycle.py runs them: one etcd, one
named, a runbook with two sites (east primary, west replica), `drctl agent --config runbook
--site X` for both sites (each runs its own data path: the replication target, and at the
primary the capture agent with its NBD export), one controller. Lease TTL 2 s, grace 1 s.

  initial     agents and controller start; until the service is healthy, protected, lag 0
              (the initial full sync of the volume from east to west)
  failover    kill -9 of east's agent (its target and capture agent die with it); until the
              state is failed_over with primary west and west's NBD export accepts
  writes      1% of the volume's 4 KiB blocks (random blocks, random content) written through
              west's NBD export one at a time, then FLUSH (not shipped: east is down)
  re-protect  east's agent restarted; until healthy with primary west, protected, lag 0 (east
              is demoted, its unreplicated blocks set aside, west resyncs the exact delta)
  failback    `drctl failback app`; until healthy with primary east, protected, lag 0
  full copy   baseline: `drctl replicate push <west volume> --once` into an empty target
              directory (a fresh `drctl replicate serve` on loopback), process start to exit
  rsync       reference: `rsync --inplace --whole-file` of the volume to a local directory

Bytes: block bytes shipped, from the serving capture agent's counter
(drctl_replication_shipped_raw_bytes on its metrics port; the agent starts at the phase's
promotion, so the counter is the phase's), with the figure of its log line "resync (...)
shipped N bytes of blocks (M on the wire)" alongside; and TCP bytes on the receiving site's
replication port (iptables counters, both directions, headers included; root only). A `sync`
runs before every phase; nothing else of this benchmark runs during a phase. The time
breakdowns come from the processes' log lines, the etcd record (polled every 50 ms in this
process) and the receiving target's port (listening, first established connection).

The data path is plaintext (--insecure) unless --tls (mutual TLS with a throwaway `drctl
certs`-style deployment); etcd is plain gRPC without authentication either way.

Run: python bench/failover_roundtrip.py [--size-gib 1] [--runs 1] [--content random|mixed]
                                        [--tls] [--keep]

The processes and what is observed of them are in bench/roundtrip_cluster.py; a run's results
and their report in bench/roundtrip_report.py.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.common import DRCTL, REPO, WireCounter, make_image
from bench.roundtrip_cluster import (
    SITES,
    PortWatch,
    Procs,
    Status,
    first,
    log_lines,
    make_pki,
    protected_at,
    security,
    size_of,
)
from bench.roundtrip_report import Row, RunResult, report
from drctl.localservers import EtcdServer, NamedServer, free_port, wait_port
from tests.nbdclient import NbdClient

BS = 4096
RESYNC_RE = re.compile(r"resync \(([^)]*)\) shipped (\d+) bytes of blocks \((\d+) on the wire\)")


# -- the scenario ---------------------------------------------------------------------------

class Scenario:
    def __init__(self, work: str, size: int, content: str, etcd: EtcdServer,
                 named: NamedServer, seed: int, tls: bool = False) -> None:
        self.work = work
        self.tls = make_pki(os.path.join(work, "pki")) if tls else None
        self.size = size
        self.seed = seed
        self.procs = Procs()
        self.ports = {s: {"repl": free_port(), "nbd": free_port()} for s in SITES}
        self.template = os.path.join(work, "{site}", "volumes", "data.img")
        os.makedirs(os.path.dirname(self.vol("east")))
        t0 = time.perf_counter()
        if content == "mixed":
            kinds = make_image(self.vol("east"), size, seed=seed)
            print(f"  volume: {size >> 20} MiB mixed content {kinds} "
                  f"({time.perf_counter() - t0:.1f}s to write)", flush=True)
        else:
            rng = random.Random(seed)
            with open(self.vol("east"), "wb") as fh:
                for _ in range(size >> 20):
                    fh.write(rng.randbytes(1 << 20))
            print(f"  volume: {size >> 20} MiB of random bytes "
                  f"({time.perf_counter() - t0:.1f}s to write)", flush=True)
        key = os.path.join(work, "tsig.key")
        with open(key, "w") as fh:
            fh.write(f'key "{named.key_name}" {{ algorithm hmac-sha256; '
                     f'secret "{named.secret}"; }};\n')
        rb = {
            "kind": "drctl-runbook", "version": 1, "cluster": f"roundtrip{seed}", "lease_ttl": 2,
            "etcd": etcd.etcd_config(),
            "sites": {s: {"address": a, "data_dir": self.data(s),
                          "endpoints": {"replication": f"127.0.0.1:{self.ports[s]['repl']}"}}
                      for s, a in (("east", "10.0.0.1"), ("west", "10.0.0.2"))},
            "dns": {"zones": {named.zone: {"servers": [f"127.0.0.1:{named.port}"],
                                           "tsig": {"name": named.key_name, "file": key}}}},
            "services": {"app": {
                "primary": "east", "replica": "west",
                "volumes": [{"name": "data", "path": self.template}],
                "replication": {"mode": "hot", "rpo": 30, "export": {
                    s: f"127.0.0.1:{self.ports[s]['nbd']}" for s in SITES}},
                "failover": {"automatic": True, "grace": 1, "damping": 0},
                "dns": [{"zone": named.zone, "name": "app", "ttl": 5}],
                "steps": [{"type": "promote"}, {"type": "dns"}]}},
        }
        self.config = os.path.join(work, "runbook.yaml")
        with open(self.config, "w") as fh:
            json.dump(rb, fh)
        self.counters = {s: WireCounter(self.ports[s]["repl"]) for s in SITES}
        self.status: Status | None = None

    def vol(self, site: str) -> str:
        return self.template.replace("{site}", site)

    def data(self, site: str) -> str:
        return os.path.join(self.work, site, "data")

    def push_log(self, site: str) -> str:
        return os.path.join(self.data(site), "logs", "push-app.log")

    def agent_log(self, site: str) -> str:
        return os.path.join(self.work, f"agent-{site}.log")

    def start_agent(self, site: str) -> None:
        self.procs.start(site, [*DRCTL, "--log-level", "INFO", "agent", "--config", self.config,
                                "--site", site, *security(self.tls, "agent")], self.agent_log(site))

    def tcp(self, site: str) -> int | None:
        return self.counters[site].read()

    def push_counters(self, site: str) -> dict[str, float]:
        """The shipped-bytes counters of ``site``'s capture agent (a child of its site agent,
        started at its promotion: the counters cover everything it shipped since)."""
        agent = self.procs.procs[site].pid
        for pid in (int(p) for p in os.listdir("/proc") if p.isdigit()):
            try:
                with open(f"/proc/{pid}/stat") as fh:
                    ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
                with open(f"/proc/{pid}/cmdline", "rb") as fh:
                    argv = fh.read().decode().split("\0")
            except (OSError, ValueError, IndexError):
                continue
            if ppid != agent or "push-group" not in argv:
                continue
            port = int(argv[argv.index("--metrics-port") + 1])
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
                text = r.read().decode()
            out: dict[str, float] = {}
            for line in text.splitlines():
                for name in ("shipped_raw_bytes", "shipped_compressed_bytes"):
                    if line.startswith(f"drctl_replication_{name}") and "_created" not in line:
                        out[name] = out.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
            return out
        return {}

    def logs_tail(self) -> str:
        out = []
        for p in sorted([os.path.join(self.work, n) for n in os.listdir(self.work)
                         if n.endswith(".log")]
                        + [os.path.join(self.data(s), "logs", n) for s in SITES
                           if os.path.isdir(os.path.join(self.data(s), "logs"))
                           for n in os.listdir(os.path.join(self.data(s), "logs"))]):
            with open(p, errors="replace") as fh:
                out.append(f"--- {p}\n{fh.read()[-2500:]}")
        return "\n".join(out)

    def close(self) -> None:
        self.procs.stop("controller")  # first: no decision on the agents' going away
        self.procs.stop_all()
        if self.status is not None:
            self.status.close()
        for c in self.counters.values():
            c.close()

    # -- phases ----------------------------------------------------------------------------

    def quiet(self, res: RunResult, phase: str) -> None:
        subprocess.run(["sync"], check=False)
        res.load[phase] = os.getloadavg()

    def run(self) -> RunResult:
        res = RunResult(self.size)
        self.initial(res)
        self.failover(res)
        self.writes(res)
        self.reprotect(res)
        self.failback(res)
        self.check_equal(res)
        self.full_copy(res)
        self.rsync(res)
        return res

    def _resync(self, site: str, offset: int, res: RunResult, phase: str
                ) -> tuple[int | None, list[tuple[float, str]]]:
        lines = log_lines(self.push_log(site), offset)
        got = [m for _, line in lines if (m := RESYNC_RE.search(line))]
        if not got:
            res.problems.append(f"{phase}: no resync line in {site}'s push log")
            return None, lines
        if len(got) > 1:
            res.problems.append(f"{phase}: {len(got)} resyncs in {site}'s push log: "
                                + "; ".join(m.group(0) for m in got))
        return sum(int(m.group(2)) for m in got), lines

    def initial(self, res: RunResult) -> None:
        self.quiet(res, "initial")
        tcp0 = self.tcp("west")
        t0 = time.time()
        self.start_agent("east")
        self.start_agent("west")
        self.procs.start("controller", [*DRCTL, "--log-level", "INFO", "controller",
                                        "--config", self.config,
                                        *([] if self.tls is None else
                                          security(self.tls, "controller"))],
                         os.path.join(self.work, "controller.log"))
        self.status = Status(self.config, self.procs.check)
        t1 = self.status.wait(protected_at("east"), 600, "initial sync: protected at east")
        tcp1 = self.tcp("west")
        logged, lines = self._resync("east", 0, res, "initial")
        res.rows.append(self._row("initial full sync (agents start -> protected, lag 0)",
                                  t1 - t0, "east", logged, _delta(tcp0, tcp1)))
        res.breakdown["initial"] = [*self._steps(t0, t1, lines, [
            ("east push: resync start logged", "resync ("),
            ("east push: resync shipped", "shipped"),
            ("east push: consistent and verified", "replica consistent at point")]),
            ("observed in etcd (status poll)", t1 - t0)]
        res.timelines["initial"] = self._timeline(t0)

    def failover(self, res: RunResult) -> None:
        assert self.status is not None
        self.quiet(res, "failover")
        # no writer runs at east: "stop writes" is the state already
        t0 = time.time()
        self.procs.kill9("east")
        t_state = self.status.wait(lambda s: s["state"] == "failed_over"
                                   and s["primary"] == "west", 120, "failed_over at west")
        wait_port(self.ports["west"]["nbd"], 60)
        t_port = time.time()
        t1 = max(t_state, t_port)
        res.rows.append(Row("failover (kill -9 east agent -> failed_over, west export up)",
                            t1 - t0, note=f"state at {t_state - t0:.2f}s, export at "
                            f"{t_port - t0:.2f}s"))
        res.timelines["failover"] = self._timeline(t0)
        # east's children died with their agent
        for what in ("repl", "nbd"):
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.ports["east"][what])) == 0:
                    res.problems.append(f"east's {what} port still accepts after kill -9 of "
                                        "its agent")

    def writes(self, res: RunResult) -> None:
        self.quiet(res, "writes")
        rng = random.Random(self.seed + 1)
        nblocks = self.size // BS
        picks = rng.sample(range(nblocks), nblocks // 100)
        self.changed = set(picks)
        t0 = time.time()
        client = NbdClient("127.0.0.1", self.ports["west"]["nbd"], "data", timeout=60)
        try:
            for b in picks:
                client.write(b * BS, rng.randbytes(BS))
            client.flush()
        finally:
            client.close()
        t1 = time.time()
        res.rows.append(Row(f"writes at west: {len(picks)} random 4 KiB blocks (1%) + FLUSH",
                            t1 - t0, note=f"{len(picks) * BS:,} bytes written, "
                            f"{len(picks) / (t1 - t0):.0f} writes/s, not shipped (east down)"))

    def reprotect(self, res: RunResult) -> None:
        assert self.status is not None
        self.quiet(res, "re-protect")
        push_off = size_of(self.push_log("west"))
        agent_off = size_of(self.agent_log("east"))
        target_off = size_of(os.path.join(self.data("east"), "logs", "target.log"))
        tcp0 = self.tcp("east")
        listening = PortWatch(self.ports["east"]["repl"])
        t0 = time.time()
        self.start_agent("east")
        t1 = self.status.wait(protected_at("west"), 300, "re-protected: healthy at west")
        tcp1 = self.tcp("east")
        listening.stop()
        logged, lines = self._resync("west", push_off, res, "re-protect")
        agent = log_lines(self.agent_log("east"), agent_off)
        target = log_lines(os.path.join(self.data("east"), "logs", "target.log"), target_off)
        res.rows.append(self._row("re-protect (east agent restart -> healthy at west, lag 0)",
                                  t1 - t0, "west", logged, _delta(tcp0, tcp1)))
        steps = self._steps(t0, t1, agent, [("east agent: demoted to replica", "demoted to "),
                                            ("east agent: target started", "target started")])
        steps += self._steps(t0, t1, target, [("east target: first log line", "")])
        steps += self._steps(t0, t1, lines, [
            ("west push: resync start logged", "resync ("),
            ("west push: resync shipped", "shipped"),
            ("west push: consistent and verified", "replica consistent at point")])
        if listening.at is not None:
            steps.append(("east target accepts connections", listening.at - t0))
        if listening.peer_at is not None:
            steps.append(("west push connected to east target", listening.peer_at - t0))
        steps.append(("observed in etcd (status poll)", t1 - t0))
        res.breakdown["re-protect"] = sorted(steps, key=lambda x: x[1])
        res.timelines["re-protect"] = self._timeline(t0)
        for _t, line in lines + agent:
            if "WARNING" in line or "ERROR" in line:
                res.problems.append(f"re-protect: {line[:300]}")

    def failback(self, res: RunResult) -> None:
        assert self.status is not None
        self.quiet(res, "failback")
        push_off = size_of(self.push_log("east"))
        tcp0 = self.tcp("west")
        t0 = time.time()
        p = subprocess.run([*DRCTL, "failback", "app", "--config", self.config], cwd=REPO,
                           capture_output=True, text=True, timeout=120)
        t_cmd = time.time()
        if p.returncode != 0:
            raise RuntimeError(f"drctl failback exited {p.returncode}: {p.stdout}{p.stderr}")
        t1 = self.status.wait(protected_at("east"), 300, "failback: healthy at east")
        tcp1 = self.tcp("west")
        logged, lines = self._resync("east", push_off, res, "failback")
        row = self._row("failback (`drctl failback` -> healthy at east, lag 0)", t1 - t0,
                        "east", logged, _delta(tcp0, tcp1))
        row.note = f"the command itself {t_cmd - t0:.2f}s; " + row.note
        res.rows.append(row)
        res.breakdown["failback"] = [*self._steps(t0, t1, lines, [
            ("east push: resync start logged", "resync ("),
            ("east push: resync shipped", "shipped"),
            ("east push: consistent and verified", "replica consistent at point")]),
            ("observed in etcd (status poll)", t1 - t0)]
        res.timelines["failback"] = self._timeline(t0)
        for _t, line in lines:
            if "WARNING" in line or "ERROR" in line:
                res.problems.append(f"failback: {line[:300]}")

    def check_equal(self, res: RunResult) -> None:
        p = subprocess.run([*DRCTL, "replicate", "verify", self.vol("east"), "--to",
                            f"127.0.0.1:{self.ports['west']['repl']}", "--volume", "data",
                            *security(self.tls, "replicate", "verify", site="east",
                                      peer="west")],
                           cwd=REPO, capture_output=True, text=True, timeout=300)
        res.verify_ok = p.returncode == 0
        if not res.verify_ok:
            res.problems.append(f"verify east -> west exited {p.returncode}: "
                                f"{p.stdout}{p.stderr}")
        # the blocks written at west are at east too (checked on a sample, by content)
        with open(self.vol("east"), "rb") as e, open(self.vol("west"), "rb") as w:
            for b in sorted(self.changed)[:: max(1, len(self.changed) // 200)]:
                e.seek(b * BS)
                w.seek(b * BS)
                if e.read(BS) != w.read(BS):
                    res.problems.append(f"block {b} differs between the east and west volumes")
                    break

    def full_copy(self, res: RunResult) -> None:
        self.quiet(res, "full copy")
        port = free_port()
        tdir = os.path.join(self.work, "fresh-target")
        self.procs.start("fresh-target", [*DRCTL, "replicate", "serve", "--listen",
                                          f"127.0.0.1:{port}", "--dir", tdir,
                                          *security(self.tls, "replicate", "serve",
                                                    site="west", allow="east")],
                         os.path.join(self.work, "fresh-target.log"))
        wait_port(port)
        counter = WireCounter(port)
        try:
            tcp0 = counter.read()
            t0 = time.time()
            p = subprocess.run([*DRCTL, "replicate", "push", self.vol("west"), "--to",
                                f"127.0.0.1:{port}", "--volume", "x", "--once", "--json",
                                "--no-progress", "--state-dir",
                                os.path.join(self.work, "fresh-state"),
                                *security(self.tls, "replicate", "push", site="east",
                                          peer="west")],
                               cwd=REPO, capture_output=True, text=True, timeout=900)
            t1 = time.time()
            tcp1 = counter.read()
        finally:
            counter.close()
            self.procs.stop("fresh-target")
        if p.returncode != 0:
            raise RuntimeError(f"push --once exited {p.returncode}: {p.stdout}{p.stderr}")
        rep = json.loads(p.stdout.strip().splitlines()[-1])
        res.rows.append(Row("full copy: `drctl replicate push --once` to an empty target",
                            t1 - t0, rep["data_blocks"] * BS, _delta(tcp0, tcp1),
                            note=f"{rep['seconds']}s in process; {rep['wire_bytes']:,} bytes "
                            "on the wire (its count)"))

    def rsync(self, res: RunResult) -> None:
        self.quiet(res, "rsync")
        dest = os.path.join(self.work, "rsync-dest")
        os.makedirs(dest)
        t0 = time.time()
        p = subprocess.run(["rsync", "--inplace", "--whole-file", "--stats", self.vol("west"),
                            dest + "/"], capture_output=True, text=True, timeout=900)
        t1 = time.time()
        if p.returncode != 0:
            raise RuntimeError(f"rsync exited {p.returncode}: {p.stderr}")
        m = re.search(r"Total bytes sent: ([\d,]+)", p.stdout)
        sent = int(m.group(1).replace(",", "")) if m else None
        res.rows.append(Row("rsync --inplace --whole-file, local directory (reference)", t1 - t0,
                            sent, note="local copy, no network, no fsync"))

    # -- helpers ---------------------------------------------------------------------------

    def _row(self, phase: str, seconds: float, primary: str, logged: int | None,
             tcp: int | None) -> Row:
        """Block bytes: the primary's capture agent's counter (it started at this phase's
        promotion, or at the initial start); the resync log line's figure in the note."""
        m = self.push_counters(primary)
        raw = int(m["shipped_raw_bytes"]) if "shipped_raw_bytes" in m else None
        note = f"resync log line: {logged:,} bytes of blocks" if logged is not None else \
            "no resync log line"
        if "shipped_compressed_bytes" in m:
            note += f"; {int(m['shipped_compressed_bytes']):,} compressed payload bytes"
        return Row(phase, seconds, raw, tcp, note)

    def _steps(self, t0: float, t1: float, lines: list[tuple[float, str]],
               marks: list[tuple[str, str]]) -> list[tuple[str, float]]:
        out = []
        for label, needle in marks:
            t = first(lines, needle)
            if t is not None:
                out.append((label, t - t0))
        return out

    def _timeline(self, t0: float) -> list[tuple[float, str]]:
        assert self.status is not None
        tl = [(t - t0, s) for t, s in self.status.timeline if t >= t0 - 0.01]
        return tl


def _delta(a: int | None, b: int | None) -> int | None:
    return None if a is None or b is None else b - a


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size-gib", type=float, default=1.0)
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--content", choices=("random", "mixed"), default="random",
                    help="random bytes (default) or bench/common.py:make_image's mix")
    ap.add_argument("--tls", action="store_true",
                    help="the data path over mutual TLS (default: plaintext, --insecure)")
    ap.add_argument("--keep", action="store_true", help="keep the work directory (logs)")
    args = ap.parse_args()
    size = int(args.size_gib * (1 << 30)) // (1 << 20) << 20
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    print(f"uptime before: {subprocess.run(['uptime'], capture_output=True, text=True).stdout}",
          end="", flush=True)
    # etcd over plain gRPC without authentication: the coordination store is not what is
    # measured here (its TLS and auth cost a few ms per request)
    etcd = EtcdServer(secure=False).start()
    named: NamedServer | None = None
    results: list[RunResult] = []
    try:
        named = NamedServer().start()
        for n in range(1, args.runs + 1):
            work = tempfile.mkdtemp(prefix="drctl-roundtrip-")
            print(f"run {n}/{args.runs} in {work} (data path: "
                  f"{'mutual TLS' if args.tls else 'plaintext'}, {args.content} content)",
                  flush=True)
            sc = Scenario(work, size, args.content, etcd, named, seed=7 + n, tls=args.tls)
            try:
                res = sc.run()
            except BaseException:
                print(sc.logs_tail(), file=sys.stderr)
                raise
            finally:
                sc.close()
                if args.keep:
                    print(f"  kept {work}")
                else:
                    shutil.rmtree(work, ignore_errors=True)
            results.append(res)
            report(n, res)
    finally:
        if named is not None:
            named.stop()
        etcd.stop()
        print(f"uptime after: "
              f"{subprocess.run(['uptime'], capture_output=True, text=True).stdout}", end="")
    if len(results) > 1:
        print("\nall runs (seconds; block bytes):")
        for i, r in enumerate(results[0].rows):
            print(f"  {r.phase}: " + " / ".join(
                f"{x.rows[i].seconds:.2f}s" + (f" {x.rows[i].block_bytes:,}B"
                                               if x.rows[i].block_bytes is not None else "")
                for x in results))


if __name__ == "__main__":
    main()
