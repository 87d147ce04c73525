"""A runbook as the failover daemons' cluster configuration (`--config runbook.yaml`).

The service's steps are the operation's steps (failover/steps.py): the controller runs the
prechecks, controller hooks and dns, the old primary's agent its hooks as it is fenced, the
new primary's agent the promotion of its data path (sites/), its hooks and the health checks,
in the runbook's order. Outside an operation (a site found primary where the record says
replica, a lease about to be lost, a cancelled failover handing the service back) the agents
run the same hooks as role-change hooks: ``old_primary`` ones to stop, ``new_primary`` ones
and the health checks to take over.
"""

from __future__ import annotations

from failover.config import (
    ClusterConfig,
    ConfigError,
    DnsConfig,
    Hooks,
    ServiceConfig,
    Site,
    with_step_timeouts,
)
from failover.coordination.credentials import CredentialsError
from failover.dns.rfc2136 import RecordSet, Server, TsigKey
from failover.errors import FailoverError
from failover.fsm import Policy
from failover.steps import Owner, StepKind, StepSpec
from runbooks.model import Runbook, Service, Zone


def step_specs(svc: Service) -> tuple[StepSpec, ...]:
    """The service's steps as the daemons run them, in the runbook's order."""
    return tuple(s.spec() for s in svc.steps)


def _hooks(specs: tuple[StepSpec, ...]) -> Hooks:
    """Role changes outside an operation: the same hooks and checks, by where they run."""
    return Hooks(fence=tuple(s for s in specs if s.kind is StepKind.HOOK
                             and s.owner is Owner.OLD_PRIMARY),
                 promote=tuple(s for s in specs if s.owner is Owner.NEW_PRIMARY
                               and s.kind in (StepKind.HOOK, StepKind.HEALTH_CHECK)))


def _dns(rb: Runbook, svc: Service, secrets: bool) -> tuple[DnsConfig, ...]:
    """Every record of the service (the dns step rewrites and verifies them all); ``secrets``
    false: their TSIG keys not read."""
    out = []
    for r in svc.dns:
        zone = rb.zones[r.zone]
        try:
            key = zone_key(zone) if secrets else None
        except FailoverError as exc:
            raise ConfigError(f"{rb.path}: dns.zones.{r.zone}.tsig: {exc}") from None
        out.append(DnsConfig(RecordSet(r.zone, r.name, r.type, r.ttl, ()),
                             tuple(Server.parse(s) for s in zone.servers),
                             tuple(Server.parse(s) for s in zone.update), key,
                             zone.verify_timeout))
    return tuple(out)


def zone_key(zone: Zone) -> TsigKey:
    """The zone's TSIG key, from its key file or its environment variable. A key file names
    its key and algorithm: a runbook that says otherwise is refused (the update would be
    signed with a key other than the one it names)."""
    if zone.tsig_file:
        key = TsigKey.from_bind_file(zone.tsig_file)
        if key.name != zone.tsig_name:
            raise FailoverError(f"name: {zone.tsig_name!r}, but {zone.tsig_file} holds key "
                                f"{key.name!r}")
        if zone.tsig_algorithm and key.algorithm != zone.tsig_algorithm:
            raise FailoverError(f"algorithm: {zone.tsig_algorithm}, but {zone.tsig_file} holds "
                                f"a {key.algorithm} key")
        return key
    return TsigKey.from_env(zone.tsig_name, zone.tsig_env or "",
                            zone.tsig_algorithm or "hmac-sha256")


def to_cluster(rb: Runbook, secrets: bool = True) -> ClusterConfig:
    services = {}
    for name, svc in rb.services.items():
        specs = step_specs(svc)
        policy = with_step_timeouts(Policy(
            automatic=svc.automatic, grace_seconds=svc.grace, rpo_seconds=svc.rpo,
            allow_data_loss=svc.allow_data_loss, damping_seconds=svc.damping,
            drain_timeout_seconds=svc.drain_timeout), specs)
        services[name] = ServiceConfig(name, svc.primary, svc.replica, policy,
                                       _dns(rb, svc, secrets), _hooks(specs),
                                       tuple(v.name for v in svc.volumes), specs,
                                       svc.depends_on)
    sites = {n: Site(n, s.address, s.endpoints.get("health"), s.endpoints.get("replication"))
             for n, s in rb.sites.items()}
    etcd = tuple((h.host, h.port) for h in (Server.parse(e, 2379) for e in rb.etcd))
    try:  # the password and TLS files, read now (a password file others can read: refused)
        creds = rb.etcd_credentials.resolved()
    except CredentialsError as exc:
        raise ConfigError(f"{rb.path}: etcd.{exc.field}: {exc}") from None
    return ClusterConfig(rb.path, rb.cluster, etcd, rb.lease_ttl, sites, services,
                         etcd_credentials=creds)
