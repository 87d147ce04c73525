"""`drctl runbook convert`: the runbook written for a cluster.yaml configures the daemons
exactly as the cluster.yaml does (the same steps, policy, DNS, sites)."""

from __future__ import annotations

import json
import os
from typing import Any

from failover.config import load as load_cluster
from runbooks.cluster import to_cluster
from runbooks.loader import load
from tests.procs import DRCTL, run


def test_a_converted_cluster_yaml_runs_the_same(tmp_path: Any) -> None:
    d = str(tmp_path)
    key = os.path.join(d, "tsig.key")
    with open(key, "w") as fh:
        fh.write('key "dr-updater" { algorithm hmac-sha512; secret "c2VjcmV0"; };\n')
    cluster = {
        "cluster": "t", "lease_ttl": 3, "etcd": ["127.0.0.1:2379"],
        "sites": {"east": {"address": "10.0.0.1", "health_url": "http://10.0.0.1:8080/h"},
                  "west": {"address": "10.0.0.2", "replication": "10.0.0.2:7400"}},
        "services": {
            "app": {"primary": "east", "replica": "west",
                    "policy": {"automatic": False, "grace": 3, "rpo": 20, "damping": 60,
                               "allow_data_loss": True, "drain_timeout": 45},
                    "hooks": {"fence": "echo f", "stop": "echo s", "promote": "echo p",
                              "start": "echo st"},
                    "dns": {"zone": "dr.test", "name": "app", "ttl": 5, "type": "A",
                            "servers": ["127.0.0.1:5353"], "update": ["127.0.0.1:5354"],
                            "tsig": {"name": "dr-updater", "file": key},
                            "verify_timeout": 4}},
            "batch": {"primary": "west", "replica": "east", "hooks": {"promote": "echo b"}}}}
    path = os.path.join(d, "cluster.yaml")
    with open(path, "w") as fh:
        json.dump(cluster, fh)
    p = run([*DRCTL, "runbook", "convert", path])
    assert p.returncode == 0, p.stderr
    converted = os.path.join(d, "runbook.yaml")
    with open(converted, "w") as fh:
        fh.write(p.stdout)
    assert run([*DRCTL, "runbook", "validate", converted]).returncode == 0
    old, new = load_cluster(path), to_cluster(load(converted))
    assert (new.cluster, new.etcd, new.lease_ttl, new.sites) == (old.cluster, old.etcd,
                                                                old.lease_ttl, old.sites)
    for name, was in old.services.items():
        now = new.services[name]
        assert now.steps == was.steps, name
        assert now.policy == was.policy, name
        assert now.dns == was.dns, name
        assert (now.primary, now.replica) == (was.primary, was.replica)
        # outside an operation: the same hooks, in the same order (start ran at start-up too)
        assert (*now.hooks.fence, *now.hooks.stop) == (*was.hooks.fence, *was.hooks.stop)
        assert (*now.hooks.promote, *now.hooks.start) == (*was.hooks.promote,
                                                          *was.hooks.start)
    assert [s.name for s in new.services["app"].steps] == ["fence", "stop", "promote",
                                                           "promote", "start", "dns"]
