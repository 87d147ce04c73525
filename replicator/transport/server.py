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

from replicator.batch import MAX_BATCH_RAW, MAX_BATCH_RECORDS, Batch, Compression
from replicator.demotion import Divergence, mark_primary
from replicator.errors import (
    CorruptBatchError,
    ProtocolError,
    QuotaExceededError,
    ReplicatorError,
    StreamRefused,
    VolumeBusyError,
    VolumeError,
    VolumeNotFoundError,
)
from replicator.metrics import TargetMetrics
from replicator.replica import Replica, check_volume_name
from replicator.transport import wire
from replicator.transport.applying import Applier
from replicator.transport.slots import Limits, SlotRegistry, VolumeSlot

log = logging.getLogger(__name__)
T = TypeVar("T")

GROUP_COMMIT_BYTES = 32 << 20
GROUP_COMMIT_SECONDS = 0.05
QUEUE_DEPTH = 16
STREAM_TAKEOVER_SECONDS = 5.0
MAX_BLOCK_SIZE = 1 << 20
MAX_GROUP_MEMBERS = 64


class ReplicationService(wire.ReplicationServicer):
    """Nothing a caller sends is taken before it is checked: sizes and enums (INVALID_ARGUMENT),
    the target's quotas (RESOURCE_EXHAUSTED), every batch (checksum, hashes, sequence; a resend
    only if it is the batch taken under its number). Every change of state (a replica created,
    resized, its epoch raised, fenced or promoted, a clone made or dropped, a forged resend
    refused) is logged in one line naming the peer."""

    def __init__(self, directory: str, metrics: TargetMetrics, mode: str = "hot",
                 limits: Limits | None = None) -> None:
        self.directory = directory
        self.metrics = metrics
        self.mode = mode
        self.limits = limits or Limits()
        self.target_id = f"{os.uname().nodename}:{uuid.uuid4().hex[:8]}"
        self.registry = SlotRegistry(directory, mode, self.limits)
        self.applier = Applier(self.registry, metrics)

    async def _slot(self, name: str, create: bool = False) -> VolumeSlot:
        """Open a replica (once; ``create``: make it if there is none) and, in hot mode,
        finish what a crash interrupted."""
        slot, opened = await self.registry.get(name, create)
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
        bad = _handshake_error(request, self.limits)
        if bad:
            await _refuse(context, grpc.StatusCode.INVALID_ARGUMENT, "handshake",
                          request.volume, bad)
        slot = await self._open(request.volume, context, create=True)
        replica = slot.replica
        if request.epoch < replica.record.epoch:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                f"stale_epoch: volume {request.volume} is at epoch "
                                f"{replica.record.epoch}, source sent {request.epoch}")
        created = replica.created
        before = (replica.record.epoch, replica.group, replica.members)
        old_size = replica.record.size
        try:
            old_size = await slot.run(replica.prepare, request.volume_size, request.block_size,
                                      self.limits.allow_shrink)
            await slot.run(replica.set_group, request.group, tuple(request.group_members))
            await slot.run(replica.raise_epoch, request.epoch)
            digest = await slot.run(replica.digest)
        except ProtocolError as exc:
            _log_handshake(replica, context.peer(), created, old_size, before)  # done so far
            await _refuse(context, grpc.StatusCode.FAILED_PRECONDITION, "handshake",
                          request.volume, str(exc))
        except OSError as exc:
            await context.abort(grpc.StatusCode.INTERNAL, f"replica I/O error: {exc}")
        replica.created = False
        _log_handshake(replica, context.peer(), created, old_size, before)
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

    async def _open(self, name: str, context: grpc.aio.ServicerContext,
                    create: bool = False) -> VolumeSlot:
        """The slot of an existing replica (``create``: a handshake may make one)."""
        try:
            return await self._slot(name, create)
        except VolumeBusyError as exc:
            await context.abort(grpc.StatusCode.ABORTED, str(exc))
        except VolumeNotFoundError as exc:
            await context.abort(grpc.StatusCode.NOT_FOUND, str(exc))
        except QuotaExceededError as exc:
            await _refuse(context, grpc.StatusCode.RESOURCE_EXHAUSTED, "handshake", name,
                          str(exc))
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
        was = replica.record.epoch
        async with slot.stream_lock:  # no stream may stage while the journal is settled
            discarded = await self.applier.settle_for_promotion(slot)
            await slot.run(replica.raise_epoch, request.epoch)
        if discarded:
            log.warning("volume %s: discarded %d staged batches of a consistency point that "
                        "never completed", replica.name, discarded)
        if request.release:
            # Promotion at this site: the image becomes the primary volume. Marked first, so
            # no handshake can open it again once the slot is closed.
            await asyncio.to_thread(mark_primary, self.directory, replica.name,
                                    replica.record.epoch, replica.record.applied_cp)
        self.metrics.epoch.labels(replica.name).set(replica.record.epoch)
        record = replica.record
        peer = context.peer()
        if request.release:
            await self.registry.release(replica.name)
            log.info("volume %s promoted by %s at epoch %d (was %d), consistency point %d: "
                     "released as the site's primary volume", replica.name, peer,
                     record.epoch, was, record.applied_cp)
        else:
            log.info("volume %s fenced by %s at epoch %d (was %d), consistency point %d",
                     replica.name, peer, record.epoch, was, record.applied_cp)
        return wire.ProtoFenceResponse(epoch=record.epoch, applied_cp=record.applied_cp,
                                       discarded_batches=discarded,
                                       generation=record.generation)

    # -- Clone / DropClone -------------------------------------------------------------

    async def Clone(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        await self._check_clone_name(request, context)
        slot = await self._open(request.volume, context)
        replica = slot.replica
        if replica.created or not replica.record.size:
            await context.abort(grpc.StatusCode.NOT_FOUND,
                                f"volume {request.volume} has no replica here")
        try:
            # the last complete consistency point (a group's members: the same one)
            path, method = await self.applier.clone(slot, request.name)
        except QuotaExceededError as exc:
            await _refuse(context, grpc.StatusCode.RESOURCE_EXHAUSTED, "clone", request.volume,
                          str(exc))
        except ProtocolError as exc:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        except OSError as exc:
            await context.abort(grpc.StatusCode.INTERNAL, f"replica I/O error: {exc}")
        log.info("volume %s: clone %s made by %s at seq %d (%s)", replica.name, request.name,
                 context.peer(), replica.record.applied_seq, method)
        return wire.ProtoCloneResponse(path=path, applied_seq=replica.record.applied_seq,
                                       method=method, size=replica.record.size)

    async def DropClone(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        await self._check_clone_name(request, context)
        slot = await self._open(request.volume, context)
        try:
            path = await self.applier.drop_clone(slot, request.name)
        except ProtocolError as exc:
            await context.abort(grpc.StatusCode.NOT_FOUND, str(exc))
        log.info("volume %s: clone %s dropped by %s", slot.replica.name, request.name,
                 context.peer())
        return wire.ProtoCloneResponse(path=path)

    @staticmethod
    async def _check_clone_name(request: Any, context: grpc.aio.ServicerContext) -> None:
        try:
            check_volume_name(request.name)
        except ProtocolError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"clone name: {exc}")

    # -- BlockHashes -------------------------------------------------------------------------

    async def BlockHashes(self, request: Any, context: grpc.aio.ServicerContext
                          ) -> AsyncIterator[Any]:
        """The whole listing, or a range (a background verify: from the disk, a staged block
        as its staged content's hash, see Replica.hashes_in)."""
        slot = await self._open(request.volume, context)
        replica = slot.replica
        start, count = request.first_block, request.count
        if start > replica.geometry.blocks:
            await _refuse(context, grpc.StatusCode.INVALID_ARGUMENT, "block listing",
                          request.volume, f"first_block {start} is past the replica's "
                          f"{replica.geometry.blocks} blocks")
        if (start or count) and request.from_disk:
            hashes = array("Q")
            end = min(replica.geometry.blocks, start + (count or replica.geometry.blocks))
            for at in range(start, end, 64):  # the volume's thread applies between pieces
                hashes.extend(await slot.run(replica.hashes_in, at, min(64, end - at)))
        elif request.from_disk:
            hashes = await slot.run(replica.hashes_from_disk)
        else:
            hashes = await slot.run(replica.listing, start, count)
        if sys.byteorder == "big":
            hashes.byteswap()
        per_chunk = 65536
        size, seq = replica.record.size, replica.record.applied_seq
        for first in range(0, max(1, len(hashes)), per_chunk):
            part = hashes[first : first + per_chunk]
            yield wire.ProtoBlockHashesChunk(first_block=start + first, hashes=part.tobytes(),
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
            except StreamRefused as refused:
                await queue.put(refused)  # the handler's task ends the call with it
            finally:
                await queue.put(end)

        try:
            async with asyncio.TaskGroup() as tg:
                task = tg.create_task(reader())
                first = await queue.get()
                if first is end:
                    return
                if isinstance(first, StreamRefused):
                    await context.abort(cast(grpc.StatusCode, first.status), first.message)
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


def _handshake_error(request: Any, limits: Limits) -> str:
    """Why a handshake's numbers and names cannot be taken ("" if they can)."""
    bs, size = request.block_size, request.volume_size
    if bs <= 0 or bs % 512 or bs > MAX_BLOCK_SIZE:
        return f"block_size {bs} must be a positive multiple of 512, at most {MAX_BLOCK_SIZE}"
    if size > limits.max_volume_size:
        return (f"volume_size {size} exceeds this target's maximum of "
                f"{limits.max_volume_size} bytes (serve --max-volume-size)")
    members = list(request.group_members)
    if not request.group:
        return "group_members given without a group" if members else ""
    if len(members) > MAX_GROUP_MEMBERS or len(set(members)) != len(members):
        return f"a group has at most {MAX_GROUP_MEMBERS} members, each named once"
    try:
        for name in (request.group, *members):
            check_volume_name(name)
    except ProtocolError as exc:
        return str(exc)
    if request.volume not in members:
        return f"volume {request.volume} is not among the members of group {request.group}"
    return ""


async def _refuse(context: grpc.aio.ServicerContext, code: grpc.StatusCode, what: str,
                  volume: str, message: str) -> None:
    """Refuse a call that would change state, in one WARNING line naming the peer."""
    log.warning("refused %s of volume %r from %s: %s", what, volume, context.peer(), message)
    await context.abort(code, message)


def _log_handshake(replica: Replica, peer: str, created: bool, old_size: int,
                   before: tuple[int, str, tuple[str, ...]]) -> None:
    """One line per change a handshake made, naming the peer."""
    record, name = replica.record, replica.name
    if created:
        log.info("volume %s created by %s: %d bytes in %d-byte blocks", name, peer,
                 record.size, record.block_size)
    elif old_size != record.size:
        log.info("volume %s resized by %s: %d -> %d bytes", name, peer, old_size, record.size)
    if record.epoch != before[0]:
        log.info("volume %s: epoch raised from %d to %d by %s (handshake)", name, before[0],
                 record.epoch, peer)
    if (replica.group, replica.members) != before[1:]:
        log.info("volume %s: consistency group set to %r (members %s) by %s", name,
                 replica.group, ", ".join(replica.members) or "none", peer)


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
        self.peer = context.peer()
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
                if isinstance(msg, StreamRefused):
                    async with self.write_lock:  # not while an acknowledgement is written
                        await self.context.abort(cast(grpc.StatusCode, msg.status),
                                                 msg.message)
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
        if self.replica.checkpoint_due():  # after the ack: not in this commit's latency
            try:  # (the next commit, on the same sync thread, may wait for it)
                await self.slot.run_sync(self.replica.checkpoint)
            except Exception as exc:  # the log lists more than it must until one succeeds
                log.error("volume %s: activity log checkpoint failed: %s (retrying at the "
                          "next commit)", self.name, exc)
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
        log.warning("volume %s: rejected batch %d from %s (%s): %s", self.name, seq, self.peer,
                    reason, message)
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
        if msg.seq == 0:
            await self.refuse("batch 0: sequence 0 is only for flush requests (commit set)")
        if msg.seq <= self.applied:
            await self.resend(msg)  # ignored (the acks cover it) if it is that very batch
            return
        if self.waiting_for is not None and msg.seq != self.waiting_for:
            return  # go-back-N: drop everything until the rejected batch comes again
        if msg.seq != self.applied + 1:
            await self.reject(self.applied + 1, "out_of_order",
                              f"expected batch {self.applied + 1}, got {msg.seq}")
            return
        try:
            written, payload_len = await self.slot.run(self._apply, msg)
        except CorruptBatchError as exc:
            await self.reject(msg.seq, exc.reason, str(exc))
            return
        except ProtocolError as exc:
            await self.refuse(str(exc))
        except (OSError, VolumeError) as exc:
            await self.context.abort(grpc.StatusCode.INTERNAL, f"replica I/O error: {exc}")
        self.waiting_for = None
        self.applied = msg.seq
        self.group_bytes += written
        self.m.applied_bytes.labels(self.name).inc(written)
        self.m.received_bytes.labels(self.name).inc(payload_len)
        if msg.epoch > self.replica.record.epoch:  # only once the batch proved sound
            was = self.replica.record.epoch
            await self.slot.run(self.replica.raise_epoch, msg.epoch)
            self.m.epoch.labels(self.name).set(msg.epoch)
            log.info("volume %s: epoch raised from %d to %d by %s (batch %d)", self.name, was,
                     msg.epoch, self.peer, msg.seq)

    async def refuse(self, message: str) -> None:
        """End the stream: the message breaks the protocol (a resend would not help)."""
        self.m.rejected.labels(self.name, "invalid").inc()
        await _refuse(self.context, grpc.StatusCode.INVALID_ARGUMENT, "batch", self.name,
                      message)

    async def resend(self, msg: Any) -> None:
        """A batch under a sequence this replica already took. Taken for a resend only if it
        is byte for byte the batch taken under that number. Anything else (another client got
        a batch in under the source's next number, or sends one under a number the source
        used) is refused: the stream ends (ABORTED, a failed sequence check) and the replica
        keeps what it holds under a new generation, so the source, however it learns of the
        refusal (a gRPC client may see its stream fail without the status), reconnects, finds
        the generation changed and plans again from the replica's content; no ack, cumulative
        or in a handshake, ever covers its batch."""
        try:
            same = await self.slot.run(self._same_as_taken, msg)
        except ProtocolError as exc:
            await self.refuse(str(exc))
        if same:
            return
        why = ("differs from the batch this replica took under that number" if same is False
               else "cannot be checked: the batch taken under that number is no longer known")
        self.m.rejected.labels(self.name, "resend_mismatch").inc()
        generation = await self.slot.run(self.replica.renew_generation)
        await _refuse(self.context, grpc.StatusCode.ABORTED, "resent batch", self.name,
                      f"resend_mismatch: volume {self.name}: batch {msg.seq} {why}; the replica "
                      f"keeps the batches it holds (up to {self.applied}) as generation "
                      f"{generation}: its sources plan again from its content")

    def _batch(self, msg: Any) -> Batch:
        """The wire message as a batch; ProtocolError if its sizes or enums are out of range
        (checked before the fields are copied)."""
        counts = (len(msg.indices), len(msg.kinds), len(msg.hashes), len(msg.copy_from))
        if max(counts) > MAX_BATCH_RECORDS:
            raise ProtocolError(f"batch {msg.seq}: {max(counts)} records, at most "
                                f"{MAX_BATCH_RECORDS} per batch")
        if msg.raw_length > MAX_BATCH_RAW:
            raise ProtocolError(f"batch {msg.seq}: raw_length {msg.raw_length}, at most "
                                f"{MAX_BATCH_RAW} per batch")
        batch: Batch = wire.batch_from_proto(msg)
        if not isinstance(batch.compression, Compression):
            raise ProtocolError(f"batch {msg.seq}: unknown compression {msg.compression}")
        return batch

    def _same_as_taken(self, msg: Any) -> bool | None:
        return self.replica.same_as_taken(self._batch(msg))

    def _apply(self, msg: Any) -> tuple[int, int]:
        """On the volume thread: convert (copies the payload once), then apply or stage."""
        batch = self._batch(msg)
        if self.replica.must_stage(batch):
            return self.replica.stage(batch), len(batch.payload)
        return self.replica.apply(batch), len(batch.payload)
