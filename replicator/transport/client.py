"""Client side of the replication protocol; translates gRPC failures into replicator errors.

The channel is mutual TLS with this process's certificate (``ChannelSecurity``, see
security.py); a plaintext channel is only opened to a loopback address. Handshake and Fence
carry the controller's epoch token when one is configured (``epoch_token``: read again at
every call, so a supervisor can replace the file while the agent runs)."""

from __future__ import annotations

import asyncio
import sys
from array import array
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import grpc

from replicator.errors import (
    EpochNotGrantedError,
    PermissionDeniedError,
    ProtocolError,
    ReplicatorError,
    StaleEpochError,
    TargetUnavailableError,
    VolumeBusyError,
    VolumeError,
    VolumeNotFoundError,
)
from replicator.transport import wire
from replicator.transport.security import ChannelSecurity

CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", 16 << 20),
    ("grpc.max_send_message_length", 16 << 20),
    ("grpc.http2.max_frame_size", 4 << 20),
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 2_000),
]
# seconds a failed connect may add to learn why (a refusal or a failed TLS handshake answers
# at once; a handshake that hangs tells nothing however long it is given)
PROBE_TIMEOUT = 2.0

_BY_STATUS: dict[grpc.StatusCode, type[ReplicatorError]] = {
    grpc.StatusCode.UNAVAILABLE: TargetUnavailableError,
    grpc.StatusCode.DEADLINE_EXCEEDED: TargetUnavailableError,
    grpc.StatusCode.CANCELLED: TargetUnavailableError,
    grpc.StatusCode.UNKNOWN: TargetUnavailableError,
    grpc.StatusCode.INTERNAL: TargetUnavailableError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: TargetUnavailableError,
    grpc.StatusCode.ABORTED: VolumeBusyError,
    grpc.StatusCode.INVALID_ARGUMENT: ProtocolError,
    grpc.StatusCode.FAILED_PRECONDITION: ProtocolError,
    grpc.StatusCode.UNIMPLEMENTED: ProtocolError,
    grpc.StatusCode.DATA_LOSS: VolumeError,
    grpc.StatusCode.NOT_FOUND: VolumeNotFoundError,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDeniedError,
    grpc.StatusCode.UNAUTHENTICATED: PermissionDeniedError,
}
_BY_DETAIL_PREFIX: dict[str, type[ReplicatorError]] = {
    "stale_epoch": StaleEpochError,
    "epoch_not_granted": EpochNotGrantedError,
    "volume_busy": VolumeBusyError,
    "replica I/O error": VolumeError,
    "no such replica": VolumeNotFoundError,
}


def translate(exc: grpc.aio.AioRpcError, address: str) -> ReplicatorError:
    return translate_status(exc.code(), exc.details() or "", address)


def translate_status(code: grpc.StatusCode, details: str, address: str) -> ReplicatorError:
    for prefix, cls in _BY_DETAIL_PREFIX.items():
        if details.startswith(prefix):
            return cls(f"target {address}: {details}")
    cls = _BY_STATUS.get(code, ReplicatorError)
    return cls(f"target {address}: {code.name}: {details}")


@dataclass(frozen=True)
class HandshakeInfo:
    generation: str
    applied_seq: int
    index_digest: bytes
    replica_size: int
    created: bool
    epoch: int
    target_id: str
    mode: str = "hot"  # "warm": every batch is staged (no COPY records)
    # A demoted primary (re-protection): blocks that may differ from the promoted replica of
    # generation diverged_base ("": unknown, compare everything)
    demoted: bool = False
    diverged: tuple[int, ...] = ()
    diverged_base: str = ""


@dataclass(frozen=True)
class CloneInfo:
    path: str
    applied_seq: int
    method: str
    size: int


@dataclass(frozen=True)
class FenceInfo:
    epoch: int
    applied_cp: int  # the consistency point the replica shows (0: no write capture)
    discarded_batches: int  # of an incomplete consistency point
    generation: str = ""  # the replica's generation (a promotion's lineage)


def token_file(path: str) -> Callable[[], bytes]:
    """An epoch token kept in a file (``--epoch-token``), read at every use."""

    def read() -> bytes:
        try:
            with open(path, "rb") as fh:
                return fh.read().strip()
        except FileNotFoundError:
            return b""
        except OSError as exc:
            raise VolumeError(f"epoch token {path}: {exc.strerror}") from None

    return read


class TargetClient:
    """One channel to a target daemon. ``security``: how to reach it (default:
    ``ChannelSecurity.from_env()``, plaintext to loopback when nothing is configured)."""

    def __init__(self, address: str, security: ChannelSecurity | None = None,
                 epoch_token: Callable[[], bytes] | None = None) -> None:
        self.address = address
        self.security = security if security is not None else ChannelSecurity.from_env()
        self.epoch_token = epoch_token
        self.channel = self.security.channel(address, CHANNEL_OPTIONS)
        self.stub = wire.ReplicationStub(self.channel)

    def _token(self, given: bytes | None) -> bytes:
        if given is not None:
            return given
        return self.epoch_token() if self.epoch_token is not None else b""

    async def close(self) -> None:
        await self.channel.close()

    async def connect(self, timeout: float) -> None:
        """Wait until the channel to the target is up (at most ``timeout`` seconds): a
        one-shot command says the target is unreachable instead of waiting for it."""
        try:
            await asyncio.wait_for(self.channel.channel_ready(), timeout)
            return
        except TimeoutError:
            pass
        why = await self._last_connect_error(min(PROBE_TIMEOUT, timeout))
        raise TargetUnavailableError(
            f"target {self.address}: no connection within {timeout:g}s"
            + (f" ({why})" if why else " (is `drctl replicate serve` running there, and is "
               "the address right?)"))

    async def _last_connect_error(self, timeout: float) -> str:
        """Why the channel does not connect (refused, a TLS handshake that failed), from a
        call that does not wait for it; the method does not exist, so a target that is
        reached after all does nothing. A connection that neither fails nor completes (a
        handshake that hangs) tells nothing more in ``timeout`` seconds either."""
        probe = self.channel.unary_unary("/drctl.v1.Replication/ConnectProbe",
                                         request_serializer=None, response_deserializer=None)
        try:
            await probe(b"", timeout=timeout, wait_for_ready=False)
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.UNAVAILABLE:
                return exc.details() or ""
        return ""

    async def handshake(self, volume: str, size: int, block_size: int, source_id: str,
                        epoch: int, timeout: float = 10.0, group: str = "",
                        members: tuple[str, ...] = (), epoch_token: bytes | None = None
                        ) -> HandshakeInfo:
        req = wire.ProtoHandshakeRequest(protocol_version=wire.PROTOCOL_VERSION, volume=volume,
                                         volume_size=size, block_size=block_size,
                                         source_id=source_id, epoch=epoch, group=group,
                                         group_members=list(members),
                                         epoch_token=self._token(epoch_token))
        try:
            r = await self.stub.Handshake(req, timeout=timeout, wait_for_ready=True)
        except grpc.aio.AioRpcError as exc:
            raise translate(exc, self.address) from None
        diverged = array("Q")
        diverged.frombytes(r.diverged[: len(r.diverged) // 8 * 8])
        if sys.byteorder == "big":
            diverged.byteswap()
        return HandshakeInfo(r.generation, r.applied_seq, r.index_digest, r.replica_size,
                             r.created, r.epoch, r.target_id, r.mode or "hot", r.demoted,
                             tuple(diverged), r.diverged_base)

    async def block_hashes(self, volume: str, from_disk: bool = False,
                           timeout: float = 600.0, first_block: int = 0,
                           count: int = 0) -> tuple[array[int], int, int]:
        """The replica's per-block hashes (``count`` > 0: of blocks [first_block, first_block +
        count), to the end if the replica is shorter), its size and its applied sequence."""
        out = array("Q")
        size = seq = 0
        try:
            call = self.stub.BlockHashes(
                wire.ProtoBlockHashesRequest(volume=volume, from_disk=from_disk,
                                             first_block=first_block, count=count),
                timeout=timeout, wait_for_ready=True)
            async for chunk in call:
                if chunk.first_block != first_block + len(out):
                    raise ProtocolError("block hash listing arrived out of order")
                part = array("Q")
                part.frombytes(chunk.hashes)
                if sys.byteorder == "big":
                    part.byteswap()
                out.extend(part)
                size, seq = chunk.replica_size, chunk.applied_seq
        except grpc.aio.AioRpcError as exc:
            raise translate(exc, self.address) from None
        return out, size, seq

    async def fence(self, volume: str, epoch: int, timeout: float = 120.0,
                    release: bool = False, epoch_token: bytes | None = None) -> FenceInfo:
        """Apply the replica's complete consistency points, drop an incomplete one and raise
        its epoch (a promotion); returns where the replica stands afterwards. ``release``: the
        target also closes the replica and stops serving it (it becomes the primary volume of
        the target's site). Raising the epoch needs the controller's token for it."""
        try:
            r = await self.stub.Fence(wire.ProtoFenceRequest(
                volume=volume, epoch=epoch, release=release,
                epoch_token=self._token(epoch_token)),
                                      timeout=timeout, wait_for_ready=True)
        except grpc.aio.AioRpcError as exc:
            raise translate(exc, self.address) from None
        return FenceInfo(int(r.epoch), int(r.applied_cp), int(r.discarded_batches),
                         r.generation)

    async def clone(self, volume: str, name: str, timeout: float = 600.0) -> CloneInfo:
        try:
            r = await self.stub.Clone(wire.ProtoCloneRequest(volume=volume, name=name),
                                      timeout=timeout, wait_for_ready=True)
        except grpc.aio.AioRpcError as exc:
            raise translate(exc, self.address) from None
        return CloneInfo(r.path, int(r.applied_seq), r.method, int(r.size))

    async def drop_clone(self, volume: str, name: str, timeout: float = 60.0) -> None:
        try:
            await self.stub.DropClone(wire.ProtoCloneRequest(volume=volume, name=name),
                                      timeout=timeout, wait_for_ready=True)
        except grpc.aio.AioRpcError as exc:
            raise translate(exc, self.address) from None

    def push(self) -> PushCall:
        """The delta stream. Requests are passed as already-serialised bytes
        (``wire.encode_batch``), so serialisation happens on the planner's thread."""
        method = self.channel.stream_stream(
            "/drctl.v1.Replication/Push", request_serializer=None,
            response_deserializer=wire.ProtoAck.FromString)
        return PushCall(method(wait_for_ready=True), self.address)


class PushCall:
    """The bidirectional delta stream; write batches, read acks."""

    def __init__(self, call: Any, address: str) -> None:
        self.call = call
        self.address = address

    async def write(self, msg: Any) -> None:
        try:
            await self.call.write(msg)
        except grpc.aio.AioRpcError as exc:
            raise translate(exc, self.address) from None
        except (grpc.aio.UsageError, asyncio.InvalidStateError):
            # The target already ended the stream (e.g. it refused a stale epoch): report
            # why it did, not that we could not write.
            raise await self._ended() from None

    async def _ended(self) -> ReplicatorError:
        try:
            code = await self.call.code()
            details = await self.call.details()
        except (grpc.aio.AioRpcError, asyncio.CancelledError):
            raise
        except Exception as exc:
            return TargetUnavailableError(f"target {self.address}: stream closed: {exc}")
        if code == grpc.StatusCode.OK:
            return TargetUnavailableError(f"target {self.address}: stream closed")
        return translate_status(code, details or "", self.address)

    async def done_writing(self) -> None:
        try:
            await self.call.done_writing()
        except grpc.aio.AioRpcError as exc:
            raise translate(exc, self.address) from None
        except (grpc.aio.UsageError, asyncio.InvalidStateError):
            raise await self._ended() from None

    async def acks(self) -> AsyncIterator[Any]:
        try:
            while True:
                msg = await self.call.read()
                if msg is grpc.aio.EOF:
                    return
                yield msg
        except grpc.aio.AioRpcError as exc:
            raise translate(exc, self.address) from None

    def cancel(self) -> None:
        self.call.cancel()
