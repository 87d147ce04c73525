"""Benchmark: failover and switchover time, from the event to every authoritative server
answering the new address.

Real processes on loopback: one etcd, two authoritative named servers (both updated, both
verified), a replication pair (target daemon + push agent, whose lag the primary's site agent
reports), two site agents and one controller. Lease TTL 2 s, grace 0.5 s.

  failover:   kill -9 the primary site agent; time until both servers answer the replica's
              address (the lease must expire first: that is most of the time)
  switchover: write a switchover request; time until both servers answer (drain to zero lag,
              fence, promote, rewrite, verify)

Run: python bench/failover.py [--trials 20]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.common import DRCTL, REPO, free_port, security_flags, stop, wait_port
from drctl.localservers import EtcdServer, NamedServer
from failover.coordination.etcd import EtcdStore
from failover.dns.rfc2136 import DnsUpdater, RecordSet, Server, TsigKey
from failover.fsm import Command
from failover.records import CommandRecord, command_key


def config(work: str, cluster: str, etcd: EtcdServer, dns: list[NamedServer]) -> str:
    key = os.path.join(work, "tsig.key")
    with open(key, "w") as fh:
        fh.write(f'key "{dns[0].key_name}" {{ algorithm hmac-sha256; '
                 f'secret "{dns[0].secret}"; }};\n')
    servers = [f"127.0.0.1:{n.port}" for n in dns]
    cfg = {"cluster": cluster, "etcd": etcd.etcd_config(), "lease_ttl": 2,
           "sites": {"east": {"address": "10.0.0.1"}, "west": {"address": "10.0.0.2"}},
           "services": {"app": {
               "primary": "east", "replica": "west",
               "policy": {"automatic": True, "grace": 0.5, "rpo": 30},
               "hooks": {"promote": f"touch {work}/$DRCTL_SITE.promoted"},
               "dns": {"zone": "dr.test", "name": "app", "ttl": 5, "servers": servers,
                       "tsig": {"name": dns[0].key_name, "file": key},
                       "verify_timeout": 5}}}}
    path = os.path.join(work, f"{cluster}.yaml")
    with open(path, "w") as fh:
        json.dump(cfg, fh)
    return path


async def all_answer(servers: list[Server], key: TsigKey, address: str) -> None:
    up = DnsUpdater(key, timeout=0.5)
    rr = RecordSet("dr.test", "app", "A", 5, (address,))
    while True:
        got = await asyncio.gather(*(up.answers(rr, s) for s in servers))
        if all(g == frozenset({address}) for g in got):
            return
        await asyncio.sleep(0.01)


def trial(kind: str, n: int, work: str, etcd: EtcdServer, dns: list[NamedServer],
          lag_url: str) -> float:
    key = TsigKey(dns[0].key_name, dns[0].secret)
    servers = [Server("127.0.0.1", d.port) for d in dns]
    reset = RecordSet("dr.test", "app", "A", 5, ("10.0.0.1",))
    asyncio.run(DnsUpdater(key).replace(reset, servers))
    cfg = config(work, f"{kind}{n}", etcd, dns)
    logs = open(os.path.join(work, f"{kind}{n}.log"), "ab")
    procs = {s: subprocess.Popen([*DRCTL, "agent", "--config", cfg, "--site", s,
                                  *(["--lag-url", lag_url] if s == "east" else [])],
                                 cwd=REPO, stdout=logs, stderr=logs) for s in ("east", "west")}
    procs["ctl"] = subprocess.Popen([*DRCTL, "controller", "--config", cfg], cwd=REPO,
                                    stdout=logs, stderr=logs)
    try:
        deadline = time.monotonic() + 30
        while "state" not in _status(cfg) or not _ready(cfg):
            if time.monotonic() > deadline:
                raise SystemExit(f"trial {kind}{n}: cluster never became healthy")
            time.sleep(0.1)
        t0 = time.perf_counter()
        if kind == "failover":
            procs["east"].send_signal(signal.SIGKILL)
        else:
            asyncio.run(_request(etcd, cfg, f"switchover{n}"))
        asyncio.run(asyncio.wait_for(all_answer(servers, key, "10.0.0.2"), 60))
        return time.perf_counter() - t0
    finally:
        for p in procs.values():
            stop(p)
        logs.close()


async def _request(etcd: EtcdServer, cfg: str, cluster: str) -> None:
    store = EtcdStore([etcd.endpoint], credentials=etcd.credentials())
    try:
        rec = CommandRecord(Command.SWITCHOVER, None, "bench", time.time())
        await store.create(command_key(f"/drctl/{cluster}/", "app"), rec.encode())
    finally:
        await store.close()


def _status(cfg: str) -> dict[str, object]:
    p = subprocess.run([*DRCTL, "status", "--config", cfg, "--json"], cwd=REPO,
                       capture_output=True, text=True)
    if p.returncode != 0:
        return {}
    out: dict[str, object] = json.loads(p.stdout)["services"]["app"]
    out["sites"] = json.loads(p.stdout)["sites"]
    out["leader"] = json.loads(p.stdout)["leader"]
    return out


def _ready(cfg: str) -> bool:
    s = _status(cfg)
    sites = s.get("sites", {})
    return (s.get("state") == "healthy" and bool(s.get("leader"))
            and all(v.get("alive") for v in sites.values())  # type: ignore[union-attr]
            and s.get("lag_seconds") == 0.0)


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    k = max(0, min(len(xs) - 1, round(p / 100 * (len(xs) - 1))))
    return xs[k]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--trials", type=int, default=20)
    args = ap.parse_args()
    work = tempfile.mkdtemp(prefix="drctl-fobench-")
    etcd = EtcdServer().start()
    first = NamedServer().start()
    dns = [first, NamedServer(secret=first.secret).start()]
    tport, mport = free_port(), free_port()
    vol = os.path.join(work, "vol.img")
    with open(vol, "wb") as fh:
        fh.write(os.urandom(4 << 20))
    serve_flags, push_flags = security_flags(work)  # mutual TLS, as deployed
    rep = [subprocess.Popen([*DRCTL, "replicate", "serve", "--listen", f"127.0.0.1:{tport}",
                             "--dir", os.path.join(work, "standby"), *serve_flags], cwd=REPO,
                            stdout=subprocess.DEVNULL)]
    wait_port(tport)
    rep.append(subprocess.Popen([*DRCTL, "replicate", "push", vol, "--to", f"127.0.0.1:{tport}",
                                 "--volume", "app", "--metrics-port", str(mport),
                                 "--state-dir", os.path.join(work, "st"), "--no-progress",
                                 *push_flags], cwd=REPO, stderr=subprocess.DEVNULL))
    wait_port(mport)
    lag_url = f"http://127.0.0.1:{mport}/metrics"
    results: dict[str, list[float]] = {"failover": [], "switchover": []}
    try:
        for kind in results:
            for n in range(args.trials):
                dt = trial(kind, n, work, etcd, dns, lag_url)
                results[kind].append(dt)
                print(f"{kind} {n + 1}/{args.trials}: {dt:.2f}s", flush=True)
    finally:
        for p in rep:
            stop(p)
        for d in dns:
            d.stop()
        etcd.stop()
        shutil.rmtree(work, ignore_errors=True)
    print("\n| scenario | trials | p50 s | p99 s | min s | max s | mean s |")
    print("|---|---|---|---|---|---|---|")
    for kind, xs in results.items():
        print(f"| {kind} | {len(xs)} | {pct(xs, 50):.2f} | {pct(xs, 99):.2f} | {min(xs):.2f} | "
              f"{max(xs):.2f} | {statistics.mean(xs):.2f} |")


if __name__ == "__main__":
    main()
