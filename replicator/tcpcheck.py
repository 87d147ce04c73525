"""Which TCP congestion control carries the replication stream, and a warning about BBR v1.

Linux's BBR (v1, the one in mainline kernels) enters PROBE_RTT when it has not seen a round
trip as short as its minimum for 10 s: for 200 ms plus one round trip its window is 4 packets.
A replication stream that never idles (writes all the time) does not see its minimum again on
a link with any queue, so every ~10 s the acks of every point stop for that long and the lag
grows by it (measured with bench/capture.py on an emulated WAN: docs/performance.md). CUBIC,
Linux's default, has no such pause. The congestion control of a connection is the route's
(``ip route ... congctl NAME``) or else the host's default (``net.ipv4.tcp_congestion_control``).
"""

from __future__ import annotations

import ipaddress
import logging
import re
import shutil
import socket
import subprocess

log = logging.getLogger(__name__)

_CONGCTL = re.compile(r"\bcongctl\s+(?:lock\s+)?(\S+)")


def default_congestion() -> str:
    """The host's (this network namespace's) default, "" if unknown."""
    try:
        with open("/proc/sys/net/ipv4/tcp_congestion_control", encoding="ascii") as fh:
            return fh.read().strip()
    except OSError:
        return ""


def route_congestion(ip: str) -> str:
    """The congestion control set on the route to ``ip`` ("" if none is, or `ip` is not
    installed)."""
    tool = shutil.which("ip")
    if tool is None:
        return ""
    try:
        out = subprocess.run([tool, "-o", "route", "get", ip], capture_output=True, text=True,
                             timeout=5).stdout
    except (OSError, subprocess.SubprocessError):
        return ""
    m = _CONGCTL.search(out)
    return m.group(1) if m else ""


def congestion_toward(host: str) -> tuple[str, str]:
    """(congestion control, the address it was looked up for) of a connection to ``host``;
    ("", "") when the host does not resolve or is on this machine (loopback)."""
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError):
        return "", ""
    for info in infos:
        ip = str(info[4][0])
        addr = ipaddress.ip_address(ip.split("%", 1)[0])
        if addr.is_loopback:
            return "", ""
        return route_congestion(ip) or default_congestion(), ip
    return "", ""


def warn_if_probe_rtt(target: str) -> str:
    """Log one WARNING when the stream to ``target`` (host:port) would run over BBR; returns
    the congestion control found ("" if not looked up)."""
    from drctl.argtypes import AddressError, parse_hostport

    try:
        host = parse_hostport(target)[0]
    except AddressError:
        host = target  # (the connection reports a bad address itself)
    algo, ip = congestion_toward(host)
    if algo == "bbr":
        log.warning("TCP congestion control toward %s is bbr: BBR v1 holds a busy stream to 4 "
                    "packets for 200 ms plus a round trip every 10 s (PROBE_RTT), and the "
                    "replication lag grows by that much; give the route to the standby site "
                    "`congctl cubic` (docs/deployment.md)", ip)
    return algo
