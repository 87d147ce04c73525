"""The processes of bench/failover_roundtrip.py and what it observes of them: the data path's
security flags and a throwaway PKI, the processes it starts, the service's status polled from
etcd, the processes' log lines, and when a port first accepts and is first connected to."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from typing import Any

from bench.common import DRCTL, REPO

SITES = ("east", "west")
LOG_TS = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3}) ")


# -- processes ------------------------------------------------------------------------------

_HELP: dict[str, str] = {}


def _has_flag(cmd: tuple[str, ...], flag: str) -> bool:
    key = " ".join(cmd)
    if key not in _HELP:
        _HELP[key] = subprocess.run([*DRCTL, *cmd, "--help"], cwd=REPO, capture_output=True,
                                    text=True).stdout
    return flag in _HELP[key]


def security(tls_dir: str | None, *cmd: str, site: str = "", peer: str = "",
             allow: str = "") -> list[str]:
    """A command's data-path security flags. ``tls_dir`` None: plaintext (``--insecure``,
    where the command has that flag: the data path is mutual TLS by default since the
    security work); else mutual TLS with the deployment directory ``tls_dir``."""
    if tls_dir is None:
        return ["--insecure"] if _has_flag(cmd, "--insecure") else []
    if not _has_flag(cmd, "--tls-dir"):
        return []
    out = ["--tls-dir", tls_dir]
    if site:
        out += ["--site", site]
    if peer:
        out += ["--target-site", peer]
    if allow:
        out += ["--allow", allow]
    return out


def make_pki(directory: str) -> str:
    """A throwaway deployment (drctl certs layout): CA, sites east and west for 127.0.0.1."""
    from drctl.pki import Identity, init, issue

    init(directory, "bench")
    for site in SITES:
        issue(directory, Identity("site", site), ("127.0.0.1", "localhost"))
    return directory


class Procs:
    """Every process this benchmark starts, each in its own session, stopped by PID."""

    def __init__(self) -> None:
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, name: str, args: list[str], log_path: str) -> subprocess.Popen[bytes]:
        with open(log_path, "ab") as log:
            p = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
                                 start_new_session=True)
        self.procs[name] = p
        return p

    def kill9(self, name: str) -> None:
        p = self.procs.pop(name)
        os.kill(p.pid, signal.SIGKILL)
        p.wait(10)

    def stop(self, name: str, timeout: float = 20.0) -> None:
        p = self.procs.pop(name, None)
        if p is None or p.poll() is not None:
            return
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()

    def check(self) -> None:
        """Raise if a process this benchmark keeps running has exited."""
        for name, p in self.procs.items():
            if p.poll() is not None:
                raise RuntimeError(f"{name} (pid {p.pid}) exited with {p.returncode}")

    def stop_all(self) -> None:
        for name in list(self.procs)[::-1]:
            self.stop(name)


# -- status, read from etcd in this process (a `drctl status` process takes ~0.5 s) ----------

class Status:
    def __init__(self, runbook: str, check: Callable[[], None]) -> None:
        self.check = check
        from failover.coordination.etcd import EtcdStore
        from runbooks.cluster import to_cluster
        from runbooks.loader import load

        self.cfg = to_cluster(load(runbook))
        self.runner = asyncio.Runner()

        async def make() -> EtcdStore:
            return EtcdStore(list(self.cfg.etcd), timeout=2.0,
                             credentials=self.cfg.etcd_credentials)

        self.store = self.runner.run(make())
        self.timeline: list[tuple[float, str]] = []
        self._last = ""

    def get(self) -> dict[str, Any]:
        from failover.status import cluster_status

        snap = self.runner.run(self.store.snapshot(self.cfg.prefix))
        out: dict[str, Any] = cluster_status(self.cfg, snap, time.time())["services"]["app"]
        key = (f"{out['state']} primary={out['primary']} epoch={out['epoch']} "
               f"protected={out['protected']} lag0={out['lag_seconds'] == 0}")
        if key != self._last:
            self.timeline.append((time.time(), f"{key} (lag {out['lag_seconds']})"))
            self._last = key
        return out

    def wait(self, pred: Callable[[dict[str, Any]], bool], timeout: float, what: str) -> float:
        """Poll every 50 ms until ``pred``; the time.time() it first held."""
        deadline = time.monotonic() + timeout
        last: dict[str, Any] = {}
        while time.monotonic() < deadline:
            self.check()
            try:
                last = self.get()
            except Exception as exc:  # etcd busy: poll again
                last = {"error": repr(exc)}
            else:
                if pred(last):
                    return time.time()
            time.sleep(0.05)
        raise TimeoutError(f"timed out after {timeout}s waiting for {what}; last status: "
                           f"{json.dumps(last, default=str)[:2000]}")

    def close(self) -> None:
        try:
            self.runner.run(self.store.close())
        finally:
            self.runner.close()


def protected_at(primary: str) -> Callable[[dict[str, Any]], bool]:
    return lambda s: (s["state"] == "healthy" and s["primary"] == primary
                      and s["lag_seconds"] == 0 and s["protected"] is True)


# -- logs -----------------------------------------------------------------------------------

def log_lines(path: str, offset: int = 0) -> list[tuple[float, str]]:
    """(time, line) of every line from byte ``offset`` on (the logs' times are local time)."""
    try:
        with open(path, "rb") as fh:
            fh.seek(offset)
            text = fh.read().decode(errors="replace")
    except FileNotFoundError:
        return []
    out: list[tuple[float, str]] = []
    for line in text.splitlines():
        m = LOG_TS.match(line)
        if m:
            t = time.mktime(time.strptime(m.group(1), "%Y-%m-%d %H:%M:%S"))
            out.append((t + int(m.group(2)) / 1000, line))
    return out


def size_of(path: str) -> int:
    try:
        return os.path.getsize(path)
    except OSError:
        return 0


def first(lines: list[tuple[float, str]], needle: str) -> float | None:
    return next((t for t, line in lines if needle in line), None)


def last_match(lines: list[tuple[float, str]], rx: re.Pattern[str]
               ) -> tuple[float, re.Match[str]] | None:
    got = [(t, m) for t, line in lines if (m := rx.search(line))]
    return got[-1] if got else None


# -- ports ----------------------------------------------------------------------------------

class PortWatch:
    """When a loopback port first accepts a connection (``at``, polled every 10 ms), and when
    someone else first holds an established connection to it (``peer_at``, /proc/net/tcp)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.at: float | None = None
        self.peer_at: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        probe = 0
        while not self._stop.is_set() and self.at is None:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    self.at = time.time()
                    probe = s.getsockname()[1]
            time.sleep(0.01)
        while not self._stop.is_set():
            if self._established(exclude=probe):
                self.peer_at = time.time()
                return
            time.sleep(0.01)

    def _established(self, exclude: int) -> bool:
        for table in ("/proc/net/tcp", "/proc/net/tcp6"):  # gRPC listens on v4-mapped v6
            with open(table) as fh:
                for line in fh.readlines()[1:]:
                    f = line.split()
                    if f[3] == "01" and int(f[1].rsplit(":", 1)[1], 16) == self.port \
                            and int(f[2].rsplit(":", 1)[1], 16) != exclude:
                        return True
        return False

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
