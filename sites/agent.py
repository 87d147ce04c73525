"""`drctl agent` with a runbook: the failover site agent (heartbeat lease, role changes,
self-fencing) running the data path of every service with volumes (dataplane.py).

A role change runs the data path first, then the runbook's application hooks; in an
operation the data path is the ``fence`` and ``promote`` steps, at their place among the
hooks and health checks (failover/agent.py ``run_operation``). While the
record says ``draining`` and this site is primary, the capture agent's write barrier is up.
When the lease is about to be lost, the capture agents are killed before anything else: a
partitioned primary stops acknowledging writes before the other site can be promoted.
"""

from __future__ import annotations

import asyncio
import logging

from failover.agent import SiteAgent
from failover.config import ClusterConfig, ServiceConfig
from failover.coordination.base import CoordinationStore
from failover.fsm import State
from failover.records import ServiceHealth, ServiceRecord
from failover.steprun import Outcome
from failover.steps import StepKind, StepSpec
from runbooks.model import Runbook
from sites.dataplane import SiteDataPlane

log = logging.getLogger(__name__)


class ManagedSiteAgent(SiteAgent):
    def __init__(self, config: ClusterConfig, site: str, store: CoordinationStore,
                 runbook: Runbook, tls_dir: str | None = None) -> None:
        super().__init__(config, site, store)
        self.plane = SiteDataPlane(runbook, site, tls_dir)

    async def run(self, stop: asyncio.Event) -> None:
        try:
            await super().run(stop)
        finally:
            await self.plane.close()

    async def follow(self, svc: ServiceConfig, rec: ServiceRecord) -> None:
        path = self.plane.services.get(svc.name)
        if path is not None:
            path.keep_token(rec.epoch_token)  # the capture agent reads it at each handshake
        await super().follow(svc, rec)

    async def change_role(self, svc: ServiceConfig, rec: ServiceRecord, old: str,
                          want: str) -> bool:
        path = self.plane.services.get(svc.name)
        if path is not None:
            if want == "fenced":
                await path.fence()
            elif want == "replica":
                if not await path.become_replica(rec.epoch):
                    return False
            elif want == "primary" and not await path.become_primary(rec.epoch):
                return False
        return await super().change_role(svc, rec, old, want)

    async def run_step(self, svc: ServiceConfig, rec: ServiceRecord, spec: StepSpec,
                       env: dict[str, str]) -> Outcome:
        path = self.plane.services.get(svc.name)
        if path is None or spec.kind not in (StepKind.FENCE, StepKind.PROMOTE):
            return await super().run_step(svc, rec, spec, env)
        if spec.kind is StepKind.FENCE:
            await path.fence()
            return Outcome("done", "capture agent stopped: the export acknowledges no more "
                                   "writes")
        if await path.become_primary(rec.epoch):
            return Outcome("done", f"replicas released as the primary volumes at epoch "
                                   f"{rec.epoch}; export {path.export} up")
        # not yet (the epoch token, the export coming up): again at the next tick, bounded by
        # the phase's timeout
        return Outcome("waiting", error=path.error or "the data path is not up yet")

    async def self_fence(self, svc: ServiceConfig, epoch: int) -> None:
        path = self.plane.services.get(svc.name)
        if path is not None:
            await path.fence(kill=True)
        await super().self_fence(svc, epoch)

    async def health(self, svc: ServiceConfig, rec: ServiceRecord) -> ServiceHealth:
        h = await super().health(svc, rec)
        path = self.plane.services.get(svc.name)
        if path is None:
            return h
        if h.role == "primary":
            path.set_barrier(rec.state is State.DRAINING and rec.primary == self.site)
            got = await asyncio.to_thread(path.health)
            h.lag_seconds = got.get("lag_seconds")
            h.protected = got.get("protected")
            h.barrier = bool(got.get("barrier"))
            h.resync = got.get("resync")
            h.data_path = str(got.get("data_path", ""))
        else:
            h.data_path = self.plane.target.state if h.role == "replica" else "stopped"
            h.unreplicated_blocks = int(path.unreplicated.get("blocks", 0) or 0)
            h.unreplicated_file = path.unreplicated.get("file")
        if path.error:
            h.data_path = f"{h.data_path}: {path.error}"
        return h
