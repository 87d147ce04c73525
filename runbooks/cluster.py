"""A runbook as the failover daemons' cluster configuration (`--config runbook.yaml`).

Hooks come from the steps: ``at: old_primary`` hooks become the site's fence hook, and the
promote hook is the ``at: new_primary`` hooks, then the health checks (``drctl runbook
check``), so a promotion only reports success once the service answers. The volumes' data path
(promotion, demotion, replication) is run by the site agents themselves (sites/).
"""

from __future__ import annotations

import shlex
import sys

from failover.config import ClusterConfig, ConfigError, DnsConfig, Hooks, ServiceConfig, Site
from failover.coordination.credentials import CredentialsError
from failover.dns.rfc2136 import RecordSet, Server, TsigKey
from failover.errors import FailoverError
from failover.fsm import Policy
from runbooks.model import Runbook, Service, StepType, Where, Zone


def _hooks(rb: Runbook, svc: Service) -> Hooks:
    fence = [s.run for s in svc.steps if s.type is StepType.HOOK and s.on is Where.OLD_PRIMARY
             and s.run]
    # Promoting the replica (fence at the new epoch, release as the primary volume) is the
    # site agent's own data path (sites/dataplane.py), not a hook.
    promote: list[str] = []
    promote += [s.run for s in svc.steps if s.type is StepType.HOOK
                and s.on is Where.NEW_PRIMARY and s.run]
    if any(s.type is StepType.HEALTH_CHECK for s in svc.steps):
        promote.append(" ".join(shlex.quote(a) for a in (
            sys.executable, "-m", "drctl", "runbook", "check", rb.path, svc.name)))
    return Hooks(fence=" && ".join(fence) or None, promote=" && ".join(promote) or None)


def _dns(rb: Runbook, svc: Service) -> DnsConfig | None:
    if not svc.dns:
        return None
    r = svc.dns[0]
    zone = rb.zones[r.zone]
    try:
        key = zone_key(zone)
    except FailoverError as exc:
        raise ConfigError(f"{rb.path}: dns.zones.{r.zone}.tsig: {exc}") from None
    return DnsConfig(RecordSet(r.zone, r.name, r.type, r.ttl, ()),
                     tuple(Server.parse(s) for s in zone.servers),
                     tuple(Server.parse(s) for s in zone.update), key)


def zone_key(zone: Zone) -> TsigKey:
    """The zone's TSIG key, from its key file or its environment variable."""
    if zone.tsig_file:
        return TsigKey.from_bind_file(zone.tsig_file)
    return TsigKey.from_env(zone.tsig_name, zone.tsig_env or "")


def to_cluster(rb: Runbook) -> ClusterConfig:
    services = {}
    for name, svc in rb.services.items():
        policy = Policy(automatic=svc.automatic, grace_seconds=svc.grace, rpo_seconds=svc.rpo,
                        allow_data_loss=svc.allow_data_loss, damping_seconds=svc.damping)
        services[name] = ServiceConfig(name, svc.primary, svc.replica, policy, _dns(rb, svc),
                                       _hooks(rb, svc), tuple(v.name for v in svc.volumes))
    sites = {n: Site(n, s.address, s.endpoints.get("health"), s.endpoints.get("replication"))
             for n, s in rb.sites.items()}
    etcd = tuple((h.host, h.port) for h in (Server.parse(e, 2379) for e in rb.etcd))
    try:  # the password and TLS files, read now (a password file others can read: refused)
        creds = rb.etcd_credentials.resolved()
    except CredentialsError as exc:
        raise ConfigError(f"{rb.path}: etcd.{exc.field}: {exc}") from None
    return ClusterConfig(rb.path, rb.cluster, etcd, rb.lease_ttl, sites, services,
                         etcd_credentials=creds)
