"""`drctl drill SERVICE`: bring up the replica as a writable copy-on-write clone at the standby
site under a test DNS name, run the service's health checks against it, report the achieved
RPO and each step's duration (their sum, ``rto_seconds``, is the standby's part of an RTO: a
drill does not detect a failure or fence a primary), clean up, while replication goes on
untouched (no epoch, no service record, no production DNS record is changed).

Run it on the standby site: hooks (``at: new_primary``) run locally with DRCTL_DRILL=1 and
DRCTL_CLONES (the clone paths, space-separated).
"""

from __future__ import annotations

import functools
import json
import time
import uuid
from collections.abc import Callable, Coroutine
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

from drctl.shell import run_shell
from drctl.words import count
from failover.agent import scrape_lag
from failover.dns.rfc2136 import DnsUpdater, RecordSet, Server
from failover.steprun import failed_attempts, health_check
from runbooks.cluster import zone_key
from runbooks.model import Runbook, Service, Step, StepType, Where

if TYPE_CHECKING:
    from replicator.transport.security import ChannelSecurity


@dataclass
class StepResult:
    name: str
    seconds: float
    ok: bool
    detail: str = ""


@dataclass
class DrillReport:
    service: str
    drill: str
    standby: str
    achieved_rpo_seconds: float | None
    clones: list[dict[str, object]] = field(default_factory=list)
    steps: list[StepResult] = field(default_factory=list)
    ok: bool = False

    @property
    def rto_seconds(self) -> float:
        return round(sum(s.seconds for s in self.steps if s.name != "cleanup"), 3)

    def to_json(self) -> str:
        return json.dumps({**asdict(self), "rto_seconds": self.rto_seconds}, indent=1)


async def _health(step: Step, env: dict[str, str],
                  retrying: Callable[[str], None] | None = None) -> str:
    """The health check with its retries, as the new primary's agent runs it."""
    return await health_check(step.spec(), env, retrying)


async def _hook(step: Step, env: dict[str, str]) -> str:
    await run_shell(step.run or "true", env, step.timeout)
    return "ok"


@dataclass(frozen=True)
class Roles:
    """Where a service stands now (from its record in etcd): the drill clones the replica
    the service has today, not the one the runbook started with."""

    primary: str
    replica: str
    lag_seconds: float | None


async def current_roles(rb: Runbook, service: str) -> Roles:
    """The service's current primary and replica from etcd (the runbook's if no record yet)."""
    from failover.coordination.etcd import EtcdStore
    from failover.dns.rfc2136 import Server as HostPort
    from failover.records import service_record, state_key

    svc = rb.services[service]
    store = EtcdStore([(h.host, h.port) for h in (HostPort.parse(e, 2379) for e in rb.etcd)],
                      timeout=max(1.0, rb.lease_ttl / 2), credentials=rb.etcd_credentials)
    prefix = f"/drctl/{rb.cluster}/"
    try:
        raw = (await store.snapshot(prefix + "services/")).value(state_key(prefix, service))
    finally:
        await store.close()
    rec = service_record(raw, svc.primary, svc.replica)
    return Roles(rec.primary, rec.replica, rec.last_lag_seconds)


CONNECT_SECONDS = 10.0  # the standby's target answers within this, or the drill fails


class Drill:
    def __init__(self, rb: Runbook, service: str, name: str | None,
                 roles: Roles | None = None, security: ChannelSecurity | None = None) -> None:
        from replicator.transport.client import TargetClient

        self.rb = rb
        self.svc: Service = rb.services[service]
        roles = roles or Roles(self.svc.primary, self.svc.replica, None)
        self.standby = rb.sites[roles.replica]
        target = self.standby.endpoints.get("replication")
        if not target:
            raise RuntimeError(f"sites.{self.standby.name}.endpoints.replication is not set: "
                               "the drill needs the standby's replication target")
        self.client = TargetClient(target, security)
        self.volumes = [v.name for v in self.svc.volumes]
        drill = name or f"drill-{uuid.uuid4().hex[:8]}"
        metrics = rb.sites[roles.primary].endpoints.get("source_metrics")
        lag = scrape_lag(metrics, self.volumes) if metrics else roles.lag_seconds
        self.report = DrillReport(service, drill, self.standby.name, lag)
        self.dns_done: list[tuple[DnsUpdater, RecordSet, list[Server]]] = []

    async def timed(self, label: str, coro: Coroutine[object, object, str]) -> bool:
        t0 = time.perf_counter()
        try:
            detail = await coro
            ok, text = True, detail
        except Exception as exc:  # drctl's own errors by their code, others by their type
            code = getattr(exc, "code", None)
            ok, text = False, f"[{code}] {exc}" if isinstance(code, str) else \
                failed_attempts(str(exc)) if isinstance(exc, RuntimeError) else \
                f"{type(exc).__name__}: {exc}"
        self.report.steps.append(StepResult(label, round(time.perf_counter() - t0, 3), ok, text))
        return ok

    async def clone_all(self) -> str:
        from replicator.errors import TargetUnavailableError
        from replicator.transport.tlsprobe import speaks_tls

        started = time.monotonic()  # the probe counts in the connect budget
        if self.client.security.tls is None and await speaks_tls(self.client.address):
            raise TargetUnavailableError(
                f"target {self.client.address} speaks TLS and the drill has no certificate: "
                "give --tls-dir DIR --operator NAME (or $DRCTL_TLS_DIR and $DRCTL_TLS_AS)")
        left = round(max(1.0, CONNECT_SECONDS - (time.monotonic() - started)), 1)
        try:  # an unreachable target is a failed drill now, not a clone that waits for it
            await self.client.connect(left)
        except TargetUnavailableError as exc:
            if self.client.security.tls is None and "refused" not in str(exc).lower():
                raise TargetUnavailableError(
                    f"{exc}; the drill called it in plaintext: a target with TLS needs "
                    "--tls-dir DIR --operator NAME (or $DRCTL_TLS_DIR and $DRCTL_TLS_AS)"
                ) from None
            raise
        for v in self.volumes:
            info = await self.client.clone(v, self.report.drill)
            self.report.clones.append({"volume": v, **asdict(info)})
        return ", ".join(f"{c['volume']}@{c['applied_seq']} ({c['method']})"
                         for c in self.report.clones)

    async def dns_test(self) -> str:
        names = []
        for r in self.svc.dns:
            zone = self.rb.zones[r.zone]
            up = DnsUpdater(zone_key(zone))
            rr = RecordSet(r.zone, f"{r.name}-{self.report.drill}", r.type, r.ttl,
                           (self.standby.address,))
            servers = [Server.parse(s) for s in zone.update]
            await up.replace(rr, servers)
            self.dns_done.append((up, rr, servers))
            await up.verify(rr, [Server.parse(s) for s in zone.servers], deadline=10)
            names.append(f"{rr.name}.{r.zone} -> {self.standby.address}")
        return "; ".join(names) or "no DNS records"

    async def cleanup(self) -> str:
        for up, rr, servers in self.dns_done:
            await up.delete(rr, servers)
        for c in self.report.clones:
            await self.client.drop_clone(str(c["volume"]), self.report.drill)
        return (f"{count(len(self.report.clones), 'clone')} dropped, "
                f"{count(len(self.dns_done), 'test record')} removed")

    async def run(self) -> DrillReport:
        try:
            ok = await self.timed("clone", self.clone_all())
            if not self.report.clones:  # nothing cloned: no point in time was achieved
                self.report.achieved_rpo_seconds = None
            env = {"DRCTL_DRILL": "1", "DRCTL_SERVICE": self.svc.name,
                   "DRCTL_SITE": self.standby.name,
                   "DRCTL_SITE_ADDRESS": self.standby.address,
                   "DRCTL_CLONES": " ".join(str(c["path"]) for c in self.report.clones)}
            for step in self.svc.steps:
                if not ok:
                    break
                if step.type is StepType.HOOK and step.on is Where.NEW_PRIMARY:
                    ok = await self.timed(f"hook: {step.name}", _hook(step, env))
                elif step.type is StepType.HEALTH_CHECK:
                    ok = await self.timed(f"health check: {step.name}", _health(step, env))
            if ok:
                ok = await self.timed("dns: test name", self.dns_test())
            self.report.ok = ok
        finally:
            await self.timed("cleanup", self.cleanup())
            await self.client.close()
        return self.report


async def run_health_checks(svc: Service, env: dict[str, str],
                            retrying: Callable[[str, str], None] | None = None
                            ) -> list[StepResult]:
    """Every health check of the service, in order, stopping at the first failure;
    ``retrying(check, what)``: told of each failed attempt another follows."""
    out = []
    for step in svc.steps:
        if step.type is not StepType.HEALTH_CHECK:
            continue
        t0 = time.perf_counter()
        told = None if retrying is None else functools.partial(retrying, step.name)
        try:
            detail, ok = await _health(step, env, told), True
        except (OSError, RuntimeError, TimeoutError) as exc:
            detail, ok = failed_attempts(str(exc)), False
        out.append(StepResult(f"health check: {step.name}",
                              round(time.perf_counter() - t0, 3), ok, detail))
        if not ok:
            break
    return out


async def run_drill(rb: Runbook, service: str, name: str | None = None,
                    security: ChannelSecurity | None = None) -> DrillReport:
    """A drill of the service's replica as the service stands now (roles from etcd);
    ``security``: how to reach its target (default: $DRCTL_TLS_DIR and $DRCTL_TLS_AS)."""
    roles = await current_roles(rb, service)
    return await Drill(rb, service, name, roles, security).run()
