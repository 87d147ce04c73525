"""The capture loop of a source agent (`push --nbd-listen`): consistency points, in order.

1. Serve the volume over NBD; every write is journaled before the reply (journal.py).
2. Resync first: a pass over the whole volume (after a start) or over the change bitmap (after
   the journal overflowed), read from the volume while clients keep writing. Its batches are
   staged on the target but do not close a consistency point: the agent then cuts the journal
   and ships the points written meanwhile, and only the last batch closes, so the target
   applies resync and points as one unit and the replica shows the volume as it was at that
   cut (every block read by the resync was read before the cut; later writes are in points).
   With ``cp_interval`` > 0 that cut is the first client FLUSH after the pass, as for every
   other point.
3. Then stream the points: each is shipped as soon as it closes, on one long-lived stream per
   volume, without waiting for the acks of the points before it (on a WAN the lag is then
   about one round trip, not two). A client FLUSH closes a point; with ``cp_interval`` 0 (the
   default) the agent also cuts the open point whenever the streams have sent everything cut
   before, at most once per CUT_SPACING (10 ms), so a point holds the writes that arrived while
   the previous one was being sent;
   with ``cp_interval`` > 0 it cuts only once writes waited that long for a FLUSH. A point's
   closing batch asks the target to sync and ack at once; the point leaves the journal when
   its ack arrives, and the journal is compacted on a thread. ``DRCTL_CP_TRACE`` records each
   point's stages (trace.py).

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
import functools
import logging
import os
import queue
import signal
import time
from collections import deque
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass
from typing import Any

from drctl.words import count
from replicator.capture import resume
from replicator.capture.checkpoint import Checkpointer
from replicator.capture.journal import IDLE_REWRITE_BYTES, ChangeJournal
from replicator.capture.journal_records import ExtractedPoint, volume_blocks
from replicator.capture.lineage import Lineage
from replicator.capture.nbd import NbdExport, NbdServer
from replicator.capture.points import plan_points
from replicator.capture.resync_progress import ResyncProgress
from replicator.capture.scrub import Scrubber
from replicator.capture.trace import PointTrace
from replicator.driver import PushDriver, PushOptions
from replicator.errors import (
    ProtocolError,
    ReplanNeededError,
    TargetUnavailableError,
    VerificationError,
    VolumeBusyError,
    unwrap_group,
)
from replicator.planning import PlannedBatch, Planner
from replicator.units import format_bytes
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
    before = resume.volumes_before_replay(drivers)
    wake = asyncio.Event()
    exports = NbdExport.open_group([(d.o.volume, d.o.path) for d in drivers], journal_path,
                                   opts.block_size, on_change=wake.set,
                                   journal_limit=opts.journal_limit)
    journal = exports[0].journal
    names = ", ".join(d.o.volume for d in drivers)
    checkpoints = Checkpointer(drivers, exports)  # the volumes' activity logs
    try:
        if journal.replayed:
            log.warning("%s: replayed %d journaled writes into the volumes", names,
                        journal.replayed)
        server = NbdServer(exports, opts.nbd_tls, opts.nbd_allow)
        where = await server.listen(opts.nbd_listen)
        print(f"drctl replicate push: NBD exports {names} on {where}", flush=True)
        loop = asyncio.get_running_loop()
        # A planned switchover: SIGUSR1 raises the write barrier, SIGUSR2 lifts it.
        loop.add_signal_handler(signal.SIGUSR1, server.hold_writes)
        loop.add_signal_handler(signal.SIGUSR2, server.release_writes)
        trace = PointTrace()
        if trace.enabled:
            exports[0].commit.on_sync = trace.synced
        scrub = Scrubber(drivers, journal, opts.verify_rate, stop, wake.set)
        for d in drivers:
            d.capture_clock = scrub.capture_clock  # the journal's, or an unrepaired mismatch
            _export_gauges(d, journal, server)
        try:
            for d in drivers:
                d.open_volume()
            resumed = await resume.reconcile(drivers, lineage, journal, before, stop)
            if resumed is None:
                return False
            main = _Loop(drivers, opts, journal, wake, stop, lineage, journal_dir, trace)
            main.full = not resumed  # else the first resync covers the journal's blocks
            main.on_protected = checkpoints.follow(scrub.set_active)
            return await scrub.alongside(main.run())
        finally:
            loop.remove_signal_handler(signal.SIGUSR1)
            loop.remove_signal_handler(signal.SIGUSR2)
            await server.close()
    finally:
        checkpoints.close()  # and the journal, synced once more first
        for e in exports:
            e.close()


def _export_gauges(driver: PushDriver, journal: ChangeJournal, server: NbdServer) -> None:
    m = driver.m
    inner = m.refresh

    def refresh() -> None:
        if inner is not None:
            inner()
        m.set(m.journal_bytes, journal.size + journal.ref_bytes)
        m.set(m.bitmap_blocks, len(journal.dirty) + len(journal.resyncing))
        m.set(m.consistency_point, journal.released_cp)
        m.set(m.write_barrier, int(server.barrier))

    m.refresh = refresh


INLINE_EXTRACT = 1 << 20  # journal bytes of points small enough to read on the event loop
STREAM_IDLE = 0.5  # seconds without writes after which the streams of points end
CUT_SPACING = 0.010  # seconds between two cuts of the agent's at least (a client FLUSH cuts at
# once): it adds at most this much to the lag (a lone 4 KiB writer: 823-1,027 IOPS at 5 ms,
# 1,098-1,105 at 10 ms, in other rounds; docs/performance.md)
FEED_AHEAD = 64  # closed points read from the journal ahead of the stream (per member): the
                 # rest of a backlog waits on disk, not in memory


@dataclass
class _Point:
    """A point shipped on the members' streams: the sequence number of its closing batch on
    each (0: not sent yet)."""

    cp: int
    first_at: float
    closing: list[int]


class _Loop:
    def __init__(self, drivers: list[PushDriver], opts: PushOptions, journal: ChangeJournal,
                 wake: asyncio.Event, stop: asyncio.Event, lineage: Lineage,
                 lineage_dir: str, trace: PointTrace | None = None) -> None:
        self.drivers = drivers
        self.opts = opts
        self.journal = journal
        self.wake = wake
        self.stop = stop
        self.lineage = lineage
        self.lineage_dir = lineage_dir
        self.full = True  # the next resync covers the whole volumes
        self.resync_due = True  # a resync comes first (of the journal's blocks if not full)
        self.name = ", ".join(d.o.volume for d in drivers)
        self.progress = ResyncProgress(drivers)
        self.trace = trace or PointTrace(None)
        self.inflight: deque[_Point] = deque()  # shipped, not acknowledged by every member
        self.unsent = 0  # closing batches of those points not yet sent (all members)
        self.last_cut = 0.0  # when the agent last cut a point itself (monotonic)
        self.compacting: asyncio.Future[bool] | None = None
        self.saving: asyncio.Future[None] | None = None
        self.on_protected: Callable[[bool], None] | None = None  # the background verify's
        self._set_protected(False)

    async def run(self) -> bool:
        """Until ``stop``. Replication errors that are not the source's own fault (target,
        protocol) never stop the agent: the applications' volumes stay served, the journal
        keeps every acknowledged write, and the agent starts over with a resync after a
        backoff. A stale epoch (this source was fenced) or a local I/O error stop it."""
        try:
            return await self._run()
        finally:
            if self.saving is not None:  # the caller saves the state once more
                await self.saving

    async def _run(self) -> bool:
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
            self._save_soon()
        return True

    def _save_soon(self) -> None:
        """Save the resume state of the drivers that are due, on a thread, without holding up
        the next point (awaited, a save under disk contention held the first writes of the
        next burst for 0.6 s). A save that races new planning only makes the saved view
        untrusted at the next start (its digest differs from the replica's): a re-listing."""
        task = self.saving
        if task is not None:
            if not task.done():
                return
            self.saving = None
            task.result()  # raises its I/O error, if any
        due = [d for d in self.drivers if d.save_due()]
        if due:
            self.saving = asyncio.ensure_future(asyncio.to_thread(_save_states, due))

    async def _step(self) -> bool:
        """A resync, or the points until the journal overflows. False if stopped meanwhile."""
        if self.compacting is not None and self.compacting.done():
            await self._compacted()  # raises its I/O error, if any
        if self.full or self.resync_due or self.journal.overflowed:
            # a resync rewrites the journal: a compaction still copying would only give up
            await self._compacted()
            return await until_stopped(self.resync(), self.stop)
        if self.journal.open_first_at is None and not self.journal.ready():
            await wait_at_most(self.opts.interval, self.stop, self.wake)  # nothing to ship
            self.wake.clear()
            return True
        return await until_stopped(self.stream(), self.stop)

    async def _restart(self, backoff: float) -> bool:
        """After a failure: wait, agree with the target again, resync everything."""
        self._set_protected(False)
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
        if self.on_protected is not None:
            self.on_protected(on)

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

    def _forget_synced(self) -> None:
        """A comparison of the whole volumes: until it completes, the journal is not the
        difference to the replica (a demotion must compare the images too)."""
        changed = False
        for d in self.drivers:
            if self.lineage.synced.pop(d.o.volume, None) != d.state.generation:
                changed = True
        if changed:
            self.lineage.save(self.lineage_dir)

    async def resync(self) -> None:
        journal = self.journal
        full = self.full
        exact = self._exact_delta() if full else None
        blocks = journal.begin_resync()
        self._set_protected(False)
        if full and exact is None:
            self._forget_synced()
        sets: dict[int, set[int] | None] = {}
        for i in range(len(self.drivers)):
            if exact is not None:
                sets[i] = volume_blocks(blocks, i) | exact.get(i, set())
            elif full:
                sets[i] = None
            else:  # and, after a restart of the machine, the activity log's (resume.py)
                sets[i] = volume_blocks(blocks, i) | self.drivers[i].state.recheck
        how = ("exact delta" if exact is not None else "whole-volume comparison" if full
               else "changed blocks")
        self.progress.start(sets, exact is not None or not full)
        raw0 = sum(d.m.value(d.m.shipped_raw) for d in self.drivers)
        wire0 = sum(d.totals.wire_bytes for d in self.drivers)
        log.info("%s: resync (%s) of %s", self.name, how,
                 "the whole volume" if exact is None and full else
                 count(sum(len(b or ()) for b in sets.values()), "block"))
        await self._each(lambda i, d: d.run_pass(sets[i]))
        self.full = self.resync_due = False  # shipped and acknowledged (staged): not again
        if journal.overflowed:
            log.warning("%s: the journal overflowed during the resync: another round",
                        self.name)
            return
        end = await self._resync_end()
        if end is None:  # overflowed while it waited for a FLUSH: another round; or stopped
            if journal.overflowed:
                log.warning("%s: the journal overflowed at the end of the resync: another "
                            "round", self.name)
            return
        points = await asyncio.to_thread(journal.extract, end)
        await self._each(lambda i, d: d.run_planned(
            lambda: plan_points(_planner(d), points, d.next_seq, close_with=end, volume=i)))
        journal.release(end)
        journal.end_resync(blocks)
        self.progress.stop()
        raw = sum(d.m.value(d.m.shipped_raw) for d in self.drivers) - raw0
        wire = sum(d.totals.wire_bytes for d in self.drivers) - wire0
        log.info("%s: resync (%s) shipped %d bytes (%s) of blocks, %d (%s) on the wire: the "
                 "blocks to resync and the points written meanwhile", self.name, how, raw,
                 format_bytes(raw), wire, format_bytes(wire))
        for d in self.drivers:
            if not await d.verify():
                self.full = True
                raise VerificationError(f"volume {d.o.volume}: after the resync the replica's "
                                        "hash index differs from what was shipped")
        for d in self.drivers:
            self.lineage.synced[d.o.volume] = d.state.generation
            self.lineage.promoted_from.pop(d.o.volume, None)
            d.state.rechecked()
        self.lineage.save(self.lineage_dir)
        self._set_protected(True)
        log.info("%s: replica consistent at point %d and verified (%s)", self.name, end, how)

    async def _resync_end(self) -> int | None:
        """The point the resync closes with: the first cut after the pass read its last
        block. With ``cp_interval`` > 0 the replica only ever shows a client's FLUSH, so that
        is the next FLUSH (or the agent's own cut once the open point's writes waited
        ``cp_interval`` for one, as when streaming). None if the journal overflowed or the
        agent stops meanwhile."""
        journal = self.journal
        if self.opts.cp_interval <= 0:
            return journal.try_cut()
        mark = journal.next_cp  # the number of the next point to close
        end = journal.cut_if_flushed()  # nothing written since the last FLUSH
        if end is not None:
            return end
        while not journal.overflowed and not self.stop.is_set():
            if journal.next_cp > mark:
                return mark  # a FLUSH closed it: every block the pass read came before
            first = journal.open_first_at
            age = time.time() - first if first is not None else 0.0
            if age >= self.opts.cp_interval:
                return journal.try_cut()
            await wait_at_most(self.opts.cp_interval - age, self.stop, self.wake)
            self.wake.clear()
        return None

    # -- the steady state: points shipped as they are cut ---------------------------------------

    async def stream(self) -> None:
        """Ship every point as soon as it closes, without waiting for the acks of the ones
        before it: one stream per member, each point's closing batch asking the target to
        sync and ack at once, each point released when every member acknowledged it. With
        ``cp_interval`` 0 the agent cuts the open point whenever the streams have sent
        everything cut before (writes that arrive meanwhile form the next point); otherwise
        once its oldest write waited that long for a client FLUSH. Returns once every point
        shipped is acknowledged after the journal overflowed or nothing was written for
        STREAM_IDLE (an idle stream would hold up a target's graceful stop)."""
        feeds: list[queue.SimpleQueue[list[ExtractedPoint] | None]] = [
            queue.SimpleQueue() for _ in self.drivers]
        self.inflight.clear()
        self.unsent = 0
        for i, d in enumerate(self.drivers):
            d.on_sent = functools.partial(self._sent, i)
            d.on_acked = self._acked
        try:
            async with asyncio.TaskGroup() as tg:
                for i, d in enumerate(self.drivers):
                    tg.create_task(d.run_planned(functools.partial(self._follow, feeds[i], i,
                                                                   d)))
                tg.create_task(self._cutter(feeds))
        except BaseExceptionGroup as group:
            raise unwrap_group(group) from None
        finally:
            for d in self.drivers:
                d.on_sent = d.on_acked = None
            if self.inflight:  # never acknowledged here: shipped again after the resync
                self.journal.requeue()
                self.inflight.clear()
                self.trace.forget()

    async def _cutter(self, feeds: list[queue.SimpleQueue[list[ExtractedPoint] | None]]
                      ) -> None:
        journal = self.journal
        idle_since = time.monotonic()
        while not journal.overflowed and not self.stop.is_set():
            timeout = self._cut_if_due()
            if self.compacting is not None and self.compacting.done():
                await self._compacted()
            if journal.ready() and self.unsent < FEED_AHEAD * len(self.drivers):
                # small points are read on the loop (page cache), a backlog on a thread,
                # and so are they while a write holds the order lock (extract waits for it)
                if journal.unextracted_bytes() <= INLINE_EXTRACT and not journal.order.locked():
                    points = journal.extract()
                else:
                    points = await asyncio.to_thread(journal.extract)
                self._feed(points, feeds)
                continue
            if self.inflight or journal.open_first_at is not None:
                idle_since = time.monotonic()
            else:  # the view equals the replica: a consistent state to save
                self._save_soon()
                if time.monotonic() - idle_since >= STREAM_IDLE:
                    if journal.size >= IDLE_REWRITE_BYTES:
                        self._compact_soon()
                    break
                timeout = min(timeout, STREAM_IDLE)
            await wait_at_most(timeout, self.stop, self.wake)
            self.wake.clear()
        for f in feeds:
            f.put(None)

    def _cut_if_due(self) -> float:
        """Cut the open point if it is due; returns how long to wait at most for the next
        change."""
        first = self.journal.open_first_at
        if first is None:
            return self.opts.interval
        if self.opts.cp_interval > 0:  # wait that long for a client FLUSH
            age = time.time() - first
            if age < self.opts.cp_interval:
                return self.opts.cp_interval - age
        elif self.unsent:  # the streams are still sending: writes gather in the open point
            return self.opts.interval
        else:
            # at most one cut per CUT_SPACING: a point costs the two sides ~1-2 ms of CPU
            # whatever it holds, and a writer alone (a database's commits) made one per write
            wait = self.last_cut + CUT_SPACING - time.monotonic()
            if wait > 0:
                return wait
        self.last_cut = time.monotonic()
        cp = self.journal.try_cut()  # None: it overflowed meanwhile (the loop sees it next)
        if cp is not None:
            self.trace.stamp(cp, "cut")
        return self.opts.interval

    def _feed(self, points: list[ExtractedPoint],
              feeds: list[queue.SimpleQueue[list[ExtractedPoint] | None]]) -> None:
        tr = self.trace
        for p in points:
            if tr.enabled:
                tr.opened(p.cp, p.first_at, flush=False)
                tr.stamp(p.cp, "extracted")
                tr.note(p.cp, "blocks", len(p.blocks))
                tr.note(p.cp, "inflight", len(self.inflight))
            self.inflight.append(_Point(p.cp, p.first_at, [0] * len(self.drivers)))
        self.unsent += len(points) * len(self.drivers)
        for f in feeds:
            f.put(points)

    def _follow(self, feed: queue.SimpleQueue[list[ExtractedPoint] | None], volume: int,
                driver: PushDriver) -> Iterator[PlannedBatch]:
        """On the planner thread: the batches of the points fed, until the feed ends or the
        pass is aborted."""
        abort = driver.pass_abort
        while True:
            try:
                points = feed.get(timeout=0.1)
            except queue.Empty:
                if abort is not None and abort.is_set():
                    return
                continue
            if points is None:
                return
            for b in plan_points(_planner(driver), points, driver.next_seq, volume=volume):
                if b.batch.cp:
                    b.batch.commit = True  # the target syncs and acknowledges it at once
                    self.trace.stamp(b.batch.cp, "planned")
                yield b

    def _compact_soon(self) -> None:
        """Rewrite the journal without its released records, on a thread (it fsyncs a new
        file: done on the loop, that stalled every write and every ack for as long)."""
        if self.compacting is None or self.compacting.done():
            if self.compacting is not None:
                self.compacting.result()  # raises the last one's I/O error, if any
            self.compacting = asyncio.ensure_future(asyncio.to_thread(self.journal.compact))

    async def _compacted(self) -> None:
        """Wait for a running compaction; raise its error, if any (an I/O error)."""
        task, self.compacting = self.compacting, None
        if task is not None:
            await task

    def _sent(self, member: int, planned: PlannedBatch) -> None:
        cp = planned.batch.cp
        if not cp:
            return
        for p in self.inflight:
            if p.cp == cp:
                if not p.closing[member]:
                    p.closing[member] = planned.batch.seq
                    self.unsent -= 1
                    self.trace.stamp(cp, "sent")
                    self.wake.set()  # the streams can take more (at 0: cut the open point)
                    self._acked(0)  # its ack may have been read while the write returned
                return

    def _acked(self, _seq: int) -> None:
        """Release the points every member has acknowledged, in order."""
        done: list[int] = []
        now = time.time()
        while self.inflight:
            p = self.inflight[0]
            if not all(s and d.acked_seq >= s for s, d in zip(p.closing, self.drivers,
                                                               strict=True)):
                break
            self.inflight.popleft()
            done.append(p.cp)
            if p.first_at:
                for d in self.drivers:
                    d.m.observe(d.m.ack_lag, max(0.0, now - p.first_at))
            self.trace.stamp(p.cp, "acked")
        if done:
            started = time.monotonic()
            if self.journal.release(done[-1], inline=False):
                self._compact_soon()
            if self.trace.enabled:
                self.trace.note(done[-1], "release_ms", (time.monotonic() - started) * 1000)
            for cp in done:
                self.trace.released(cp)


def _save_states(drivers: list[PushDriver]) -> None:
    for d in drivers:
        d.save_state()


def _planner(driver: PushDriver) -> Planner:
    assert driver.planner is not None
    return driver.planner
