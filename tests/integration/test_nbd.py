"""Write capture over NBD with real clients from Debian (nbdinfo, nbdcopy, qemu-io, fio):
every acknowledged write reaches the replica, with no rescans of the volume."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator

import pytest

from tests.procs import (
    Proc,
    Target,
    free_port,
    metric,
    port_open,
    push_cmd,
    same_file,
    scrape,
    wait_for,
    write_random,
)


def need(binary: str) -> str:
    path = shutil.which(binary)
    if path is None:
        pytest.skip(f"{binary} is not installed (Debian: qemu-utils, libnbd-bin, fio)")
    return path


@pytest.fixture
def captured(workdir: str, target: Target) -> Iterator[tuple[str, str, int, Proc]]:
    src = os.path.join(workdir, "vol.img")
    write_random(src, 8 << 20, seed=61)
    nport, mport = free_port(), free_port()
    agent = Proc(push_cmd(src, target, "vol", os.path.join(workdir, "st"), "--nbd-listen",
                          f"127.0.0.1:{nport}", "--metrics-port", str(mport),
                          "--interval", "5"),
                 os.path.join(workdir, "agent.log")).start()
    try:
        wait_for(lambda: port_open(nport) and port_open(mport), 20, "NBD export")
        wait_for(lambda: os.path.exists(target.image("vol"))
                 and same_file(src, target.image("vol")), 20, "initial sync")
        yield src, f"nbd://127.0.0.1:{nport}/vol", mport, agent
    finally:
        code = agent.stop()
        assert code == 0, agent.log()[-3000:]
        assert "Traceback" not in agent.log()


def _scanned(mport: int) -> float:
    return metric(scrape(mport), "drctl_replication_written_bytes_total", volume="vol")


def test_nbdinfo_and_nbdcopy_round_trip(captured: tuple[str, str, int, Proc], workdir: str,
                                        target: Target) -> None:
    src, uri, _mport, _agent = captured
    info = subprocess.run([need("nbdinfo"), "--json", uri], capture_output=True, text=True)
    assert info.returncode == 0, info.stderr
    assert '"export-size": 8388608' in info.stdout
    data = os.path.join(workdir, "new.bin")
    write_random(data, 8 << 20, seed=62)
    assert subprocess.run([need("nbdcopy"), data, uri]).returncode == 0
    back = os.path.join(workdir, "back.bin")
    assert subprocess.run([need("nbdcopy"), uri, back]).returncode == 0
    assert same_file(data, back) and same_file(data, src)
    wait_for(lambda: same_file(src, target.image("vol")), 20, "the copy to replicate")


def test_qemu_io_writes_flush_trim_and_zeroes(captured: tuple[str, str, int, Proc],
                                              target: Target) -> None:
    src, uri, mport, _agent = captured
    before = _scanned(mport)
    cmds = ["write -P 0xab 4096 65536", "flush", "write -z 1048576 8192",
            "discard 2097152 4096", "write -P 0x5c 8384512 4096", "read -P 0xab 4096 65536"]
    args = [need("qemu-io"), "-f", "raw", uri]
    for c in cmds:
        args += ["-c", c]
    p = subprocess.run(args, capture_output=True, text=True)
    assert p.returncode == 0 and "Pattern verification failed" not in p.stdout, p.stdout
    with open(src, "rb") as fh:
        fh.seek(4096)
        assert fh.read(65536) == b"\xab" * 65536
    wait_for(lambda: same_file(src, target.image("vol")), 20, "qemu-io writes to replicate")
    wait_for(lambda: metric(scrape(mport), "drctl_replication_lag_seconds", volume="vol") == 0,
             10, "lag back to 0 once everything is acknowledged")
    shipped = _scanned(mport) - before
    assert shipped <= 24 * 4096, f"shipped {shipped} bytes: only written blocks should go"


def test_fio_random_writes_through_nbd(captured: tuple[str, str, int, Proc],
                                       target: Target) -> None:
    src, _uri, _mport, _agent = captured
    port = _uri.split(":")[2].split("/")[0]
    p = subprocess.run([need("fio"), "--name=w", "--ioengine=nbd", f"--uri={_uri}",
                        "--rw=randwrite", "--bs=4k", "--size=8m", "--io_size=2m",
                        "--iodepth=8", "--randrepeat=0", "--end_fsync=1"],
                       capture_output=True, text=True)
    if "ioengine" in p.stderr and "nbd" in p.stderr and p.returncode != 0:
        pytest.skip(f"fio here has no nbd engine: {p.stderr[:200]}")
    assert p.returncode == 0, p.stdout + p.stderr + port + _agent.log()[-3000:]
    wait_for(lambda: same_file(src, target.image("vol")), 30, "fio's writes to replicate")


def test_source_killed_after_acknowledged_writes_ships_them_after_restart(
        workdir: str, target: Target) -> None:
    """Writes acknowledged over NBD while the target is down survive a kill -9 of the source
    (they are journaled before the reply) and reach the replica after the restart."""
    src = os.path.join(workdir, "vol.img")
    write_random(src, 4 << 20, seed=63)
    nport = free_port()
    cmd = push_cmd(src, target, "vol", os.path.join(workdir, "st"), "--nbd-listen",
                   f"127.0.0.1:{nport}", "--interval", "0.2")
    agent = Proc(cmd, os.path.join(workdir, "agent1.log")).start()
    wait_for(lambda: port_open(nport) and os.path.exists(target.image("vol"))
             and same_file(src, target.image("vol")), 20, "initial sync")
    target.stop()
    p = subprocess.run([need("qemu-io"), "-f", "raw", f"nbd://127.0.0.1:{nport}/vol", "-c",
                        "write -P 0x77 12288 16384", "-c", "flush"], capture_output=True,
                       text=True)
    assert p.returncode == 0, p.stdout + p.stderr
    agent.kill9()
    target.start()
    agent2 = Proc(cmd, os.path.join(workdir, "agent2.log")).start()
    try:
        wait_for(lambda: same_file(src, target.image("vol")), 30, "the journaled writes")
        with open(target.image("vol"), "rb") as fh:
            fh.seek(12288)
            assert fh.read(16384) == b"\x77" * 16384
    finally:
        agent2.stop()


def test_kill_9_either_side_while_fio_writes(workdir: str, target: Target) -> None:
    """fio writes through the export while the target and then the source are killed -9 at
    random points; after the restarts the replica equals the source: no acknowledged write is
    lost."""
    import random

    rng = random.Random()
    src = os.path.join(workdir, "vol.img")
    write_random(src, 16 << 20, seed=64)
    nport = free_port()
    cmd = push_cmd(src, target, "vol", os.path.join(workdir, "st"), "--nbd-listen",
                   f"127.0.0.1:{nport}", "--interval", "0.1")
    uri = f"nbd://127.0.0.1:{nport}/vol"
    fio_cmd = [need("fio"), "--name=crash", "--ioengine=nbd", f"--uri={uri}", "--rw=randwrite",
               "--bs=4k", "--size=16m", "--iodepth=8", "--randrepeat=0", "--runtime=30",
               "--time_based", "--output=/dev/null"]
    agent = Proc(cmd, os.path.join(workdir, "agent1.log")).start()
    agent2: Proc | None = None
    try:
        wait_for(lambda: port_open(nport) and os.path.exists(target.image("vol"))
                 and same_file(src, target.image("vol")), 30, "initial sync")
        fio = subprocess.Popen(fio_cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        import time

        time.sleep(rng.uniform(0.5, 1.5))
        assert target.proc is not None
        target.proc.kill9()  # the target dies mid-stream; writes keep being acknowledged
        time.sleep(rng.uniform(0.3, 1.0))
        target.start()
        time.sleep(rng.uniform(0.5, 1.5))
        agent.kill9()  # now the source, with fio's writes in flight
        fio.wait(30)  # fio loses its connection
        agent2 = Proc(cmd, os.path.join(workdir, "agent2.log")).start()
        wait_for(lambda: same_file(src, target.image("vol")), 60,
                 "the replica to equal the source after both restarts")
    finally:
        if agent2 is not None:
            agent2.stop()
        agent.stop()
