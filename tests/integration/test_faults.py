"""Failures with real processes: kill -9 of either side mid-sync, stale epochs, bad input."""

from __future__ import annotations

import json
import os
import time

from tests.procs import (
    DRCTL,
    Proc,
    Target,
    epoch_args,
    fence_cmd,
    free_port,
    metric,
    push_cmd,
    run,
    same_file,
    wait_for,
    write_random,
)

SIZE = 48 << 20


def _read(path: str) -> bytes:
    with open(path, "rb") as fh:
        return fh.read()


def _report(stdout: str) -> dict[str, object]:
    out: dict[str, object] = json.loads(stdout.strip().splitlines()[-1])
    return out


def test_source_killed_mid_sync_resumes_without_full_resend(workdir: str, target: Target,
                                                             state_dir: str) -> None:
    src = os.path.join(workdir, "src.img")
    write_random(src, SIZE, seed=21)
    source = Proc(push_cmd(src, target, "vol", state_dir, "--once", "--rate-limit", "12MB/s"),
                  os.path.join(workdir, "source1.log")).start()

    def applied() -> float:
        return metric(target.metrics(), "drctl_replication_applied_sequence", volume="vol")

    wait_for(lambda: applied() >= 6, 30, "target to apply some batches")
    source.kill9()
    acked_before = applied()
    assert acked_before < SIZE // (2 << 20)  # really mid-sync
    p = run(push_cmd(src, target, "vol", state_dir, "--once", "--json"))
    assert p.returncode == 0, p.stderr
    r = _report(p.stdout)
    assert r["full_listing_fetched"] is True  # the saved state was stale: ask the replica
    assert int(r["raw_bytes"]) <= SIZE - acked_before * (2 << 20)  # acked data not resent
    assert same_file(src, target.image("vol"))


def test_target_killed_mid_sync_source_waits_and_resumes(workdir: str, state_dir: str) -> None:
    target = Target(workdir).start()
    src = os.path.join(workdir, "src.img")
    write_random(src, SIZE, seed=22)
    source = Proc(push_cmd(src, target, "vol", state_dir, "--once", "--json",
                           "--rate-limit", "16MB/s"),
                  os.path.join(workdir, "source.log"))
    source.popen = None
    import subprocess

    from tests.procs import REPO

    popen = subprocess.Popen(source.args, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, cwd=REPO)
    try:
        wait_for(lambda: metric(target.metrics(), "drctl_replication_applied_sequence",
                                volume="vol") >= 4, 30, "target to apply some batches")
        assert target.proc is not None
        target.proc.kill9()
        time.sleep(1.0)  # the source keeps retrying meanwhile
        assert popen.poll() is None, "source gave up while the target was down"
        target = Target(workdir, port=target.port).start()
        out, err = popen.communicate(timeout=60)
        assert popen.returncode == 0, err
        r = _report(out)
        assert int(r["reconnects"]) >= 1
        assert int(r["wire_bytes"]) < SIZE * 1.25  # resumed, not resent in full
        assert same_file(src, target.image("vol"))
    finally:
        if popen.poll() is None:
            popen.kill()
        target.stop()


def test_stale_epoch_source_is_refused(workdir: str, target: Target, state_dir: str) -> None:
    src = os.path.join(workdir, "src.img")
    write_random(src, 1 << 20, seed=23)
    epoch3 = epoch_args(target, "vol", 3)
    assert run(push_cmd(src, target, "vol", state_dir, "--once", *epoch3)).returncode == 0
    before = _read(target.image("vol"))
    with open(src, "r+b") as fh:
        fh.write(b"stale writer")
    p = run(push_cmd(src, target, "vol", os.path.join(workdir, "old"), "--once", "--epoch", "2"))
    assert p.returncode == 77, p.stderr
    assert "stale_epoch" in p.stderr and "epoch 3" in p.stderr
    assert _read(target.image("vol")) == before
    # the current epoch still replicates
    assert run(push_cmd(src, target, "vol", state_dir, "--once", *epoch3)).returncode == 0
    assert same_file(src, target.image("vol"))


def test_bad_flags_and_unreachable_target(workdir: str, state_dir: str) -> None:
    src = os.path.join(workdir, "src.img")
    write_random(src, 64 << 10)
    base = [*DRCTL, "replicate", "push", src, "--volume", "v", "--state-dir", state_dir,
            "--insecure"]
    p = run([*base, "--to", "127.0.0.1:1", "--rate-limit", "fast"])
    assert p.returncode == 2 and "invalid rate 'fast'" in p.stderr
    p = run([*base, "--to", "nowhere"])
    assert p.returncode == 2 and "expected HOST:PORT" in p.stderr
    p = run([*DRCTL, "replicate", "push", "/nonexistent.img", "--to", "127.0.0.1:1",
             "--volume", "v"])
    assert p.returncode == 2 and "does not exist" in p.stderr
    p = run([*base, "--to", f"127.0.0.1:{free_port()}", "--once", "--connect-timeout", "1"])
    assert p.returncode == 69, p.stderr
    assert "target_unavailable" in p.stderr and "Traceback" not in p.stderr
    p = run([*base, "--to", "127.0.0.1:1", "--volume", "../escape", "--once"])
    assert p.returncode == 2 and "invalid volume name" in p.stderr


def test_fenced_replica_refuses_the_old_primary(workdir: str, target: Target,
                                                state_dir: str) -> None:
    """A failover's promote step fences the replica at the new epoch: the old primary's
    running agent is refused on its next batch and stops (exit 77); nothing it sends lands."""
    src = os.path.join(workdir, "src.img")
    write_random(src, 1 << 20, seed=24)
    agent = Proc(push_cmd(src, target, "vol", state_dir, *epoch_args(target, "vol", 1),
                          "--interval", "0.1"), os.path.join(workdir, "agent.log")).start()
    try:
        wait_for(lambda: os.path.exists(target.image("vol"))
                 and same_file(src, target.image("vol")), 20, "initial sync")
        p = run(fence_cmd(target, "vol", 2))  # the promotion at the target's site
        assert p.returncode == 0, p.stderr
        assert "epoch 2" in p.stdout
        before = _read(target.image("vol"))
        with open(src, "r+b") as fh:
            fh.write(b"split-brain write from the old primary")
        assert agent.wait(20) == 77, agent.log()[-2000:]
        assert "stale_epoch" in agent.log()
        assert _read(target.image("vol")) == before
        p = run(fence_cmd(target, "vol", 1, token=False))
        assert p.returncode == 77 and "stale_epoch" in p.stderr
    finally:
        agent.stop()
