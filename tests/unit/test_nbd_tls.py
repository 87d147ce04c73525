"""Who may attach to a TLS export, and how a runbook's ``replication.export_tls`` reaches the
capture agent (tests/integration/test_nbd_tls.py runs real clients against it)."""

from __future__ import annotations

import os

import pytest

from drctl.pki import Identity
from replicator.capture.nbdtls import ExportTls
from replicator.errors import UsageError
from replicator.transport.security import TlsConfig
from runbooks.loader import load
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


def test_the_own_site_and_operators_may_attach_other_sites_may_not() -> None:
    tls = ExportTls(TlsConfig.from_dir(pki().dir, Identity("site", "east")))
    assert tls.refusal(Identity("site", "east")) is None
    assert tls.refusal(Identity("operator", "tester")) is None
    assert tls.refusal(Identity("site", "west")) == (
        "site west may not attach to site east's export (its own site and operators may)")
    assert tls.refusal(None) is not None


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
