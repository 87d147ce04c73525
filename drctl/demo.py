"""`make demo`: a local two-site replication drill on loopback.

Starts a target daemon ("standby site") and a source agent ("primary site") replicating a
sample volume while a writer keeps changing it; prints lag and throughput every second; then
stops the writer, waits for the replica to catch up, verifies it block for block and stops
everything by PID. DEMO_SECONDS (default 20) sets how long the write load runs.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

DRCTL = [sys.executable, "-m", "drctl"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_port(port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise SystemExit(f"demo: nothing listening on 127.0.0.1:{port} after {timeout}s")


def _metrics(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("drctl_"):
            name, _, value = line.rpartition(" ")
            out[name.split("{")[0]] = float(value)
    return out


def _stop(p: subprocess.Popen[bytes]) -> None:
    if p.poll() is None:
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def main() -> int:
    seconds = float(os.environ.get("DEMO_SECONDS", "20"))
    work = tempfile.mkdtemp(prefix="drctl-demo-")
    vol = os.path.join(work, "primary", "app-data.img")
    os.makedirs(os.path.dirname(vol))
    rng = random.Random(1)
    with open(vol, "wb") as fh:
        for i in range(64):
            fh.write(rng.randbytes(1 << 20) if i % 3 else bytes(1 << 20))
    tport, aport = _free_port(), _free_port()
    procs: list[subprocess.Popen[bytes]] = []
    try:
        procs.append(subprocess.Popen([*DRCTL, "replicate", "serve", "--listen",
                                       f"127.0.0.1:{tport}", "--dir",
                                       os.path.join(work, "standby")]))
        _wait_port(tport)
        procs.append(subprocess.Popen([*DRCTL, "replicate", "push", vol, "--to",
                                       f"127.0.0.1:{tport}", "--volume", "app-data",
                                       "--rate-limit", "50MB/s", "--interval", "0.2",
                                       "--metrics-port", str(aport), "--state-dir",
                                       os.path.join(work, "state"), "--no-progress"]))
        _wait_port(aport)
        print(f"demo: primary volume {vol}\n      standby replicas in {work}/standby\n"
              f"      agent metrics http://127.0.0.1:{aport}/metrics\n"
              f"      writing random 4 KiB blocks for {seconds:.0f}s ...", flush=True)
        fd = os.open(vol, os.O_RDWR)
        started = time.monotonic()
        last = started
        writes = 0
        while time.monotonic() - started < seconds:
            os.pwrite(fd, rng.randbytes(4096), rng.randrange(16384) * 4096)
            writes += 1
            time.sleep(0.002)
            if time.monotonic() - last >= 1.0:
                last = time.monotonic()
                m = _metrics(aport)
                lag = m.get("drctl_replication_lag_seconds", 0)
                pending = m.get("drctl_replication_pending_bytes", 0) / 1e6
                shipped = m.get("drctl_replication_shipped_compressed_bytes_total", 0) / 1e6
                print(f"  t={last - started:4.0f}s writes={writes:6d} lag={lag:5.2f}s "
                      f"pending={pending:6.2f}MB shipped={shipped:7.1f}MB", flush=True)
        os.close(fd)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            m = _metrics(aport)
            if (m.get("drctl_replication_lag_seconds", 1) == 0
                    and m.get("drctl_replication_pending_bytes", 1) == 0):
                break
            time.sleep(0.2)
        rc = subprocess.run([*DRCTL, "replicate", "verify", vol, "--to", f"127.0.0.1:{tport}",
                             "--volume", "app-data"]).returncode
        print("demo: replica verified equal to the primary" if rc == 0
              else "demo: REPLICA DIFFERS", flush=True)
        return rc
    finally:
        for p in reversed(procs):
            _stop(p)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
