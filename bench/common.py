"""Helpers shared by the benchmarks: free ports, processes, images, wire-byte counters."""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from drctl.localservers import free_port, wait_port  # noqa: E402, F401 - re-exported

DRCTL = [sys.executable, "-m", "drctl"]


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def security_flags(work: str, tls: bool = True) -> tuple[list[str], list[str]]:
    """(serve's, a client's) flags for a target on loopback (site west) that site east
    writes: mutual TLS with a deployment made in ``work`` (drctl's default), or plaintext
    (``--insecure``, to measure what TLS costs)."""
    if not tls:
        return ["--insecure"], ["--insecure"]
    from drctl.pki import Identity, init, issue

    d = os.path.join(work, "pki")
    init(d, "bench")
    issue(d, Identity("site", "west"), ("127.0.0.1",))
    issue(d, Identity("site", "east"))
    return (["--tls-dir", d, "--site", "west", "--allow", "east"],
            ["--tls-dir", d, "--site", "east", "--target-site", "west"])


def make_image(path: str, size: int, seed: int = 7) -> dict[str, int]:
    """A disk-like image, region by region (1 MiB): 30% never written (zeros), 40% random
    (compressed media, encrypted data), 25% text-like pages (logs, tables), 5% copies of an
    earlier region (cloned files, VM templates)."""
    rng = random.Random(seed)
    mib = 1 << 20
    kinds = {"zero": 0, "random": 0, "text": 0, "copy": 0}
    words = [bytes(rng.choice(b"abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9)))
             for _ in range(2000)]
    written: list[int] = []
    with open(path, "w+b") as fh:
        fh.truncate(size)
        for r in range(size // mib):
            x = rng.random()
            if x < 0.30:
                kinds["zero"] += 1
                continue
            if x < 0.70:
                data = rng.randbytes(mib)
                kinds["random"] += 1
            elif x < 0.95 or not written:
                line = b" ".join(rng.choice(words) for _ in range(40)) + b"\n"
                parts, n = [], 0
                while n < mib:
                    row = b"%08d %s" % (rng.randrange(10**8), line)
                    parts.append(row)
                    n += len(row)
                data = b"".join(parts)[:mib]
                kinds["text"] += 1
            else:
                src = rng.choice(written)
                fh.flush()
                data = os.pread(fh.fileno(), mib, src * mib)
                kinds["copy"] += 1
            fh.seek(r * mib)
            fh.write(data)
            written.append(r)
    return kinds


def change_blocks(path: str, fraction: float, seed: int = 11, block: int = 4096) -> int:
    rng = random.Random(seed)
    size = os.path.getsize(path)
    n = size // block
    picks = rng.sample(range(n), int(n * fraction))
    fd = os.open(path, os.O_RDWR)
    try:
        for b in picks:
            os.pwrite(fd, rng.randbytes(block), b * block)
    finally:
        os.close(fd)
    return len(picks)


@dataclass
class WireCounter:
    """TCP bytes (both directions, headers included) to and from one loopback port, counted by
    iptables rules of our own; None when iptables is not usable here."""

    port: int
    enabled: bool = False

    def __post_init__(self) -> None:
        self.enabled = bool(shutil.which("iptables")) and os.geteuid() == 0
        if self.enabled:
            for rule in self._rules():
                if subprocess.run(["iptables", "-I", "OUTPUT", *rule],
                                  capture_output=True).returncode != 0:
                    self.enabled = False

    def _rules(self) -> list[list[str]]:
        tag = ["-m", "comment", "--comment", f"drctl-bench-{self.port}"]
        return [["-o", "lo", "-p", "tcp", "--dport", str(self.port), *tag],
                ["-o", "lo", "-p", "tcp", "--sport", str(self.port), *tag]]

    def read(self) -> int | None:
        if not self.enabled:
            return None
        out = subprocess.run(["iptables", "-L", "OUTPUT", "-v", "-x", "-n"], capture_output=True,
                             text=True).stdout
        total = 0
        for line in out.splitlines():
            if f"drctl-bench-{self.port}" in line:
                total += int(line.split()[1])
        return total

    def close(self) -> None:
        if self.enabled:
            for rule in self._rules():
                subprocess.run(["iptables", "-D", "OUTPUT", *rule], capture_output=True)
