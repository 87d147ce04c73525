"""The capture loop of a source agent (`push --nbd-listen`): consistency points, in order.

1. Serve the volume over NBD; every write is journaled before the reply (journal.py).
2. Resync first: a pass over the whole volume (after a start) or over the change bitmap (after
   the journal overflowed), read from the volume while clients keep writing. Its batches are
   staged on the target but do not close a consistency point: the agent then cuts the journal
   and ships the points written meanwhile, and only the last batch closes, so the target
   applies resync and points as one unit and the replica shows the volume as it was at that
   cut (every block read by the resync was read before the cut; later writes are in points).
3. Then ship each closed point as it closes (a client FLUSH, or a cut when writes have waited
   ``cp_interval`` unflushed); release it from the journal once the target acknowledged it.

A consistency group runs one loop over several drivers (one per volume, each with its own
stream): one journal, one NBD server with an export per volume, and every point closed on every
member, so that the target applies a point to the members only once all of them hold it.

If the journal overflows while a resync runs, the round ends without closing and another
round ships what was written meanwhile: what was shipped stays staged on the target (acknowledged,
never resent), so every round makes progress; the rounds end as soon as a resync and its points
fit in the journal.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable, Coroutine
from typing import Any

from replicator.capture.journal import ChangeJournal, volume_blocks
from replicator.capture.nbd import NbdExport, NbdServer
from replicator.capture.points import plan_points
from replicator.driver import PushDriver, PushOptions
from replicator.errors import (
    ProtocolError,
    ReplanNeededError,
    TargetUnavailableError,
    VerificationError,
    VolumeBusyError,
    unwrap_group,
)
from replicator.planning import Planner
from replicator.units import parse_hostport
from replicator.waiting import until_stopped, wait_at_most

log = logging.getLogger(__name__)


async def run_captured(drivers: list[PushDriver], stop: asyncio.Event,
                       journal_path: str) -> bool:
    """Serve the drivers' volumes and ship their writes until ``stop``; False if stopped in
    the middle of a pass. ``drivers`` share one journal (a consistency group if several)."""
    opts = drivers[0].o
    assert opts.nbd_listen is not None
    os.makedirs(os.path.dirname(journal_path), exist_ok=True)
    wake = asyncio.Event()
    exports = NbdExport.open_group([(d.o.volume, d.o.path) for d in drivers], journal_path,
                                   opts.block_size, on_change=wake.set,
                                   journal_limit=opts.journal_limit)
    journal = exports[0].journal
    names = ", ".join(d.o.volume for d in drivers)
    try:
        if journal.replayed:
            log.warning("%s: replayed %d journaled writes into the volumes", names,
                        journal.replayed)
        server = NbdServer(exports)
        host, port = parse_hostport(opts.nbd_listen)
        bound = await server.start(host, port)
        print(f"drctl replicate push: NBD exports {names} on {host}:{bound}", flush=True)
        for d in drivers:
            d.capture_clock = lambda: journal.first_dirty_at
            _export_gauges(d, journal)
        try:
            for d in drivers:
                d.open_volume()
                if not await until_stopped(d.reconcile(), stop):
                    return False
            return await _Loop(drivers, opts, journal, wake, stop).run()
        finally:
            await server.close()
    finally:
        journal.close()
        for e in exports:
            e.close()


def _export_gauges(driver: PushDriver, journal: ChangeJournal) -> None:
    m = driver.m
    inner = m.refresh

    def refresh() -> None:
        if inner is not None:
            inner()
        m.set(m.journal_bytes, journal.size)
        m.set(m.bitmap_blocks, len(journal.dirty) + len(journal.resyncing))
        m.set(m.consistency_point, journal.released_cp)

    m.refresh = refresh


class _Loop:
    def __init__(self, drivers: list[PushDriver], opts: PushOptions, journal: ChangeJournal,
                 wake: asyncio.Event, stop: asyncio.Event) -> None:
        self.drivers = drivers
        self.opts = opts
        self.journal = journal
        self.wake = wake
        self.stop = stop
        self.full = True  # the next resync covers the whole volumes
        self.name = ", ".join(d.o.volume for d in drivers)

    async def run(self) -> bool:
        """Until ``stop``. Replication errors that are not the source's own fault (target,
        protocol) never stop the agent: the applications' volumes stay served, the journal
        keeps every acknowledged write, and the agent starts over with a resync after a
        backoff. A stale epoch (this source was fenced) or a local I/O error stop it."""
        backoff = 0.0
        while not self.stop.is_set():
            try:
                if backoff:
                    if not await self._restart(backoff):
                        return False
                    backoff = 0.0
                if not await self._step():
                    return False
            except ReplanNeededError as exc:
                log.warning("%s: planning again", exc)
                backoff = 0.01
            except (ProtocolError, VerificationError, TargetUnavailableError,
                    VolumeBusyError) as exc:
                backoff = min(30.0, max(1.0, backoff * 2))
                log.error("%s: replication failed (%s); the volumes stay served and every "
                          "write journaled; starting over in %.0fs", self.name, exc, backoff)
            for d in self.drivers:
                await d.save_if_due()
        return True

    async def _step(self) -> bool:
        """One resync, one batch of points, or a wait. False if stopped meanwhile."""
        if self.full or self.journal.overflowed:
            return await until_stopped(self.resync(), self.stop)
        if self.journal.ready():
            return await until_stopped(self.ship_points(), self.stop)
        await self.idle()
        return True

    async def _restart(self, backoff: float) -> bool:
        """After a failure: wait, agree with the target again, resync everything."""
        await wait_at_most(backoff, self.stop)
        for d in self.drivers:
            if not await until_stopped(d.reconcile(), self.stop):
                return False
        self.full = True
        return True

    async def _each(self, fn: Callable[[int, PushDriver], Coroutine[Any, Any, Any]]) -> None:
        """Run ``fn`` for every member at once (their streams are independent)."""
        try:
            async with asyncio.TaskGroup() as tg:
                for i, d in enumerate(self.drivers):
                    tg.create_task(fn(i, d))
        except BaseExceptionGroup as group:
            raise unwrap_group(group) from None

    async def resync(self) -> None:
        journal = self.journal
        blocks = journal.begin_resync()
        log.info("%s: resync of %s", self.name,
                 "the whole volume" if self.full else f"{len(blocks)} blocks")
        full = self.full
        await self._each(lambda i, d: d.run_pass(None if full else volume_blocks(blocks, i)))
        self.full = False  # shipped and acknowledged (staged): never again in full
        if journal.overflowed:
            log.warning("%s: the journal overflowed during the resync: another round",
                        self.name)
            return
        end = journal.cut()
        points = await asyncio.to_thread(journal.extract, end)
        await self._each(lambda i, d: d.run_planned(
            lambda: plan_points(_planner(d), points, d.next_seq, close_with=end, volume=i)))
        journal.release(end)
        journal.end_resync(blocks)
        log.info("%s: replica consistent at point %d", self.name, end)

    async def ship_points(self) -> None:
        points = await asyncio.to_thread(self.journal.extract)
        if points:
            await self._each(lambda i, d: d.run_planned(
                lambda: plan_points(_planner(d), points, d.next_seq, volume=i)))
            self.journal.release(points[-1].cp)

    async def idle(self) -> None:
        """Wait for a change; cut the open point once its oldest write waited cp_interval."""
        first = self.journal.open_first_at
        timeout = self.opts.interval
        if first is not None:
            age = time.time() - first
            if age >= self.opts.cp_interval:
                self.journal.cut()
                return
            timeout = self.opts.cp_interval - age
        await wait_at_most(timeout, self.stop, self.wake)
        self.wake.clear()


def _planner(driver: PushDriver) -> Planner:
    assert driver.planner is not None
    return driver.planner
