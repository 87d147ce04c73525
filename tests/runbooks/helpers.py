"""Runbook text shared by the tests that load one."""

from __future__ import annotations

# The first lines of a small valid runbook: two sites, a and b (line 5), and a service db
# whose primary is a and replica b (lines 7-9); a test adds the rest of db (its steps, at
# the least) from line 10 on.
TWO_SITES_DB = """\
kind: drctl-runbook
version: 1
cluster: c
etcd: ["127.0.0.1:2379"]
sites: {a: {address: 10.0.0.1}, b: {address: 10.0.0.2}}
services:
  db:
    primary: a
    replica: b
"""
