"""Restarts that do not read the volume (capture/resume.py, blockindex.py), with real daemons:
after a clean stop the capture agent resumes from its saved state (no whole-volume comparison)
and the target loads its saved block index; a corrupt state file, a corrupt index or a volume
written while the agent was stopped fall back to reading everything, and the log says which
file or what, and why. After a crash of the machine (kill -9 of both, another DRCTL_BOOT_ID,
the hash entries of the logged extents spoilt as if never written back) only the extents of
the activity logs are checked, and a damaged activity log falls back to everything. Whatever
the path, the replica ends equal to the volume."""

from __future__ import annotations

import glob
import os
import random
import re

import pytest

from replicator.activity import EXTENT_BLOCKS, read
from replicator.blockindex import INDEX_HEADER
from tests.damage import flip_byte
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


def _logged(path: str) -> set[int]:
    saved, why = read(path)
    assert saved is not None and not saved.everything, f"{path}: {why}"
    return set(saved.extents)


def _spoil(path: str, at: int, extents: set[int]) -> None:
    """The hash entries of ``extents`` as a crash of the machine may leave them: never written
    back (garbage here). The other entries are what the last checkpoint made durable."""
    fd = os.open(path, os.O_RDWR)
    try:
        for e in extents:
            os.pwrite(fd, os.urandom(8 * EXTENT_BLOCKS), at + 8 * e * EXTENT_BLOCKS)
    finally:
        os.close(fd)


def _rchar(pid: int) -> int:
    """Bytes the process read (read and pread: the image's hashing counts here)."""
    with open(f"/proc/{pid}/io") as fh:
        return int(next(line for line in fh if line.startswith("rchar:")).split()[1])


def _since(path: str, offset: int) -> str:
    with open(path, errors="replace") as fh:
        fh.seek(offset)
        return fh.read()


def _crash(agent: Agent, target: Target, files: dict[str, str], damage: bool
           ) -> tuple[set[int], set[int]]:
    """kill -9 of both daemons, then what a crash of the machine may leave: the hash entries
    of the logged extents spoilt, a write the client was never answered for on the volume
    (its journal record lost), and, with ``damage``, both activity logs damaged. Returns the
    extents the target's and the agent's logs listed."""
    assert agent.proc is not None and target.proc is not None
    agent.proc.kill9()
    target.proc.kill9()
    t_logged, a_logged = _logged(files["target_al"]), _logged(files["agent_al"])
    assert t_logged and t_logged <= {0, 1} and a_logged and a_logged <= {0, 1}
    _spoil(files["index"], INDEX_HEADER, t_logged)
    _spoil(files["view"], 0, a_logged)
    fd = os.open(agent.src, os.O_RDWR)  # in an extent the export listed before writing it
    os.pwrite(fd, random.randbytes(BS), (min(a_logged) * EXTENT_BLOCKS + 7) * BS)
    os.close(fd)
    if damage:
        for path in (files["target_al"], files["agent_al"]):
            flip_byte(path, 40)
    return t_logged, a_logged


def _only_the_logged_extents(tlog: str, alog: str, t_logged: set[int],
                             a_logged: set[int]) -> None:
    t_line = (f"vol.index: after a restart of the machine, {len(t_logged)} extents "
              f"({4 * len(t_logged)}.0 MiB) from the activity log re-hashed")
    assert t_line in tlog and "hashing the image again" not in tlog, tlog[-3000:]
    assert "resumed from saved state (after a restart of the machine)" in alog, alog[-3000:]
    assert (f"vol: after a restart of the machine, {len(a_logged)} extents "
            f"({4 * len(a_logged)}.0 MiB) from the activity log: the first resync") in alog
    m = re.search(r"resync \(changed blocks\) of (\d+) blocks?", alog)
    assert m and int(m.group(1)) <= len(a_logged) * EXTENT_BLOCKS + 40, alog[-3000:]
    assert "resync (whole-volume comparison)" not in alog
    shipped = re.search(r"resync \(changed blocks\) shipped (\d+) bytes", alog)
    assert shipped and int(shipped.group(1)) >= BS, alog[-3000:]  # the lost write


def test_after_a_crash_of_the_machine_only_the_activity_logs_extents_are_checked(
        workdir: str, target: Target, monkeypatch: pytest.MonkeyPatch) -> None:
    src = os.path.join(workdir, "vol.img")
    write_random(src, 64 << 20, seed=93)  # 16 extents; the writes go to the first 2
    monkeypatch.setenv("DRCTL_BOOT_ID", "boot-a")
    assert target.stop() == 0
    target.start()
    agent = Agent(workdir, target, src)
    agent.start()
    agent.stop()  # clean stops of both: their activity logs are emptied
    assert target.stop() == 0
    index = target.image("vol")[: -len(".img")] + ".index"
    (view,) = glob.glob(os.path.join(workdir, "st", "push", "vol-*", "view.hashes"))
    files = {"index": index, "target_al": index[: -len(".index")] + ".al", "view": view,
             "agent_al": os.path.join(os.path.dirname(view), "activity.log")}
    target_log = os.path.join(workdir, "target.log")
    reads: dict[str, int] = {}
    for run, damage in (("boot-b", False), ("boot-c", True)):
        target.start()
        agent.start()
        agent.write_and_wait(len(run))
        t_logged, a_logged = _crash(agent, target, files, damage)
        monkeypatch.setenv("DRCTL_BOOT_ID", run)  # the next boot
        mark = os.path.getsize(target_log)
        target.start()
        agent.start()
        assert target.proc is not None
        reads[run] = _rchar(target.proc.pid)
        wait_for(lambda: same_file(src, target.image("vol")), 30, "the replica equal")
        alog = agent.stop()
        assert target.stop() == 0
        tlog = _since(target_log, mark)
        if not damage:
            _only_the_logged_extents(tlog, alog, t_logged, a_logged)
            continue
        warnings = [line for line in tlog.splitlines() if " WARNING " in line]
        assert len(warnings) == 1 and files["target_al"] in warnings[0] and \
            "(torn or checksum mismatch): hashing the image again" in warnings[0], tlog[-4000:]
        assert (f"its activity log {files['agent_al']} cannot be used (torn or checksum "
                "mismatch)" in alog and "resync (whole-volume comparison)" in alog), alog[-3000:]
    # the image's 64 MiB were read only when the activity log could not say what changed
    assert reads["boot-c"] - reads["boot-b"] > 40 << 20, reads
