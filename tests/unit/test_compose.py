"""What can be checked of compose/ without a container engine: its files, its runbook, and that
every drctl command its services run parses. tests/integration/test_compose_podman.py runs it
(DRCTL_PODMAN=1)."""

from __future__ import annotations

import ipaddress
import os
import re
import shlex
import shutil
import subprocess
import tomllib
from typing import Any

import pytest
import yaml

from runbooks.loader import load as load_runbook

COMPOSE = os.path.join(os.path.dirname(__file__), "..", "..", "compose")


def _compose() -> dict[str, Any]:
    with open(os.path.join(COMPOSE, "docker-compose.yml")) as fh:
        doc: dict[str, Any] = yaml.safe_load(fh)
    return doc


def test_compose_file_references_existing_files() -> None:
    doc = _compose()
    assert set(doc["services"]) >= {"etcd", "bind", "prometheus", "grafana", "site-east",
                                    "site-west", "controller", "api", "certs", "tsig"}
    for svc in doc["services"].values():
        assert svc["network_mode"] == "host"  # podman here has no bridge networking
        for vol in svc.get("volumes", []):
            src = vol.split(":")[0]
            if src.startswith("."):
                assert os.path.exists(os.path.join(COMPOSE, src)), src
            else:
                assert src in doc["volumes"], src
        build = svc.get("build")
        if build:
            assert os.path.exists(os.path.join(COMPOSE, build["context"],
                                               build["dockerfile"]))


def test_compose_image_has_every_package() -> None:
    """The image installs the project as pyproject.toml packages it (runbooks/ and sites/
    were once missing from it)."""
    with open(os.path.join(COMPOSE, "..", "pyproject.toml"), "rb") as fh:
        packages = tomllib.load(fh)["tool"]["setuptools"]["packages"]["find"]["include"]
    with open(os.path.join(COMPOSE, "Dockerfile")) as fh:
        copied = set(re.findall(r"^COPY (\w+) ", fh.read(), re.M))
    assert {p.rstrip("*") for p in packages} <= copied


def test_compose_runbook_is_valid_and_names_servers_by_address() -> None:
    rb = load_runbook(os.path.join(COMPOSE, "drctl", "runbook.yaml"))
    servers = [s for z in rb.zones.values() for s in z.servers] + list(rb.etcd)
    for hostport in servers:  # dnspython needs an address: a host name fails at update time
        ipaddress.ip_address(hostport.rpartition(":")[0])
    assert {rb.sites[s].address for s in ("east", "west")} == {"10.0.0.1", "10.0.0.2"}


def _drctl_commands() -> list[tuple[str, list[str]]]:
    """(service, argv after `drctl`) of every drctl command a service runs."""
    out = []
    for name, svc in _compose()["services"].items():
        if not str(svc.get("image", "")).startswith("localhost/drctl:"):
            continue
        command = svc.get("command")
        if svc.get("entrypoint") == ["sh", "-c"]:
            for part in re.findall(r"\bdrctl ([^;&|>{}]+)", " ".join(command)):
                out.append((name, shlex.split(part)))
        else:
            out.append((name, list(command)))
    return out


def test_compose_drctl_commands_parse() -> None:
    from drctl.cli import build_parser

    commands = _drctl_commands()
    assert {n for n, _ in commands} == {"certs", "site-east", "site-west", "controller", "api"}
    for name, argv in commands:
        try:
            build_parser().parse_args(argv)
        except SystemExit as exc:
            raise AssertionError(f"{name}: drctl {' '.join(argv)}: does not parse") from exc


def test_compose_prometheus_scrapes_what_the_services_serve() -> None:
    with open(os.path.join(COMPOSE, "prometheus", "prometheus.yml")) as fh:
        prom = yaml.safe_load(fh)
    targets = {t for job in prom["scrape_configs"] for sc in job["static_configs"]
               for t in sc["targets"]}
    served = set()
    for _name, argv in _drctl_commands():
        if "--metrics-listen" in argv:
            served.add(argv[argv.index("--metrics-listen") + 1])
    etcd = " ".join(_compose()["services"]["etcd"]["command"].split())
    etcd_metrics = re.search(r"--listen-metrics-urls http://(\S+)", etcd)
    assert etcd_metrics is not None
    served.add(etcd_metrics.group(1))
    assert targets == served


def test_compose_bind_zone_is_valid() -> None:
    checkzone = shutil.which("named-checkzone")
    if checkzone is None:
        pytest.skip("named-checkzone not installed")
    r = subprocess.run([checkzone, "dr.test", os.path.join(COMPOSE, "bind", "dr.test.zone")],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout
