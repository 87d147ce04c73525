"""The capture agent's background verify against real daemons: bit rot in the replica's image
is found, counted, shipped again and confirmed repaired, with the lag above 0 meanwhile; writes
that race the scrub are never counted as mismatches (hot and warm targets); the target's range
listing (BlockHashes with first_block/count) it relies on."""

from __future__ import annotations

import asyncio
import os
import random
import threading
import time

import pytest

from replicator.errors import ProtocolError
from replicator.transport.client import TargetClient
from tests.nbdclient import NbdClient
from tests.procs import (
    DRCTL,
    Proc,
    Target,
    free_port,
    metric,
    port_open,
    push_cmd,
    run,
    same_file,
    scrape,
    wait_for,
    write_random,
)

BS = 4096
SIZE = 2 << 20
M = "drctl_replication_"


def _agent(workdir: str, target: Target, rate: str) -> tuple[Proc, str, int, int]:
    src = os.path.join(workdir, "vol.img")
    write_random(src, SIZE, seed=71)
    with open(src, "r+b") as fh:  # a zero stretch: ZERO records, repaired as zeroes too
        fh.seek(SIZE - 64 * BS)
        fh.write(bytes(64 * BS))
    nport, mport = free_port(), free_port()
    cmd = push_cmd(src, target, "vol", os.path.join(workdir, "st"), "--nbd-listen",
                   f"127.0.0.1:{nport}", "--metrics-port", str(mport), "--interval", "0.2",
                   "--verify-rate", rate)
    cmd[len(DRCTL):len(DRCTL)] = ["--log-level", "INFO"]  # the repairs are INFO lines
    agent = Proc(cmd, os.path.join(workdir, "agent.log")).start()
    wait_for(lambda: port_open(nport) and port_open(mport), 20, "NBD export and metrics")
    wait_for(lambda: metric(scrape(mport), M + "protected", volume="vol") == 1, 30,
             "the first resync, verified")
    return agent, src, nport, mport


def _verify(src: str, target: Target) -> None:
    """`drctl replicate verify` exits 0: the replica equals the volume, block for block."""
    p = run([*DRCTL, "replicate", "verify", src, "--to", target.address, "--volume", "vol",
             *target.client_flags()])
    assert p.returncode == 0, p.stdout + p.stderr


def test_bit_rot_in_the_replica_is_found_repaired_and_holds_the_lag_above_zero(
        workdir: str, target: Target) -> None:
    from failover.agent import scrape_lag  # the heartbeat's reading of the lag

    agent, src, nport, mport = _agent(workdir, target, "256KiB/s")
    try:
        nbd = NbdClient("127.0.0.1", nport, "vol")
        nbd.write(10 * BS, b"\x5a" * 4 * BS)
        nbd.flush()
        nbd.close()
        wait_for(lambda: same_file(src, target.image("vol")), 20, "the writes to replicate")
        rotten = [11, 12, 300, SIZE // BS - 3]  # written, random and zero blocks
        with open(target.image("vol"), "r+b") as fh:
            for b in rotten:
                fh.seek(b * BS + 17)
                fh.write(b"bit rot!")
        assert not same_file(src, target.image("vol"))
        url = f"http://127.0.0.1:{mport}/metrics"
        samples: list[tuple[float, float, float, float | None, float]] = []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            s = scrape(mport)
            found = metric(s, M + "verify_mismatched_blocks_total", volume="vol")
            unrepaired = metric(s, M + "verify_unrepaired_blocks", volume="vol")
            heartbeat = scrape_lag(url, ["vol"])
            # the heartbeat's reading counts only if the mismatch was still unrepaired after it
            after = metric(scrape(mport), M + "verify_unrepaired_blocks", volume="vol")
            samples.append((found, unrepaired, metric(s, M + "lag_seconds", volume="vol"),
                            heartbeat, after))
            if found >= len(rotten) and unrepaired == 0 \
                    and metric(s, M + "verify_repaired_blocks_total", volume="vol") >= 4:
                break
            time.sleep(0.05)
        else:
            raise AssertionError(f"not repaired in time: {samples[-5:]}\n{agent.log()[-3000:]}")
        assert found == len(rotten), agent.log()[-3000:]  # each block counted once
        known = [x for x in samples if x[1] > 0]
        assert known, "the unrepaired gauge was never seen above 0"
        assert all(lag > 0 for _f, _u, lag, _h, _a in known), known
        held = [x for x in known if x[4] > 0]  # unrepaired before and after the heartbeat read
        assert held, "no heartbeat reading while a mismatch was known"
        assert all(h is not None and h > 0 for _f, _u, _l, h, _a in held), held
        assert same_file(src, target.image("vol"))
        _verify(src, target)
        s = scrape(mport)
        assert metric(s, M + "verify_checked_bytes_total", volume="vol") > 0
        assert metric(s, M + "verify_rate_bytes_per_second", volume="vol") == 256 << 10
        log = agent.log()
        assert "background verify: the replica differs from the volume in" in log
        assert "background verify: repaired" in log
        wait_for(lambda: metric(scrape(mport), M + "verify_last_pass_timestamp_seconds",
                                volume="vol") > 0, 20, "a complete pass")
    finally:
        assert agent.stop() == 0, agent.log()[-3000:]
    assert "Traceback" not in agent.log()


class _Writer(threading.Thread):
    """Random writes, zeroes and flushes through the export until stopped."""

    def __init__(self, port: int) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.halt = threading.Event()
        self.writes = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        rng = random.Random(72)
        try:
            nbd = NbdClient("127.0.0.1", self.port, "vol")
            while not self.halt.is_set():
                block = rng.randrange(SIZE // BS - 8)
                n = rng.randint(1, 8)
                if rng.random() < 0.15:
                    nbd.zero(block * BS, n * BS)
                else:
                    nbd.write(block * BS + rng.choice((0, 0, 100)), rng.randbytes(n * BS - 200))
                self.writes += 1
                if rng.random() < 0.2:
                    nbd.flush()
                time.sleep(rng.uniform(0, 0.003))
            nbd.flush()
            nbd.close()
        except BaseException as exc:  # reported by the test
            self.error = exc


@pytest.mark.parametrize("mode", ["hot", "warm"])
def test_writes_racing_the_scrub_are_never_counted_as_mismatches(workdir: str,
                                                                 mode: str) -> None:
    target = Target(workdir, None, "--mode", mode).start()
    agent, src, nport, mport = _agent(workdir, target, "16MiB/s")
    try:
        writer = _Writer(nport)
        writer.start()
        time.sleep(8)
        writer.halt.set()
        writer.join(10)
        assert writer.error is None and writer.writes > 100, writer.error
        wait_for(lambda: metric(scrape(mport), M + "lag_seconds", volume="vol") == 0, 30,
                 "the writes to be acknowledged")
        s = scrape(mport)
        assert metric(s, M + "verify_checked_bytes_total", volume="vol") >= 4 * SIZE
        assert metric(s, M + "verify_mismatched_blocks_total", volume="vol") == 0, \
            agent.log()[-3000:]
        assert "differs from the volume" not in agent.log()
        if mode == "hot":
            wait_for(lambda: same_file(src, target.image("vol")), 20, "the replica")
            _verify(src, target)
    finally:
        assert agent.stop() == 0, agent.log()[-3000:]
        target.stop()
    assert "Traceback" not in agent.log()
    assert target.proc is not None and "Traceback" not in target.proc.log()


def test_the_target_lists_a_range_of_blocks_and_refuses_one_past_the_end(
        workdir: str, target: Target) -> None:
    src = os.path.join(workdir, "small.img")
    write_random(src, 64 * BS, seed=73)
    p = run(push_cmd(src, target, "vol", os.path.join(workdir, "st"), "--once"))
    assert p.returncode == 0, p.stderr

    async def listings() -> None:
        client = TargetClient(target.address, target.security())
        try:
            whole, size, _seq = await client.block_hashes("vol", from_disk=True)
            part, size2, _seq = await client.block_hashes("vol", from_disk=True,
                                                          first_block=10, count=5)
            assert list(part) == list(whole[10:15]) and size2 == size == 64 * BS
            tail, _size, _seq = await client.block_hashes("vol", first_block=60, count=99)
            assert list(tail) == list(whole[60:])  # the index's, to the end
            with pytest.raises(ProtocolError, match="past the replica"):
                await client.block_hashes("vol", from_disk=True, first_block=65, count=1)
        finally:
            await client.close()

    asyncio.run(listings())
