"""`drctl runbook convert CLUSTER.yaml`: the runbook that does what a cluster.yaml does.

A cluster.yaml (failover/config.py) is the older, smaller configuration: sites, services with
a policy, one DNS record and four hooks. Every daemon still reads it, and runs it as this
runbook: the hooks become the steps of every operation, where the agents ran them (fence and
stop at the old primary, promote, then promote and start at the new primary, then dns; 60 s
each), the policy becomes ``failover:`` and ``replication.rpo``, the record's zone with its
servers and key becomes ``dns.zones``. One difference stays: a cluster.yaml's ``start`` hook
also runs when an agent starts as the primary; a runbook's new_primary hooks run when a site
takes over (and when a cancelled operation hands the service back).
"""

from __future__ import annotations

from typing import Any

import yaml

from drctl.yamlstrict import load_yaml
from failover.config import HOOK_TIMEOUT, ConfigError
from failover.config import load as load_cluster
from runbooks.loader import KIND

_HOOKS = (("fence", "old_primary"), ("stop", "old_primary"), ("promote", "new_primary"),
          ("start", "new_primary"))


def _load_cluster(path: str) -> Any:
    """The cluster.yaml's own loader, after refusing a file that is a runbook already (its
    first error would be an unknown key, ``kind``)."""
    try:
        raw = load_yaml(path)
    except (OSError, ValueError, yaml.YAMLError):  # its loader reports it, as the daemons do
        raw = None
    if isinstance(raw, dict) and raw.get("kind") == KIND:
        line = getattr(raw, "lines", {}).get("kind", 1)
        raise ConfigError(f"{path}:{line}: already a runbook (kind: {KIND}): convert reads a "
                          "cluster.yaml; drctl runbook validate checks a runbook")
    return load_cluster(path)


def convert(path: str) -> dict[str, Any]:
    """The runbook for the cluster.yaml at ``path`` (validated by its own loader first: its
    errors are reported as the daemons would)."""
    cfg = _load_cluster(path)
    raw = load_yaml(path)
    sites = {}
    for name, s in raw["sites"].items():
        endpoints = {k: s[src] for k, src in (("health", "health_url"),
                                               ("replication", "replication")) if src in s}
        sites[name] = {"address": s["address"], **({"endpoints": endpoints} if endpoints
                                                   else {})}
    zones: dict[str, Any] = {}
    services = {}
    for name, node in (raw.get("services") or {}).items():
        svc = cfg.services[name]
        p = svc.policy
        out: dict[str, Any] = {
            "primary": svc.primary, "replica": svc.replica,
            "replication": {"rpo": p.rpo_seconds},
            "failover": {"automatic": p.automatic, "grace": p.grace_seconds,
                         "damping": p.damping_seconds, "allow_data_loss": p.allow_data_loss,
                         "drain_timeout": p.drain_timeout_seconds}}
        hooks = node.get("hooks") or {}
        steps: list[dict[str, Any]] = [
            {"type": "hook", "name": h, "at": at, "run": hooks[h], "timeout": HOOK_TIMEOUT}
            for h, at in _HOOKS[:2] if h in hooks]
        steps.append({"type": "promote"})
        steps += [{"type": "hook", "name": h, "at": at, "run": hooks[h], "timeout": HOOK_TIMEOUT}
                  for h, at in _HOOKS[2:] if h in hooks]
        if "dns" in node:
            d = node["dns"]
            zone = {"servers": list(d["servers"]), "update": list(d.get("update",
                                                                        d["servers"])),
                    "tsig": dict(d["tsig"]), "verify_timeout": d.get("verify_timeout", 10)}
            if zones.setdefault(d["zone"], zone) != zone:
                raise ConfigError(f"{path}: services.{name}.dns: zone {d['zone']} is given "
                                   "other servers or another key by another service; a "
                                   "runbook declares each zone once")
            out["dns"] = [{"zone": d["zone"], "name": d["name"], "type": d.get("type", "A"),
                           "ttl": int(d.get("ttl", 30))}]
            steps.append({"type": "dns"})
        out["steps"] = steps
        services[name] = out
    doc: dict[str, Any] = {"kind": KIND, "version": 1, "cluster": cfg.cluster,
                           "etcd": raw["etcd"], "lease_ttl": cfg.lease_ttl, "sites": sites}
    if zones:
        doc["dns"] = {"zones": zones}
    doc["services"] = services
    return doc


def to_yaml(doc: dict[str, Any], source: str) -> str:
    head = (f"# converted from {source} by `drctl runbook convert`: the same operations, as "
            "runbook steps\n# (a cluster.yaml's start hook also ran when an agent started as "
            "the primary;\n# a runbook's new_primary hooks run when a site takes over)\n")
    return head + yaml.safe_dump(_plain(doc), sort_keys=False, default_flow_style=False)


def _plain(value: Any) -> Any:
    """The document as plain dicts and lists (the strict loader's types dumped as such)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value
