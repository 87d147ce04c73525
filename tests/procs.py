"""Real processes for tests: free loopback ports, daemons started and stopped by PID.

The replication channel is mutual TLS here as in production: one deployment directory per
test session (``pki()``: a CA, sites east and west, operator tester, the epoch-token key),
and a ``Target`` is site west letting site east write. ``Target(tls=False)`` runs it with
``--insecure`` for tests that are not about security and need what TLS hides (a proxy that
corrupts bytes on the wire)."""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from drctl.localservers import free_port

if TYPE_CHECKING:
    from replicator.transport.security import ChannelSecurity

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DRCTL = [sys.executable, "-m", "drctl"]


def wait_for(predicate: Callable[[], bool], timeout: float, what: str,
             interval: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what}")


def port_open(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def scrape(port: int) -> dict[str, float]:
    """Prometheus text from a metrics endpoint, as {series: value}."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def metric(samples: dict[str, float], name: str, **labels: str) -> float:
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for key, value in samples.items():
        base, _, rest = key.partition("{")
        got = ",".join(sorted(rest.rstrip("}").split(","))) if rest else ""
        if base == name and got == want:
            return value
    return 0.0


_STARTED: list[Proc] = []


def stop_all() -> None:
    """Stop, by PID, every process a test started and left running (even a failed test)."""
    while _STARTED:
        _STARTED.pop().stop()


@dataclass
class Proc:
    args: list[str]
    log_path: str
    popen: subprocess.Popen[bytes] | None = None
    env: dict[str, str] = field(default_factory=dict)

    def start(self) -> Proc:
        log = open(self.log_path, "ab")
        env = {**os.environ, **self.env}
        self.popen = subprocess.Popen(self.args, stdout=log, stderr=subprocess.STDOUT,
                                      cwd=REPO, env=env, start_new_session=True)
        log.close()
        _STARTED.append(self)
        return self

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    def kill9(self) -> None:
        assert self.popen is not None
        os.kill(self.popen.pid, signal.SIGKILL)
        self.popen.wait(10)

    def stop(self, timeout: float = 10.0) -> int | None:
        if self.popen is None:
            return None
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        return self.popen.returncode

    def wait(self, timeout: float) -> int:
        assert self.popen is not None
        return self.popen.wait(timeout)

    def log(self) -> str:
        with open(self.log_path, errors="replace") as fh:
            return fh.read()


@dataclass(frozen=True)
class Pki:
    """The session's deployment directory (drctl certs layout)."""

    dir: str

    def sign(self, volumes: tuple[str, ...], site: str, epoch: int,
             service: str = "svc") -> str:
        from drctl.epochtoken import Signer

        return Signer.load(os.path.join(self.dir, "epoch.key")).sign(service, volumes, site,
                                                                      epoch)

    def token_file(self, path: str, volumes: tuple[str, ...], site: str, epoch: int) -> str:
        from drctl.pki import write_private

        write_private(path, self.sign(volumes, site, epoch).encode(), overwrite=True)
        return path

    def flags(self, site: str, target_site: str | None = None) -> list[str]:
        out = ["--tls-dir", self.dir, "--site", site]
        return [*out, "--target-site", target_site] if target_site else out

    def env(self, who: str = "operator/tester") -> dict[str, str]:
        """The environment that gives a command without TLS flags of its own (`drctl drill`)
        its certificate (ChannelSecurity.from_env)."""
        return {"DRCTL_TLS_DIR": self.dir, "DRCTL_TLS_AS": who}

    def security(self, who: str = "site/east", server: str = "west") -> ChannelSecurity:
        from drctl.pki import Identity
        from replicator.transport.security import ChannelSecurity, TlsConfig

        kind, _, name = who.partition("/")
        return ChannelSecurity(TlsConfig.from_dir(self.dir, Identity(kind, name)), server)


_PKI: list[Pki] = []


def pki() -> Pki:
    """One deployment per test session: CA, sites east, west and north (also valid for
    127.0.0.1), operator tester, epoch-token key; removed when the session ends."""
    if not _PKI:
        from drctl.pki import Identity, init, issue

        d = tempfile.mkdtemp(prefix="drctl-pki-")
        atexit.register(shutil.rmtree, d, True)
        init(d, "tests")
        for site in ("east", "west", "north"):
            issue(d, Identity("site", site), ("127.0.0.1", "localhost"))
        issue(d, Identity("operator", "tester"))
        _PKI.append(Pki(d))
    return _PKI[0]


class Target:
    """A `drctl replicate serve` daemon on free loopback ports: site west, written by site
    east over mutual TLS (``tls=False``: plaintext, --insecure)."""

    def __init__(self, workdir: str, port: int | None = None, *extra: str,
                 tls: bool = True) -> None:
        self.extra = extra  # more `serve` flags, e.g. "--mode", "warm"
        self.dir = os.path.join(workdir, "target")
        self.port = port or free_port()
        self.metrics_port = free_port()
        self.proc: Proc | None = None
        self.workdir = workdir
        self.tls = tls

    def security_flags(self) -> list[str]:
        """`serve`'s flags: west, letting east write and the tester operator read."""
        if not self.tls:
            return ["--insecure"]
        return [*pki().flags("west"), "--allow", "east", "--allow", "operator:tester"]

    def client_flags(self, site: str = "east") -> list[str]:
        """A client's flags to reach this target (push, verify, fence)."""
        return pki().flags(site, "west") if self.tls else ["--insecure"]

    def security(self, who: str = "site/east") -> ChannelSecurity:
        from replicator.transport.security import ChannelSecurity

        return pki().security(who) if self.tls else ChannelSecurity.insecure()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> Target:
        self.proc = Proc([*DRCTL, "--log-level", "INFO", "replicate", "serve", "--listen",
                          self.address, "--dir", self.dir, "--metrics-port",
                          str(self.metrics_port), *self.security_flags(), *self.extra],
                         os.path.join(self.workdir, "target.log"))
        self.proc.start()
        wait_for(lambda: port_open(self.port) and port_open(self.metrics_port), 20,
                 f"target daemon on {self.address}")
        return self

    def metrics(self) -> dict[str, float]:
        return scrape(self.metrics_port)

    def image(self, volume: str) -> str:
        return os.path.join(self.dir, f"{volume}.img")

    def stop(self) -> int | None:
        return self.proc.stop() if self.proc else None


def push_cmd(path: str, target: Target, volume: str, state_dir: str, *extra: str) -> list[str]:
    return [*DRCTL, "replicate", "push", path, "--to", target.address, "--volume", volume,
            "--state-dir", state_dir, "--no-progress", *target.client_flags(), *extra]


def epoch_args(target: Target, volume: str, epoch: int, site: str = "east") -> list[str]:
    """``--epoch N`` and, for a TLS target, the controller's token granting it to ``site``."""
    out = ["--epoch", str(epoch)]
    if target.tls:
        path = os.path.join(target.workdir, f"{volume}-{site}-{epoch}.token")
        out += ["--epoch-token", pki().token_file(path, (volume,), site, epoch)]
    return out


def fence_cmd(target: Target, volume: str, epoch: int, site: str = "west",
              token: bool = True) -> list[str]:
    """`drctl replicate fence` as ``site`` (default: the target's own, a promotion)."""
    epoch_flags = epoch_args(target, volume, epoch, site) if token else ["--epoch", str(epoch)]
    return [*DRCTL, "replicate", "fence", "--to", target.address, "--volume", volume,
            *epoch_flags, *target.client_flags(site)]


def run(cmd: list[str], timeout: float = 120.0,
        env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO,
                          env={**os.environ, **env} if env else None)


def write_random(path: str, size: int, seed: int = 1) -> None:
    import random

    rng = random.Random(seed)
    with open(path, "wb") as fh:
        left = size
        while left:
            n = min(left, 1 << 20)
            fh.write(rng.randbytes(n))
            left -= n


def same_file(a: str, b: str) -> bool:
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            x, y = fa.read(1 << 20), fb.read(1 << 20)
            if x != y:
                return False
            if not x:
                return True
