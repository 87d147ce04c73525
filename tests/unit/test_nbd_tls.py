"""Who may attach to a TLS export, and how a runbook's ``replication.export_tls`` reaches the
capture agent (tests/integration/test_nbd_tls.py runs real clients against it)."""

from __future__ import annotations

import os

import pytest

from drctl.pki import Identity
from replicator.capture.nbdtls import ExportTls, parse_allow
from replicator.errors import UsageError
from replicator.transport.security import TlsConfig
from runbooks.loader import RunbookError, load
from runbooks.plan import plan
from sites import dataplane
from tests.procs import pki

RUNBOOK = """\
kind: drctl-runbook
version: 1
cluster: c
etcd: ["127.0.0.1:2379"]
sites:
  east: {{address: 10.0.0.1, data_dir: {d}/east, endpoints: {{replication: "127.0.0.1:7400"}}}}
  west: {{address: 10.0.0.2, data_dir: {d}/west, endpoints: {{replication: "127.0.0.1:7401"}}}}
services:
  db:
    primary: east
    replica: west
    volumes: [{{name: data, path: "{d}/{{site}}.img"}}]
    replication: {{export: "10.0.0.1:10809", export_tls: true}}
    steps: [{{type: promote}}]
"""


def test_the_own_site_and_the_operators_named_may_attach_no_one_else() -> None:
    config = TlsConfig.from_dir(pki().dir, Identity("site", "east"))
    tls = ExportTls(config)
    assert tls.refusal(Identity("site", "east")) is None
    # an operator certificate (Prometheus', the API's) is not a key to every export
    assert tls.refusal(Identity("operator", "tester")) == (
        "operator tester may not attach to site east's export (site east may)")
    assert tls.refusal(Identity("site", "west")) == (
        "site west may not attach to site east's export (site east may)")
    assert tls.refusal(None) is not None
    tls = ExportTls(config, parse_allow(["operator:tester", "operator:app-db1"]))
    assert tls.refusal(Identity("operator", "tester")) is None
    assert tls.refusal(Identity("operator", "scraper")) == (
        "operator scraper may not attach to site east's export (site east, operator app-db1, "
        "operator tester may)")
    assert tls.refusal(Identity("site", "west")) is not None
    tls = ExportTls(config, parse_allow(["operator:*"]))
    assert tls.refusal(Identity("operator", "scraper")) is None
    assert tls.refusal(Identity("site", "west")) is not None


@pytest.mark.parametrize("item", ["west", "site:west", "operator:", "operator", "tester"])
def test_nbd_allow_takes_operators_only(item: str) -> None:
    with pytest.raises(UsageError, match=r"expected operator:NAME or operator:\*"):
        parse_allow([item])


def test_an_export_needs_a_site_certificate() -> None:
    with pytest.raises(ValueError, match="needs a site certificate"):
        ExportTls(TlsConfig.from_dir(pki().dir, Identity("operator", "tester")))


def test_export_tls_in_the_runbook_gives_the_capture_agent_nbd_tls(
        tmp_path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    path = os.path.join(tmp_path, "runbook.yaml")
    with open(path, "w") as fh:
        fh.write(RUNBOOK.format(d=tmp_path))
    rb = load(path)
    with pytest.raises(UsageError, match=r"export_tls .* needs --tls-dir"):
        dataplane.SiteDataPlane(rb, "east")
    monkeypatch.setattr(dataplane.Child, "start", lambda self: None)
    plane = dataplane.SiteDataPlane(rb, "east", pki().dir)
    svc = plane.services["db"]
    svc.start_push(1)
    assert svc.push is not None
    args = svc.push.args
    assert "--nbd-tls" in args and "--insecure-nbd" not in args
    assert args[args.index("--nbd-listen") + 1] == "10.0.0.1:10809"
    assert args[args.index("--site") + 1] == "east"
    assert "--nbd-allow" not in args  # operators only when the runbook names them


def test_export_allow_in_the_runbook_names_the_operators_that_may_attach(
        tmp_path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    path = os.path.join(tmp_path, "runbook.yaml")
    with open(path, "w") as fh:
        fh.write(RUNBOOK.format(d=tmp_path).replace(
            "export_tls: true}", "export_tls: true, export_allow: [operator:app-db1, "
                                 "operator:tester]}"))
    rb = load(path)
    assert rb.services["db"].export_operators == ("app-db1", "tester")
    assert any("(TLS, operator app-db1, operator tester)" in line for line in plan(rb, "db"))
    monkeypatch.setattr(dataplane.Child, "start", lambda self: None)
    svc = dataplane.SiteDataPlane(rb, "east", pki().dir).services["db"]
    svc.start_push(1)
    assert svc.push is not None
    args = svc.push.args
    allowed = [args[i + 1] for i, a in enumerate(args) if a == "--nbd-allow"]
    assert allowed == ["operator:app-db1", "operator:tester"]


@pytest.mark.parametrize(("edit", "message"), [
    ("export_tls: true, export_allow: [west]", "'west': expected operator:NAME"),
    ("export_tls: false, export_allow: [operator:tester]", "it needs export_tls: true"),
    ("export_tls: true, export_allow: operator:tester", "expected a list of operator:NAME"),
])
def test_export_allow_is_checked(tmp_path: str, edit: str, message: str) -> None:
    path = os.path.join(tmp_path, "runbook.yaml")
    with open(path, "w") as fh:
        fh.write(RUNBOOK.format(d=tmp_path).replace("export_tls: true", edit))
    with pytest.raises(RunbookError) as info:
        load(path)
    assert any("services.db.replication.export_allow" in e and message in e
               for e in info.value.errors), info.value.errors
