"""Alert rules (promtool) and every dashboard query against a real Prometheus scraping real
drctl daemons: a replication pair and a failover controller with two site agents."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator

import pytest

from tests.procs import (
    DRCTL,
    REPO,
    Proc,
    Target,
    free_port,
    port_open,
    push_cmd,
    wait_for,
    write_random,
)
from tests.services import EtcdServer, PrometheusServer

MONITORING = os.path.join(REPO, "monitoring")
DASHBOARD = os.path.join(REPO, "compose", "grafana", "dashboards", "drctl-rpo.json")


def test_alert_rules_check_and_unit_tests() -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (scripts/install-deps.sh installs prometheus)")
    check = subprocess.run([promtool, "check", "rules", "alerts.yml"], cwd=MONITORING,
                           capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    assert "SUCCESS: 9 rules found" in check.stdout
    test = subprocess.run([promtool, "test", "rules", "alerts.test.yml"], cwd=MONITORING,
                          capture_output=True, text=True)
    assert test.returncode == 0, test.stdout + test.stderr


def dashboard_queries() -> list[tuple[str, str]]:
    with open(DASHBOARD) as fh:
        dash = json.load(fh)
    return [(p["title"], t["expr"]) for p in dash["panels"] for t in p["targets"]]


@pytest.fixture
def daemons(workdir: str) -> Iterator[list[str]]:
    etcd = EtcdServer().start()
    target = Target(workdir).start()
    src = os.path.join(workdir, "vol.img")
    write_random(src, 2 << 20, seed=3)
    mport, cport = free_port(), free_port()
    agent = Proc(push_cmd(src, target, "db", os.path.join(workdir, "st"), "--interval", "0.2",
                          "--metrics-port", str(mport), "--rpo-budget", "30"),
                 os.path.join(workdir, "push.log")).start()
    cfg = os.path.join(workdir, "cluster.yaml")
    with open(cfg, "w") as fh:
        json.dump({"cluster": "m", "etcd": etcd.etcd_config(), "lease_ttl": 2,
                   "sites": {"east": {"address": "10.0.0.1"}, "west": {"address": "10.0.0.2"}},
                   "services": {"app": {"primary": "east", "replica": "west"}}}, fh)
    procs = [agent] + [
        Proc([*DRCTL, "agent", "--config", cfg, "--site", s, "--lag-url",
              f"http://127.0.0.1:{mport}/metrics"], os.path.join(workdir, f"{s}.log")).start()
        for s in ("east", "west")]
    procs.append(Proc([*DRCTL, "controller", "--config", cfg, "--metrics-port", str(cport)],
                      os.path.join(workdir, "controller.log")).start())
    try:
        wait_for(lambda: port_open(mport) and port_open(cport), 20, "metrics endpoints")
        yield [f"127.0.0.1:{mport}", f"127.0.0.1:{target.metrics_port}", f"127.0.0.1:{cport}"]
    finally:
        for p in procs:
            p.stop()
        target.stop()
        etcd.stop()


def test_every_dashboard_query_returns_data(daemons: list[str], workdir: str) -> None:
    prom = PrometheusServer(daemons, rules=os.path.join(MONITORING, "alerts.yml")).start()
    try:
        queries = dashboard_queries()
        assert len(queries) >= 13
        pending = dict.fromkeys(queries, "not evaluated yet")
        # the lag-at-acknowledgement quantiles are numbers (not NaN) only while passes are
        # acknowledged: the volume keeps changing meanwhile
        tail = [q for q in queries if "ack_lag_seconds_bucket" in q[1]]
        assert len(tail) == 2

        def all_answer() -> bool:
            for key in list(pending):
                r = prom.query(key[1])
                if r.get("status") != "success":
                    raise AssertionError(f"panel {key[0]!r}: {key[1]}: {r.get('error')}")
                result = r["data"]["result"]  # type: ignore[index]
                if result and (key not in tail or result[0]["value"][1] != "NaN"):
                    pending.pop(key)
                else:
                    pending[key] = "empty result" if not result else "NaN"
            return not pending

        deadline = time.monotonic() + 45  # Prometheus takes ~5 s to scrape a new target
        fd = os.open(os.path.join(workdir, "vol.img"), os.O_WRONLY)
        try:
            while not all_answer():
                assert time.monotonic() < deadline, f"queries with no data: {pending}"
                os.pwrite(fd, os.urandom(4096), 4096 * (int(time.monotonic()) % 512))
                time.sleep(1)
        finally:
            os.close(fd)
        rules = prom.query("ALERTS")
        assert rules.get("status") == "success"
    finally:
        prom.stop()
