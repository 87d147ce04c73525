"""`drctl drill` against a real deployment (etcd, named, two site agents running their data
paths, a controller): the drill clones the service's current replica, runs the runbook's
checks on the clone under a test DNS name, reports the RPO and step times and cleans up while
replication goes on; after a failover it drills the other site (roles from etcd, not from the
runbook)."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator

import pytest

from tests.integration.test_lifecycle import Cluster, wait_protected
from tests.procs import DRCTL, pki, run, same_file, wait_for
from tests.services import EtcdServer, NamedServer


@pytest.fixture
def cluster(workdir: str) -> Iterator[Cluster]:
    etcd, named = EtcdServer().start(), NamedServer().start()
    c = Cluster(workdir, etcd, named, steps=[
        {"type": "promote"},
        {"type": "hook", "name": "keep a copy", "at": "new_primary",
         "run": f"[ \"$DRCTL_DRILL\" != 1 ] || cp $DRCTL_CLONES {workdir}/clone-copy.img"},
        {"type": "health_check", "name": "clone is readable",
         "command": "for c in $DRCTL_CLONES; do test -s $c || exit 1; done",
         "retries": 2, "interval": 0.2},
        {"type": "dns"}])
    try:
        c.start()
        yield c
    finally:
        c.stop()
        named.stop()
        etcd.stop()


def drill(c: Cluster, name: str, *flags: str) -> dict[str, object]:
    """An operator's certificate from the environment (docs/security.md), or ``flags``."""
    p = run([*DRCTL, "drill", "app", "--runbook", c.config, "--name", name, "--json", *flags],
            env={} if flags else pki().env())
    assert p.returncode == 0, p.stdout + p.stderr
    report: dict[str, object] = json.loads(p.stdout)
    return report


def test_drill_clones_the_current_replica_checks_reports_and_cleans_up(cluster: Cluster
                                                                       ) -> None:
    c = cluster
    wait_protected(c, "east")
    wait_for(lambda: c.status()["lag_seconds"] == 0, 30, "lag 0")
    report = drill(c, "t1")
    assert report["ok"] is True and report["standby"] == "west", report
    assert [s["name"] for s in report["steps"]] == [  # type: ignore[union-attr,index]
        "clone", "hook: keep a copy", "health check: clone is readable", "dns: test name",
        "cleanup"]
    assert report["achieved_rpo_seconds"] is not None
    clone = report["clones"][0]  # type: ignore[index]
    assert not os.path.exists(clone["path"])  # cleaned up
    assert same_file(os.path.join(c.workdir, "clone-copy.img"), c.path("east"))
    answer = subprocess.run(["dig", "+short", "-p", str(c.named.port), "@127.0.0.1",
                             "app-t1.dr.test", "A"], capture_output=True, text=True).stdout
    assert answer.strip() == ""  # test record removed
    # after a failover the replica is east: the drill clones east, not the live primary
    p = run([*DRCTL, "failover", "app", "--config", c.config])
    assert p.returncode == 0, p.stderr
    wait_protected(c, "west")
    report = drill(c, "t2", "--tls-dir", pki().dir, "--operator", "tester")
    assert report["ok"] is True and report["standby"] == "east", report
    assert report["clones"][0]["path"].startswith(c.data("east"))  # type: ignore[index]
    assert c.status()["primary"] == "west"  # production untouched


def test_a_drill_that_cannot_reach_the_target_fails_at_once(cluster: Cluster) -> None:
    """Without a certificate, against a TLS target: the clone step fails at once (a TLS
    handshake answered, not a plaintext connection tried for its 10 s), saying why and what
    to give, nothing cloned."""
    c = cluster
    wait_protected(c, "east")
    p = run([*DRCTL, "drill", "app", "--runbook", c.config, "--name", "t3", "--json"],
            env={"DRCTL_TLS_DIR": "", "DRCTL_TLS_AS": ""}, timeout=60)
    assert p.returncode == 1, p.stdout + p.stderr
    report = json.loads(p.stdout)
    clone = report["steps"][0]
    assert (clone["name"], clone["ok"]) == ("clone", False), report
    assert "speaks TLS and the drill has no certificate" in clone["detail"], clone
    assert "--tls-dir DIR --operator NAME" in clone["detail"], clone
    assert [s["name"] for s in report["steps"]] == ["clone", "cleanup"], report
    assert report["clones"] == [] and report["achieved_rpo_seconds"] is None, report
    # the flags go together
    for flags, said in ((["--operator", "tester"], "give --tls-dir DIR (or set $DRCTL_TLS_DIR)"),
                        (["--tls-dir", pki().dir], "--tls-dir needs --operator NAME")):
        q = run([*DRCTL, "drill", "app", "--runbook", c.config, *flags],
                env={"DRCTL_TLS_DIR": ""})
        assert q.returncode == 2 and said in q.stderr, q.stderr
        assert len(q.stderr.strip().splitlines()) == 1, q.stderr
