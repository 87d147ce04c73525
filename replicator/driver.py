"""The push driver: scan -> plan -> ship -> ack, resuming across failures.

One *pass* compares the whole volume with the replica's view and ships the difference. A
producer thread scans and plans (hashing and zstd release little of the GIL, but keep the event
loop free for gRPC); the event loop sends batches within a byte window and a token bucket,
and reads cumulative acks. Failures are classified:

* TEMPORARY (target unavailable, stream reset, volume busy): reconnect with backoff, handshake,
  drop what the target acknowledged, resend the rest in order (same sequence numbers).
* REJECTED batch (checksum, block hash, order): go-back-N from the rejected sequence; a refused
  COPY is resent as DATA and the view is re-checked against the target after the pass.
* REPLAN (replica recreated): re-plan from the target's real content.
* PERMANENT (stale epoch, protocol, local I/O): raised to the caller.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
import time
from array import array
from collections import OrderedDict
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from tenacity import (
    AsyncRetrying,
    retry_if_exception_type,
    stop_after_delay,
    stop_never,
    wait_exponential,
)

from replicator.batch import Kind
from replicator.blockmap import (
    CHUNK_BLOCKS,
    UNKNOWN,
    ChunkSource,
    Geometry,
    MappedVolume,
    PreadVolume,
    ScanWindow,
    hash_all,
    scan_chunks,
)
from replicator.errors import (
    ProtocolError,
    ReplanNeededError,
    TargetUnavailableError,
    VerificationError,
    VolumeBusyError,
    unwrap_group,
)
from replicator.metrics import SourceMetrics
from replicator.planning import PlannedBatch, Planner
from replicator.replica import index_digest
from replicator.report import PushReport, PushState
from replicator.source_state import SourceState, StateStore
from replicator.throttle import TokenBucket
from replicator.transport import wire
from replicator.transport.client import HandshakeInfo, PushCall, TargetClient, token_file
from replicator.transport.security import ChannelSecurity, TlsConfig

log = logging.getLogger(__name__)

MAX_REJECTS_PER_BATCH = 8
DEFAULT_VERIFY_RATE = 2 << 20  # bytes/s of the background verify: 100 GiB in about 14 hours
MAX_VERIFY_ROUNDS = 3


@dataclass
class PushOptions:
    path: str
    address: str
    volume: str
    state_dir: str
    rate_limit: int | None = None
    once: bool = False
    block_size: int = 4096
    epoch: int = 0
    compress_level: int = 1
    dedup: bool = True
    interval: float = 1.0
    window_bytes: int = 64 << 20
    # --once: the target must answer within this before anything else (TargetUnavailableError,
    # exit 69, as verify); None: wait for it (a running agent)
    connect_timeout: float | None = None
    # a target that does not answer a handshake is retried this long (None: until it does)
    retry_timeout: float | None = 120.0
    verify_from_disk: bool = False
    save_interval: float = 10.0
    rpo_budget: float = 0.0
    nbd_listen: str | None = None  # serve the volume over NBD and ship captured writes
    journal_limit: int = 1 << 30  # past this the capture falls back to a change bitmap
    # cut a consistency point when writes wait this long unflushed (0: as soon as the stream
    # has sent the points before)
    cp_interval: float = 0.0
    group: str = ""  # consistency group this volume belongs to ("": none)
    group_members: tuple[str, ...] = ()
    security: ChannelSecurity | None = None  # mutual TLS to the target (None: from the env)
    epoch_token: str | None = None  # file holding the controller's token for ``epoch``
    # with write capture: background verify of the replica, bytes/s (0: off; capture/scrub.py)
    verify_rate: int = DEFAULT_VERIFY_RATE
    # serve the NBD export over mandatory mutual TLS with this (site) certificate (--nbd-tls)
    nbd_tls: TlsConfig | None = None
    # the operators who may attach to it besides its own site (--nbd-allow; "*": any)
    nbd_allow: frozenset[str] = frozenset()


@dataclass
class Progress:
    total: int = 0
    scanned: int = 0  # volume bytes of this pass checked so far
    acked_raw: int = 0
    pass_planned: int = 0  # raw bytes this pass planned for shipping
    pass_acked: int = 0  # ... of which the target acknowledged
    started: float = field(default_factory=time.monotonic)


@dataclass
class _Totals:
    wire_bytes: int = 0
    resent: int = 0
    reconnects: int = 0
    listing_fetched: bool = False
    verified: bool = False


class PushDriver:
    def __init__(self, opts: PushOptions, metrics: SourceMetrics) -> None:
        self.o = opts
        self.m = metrics
        self.store = StateStore(opts.state_dir, opts.path, opts.nbd_listen is not None)
        self.state: SourceState = self.store.load()
        self.client = TargetClient(opts.address, opts.security,
                                   token_file(opts.epoch_token) if opts.epoch_token else None)
        self.vol: MappedVolume | None = None
        self.geo = Geometry(0, opts.block_size)
        self.bucket = TokenBucket(opts.rate_limit) if opts.rate_limit else None
        self.progress = Progress()
        self.totals = _Totals()
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="push-plan")
        self.pending: OrderedDict[int, PlannedBatch] = OrderedDict()
        self.rejects: dict[int, int] = {}
        self.acked_seq = 0
        self._seq = 0
        self._unacked_raw = 0
        self._unacked_lock = threading.Lock()
        self._producer_done = False
        self._needs_reconcile = False
        self._window_open = asyncio.Event()
        self._all_acked = asyncio.Event()
        self.dirty_since: float | None = None
        self.clean_as_of: float | None = None  # the replica held everything written before this
        # With write capture: when the oldest unshipped write was acknowledged (exact lag).
        self.capture_clock: Callable[[], float | None] | None = None
        # Write capture's hooks (on the event loop): a batch handed to the stream, an ack.
        self.on_sent: Callable[[PlannedBatch], None] | None = None
        self.on_acked: Callable[[int], None] | None = None
        self.pass_abort: threading.Event | None = None  # set when the running pass ends
        self._last_save = 0.0
        self.handshake_info: HandshakeInfo | None = None  # the target's last answer
        self.planner: Planner | None = None
        # Encoded messages of unacknowledged batches, by sequence (kept apart from PlannedBatch
        # so the planner never sees generated code).
        self._protos: dict[int, bytes] = {}
        metrics.set(metrics.rate_limit, opts.rate_limit or 0)
        metrics.set(metrics.rpo_budget, opts.rpo_budget)
        metrics.refresh = self.update_gauges

    # -- lifecycle ---------------------------------------------------------------------------

    async def close(self) -> None:
        self.pool.shutdown(wait=True)
        await self.client.close()
        if self.vol is not None:
            self.vol.close()
        self.store.close()

    def open_volume(self) -> None:
        if self.vol is None:
            self.vol = MappedVolume(self.o.path)
        else:
            self.vol.remap()
        self.geo = Geometry(self.vol.size, self.o.block_size)
        self.progress.total = self.vol.size

    # -- handshake and reconciliation ----------------------------------------------------------

    async def handshake(self) -> HandshakeInfo:
        retrying = AsyncRetrying(
            retry=retry_if_exception_type((TargetUnavailableError, VolumeBusyError)),
            wait=wait_exponential(multiplier=0.2, max=2.0),
            stop=(stop_after_delay(self.o.retry_timeout) if self.o.retry_timeout
                  else stop_never),
            reraise=True,
            before_sleep=lambda rs: log.warning(
                "volume %s: waiting for target %s (%s): retrying %s", self.o.volume,
                self.o.address, rs.outcome.exception() if rs.outcome else "?",
                f"for up to {self.o.retry_timeout:g}s" if self.o.retry_timeout
                else "until it answers"),
        )
        async for attempt in retrying:
            with attempt:
                self.handshake_info = await self.client.handshake(self.o.volume, self.geo.size,
                                                   self.geo.block_size, self.state.source_id,
                                                   self.o.epoch, timeout=10.0,
                                                   group=self.o.group,
                                                   members=self.o.group_members)
                return self.handshake_info
        raise AssertionError("unreachable")

    async def reconcile(self, keep_view: bool = False) -> bool:
        """Agree with the target on what the replica holds before planning anything; True if
        the saved view was kept on the caller's word (``keep_view``: capture/resume.py)."""
        info = await self.handshake()
        st = self.state
        same = (st.size == self.geo.size and st.block_size == self.geo.block_size
                and st.generation == info.generation and len(st.view) == self.geo.blocks)
        kept = keep_view and same and info.applied_seq >= st.acked_seq
        trusted = kept or (same and st.acked_seq == info.applied_seq
                           and index_digest(st.view) == info.index_digest)
        if trusted and not kept:
            log.info("volume %s: saved state matches the replica at seq %d", self.o.volume,
                     info.applied_seq)
        elif info.created and not kept:
            st.view = self.store.set_view(self.geo.zero_hashes())
        elif not kept:
            log.info("volume %s: saved state does not match the replica: fetching its block "
                     "hashes", self.o.volume)
            view, size, _seq = await self.client.block_hashes(self.o.volume)
            if size != self.geo.size or len(view) != self.geo.blocks:
                raise ProtocolError(f"replica listing has {len(view)} blocks of size {size}, "
                                    f"expected {self.geo.blocks} of {self.geo.size}")
            st.view = self.store.set_view(view)
            self.totals.listing_fetched = True
        if not trusted or len(st.seen) != self.geo.chunks:
            st.seen = array("Q", [UNKNOWN]) * self.geo.chunks
        st.generation, st.size, st.block_size = info.generation, self.geo.size, self.geo.block_size
        st.acked_seq = info.applied_seq
        self.acked_seq = info.applied_seq
        self._seq = info.applied_seq
        self.pending.clear()
        with self._unacked_lock:
            self._unacked_raw = 0
        self.m.set(self.m.acked_seq, self.acked_seq)
        capture = self.o.nbd_listen is not None
        # A COPY reads another block when applied: the target's redo journal (capture, warm
        # mode) only takes idempotent DATA and ZERO records.
        self.planner = Planner(self.o.volume, self.o.epoch, self.geo, st.view, st.seen,
                               dedup=self.o.dedup and not capture and info.mode != "warm",
                               compress_level=self.o.compress_level, activity=self.store.al)
        self.planner.staged = capture  # consistency points: the target stages everything
        return kept

    def save_state(self, clean: bool = False) -> None:
        """``clean``: the agent stops (the volume synced, its identity noted: resume.py)."""
        self.state.acked_seq = self.acked_seq
        self.store.save(self.state, clean, self.vol.fd if self.vol is not None else None)
        self._last_save = time.monotonic()

    def save_due(self) -> bool:
        return time.monotonic() - self._last_save >= self.o.save_interval

    async def save_if_due(self) -> None:
        """Save the resume state if ``save_interval`` has passed since the last save."""
        if self.save_due():
            await asyncio.to_thread(self.save_state)

    # -- one pass --------------------------------------------------------------------------

    async def run_pass(self, blocks: set[int] | None = None) -> bool:
        """Ship every difference between the volume and the replica (or, with ``blocks``
        from write capture, only those blocks' chunks: no scan). True if anything changed."""
        chunks = None if blocks is None else sorted({b // CHUNK_BLOCKS for b in blocks
                                                     if b < self.geo.blocks})
        return await self.run_planned(lambda: self._scan_plan(chunks))

    def _scan_plan(self, chunks: list[int] | None) -> Iterator[PlannedBatch]:
        assert self.vol is not None and self.planner is not None
        view = self.vol.view  # the chunks given (a resync of the journal's): read with pread
        src: ChunkSource = view if chunks is None else PreadVolume(self.vol.fd)
        p = self.progress
        p.scanned = p.pass_planned = p.pass_acked = 0
        cb = self.geo.chunk_bytes
        # the pass checks the volume, or only the chunks given (write capture)
        p.total = self.geo.size if chunks is None else min(self.geo.size, len(chunks) * cb)
        windows = (scan_chunks(view, self.geo, self.state.seen) if chunks is None else
                   [ScanWindow(chunks, p.total)])
        for window in windows:
            # the window's unchanged chunks are checked; the others as they are planned, a
            # batch's worth at a time (a window is 64 MiB: a 256 MiB volume moved in quarters)
            todo = window.chunks
            p.scanned += max(0, window.scanned_bytes - len(todo) * cb)
            step = max(1, self.planner.max_blocks // CHUNK_BLOCKS)
            for i in range(0, len(todo), step):
                group = todo[i:i + step]
                yield from self.planner.plan(src, group, self.next_seq)
                p.scanned += len(group) * cb
        p.scanned = min(p.scanned, p.total) if p.total else p.scanned

    async def run_planned(self, plan: Callable[[], Iterator[PlannedBatch]]) -> bool:
        """One pass: ``plan()`` runs on the planning thread; its batches are shipped in order
        and the pass returns once the target acknowledged all of them."""
        assert self.vol is not None and self.planner is not None
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[PlannedBatch | None] = asyncio.Queue(maxsize=8)
        abort = self.pass_abort = threading.Event()
        # For a one-shot sync the oldest unshipped write is at most as old as the file's mtime;
        # a running agent has already noted the poll that saw the change (note_dirty).
        pass_started = time.time()
        estimate = min(pass_started, os.stat(self.o.path).st_mtime)
        self._producer_done = False
        self._all_acked.clear()
        self._window_open.set()
        changed_before = self.planner.stats.changed_blocks
        producer = loop.run_in_executor(self.pool, self._produce, queue, loop, abort, estimate,
                                        plan)
        try:
            await self._ship(queue)
        finally:
            abort.set()
            while not queue.empty():
                queue.get_nowait()
            with contextlib.suppress(Exception):
                await producer
        await producer  # re-raise a producer failure
        changed = self.planner.stats.changed_blocks != changed_before
        if not self.pending:
            if changed and self.dirty_since is not None and self.capture_clock is None:
                # a scanning agent's lag at acknowledgement: the pass's oldest change
                self.m.observe(self.m.ack_lag, max(0.0, time.time() - self.dirty_since))
            self.dirty_since = None
            self.clean_as_of = pass_started
            self.update_gauges()
        return changed

    def still_clean(self, as_of: float) -> None:
        """A poll found the volume unchanged since the last pass began, and that pass is
        acknowledged: the replica holds everything written before ``as_of``."""
        if not self.pending and self.dirty_since is None and self.clean_as_of is not None:
            self.clean_as_of = max(self.clean_as_of, as_of)

    def note_dirty(self, since: float) -> None:
        """The volume changed after ``since`` (wall clock): lag counts from there."""
        if self.dirty_since is None:
            self.dirty_since = since

    def next_seq(self) -> int:
        self._seq += 1
        return self._seq

    def _produce(self, queue: asyncio.Queue[PlannedBatch | None], loop: asyncio.AbstractEventLoop,
                 abort: threading.Event, estimate: float,
                 plan: Callable[[], Iterator[PlannedBatch]]) -> None:
        def put(item: PlannedBatch | None) -> bool:
            fut = asyncio.run_coroutine_threadsafe(queue.put(item), loop)
            while True:
                try:
                    fut.result(timeout=0.2)
                    return True
                except TimeoutError:
                    if abort.is_set():
                        fut.cancel()
                        return False

        for planned in plan():
            if abort.is_set():
                return
            if self.dirty_since is None and self.capture_clock is None:
                self.dirty_since = estimate
            self._encoded(planned)
            with self._unacked_lock:
                self._unacked_raw += planned.raw_bytes
            self.progress.pass_planned += planned.raw_bytes
            self.m.add(self.m.written, planned.raw_bytes)
            kinds = planned.batch.kinds
            self.m.add(self.m.skipped, kinds.count(Kind.ZERO), "zero")
            self.m.add(self.m.skipped, kinds.count(Kind.COPY), "dedup")
            if not put(planned):
                return
        put(None)

    # -- shipping ------------------------------------------------------------------------------

    async def _ship(self, queue: asyncio.Queue[PlannedBatch | None]) -> None:
        while True:
            call = self.client.push()
            try:
                await self._stream(call, queue)
                return
            except BaseException as exc:
                # Any failure ends this stream, so the target releases the volume's stream
                # lock at once (else a retry finds it busy until the connection dies).
                call.cancel()
                if not isinstance(exc, (TargetUnavailableError, VolumeBusyError)):
                    raise
                self.totals.reconnects += 1
                self.m.add(self.m.reconnects, 1)
                log.warning("volume %s: stream to %s failed (%s): reconnecting", self.o.volume,
                            self.o.address, exc)
                info = await self.handshake()
                if info.generation != self.state.generation:
                    raise ReplanNeededError(
                        f"replica {self.o.volume} was recreated on {self.o.address}") from exc
                self._ack_through(info.applied_seq)

    async def _stream(self, call: PushCall, queue: asyncio.Queue[PlannedBatch | None]) -> None:
        lock = asyncio.Lock()
        try:
            async with asyncio.TaskGroup() as tg:
                acks = tg.create_task(self._read_acks(call, lock))
                async with lock:
                    for planned in list(self.pending.values()):
                        await self._send(call, planned, resent="reconnect")
                while not self._producer_done:
                    await self._window_open.wait()
                    item = await queue.get()
                    if item is None:
                        self._producer_done = True
                        break
                    planned = item
                    self.pending[planned.batch.seq] = planned
                    self._update_window()
                    async with lock:
                        if planned.batch.seq in self.pending:
                            await self._send(call, planned)
                if self.pending:
                    async with lock:
                        await call.write(wire.encode_flush(self.o.volume, self.o.epoch))
                self._check_all_acked()
                await self._all_acked.wait()
                await call.done_writing()
                await acks
        except BaseExceptionGroup as group:
            raise unwrap_group(group) from None

    def _encoded(self, planned: PlannedBatch) -> bytes:
        """The batch serialised for the wire, kept until acknowledged (re-encoded if the batch
        was rebuilt)."""
        encoded = self._protos.get(planned.batch.seq)
        if encoded is None:
            encoded = self._protos[planned.batch.seq] = wire.encode_batch(planned.batch)
            planned.batch.wire_size = len(encoded)
        return encoded

    async def _send(self, call: PushCall, planned: PlannedBatch, resent: str = "") -> None:
        encoded = self._encoded(planned)
        size = len(encoded)
        if self.bucket is not None:
            await self.bucket.acquire(size)
        await call.write(encoded)
        if self.on_sent is not None:
            self.on_sent(planned)
        self.totals.wire_bytes += size
        self.m.add(self.m.shipped_compressed, len(planned.batch.payload))
        self.m.add(self.m.shipped_raw, planned.batch.raw_length)
        if resent:
            self.totals.resent += 1
            self.m.add(self.m.resent, 1, resent)

    async def _read_acks(self, call: PushCall, lock: asyncio.Lock) -> None:
        async for ack in call.acks():
            self._ack_through(ack.acked_seq)
            if ack.status == wire.ACK_REJECTED:
                await self._on_reject(call, lock, ack)

    async def _on_reject(self, call: PushCall, lock: asyncio.Lock, ack: Any) -> None:
        seq = ack.rejected_seq
        count = self.rejects[seq] = self.rejects.get(seq, 0) + 1
        log.warning("volume %s: batch %d rejected (%s: %s), resending", self.o.volume, seq,
                    ack.reason, ack.message)
        if count > MAX_REJECTS_PER_BATCH:
            raise ProtocolError(f"batch {seq} rejected {count} times, last: {ack.message}")
        if ack.reason == "copy_mismatch" and self.planner is not None:
            self._needs_reconcile = True
            for s, planned in self.pending.items():
                if s >= seq and planned.copy_data:
                    planned.batch = self.planner.without_copies(planned)
                    self._protos.pop(s, None)
        async with lock:
            for s, planned in list(self.pending.items()):
                if s >= seq:
                    await self._send(call, planned, resent=ack.reason or "rejected")

    def _ack_through(self, seq: int) -> None:
        self.acked_seq = max(self.acked_seq, seq)
        released = 0
        while self.pending:
            first = next(iter(self.pending))
            if first > seq:
                break
            planned = self.pending.pop(first)
            self._protos.pop(first, None)
            self.rejects.pop(first, None)
            released += planned.raw_bytes
        with self._unacked_lock:
            self._unacked_raw -= released
        self.progress.acked_raw += released
        self.progress.pass_acked += released
        self.m.set(self.m.acked_seq, self.acked_seq)
        if self.on_acked is not None:
            self.on_acked(self.acked_seq)
        self.update_gauges()
        self._update_window()
        self._check_all_acked()

    def _update_window(self) -> None:
        inflight = sum(p.batch.wire_size for p in self.pending.values())
        if inflight < self.o.window_bytes:
            self._window_open.set()
        else:
            self._window_open.clear()

    def _check_all_acked(self) -> None:
        if self._producer_done and not self.pending:
            self._all_acked.set()

    def update_gauges(self) -> None:
        with self._unacked_lock:
            unacked = self._unacked_raw
        self.m.set(self.m.pending, max(0, unacked))
        self.m.set(self.m.lag, self.lag())

    def lag(self) -> float:
        """Seconds since the oldest write the replica may not hold (an upper bound)."""
        now = time.time()
        if self.capture_clock is not None:
            since = self.capture_clock()
            oldest = min(t for t in (since, self.dirty_since) if t is not None) \
                if since is not None or self.dirty_since is not None else None
            return 0.0 if oldest is None else max(0.0, now - oldest)
        if self.dirty_since is not None:
            return max(0.0, now - self.dirty_since)
        if self.clean_as_of is None:
            return 0.0
        try:
            mtime = os.stat(self.o.path).st_mtime
        except OSError:
            return 0.0
        # written after the last clean pass began, not yet picked up by a scan
        return max(0.0, now - self.clean_as_of) if mtime > self.clean_as_of else 0.0

    # -- verification ---------------------------------------------------------------------

    async def verify(self) -> bool:
        """Does the replica hold exactly the view, at the sequence we were acked?"""
        info = await self.handshake()
        if info.generation != self.state.generation:
            return False
        if info.applied_seq != self.acked_seq or info.index_digest != index_digest(
                self.state.view):
            return False
        if self.o.verify_from_disk:
            assert self.vol is not None
            remote, _size, _seq = await self.client.block_hashes(self.o.volume, from_disk=True)
            local = await asyncio.to_thread(hash_all, self.vol.view, self.geo)
            return remote == local
        return True

    async def sync_once(self) -> None:
        """Bring the replica to equal the volume, verified, retrying whole passes if needed."""
        self.open_volume()
        if self.o.connect_timeout is not None:  # a one-shot command: not reached, say so
            await self.client.connect(self.o.connect_timeout)
        await self.reconcile()
        log.debug("volume %s: reconciled at seq %d", self.o.volume, self.acked_seq)
        for _round in range(MAX_VERIFY_ROUNDS):
            try:
                await self.run_pass()
            except ReplanNeededError as exc:
                log.warning("%s: planning again", exc)
                await self.reconcile()
                continue
            log.debug("volume %s: pass shipped, verifying", self.o.volume)
            if not self._needs_reconcile and await self.verify():
                self.totals.verified = True
                log.debug("volume %s: verified at seq %d", self.o.volume, self.acked_seq)
                return
            log.warning("volume %s: replica differs from the planned view: re-listing it",
                        self.o.volume)
            self._needs_reconcile = False
            self.state.generation = ""
            await self.reconcile()
        raise VerificationError(f"volume {self.o.volume}: replica still differs after "
                                f"{MAX_VERIFY_ROUNDS} rounds")

    def report(self, state: PushState, seconds: float) -> PushReport:
        st = self.planner.stats if self.planner else None
        return PushReport(
            volume=self.o.volume, target=self.o.address, state=state,
            volume_bytes=self.geo.size, scanned_bytes=self.progress.scanned,
            changed_blocks=st.changed_blocks if st else 0,
            data_blocks=st.data_blocks if st else 0, zero_blocks=st.zero_blocks if st else 0,
            dedup_blocks=st.dedup_blocks if st else 0, raw_bytes=st.raw_bytes if st else 0,
            payload_bytes=st.payload_bytes if st else 0, wire_bytes=self.totals.wire_bytes,
            batches=st.batches if st else 0, resent_batches=self.totals.resent,
            reconnects=self.totals.reconnects, acked_seq=self.acked_seq,
            full_listing_fetched=self.totals.listing_fetched, verified=self.totals.verified,
            seconds=round(seconds, 3),
        )

