"""compose/ end to end with podman: compose/run-podman.sh builds the images and starts etcd,
BIND, Prometheus, both site agents, a controller and the API on the host's network; the
service becomes protected, a block written through east's NBD export reaches west, a failover
request moves the service to west (DNS answers west's address, west's export serves the
block), and Prometheus scrapes both sites and the controller. Then east's agent runs from the
units `drctl deploy systemd` makes, under systemd (in a container with systemd as PID 1,
privileged so that the units' sandbox applies): it comes back as the replica, is re-protected,
takes the service back on a failback, and stops cleanly on `systemctl stop`.

Slow (about 7 minutes from nothing on 2 shared cores: the base image by debootstrap 2-3.5 min,
the two images ~1 min each, the wheels and the rest ~1.5 min; 1.5-2 min once the images exist),
so it runs only with DRCTL_PODMAN=1, as root, with podman installed (docs/deployment.md).
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
SYSTEMD_IMAGE = "localhost/drctl-systemd:test"
SYSTEMD_EAST = "drctl-test-east-systemd"
# east's host, set up as docs/deployment.md says (files from the compose volumes)
INSTALL = """set -e
mkdir -p /etc/drctl/tls/sites
cp /etc/drctl-src/runbook.yaml /etc/drctl/
cp /tls-src/ca.crt /tls-src/epoch.pub /etc/drctl/tls/
cp /tls-src/sites/east.crt /tls-src/sites/east.key /etc/drctl/tls/sites/
drctl deploy systemd --config /etc/drctl/runbook.yaml --site east --no-controller \
    --agent-metrics 127.0.0.1:19410 --out /tmp/units
cp /tmp/units/drctl-agent.service /etc/systemd/system/
install -Dm644 /tmp/units/drctl.sysusers.conf /etc/sysusers.d/drctl.conf
install -Dm644 /tmp/units/drctl.tmpfiles.conf /etc/tmpfiles.d/drctl.conf
systemd-sysusers && systemd-tmpfiles --create
chown -R drctl:drctl /etc/drctl/tls /var/lib/drctl /srv/app && chown drctl /keys/tsig.key
systemctl daemon-reload && systemctl start drctl-agent.service
"""

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(900),
    pytest.mark.skipif(os.environ.get("DRCTL_PODMAN") != "1",
                       reason="builds container images (~7 min from nothing): set "
                              "DRCTL_PODMAN=1 to run (docs/deployment.md)"),
    pytest.mark.skipif(shutil.which("podman") is None,
                       reason="podman is not installed (apt-get install podman runc "
                              "debootstrap)"),
    pytest.mark.skipif(os.geteuid() != 0, reason="podman here needs root"),
]


def podman(*args: str, timeout: float = 120) -> str:
    env = {**os.environ, "CONTAINERS_CONF": os.path.join(ROOT, "compose", "podman",
                                                         "containers.conf")}
    r = subprocess.run(["podman", "--runtime", "runc", *args], capture_output=True, text=True,
                       timeout=timeout, env=env)
    assert r.returncode == 0, f"podman {' '.join(args)}: {r.returncode}\n{r.stdout[-3000:]}" \
                              f"\n{r.stderr[-3000:]}"
    return r.stdout


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
        r = subprocess.run(["podman", "exec", SYSTEMD_EAST, "journalctl", "-u", "drctl-agent",
                            "--no-pager"], capture_output=True, text=True)
        print(f"---- {SYSTEMD_EAST}\n{r.stdout[-3000:]}")
        subprocess.run(["podman", "rm", "-f", "-t", "15", SYSTEMD_EAST], capture_output=True)
        subprocess.run(["podman", "rmi", "-f", SYSTEMD_IMAGE], capture_output=True)
        run("down", "--volumes")


def applied_bytes(port: int) -> float:
    """The bytes a site's target has written into app-data (its agent's metrics)."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    return sum(s.value for f in text_string_to_metric_families(text)
               for s in f.samples if s.name == "drctl_replication_applied_bytes_total"
               and s.labels.get("volume") == "app-data")


def nbd_write(port: int, offset: int, data: bytes) -> None:
    """A write through a site's export, then a FLUSH (a consistency point)."""
    from drctl.nbdclient import NbdClient

    client = NbdClient("127.0.0.1", port, "app-data", timeout=10)
    try:
        client.write(offset, data)
        client.flush()
    finally:
        client.close()


def nbd_read(port: int, offset: int) -> bytes:
    from drctl.nbdclient import NbdClient

    client = NbdClient("127.0.0.1", port, "app-data", timeout=10)
    try:
        return client.read(offset, 4096)
    finally:
        client.close()


def healthy_at(site: str) -> Callable[[], bool]:
    return lambda: (a := app())["state"] == "healthy" and a["primary"] == site \
        and a["protected"] is True


def role_of_east() -> str:
    role: str = status()["sites"]["east"]["services"]["app"]["role"]
    return role


def test_compose_deploys_protects_and_fails_over(compose: float, tmp_path: str) -> None:
    print(f"compose/run-podman.sh up: {compose:.0f}s")
    t0 = time.monotonic()
    until("app protected at east", healthy_at("east"))
    print(f"protected {time.monotonic() - t0:.0f}s after up")
    block = os.urandom(4096)
    before = applied_bytes(19411)
    nbd_write(10809, 4096 * 123, block)
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
    until("app healthy at west", healthy_at("west"))
    print(f"failover to west and re-protect: {time.monotonic() - t1:.0f}s")
    assert dns_answer() == ["10.0.0.2"]
    assert nbd_read(10810, 4096 * 123) == block
    until("west's protected metric in Prometheus", lambda: any(
        r["value"][1] == "1" for r in prometheus(
            'drctl_replication_protected{site="west",volume="app-data"}')), timeout=60)

    # east's host again, its agent now from `drctl deploy systemd` under systemd
    t2 = time.monotonic()
    moved = os.urandom(4096)
    nbd_write(10810, 4096 * 7, moved)  # written at west: must reach east, the new replica
    east_under_systemd(tmp_path)
    until("east back (systemd) as the replica, protected",
          lambda: healthy_at("west")() and role_of_east() == "replica")
    run("drctl", "failback", "app", "--config", CONFIG)
    until("app home at east", healthy_at("east"))
    assert dns_answer() == ["10.0.0.1"]
    assert nbd_read(10809, 4096 * 7) == moved and nbd_read(10809, 4096 * 123) == block
    print(f"east under systemd, re-protected and failed back: {time.monotonic() - t2:.0f}s")
    started = time.monotonic()
    podman("exec", SYSTEMD_EAST, "systemctl", "stop", "drctl-agent")
    assert time.monotonic() - started < 30
    assert podman("exec", SYSTEMD_EAST, "systemctl", "show", "-p", "Result", "--value",
                  "drctl-agent").strip() == "success"


def east_under_systemd(tmp_path: str) -> None:
    """Replace east's container with a host running systemd and the units `drctl deploy
    systemd` makes; check the agent runs in their sandbox."""
    containerfile = os.path.join(tmp_path, "Containerfile")
    with open(containerfile, "w") as fh:
        fh.write("FROM localhost/drctl:compose\nRUN apt-get update -q && DEBIAN_FRONTEND="
                 "noninteractive apt-get install -y -q --no-install-recommends systemd "
                 "systemd-sysv dbus && rm -rf /var/lib/apt/lists/*\nENTRYPOINT []\n")
    podman("build", "--network", "host", "-t", SYSTEMD_IMAGE, "-f", containerfile,
           str(tmp_path), timeout=300)
    podman("rm", "-f", "-t", "15", "drctl-site-east")
    podman("run", "-d", "--name", SYSTEMD_EAST, "--privileged", "--network", "host",
           "--systemd=always", "-v", "drctl_east-state:/var/lib/drctl",
           "-v", "drctl_east-app:/srv/app", "-v", "drctl_tls:/tls-src:ro",
           "-v", f"{ROOT}/compose/drctl:/etc/drctl-src:ro", "-v", "drctl_keys:/keys",
           SYSTEMD_IMAGE, "/lib/systemd/systemd")
    until("systemd in the container", lambda: subprocess.run(
        ["podman", "exec", SYSTEMD_EAST, "systemctl", "is-system-running"],
        capture_output=True, text=True).stdout.strip() in ("running", "degraded"), timeout=60)
    podman("exec", SYSTEMD_EAST, "sh", "-c", INSTALL)
    pid = podman("exec", SYSTEMD_EAST, "systemctl", "show", "-p", "MainPID", "--value",
                 "drctl-agent").strip()
    status = podman("exec", SYSTEMD_EAST, "cat", f"/proc/{pid}/status")
    assert "NoNewPrivs:\t1" in status and "CapEff:\t0000000000000000" in status
    mounts = {line.split()[4]: line.split()[5] for line in podman(
        "exec", SYSTEMD_EAST, "cat", f"/proc/{pid}/mountinfo").splitlines()}
    assert mounts["/"].startswith("ro") and mounts["/srv/app"].startswith("rw")
    assert mounts["/var/lib/drctl"].startswith("rw")
