"""Writing staged consistency points into replica images, alone or as a consistency group.

A group member's points reach its image only up to the last point *every* member holds
durably, under the group's lock, so members never show different points once settled. A drill
clone of a group member freezes the group's images (batches keep being staged and
acknowledged) until every clone taken is dropped: the members cloned one after the other all
show the same point. A freeze nobody ends (a drill that died without dropping its clones) lapses
after FREEZE_SECONDS.
"""

from __future__ import annotations

import asyncio
import logging
import time

from replicator.demotion import promoted_at
from replicator.metrics import TargetMetrics
from replicator.transport.slots import SlotRegistry, VolumeSlot

log = logging.getLogger(__name__)
FREEZE_SECONDS = 900.0


class Applier:
    def __init__(self, registry: SlotRegistry, metrics: TargetMetrics) -> None:
        self.registry = registry
        self.metrics = metrics
        self._locks: dict[str, asyncio.Lock] = {}
        # group -> clones outstanding ("volume/name") -> when taken (monotonic)
        self._frozen: dict[str, dict[str, float]] = {}

    def _lock(self, group: str) -> asyncio.Lock:
        return self._locks.setdefault(group, asyncio.Lock())

    async def apply(self, slot: VolumeSlot, max_seq: int | None = None) -> int:
        """Write the complete points of a replica's redo journal into its image (a group
        member: the points every member holds, into every member)."""
        replica = slot.replica
        if replica.group:
            async with self._lock(replica.group):
                if self._is_frozen(replica.group):
                    return 0
                return await self._apply_group(replica.members)
        return await self._apply_member(slot, max_seq, None)

    def _is_frozen(self, group: str) -> bool:
        clones = self._frozen.get(group)
        if not clones:
            return False
        oldest = min(clones.values())
        if time.monotonic() - oldest < FREEZE_SECONDS:
            return True
        log.warning("group %s: clones %s were never dropped; applying again", group,
                    ", ".join(sorted(clones)))
        clones.clear()
        return False

    async def _apply_member(self, slot: VolumeSlot, max_seq: int | None,
                            max_cp: int | None) -> int:
        replica = slot.replica
        if not replica.wal.frames:
            return 0
        started = time.perf_counter()
        applied, cp = await slot.run(replica.apply_staged, max_seq, max_cp)
        if applied:
            self.metrics.applied_cp.labels(replica.name).set(cp)
            self.metrics.cp_apply_seconds.labels(replica.name).observe(
                time.perf_counter() - started)
        self.metrics.staged_batches.labels(replica.name).set(len(replica.wal.frames))
        return applied

    async def group_point(self, members: tuple[str, ...]) -> int:
        """The last consistency point every member of a group holds durably."""
        points = []
        for m in members:
            promoted = promoted_at(self.registry.directory, m)
            if promoted is not None:
                # promoted already (a group is promoted one member after the other): settled
                # at that point, which the others must not pass
                points.append(promoted)
                continue
            if not self.registry.exists(m):
                return 0  # a member never connected: nothing is complete yet
            slot, _opened = await self.registry.get(m)
            points.append(slot.replica.closed_cp())
        return min(points) if points else 0

    async def _apply_group(self, members: tuple[str, ...]) -> int:
        point = await self.group_point(members)
        applied = 0
        for m in members:
            if promoted_at(self.registry.directory, m) is not None:
                continue
            slot, _opened = await self.registry.get(m)
            applied += await self._apply_member(slot, None, point)
        return applied

    async def apply_all(self) -> None:
        """Warm mode's schedule: every replica's complete points."""
        for slot in list(self.registry.slots.values()):
            try:
                await self.apply(slot)
            except OSError as exc:
                log.error("volume %s: applying staged batches failed: %s", slot.replica.name,
                          exc)

    async def settle_for_promotion(self, slot: VolumeSlot) -> int:
        """Apply every complete point and drop the batches of points that will never
        complete (for a group member: past the group's common point). Returns how many."""
        replica = slot.replica
        if not replica.group:
            await self._apply_member(slot, None, None)
            return await slot.run(replica.discard_incomplete, None)
        async with self._lock(replica.group):
            self._frozen.pop(replica.group, None)  # a promotion ends any drill's freeze
            await self._apply_group(replica.members)
            point = await self.group_point(replica.members)
            return await slot.run(replica.discard_incomplete, point)

    async def clone(self, slot: VolumeSlot, name: str) -> tuple[str, str]:
        """A writable copy of the replica at its last complete point (group: the same point
        for every member cloned until the clones are dropped); within the target's clone
        quota per volume."""
        replica = slot.replica
        limit = self.registry.limits.max_clones
        if not replica.group:
            await self._apply_member(slot, None, None)
            return await slot.run(replica.clone, name, limit)
        group = replica.group
        async with self._lock(group):
            if not self._is_frozen(group):
                await self._apply_group(replica.members)
            path, method = await slot.run(replica.clone, name, limit)
            self._frozen.setdefault(group, {})[f"{replica.name}/{name}"] = time.monotonic()
            return path, method

    async def drop_clone(self, slot: VolumeSlot, name: str) -> str:
        replica = slot.replica
        path = await slot.run(replica.drop_clone, name)
        if replica.group:
            async with self._lock(replica.group):
                self._frozen.get(replica.group, {}).pop(f"{replica.name}/{name}", None)
            await self.apply(slot)
        return path
