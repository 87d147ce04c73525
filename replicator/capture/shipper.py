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
import signal
import time
from collections.abc import Callable, Coroutine
from typing import Any

from replicator.capture.journal import ChangeJournal, volume_blocks
from replicator.capture.lineage import Lineage
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
    journal_dir = os.path.dirname(journal_path)
    os.makedirs(journal_dir, exist_ok=True)
    lineage = Lineage.load(journal_dir)
    if not os.path.exists(journal_path):
        if lineage.journal_started:
            log.warning("%s: the change journal %s is missing: what it held is unknown, the "
                        "next resync compares the whole volumes", opts.volume, journal_path)
            lineage.synced.clear()
            lineage.promoted_from.clear()
        lineage.journal_started = True
        lineage.save(journal_dir)
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
        loop = asyncio.get_running_loop()
        # A planned switchover: SIGUSR1 raises the write barrier, SIGUSR2 lifts it.
        loop.add_signal_handler(signal.SIGUSR1, server.hold_writes)
        loop.add_signal_handler(signal.SIGUSR2, server.release_writes)
        for d in drivers:
            d.capture_clock = lambda: journal.first_dirty_at
            _export_gauges(d, journal, server)
        try:
            for d in drivers:
                d.open_volume()
                if not await until_stopped(d.reconcile(), stop):
                    return False
            return await _Loop(drivers, opts, journal, wake, stop, lineage, journal_dir).run()
        finally:
            loop.remove_signal_handler(signal.SIGUSR1)
            loop.remove_signal_handler(signal.SIGUSR2)
            await server.close()
    finally:
        journal.close()
        for e in exports:
            e.close()


def _export_gauges(driver: PushDriver, journal: ChangeJournal, server: NbdServer) -> None:
    m = driver.m
    inner = m.refresh

    def refresh() -> None:
        if inner is not None:
            inner()
        m.set(m.journal_bytes, journal.size)
        m.set(m.bitmap_blocks, len(journal.dirty) + len(journal.resyncing))
        m.set(m.consistency_point, journal.released_cp)
        m.set(m.write_barrier, int(server.barrier))

    m.refresh = refresh


class _Loop:
    def __init__(self, drivers: list[PushDriver], opts: PushOptions, journal: ChangeJournal,
                 wake: asyncio.Event, stop: asyncio.Event, lineage: Lineage,
                 lineage_dir: str) -> None:
        self.drivers = drivers
        self.opts = opts
        self.journal = journal
        self.wake = wake
        self.stop = stop
        self.lineage = lineage
        self.lineage_dir = lineage_dir
        self.full = True  # the next resync covers the whole volumes
        self.name = ", ".join(d.o.volume for d in drivers)
        self.progress = ResyncProgress(drivers)
        self._set_protected(False)

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
                self._set_protected(False)
                self.progress.stop()
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

    def _set_protected(self, on: bool) -> None:
        for d in self.drivers:
            d.m.set(d.m.protected, int(on))

    def _exact_delta(self) -> dict[int, set[int]] | None:
        """Re-protection after a failover: the blocks of each volume that can differ between
        this volume and the demoted old primary's (this journal's blocks since the promotion
        plus the ones the old primary never replicated), or None if that is not known and the
        whole volumes must be compared."""
        out: dict[int, set[int]] = {}
        why: list[str] = []
        for i, d in enumerate(self.drivers):
            info = d.handshake_info
            if info is None or not info.demoted:
                return None  # not a demoted primary: a first sync or a restart
            base = self.lineage.promoted_from.get(d.o.volume, "")
            if not base:
                why.append(f"{d.o.volume}: this site's change journal does not reach back to "
                           "the promotion")
            elif not info.diverged_base:
                why.append(f"{d.o.volume}: the old primary's change journal was lost")
            elif info.diverged_base != base:
                why.append(f"{d.o.volume}: the old primary's journal is relative to replica "
                           f"{info.diverged_base[:8]}, this site promoted {base[:8]}")
            else:
                out[i] = set(info.diverged)
        if why:
            log.warning("%s: re-protect falls back to a hash comparison of both images (%s)",
                        self.name, "; ".join(why))
            return None
        return out

    async def resync(self) -> None:
        journal = self.journal
        full = self.full
        exact = self._exact_delta() if full else None
        blocks = journal.begin_resync()
        self._set_protected(False)
        if full and exact is None:
            # A comparison of the whole volumes: until it completes, the journal is not the
            # difference to the replica (a demotion must compare the images too).
            changed = False
            for d in self.drivers:
                if self.lineage.synced.pop(d.o.volume, None) != d.state.generation:
                    changed = True
            if changed:
                self.lineage.save(self.lineage_dir)
        sets: dict[int, set[int] | None] = {}
        for i in range(len(self.drivers)):
            if exact is not None:
                sets[i] = volume_blocks(blocks, i) | exact.get(i, set())
            else:
                sets[i] = None if full else volume_blocks(blocks, i)
        how = ("exact delta" if exact is not None else "whole-volume comparison" if full
               else "changed blocks")
        self.progress.start(sets, exact is not None or not full)
        raw0 = sum(d.m.value(d.m.shipped_raw) for d in self.drivers)
        wire0 = sum(d.totals.wire_bytes for d in self.drivers)
        log.info("%s: resync (%s) of %s", self.name, how,
                 "the whole volume" if exact is None and full else
                 f"{sum(len(b or ()) for b in sets.values())} blocks")
        await self._each(lambda i, d: d.run_pass(sets[i]))
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
        self.progress.stop()
        raw = sum(d.m.value(d.m.shipped_raw) for d in self.drivers) - raw0
        log.info("%s: resync (%s) shipped %d bytes of blocks (%d on the wire), with the "
                 "points written meanwhile", self.name, how, raw,
                 sum(d.totals.wire_bytes for d in self.drivers) - wire0)
        for d in self.drivers:
            if not await d.verify():
                self.full = True
                raise VerificationError(f"volume {d.o.volume}: after the resync the replica's "
                                        "hash index differs from what was shipped")
        for d in self.drivers:
            self.lineage.synced[d.o.volume] = d.state.generation
            self.lineage.promoted_from.pop(d.o.volume, None)
        self.lineage.save(self.lineage_dir)
        self._set_protected(True)
        log.info("%s: replica consistent at point %d and verified (%s)", self.name, end, how)

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


class ResyncProgress:
    """The resync gauges: what it covers, what is left, an ETA from the rate so far."""

    def __init__(self, drivers: list[PushDriver]) -> None:
        self.drivers = drivers
        self.sizes: list[int] = [0] * len(drivers)
        self.by_blocks = False
        self.acked0 = [0] * len(drivers)
        self.started = 0.0
        for d in drivers:
            d.m.set(d.m.resync_eta, -1)
            self._wrap(d)

    def _wrap(self, d: PushDriver) -> None:
        inner = d.m.refresh
        i = self.drivers.index(d)

        def refresh() -> None:
            if inner is not None:
                inner()
            self._update(i, d)

        d.m.refresh = refresh

    def start(self, sets: dict[int, set[int] | None], by_blocks: bool) -> None:
        self.started = time.monotonic()
        self.by_blocks = by_blocks
        for i, d in enumerate(self.drivers):
            blocks = sets.get(i)
            self.sizes[i] = d.geo.size if blocks is None else len(blocks) * d.geo.block_size
            self.acked0[i] = d.progress.acked_raw
            d.m.set(d.m.resync_exact, int(by_blocks))
            self._update(i, d)

    def stop(self) -> None:
        self.sizes = [0] * len(self.drivers)
        for i, d in enumerate(self.drivers):
            self._update(i, d)

    def _update(self, i: int, d: PushDriver) -> None:
        size = self.sizes[i]
        if not size:
            d.m.set(d.m.resync_size, 0)
            d.m.set(d.m.resync_remaining, 0)
            d.m.set(d.m.resync_eta, -1)
            return
        done = (d.progress.acked_raw - self.acked0[i]) if self.by_blocks \
            else d.progress.scanned
        done = max(0, min(size, done))
        left = size - done
        elapsed = time.monotonic() - self.started
        d.m.set(d.m.resync_size, size)
        d.m.set(d.m.resync_remaining, left)
        d.m.set(d.m.resync_eta, elapsed * left / done if done and elapsed > 1.0 else -1)


def _planner(driver: PushDriver) -> Planner:
    assert driver.planner is not None
    return driver.planner
