"""Corrupted, out-of-order and stale-epoch messages against a real target daemon."""

from __future__ import annotations

import asyncio
import os
import sys

import grpc
import pytest

from replicator.batch import Batch, Compression, Kind
from replicator.blockmap import block_hash
from replicator.transport import wire
from tests.integration.corrupting_proxy import CorruptingProxy
from tests.procs import DRCTL, REPO, Target, metric, same_file, write_random

BS = 4096
# the raw wire: plaintext batches by hand, a proxy that corrupts bytes in flight
pytestmark = pytest.mark.insecure


def data_batch(seq: int, blocks: dict[int, bytes], size: int, epoch: int = 0) -> Batch:
    idx = sorted(blocks)
    return Batch(volume="c", epoch=epoch, seq=seq, block_size=BS, volume_size=size,
                 indices=idx, kinds=bytes([Kind.DATA]) * len(idx),
                 hashes=[block_hash(blocks[i]) for i in idx], copy_from=[],
                 compression=Compression.NONE, raw_length=BS * len(idx),
                 payload=b"".join(blocks[i] for i in idx)).seal()


async def _next_ack(call: grpc.aio.StreamStreamCall) -> object:  # type: ignore[type-arg]
    return await asyncio.wait_for(call.read(), 10)


async def test_corrupt_out_of_order_and_stale_batches(target: Target) -> None:
    size = 16 * BS
    async with grpc.aio.insecure_channel(target.address) as ch:
        stub = wire.ReplicationStub(ch)
        hs = await stub.Handshake(wire.ProtoHandshakeRequest(
            protocol_version=wire.PROTOCOL_VERSION, volume="c", volume_size=size,
            block_size=BS, source_id="t", epoch=5))
        assert hs.created and hs.applied_seq == 0
        call = stub.Push()

        good = data_batch(1, {2: b"a" * BS, 3: b"b" * BS}, size, epoch=5)
        bad_sum = data_batch(1, {2: b"a" * BS, 3: b"b" * BS}, size, epoch=5)
        bad_sum.checksum ^= 1
        await call.write(wire.batch_to_proto(bad_sum))
        ack = await _next_ack(call)
        assert ack.status == wire.ACK_REJECTED and ack.reason == "checksum"
        assert ack.rejected_seq == 1 and ack.acked_seq == 0

        lying = data_batch(1, {2: b"a" * BS, 3: b"b" * BS}, size, epoch=5)
        lying.payload = b"X" + lying.payload[1:]
        lying.seal()  # transport checksum fine, but block 2 is not what its hash says
        await call.write(wire.batch_to_proto(lying))
        ack = await _next_ack(call)
        assert ack.status == wire.ACK_REJECTED and ack.reason == "block_hash"

        with open(target.image("c"), "rb") as fh:
            assert fh.read() == bytes(size), "a rejected batch must write nothing"

        await call.write(wire.batch_to_proto(good))
        await call.write(wire.flush_request("c", 5))
        ack = await _next_ack(call)
        assert ack.status == wire.ACK_OK and ack.acked_seq == 1

        gap = data_batch(3, {4: b"c" * BS}, size, epoch=5)
        await call.write(wire.batch_to_proto(gap))
        ack = await _next_ack(call)
        assert ack.status == wire.ACK_REJECTED and ack.reason == "out_of_order"
        assert ack.rejected_seq == 2

        stale = data_batch(2, {4: b"s" * BS}, size, epoch=4)
        await call.write(wire.batch_to_proto(stale))
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await _next_ack(call)
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "stale_epoch" in (info.value.details() or "")

        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.Handshake(wire.ProtoHandshakeRequest(
                protocol_version=wire.PROTOCOL_VERSION, volume="../x", volume_size=size,
                block_size=BS, epoch=5))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT

    with open(target.image("c"), "rb") as fh:
        content = fh.read()
    assert content[2 * BS : 4 * BS] == b"a" * BS + b"b" * BS
    assert content[4 * BS : 5 * BS] == bytes(BS)
    samples = target.metrics()
    assert metric(samples, "drctl_replication_rejected_batches_total", volume="c",
                  reason="checksum") == 1
    assert metric(samples, "drctl_replication_rejected_batches_total", volume="c",
                  reason="stale_epoch") == 1


async def test_payload_corrupted_in_flight_is_rejected_and_resent(workdir: str,
                                                                  target: Target) -> None:
    src = os.path.join(workdir, "src.img")
    write_random(src, 24 << 20, seed=31)
    proxy = await CorruptingProxy(target.port, corrupt_data_frame=5).start()
    try:
        proc = await asyncio.create_subprocess_exec(
            *DRCTL, "replicate", "push", src, "--to", f"127.0.0.1:{proxy.port}", "--volume",
            "vol", "--once", "--json", "--no-progress", "--insecure", "--state-dir",
            os.path.join(workdir, "st"), cwd=REPO, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE)
        out, err = await asyncio.wait_for(proc.communicate(), 120)
    finally:
        await proxy.close()
    assert proc.returncode == 0, err.decode()
    assert proxy.corrupted == 1
    assert same_file(src, target.image("vol"))
    samples = target.metrics()
    rejected = metric(samples, "drctl_replication_rejected_batches_total", volume="vol",
                      reason="checksum")
    assert rejected == 1, err.decode()[-3000:]
    assert b'"resent_batches": 0' not in out
    print(sys.executable, out.decode(), file=sys.stderr)
