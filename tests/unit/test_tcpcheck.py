"""The congestion control toward a standby site, looked up in a real network namespace."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator

import pytest

from replicator.tcpcheck import congestion_toward, warn_if_probe_rtt

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PROBE = ("import logging, sys; logging.basicConfig(level=logging.WARNING, "
         "format='%(levelname)s %(message)s'); "
         "from replicator.tcpcheck import warn_if_probe_rtt; "
         "print('ALGO', warn_if_probe_rtt(sys.argv[1]))")


def test_loopback_and_unresolvable_are_not_looked_up() -> None:
    assert congestion_toward("127.0.0.1") == ("", "")
    assert congestion_toward("localhost") == ("", "")
    assert congestion_toward("no-such-host.invalid") == ("", "")
    assert warn_if_probe_rtt("127.0.0.1:7000") == ""


@pytest.fixture
def namespace() -> Iterator[str]:
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("network namespaces need root and iproute2")
    ns = f"drtcp{uuid.uuid4().hex[:6]}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:  # a veth pair inside the namespace: a device up for the route to the peer
        subprocess.run(["ip", "-n", ns, "link", "add", "d0", "type", "veth", "peer", "name",
                        "d1"], check=True)
        for dev in ("d0", "d1"):
            subprocess.run(["ip", "-n", ns, "link", "set", dev, "up"], check=True)
        subprocess.run(["ip", "-n", ns, "addr", "add", "10.97.0.1/24", "dev", "d0"], check=True)
        yield ns
    finally:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def _probe(ns: str, target: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", PROBE, target],
                          capture_output=True, text=True, cwd=REPO, timeout=60)


def _route(ns: str, *congctl: str) -> None:
    subprocess.run(["ip", "-n", ns, "route", "replace", "10.97.0.0/24", "dev", "d0", "proto",
                    "kernel", "scope", "link", "src", "10.97.0.1", *congctl], check=True)


def test_the_route_decides_and_bbr_is_warned_about(namespace: str) -> None:
    _route(namespace, "congctl", "bbr")
    out = _probe(namespace, "10.97.0.2:7000")
    assert out.returncode == 0, out.stderr
    assert "ALGO bbr" in out.stdout
    warning = [line for line in out.stderr.splitlines() if line.startswith("WARNING")]
    assert len(warning) == 1 and "10.97.0.2" in warning[0] and "congctl cubic" in warning[0]

    _route(namespace, "congctl", "cubic")
    out = _probe(namespace, "10.97.0.2:7000")
    assert "ALGO cubic" in out.stdout and "WARNING" not in out.stderr


def test_without_a_route_setting_the_default_decides(namespace: str) -> None:
    _route(namespace)
    default = subprocess.run(["ip", "netns", "exec", namespace, "cat",
                              "/proc/sys/net/ipv4/tcp_congestion_control"],
                             capture_output=True, text=True, check=True).stdout.strip()
    out = _probe(namespace, "10.97.0.2:7000")
    assert f"ALGO {default}" in out.stdout
    assert ("WARNING" in out.stderr) == (default == "bbr")
