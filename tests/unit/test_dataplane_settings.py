"""The runbook's replication settings are what the site agent runs: ``replication.mode`` is
the target daemon's ``--mode`` (and ``apply_interval`` its schedule), ``rate_limit`` the
capture agent's ``--rate-limit``, with compression, cut interval, journal limit and RPO
budget (the command lines the agent's children are started with)."""

from __future__ import annotations

import os
from typing import Any

import pytest

from runbooks.loader import load
from sites import dataplane
from sites.children import Child

RUNBOOK = """\
kind: drctl-runbook
version: 1
cluster: c
etcd: ["127.0.0.1:2379"]
sites:
  a: {address: 10.0.0.1, data_dir: DIR/a, endpoints: {replication: "127.0.0.1:17400"}}
  b: {address: 10.0.0.2, data_dir: DIR/b, endpoints: {replication: "127.0.0.1:17401"}}
services:
  db:
    primary: a
    replica: b
    volumes: [{name: data, path: "DIR/{site}/db.img"}]
    replication: {mode: warm, apply_interval: 30, rate_limit: 50MB/s, compression: 5,
                  cp_interval: 2, journal_limit: 64MiB, rpo: 12, export: "127.0.0.1:10809"}
    steps: [{type: promote}]
"""


def _flag(args: list[str], name: str) -> str:
    return args[args.index(name) + 1]


def test_mode_and_rate_limit_reach_the_children(tmp_path: Any,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    d = str(tmp_path)
    path = os.path.join(d, "runbook.yaml")
    with open(path, "w") as fh:
        fh.write(RUNBOOK.replace("DIR", d))
    rb = load(path)
    started: list[list[str]] = []
    monkeypatch.setattr(Child, "start", lambda self: started.append(self.args))
    replica = dataplane.SiteDataPlane(rb, "b")
    assert _flag(replica.target.args, "--mode") == "warm"
    assert _flag(replica.target.args, "--apply-interval") == "30.0"
    primary = dataplane.SiteDataPlane(rb, "a")
    primary.services["db"].start_push(3)
    (push,) = started
    assert _flag(push, "--rate-limit") == str(50_000_000)
    assert (_flag(push, "--compress-level"), _flag(push, "--cp-interval"),
            _flag(push, "--journal-limit"), _flag(push, "--rpo-budget"),
            _flag(push, "--epoch")) == ("5", "2.0", str(64 << 20), "12.0", "3")
    assert _flag(push, "--to") == "127.0.0.1:17401"


def test_the_capture_agents_metrics_port_is_no_port_the_runbook_names(
        tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """A capture agent's metrics port is picked at its start, when a site's own target may be
    restarting and its configured port free: it must not take that port (a lifecycle test's
    target then found 'address already in use', and its primary's pushes reached an HTTP
    server)."""
    import itertools

    from drctl import localservers

    d = str(tmp_path)
    path = os.path.join(d, "runbook.yaml")
    with open(path, "w") as fh:
        fh.write(RUNBOOK.replace("DIR", d))
    rb = load(path)
    assert dataplane.named_ports(rb) == {17400, 17401, 10809}
    started: list[list[str]] = []
    monkeypatch.setattr(Child, "start", lambda self: started.append(self.args))
    # the search starts at 17400 (both replication endpoints, unused now): both are passed
    monkeypatch.setattr(localservers, "_searched", itertools.count(17400 - 10000))
    dataplane.SiteDataPlane(rb, "a").services["db"].start_push(3)
    (push,) = started
    assert int(_flag(push, "--metrics-port")) not in {17400, 17401, 10809}
