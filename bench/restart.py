"""Benchmark: how long a restart of either side takes to be protected again (issue 12).

Per size (``--sizes``, GiB; sparse volumes made with truncate), real processes on loopback
(mutual TLS unless ``--insecure``): a target daemon and a capture agent (`push --nbd-listen`),
then, ``--runs`` times each:

  agent, clean stop   SIGTERM the agent, start it again: process start -> its
                      drctl_replication_protected reads 1 (the resync of what the target has
                      not acknowledged has closed a point, the target acknowledged it and the
                      agent verified the replica's digest: the first acknowledged point)
  agent, kill -9      a writer (random 4 KiB writes over the volume, a FLUSH every 32) runs;
                      kill -9 the agent; start it again -> protected. The blocks the target had
                      not acknowledged (the agent's log: its activity log) are in the table
  agent, kill -9 with a backlog   the same, with ``--backlog`` blocks written while the target
                      was stopped (SIGSTOP): the time grows with them, not with the volume
  agent, crash        a crash of the source's machine, simulated: the writer runs; kill -9
                      the agent; the view entries of the extents its activity log lists are
                      spoilt (pages never written back); start it again with another
                      DRCTL_BOOT_ID (a new boot) -> protected. The log's extents are in the
                      table (the first resync compares them with the replica)
  target, clean stop / kill -9    the writer runs; stop or kill -9 the target, start it again
                      -> the first point acknowledged after it (the agent's
                      drctl_replication_acked_sequence moves); the target's VmHWM after it
  target, crash       the same as kill -9, then the index entries of the extents of the
                      target's activity log spoilt and another DRCTL_BOOT_ID (only those
                      extents are hashed again; the index line of its log is in the table)

The first start of each size is the whole-volume comparison every restart used to make ("full"
in the table). Then the target's memory with many volumes (``--volumes`` of ``--volume-gib``
GiB, sparse, each created by a handshake): VmRSS / VmHWM (/proc/PID/status) after creating
them, and after a clean restart and a handshake with each again (timed).

Run: python bench/restart.py [--sizes 1,4,16] [--runs 3] [--backlog 20000] [--insecure]
         [--volumes 100] [--volume-gib 10] [--no-rss-restart] [--only PHASES] [--json OUT]
     --tree DIR runs the drctl of another source tree (e.g. `git archive HEAD | tar -x -C DIR`)
     against the same bench: a before/after comparison (a tree without DRCTL_BOOT_ID sees a
     "crash" as a kill -9). --only agent:crash,target:crash runs only those phases.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.common import REPO, free_port, security_flags, stop, wait_port
from drctl.nbdclient import NbdClient, NbdError
from replicator.activity import EXTENT_BLOCKS, read
from replicator.blockindex import INDEX_HEADER

BS = 4096


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def status(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM of a process, in MiB."""
    out = {}
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith(("VmRSS", "VmHWM")):
                key, value = line.split(":")
                out[key] = int(value.split()[0]) // 1024
    return out


def scrape(port: int) -> dict[str, float]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=1) as r:
            text = r.read().decode()
    except OSError:
        return {}
    out = {}
    for line in text.splitlines():
        if line.startswith("drctl_replication_") and "{" in line:
            out[line.split("{", 1)[0]] = float(line.rsplit(" ", 1)[1])
    return out


def wait(pred: Any, timeout: float, what: str) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if pred():
            return time.monotonic() - started
        time.sleep(0.01)
    raise SystemExit(f"timed out after {timeout}s waiting for {what}")


class Writer(threading.Thread):
    """Random 4 KiB writes through the export, a FLUSH every 32, until stopped or cut off."""

    def __init__(self, port: int, size: int, seed: int, limit: int | None = None) -> None:
        super().__init__(daemon=True)
        self.port, self.blocks, self.rng, self.limit = port, size // BS, random.Random(seed), limit
        self.halt = threading.Event()
        self.acked = 0

    def run(self) -> None:
        try:
            client = NbdClient("127.0.0.1", self.port, "vol")
            while not self.halt.is_set() and (self.limit is None or self.acked < self.limit):
                client.write(self.rng.randrange(self.blocks) * BS, self.rng.randbytes(BS))
                self.acked += 1
                if self.acked % 32 == 0:
                    client.flush()
            client.flush()
            client.close()
        except (OSError, NbdError):  # the agent was killed under it
            return


class Pair:
    """A target daemon and a capture agent for one sparse volume."""

    def __init__(self, work: str, size: int, args: argparse.Namespace) -> None:
        self.work, self.size, self.args = work, size, args
        self.vol = os.path.join(work, "vol.img")
        with open(self.vol, "wb") as fh:
            fh.truncate(size)
        self.tport, self.tm, self.nport, self.am = (free_port() for _ in range(4))
        self.serve_flags, self.push_flags = security_flags(work, not args.insecure)
        self.target: subprocess.Popen[bytes] | None = None
        self.agent: subprocess.Popen[bytes] | None = None
        self.runs = 0
        self.boots = {"agent": 1, "target": 1}  # DRCTL_BOOT_ID of each side's machine

    def _spawn(self, argv: list[str], log: str) -> subprocess.Popen[bytes]:
        tree = self.args.tree or REPO
        side = "target" if argv[1] == "serve" else "agent"
        env = {**os.environ, "PYTHONPATH": tree,
               "DRCTL_BOOT_ID": f"bench-{side}-boot-{self.boots[side]}"}
        with open(os.path.join(self.work, log), "ab") as fh:
            return subprocess.Popen([sys.executable, "-m", "drctl", "--log-level", "INFO",
                                     *argv], cwd=tree, env=env, stdout=fh,
                                    stderr=subprocess.STDOUT)

    def start_target(self) -> float:
        t0 = time.monotonic()
        self.target = self._spawn(["replicate", "serve", "--listen", f"127.0.0.1:{self.tport}",
                                   "--dir", os.path.join(self.work, "t"), "--metrics-port",
                                   str(self.tm), *self.serve_flags], "target.log")
        wait_port(self.tport, 60)
        return t0

    def start_agent(self) -> float:
        self.runs += 1
        t0 = time.monotonic()
        self.agent = self._spawn(["replicate", "push", self.vol, "--to",
                                  f"127.0.0.1:{self.tport}", "--volume", "vol", "--state-dir",
                                  os.path.join(self.work, "st"), "--nbd-listen",
                                  f"127.0.0.1:{self.nport}", "--metrics-port", str(self.am),
                                  "--verify-rate", "0", "--no-progress", *self.push_flags],
                                 f"agent{self.runs}.log")
        return t0

    def protected(self) -> bool:
        return scrape(self.am).get("drctl_replication_protected") == 1.0

    def acked(self) -> float:
        return scrape(self.am).get("drctl_replication_acked_sequence", -1.0)

    def agent_log(self) -> str:
        with open(os.path.join(self.work, f"agent{self.runs}.log"), errors="replace") as fh:
            return fh.read()

    def close(self) -> None:
        for p in (self.agent, self.target):
            if p is not None:
                stop(p)

    def crash(self, side: str) -> int:
        """After a kill -9 of ``side``: what a crash of its machine may lose (the hash entries
        of the extents its activity log lists, never written back: spoilt here), and its next
        start is on another boot. Returns the extents listed (-1: the log is unusable)."""
        if side == "agent":
            st = os.path.join(self.work, "st", "push")
            dirs = os.listdir(st)  # one per volume and target: this bench has one of each
            if len(dirs) != 1:
                raise SystemExit(f"expected one push state in {st}, found {sorted(dirs)}")
            state = os.path.join(st, dirs[0])
            hashes, al, at = (os.path.join(state, "view.hashes"),
                              os.path.join(state, "activity.log"), 0)
        else:
            hashes, al, at = (os.path.join(self.work, "t", "vol.index"),
                              os.path.join(self.work, "t", "vol.al"), INDEX_HEADER)
        saved, _why = read(al)
        extents = set() if saved is None or saved.everything else set(saved.extents)
        fd = os.open(hashes, os.O_RDWR)
        try:
            end = os.fstat(fd).st_size  # (an extent listed past the array spoils nothing)
            for e in extents:
                first = at + 8 * e * EXTENT_BLOCKS
                os.pwrite(fd, os.urandom(max(0, min(8 * EXTENT_BLOCKS, end - first))), first)
        finally:
            os.close(fd)
        self.boots[side] += 1
        return len(extents) if saved is not None and not saved.everything else -1


def unacked_blocks(log: str) -> int | None:
    m = re.search(r"the (\d+) blocks the target has not acknowledged", log)
    if m:
        return int(m.group(1))
    m = re.search(r"resync \((?:changed blocks|whole-volume comparison)\) of (\d+|the whole)",
                  log)
    return None if m is None or not m.group(1).isdigit() else int(m.group(1))


def resync_blocks(log: str) -> int | None:
    m = re.search(r"resync \((?:changed blocks|whole-volume comparison)\) of (\d+|the whole)",
                  log)
    return None if m is None or not m.group(1).isdigit() else int(m.group(1))


def agent_phase(pair: Pair, how: str, args: argparse.Namespace, seed: int) -> dict[str, Any]:
    assert pair.agent is not None and pair.target is not None
    writer = None
    logged: int | None = None
    if how == "clean":  # idle: everything written before is acknowledged
        wait(lambda: scrape(pair.am).get("drctl_replication_lag_seconds") == 0.0, 120, "lag 0")
        stop(pair.agent)
    elif how in ("kill", "crash"):
        writer = Writer(pair.nport, pair.size, seed)
        writer.start()
        time.sleep(1.5)
        pair.agent.kill()
        pair.agent.wait()
        if how == "crash":
            logged = pair.crash("agent")
    else:  # a backlog: the target stopped while --backlog blocks are written
        pair.target.send_signal(signal.SIGSTOP)
        writer = Writer(pair.nport, pair.size, seed, limit=args.backlog)
        writer.start()
        writer.join(600)
        pair.agent.kill()
        pair.agent.wait()
        pair.target.send_signal(signal.SIGCONT)
    if writer is not None:
        writer.halt.set()
        writer.join(30)
    t0 = pair.start_agent()
    wait(pair.protected, 600, "protected")
    seconds = time.monotonic() - t0
    log = pair.agent_log()
    out = {"side": "agent", "how": how, "seconds": round(seconds, 3),
           "resumed": "resumed from saved state" in log, "unacked_blocks": unacked_blocks(log),
           "writes_before": writer.acked if writer else 0,
           "agent_hwm_mib": status(pair.agent.pid)["VmHWM"]}
    if logged is not None:
        out.update(logged_extents=logged, resync_blocks=resync_blocks(log))
    return out


def target_phase(pair: Pair, how: str, seed: int) -> dict[str, Any]:
    """The writer runs through a kill -9; for a clean stop it pauses first (a stream that
    never idles would hold the target's drain for its whole grace period) and starts again
    with the new target's process."""
    assert pair.target is not None
    writer = Writer(pair.nport, pair.size, seed)
    writer.start()
    time.sleep(1.0)
    logged: int | None = None
    if how == "clean":
        writer.halt.set()
        writer.join(30)
        wait(lambda: scrape(pair.am).get("drctl_replication_lag_seconds") == 0.0, 120,
             "lag 0 before the stop")
        stop(pair.target)
    else:
        pair.target.kill()
        pair.target.wait()
        if how == "crash":
            logged = pair.crash("target")
    before = pair.acked()
    t0 = time.monotonic()
    if how == "clean":
        writer = Writer(pair.nport, pair.size, seed + 1)
        writer.start()
    pair.start_target()
    listening = time.monotonic() - t0
    wait(lambda: pair.acked() > before, 600, "a point acknowledged after the restart")
    seconds = time.monotonic() - t0
    writer.halt.set()
    writer.join(30)
    with open(os.path.join(pair.work, "target.log"), errors="replace") as fh:
        opened = re.findall(r"vol\.index: (.*)", fh.read())
    out = {"side": "target", "how": how, "seconds": round(seconds, 3),
           "listening": round(listening, 3), "index": opened[-1] if opened else "",
           "target_hwm_mib": status(pair.target.pid)["VmHWM"]}
    if logged is not None:
        out["logged_extents"] = logged
    return out


def size_runs(gib: float, args: argparse.Namespace) -> dict[str, Any]:
    work = tempfile.mkdtemp(prefix=f"drctl-restart-{gib}g-")
    pair = Pair(work, int(gib * (1 << 30)), args)
    out: dict[str, Any] = {"gib": gib, "uptime_before": uptime(), "runs": []}
    try:
        pair.start_target()
        t0 = pair.start_agent()
        wait(pair.protected, 3600, "the first protection")
        out["full_seconds"] = round(time.monotonic() - t0, 3)
        assert pair.agent is not None and pair.target is not None
        out["full_agent_hwm_mib"] = status(pair.agent.pid)["VmHWM"]
        print(f"{gib} GiB: first start (whole-volume comparison) {out['full_seconds']} s",
              flush=True)
        only = set(args.only.split(",")) if args.only else None
        for r in range(args.runs):
            for how in ("clean", "kill", "backlog", "crash"):
                if only is None or f"agent:{how}" in only:
                    res = agent_phase(pair, how, args, seed=r * 10 + len(how))
                    out["runs"].append(res)
                    print(f"  agent {how}: {res}", flush=True)
            for how in ("clean", "kill", "crash"):
                if only is None or f"target:{how}" in only:
                    res = target_phase(pair, how, seed=r * 10 + 5 + len(how))
                    out["runs"].append(res)
                    print(f"  target {how}: {res}", flush=True)
    finally:
        pair.close()
        out["uptime_after"] = uptime()
        if not args.keep:
            subprocess.run(["rm", "-rf", work])
    return out


def rss_phase(args: argparse.Namespace) -> dict[str, Any]:
    from drctl.pki import Identity
    from replicator.transport.client import TargetClient
    from replicator.transport.security import ChannelSecurity, TlsConfig

    work = tempfile.mkdtemp(prefix="drctl-restart-rss-")
    pair = Pair(work, BS, args)
    pair.serve_flags += ["--max-volumes", str(args.volumes + 1)]
    security = (ChannelSecurity.insecure() if args.insecure else ChannelSecurity(
        TlsConfig.from_dir(os.path.join(work, "pki"), Identity("site", "east")), "west"))
    size = int(args.volume_gib * (1 << 30))
    out: dict[str, Any] = {"volumes": args.volumes, "volume_gib": args.volume_gib,
                           "uptime_before": uptime()}

    async def handshake_all() -> float:
        client = TargetClient(f"127.0.0.1:{pair.tport}", security)
        started = time.monotonic()
        try:
            for i in range(args.volumes):
                await client.handshake(f"v{i:03d}", size, BS, "bench", 0, timeout=3600)
        finally:
            await client.close()
        return time.monotonic() - started

    try:
        pair.start_target()
        assert pair.target is not None
        out["idle_mib"] = status(pair.target.pid)
        out["create_seconds"] = round(asyncio.run(handshake_all()), 3)
        out["created_mib"] = status(pair.target.pid)
        print(f"{args.volumes} volumes of {args.volume_gib} GiB: created in "
              f"{out['create_seconds']} s, target {out['created_mib']}", flush=True)
        if not args.no_rss_restart:
            stop(pair.target)
            pair.start_target()
            out["reopen_seconds"] = round(asyncio.run(handshake_all()), 3)
            out["reopened_mib"] = status(pair.target.pid)
            print(f"  after a clean restart: every volume handshaken again in "
                  f"{out['reopen_seconds']} s, target {out['reopened_mib']}", flush=True)
    finally:
        pair.close()
        out["uptime_after"] = uptime()
        if not args.keep:
            subprocess.run(["rm", "-rf", work])
    return out


def report(results: list[dict[str, Any]]) -> None:
    print("\n| size | phase | runs: seconds to protected / to the first ack | resumed | "
          "unacknowledged blocks | HWM MiB |")
    print("|---|---|---|---|---|---|")
    for res in results:
        print(f"| {res['gib']} GiB | first start (whole-volume comparison) | "
              f"{res['full_seconds']} | | | {res['full_agent_hwm_mib']} (agent) |")
        for side, how in (("agent", "clean"), ("agent", "kill"), ("agent", "backlog"),
                          ("agent", "crash"), ("target", "clean"), ("target", "kill"),
                          ("target", "crash")):
            rs = [r for r in res["runs"] if r["side"] == side and r["how"] == how]
            if not rs:
                continue
            secs = " / ".join(f"{r['seconds']:.2f}" for r in rs)
            resumed = "/".join("y" if r.get("resumed") else "n" for r in rs) if side == "agent" \
                else "; ".join(sorted({r["index"].rsplit(" in ", 1)[0] for r in rs}))
            blocks = " / ".join(str(r.get("unacked_blocks")) for r in rs) if side == "agent" \
                else ""
            if how == "crash":
                blocks = " / ".join(f"{r['logged_extents']} extents logged" + (
                    f", resync of {r['resync_blocks']} blocks" if side == "agent" else "")
                    for r in rs)
            hwm = max(r.get("agent_hwm_mib") or r.get("target_hwm_mib") or 0 for r in rs)
            print(f"| {res['gib']} GiB | {side}, {how} | {secs} | {resumed} | {blocks} | {hwm} |")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="1,4,16", help="volume sizes in GiB, comma-separated")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--backlog", type=int, default=20000,
                    help="blocks written while the target is stopped, before the kill -9")
    ap.add_argument("--insecure", action="store_true", help="plaintext instead of mutual TLS")
    ap.add_argument("--volumes", type=int, default=100, help="the memory phase: volumes")
    ap.add_argument("--volume-gib", type=float, default=10, help="... of this size (sparse)")
    ap.add_argument("--no-rss", action="store_true", help="skip the memory phase")
    ap.add_argument("--no-rss-restart", action="store_true",
                    help="the memory phase without the restart")
    ap.add_argument("--tree", help="run the drctl of this source tree")
    ap.add_argument("--only", help="only these phases, e.g. agent:crash,target:crash")
    ap.add_argument("--json", help="also write every figure to this file")
    ap.add_argument("--keep", action="store_true", help="keep the work directories")
    args = ap.parse_args()
    print(f"bench/restart.py {' '.join(sys.argv[1:])}\n{time.strftime('%Y-%m-%d %H:%M:%S')} "
          f"{uptime()}", flush=True)
    results = [size_runs(float(s), args) for s in args.sizes.split(",") if s]
    memory = None if args.no_rss else rss_phase(args)
    report(results)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"sizes": results, "memory": memory, "argv": sys.argv}, fh, indent=1)


if __name__ == "__main__":
    main()
