"""`drctl drill` against real processes: a replication pair, a named; replication goes on."""

from __future__ import annotations

import json
import os
import subprocess

from tests.procs import (
    DRCTL,
    Proc,
    Target,
    free_port,
    port_open,
    push_cmd,
    run,
    same_file,
    wait_for,
    write_random,
)
from tests.services import NamedServer


def test_drill_clones_checks_reports_and_cleans_up(workdir: str, target: Target) -> None:
    named = NamedServer().start()
    src = os.path.join(workdir, "db.img")
    write_random(src, 4 << 20, seed=51)
    mport = free_port()
    agent = Proc(push_cmd(src, target, "db-data", os.path.join(workdir, "st"), "--interval",
                          "0.2", "--metrics-port", str(mport)),
                 os.path.join(workdir, "agent.log")).start()
    key = os.path.join(workdir, "tsig.key")
    with open(key, "w") as fh:
        fh.write(f'key "{named.key_name}" {{ algorithm hmac-sha256; secret "{named.secret}"; }};')
    copy = os.path.join(workdir, "clone-copy.img")
    runbook = {
        "kind": "drctl-runbook", "version": 1, "cluster": "d", "etcd": ["127.0.0.1:1"],
        "sites": {
            "east": {"address": "10.0.0.1",
                     "endpoints": {"source_metrics": f"http://127.0.0.1:{mport}/metrics"}},
            "west": {"address": "10.0.0.2", "endpoints": {"replication": target.address}}},
        "dns": {"zones": {"dr.test": {"servers": [f"127.0.0.1:{named.port}"],
                                      "tsig": {"name": named.key_name, "file": key}}}},
        "services": {"db": {
            "primary": "east", "replica": "west",
            "volumes": [{"name": "db-data", "path": src}],
            "dns": [{"zone": "dr.test", "name": "db", "ttl": 5}],
            "steps": [
                {"type": "promote"},
                {"type": "hook", "name": "keep a copy", "at": "new_primary",
                 "run": f"cp $DRCTL_CLONES {copy} && test \"$DRCTL_DRILL\" = 1"},
                {"type": "health_check", "name": "clone is readable",
                 "command": "for c in $DRCTL_CLONES; do test -s $c || exit 1; done",
                 "retries": 2, "interval": 0.2},
                {"type": "dns"}]}},
    }
    path = os.path.join(workdir, "runbook.yaml")
    with open(path, "w") as fh:
        json.dump(runbook, fh)
    try:
        wait_for(lambda: port_open(mport) and os.path.exists(target.image("db-data"))
                 and same_file(src, target.image("db-data")), 30, "initial sync")
        p = run([*DRCTL, "drill", "db", "--runbook", path, "--name", "t1", "--json"])
        assert p.returncode == 0, p.stdout + p.stderr
        report = json.loads(p.stdout)
        assert report["ok"] is True
        assert [s["name"] for s in report["steps"]] == [
            "clone", "hook: keep a copy", "health check: clone is readable", "dns: test name",
            "cleanup"]
        assert all(s["ok"] for s in report["steps"])
        assert report["achieved_rpo_seconds"] is not None
        assert report["clones"][0]["method"] in ("reflink", "copy")
        assert report["rto_seconds"] > 0
        assert same_file(copy, src)  # the clone was the replica, which equalled the source
        assert not os.path.exists(report["clones"][0]["path"])  # cleaned up
        answer = subprocess.run(["dig", "+short", "-p", str(named.port), "@127.0.0.1",
                                 "db-t1.dr.test", "A"], capture_output=True, text=True).stdout
        assert answer.strip() == ""  # test record removed
        with open(src, "r+b") as fh:  # replication went on
            fh.write(b"after the drill")
        wait_for(lambda: same_file(src, target.image("db-data")), 20, "replication after drill")
        assert agent.popen is not None and agent.popen.poll() is None
    finally:
        agent.stop()
        named.stop()
