"""`make demo`: a two-site DR drill on loopback with real etcd and BIND.

Starts etcd, an authoritative named for dr.test (TSIG key), the standby site (a replication
target daemon and its site agent), the primary site (a source agent replicating a sample
volume under a steady write load, and its site agent), a controller and the web page, all
driven by one runbook; prints the page's URL. Click Failover: the controller fences the
primary (epoch bump; the promotion raises the standby replica's epoch so the old source is
refused), promotes the standby (its health check must pass) and rewrites app.dr.test on the
DNS server; the page shows the primary, lag and DNS answers change. Click Drill: the replica
is cloned, checked under a test DNS name and cleaned up while replication goes on. Runs until
Ctrl-C (or DEMO_SECONDS), then stops everything by PID.
"""

from __future__ import annotations

import json
import os
import random
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field

from drctl.localservers import EtcdServer, NamedServer, free_port, wait_port

DRCTL = [sys.executable, "-m", "drctl"]


@dataclass
class DemoCluster:
    """Every process of the drill; ``start()`` then ``stop()`` (also used by the browser
    test)."""

    work: str = field(default_factory=lambda: tempfile.mkdtemp(prefix="drctl-demo-"))
    token: str = field(default_factory=lambda: secrets.token_urlsafe(24))
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    etcd: EtcdServer | None = None
    named: NamedServer | None = None
    api_port: int = 0
    _stop_writer: threading.Event = field(default_factory=threading.Event)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}/"

    def _spawn(self, name: str, args: list[str]) -> None:
        log = open(os.path.join(self.work, f"{name}.log"), "ab")
        self.procs[name] = subprocess.Popen([*DRCTL, "--log-level", "INFO", *args],
                                            stdout=log, stderr=log)
        log.close()

    def start(self) -> DemoCluster:
        self.etcd = EtcdServer().start()
        self.named = NamedServer().start()
        key = os.path.join(self.work, "tsig.key")
        with open(key, "w") as fh:
            fh.write(f'key "{self.named.key_name}" {{ algorithm hmac-sha256; '
                     f'secret "{self.named.secret}"; }};\n')
        tport, tmetrics, smetrics, cmetrics = (free_port() for _ in range(4))
        self.api_port = free_port()
        self._spawn("standby-target", ["replicate", "serve", "--listen", f"127.0.0.1:{tport}",
                                       "--dir", os.path.join(self.work, "standby"),
                                       "--metrics-port", str(tmetrics)])
        wait_port(tport)
        volume = os.path.join(self.work, "primary", "app-data.img")
        os.makedirs(os.path.dirname(volume))
        with open(volume, "wb") as fh:
            rng = random.Random(1)
            for i in range(64):
                fh.write(rng.randbytes(1 << 20) if i % 3 else bytes(1 << 20))
        self._spawn("primary-source", [
            "replicate", "push", volume, "--to", f"127.0.0.1:{tport}", "--volume", "app-data",
            "--epoch", "1", "--rate-limit", "50MB/s", "--interval", "0.2", "--rpo-budget", "30",
            "--metrics-port", str(smetrics), "--no-progress",
            "--state-dir", os.path.join(self.work, "state")])
        wait_port(smetrics)
        runbook = {
            "kind": "drctl-runbook", "version": 1, "cluster": "demo", "lease_ttl": 2,
            "etcd": [f"127.0.0.1:{self.etcd.client_port}"],
            "sites": {
                "east": {"address": "10.0.0.1", "endpoints": {
                    "source_metrics": f"http://127.0.0.1:{smetrics}/metrics"}},
                "west": {"address": "10.0.0.2", "endpoints": {
                    "replication": f"127.0.0.1:{tport}"}}},
            "dns": {"zones": {self.named.zone: {
                "servers": [f"127.0.0.1:{self.named.port}"],
                "tsig": {"name": self.named.key_name, "file": key}}}},
            "services": {"app": {
                "primary": "east", "replica": "west",
                "volumes": [{"name": "app-data", "path": volume}],
                "replication": {"mode": "hot", "rate_limit": "50MB/s", "rpo": 30},
                "failover": {"automatic": True, "grace": 2, "damping": 600},
                "dns": [{"zone": self.named.zone, "name": "app", "ttl": 5}],
                "steps": [
                    {"type": "precheck", "name": "lag within budget",
                     "check": "replication_lag"},
                    {"type": "promote"},
                    {"type": "health_check", "name": "standby replication target answers",
                     "tcp": f"127.0.0.1:{tport}", "timeout": 2, "retries": 5},
                    {"type": "dns"}]}},
        }
        self.config = os.path.join(self.work, "runbook.yaml")
        with open(self.config, "w") as fh:
            json.dump(runbook, fh, indent=1)
        lag_url = f"http://127.0.0.1:{smetrics}/metrics"
        self._spawn("agent-east", ["agent", "--config", self.config, "--site", "east",
                                   "--lag-url", lag_url])
        self._spawn("agent-west", ["agent", "--config", self.config, "--site", "west"])
        self._spawn("controller", ["controller", "--config", self.config, "--metrics-port",
                                   str(cmetrics)])
        token_file = os.path.join(self.work, "api.token")
        with open(token_file, "w") as fh:
            fh.write(self.token)
        self._spawn("api", ["api", "--config", self.config, "--listen",
                            f"127.0.0.1:{self.api_port}", "--token-file", token_file])
        wait_port(self.api_port)
        threading.Thread(target=self._writer, args=(volume,), daemon=True).start()
        return self

    def _writer(self, volume: str) -> None:
        """A steady write load on the primary's volume: 4 KiB blocks, ~200 per second."""
        rng = random.Random(2)
        fd = os.open(volume, os.O_RDWR)
        try:
            while not self._stop_writer.is_set():
                os.pwrite(fd, rng.randbytes(4096), rng.randrange(16384) * 4096)
                time.sleep(0.005)
        finally:
            os.close(fd)

    def status(self) -> dict[str, object]:
        req = urllib.request.Request(f"{self.url}api/v1/status",
                                     headers={"Authorization": f"Bearer {self.token}"})
        with urllib.request.urlopen(req, timeout=5) as r:
            out: dict[str, object] = json.loads(r.read())
        return out

    def stop(self) -> None:
        self._stop_writer.set()
        for p in reversed(list(self.procs.values())):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs.values():
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        for server in (self.named, self.etcd):
            if server is not None:
                server.stop()
        shutil.rmtree(self.work, ignore_errors=True)


def main() -> int:
    seconds = float(os.environ.get("DEMO_SECONDS", "0"))
    demo = DemoCluster()
    stopping = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    try:
        demo.start()
        print(f"\ndrctl demo is up (logs in {demo.work})\n\n  open  {demo.url}#token="
              f"{demo.token}\n\nand press Failover. Ctrl-C stops everything.\n", flush=True)
        started = time.monotonic()
        while not stopping.is_set() and (not seconds or time.monotonic() - started < seconds):
            try:
                s = demo.status()
                app = s["services"]["app"]  # type: ignore[index]
                dns = ", ".join(a for answers in (app["dns"] or {}).values()
                                for a in (answers or ["-"]))
                lag = app["lag_seconds"]
                print(f"  {time.strftime('%H:%M:%S')} app: {app['state']:<15} primary="
                      f"{app['primary']:<5} lag={'-' if lag is None else f'{lag:.2f}s':<6} "
                      f"app.dr.test -> {dns}", flush=True)
            except OSError as exc:
                print(f"  status unavailable: {exc}", flush=True)
            stopping.wait(2)
    except KeyboardInterrupt:
        pass
    finally:
        print("stopping...", flush=True)
        demo.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
