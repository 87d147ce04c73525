"""Background verify ("scrub") of a capture agent's replicas: silent divergence (bit rot, a
bug, a hand edit of a replica) is found and repaired without an attacker's help.

While the capture loop streams (protected: after a verified resync), the scrubber walks each
volume in windows (1 MiB at most): it asks the target for the window's block hashes as its disk
holds them (``BlockHashes`` from_disk with a range; a block staged in the redo journal counts
as its staged content), hashes the same blocks of the volume, and compares. A block is not
judged when the comparison would not be fair:

* the target had not acknowledged it when the window began (in an unreleased or the open
  consistency point, the change bitmap, a resync: ``ChangeJournal.watch`` takes that list);
* it was written while the window was compared (the watch notes every write to the range);
* the loop lost protection meanwhile, or the replica changed generation (a resync replaces
  what the replica holds): the window is compared again later.

A block that still differs is a *mismatch*. It is repaired like a write: the planner forgets
what it believed the replica holds for it (its ``view`` entry) and its current content is
journaled as if a client had written the same bytes, so the next consistency point ships it as
DATA (points never carry COPY records) and the target applies it like any other write. It stays
*unrepaired* until a later check of it, once the target acknowledged the repair, finds it equal
(or the application rewrote it meanwhile: that write replaces the whole block on the replica);
a block still differing is shipped again. The lag counts from when the oldest unrepaired
mismatch was found (:meth:`Scrubber.capture_clock`), so it never reads 0 while one is known.

Pace: windows and re-checks read at most ``rate`` bytes per second of the volume and as many
of the replica (for a whole consistency group: one rate); 0 disables the scrub.

Logging: WARNING, one line per window with new mismatches (volume, the blocks, how many), one
per repair that did not hold (then again only at attempts 2, 4, 8, ...), one when checks start
failing (the target unreachable: the capture loop reports that too); INFO per window of
confirmed repairs, when checks succeed again, and per pass that found mismatches; DEBUG per
clean pass.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable, Container, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from replicator.blockmap import Geometry, hash_range
from replicator.capture.journal import ChangeJournal
from replicator.capture.journal_records import BLOCK_MASK, KEY_SHIFT, block_key
from replicator.driver import PushDriver
from replicator.errors import ProtocolError, ReplicatorError, VolumeError, unwrap_group
from replicator.units import format_bytes
from replicator.waiting import first_of, wait_at_most

log = logging.getLogger(__name__)
T = TypeVar("T")

MAX_WINDOW = 1 << 20  # bytes compared per request
RETRY_SECONDS = 5.0  # after a check that failed (target unreachable, volume unreadable)
RPC_TIMEOUT = 60.0


@dataclass(frozen=True)
class Span:
    """Blocks [first, first + count) of journal volume ``volume``."""

    volume: int
    first: int
    count: int
    recheck: bool = False  # known mismatches whose repair the target acknowledged


@dataclass
class Verdict:
    """What one compared span says, as block numbers."""

    mismatched: list[int] = field(default_factory=list)  # new mismatches
    still: list[int] = field(default_factory=list)  # known ones, differing after a repair
    repaired: list[int] = field(default_factory=list)  # known ones, equal now
    rewritten: list[int] = field(default_factory=list)  # known ones the application rewrote


def judge(span: Span, local: Sequence[int], remote: Sequence[int], unacked: Container[int],
          written: Container[int], known: Container[int]) -> Verdict:
    """Compare the volume's (``local``) and the replica's (``remote``) hashes of ``span``.
    ``unacked``/``written``: block keys the target had not acknowledged when the span's check
    began / written during it; ``known``: keys of unrepaired mismatches."""
    v = Verdict()
    for n, (a, b) in enumerate(zip(local, remote, strict=True)):
        block = span.first + n
        key = block_key(span.volume, block)
        if key in written:
            if key in known:
                v.rewritten.append(block)
        elif key in unacked:
            continue
        elif key in known:
            (v.repaired if a == b else v.still).append(block)
        elif a != b:
            v.mismatched.append(block)
    return v


def runs(blocks: Sequence[int], limit: int = 8) -> str:
    """Sorted block numbers as runs for a log line: "17-19, 40" (at most ``limit`` runs)."""
    out: list[str] = []
    start = prev = -2
    for b in [*blocks, -2]:
        if b == prev + 1:
            prev = b
            continue
        if start >= 0:
            out.append(str(start) if start == prev else f"{start}-{prev}")
        start = prev = b
    return ", ".join(out[:limit]) + (", ..." if len(out) > limit else "")


@dataclass
class _Repair:
    found_at: float  # wall clock: the lag counts from here
    attempts: int = 1


class Scrubber:
    def __init__(self, drivers: list[PushDriver], journal: ChangeJournal, rate: int,
                 stop: asyncio.Event, on_change: Callable[[], None]) -> None:
        self.drivers = drivers
        self.journal = journal
        self.rate = rate
        self.stop = stop
        self.on_change = on_change  # wakes the capture loop: a repair was journaled
        self.window = max(1, min(MAX_WINDOW, max(rate, 1)) // drivers[0].o.block_size)
        self.active = False  # protected: the loop streams points to a verified replica
        self.era = 0  # bumped whenever protection changes
        self._activated = asyncio.Event()
        self.repairs: dict[int, _Repair] = {}  # by block key
        self.oldest: float | None = None  # when the oldest unrepaired mismatch was found
        self.pos = [0] * len(drivers)  # the next block of each volume's pass
        self.volume = 0  # the volume the pass is in
        self.pass_started: list[float | None] = [None] * len(drivers)
        self.pass_found = [0] * len(drivers)
        self.failing = ""  # the error the last check failed with ("": it did not)
        self.fds: list[int] = []
        for d in drivers:
            d.m.set(d.m.verify_rate, rate)
            d.m.set(d.m.verify_unrepaired, 0)
            for f in (d.m.verify_checked, d.m.verify_mismatched, d.m.verify_repaired):
                d.m.add(f, 0)

    # -- the capture loop's hooks ----------------------------------------------------------------

    def set_active(self, on: bool) -> None:
        """The loop's protection changed (a resync replaces what the replica holds)."""
        if on != self.active:
            self.era += 1
            self.active = on
        if on:
            self._activated.set()
        else:
            self._activated.clear()

    def capture_clock(self) -> float | None:
        """For the lag: the older of the journal's oldest unacknowledged write and the oldest
        unrepaired mismatch (None: neither)."""
        times = [t for t in (self.journal.first_dirty_at, self.oldest) if t is not None]
        return min(times) if times else None

    async def alongside(self, main: Coroutine[Any, Any, T]) -> T:
        """Await ``main`` (the capture loop) with the scrub running beside it; what either
        raises comes out as it is (not in a group)."""
        try:
            async with asyncio.TaskGroup() as tg:
                task = tg.create_task(self.run())
                try:
                    return await main
                finally:
                    task.cancel()
        except BaseExceptionGroup as group:
            if len(group.exceptions) == 1:
                raise group.exceptions[0] from None
            raise unwrap_group(group) from None

    # -- the walk --------------------------------------------------------------------------------

    async def run(self) -> None:
        if self.rate <= 0:
            log.info("%s: background verify disabled (rate 0)", self._names())
            return
        log.info("%s: background verify of the replicas at %s/s while protected",
                 self._names(), format_bytes(self.rate))
        try:
            while not self.stop.is_set():
                if not self.active:
                    await first_of(self._activated, self.stop)
                    continue
                started = time.monotonic()
                pause = await self._step()
                await wait_at_most(max(0.0, started + pause - time.monotonic()), self.stop)
        finally:
            for fd in self.fds:
                os.close(fd)
            self.fds.clear()

    async def _step(self) -> float:
        """Open the volumes (until that succeeds), compare the next span and act on what it
        says; the pause before the next step. A failure (the target unreachable, a volume
        unreadable) pauses the verify, not the capture loop: RETRY_SECONDS, then again."""
        vol = 0
        try:
            for vol in range(len(self.fds), len(self.drivers)):
                self.fds.append(_open(self.drivers[vol].o.path))
            span = self._next_span()
            vol = span.volume
            verdict = await self.check(span)
            if verdict is not None:
                await self._act(span, verdict)
        except ReplicatorError as exc:
            self._failed(vol, exc)
            return RETRY_SECONDS
        return max(1, span.count) * self.drivers[span.volume].geo.block_size / self.rate

    def _next_span(self) -> Span:
        """A re-check of known mismatches whose repair the target acknowledged, else the
        next window of the pass."""
        if self.repairs:
            settled = sorted(set(self.repairs) - self.journal.unacknowledged(self.repairs))
            if settled:
                key = settled[0]
                last = max(k for k in settled if k - key < self.window)
                return Span(key >> KEY_SHIFT, key & BLOCK_MASK, last - key + 1, recheck=True)
        vol = self.volume
        first = self.pos[vol]
        if self.pass_started[vol] is None:
            self.pass_started[vol] = time.monotonic()
        return Span(vol, first, max(0, min(self.window, self.drivers[vol].geo.blocks - first)))

    async def check(self, span: Span) -> Verdict | None:
        """Compare ``span`` (None: protection changed meanwhile, compare it again later)."""
        d = self.drivers[span.volume]
        era, generation = self.era, d.state.generation
        lo = block_key(span.volume, span.first)
        watch = self.journal.watch(lo, lo + span.count)
        try:
            local, remote = await self._hashes(span)
        finally:
            self.journal.unwatch(watch)
        if self.failing:
            log.info("%s: background verify resumed", self._names())
            self.failing = ""
        if era != self.era or not self.active or generation != d.state.generation:
            return None
        return judge(span, local, remote, watch.unacked, watch.written, self.repairs)

    async def _hashes(self, span: Span) -> tuple[list[int], list[int]]:
        """The volume's and the replica's (from its disk) hashes of ``span``, read at once."""
        d = self.drivers[span.volume]
        try:
            async with asyncio.TaskGroup() as tg:
                theirs = tg.create_task(d.client.block_hashes(
                    d.o.volume, from_disk=True, timeout=RPC_TIMEOUT, first_block=span.first,
                    count=span.count))
                ours = tg.create_task(asyncio.to_thread(_read_hashes, self.fds[span.volume],
                                                        d.geo, span))
        except BaseExceptionGroup as group:
            raise unwrap_group(group) from None
        remote, size, _seq = theirs.result()
        local = ours.result()
        if size != d.geo.size or len(remote) != len(local):
            raise ProtocolError(f"the target answered {len(remote)} hashes for blocks "
                                f"{span.first}+{span.count} of a {size}-byte replica (the "
                                f"volume has {d.geo.size} bytes; a target without range "
                                "listings?)")
        return local, list(remote)

    # -- what a verdict leads to -----------------------------------------------------------------

    async def _act(self, span: Span, v: Verdict) -> None:
        d = self.drivers[span.volume]
        m, name = d.m, d.o.volume
        bs = d.geo.block_size
        m.add(m.verify_checked, max(0, min(d.geo.size, (span.first + span.count) * bs)
                                    - span.first * bs))
        now = time.time()
        if v.mismatched:
            m.add(m.verify_mismatched, len(v.mismatched))
            self.pass_found[span.volume] += len(v.mismatched)
            log.warning("volume %s: background verify: the replica differs from the volume "
                        "in %d blocks (%s): shipping them again", name, len(v.mismatched),
                        runs(v.mismatched))
            for b in v.mismatched:
                self.repairs[block_key(span.volume, b)] = _Repair(now)
        if v.still:
            attempts = 0
            for b in v.still:
                r = self.repairs[block_key(span.volume, b)]
                r.attempts += 1
                attempts = max(attempts, r.attempts)
            log.log(logging.WARNING if attempts & (attempts - 1) == 0 else logging.DEBUG,
                    "volume %s: background verify: the replica still differs in %d blocks "
                    "shipped again (%s; attempt %d): shipping them again", name,
                    len(v.still), runs(v.still), attempts)
        done = v.repaired + v.rewritten
        if done:
            for b in done:
                del self.repairs[block_key(span.volume, b)]
            m.add(m.verify_repaired, len(done))
            log.info("volume %s: background verify: repaired %d blocks (%s)%s", name,
                     len(done), runs(sorted(done)),
                     f", {len(v.rewritten)} of them rewritten by the application"
                     if v.rewritten else "")
        if v.mismatched or v.still or done:
            self._count_unrepaired()
        if not span.recheck:
            self._advance(span)
        if v.mismatched or v.still:
            await self._reship(span.volume, sorted(v.mismatched + v.still))

    async def _reship(self, vol: int, blocks: list[int]) -> None:
        """Ship ``blocks`` again, as DATA: the planner forgets what it believed the replica
        holds, and their current content is journaled (the same bytes, as if a client had
        written them: the volume does not change). The content is read on a thread with the
        range watched: a block written meanwhile is left out (the application's write ships
        its whole new content, after which ours, read before or during it, must not come).
        A read error raises VolumeError; the blocks stay known mismatches, shipped again at
        their next check."""
        d = self.drivers[vol]
        if d.planner is not None:
            d.planner.forget(blocks)
        spans = _spans(blocks)
        watch = self.journal.watch(block_key(vol, spans[0][0]), block_key(vol, spans[-1][1]))
        bs = d.geo.block_size
        try:
            contents = await asyncio.to_thread(_read_spans, self.fds[vol], d.geo, spans)
            # Under the journal's order lock, which the NBD export's writes hold from their
            # record to their volume write (also on its writer thread): a write is either in
            # the watch already or journaled after these records.
            with self.journal.order:
                for (start, end), data in zip(spans, contents, strict=True):
                    kept = [b for b in range(start, end)
                            if block_key(vol, b) not in watch.written]
                    for first, stop in _spans(kept):
                        self.journal.write(
                            first * bs, data[(first - start) * bs : (stop - start) * bs], vol)
        finally:
            self.journal.unwatch(watch)
        self.on_change()

    def _count_unrepaired(self) -> None:
        counts = [0] * len(self.drivers)
        for key in self.repairs:
            counts[key >> KEY_SHIFT] += 1
        for d, n in zip(self.drivers, counts, strict=True):
            d.m.set(d.m.verify_unrepaired, n)
        self.oldest = min((r.found_at for r in self.repairs.values()), default=None)

    def _advance(self, span: Span) -> None:
        """The window was compared: on to the next; a pass over a volume ends at its end."""
        vol, d = span.volume, self.drivers[span.volume]
        self.pos[vol] = span.first + span.count
        if self.pos[vol] < d.geo.blocks:
            return
        started = self.pass_started[vol] or time.monotonic()
        seconds = time.monotonic() - started
        d.m.set(d.m.verify_last_pass_duration, round(seconds, 3))
        d.m.set(d.m.verify_pass_end, time.time())
        found = self.pass_found[vol]
        log.log(logging.INFO if found else logging.DEBUG, "volume %s: background verify pass "
                "complete in %.0fs: %d mismatched blocks", d.o.volume, seconds, found)
        self.pos[vol], self.pass_started[vol], self.pass_found[vol] = 0, None, 0
        self.volume = (vol + 1) % len(self.drivers)

    def _failed(self, vol: int, exc: ReplicatorError) -> None:
        text = f"{type(exc).__name__}: {exc}"
        if text != self.failing:
            log.warning("volume %s: background verify paused: %s (retrying every %.0fs)",
                        self.drivers[vol].o.volume, exc, RETRY_SECONDS)
        self.failing = text

    def _names(self) -> str:
        return ", ".join(d.o.volume for d in self.drivers)


def _open(path: str) -> int:
    try:
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise VolumeError(f"cannot open the volume {path}: {exc}") from exc


def _read_spans(fd: int, geo: Geometry, spans: list[tuple[int, int]]) -> list[bytes]:
    """The content of blocks [start, end) for each span (on a thread)."""
    out: list[bytes] = []
    for start, end in spans:
        length = min(geo.size, end * geo.block_size) - start * geo.block_size
        try:
            data = os.pread(fd, length, start * geo.block_size)
        except OSError as exc:
            raise VolumeError(f"cannot read the volume at block {start}: {exc}") from exc
        if len(data) != length:
            raise VolumeError(f"cannot read the volume at block {start}: {len(data)} of "
                              f"{length} bytes (the volume shrank?)")
        out.append(data)
    return out


def _read_hashes(fd: int, geo: Geometry, span: Span) -> list[int]:
    try:
        return hash_range(fd, geo, span.first, span.count)
    except OSError as exc:
        if isinstance(exc, VolumeError):
            raise
        raise VolumeError(f"cannot read the volume at block {span.first}: {exc}") from exc


def _spans(blocks: list[int]) -> list[tuple[int, int]]:
    """Sorted block numbers as [start, end) runs."""
    out: list[tuple[int, int]] = []
    for b in blocks:
        if out and out[-1][1] == b:
            out[-1] = (out[-1][0], b + 1)
        else:
            out.append((b, b + 1))
    return out
