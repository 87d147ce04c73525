"""The compose deployment cannot run here (no Docker engine): check what can be checked."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest
import yaml

from failover.config import ConfigError, load

COMPOSE = os.path.join(os.path.dirname(__file__), "..", "..", "compose")


def test_compose_file_references_existing_files() -> None:
    with open(os.path.join(COMPOSE, "docker-compose.yml")) as fh:
        doc = yaml.safe_load(fh)
    assert set(doc["services"]) >= {"etcd", "bind", "prometheus", "grafana", "site-east",
                                    "site-west", "controller"}
    for svc in doc["services"].values():
        for vol in svc.get("volumes", []):
            src = vol.split(":")[0]
            if src.startswith(".") and not src.endswith("tsig.key"):
                assert os.path.exists(os.path.join(COMPOSE, src)), src


def test_compose_cluster_config_is_valid_but_for_the_secret() -> None:
    # the TSIG key file is generated at deploy time and never committed
    with pytest.raises(ConfigError, match=r"cluster\.yaml:\d+: services\.app-data\.dns\.tsig: "
                                          r"TSIG key file /etc/drctl/tsig\.key"):
        load(os.path.join(COMPOSE, "drctl", "cluster.yaml"))


def test_compose_bind_zone_is_valid() -> None:
    checkzone = shutil.which("named-checkzone")
    if checkzone is None:
        pytest.skip("named-checkzone not installed")
    r = subprocess.run([checkzone, "dr.test", os.path.join(COMPOSE, "bind", "dr.test.zone")],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout
