"""The long-running source agent: live changes, metrics, rate limit, progress, SIGTERM."""

from __future__ import annotations

import os
import pty
import subprocess
import time

from tests.procs import (
    REPO,
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


def test_agent_follows_writes_and_reports_lag(workdir: str, target: Target,
                                              state_dir: str) -> None:
    src = os.path.join(workdir, "src.img")
    write_random(src, 4 << 20, seed=41)
    mport = free_port()
    agent = Proc(push_cmd(src, target, "live", state_dir, "--interval", "0.2",
                          "--metrics-port", str(mport)),
                 os.path.join(workdir, "agent.log")).start()
    try:
        wait_for(lambda: port_open(mport), 20, "agent metrics endpoint")

        def caught_up() -> bool:
            s = scrape(mport)
            return (os.path.exists(target.image("live"))
                    and same_file(src, target.image("live"))
                    and metric(s, "drctl_replication_lag_seconds", volume="live") == 0
                    and metric(s, "drctl_replication_pending_bytes", volume="live") == 0)

        wait_for(caught_up, 30, "initial sync to finish and lag to return to 0")
        shipped = metric(scrape(mport), "drctl_replication_shipped_raw_bytes_total",
                         volume="live")
        assert shipped >= 4 << 20

        time.sleep(4)  # idle: the lag of the next write counts from the write, not from here
        with open(src, "r+b") as fh:  # a live write
            fh.seek(123 * 4096)
            fh.write(b"live write" * 400)
        lags = []
        while not same_file(src, target.image("live")) and len(lags) < 200:
            lags.append(metric(scrape(mport), "drctl_replication_lag_seconds", volume="live"))
        assert max(lags, default=0) < 3, lags  # 4 s or more: it counted from the idle time
        wait_for(lambda: same_file(src, target.image("live")), 20, "the write to replicate")
        wait_for(caught_up, 20, "lag back to 0 after the write")
        s = scrape(mport)
        assert metric(s, "drctl_replication_written_bytes_total", volume="live") >= shipped + 4096
        assert metric(s, "drctl_replication_acked_sequence", volume="live") >= 2
    finally:
        code = agent.stop()
    assert code == 0, agent.log()[-3000:]
    assert "Traceback" not in agent.log()


def test_lag_grows_while_the_target_is_down(workdir: str, state_dir: str) -> None:
    target = Target(workdir).start()
    src = os.path.join(workdir, "src.img")
    write_random(src, 1 << 20, seed=42)
    mport = free_port()
    agent = Proc(push_cmd(src, target, "v", state_dir, "--interval", "0.2", "--metrics-port",
                          str(mport)), os.path.join(workdir, "agent.log")).start()
    try:
        wait_for(lambda: port_open(mport) and os.path.exists(target.image("v"))
                 and same_file(src, target.image("v")), 30, "initial sync")
        target.stop()
        with open(src, "r+b") as fh:
            fh.write(b"written while the target is down")
        wait_for(lambda: metric(scrape(mport), "drctl_replication_lag_seconds",
                                volume="v") >= 1.0, 20, "lag to exceed 1 s")
        assert metric(scrape(mport), "drctl_replication_pending_bytes", volume="v") >= 4096
        target = Target(workdir, port=target.port).start()
        wait_for(lambda: metric(scrape(mport), "drctl_replication_lag_seconds",
                                volume="v") == 0, 30, "lag to return to 0")
        assert same_file(src, target.image("v"))
    finally:
        agent.stop()
        target.stop()


def test_rate_limit_holds_over_ten_seconds(workdir: str, target: Target,
                                           state_dir: str) -> None:
    """The cap bounds the bytes put on the wire: 5 MB/s for 10 s of incompressible data."""
    rate = 5_000_000
    src = os.path.join(workdir, "src.img")
    write_random(src, 52 << 20, seed=43)
    mport = free_port()
    agent = Proc(push_cmd(src, target, "rl", state_dir, "--rate-limit", "5MB/s",
                          "--metrics-port", str(mport)),
                 os.path.join(workdir, "agent.log")).start()
    try:
        wait_for(lambda: port_open(mport), 20, "agent metrics endpoint")

        def shipped() -> float:
            return metric(scrape(mport), "drctl_replication_shipped_compressed_bytes_total",
                          volume="rl")

        wait_for(lambda: shipped() > 0, 20, "shipping to start")
        t0, b0 = time.monotonic(), shipped()
        time.sleep(10)
        t1, b1 = time.monotonic(), shipped()
    finally:
        agent.stop()
    observed = (b1 - b0) / (t1 - t0)
    assert abs(observed - rate) / rate < 0.05, f"observed {observed:.0f} B/s for cap {rate}"


def test_progress_bar_on_a_terminal(workdir: str, target: Target, state_dir: str) -> None:
    src = os.path.join(workdir, "src.img")
    write_random(src, 16 << 20, seed=44)
    cmd = push_cmd(src, target, "tty", state_dir, "--once", "--rate-limit", "16MB/s")
    cmd.remove("--no-progress")
    master, slave = pty.openpty()
    proc = subprocess.Popen(cmd, stdin=slave, stdout=slave, stderr=slave, cwd=REPO)
    os.close(slave)
    out = b""
    while True:
        try:
            chunk = os.read(master, 4096)
        except OSError:
            break
        if not chunk:
            break
        out += chunk
    os.close(master)
    assert proc.wait(60) == 0, out.decode(errors="replace")
    text = out.decode(errors="replace")
    assert "tty [" in text and "%" in text and "eta" in text
    last = [d for d in text.split("\r") if d.startswith("tty [")][-1]  # the bar's last draw
    assert "100.0% checked 16.0 MiB/16.0 MiB, shipped 16.0 MiB/16.0 MiB" in last, last
    # the shipping rate under the 16 MB/s cap, not the scan's speed
    draws = [d for d in text.split("\r") if " at " in d and "/s, eta" in d]
    rates = [d.split(" at ")[1].split("/s")[0] for d in draws]
    assert rates and all(r.endswith(("MiB", "KiB", " B")) for r in rates), rates
    mib = [float(r.split()[0]) for r in rates if r.endswith("MiB")]
    assert mib and max(mib) < 20, rates


def test_writes_racing_the_scan_converge_without_rejections(workdir: str, target: Target,
                                                            state_dir: str) -> None:
    """A writer hammers the volume while the agent scans and ships it: what is hashed is what
    is shipped (no batch is ever rejected), and the replica converges once writes stop."""
    import random
    import threading

    src = os.path.join(workdir, "src.img")
    write_random(src, 8 << 20, seed=45)
    mport = free_port()
    agent = Proc(push_cmd(src, target, "race", state_dir, "--interval", "0.05",
                          "--metrics-port", str(mport)),
                 os.path.join(workdir, "agent.log")).start()
    stop = threading.Event()

    def writer() -> None:
        rng = random.Random(46)
        fd = os.open(src, os.O_RDWR)
        try:
            while not stop.is_set():
                os.pwrite(fd, rng.randbytes(4096), rng.randrange(2048) * 4096)
        finally:
            os.close(fd)

    t = threading.Thread(target=writer)
    try:
        wait_for(lambda: port_open(mport), 20, "agent metrics endpoint")
        t.start()
        time.sleep(4)
        stop.set()
        t.join()
        wait_for(lambda: same_file(src, target.image("race")), 30, "the replica to converge")
    finally:
        stop.set()
        agent.stop()
    rejected = sum(v for k, v in target.metrics().items()
                   if k.startswith("drctl_replication_rejected_batches_total"))
    assert rejected == 0
