"""Consistency points end to end, against real daemons: the replica only ever shows the volume
as it was at a client FLUSH (even across kill -9 of the target or the source), warm mode holds
points until promotion, and an overflowing journal falls back to a change bitmap and catches up.

The writer is a synchronous NBD client (tests/nbdclient.py): one request at a time, so the test
knows exactly which writes were acknowledged; it keeps a model of the volume and the hash of
the model at every FLUSH.
"""

from __future__ import annotations

import asyncio
import os
import random
import threading
import time

import xxhash

from replicator.transport.client import TargetClient
from tests.nbdclient import NbdClient, NbdError
from tests.procs import (
    DRCTL,
    Proc,
    Target,
    fence_cmd,
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
SIZE = 4 << 20


class Writer:
    """Rounds of random writes (aligned, unaligned, zeroes) each ended by a FLUSH."""

    def __init__(self, path: str, port: int, seed: int) -> None:
        with open(path, "rb") as fh:
            self.model = bytearray(fh.read())
        self.port = port
        self.rng = random.Random(seed)
        self.flushed = {xxhash.xxh3_128_digest(bytes(self.model))}  # states at every FLUSH
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.pending: tuple[int, bytes] | None = None  # sent, not yet acknowledged
        self.rounds = 0
        self.error: BaseException | None = None
        self.client: NbdClient | None = None

    def connect(self) -> None:
        if self.client is not None:
            self.client.sock.close()
        self.client = NbdClient("127.0.0.1", self.port, "vol")

    def _write(self, offset: int, data: bytes, zero: bool = False) -> None:
        assert self.client is not None
        self.pending = (offset, data)
        if zero:
            self.client.zero(offset, len(data))
        else:
            self.client.write(offset, data)
        with self.lock:
            self.model[offset : offset + len(data)] = data
            self.pending = None

    def round(self) -> None:
        rng = self.rng
        big = rng.random() < 0.2  # a point of several batches (more than 512 blocks)
        for _ in range(rng.randint(1, 6)):
            kind = rng.random()
            if big:
                b = rng.randrange(SIZE // BS - 200)
                self._write(b * BS, rng.randbytes(BS * 200))
            elif kind < 0.6:
                b = rng.randrange(SIZE // BS - 4)
                self._write(b * BS, rng.randbytes(BS * rng.randint(1, 4)))
            elif kind < 0.9:  # unaligned: the export merges whole blocks
                off = rng.randrange(SIZE - 3000)
                self._write(off, rng.randbytes(rng.randint(1, 3000)))
            else:
                off = rng.randrange(SIZE - 20000)
                self._write(off, bytes(rng.randint(1, 20000)), zero=True)
        assert self.client is not None
        self.client.flush()
        with self.lock:
            self.flushed.add(xxhash.xxh3_128_digest(bytes(self.model)))
            self.rounds += 1

    def run(self) -> None:
        try:
            while not self.stop.is_set():
                self.round()
        except (ConnectionError, OSError) as exc:
            self.error = exc  # the source was killed: the test reconnects

    def start(self) -> threading.Thread:
        self.stop.clear()
        self.error = None
        t = threading.Thread(target=self.run, daemon=True)
        t.start()
        return t


def _clone_hash(target: Target, name: str) -> bytes:
    async def clone() -> str:
        client = TargetClient(target.address, target.security())
        try:
            return (await client.clone("vol", name)).path
        finally:
            await client.close()

    path = asyncio.run(clone())
    with open(path, "rb") as fh:
        digest = xxhash.xxh3_128_digest(fh.read())
    os.unlink(path)
    return digest


def _kill_target_and_check(target: Target, writer: Writer, rng: random.Random,
                           name: str) -> None:
    time.sleep(rng.uniform(0.3, 1.0))
    assert target.proc is not None
    target.proc.kill9()
    time.sleep(rng.uniform(0.1, 0.5))
    target.start()
    # Point-in-time copies while the source reconnects and streams again: each must show
    # the volume at one of the writer's FLUSHes.
    for k in range(25):
        digest = _clone_hash(target, f"{name}-{k}")
        with writer.lock:
            assert digest in writer.flushed, f"replica not at a FLUSH after crash {name} ({k})"
        time.sleep(rng.uniform(0.0, 0.05))


def _check_no_acknowledged_write_lost(src: str, writer: Writer) -> None:
    """The volume holds the model, plus perhaps the one write that was in flight (never
    acknowledged) when the source was killed."""
    with open(src, "rb") as fh:
        volume = fh.read()
    candidates = [bytes(writer.model)]
    if writer.pending is not None:
        m = bytearray(writer.model)
        m[writer.pending[0] : writer.pending[0] + len(writer.pending[1])] = writer.pending[1]
        candidates.append(bytes(m))
    assert volume in candidates, "an acknowledged write was lost"
    writer.model = bytearray(volume)
    writer.flushed.add(xxhash.xxh3_128_digest(volume))


def test_replica_is_always_at_a_flush_across_kill_9_of_either_side(workdir: str,
                                                                   target: Target) -> None:
    src = os.path.join(workdir, "vol.img")
    write_random(src, SIZE, seed=71)
    nport = free_port()
    # Only client FLUSHes close consistency points here (no timed cuts), so every state the
    # replica may show is one of the writer's flushed states.
    cmd = push_cmd(src, target, "vol", os.path.join(workdir, "st"), "--nbd-listen",
                   f"127.0.0.1:{nport}", "--cp-interval", "3600", "--interval", "0.2")
    agent = Proc(cmd, os.path.join(workdir, "agent1.log")).start()
    wait_for(lambda: port_open(nport) and os.path.exists(target.image("vol"))
             and same_file(src, target.image("vol")), 30, "initial sync")
    writer = Writer(src, nport, seed=72)
    writer.connect()
    rng = random.Random()
    thread = writer.start()
    for crash in range(3):
        _kill_target_and_check(target, writer, rng, f"c{crash}")
    # now the source dies with writes in flight
    time.sleep(rng.uniform(0.2, 0.8))
    agent.kill9()
    thread.join(30)
    assert writer.error is not None
    agent = Proc(cmd, os.path.join(workdir, "agent2.log")).start()
    wait_for(lambda: port_open(nport), 30, "the restarted export")
    _check_no_acknowledged_write_lost(src, writer)
    writer.connect()
    thread = writer.start()
    time.sleep(1.0)
    digest = _clone_hash(target, "after-source-crash")
    with writer.lock:
        assert digest in writer.flushed
    writer.stop.set()
    thread.join(30)
    assert writer.error is None and writer.rounds > 20
    wait_for(lambda: same_file(src, target.image("vol")), 60, "replica == source at the end")
    if writer.client is not None:
        writer.client.close()
    assert agent.stop() == 0
    assert "Traceback" not in agent.log(), agent.log()[-4000:]
    assert "replication failed" not in agent.log(), agent.log()[-4000:]


def test_a_resync_closes_at_a_flush_not_between_two(workdir: str, target: Target) -> None:
    """With --cp-interval only client FLUSHes close points, the resync's closing point too: a
    write still waiting for its FLUSH when the resync pass ends reaches the replica with that
    FLUSH, not with the resync (the replica would show a state no FLUSH ever had)."""
    src = os.path.join(workdir, "vol.img")
    write_random(src, SIZE, seed=91)
    nport, mport = free_port(), free_port()
    cmd = push_cmd(src, target, "vol", os.path.join(workdir, "st"), "--nbd-listen",
                   f"127.0.0.1:{nport}", "--cp-interval", "3600", "--rate-limit", "2MB/s",
                   "--metrics-port", str(mport))
    agent = Proc(cmd, os.path.join(workdir, "agent.log")).start()
    wait_for(lambda: port_open(nport), 30, "the export")
    client = NbdClient("127.0.0.1", nport, "vol")
    new = random.Random(92).randbytes(BS)
    client.write(0, new)  # acknowledged, no FLUSH yet

    def pass_done() -> bool:
        s = scrape(mport)
        return (metric(s, "drctl_replication_resync_size_bytes", volume="vol") > 0
                and metric(s, "drctl_replication_resync_remaining_bytes", volume="vol") == 0)

    wait_for(pass_done, 30, "the resync pass to end")
    time.sleep(2.0)  # its last batches acknowledged: the old code closed the resync here
    assert metric(scrape(mport), "drctl_replication_protected", volume="vol") == 0
    with open(target.image("vol"), "rb") as fh:
        assert fh.read(BS) != new, "the replica shows a write whose FLUSH never came"
    client.flush()
    wait_for(lambda: same_file(src, target.image("vol")), 30, "the FLUSH's point on the replica")
    wait_for(lambda: metric(scrape(mport), "drctl_replication_protected", volume="vol") == 1,
             10, "protected after the FLUSH")
    client.close()
    assert agent.stop() == 0
    assert "Traceback" not in agent.log(), agent.log()[-3000:]


def test_warm_mode_holds_points_until_promotion(workdir: str) -> None:
    target = Target(workdir, None, "--mode", "warm").start()
    src = os.path.join(workdir, "vol.img")
    write_random(src, SIZE, seed=73)
    nport, mport = free_port(), free_port()
    agent = Proc(push_cmd(src, target, "vol", os.path.join(workdir, "st"), "--nbd-listen",
                          f"127.0.0.1:{nport}", "--metrics-port", str(mport)),
                 os.path.join(workdir, "agent.log")).start()
    wait_for(lambda: port_open(nport) and port_open(mport), 20, "export")
    client = NbdClient("127.0.0.1", nport, "vol")
    client.write(8 * BS, b"\x5a" * (3 * BS))
    client.flush()
    client.close()

    def caught_up() -> bool:
        s = scrape(mport)
        return (metric(s, "drctl_replication_consistency_point", volume="vol") >= 2
                and metric(s, "drctl_replication_lag_seconds", volume="vol") == 0)

    wait_for(caught_up, 30, "the source to see its points acknowledged")
    assert metric(target.metrics(), "drctl_replication_staged_batches", volume="vol") > 0
    with open(target.image("vol"), "rb") as fh:
        assert fh.read() == bytes(SIZE)  # nothing applied in warm mode
    p = run(fence_cmd(target, "vol", 1))  # the promotion, by the target's site
    assert p.returncode == 0, p.stderr
    assert "consistency point" in p.stdout
    assert same_file(src, target.image("vol"))  # promotion applied every complete point
    assert metric(target.metrics(), "drctl_replication_staged_batches", volume="vol") == 0
    agent.stop()
    # A scan-based source into the warm target: no COPY records (they are not idempotent in
    # the redo journal), the replica verifies against what it will hold, fencing applies it.
    scan = os.path.join(workdir, "scan.img")
    block = os.urandom(BS)
    with open(scan, "wb") as fh:
        fh.write(block * 64 + os.urandom(BS * 64))  # 63 duplicates of one block
    p = run(push_cmd(scan, target, "scan", os.path.join(workdir, "st2"), "--once", "--json"))
    assert p.returncode == 0, p.stderr
    assert '"dedup_blocks": 0' in p.stdout and '"verified": true' in p.stdout
    assert not same_file(scan, target.image("scan"))
    p = run(fence_cmd(target, "scan", 1))
    assert p.returncode == 0 and same_file(scan, target.image("scan"))
    target.stop()


def test_journal_overflow_falls_back_to_a_bitmap_and_catches_up(workdir: str,
                                                                 target: Target) -> None:
    src = os.path.join(workdir, "vol.img")
    write_random(src, SIZE, seed=74)
    nport, mport = free_port(), free_port()
    limit = 256 << 10
    agent = Proc(push_cmd(src, target, "vol", os.path.join(workdir, "st"), "--nbd-listen",
                          f"127.0.0.1:{nport}", "--metrics-port", str(mport),
                          "--journal-limit", str(limit), "--rate-limit", "2MB/s"),
                 os.path.join(workdir, "agent.log")).start()
    wait_for(lambda: port_open(nport) and port_open(mport) and os.path.exists(
        target.image("vol")) and same_file(src, target.image("vol")), 30, "initial sync")
    assert target.stop() == 0  # the link is down
    client = NbdClient("127.0.0.1", nport, "vol")
    rng = random.Random(75)
    for i in range(64):  # 2 MiB of writes: eight times the journal's limit
        client.write(rng.randrange(SIZE // BS - 8) * BS, rng.randbytes(8 * BS))
        if i % 8 == 7:
            client.flush()
    s = scrape(mport)
    assert metric(s, "drctl_replication_bitmap_blocks", volume="vol") > 0
    assert metric(s, "drctl_replication_journal_bytes", volume="vol") <= limit
    lag = metric(s, "drctl_replication_lag_seconds", volume="vol")
    assert lag > 0
    # writes keep being accepted in bitmap mode, and the lag keeps growing truthfully
    time.sleep(0.5)
    client.write(0, b"\x01" * BS)
    client.flush()
    assert metric(scrape(mport), "drctl_replication_lag_seconds", volume="vol") >= lag + 0.4
    target.start()
    # While the resync runs (at 2 MB/s), writes go on faster than the link: the journal
    # overflows again and another round follows; once the writes stop the rounds converge.
    # (the agent reconnects on its own backoff: the writes go on until a round overflowed)
    stop_at = time.monotonic() + 2.0
    while time.monotonic() < stop_at or (
            "another round" not in agent.log() and time.monotonic() < stop_at + 20):
        client.write(rng.randrange(SIZE // BS - 16) * BS, rng.randbytes(16 * BS))
        client.flush()
        time.sleep(0.02)
    wait_for(lambda: same_file(src, target.image("vol")), 60, "the resync after the outage")
    wait_for(lambda: metric(scrape(mport), "drctl_replication_lag_seconds", volume="vol") == 0
             and metric(scrape(mport), "drctl_replication_bitmap_blocks", volume="vol") == 0,
             20, "lag back to 0")
    client.close()
    assert agent.stop() == 0
    assert "change bitmap" in agent.log(), agent.log()[-3000:]
    assert "another round" in agent.log(), agent.log()[-3000:]


class GroupWriter:
    """Transactions over two volumes of one consistency group: a data page and a log record
    each, with FLUSHes; keeps the hash of both volumes together at every FLUSH."""

    def __init__(self, paths: dict[str, str], port: int, seed: int) -> None:
        self.models: dict[str, bytearray] = {}
        for name, path in paths.items():
            with open(path, "rb") as fh:
                self.models[name] = bytearray(fh.read())
        self.port = port
        self.rng = random.Random(seed)
        self.clients: dict[str, NbdClient] = {}
        self.flushed = {self.digest()}
        self.stop = threading.Event()
        self.error: BaseException | None = None
        self.rounds = 0
        self.sizes = (1, 1, 2, 300)  # blocks per data write: 300 spans several batches

    def digest(self) -> bytes:
        h = xxhash.xxh3_128()
        for name in sorted(self.models):
            h.update(self.models[name])
        return h.digest()

    def connect(self) -> None:
        for c in self.clients.values():
            c.sock.close()
        self.clients = {n: NbdClient("127.0.0.1", self.port, n) for n in self.models}

    def round(self) -> None:
        rng = self.rng
        for name in ("log", "data", "log") if rng.random() < 0.5 else ("data", "log"):
            size = len(self.models[name])
            n = rng.choice(self.sizes) if name == "data" else 1
            b = rng.randrange(size // BS - n)
            data = rng.randbytes(n * BS)
            self.clients[name].write(b * BS, data)
            self.models[name][b * BS : b * BS + len(data)] = data
        self.clients[rng.choice(("data", "log"))].flush()  # closes a point of the group
        self.flushed.add(self.digest())
        self.rounds += 1

    def run(self) -> None:
        try:
            while not self.stop.is_set():
                self.round()
        except (ConnectionError, OSError, NbdError) as exc:
            self.error = exc


def _group_clone_digest(target: Target, tag: str, pause: float = 0.0) -> bytes:
    """Clone both members one after the other (the source may still be streaming: the target
    holds the group at one point until the clones are dropped) and hash them together."""
    async def clones() -> bytes:
        client = TargetClient(target.address, target.security())
        try:
            h = xxhash.xxh3_128()
            for v in ("data", "log"):  # the order of GroupWriter.digest
                path = (await client.clone(v, f"{tag}-{v}")).path
                with open(path, "rb") as fh:
                    h.update(fh.read())
                await asyncio.sleep(pause)
            for v in ("data", "log"):
                await client.drop_clone(v, f"{tag}-{v}")
            return h.digest()
        finally:
            await client.close()

    return asyncio.run(clones())


def _drill_while_streaming(target: Target, writer: GroupWriter, agent: Proc) -> None:
    """A drill's clones while the source streams: members cloned 0.3 s apart show one point."""
    writer.connect()
    writer.stop.clear()
    writer.error = None
    writer.sizes = (1, 2)  # lighter: the link (4 MB/s) must catch up at the end
    thread = threading.Thread(target=writer.run, daemon=True)
    thread.start()
    seen = []
    try:
        for k in range(3):
            time.sleep(0.3)
            seen.append((writer.rounds, _group_clone_digest(target, f"live{k}", pause=0.3)))
    finally:
        writer.stop.set()
        thread.join(30)
        for c in writer.clients.values():
            c.sock.close()
    assert writer.error is None and writer.rounds > 10, agent.log()[-3000:]
    # judged once the writer has stopped: a FLUSH's state is in ``flushed`` even if the
    # writer thread had not added it yet when the clone was taken
    for k, (rounds, digest) in enumerate(seen):
        assert digest in writer.flushed, (
            f"clone live{k} (after round {rounds} of {writer.rounds}) is at no FLUSH's "
            f"state\n--- agent\n{agent.log()[-4000:]}\n--- target\n"
            f"{target.proc.log()[-4000:] if target.proc else ''}")


def test_group_replicas_are_consistent_with_each_other(workdir: str, target: Target) -> None:
    paths = {"data": os.path.join(workdir, "data.img"), "log": os.path.join(workdir, "log.img")}
    write_random(paths["data"], SIZE, seed=81)
    write_random(paths["log"], 1 << 20, seed=82)
    nport, mport = free_port(), free_port()
    cmd = [*DRCTL, "replicate", "push-group", "--group", "db", "--to", target.address,
           "--nbd-listen", f"127.0.0.1:{nport}", "--state-dir", os.path.join(workdir, "st"),
           "--cp-interval", "3600", "--metrics-port", str(mport), "--rate-limit", "4MB/s",
           *target.client_flags(), f"data={paths['data']}", f"log={paths['log']}"]
    agent = Proc(cmd, os.path.join(workdir, "agent1.log")).start()
    wait_for(lambda: port_open(nport) and all(
        os.path.exists(target.image(v)) and same_file(p, target.image(v))
        for v, p in paths.items()), 30, "initial sync of both members")
    writer = GroupWriter(paths, nport, seed=83)
    rng = random.Random()
    for attempt in range(4):
        writer.connect()
        writer.stop.clear()
        thread = threading.Thread(target=writer.run, daemon=True)
        thread.start()
        time.sleep(rng.uniform(0.5, 1.0))
        if attempt % 2 == 0:
            assert target.proc is not None
            target.proc.kill9()  # the target dies with points half staged
            time.sleep(rng.uniform(0.1, 0.4))
        agent.kill9()  # no more batches: the target settles on one point for both members
        thread.join(30)
        assert not isinstance(writer.error, NbdError), f"{writer.error}\n{agent.log()[-3000:]}"
        if attempt % 2 == 0:
            target.start()
        digest = _group_clone_digest(target, f"a{attempt}")
        assert digest in writer.flushed, f"members not at the same FLUSH (attempt {attempt})"
        for name, path in paths.items():  # the journal replays what was acknowledged
            with open(path, "rb") as fh:
                writer.models[name] = bytearray(fh.read())
        writer.flushed.add(writer.digest())
        agent = Proc(cmd, os.path.join(workdir, f"agent{attempt + 2}.log")).start()
        wait_for(lambda: port_open(nport), 30, "the restarted exports")
    _drill_while_streaming(target, writer, agent)
    try:
        wait_for(lambda: all(same_file(p, target.image(v)) for v, p in paths.items()), 60,
                 "both replicas to equal their sources")
    except TimeoutError:
        assert target.proc is not None
        raise AssertionError(f"agent:\n{agent.log()[-3000:]}\ntarget:\n"
                             f"{target.proc.log()[-3000:]}\nsource metrics: {scrape(mport)}"
                             ) from None
    wait_for(lambda: all(metric(scrape(mport), "drctl_replication_lag_seconds", volume=v) == 0
                         for v in paths), 20, "the last consistency point acknowledged")
    assert agent.stop() == 0
    assert "Traceback" not in agent.log(), agent.log()[-3000:]
    assert "replication failed" not in agent.log(), agent.log()[-3000:]


def test_warm_mode_applies_on_its_schedule(workdir: str) -> None:
    target = Target(workdir, None, "--mode", "warm", "--apply-interval", "1").start()
    src = os.path.join(workdir, "vol.img")
    write_random(src, SIZE, seed=76)
    nport = free_port()
    agent = Proc(push_cmd(src, target, "vol", os.path.join(workdir, "st"), "--nbd-listen",
                          f"127.0.0.1:{nport}"), os.path.join(workdir, "agent.log")).start()
    wait_for(lambda: port_open(nport), 20, "export")
    client = NbdClient("127.0.0.1", nport, "vol")
    client.write(100, b"\x42" * 5000)  # unaligned: merged into whole blocks by the export
    client.flush()
    client.close()
    wait_for(lambda: metric(target.metrics(), "drctl_replication_applied_consistency_point",
                            volume="vol") >= 2, 30, "the scheduled apply")
    assert same_file(src, target.image("vol"))
    assert agent.stop() == 0
    target.stop()
