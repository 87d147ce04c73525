"""The exact steps a failover (or switchover) of a service runs, dependencies first, then the
data path the site agents run for those services (sites/dataplane.py)."""

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
    lines = [f"[{svc.name}] consistency group {svc.group}: {mode}, {rate}, {level}, "
             f"{cuts}, journal {_bytes(svc.journal_limit)}"]
    for role in ("primary", "replica"):
        name = getattr(svc, role)
        site = rb.sites[name]
        vols = ", ".join(f"{v.name} {volume_path(v.path, name)}" for v in svc.volumes)
        lines.append(f"[{svc.name}] {name} ({role}): data_dir {site.data_dir}, target "
                     f"{site.endpoints.get('replication')}, export {svc.export.get(name)}; "
                     f"{vols}")
    return lines


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
    paths = [f"  {line}" for name in order(rb, service)
             for line in data_path(rb, rb.services[name])]
    return [f"{i}. {line}" for i, line in enumerate(lines, 1)] + [
        "data path (what the site agents run):", *paths]
