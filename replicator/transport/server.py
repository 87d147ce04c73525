"""The target daemon's gRPC service: handshake, ordered delta stream, replica hash listing."""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import time
import uuid
from array import array
from collections.abc import AsyncIterator
from typing import Any, TypeVar, cast

import grpc

from replicator.batch import Batch
from replicator.demotion import Divergence, mark_primary
from replicator.errors import (
    CorruptBatchError,
    ProtocolError,
    ReplicatorError,
    VolumeBusyError,
    VolumeError,
)
from replicator.metrics import TargetMetrics
from replicator.transport import wire
from replicator.transport.applying import Applier
from replicator.transport.slots import SlotRegistry, VolumeSlot

log = logging.getLogger(__name__)
T = TypeVar("T")

GROUP_COMMIT_BYTES = 32 << 20
GROUP_COMMIT_SECONDS = 0.05
QUEUE_DEPTH = 16
STREAM_TAKEOVER_SECONDS = 5.0


class ReplicationService(wire.ReplicationServicer):
    def __init__(self, directory: str, metrics: TargetMetrics, mode: str = "hot") -> None:
        self.directory = directory
        self.metrics = metrics
        self.mode = mode
        self.target_id = f"{os.uname().nodename}:{uuid.uuid4().hex[:8]}"
        self.registry = SlotRegistry(directory, mode)
        self.applier = Applier(self.registry, metrics)

    async def _slot(self, name: str) -> VolumeSlot:
        """Open a replica (once) and, in hot mode, finish what a crash interrupted."""
        slot, opened = await self.registry.get(name)
        if opened and self.mode == "hot":
            await self.applier.apply(slot)
        return slot

    async def apply_all(self) -> None:
        """Warm mode's schedule: apply every replica's complete consistency points."""
        await self.applier.apply_all()

    def close(self) -> None:
        self.registry.close()

    # -- Handshake ---------------------------------------------------------------------------

    async def Handshake(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        if request.protocol_version != wire.PROTOCOL_VERSION:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                f"protocol_version {request.protocol_version} not supported "
                                f"(target speaks {wire.PROTOCOL_VERSION})")
        if request.block_size <= 0 or request.block_size % 512:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                "block_size must be a positive multiple of 512")
        slot = await self._open(request.volume, context)
        replica = slot.replica
        if request.epoch < replica.record.epoch:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                f"stale_epoch: volume {request.volume} is at epoch "
                                f"{replica.record.epoch}, source sent {request.epoch}")
        created = replica.created
        try:
            await slot.run(replica.set_group, request.group, tuple(request.group_members))
            await slot.run(replica.prepare, request.volume_size, request.block_size)
            await slot.run(replica.raise_epoch, request.epoch)
            digest = await slot.run(replica.digest)
        except ProtocolError as exc:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        except OSError as exc:
            await context.abort(grpc.StatusCode.INTERNAL, f"replica I/O error: {exc}")
        replica.created = False
        self.metrics.epoch.labels(replica.name).set(replica.record.epoch)
        self.metrics.applied_seq.labels(replica.name).set(replica.received_seq)
        return wire.ProtoHandshakeResponse(
            protocol_version=wire.PROTOCOL_VERSION,
            generation=replica.record.generation,
            applied_seq=replica.received_seq,
            index_digest=digest,
            replica_size=replica.record.size,
            created=created,
            epoch=replica.record.epoch,
            target_id=self.target_id,
            image_seq=replica.record.applied_seq,
            applied_cp=replica.record.applied_cp,
            mode=self.mode,
            **_divergence_fields(replica.divergence),
        )

    async def _open(self, name: str, context: grpc.aio.ServicerContext) -> VolumeSlot:
        try:
            return await self._slot(name)
        except VolumeBusyError as exc:
            await context.abort(grpc.StatusCode.ABORTED, str(exc))
        except ProtocolError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except ReplicatorError as exc:
            await context.abort(grpc.StatusCode.INTERNAL, str(exc))
        raise AssertionError("unreachable")

    # -- Fence -----------------------------------------------------------------------------

    async def Fence(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        slot = await self._open(request.volume, context)
        replica = slot.replica
        if not replica.record.generation or replica.created:
            await context.abort(grpc.StatusCode.NOT_FOUND,
                                f"volume {request.volume} has no replica here")
        if request.epoch < replica.record.epoch:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                f"stale_epoch: volume {request.volume} is already at epoch "
                                f"{replica.record.epoch}")
        async with slot.stream_lock:  # no stream may stage while the journal is settled
            discarded = await self.applier.settle_for_promotion(slot)
            await slot.run(replica.raise_epoch, request.epoch)
        if discarded:
            log.warning("volume %s: discarded %d staged batches of a consistency point that "
                        "never completed", replica.name, discarded)
            if request.release:
                # Promotion at this site: the image becomes the primary volume. Marked first,
                # so no handshake can open it again once the slot is closed.
                await asyncio.to_thread(mark_primary, self.directory, replica.name,
                                        replica.record.epoch)
        self.metrics.epoch.labels(replica.name).set(replica.record.epoch)
        record = replica.record
        if request.release:
            await self.registry.release(replica.name)
            log.info("volume %s promoted at epoch %d, consistency point %d: released as the "
                     "site's primary volume", replica.name, record.epoch, record.applied_cp)
        else:
            log.info("volume %s fenced at epoch %d, consistency point %d", replica.name,
                     record.epoch, record.applied_cp)
        return wire.ProtoFenceResponse(epoch=record.epoch, applied_cp=record.applied_cp,
                                       discarded_batches=discarded,
                                       generation=record.generation)

    # -- Clone / DropClone -------------------------------------------------------------

    async def Clone(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        slot = await self._open(request.volume, context)
        replica = slot.replica
        if replica.created or not replica.record.size:
            await context.abort(grpc.StatusCode.NOT_FOUND,
                                f"volume {request.volume} has no replica here")
        try:
            # the last complete consistency point (a group's members: the same one)
            path, method = await self.applier.clone(slot, request.name)
        except ProtocolError as exc:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        except OSError as exc:
            await context.abort(grpc.StatusCode.INTERNAL, f"replica I/O error: {exc}")
        log.info("volume %s: clone %s at seq %d (%s)", replica.name, request.name,
                 replica.record.applied_seq, method)
        return wire.ProtoCloneResponse(path=path, applied_seq=replica.record.applied_seq,
                                       method=method, size=replica.record.size)

    async def DropClone(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        slot = await self._open(request.volume, context)
        try:
            path = await self.applier.drop_clone(slot, request.name)
        except ProtocolError as exc:
            await context.abort(grpc.StatusCode.NOT_FOUND, str(exc))
        return wire.ProtoCloneResponse(path=path)

    # -- BlockHashes -------------------------------------------------------------------------

    async def BlockHashes(self, request: Any, context: grpc.aio.ServicerContext
                          ) -> AsyncIterator[Any]:
        slot = await self._open(request.volume, context)
        replica = slot.replica
        if request.from_disk:
            hashes = await slot.run(replica.hashes_from_disk)
        else:
            hashes = await slot.run(lambda: array("Q", replica.index()))
        if sys.byteorder == "big":
            hashes.byteswap()
        per_chunk = 65536
        size, seq = replica.record.size, replica.record.applied_seq
        for first in range(0, max(1, len(hashes)), per_chunk):
            part = hashes[first : first + per_chunk]
            yield wire.ProtoBlockHashesChunk(first_block=first, hashes=part.tobytes(),
                                             replica_size=size, applied_seq=seq)

    # -- Push --------------------------------------------------------------------------------

    async def Push(self, request_iterator: AsyncIterator[Any],  # type: ignore[override]
                   context: grpc.aio.ServicerContext) -> None:
        """Acks are written with context.write() (not yielded) so the reader can run as a task."""
        queue: asyncio.Queue[Any] = asyncio.Queue(QUEUE_DEPTH)
        end = object()

        async def reader() -> None:
            try:
                async for msg in request_iterator:
                    await queue.put(msg)
            finally:
                await queue.put(end)

        try:
            async with asyncio.TaskGroup() as tg:
                task = tg.create_task(reader())
                first = await queue.get()
                if first is end:
                    return
                slot = await self._open(first.volume, context)
                try:
                    await asyncio.wait_for(slot.stream_lock.acquire(), STREAM_TAKEOVER_SECONDS)
                except TimeoutError:
                    task.cancel()
                    await context.abort(grpc.StatusCode.ABORTED,
                                        f"volume_busy: another source is streaming {first.volume}")
                try:
                    await _PushSession(self, slot, context, queue, end).run(first)
                finally:
                    slot.stream_lock.release()
                    task.cancel()
        except BaseExceptionGroup as group:
            # context.abort() raises inside the task group: hand grpc its own AbortError
            # (not a group), so the status reaches the client and nothing is logged as a crash.
            raise _first(group) from None


def _divergence_fields(d: Divergence | None) -> dict[str, Any]:
    if d is None:
        return {}
    blocks = array("Q", d.blocks)
    if sys.byteorder == "big":
        blocks.byteswap()
    return {"diverged": blocks.tobytes(), "diverged_base": d.base_generation, "demoted": True}


def _first(group: BaseExceptionGroup[BaseException]) -> BaseException:
    leaves: list[BaseException] = []

    def walk(g: BaseExceptionGroup[BaseException]) -> None:
        for exc in g.exceptions:
            if isinstance(exc, BaseExceptionGroup):
                walk(exc)
            else:
                leaves.append(exc)

    walk(group)
    for exc in leaves:
        if isinstance(exc, grpc.aio.AbortError):
            return cast(BaseException, exc)
    for exc in leaves:
        if not isinstance(exc, asyncio.CancelledError):
            return exc
    return leaves[0] if leaves else group


class _PushSession:
    """Applies one source stream's batches in order with group commit and go-back-N."""

    def __init__(self, service: ReplicationService, slot: VolumeSlot,
                 context: grpc.aio.ServicerContext, queue: asyncio.Queue[Any],
                 end: object) -> None:
        self.service = service
        self.slot = slot
        self.replica = slot.replica
        self.context = context
        self.queue = queue
        self.end = end
        self.m = service.metrics
        self.name = slot.replica.name
        self.applied = slot.replica.received_seq  # applied or staged, maybe not durable
        self.durable = self.applied  # acknowledged
        self.waiting_for: int | None = None  # after a rejection: only this seq is accepted
        self.group_bytes = 0
        self._commit_target = self.applied
        self.committing: asyncio.Future[None] | None = None
        self.commit_again = False
        self.write_lock = asyncio.Lock()

    async def run(self, msg: Any) -> None:
        """Group commit: make applied batches durable (fdatasync) and ack them when the source
        asks (commit flag, or a seq-0 flush request), when GROUP_COMMIT_BYTES have piled up, or
        when the stream has been idle for GROUP_COMMIT_SECONDS. One commit runs at a time, on
        the sync thread, while later batches are applied."""
        loop = asyncio.get_running_loop()
        group_started = loop.time()
        try:
            while msg is not self.end:
                if msg.seq == 0 and msg.commit:
                    await self.flush()
                else:
                    if self.applied == self.committed:
                        group_started = loop.time()
                    await self.handle(msg)
                age = loop.time() - group_started
                if self.applied > self.committed and (
                        msg.commit or self.group_bytes >= GROUP_COMMIT_BYTES
                        or age >= GROUP_COMMIT_SECONDS):
                    self.start_commit()
                if self.applied > self.committed:
                    try:
                        msg = await asyncio.wait_for(self.queue.get(),
                                                     max(0.0, GROUP_COMMIT_SECONDS - age))
                        continue
                    except TimeoutError:
                        self.start_commit()
                msg = await self.queue.get()
            await self.drain_commits()
        finally:
            if self.committing is not None and not self.committing.done():
                self.committing.cancel()

    async def send(self, ack: Any) -> None:
        async with self.write_lock:
            await self.context.write(ack)

    @property
    def committed(self) -> int:
        """Highest sequence handed to a commit (durable once that commit finishes)."""
        return self._commit_target

    def start_commit(self) -> None:
        if self.committing is not None and not self.committing.done():
            self.commit_again = True
            return
        self._commit_target = self.applied
        self.group_bytes = 0
        self.committing = asyncio.ensure_future(self._commit(self.applied))

    async def _commit(self, seq: int) -> None:
        started = time.perf_counter()
        await self.slot.run_sync(self.replica.commit, seq)
        self.m.commit_seconds.labels(self.name).observe(time.perf_counter() - started)
        self.m.applied_seq.labels(self.name).set(seq)
        self.durable = max(self.durable, seq)
        self.m.staged_batches.labels(self.name).set(len(self.replica.wal.frames))
        await self.send(wire.ack_ok(seq))
        if self.service.mode == "hot":
            await self.service.applier.apply(self.slot, seq)
        if self.commit_again and self.applied > seq:
            self.commit_again = False
            self._commit_target = self.applied
            self.group_bytes = 0
            await self._commit(self.applied)

    async def drain_commits(self) -> None:
        while True:
            if self.committing is not None:
                await self.committing
            if self.applied > self.durable:
                self.commit_again = False
                self.start_commit()
                continue
            return

    async def flush(self) -> None:
        if self.applied > self.durable:
            await self.drain_commits()
        else:
            await self.send(wire.ack_ok(self.durable))

    async def reject(self, seq: int, reason: str, message: str) -> None:
        log.warning("volume %s: rejected batch %d (%s): %s", self.name, seq, reason, message)
        self.m.rejected.labels(self.name, reason).inc()
        self.waiting_for = seq
        await self.send(wire.ack_rejected(self.durable, seq, reason, message))

    async def handle(self, msg: Any) -> None:
        if msg.volume != self.name:
            await self.context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                     f"stream is for volume {self.name}, batch names {msg.volume}")
        if msg.epoch < self.replica.record.epoch:
            self.m.rejected.labels(self.name, "stale_epoch").inc()
            await self.context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                     f"stale_epoch: volume {self.name} is at epoch "
                                     f"{self.replica.record.epoch}, batch {msg.seq} has "
                                     f"{msg.epoch}")
        if msg.seq <= self.applied:
            return  # a resend of something already applied: idempotent
        if self.waiting_for is not None and msg.seq != self.waiting_for:
            return  # go-back-N: drop everything until the rejected batch comes again
        if msg.seq != self.applied + 1:
            await self.reject(self.applied + 1, "out_of_order",
                              f"expected batch {self.applied + 1}, got {msg.seq}")
            return
        if msg.epoch > self.replica.record.epoch:
            await self.slot.run(self.replica.raise_epoch, msg.epoch)
            self.m.epoch.labels(self.name).set(msg.epoch)
        try:
            written, payload_len = await self.slot.run(self._apply, msg)
        except CorruptBatchError as exc:
            await self.reject(msg.seq, exc.reason, str(exc))
            return
        except (OSError, VolumeError) as exc:
            await self.context.abort(grpc.StatusCode.INTERNAL, f"replica I/O error: {exc}")
        self.waiting_for = None
        self.applied = msg.seq
        self.group_bytes += written
        self.m.applied_bytes.labels(self.name).inc(written)
        self.m.received_bytes.labels(self.name).inc(payload_len)

    def _apply(self, msg: Any) -> tuple[int, int]:
        """On the volume thread: convert (copies the payload once), then apply or stage."""
        batch: Batch = wire.batch_from_proto(msg)
        if self.replica.must_stage(batch):
            return self.replica.stage(batch), len(batch.payload)
        return self.replica.apply(batch), len(batch.payload)
