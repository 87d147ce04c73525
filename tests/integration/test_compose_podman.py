"""compose/ end to end with podman: compose/run-podman.sh builds the images and starts etcd,
BIND, Prometheus, both site agents, a controller and the API on the host's network; the
service becomes protected, a block written through east's NBD export reaches west, a failover
request moves the service to west (DNS answers west's address, west's export serves the
block), and Prometheus scrapes both sites and the controller.

Slow (about 4.5 minutes from nothing on 2 cores: the base image by debootstrap ~2 min, the
two images ~1 min each, the drill ~30 s; ~1.5 min once the base image exists), so it runs only
with DRCTL_PODMAN=1, as root, with podman installed (docs/deployment.md).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from typing import Any

import pytest

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
RUN = os.path.join(ROOT, "compose", "run-podman.sh")
CONFIG = "/etc/drctl/runbook.yaml"
PORTS = {"etcd": 12379, "bind": 15353, "prometheus": 19090, "api": 18443,
         "east replication": 17400, "west replication": 17401, "east export": 10809,
         "west export": 10810, "east metrics": 19410, "west metrics": 19411,
         "controller metrics": 19500}
SERVICES = ["certs", "tsig", "etcd", "bind", "site-west", "site-east", "controller", "api",
            "prometheus"]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(900),
    pytest.mark.skipif(os.environ.get("DRCTL_PODMAN") != "1",
                       reason="builds container images (~4.5 min from nothing): set "
                              "DRCTL_PODMAN=1 to run (docs/deployment.md)"),
    pytest.mark.skipif(shutil.which("podman") is None,
                       reason="podman is not installed (apt-get install podman runc "
                              "debootstrap)"),
    pytest.mark.skipif(os.geteuid() != 0, reason="podman here needs root"),
]


def run(*args: str, timeout: float = 60) -> str:
    r = subprocess.run([RUN, *args], capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"run-podman.sh {' '.join(args)}: {r.returncode}\n" \
                              f"{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r.stdout


def status() -> dict[str, Any]:
    out: dict[str, Any] = json.loads(run("drctl", "status", "--config", CONFIG, "--json"))
    return out


def until(what: str, ok: Callable[[], bool], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            if ok():
                return
        except (AssertionError, OSError, ValueError, KeyError) as exc:
            last = exc
        time.sleep(1)
    raise AssertionError(f"gave up waiting for {what} after {timeout:.0f}s (last: {last})")


def app() -> dict[str, Any]:
    svc: dict[str, Any] = status()["services"]["app"]
    return svc


def prometheus(query: str) -> list[dict[str, Any]]:
    url = f"http://127.0.0.1:19090/api/v1/query?{urllib.parse.urlencode({'query': query})}"
    with urllib.request.urlopen(url, timeout=5) as r:
        got: list[dict[str, Any]] = json.load(r)["data"]["result"]
    return got


def dns_answer() -> list[str]:
    import dns.message
    import dns.query

    q = dns.message.make_query("app.dr.test", "A")
    r = dns.query.udp(q, "127.0.0.1", port=15353, timeout=2)
    return sorted(item.address for rrset in r.answer for item in rrset)


@pytest.fixture
def compose() -> Iterator[float]:
    for name, port in PORTS.items():
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                pytest.fail(f"127.0.0.1:{port} ({name}) is taken: compose/ needs its ports")
    run("down", "--volumes")  # what a previous run may have left
    started = time.monotonic()
    try:
        run("up", timeout=900)
        yield time.monotonic() - started
    finally:
        for svc in SERVICES:  # shown by pytest when the test fails
            r = subprocess.run([RUN, "logs", svc], capture_output=True, text=True)
            print(f"---- {svc}\n{(r.stdout + r.stderr)[-2000:]}")
        run("down", "--volumes")


def applied_bytes(port: int) -> float:
    """The bytes a site's target has written into app-data (its agent's metrics)."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    return sum(s.value for f in text_string_to_metric_families(text)
               for s in f.samples if s.name == "drctl_replication_applied_bytes_total"
               and s.labels.get("volume") == "app-data")


def test_compose_deploys_protects_and_fails_over(compose: float) -> None:
    from drctl.nbdclient import NbdClient

    print(f"compose/run-podman.sh up: {compose:.0f}s")
    t0 = time.monotonic()
    until("app protected at east", lambda: (a := app())["state"] == "healthy"
          and a["primary"] == "east" and a["protected"] is True)
    print(f"protected {time.monotonic() - t0:.0f}s after up")
    block = os.urandom(4096)
    before = applied_bytes(19411)
    client = NbdClient("127.0.0.1", 10809, "app-data", timeout=10)
    try:
        client.write(4096 * 123, block)
        client.flush()
    finally:
        client.close()
    until("the write applied at west", lambda: applied_bytes(19411) >= before + 4096)
    assert dns_answer() == ["10.0.0.1"]

    # Prometheus scrapes each site's agent (its data path's metrics) and the controller
    until("Prometheus scraping both sites and the controller", lambda: {
        (r["metric"]["job"], r["metric"]["instance"]) for r in prometheus("up == 1")} >= {
        ("drctl-site", "east"), ("drctl-site", "west"),
        ("drctl-controller", "127.0.0.1:19500")}, timeout=60)
    until("east's protected metric in Prometheus", lambda: any(
        r["value"][1] == "1" for r in prometheus(
            'drctl_replication_protected{site="east",volume="app-data"}')), timeout=60)

    t1 = time.monotonic()
    out = run("drctl", "failover", "app", "--config", CONFIG)
    assert "failover of app requested" in out
    until("app healthy at west", lambda: (a := app())["state"] == "healthy"
          and a["primary"] == "west" and a["protected"] is True)
    print(f"failover to west and re-protect: {time.monotonic() - t1:.0f}s")
    assert dns_answer() == ["10.0.0.2"]
    client = NbdClient("127.0.0.1", 10810, "app-data", timeout=10)
    try:
        assert client.read(4096 * 123, 4096) == block
    finally:
        client.close()
    until("west's protected metric in Prometheus", lambda: any(
        r["value"][1] == "1" for r in prometheus(
            'drctl_replication_protected{site="west",volume="app-data"}')), timeout=60)
