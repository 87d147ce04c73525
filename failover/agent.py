"""The site agent (`drctl agent`): heartbeat lease, role changes, self-fencing.

Each tick it reads one snapshot, works out this site's role in every service from the
service records, runs the hooks for a role change (start/promote when it becomes primary,
fence when it must stop writing), and refreshes its heartbeat (role, epoch, replication lag)
under its lease. When the lease is lost (etcd unreachable past the local deadline, shorter than
the TTL) every service this site is primary of is fenced *before* the controller can promote
the replica; the agent then registers again and follows the records.

A role change that is a step of an operation (this site fenced as the old primary, promoted
as the new one) runs the operation's steps of this site in the order the record lists them
(``run_operation``), each with its own timeout, and reports each outcome in the heartbeat for
the controller to record. A step that failed is not run again until an operator retries.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import urllib.request
from dataclasses import asdict, dataclass

from failover.audit import AuditLog
from failover.config import ClusterConfig, ServiceConfig
from failover.coordination.base import CoordinationStore, Snapshot
from failover.coordination.feed import ChangeFeed
from failover.errors import LeaseLostError, StoreUnavailableError
from failover.fsm import State
from failover.hooks import run_hooks
from failover.lease import LeaseKeeper
from failover.operation import with_plan
from failover.records import (
    Heartbeat,
    ServiceHealth,
    ServiceRecord,
    StepReport,
    StepRun,
    audit_prefix,
    heartbeat_key,
    service_record,
    state_key,
)
from failover.steprun import Outcome, run_step
from failover.steps import FENCE_STEP, Owner, StepKind, StepSpec, owner_of

log = logging.getLogger(__name__)
_OVER = ("done", "skipped")  # a step's outcomes after which the next one runs


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
        # per service: the outcomes of the operation steps run here, by step index
        self.reports: dict[str, dict[int, StepReport]] = {s: {} for s in config.services}
        self._beat: Heartbeat | None = None  # the last heartbeat put

    def _services(self) -> list[ServiceConfig]:
        return [s for s in self.config.services.values() if self.site in (s.primary, s.replica)]

    def record(self, snap: Snapshot, svc: ServiceConfig) -> ServiceRecord:
        return with_plan(service_record(snap.value(state_key(self.config.prefix, svc.name)),
                                        svc.primary, svc.replica), svc)

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
        self._beat = hb
        await self.store.put(heartbeat_key(self.config.prefix, self.site), hb.encode(),
                             lease=self.keeper.lease)

    async def _publish(self, svc: ServiceConfig) -> None:
        """The heartbeat again with this service's step outcomes so far (between the steps
        of one role change, so the record shows each as soon as it is over)."""
        hb, keeper = self._beat, self.keeper
        if hb is None or keeper is None or keeper.lease is None or svc.name not in hb.services:
            return
        hb.services[svc.name].steps = self._reports(svc.name)
        hb.at = time.time()
        with contextlib.suppress(StoreUnavailableError):
            await self.store.put(heartbeat_key(self.config.prefix, self.site), hb.encode(),
                                 lease=keeper.lease)

    def _reports(self, service: str) -> list[dict[str, object]]:
        return [asdict(r) for _, r in sorted(self.reports[service].items())]

    async def health(self, svc: ServiceConfig, rec: ServiceRecord) -> ServiceHealth:
        """This site's report on ``svc`` for the heartbeat (a subclass running the data path
        adds what it knows)."""
        mine = self.roles[svc.name]
        lag = None
        if mine.role == "primary" and self.lag_url:
            lag = await asyncio.to_thread(scrape_lag, self.lag_url)
        return ServiceHealth(mine.role, mine.epoch, lag, steps=self._reports(svc.name))

    def wanted(self, rec: ServiceRecord) -> str:
        op = rec.operation
        if op is not None and rec.state is State.FENCING and op.source == self.site:
            return "fenced"
        if rec.primary == self.site:
            return "primary"
        return "replica"

    def _owner(self, rec: ServiceRecord, want: str) -> Owner | None:
        """Whose operation steps this role change runs (None: not an operation's step)."""
        op = rec.operation
        if op is None or op.kind not in ("failover", "switchover"):
            return None
        if want == "fenced" and rec.state is State.FENCING and op.source == self.site:
            return Owner.OLD_PRIMARY
        if want == "primary" and rec.state is State.PROMOTING and op.target == self.site:
            return Owner.NEW_PRIMARY
        return None

    def _held(self, rec: ServiceRecord) -> bool:
        """An operation failed in this site's steps: its role stays as it is (the failed step
        is not run again, nothing is undone) until an operator retries or cancels."""
        op = rec.operation
        return (rec.state is State.FAILED and op is not None
                and op.kind in ("failover", "switchover")
                and (op.failed_step, self.site) in ((State.FENCING, op.source),
                                                    (State.PROMOTING, op.target)))

    async def follow(self, svc: ServiceConfig, rec: ServiceRecord) -> None:
        mine = self.roles[svc.name]
        want = self.wanted(rec)
        if (want == mine.role and rec.epoch == mine.epoch) or self._held(rec):
            return
        if any(r.epoch != rec.epoch for r in self.reports[svc.name].values()):
            self.reports[svc.name] = {}  # another operation's
        change = {"from": mine.role, "to": want, "from_epoch": mine.epoch, "epoch": rec.epoch}
        owner = self._owner(rec, want)
        if await (self.run_operation(svc, rec, owner, want) if owner is not None
                  else self.change_role(svc, rec, mine.role, want)):
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

    def env(self, svc: ServiceConfig, rec: ServiceRecord, want: str) -> dict[str, str]:
        env = {"DRCTL_SERVICE": svc.name, "DRCTL_SITE": self.site,
               "DRCTL_SITE_ADDRESS": self.config.sites[self.site].address,
               "DRCTL_EPOCH": str(rec.epoch), "DRCTL_ROLE": want,
               "DRCTL_REPLICATION_TARGET": self.config.sites[self.site].replication or ""}
        op = rec.operation
        if op is not None:
            env.update(DRCTL_OPERATION=op.kind, DRCTL_OLD_PRIMARY=op.source,
                       DRCTL_NEW_PRIMARY=op.target)
        return env

    async def run_operation(self, svc: ServiceConfig, rec: ServiceRecord, owner: Owner,
                            want: str) -> bool:
        """This site's steps of the operation in the record's order (those of the current
        phase not done yet), each reported as soon as it is over; True when all are done."""
        op = rec.operation
        assert op is not None
        mine = self.reports[svc.name]
        for index, run in enumerate(op.steps):
            if run.owner != owner or run.phase != rec.state or run.status in _OVER:
                continue
            got = mine.get(index)
            if got is not None and (got.epoch, got.attempt) == (rec.epoch, op.attempt):
                if got.status in _OVER:
                    continue
                if got.status == "failed":
                    return False
            if run.status == "failed" and run.attempt == op.attempt:
                return False
            spec = self._spec(svc, run)
            if spec is None:
                outcome = Outcome("failed", error=f"step {index + 1} is {run.kind} "
                                  f"{run.name!r} in the record, not in this site's runbook "
                                  "(give every daemon the same runbook)")
            else:
                log.info("site %s: %s: step %d %s", self.site, svc.name, index + 1,
                         run.title)
                outcome = await self.run_step(svc, rec, spec,
                                              {**self.env(svc, rec, want),
                                               "DRCTL_STEP": spec.name})
            mine[index] = StepReport(index, run.name, rec.epoch, op.attempt, outcome.status,
                                     outcome.seconds, outcome.output, outcome.error)
            await self._publish(svc)
            if outcome.status not in _OVER:
                if outcome.status == "failed":
                    log.error("site %s: %s: step %d %s failed: %s", self.site, svc.name,
                              index + 1, run.title, outcome.error)
                return False
        return True

    def _spec(self, svc: ServiceConfig, run: StepRun) -> StepSpec | None:
        """The runbook step a record's step is (None: this site's runbook differs)."""
        if run.spec is None:
            return FENCE_STEP if run.kind == StepKind.FENCE else None
        if run.spec >= len(svc.steps):
            return None
        spec = svc.steps[run.spec]
        return spec if (spec.kind, spec.name) == (run.kind, run.name) else None

    async def run_step(self, svc: ServiceConfig, rec: ServiceRecord, spec: StepSpec,
                       env: dict[str, str]) -> Outcome:
        """One step: the data path's part (a subclass that runs it), or a hook or check."""
        if spec.kind in (StepKind.FENCE, StepKind.PROMOTE):
            return self._no_data_path(rec, spec)
        return await run_step(spec, env, self.config.secrets())

    @staticmethod
    def _no_data_path(rec: ServiceRecord, spec: StepSpec) -> Outcome:
        """The fence or promote of a site that runs no data path: what the runbook's hooks of
        that phase here do (their own steps), or nothing at all (skipped, and said so)."""
        fence = spec.kind is StepKind.FENCE
        phase, owner = (State.FENCING if fence else State.PROMOTING), owner_of(spec.kind)
        steps = rec.operation.steps if rec.operation is not None else []
        hooks = [r.name for r in steps
                 if (r.phase, r.owner, r.kind) == (phase, owner, StepKind.HOOK)]
        if not hooks:
            return Outcome("skipped", "no data path and no hooks at this site: nothing " + (
                "stopped the writes here" if fence else "started the service here"))
        return Outcome("done", f"no data path at this site: its hooks ({', '.join(hooks)}) "
                               + ("stop the writes" if fence else "start the service"))

    async def change_role(self, svc: ServiceConfig, rec: ServiceRecord, old: str,
                          want: str) -> bool:
        """Make this site ``want`` (primary, replica, fenced) for ``svc`` outside an
        operation's steps: the role-change hooks here; a subclass that runs the data path
        does that first. True when done (else retried at the next tick)."""
        mine = Role(old, rec.epoch)
        env = self.env(svc, rec, want)
        secrets = self.config.secrets()
        if want == "fenced" or (want == "replica" and mine.role == "primary"):
            ok = await run_hooks("fence", svc.hooks.fence, env, secrets)
            ok = ok and await run_hooks("stop", svc.hooks.stop, env, secrets)
        elif want == "primary" and mine.role in ("replica", "fenced"):
            ok = await run_hooks("promote", svc.hooks.promote, env, secrets)
            ok = ok and await run_hooks("start", svc.hooks.start, env, secrets)
        elif want == "primary":
            ok = await run_hooks("start", svc.hooks.start, env, secrets)
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
               "DRCTL_SITE_ADDRESS": self.config.sites[self.site].address,
               "DRCTL_EPOCH": str(epoch), "DRCTL_ROLE": "fenced",
               "DRCTL_REPLICATION_TARGET": self.config.sites[self.site].replication or ""}
        await run_hooks("fence", svc.hooks.fence, env, self.config.secrets())
        await run_hooks("stop", svc.hooks.stop, env, self.config.secrets())
