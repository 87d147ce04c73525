"""A WAN link between two private network namespaces, for benchmarks.

Two namespaces joined by a veth pair (10.99.0.1 on the source side, 10.99.0.2 on the target
side: these addresses exist only inside the namespaces). Each direction is shaped by a `tbf`
qdisc on its sending end and delayed by ``nfq_delay.py`` on its receiving end (NFQUEUE in
INPUT; this kernel has no `netem`), so the round trip is twice the one-way delay.

Needs root (CAP_NET_ADMIN, CAP_SYS_ADMIN), `ip`, `tc`, `iptables` and the NetfilterQueue
package in the Python that runs the delays. :meth:`WanLink.up` raises :class:`WanUnavailable`
with the exact reason when any of that is missing; :meth:`WanLink.down` removes everything
(it is safe to call twice).
"""

from __future__ import annotations

import ipaddress
import json
import os
import shutil
import subprocess
import sys

from replicator.tcpcheck import default_congestion

HERE = os.path.dirname(os.path.abspath(__file__))
SRC_IP, DST_IP = "10.99.0.1", "10.99.0.2"
QUEUE = 7


class WanUnavailable(Exception):
    """The namespaces or the shaping cannot be set up here (the message says why)."""


class WanLink:
    def __init__(self, rate: str = "50mbit", delay_ms: float = 40.0,
                 python: str = sys.executable, prefix: str = "",
                 slow_start_after_idle: bool = True, congestion: str = "") -> None:
        self.rate = rate
        self.slow_start_after_idle = slow_start_after_idle
        self.congestion = congestion or default_congestion() or "cubic"
        self.delay_ms = delay_ms
        self.python = python
        p = prefix or f"drlag{os.getpid() % 100000}"
        self.src, self.dst = f"{p}-s", f"{p}-d"
        self.vsrc, self.vdst = f"{p[:10]}vs", f"{p[:10]}vd"  # interface names: 15 chars max
        self.procs: list[subprocess.Popen[bytes]] = []
        self.made: list[str] = []
        # The delays run as real-time processes where allowed: the emulated link must not
        # slow down when other jobs load the CPU (the link's own cost is small).
        self.realtime = (["chrt", "-f", "20"] if shutil.which("chrt") and subprocess.run(
            ["chrt", "-f", "20", "true"], capture_output=True).returncode == 0 else [])

    def exec(self, side: str, cmd: list[str]) -> list[str]:
        """``cmd`` run inside the source ("src") or target ("dst") namespace."""
        return ["ip", "netns", "exec", self.src if side == "src" else self.dst, *cmd]

    def _run(self, cmd: list[str]) -> None:
        p = subprocess.run(cmd, capture_output=True, text=True)
        if p.returncode != 0:
            raise WanUnavailable(f"`{' '.join(cmd)}` failed (exit {p.returncode}): "
                                 f"{(p.stderr or p.stdout).strip()}")

    def up(self) -> None:
        if os.geteuid() != 0:
            raise WanUnavailable("network namespaces need root (CAP_NET_ADMIN, CAP_SYS_ADMIN); "
                                 f"this process runs as uid {os.geteuid()}")
        for tool in ("ip", "tc", "iptables"):
            if shutil.which(tool) is None:
                raise WanUnavailable(f"`{tool}` is not installed (Debian: iproute2, iptables)")
        check = subprocess.run([self.python, "-c", "import netfilterqueue"],
                               capture_output=True, text=True)
        if check.returncode != 0:
            raise WanUnavailable(
                f"{self.python} cannot import netfilterqueue (the delay stand-in for netem, "
                "which this kernel lacks): apt-get install libnetfilter-queue-dev, then "
                f"{self.python} -m pip install NetfilterQueue")
        try:
            for ns in (self.src, self.dst):
                self._run(["ip", "netns", "add", ns])
                self.made.append(ns)
            self._run(["ip", "link", "add", self.vsrc, "type", "veth", "peer", "name",
                       self.vdst])
            self._run(["ip", "link", "set", self.vsrc, "netns", self.src])
            self._run(["ip", "link", "set", self.vdst, "netns", self.dst])
            for ns, dev, ip, peer in ((self.src, self.vsrc, SRC_IP, DST_IP),
                                      (self.dst, self.vdst, DST_IP, SRC_IP)):
                self._run(["ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", dev])
                self._run(["ip", "-n", ns, "link", "set", "lo", "up"])
                self._run(["ip", "-n", ns, "link", "set", dev, "up"])
                # Linux's default (1) shrinks TCP's window back to its initial size after an
                # idle RTO: a burst after a pause then needs several round trips
                self._run(["ip", "netns", "exec", ns, "sysctl", "-q", "-w",
                           f"net.ipv4.tcp_slow_start_after_idle={int(self.slow_start_after_idle)}"])
                # TCP's congestion control, stated (a namespace starts with the host's): BBR
                # (v1) drops its window to 4 packets for 200 ms + a round trip every 10 s
                # when no lower RTT was seen (PROBE_RTT), a pause in a stream that never idles
                # (on the route to the peer: a namespace may not make a congestion control
                # its default unless the host allows it to unprivileged sockets)
                net = ipaddress.ip_interface(f"{ip}/24").network
                self._run(["ip", "-n", ns, "route", "replace", str(net), "dev", dev, "proto",
                           "kernel", "scope", "link", "src", ip, "congctl", self.congestion])
                # one CPU takes every packet this end receives (RPS): the tbf of the other end
                # releases packets from whichever CPU runs its timer or its sender, and veth
                # queues each on that CPU's backlog, so with two CPUs a flow's segments
                # arrived out of order (the receiver's TcpExtTCPOFOQueue, the sender's
                # spurious loss probes and cuts of its window); a delay line keeps its order
                self._run(["ip", "netns", "exec", ns, "sh", "-c",
                           f"echo 1 > /sys/class/net/{dev}/queues/rx-0/rps_cpus"])
                self._run(["ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", dev, "root",
                           "tbf", "rate", self.rate, "burst", "32kb", "latency", "400ms"])
                self._run(["ip", "netns", "exec", ns, "iptables", "-A", "INPUT", "-s", peer,
                           "-j", "NFQUEUE", "--queue-num", str(QUEUE), "--queue-bypass"])
                self.procs.append(subprocess.Popen(
                    [*self.realtime, "ip", "netns", "exec", ns, self.python,
                     os.path.join(HERE, "nfq_delay.py"), str(QUEUE), str(self.delay_ms), "1800"],
                    stdout=subprocess.PIPE, stderr=subprocess.PIPE))
            for p in self.procs:  # bound to its queue once it says so (until then, with
                assert p.stdout is not None  # --queue-bypass, packets pass undelayed)
                line = p.stdout.readline().decode()
                if not line.startswith("nfq_delay: queue"):
                    p.wait(5)
                    err = p.stderr.read().decode() if p.stderr else ""
                    raise WanUnavailable(f"nfq_delay.py did not start: {line.strip()} "
                                         f"{err.strip()[-500:]}")
        except BaseException:
            self.down()
            raise

    def rtt_ms(self, count: int = 10) -> dict[str, float]:
        """An application-level TCP round trip from the source side to the target side."""
        port = 5999
        echo = subprocess.Popen(self.exec("dst", [self.python, os.path.join(HERE, "rtt.py"),
                                                  "echo", DST_IP, str(port), "30"]))
        try:
            out = subprocess.run(self.exec("src", [self.python, os.path.join(HERE, "rtt.py"),
                                                   "ping", DST_IP, str(port), str(count)]),
                                 capture_output=True, text=True, timeout=60)
        finally:
            echo.wait(10)
        if out.returncode != 0:
            raise WanUnavailable(f"round-trip probe failed: {out.stderr.strip()[-500:]}")
        result: dict[str, float] = json.loads(out.stdout)
        return result

    def down(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
                try:
                    out, _err = p.communicate(timeout=5)
                    for line in out.decode(errors="replace").splitlines():
                        if line.startswith("nfq_delay: done"):  # how late it released packets
                            print(line, file=sys.stderr)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
        self.procs.clear()
        for ns in reversed(self.made):  # deleting a namespace destroys its veth end (and peer)
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        self.made.clear()
