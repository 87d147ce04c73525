"""The exact steps a failover (or switchover) of a service runs, dependencies first."""

from __future__ import annotations

from runbooks.model import Runbook, Service, Step, StepType, Where


def order(rb: Runbook, service: str) -> list[str]:
    """``service`` and everything it depends on, dependencies first (a database before its
    app)."""
    out: list[str] = []

    def visit(name: str) -> None:
        if name in out:
            return
        for dep in rb.services[name].depends_on:
            visit(dep)
        out.append(name)

    visit(service)
    return out


def _site(svc: Service, where: Where) -> str:
    return {Where.OLD_PRIMARY: svc.primary, Where.NEW_PRIMARY: svc.replica,
            Where.CONTROLLER: "the controller"}[where]


def describe(rb: Runbook, svc: Service, step: Step) -> str:
    vols = ", ".join(v.name for v in svc.volumes) or "(no volumes)"
    if step.type is StepType.PRECHECK:
        if step.check == "replication_lag":
            return (f"precheck {step.name}: replication lag of {vols} within the "
                    f"{svc.rpo:g}s RPO budget" + (" (data loss allowed)"
                                                   if svc.allow_data_loss else ""))
        return f"precheck {step.name}: {svc.replica} reachable"
    if step.type is StepType.HOOK:
        return (f"hook {step.name} on {_site(svc, step.on)}: `{step.run}` "
                f"(timeout {step.timeout:g}s)")
    if step.type is StepType.WAIT_REPLICATION:
        return f"wait until {vols} have zero lag (timeout {step.timeout:g}s)"
    if step.type is StepType.PROMOTE:
        groups = sorted({v.group for v in svc.volumes if v.group})
        g = f", consistency groups {', '.join(groups)}" if groups else ""
        warm = "; apply the warm journal first" if svc.mode == "warm" else ""
        return (f"promote: bump the epoch (replicas refuse {svc.primary}'s older epoch), "
                f"{svc.replica} becomes primary of {vols}{g}{warm}")
    if step.type is StepType.HEALTH_CHECK:
        probe = (f"GET {step.http}" if step.http else f"connect {step.tcp}" if step.tcp
                 else f"`{step.command}`")
        return (f"health check {step.name}: {probe}, timeout {step.timeout:g}s, "
                f"{step.retries} retries every {step.interval:g}s")
    lines = []
    address = rb.sites[svc.replica].address
    for r in svc.dns:
        zone = rb.zones[r.zone]
        lines.append(f"dns: {r.name}.{r.zone} {r.type} -> {address} (TTL {r.ttl}s), signed "
                     f"with TSIG key {zone.tsig_name}, sent to {', '.join(zone.update)}, "
                     f"verified on {', '.join(zone.servers)}")
    return "; ".join(lines) or "dns: (no records)"


def plan(rb: Runbook, service: str, switchover: bool = False) -> list[str]:
    lines = []
    for name in order(rb, service):
        svc = rb.services[name]
        steps = list(svc.steps)
        if switchover and not any(s.type is StepType.WAIT_REPLICATION for s in steps):
            lines.append(f"[{name}] wait until every volume has zero lag (switchover: no data "
                         "loss)")
        for step in steps:
            if step.type is StepType.WAIT_REPLICATION and not switchover:
                continue
            lines.append(f"[{name}] {describe(rb, svc, step)}")
    return [f"{i}. {line}" for i, line in enumerate(lines, 1)]
