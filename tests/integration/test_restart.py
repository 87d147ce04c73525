"""Restarts that do not read the volume (capture/resume.py, blockindex.py), with real daemons:
after a clean stop the capture agent resumes from its saved state (no whole-volume comparison)
and the target loads its saved block index; a corrupt state file, a corrupt index or a volume
written while the agent was stopped fall back to reading everything, and the log says which
file or what, and why. Whatever the path, the replica ends equal to the volume."""

from __future__ import annotations

import glob
import os
import random

from tests.nbdclient import NbdClient
from tests.procs import (
    DRCTL,
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

BS = 4096


class Agent:
    """`push --nbd-listen` at INFO, restarted in the same state directory."""

    def __init__(self, workdir: str, target: Target, src: str) -> None:
        self.workdir, self.target, self.src = workdir, target, src
        self.nport, self.mport = free_port(), free_port()
        cmd = push_cmd(src, target, "vol", os.path.join(workdir, "st"), "--nbd-listen",
                       f"127.0.0.1:{self.nport}", "--metrics-port", str(self.mport),
                       "--verify-rate", "0")
        self.cmd = [*DRCTL, "--log-level", "INFO", *cmd[len(DRCTL):]]
        self.runs = 0
        self.proc: Proc | None = None

    def start(self) -> Proc:
        self.runs += 1
        self.proc = Proc(self.cmd, os.path.join(self.workdir, f"agent{self.runs}.log")).start()
        wait_for(lambda: port_open(self.mport) and metric(
            scrape(self.mport), "drctl_replication_protected", volume="vol") == 1, 60,
            f"agent run {self.runs} protected")
        return self.proc

    def write_and_wait(self, seed: int) -> None:
        rng = random.Random(seed)
        client = NbdClient("127.0.0.1", self.nport, "vol")
        try:
            for _ in range(40):
                client.write(rng.randrange(2048) * BS, rng.randbytes(BS))
            client.flush()
        finally:
            client.close()
        wait_for(lambda: same_file(self.src, self.target.image("vol")), 30,
                 "the writes on the replica")

    def stop(self) -> str:
        assert self.proc is not None
        assert self.proc.stop() == 0, self.proc.log()[-3000:]
        log = self.proc.log()
        assert "Traceback" not in log, log[-3000:]
        return log


def test_clean_restarts_resume_and_damaged_state_falls_back_to_a_full_check(
        workdir: str, target: Target) -> None:
    src = os.path.join(workdir, "vol.img")
    write_random(src, 8 << 20, seed=91)
    agent = Agent(workdir, target, src)
    agent.start()
    agent.write_and_wait(1)
    first = agent.stop()
    assert "resync (whole-volume comparison)" in first  # a first start compares everything

    # a clean stop of both sides: neither reads the volume or the image again
    assert target.stop() == 0
    target.start()
    agent.start()
    log = agent.stop()
    assert "resumed from saved state (clean stop)" in log, log[-3000:]
    assert "resync (changed blocks) of 0 blocks" in log
    assert "resync (whole-volume comparison)" not in log
    assert target.proc is not None
    assert "vol.index: loaded (saved at a clean stop)" in target.proc.log()

    # a corrupt state file: a full check, and the log names the file and the reason
    (view,) = glob.glob(os.path.join(workdir, "st", "push", "vol-*", "view.hashes"))
    with open(view, "r+b") as fh:
        fh.seek(8 * 100)
        fh.write(b"\x01")
    agent.start()
    agent.write_and_wait(2)
    log = agent.stop()
    assert f"{view}: checksum mismatch" in log, log[-3000:]
    assert "not resumed from saved state" in log and "resync (whole-volume comparison)" in log

    # written behind the export while the agent was stopped: seen by the volume's identity
    fd = os.open(src, os.O_RDWR)
    os.pwrite(fd, b"outside the export" * 200, 77 * BS)
    os.close(fd)
    st = os.stat(src)
    os.utime(src, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    # ... and a corrupt block index on the target: hashed from the image again
    assert target.stop() == 0
    index = target.image("vol")[: -len(".img")] + ".index"
    with open(index, "r+b") as fh:
        fh.seek((64 << 10) + 8 * 5)
        fh.write(b"\x01")
    target.start()
    agent.start()
    wait_for(lambda: same_file(src, target.image("vol")), 30, "the outside write replicated")
    log = agent.stop()
    assert "the volume changed while the agent was stopped" in log, log[-3000:]
    assert "resync (whole-volume comparison)" in log
    assert f"{index}: checksum mismatch: hashing the image again" in target.proc.log()

    # and it resumes again after that
    agent.start()
    log = agent.stop()
    assert "resumed from saved state (clean stop)" in log, log[-3000:]
    assert same_file(src, target.image("vol"))
