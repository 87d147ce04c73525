"""The exact steps a failover (or switchover) of a service runs, dependencies first, then the
data path the site agents run for those services (sites/dataplane.py)."""

from __future__ import annotations

from failover.steps import Owner, Planned, StepKind, operation_plan
from runbooks.cluster import step_specs
from runbooks.model import Runbook, Service


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


def _site(svc: Service, owner: Owner) -> str:
    return {Owner.OLD_PRIMARY: svc.primary, Owner.NEW_PRIMARY: svc.replica,
            Owner.CONTROLLER: "the controller"}[owner]


def describe(rb: Runbook, svc: Service, step: Planned, switchover: bool = False) -> str:
    """One step of the operation, as it runs (who runs it, what it waits for, its timeout)."""
    spec = step.spec
    vols = ", ".join(v.name for v in svc.volumes) or "(no volumes)"
    if spec.kind is StepKind.PRECHECK:
        if spec.check == "replication_lag":
            return (f"precheck {spec.name} (controller): replication lag of {vols} within the "
                    f"{svc.rpo:g}s RPO budget" + (" (data loss allowed)" if svc.allow_data_loss
                                                   else " (failover --force accepts more)"))
        sites = svc.replica + (f" and {svc.primary}" if switchover else "")
        return f"precheck {spec.name} (controller): {sites} alive (a heartbeat in etcd)"
    if spec.kind is StepKind.HOOK:
        gone = (f"; skipped if {svc.primary} is gone (an agent that loses its lease runs its "
                "fence hooks itself)" if spec.owner is Owner.OLD_PRIMARY else "")
        return (f"hook {spec.name} on {_site(svc, spec.owner)}: `{spec.run}` (timeout "
                f"{spec.timeout:g}s: killed past it{gone})")
    if spec.kind is StepKind.WAIT_REPLICATION:
        return (f"drain{'' if step.index is None else ' ' + spec.name} (controller): write "
                f"barrier up on {svc.primary}, wait until {vols} have zero lag (timeout "
                f"{spec.timeout:g}s: past it the switchover is abandoned)")
    if spec.kind is StepKind.FENCE:
        return (f"fence: bump the epoch (replicas refuse {svc.primary}'s older epoch); "
                f"{svc.primary} stops writing (capture agent stopped), or its heartbeat is "
                "gone and its witness agrees")
    if spec.kind is StepKind.PROMOTE:
        groups = sorted({v.group for v in svc.volumes if v.group})
        g = f", consistency groups {', '.join(groups)}" if groups else ""
        warm = "; apply the warm journal first" if svc.mode == "warm" else ""
        return f"promote on {svc.replica}: {svc.replica} becomes primary of {vols}{g}{warm}"
    if spec.kind is StepKind.HEALTH_CHECK:
        from failover.steprun import expand

        env = {"DRCTL_SITE_ADDRESS": rb.sites[svc.replica].address}  # as the new primary
        probe = (f"GET {expand(spec.http, env)}" if spec.http
                 else f"connect {expand(spec.tcp, env)}" if spec.tcp else f"`{spec.command}`")
        retries = ("no retries" if not spec.retries else "1 retry" if spec.retries == 1
                   else f"{spec.retries} retries")
        every = f" every {spec.interval:g}s" if spec.retries else ""
        return (f"health check {spec.name} on {svc.replica}: {probe}, timeout "
                f"{spec.timeout:g}s, {retries}{every}")
    lines = []
    address = rb.sites[svc.replica].address
    for r in svc.dns:
        zone = rb.zones[r.zone]
        lines.append(f"{r.name}.{r.zone} {r.type} -> {address} (TTL {r.ttl}s), signed "
                     f"with TSIG key {zone.tsig_name}, sent to {', '.join(zone.update)}, "
                     f"verified on {', '.join(zone.servers)}")
    return "dns (controller): " + "; ".join(lines)


def _bytes(n: int) -> str:
    """``n`` bytes in the unit a runbook would use (50MB, 4GiB), exact where possible."""
    for factor, unit in ((1 << 40, "TiB"), (1000**4, "TB"), (1 << 30, "GiB"), (1000**3, "GB"),
                         (1 << 20, "MiB"), (1000**2, "MB"), (1 << 10, "KiB"), (1000, "kB")):
        if n >= factor and n % factor == 0:
            return f"{n // factor}{unit}"
    return f"{n}B"


def volume_path(template: str, site: str) -> str:
    """A volume's path at ``site`` (as sites.dataplane.volume_path: ``{site}`` replaced)."""
    return template.replace("{site}", site)


def data_path(rb: Runbook, svc: Service) -> list[str]:
    """What the site agents run for ``svc``: its consistency group and replication settings,
    then per site its data directory, replication target, export and volume paths."""
    if not svc.volumes:
        return [f"[{svc.name}] no volumes: nothing to replicate"]
    mode = svc.mode
    if svc.mode == "warm":
        # The replica site's target applies on one schedule: the shortest of its services'
        intervals = [s.apply_interval for s in rb.services.values()
                     if s.apply_interval and svc.replica in (s.primary, s.replica)]
        mode += (f" (applied every {min(intervals):g}s and on promotion)" if intervals
                 else " (applied on promotion)")
    rate = f"rate limit {_bytes(svc.rate_limit)}/s" if svc.rate_limit else "no rate limit"
    level = f"zstd level {svc.compress_level}" if svc.compress_level else "no compression"
    cuts = (f"consistency point every {svc.cp_interval:g}s" if svc.cp_interval
            else "consistency points cut as soon as the previous are sent")
    scrub = (f"background verify {_bytes(svc.verify_rate)}/s" if svc.verify_rate
             else "no background verify")
    lines = [f"[{svc.name}] consistency group {svc.group}: {mode}, {rate}, {level}, "
             f"{cuts}, journal {_bytes(svc.journal_limit)}, {scrub}"]
    for role in ("primary", "replica"):
        name = getattr(svc, role)
        site = rb.sites[name]
        vols = ", ".join(f"{v.name} {volume_path(v.path, name)}" for v in svc.volumes)
        tls = (" (TLS" + "".join(f", operator {o}" for o in svc.export_operators) + ")"
               if svc.export_tls else "")
        lines.append(f"[{svc.name}] {name} ({role}): data_dir {site.data_dir}, target "
                     f"{site.endpoints.get('replication')}, export {svc.export.get(name)}{tls}; "
                     f"{vols}")
    return lines


def plan(rb: Runbook, service: str, switchover: bool = False) -> list[str]:
    """What a failover (or switchover, or failback) of ``service`` runs, in order: its
    dependencies first (each that is primary at the same site moves with it), then the
    service once they have finished; per service the steps as the daemons run them
    (failover/steps.py ``operation_plan``: what the controller records and runs)."""
    lines = []
    for name in order(rb, service):
        svc = rb.services[name]
        deps = [d for d in svc.depends_on if d in order(rb, service)]
        if deps:
            lines.append(f"[{name}] wait until {', '.join(deps)} finished (dns step done); one "
                         f"that failed stops {name}")
        for step in operation_plan(step_specs(svc), switchover, svc.drain_timeout):
            lines.append(f"[{name}] {describe(rb, svc, step, switchover)}")
    paths = [f"  {line}" for name in order(rb, service)
             for line in data_path(rb, rb.services[name])]
    return [f"{i}. {line}" for i, line in enumerate(lines, 1)] + [
        "data path (what the site agents run):", *paths]
