"""A client the target has no reason to trust, speaking the project's own stubs to a real
`drctl replicate serve` (plaintext, --insecure: what is tested is what the target checks by
itself, authentication or not). Each finding is replayed; the call must be refused and the
replica left as it was (its image hashed before and after)."""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest
import zstandard

from replicator.batch import Batch, Compression, Kind
from replicator.blockmap import block_hash
from replicator.transport import wire
from tests.procs import Proc, Target, metric, push_cmd, run, same_file, wait_for, write_random

BS = 4096
MiB = 1 << 20
PEER = r"from ipv4:127\.0\.0\.1:\d+"
BY = r"by ipv4:127\.0\.0\.1:\d+"


@pytest.fixture
def targets(workdir: str) -> Iterator[Callable[..., Target]]:
    """Start plaintext targets with extra `serve` flags; each must end without a traceback."""
    started: list[Target] = []

    def start(*extra: str, name: str = "t") -> Target:
        d = os.path.join(workdir, name)
        os.makedirs(d, exist_ok=True)
        t = Target(d, None, *extra, tls=False).start()
        started.append(t)
        return t

    yield start
    for t in started:
        code = t.stop()
        log = t.proc.log() if t.proc else ""
        assert "Traceback" not in log, f"target logged a traceback:\n{log[-4000:]}"
        assert code in (0, None, -9), f"target exited {code}:\n{log[-4000:]}"


def digest(path: str) -> tuple[int, str]:
    with open(path, "rb") as fh:
        return os.fstat(fh.fileno()).st_size, hashlib.sha256(fh.read()).hexdigest()


def seed(workdir: str, target: Target, volume: str = "vol", size: int = 4 * MiB) -> str:
    """A replica written by the real source (push --once); returns the source's path."""
    src = os.path.join(workdir, f"{volume}.src")
    write_random(src, size, seed=len(volume) + size)
    p = run(push_cmd(src, target, volume, os.path.join(workdir, f"{volume}.state"), "--once"))
    assert p.returncode == 0, p.stderr
    return src


def hs(volume: str, size: int, epoch: int = 0, block_size: int = BS,
       **kw: Any) -> Any:
    return wire.ProtoHandshakeRequest(protocol_version=wire.PROTOCOL_VERSION, volume=volume,
                                      volume_size=size, block_size=block_size,
                                      source_id="intruder", epoch=epoch, **kw)


def data_batch(seq: int, blocks: dict[int, bytes], size: int, volume: str = "vol",
               epoch: int = 0) -> Batch:
    idx = sorted(blocks)
    return Batch(volume=volume, epoch=epoch, seq=seq, block_size=BS, volume_size=size,
                 indices=idx, kinds=bytes([Kind.DATA]) * len(idx),
                 hashes=[block_hash(blocks[i]) for i in idx], copy_from=[],
                 compression=Compression.NONE, raw_length=BS * len(idx),
                 payload=b"".join(blocks[i] for i in idx)).seal()


async def read(call: Any) -> Any:
    return await asyncio.wait_for(call.read(), 20)


async def durable_seq(call: Any, volume: str = "vol") -> int:
    """On a Push stream just opened: the sequence the target holds (a flush request)."""
    await call.write(wire.flush_request(volume, 0))
    ack = await read(call)
    assert ack.status == wire.ACK_OK
    return int(ack.acked_seq)


async def refused(coro: Any, code: grpc.StatusCode, text: str = "") -> str:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await coro
    assert info.value.code() == code, info.value.details()
    details = info.value.details() or ""
    assert text in details
    return details


def target_log(target: Target) -> str:
    return "target:\n" + (target.proc.log()[-4000:] if target.proc else "")


def log_lines(target: Target, pattern: str, count: int = 1) -> list[str]:
    """The target's log lines matching ``pattern``, once there are ``count`` of them (the
    daemon logs through a queue: a line may land just after the call returned)."""
    assert target.proc is not None
    proc = target.proc

    def lines() -> list[str]:
        return [line for line in proc.log().splitlines() if re.search(pattern, line)]

    try:
        wait_for(lambda: len(lines()) >= count, 5, f"{count} log lines like {pattern!r}")
    except TimeoutError:
        return lines()
    return lines()


# -- (1) a batch under a sequence the target already took -----------------------------------

async def intrude(target: Target, blocks: dict[int, bytes], size: int) -> tuple[str, int]:
    """Get a batch in under the next sequence number (waiting for the source's stream to end:
    one stream per volume); a resend of that very batch is answered. Returns the replica's
    generation and the sequence the target held before."""
    async with grpc.aio.insecure_channel(target.address) as ch:
        stub = wire.ReplicationStub(ch)
        generation = (await stub.Handshake(hs("vol", size))).generation
        call = stub.Push()
        taken = await durable_seq(call)
        forged = data_batch(taken + 1, blocks, size)
        for _ in range(2):
            await call.write(wire.batch_to_proto(forged))
            await call.write(wire.flush_request("vol", 0))
            ack = await read(call)
            assert ack.status == wire.ACK_OK and ack.acked_seq == taken + 1
        await call.done_writing()
        assert await read(call) is grpc.aio.EOF
    return generation, taken


async def test_a_batch_under_a_taken_sequence_is_refused_and_the_source_recovers(
        workdir: str, targets: Callable[..., Target]) -> None:
    target = targets()
    size = 4 * MiB
    src = os.path.join(workdir, "src.img")
    write_random(src, size, seed=11)
    state = os.path.join(workdir, "state")
    agent = Proc([*push_cmd(src, target, "vol", state, "--interval", "0.2")],
                 os.path.join(workdir, "agent.log")).start()
    wait_for(lambda: os.path.exists(target.image("vol")) and same_file(src, target.image("vol")),
             60, "the agent's first pass")

    forged_blocks = {i: os.urandom(BS) for i in range(50, 71)}  # 21 blocks
    generation, taken = await intrude(target, forged_blocks, size)
    with open(target.image("vol"), "rb") as fh:
        fh.seek(50 * BS)
        assert fh.read(BS) == forged_blocks[50]  # taken: the checks could not tell

    # The real source's next pass uses that number: refused, never acknowledged. The replica
    # takes a new generation, so the source (whatever status its client saw) plans again from
    # the replica's content and converges, the intruder's blocks included.
    fd = os.open(src, os.O_RDWR)
    for i in range(100, 121):
        os.pwrite(fd, os.urandom(BS), i * BS)
    os.close(fd)
    try:
        wait_for(lambda: same_file(src, target.image("vol")), 60, "the source to converge")
    except TimeoutError as exc:
        raise AssertionError(f"{exc}\nagent:\n{agent.log()[-3000:]}\n{target_log(target)}") \
            from None
    assert log_lines(target, rf"WARNING.*refused resent batch of volume 'vol' {PEER}: "
                             rf"resend_mismatch.*batch {taken + 1} differs")
    assert agent.popen is not None and agent.popen.poll() is None, agent.log()[-3000:]
    assert "planning again" in agent.log()
    assert agent.stop() == 0
    async with grpc.aio.insecure_channel(target.address) as ch:
        renewed = (await wire.ReplicationStub(ch).Handshake(hs("vol", size))).generation
    assert renewed != generation
    p = run(push_cmd(src, target, "vol", state, "--once"))  # what the agent saved is sound
    assert p.returncode == 0, p.stderr

    # The other order: the source's batch is in, a different one comes under its number:
    # refused, nothing written.
    repaired = digest(target.image("vol"))
    async with grpc.aio.insecure_channel(target.address) as ch:
        call = wire.ReplicationStub(ch).Push()
        held = await durable_seq(call)
        await call.write(wire.batch_to_proto(data_batch(held, forged_blocks, size)))
        await refused(read(call), grpc.StatusCode.ABORTED, f"batch {held} differs")
    assert digest(target.image("vol")) == repaired
    p = run(push_cmd(src, target, "vol", state, "--once"))
    assert p.returncode == 0, p.stderr
    assert same_file(src, target.image("vol"))
    assert metric(target.metrics(), "drctl_replication_rejected_batches_total", volume="vol",
                  reason="resend_mismatch") == 2


# -- (2) resizes --------------------------------------------------------------------------

async def test_no_resize_without_a_verified_request(workdir: str,
                                                    targets: Callable[..., Target]) -> None:
    target = targets()
    size = 4 * MiB
    seed(workdir, target, "vol", size)
    before = digest(target.image("vol"))
    async with grpc.aio.insecure_channel(target.address) as ch:
        stub = wire.ReplicationStub(ch)
        await refused(stub.Handshake(hs("vol", 0)), grpc.StatusCode.FAILED_PRECONDITION,
                      "shrink_refused")
        call = stub.Push()
        held = await durable_seq(call)
        empty = Batch("vol", 0, held + 1, BS, 0, [], b"", [], [], Compression.NONE, 0,
                      b"").seal()
        await call.write(wire.batch_to_proto(empty))
        ack = await read(call)
        assert ack.status == wire.ACK_REJECTED and ack.reason == "geometry"
        assert ack.acked_seq == held
        call.cancel()
        assert digest(target.image("vol")) == before
        # a handshake may grow the replica: the data stays, the new end reads zeros
        grown = await stub.Handshake(hs("vol", size + MiB))
        assert grown.replica_size == size + MiB
    with open(target.image("vol"), "rb") as fh:
        assert hashlib.sha256(fh.read(size)).hexdigest() == before[1]
        assert fh.read() == bytes(MiB)
    assert log_lines(target, rf"refused handshake of volume 'vol' {PEER}: shrink_refused")
    assert log_lines(target, rf"volume vol resized {BY}: {size} -> {size + MiB} bytes")

    # started with --allow-shrink, the target lets a handshake shrink a replica
    lenient = targets("--allow-shrink", name="lenient")
    seed(os.path.join(workdir, "lenient"), lenient, "vol", size)
    async with grpc.aio.insecure_channel(lenient.address) as ch:
        r = await wire.ReplicationStub(ch).Handshake(hs("vol", MiB))
        assert r.replica_size == MiB
    assert os.path.getsize(lenient.image("vol")) == MiB


# -- (3) decompression bombs --------------------------------------------------------------

def bomb(raw: int, declare: bool) -> bytes:
    cobj = zstandard.ZstdCompressor(level=1, write_content_size=declare).compressobj(
        size=raw if declare else -1)
    zeros = bytes(MiB)
    return b"".join([*(cobj.compress(zeros) for _ in range(raw // MiB)), cobj.flush()])


def peak_rss(target: Target) -> int:
    assert target.proc is not None
    with open(f"/proc/{target.proc.pid}/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


async def test_a_small_payload_claiming_a_gibibyte_costs_nothing(
        workdir: str, targets: Callable[..., Target]) -> None:
    target = targets()
    size = 4 * MiB
    seed(workdir, target, "vol", size)
    before = digest(target.image("vol"))
    declared, undeclared = bomb(1 << 30, True), bomb(1 << 30, False)
    assert len(declared) <= 64 << 10 and zstandard.frame_content_size(declared) == 1 << 30

    def zstd(seq: int, blocks: int, frame: bytes, raw_length: int) -> Batch:
        return Batch("vol", 0, seq, BS, size, list(range(blocks)), bytes([Kind.DATA]) * blocks,
                     [block_hash(bytes(BS))] * blocks, [], Compression.ZSTD, raw_length,
                     frame).seal()

    async with grpc.aio.insecure_channel(target.address) as ch:
        stub = wire.ReplicationStub(ch)
        call = stub.Push()
        seq = await durable_seq(call) + 1
        # a raw_length past the most a batch may carry ends the stream
        await call.write(wire.batch_to_proto(zstd(seq, 1, declared, 1 << 30)))
        await refused(read(call), grpc.StatusCode.INVALID_ARGUMENT, "raw_length")
        call = stub.Push()
        for batch, reason in ((zstd(seq, 1, declared, MiB), "malformed"),  # records hold 4 KiB
                              (zstd(seq, 256, declared, MiB), "decompress"),
                              (zstd(seq, 256, undeclared, MiB), "decompress")):
            await call.write(wire.batch_to_proto(batch))
            ack = await read(call)
            assert ack.status == wire.ACK_REJECTED and ack.reason == reason, ack
        call.cancel()
    assert digest(target.image("vol")) == before
    assert peak_rss(target) < 400 * MiB


# -- (4) sizes and enums out of range -----------------------------------------------------

async def test_out_of_range_sizes_and_enums_are_invalid_arguments(
        workdir: str, targets: Callable[..., Target]) -> None:
    target = targets()
    seed(workdir, target, "vol", MiB)
    before = digest(target.image("vol"))
    async with grpc.aio.insecure_channel(target.address) as ch:
        stub = wire.ReplicationStub(ch)
        for req in (hs("vol", 1 << 63), hs("vol", (1 << 64) - 1), hs("big", 1 << 63),
                    hs("vol", MiB, block_size=1 << 31), hs("vol", MiB, block_size=1000),
                    hs("vol", MiB, group_members=["vol"]),
                    hs("vol", MiB, group="g", group_members=["other"])):
            await refused(stub.Handshake(req), grpc.StatusCode.INVALID_ARGUMENT)
        call = stub.Push()
        seq = await durable_seq(call) + 1
        msg = wire.batch_to_proto(data_batch(seq, {1: os.urandom(BS)}, MiB))
        msg.compression = 7  # not a Compression value
        await call.write(msg)
        await refused(read(call), grpc.StatusCode.INVALID_ARGUMENT, "unknown compression")
        call = stub.Push()
        await call.write(wire.batch_to_proto(data_batch(0, {1: os.urandom(BS)}, MiB)))
        await refused(read(call), grpc.StatusCode.INVALID_ARGUMENT, "sequence 0")
    assert digest(target.image("vol")) == before
    assert not os.path.exists(target.image("big"))
    lines = log_lines(target, r"refused (handshake|batch) of volume", 9)
    assert len(lines) == 9, lines  # one line each (the fixture checks for tracebacks)


# -- (5) clones ---------------------------------------------------------------------------

async def test_clones_have_a_quota_and_valid_names(workdir: str,
                                                   targets: Callable[..., Target]) -> None:
    target = targets("--max-clones", "2")
    seed(workdir, target, "vol", MiB)
    before = digest(target.image("vol"))
    async with grpc.aio.insecure_channel(target.address) as ch:
        stub = wire.ReplicationStub(ch)
        for name in ("c0", "c1"):
            await stub.Clone(wire.ProtoCloneRequest(volume="vol", name=name))
        await refused(stub.Clone(wire.ProtoCloneRequest(volume="vol", name="c2")),
                      grpc.StatusCode.RESOURCE_EXHAUSTED, "max-clones 2")
        for bad in ("x\n", "../x", "", "a/b"):
            await refused(stub.Clone(wire.ProtoCloneRequest(volume="vol", name=bad)),
                          grpc.StatusCode.INVALID_ARGUMENT)
            await refused(stub.DropClone(wire.ProtoCloneRequest(volume="vol", name=bad)),
                          grpc.StatusCode.INVALID_ARGUMENT)
        await stub.DropClone(wire.ProtoCloneRequest(volume="vol", name="c0"))
        await stub.Clone(wire.ProtoCloneRequest(volume="vol", name="c2"))
    assert sorted(os.listdir(os.path.join(target.dir, "vol.clones"))) == ["c1.img", "c2.img"]
    assert digest(target.image("vol")) == before
    assert log_lines(target, rf"volume vol: clone c1 made {BY}")
    assert log_lines(target, rf"volume vol: clone c0 dropped {BY}")
    assert log_lines(target, rf"refused clone of volume 'vol' {PEER}: quota_exceeded")


# -- (6), (7) volumes: quota, maximum size, names -----------------------------------------

async def test_new_volumes_have_a_quota_a_maximum_size_and_whole_names(
        workdir: str, targets: Callable[..., Target]) -> None:
    target = targets("--max-volumes", "2", "--max-volume-size", "8MiB")
    seed(workdir, target, "vol", MiB)
    before = digest(target.image("vol"))
    async with grpc.aio.insecure_channel(target.address) as ch:
        stub = wire.ReplicationStub(ch)
        await refused(stub.Handshake(hs("huge", 16 * MiB)), grpc.StatusCode.INVALID_ARGUMENT,
                      "max-volume-size")
        await refused(stub.Handshake(hs("vol", 16 * MiB)), grpc.StatusCode.INVALID_ARGUMENT)
        await refused(stub.Handshake(hs("vol\n", MiB)), grpc.StatusCode.INVALID_ARGUMENT,
                      "invalid volume name")
        assert (await stub.Handshake(hs("second", MiB))).created
        await refused(stub.Handshake(hs("third", MiB)), grpc.StatusCode.RESOURCE_EXHAUSTED,
                      "max-volumes 2")
        # no other call makes a replica
        ghost = "ghost"
        await refused(stub.Fence(wire.ProtoFenceRequest(volume=ghost, epoch=1)),
                      grpc.StatusCode.NOT_FOUND)
        await refused(stub.Clone(wire.ProtoCloneRequest(volume=ghost, name="c")),
                      grpc.StatusCode.NOT_FOUND)
        await refused(stub.DropClone(wire.ProtoCloneRequest(volume=ghost, name="c")),
                      grpc.StatusCode.NOT_FOUND)
        listing = stub.BlockHashes(wire.ProtoBlockHashesRequest(volume=ghost))
        await refused(listing.read(), grpc.StatusCode.NOT_FOUND)
        call = stub.Push()
        await call.write(wire.batch_to_proto(data_batch(1, {0: os.urandom(BS)}, MiB, ghost)))
        await refused(read(call), grpc.StatusCode.NOT_FOUND)
    assert sorted(f for f in os.listdir(target.dir) if f.endswith(".meta")) == [
        "second.meta", "vol.meta"]
    assert not [f for f in os.listdir(target.dir)
                if f.startswith(("huge", "third", "ghost", "vol\n"))]
    assert digest(target.image("vol")) == before
    assert log_lines(target, rf"refused handshake of volume 'third' {PEER}: quota_exceeded")


# -- (8) every change of state is logged with its peer --------------------------------------

async def test_every_change_of_state_names_its_peer(workdir: str,
                                                    targets: Callable[..., Target]) -> None:
    target = targets()
    size = MiB
    async with grpc.aio.insecure_channel(target.address) as ch:
        stub = wire.ReplicationStub(ch)
        await stub.Handshake(hs("vol", size))
        await stub.Handshake(hs("vol", 2 * size, epoch=3))
        call = stub.Push()
        await call.write(wire.batch_to_proto(data_batch(1, {0: b"a" * BS}, 2 * size,
                                                        epoch=4)))
        await call.write(wire.flush_request("vol", 4))
        assert (await read(call)).acked_seq == 1
        await call.write(wire.batch_to_proto(data_batch(1, {0: b"b" * BS}, 2 * size,
                                                        epoch=4)))
        await refused(read(call), grpc.StatusCode.ABORTED, "resend_mismatch")
        await stub.Fence(wire.ProtoFenceRequest(volume="vol", epoch=5))
        await stub.Clone(wire.ProtoCloneRequest(volume="vol", name="drill"))
        await stub.DropClone(wire.ProtoCloneRequest(volume="vol", name="drill"))
        await stub.Fence(wire.ProtoFenceRequest(volume="vol", epoch=6, release=True))
        # promoted: no longer served as a replica, even though nothing was discarded
        await refused(stub.Handshake(hs("vol", 2 * size, epoch=6)), grpc.StatusCode.ABORTED,
                      "volume_promoted")
    for pattern in (rf"volume vol created {BY}: {size} bytes",
                    rf"volume vol resized {BY}: {size} -> {2 * size} bytes",
                    rf"volume vol: epoch raised from 0 to 3 {BY} \(handshake\)",
                    rf"volume vol: epoch raised from 3 to 4 {BY} \(batch 1\)",
                    rf"WARNING.*refused resent batch of volume 'vol' {PEER}",
                    rf"volume vol fenced {BY} at epoch 5 \(was 4\)",
                    rf"volume vol: clone drill made {BY}",
                    rf"volume vol: clone drill dropped {BY}",
                    rf"volume vol promoted {BY} at epoch 6 \(was 5\)"):
        assert log_lines(target, pattern), pattern
