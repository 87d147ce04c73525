"""One status view of a cluster, built from one etcd snapshot: what `drctl status` prints and
what `GET /api/v1/status` returns (the API adds DNS answers and drills)."""

from __future__ import annotations

from typing import Any

from failover.config import ClusterConfig
from failover.coordination.base import Snapshot
from failover.records import (
    CommandRecord,
    Heartbeat,
    command_key,
    heartbeat_key,
    leader_key,
    service_record,
    state_key,
)


def cluster_status(cfg: ClusterConfig, snap: Snapshot, now: float) -> dict[str, Any]:
    sites: dict[str, Any] = {}
    for site, s in cfg.sites.items():
        raw = snap.value(heartbeat_key(cfg.prefix, site))
        hb = Heartbeat.decode(raw) if raw else None
        sites[site] = {"address": s.address, "alive": hb is not None,
                       "heartbeat_age_seconds": round(now - hb.at, 2) if hb else None}
    services: dict[str, Any] = {}
    for name, svc in cfg.services.items():
        rec = service_record(snap.value(state_key(cfg.prefix, name)), svc.primary, svc.replica)
        pending = snap.value(command_key(cfg.prefix, name))
        services[name] = {
            "state": rec.state, "primary": rec.primary, "replica": rec.replica,
            "epoch": rec.epoch, "lag_seconds": rec.last_lag_seconds,
            "rpo_budget_seconds": svc.policy.rpo_seconds, "message": rec.message,
            "error": rec.operation.error if rec.operation else None,
            "pending": CommandRecord.decode(pending).command if pending else None,
            "dns_name": f"{svc.dns.record.name}.{svc.dns.record.zone}" if svc.dns else None,
            "history": [f"{h['from']}->{h['to']}" for h in rec.history],
            "operations": [{"at": h["at"], "from": h["from"], "to": h["to"]}
                           for h in reversed(rec.history[-10:])],
        }
    leader = snap.value(leader_key(cfg.prefix))
    return {"leader": leader.decode() if leader else None, "sites": sites,
            "services": services, "at": now}
