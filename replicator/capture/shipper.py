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

If the journal overflows while a resync runs, the round ends without closing and another
round ships what was written meanwhile: what was shipped stays staged on the target (acknowledged,
never resent), so every round makes progress; the rounds end as soon as a resync and its points
fit in the journal.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time

from replicator.capture.journal import ChangeJournal
from replicator.capture.nbd import NbdExport, NbdServer
from replicator.capture.points import plan_points
from replicator.driver import PushDriver, PushOptions
from replicator.errors import ReplanNeededError
from replicator.units import parse_hostport
from replicator.waiting import first_of, until_stopped

log = logging.getLogger(__name__)


async def run_captured(driver: PushDriver, opts: PushOptions, stop: asyncio.Event) -> bool:
    """Serve and ship until ``stop``; False if stopped in the middle of a pass."""
    assert opts.nbd_listen is not None
    os.makedirs(opts.state_dir, exist_ok=True)
    wake = asyncio.Event()
    export = NbdExport(opts.volume, opts.path, os.path.join(opts.state_dir, "journal"),
                       opts.block_size, on_change=wake.set, journal_limit=opts.journal_limit)
    journal = export.journal
    if journal.replayed:
        log.warning("volume %s: replayed %d journaled writes into the volume", opts.volume,
                    journal.replayed)
    server = NbdServer(export)
    host, port = parse_hostport(opts.nbd_listen)
    bound = await server.start(host, port)
    print(f"drctl replicate push: NBD export {opts.volume!r} on {host}:{bound}", flush=True)
    driver.capture_clock = lambda: journal.first_dirty_at
    _export_gauges(driver, journal)
    loop = _Loop(driver, opts, journal, wake, stop)
    try:
        driver.open_volume()
        if not await until_stopped(driver.reconcile(), stop):
            return False
        return await loop.run()
    finally:
        await server.close()
        export.close()


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
    def __init__(self, driver: PushDriver, opts: PushOptions, journal: ChangeJournal,
                 wake: asyncio.Event, stop: asyncio.Event) -> None:
        self.driver = driver
        self.opts = opts
        self.journal = journal
        self.wake = wake
        self.stop = stop
        self.full = True  # the next resync covers the whole volume

    async def run(self) -> bool:
        while not self.stop.is_set():
            try:
                if self.full or self.journal.overflowed:
                    if not await until_stopped(self.resync(), self.stop):
                        return False
                elif self.journal.ready():
                    if not await until_stopped(self.ship_points(), self.stop):
                        return False
                else:
                    await self.idle()
            except ReplanNeededError as exc:
                log.warning("%s: planning again", exc)
                await self.driver.reconcile()
                self.full = True
            if time.monotonic() - self.driver._last_save >= self.opts.save_interval:
                await asyncio.to_thread(self.driver.save_state)
        return True

    async def resync(self) -> None:
        driver, journal = self.driver, self.journal
        blocks = journal.begin_resync()
        log.info("volume %s: resync of %s", self.opts.volume,
                 "the whole volume" if self.full else f"{len(blocks)} blocks")
        await driver.run_pass(None if self.full else blocks)
        self.full = False  # shipped and acknowledged (staged): never again in full
        if journal.overflowed:
            log.warning("volume %s: the journal overflowed during the resync: another round",
                        self.opts.volume)
            return
        end = journal.cut()
        points = await asyncio.to_thread(journal.extract, end)
        planner = driver.planner
        assert planner is not None
        await driver.run_planned(lambda: plan_points(planner, points, driver.next_seq,
                                                     close_with=end))
        journal.release(end)
        journal.end_resync(blocks)
        log.info("volume %s: replica consistent at point %d", self.opts.volume, end)

    async def ship_points(self) -> None:
        driver, journal = self.driver, self.journal
        points = await asyncio.to_thread(journal.extract)
        planner = driver.planner
        if points and planner is not None:
            await driver.run_planned(lambda: plan_points(planner, points, driver.next_seq))
            journal.release(points[-1].cp)

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
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(first_of(self.stop, self.wake), timeout)
        self.wake.clear()
