"""The site agent (`drctl agent`): heartbeat lease, role changes, self-fencing.

Each tick it reads one snapshot, works out this site's role in every service from the
service records, runs the hooks for a role change (start/promote when it becomes primary,
fence when it must stop writing), and refreshes its heartbeat (role, epoch, replication lag)
under its lease. When the lease is lost (etcd unreachable past the local deadline, shorter than
the TTL) every service this site is primary of is fenced *before* the controller can promote
the replica; the agent then registers again and follows the records.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import urllib.request
from dataclasses import dataclass

from failover.audit import AuditLog
from failover.config import ClusterConfig, ServiceConfig
from failover.coordination.base import CoordinationStore, Snapshot
from failover.coordination.feed import ChangeFeed
from failover.errors import LeaseLostError, StoreUnavailableError
from failover.fsm import State
from failover.hooks import run_hook
from failover.lease import LeaseKeeper
from failover.records import (
    Heartbeat,
    ServiceHealth,
    ServiceRecord,
    audit_prefix,
    heartbeat_key,
    service_record,
    state_key,
)

log = logging.getLogger(__name__)


@dataclass
class Role:
    role: str = "unknown"
    epoch: int = 0


def scrape_lag(url: str, volumes: list[str] | None = None,
               timeout: float = 1.0) -> float | None:
    """Highest drctl_replication_lag_seconds on a push agent's metrics endpoint (of the given
    volumes, or of all); None if it cannot be read."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            text = r.read().decode()
    except OSError:
        return None
    values = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
              if line.startswith("drctl_replication_lag_seconds{")
              and (volumes is None or any(f'volume="{v}"' in line for v in volumes))]
    return max(values) if values else None


class SiteAgent:
    def __init__(self, config: ClusterConfig, site: str, store: CoordinationStore,
                 lag_url: str | None = None) -> None:
        self.config = config
        self.site = site
        self.store = store
        self.lag_url = lag_url
        self.roles: dict[str, Role] = {s: Role() for s in config.services}
        self.keeper: LeaseKeeper | None = None
        self.audit: AuditLog | None = None  # set by `drctl agent`: role changes are recorded
        self._failures: set[tuple[str, str, int]] = set()  # (service, role, epoch) recorded

    def _services(self) -> list[ServiceConfig]:
        return [s for s in self.config.services.values() if self.site in (s.primary, s.replica)]

    def record(self, snap: Snapshot, svc: ServiceConfig) -> ServiceRecord:
        return service_record(snap.value(state_key(self.config.prefix, svc.name)), svc.primary,
                              svc.replica)

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                await self._registered(stop)
            except* (StoreUnavailableError, LeaseLostError) as group:
                log.warning("site %s: %s", self.site, group.exceptions[0])
            except* Exception as group:  # an agent must outlive surprises: fence, re-register
                log.error("site %s: unexpected %r: fencing and registering again", self.site,
                          group.exceptions[0])
            if not stop.is_set():
                await self.fence_all("lost etcd: fencing before the lease can expire")
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), 1.0)

    async def _registered(self, stop: asyncio.Event) -> None:
        self.keeper = LeaseKeeper(self.store, self.config.lease_ttl)
        await self.keeper.grant()
        feed = ChangeFeed(self.store, self.config.prefix + "services/")
        async with asyncio.TaskGroup() as tg:
            keep = tg.create_task(self.keeper.run())
            follow = tg.create_task(feed.run())
            try:
                while not stop.is_set() and not self.keeper.lost.is_set():
                    await self.tick()
                    await feed.wait(self.keeper.interval)
            finally:
                keep.cancel()
                follow.cancel()
        if self.keeper.lost.is_set():
            raise LeaseLostError(f"site {self.site}: heartbeat lease lost")
        await self.keeper.revoke()  # a clean stop: the heartbeat goes away at once

    async def tick(self) -> None:
        snap = await self.store.snapshot_without(self.config.prefix,
                                                 audit_prefix(self.config.prefix))
        hb = Heartbeat(self.site, time.time())
        for svc in self._services():
            rec = self.record(snap, svc)
            await self.follow(svc, rec)
            hb.services[svc.name] = await self.health(svc, rec)
        assert self.keeper is not None and self.keeper.lease is not None
        await self.store.put(heartbeat_key(self.config.prefix, self.site), hb.encode(),
                             lease=self.keeper.lease)

    async def health(self, svc: ServiceConfig, rec: ServiceRecord) -> ServiceHealth:
        """This site's report on ``svc`` for the heartbeat (a subclass running the data path
        adds what it knows)."""
        mine = self.roles[svc.name]
        lag = None
        if mine.role == "primary" and self.lag_url:
            lag = await asyncio.to_thread(scrape_lag, self.lag_url)
        return ServiceHealth(mine.role, mine.epoch, lag)

    def wanted(self, rec: ServiceRecord) -> str:
        op = rec.operation
        if op is not None and rec.state is State.FENCING and op.source == self.site:
            return "fenced"
        if rec.primary == self.site:
            return "primary"
        return "replica"

    async def follow(self, svc: ServiceConfig, rec: ServiceRecord) -> None:
        mine = self.roles[svc.name]
        want = self.wanted(rec)
        if want == mine.role and rec.epoch == mine.epoch:
            return
        change = {"from": mine.role, "to": want, "from_epoch": mine.epoch, "epoch": rec.epoch}
        if await self.change_role(svc, rec, mine.role, want):
            log.info("site %s: service %s is %s at epoch %d", self.site, svc.name, want,
                     rec.epoch)
            self.roles[svc.name] = Role(want, rec.epoch)
            await self._audit("agent.role_change", svc.name, change, "done")
        elif (svc.name, want, rec.epoch) not in self._failures:  # retried each tick: once
            self._failures.add((svc.name, want, rec.epoch))
            await self._audit("agent.role_change", svc.name, change,
                              "failed (a hook or the data path): retrying")

    async def _audit(self, action: str, service: str, params: dict[str, object],
                     outcome: str) -> None:
        if self.audit is not None:
            await self.audit.try_append(f"site:{self.site}", action, service, params, outcome)

    async def change_role(self, svc: ServiceConfig, rec: ServiceRecord, old: str,
                          want: str) -> bool:
        """Make this site ``want`` (primary, replica, fenced) for ``svc``: the hooks here; a
        subclass that runs the data path does that first. True when done (else retried at
        the next tick)."""
        mine = Role(old, rec.epoch)
        env = {"DRCTL_SERVICE": svc.name, "DRCTL_SITE": self.site,
               "DRCTL_EPOCH": str(rec.epoch), "DRCTL_ROLE": want,
               "DRCTL_REPLICATION_TARGET": self.config.sites[self.site].replication or ""}
        if want == "fenced" or (want == "replica" and mine.role == "primary"):
            ok = await run_hook("fence", svc.hooks.fence, env)
            ok = ok and await run_hook("stop", svc.hooks.stop, env)
        elif want == "primary" and mine.role in ("replica", "fenced"):
            ok = await run_hook("promote", svc.hooks.promote, env)
            ok = ok and await run_hook("start", svc.hooks.start, env)
        elif want == "primary":
            ok = await run_hook("start", svc.hooks.start, env)
        else:
            ok = True
        return ok

    async def fence_all(self, why: str) -> None:
        fenced = []
        for svc in self._services():
            mine = self.roles[svc.name]
            if mine.role == "primary":
                log.warning("site %s: fencing %s: %s", self.site, svc.name, why)
                await self.self_fence(svc, mine.epoch)
                self.roles[svc.name] = Role("fenced", mine.epoch)
                fenced.append((svc.name, mine.epoch))
        for name, epoch in fenced:  # after every fence: etcd may well be out of reach
            await self._audit("agent.self_fence", name, {"epoch": epoch}, why)

    async def self_fence(self, svc: ServiceConfig, epoch: int) -> None:
        """Stop writing for ``svc`` at once (the lease is about to be lost)."""
        env = {"DRCTL_SERVICE": svc.name, "DRCTL_SITE": self.site,
               "DRCTL_EPOCH": str(epoch), "DRCTL_ROLE": "fenced"}
        await run_hook("fence", svc.hooks.fence, env)
        await run_hook("stop", svc.hooks.stop, env)
