"""The protection lifecycle with real processes: etcd, named, two site agents running their
data paths from one runbook, a controller, and a writer through the NBD export that keeps a
model of every acknowledged write.

Each cycle: kill -9 the primary's agent (its capture agent and target die with it) while
writing; automatic failover; writes continue at the new primary; the old site comes back,
is demoted and re-protected by the exact delta; a failback (drain under a write barrier,
fence, promote, reverse) returns the service home. After each phase: no acknowledged write
is lost (in the serving volume, or set aside by the demoted site), the replica equals the
primary (`drctl replicate verify`), and a resync ships at most twice the changed blocks.
"""

from __future__ import annotations

import glob
import json
import os
import random
import re
import shutil
import threading
import time

from drctl.localservers import free_port
from tests.nbdclient import NbdClient
from tests.procs import DRCTL, Proc, pki, run, wait_for, write_random
from tests.services import EtcdServer, NamedServer

BS = 4096
SIZE = 32 << 20
HOT_BLOCKS = 2048  # the writer rewrites blocks among the first 8 MiB


class Cluster:
    def __init__(self, workdir: str, etcd: EtcdServer, named: NamedServer,
                 steps: list[dict[str, object]] | None = None,
                 extra_volumes: tuple[str, ...] = ()) -> None:
        self.workdir = workdir
        self.ports = {s: {"repl": free_port(), "nbd": free_port()} for s in ("east", "west")}
        key = os.path.join(workdir, "tsig.key")
        with open(key, "w") as fh:
            fh.write(f'key "{named.key_name}" {{ algorithm hmac-sha256; '
                     f'secret "{named.secret}"; }};\n')
        self.volume = os.path.join(workdir, "{site}", "volumes", "data.img")
        os.makedirs(os.path.join(workdir, "east", "volumes"))
        write_random(self.path("east"), SIZE, seed=7)
        for i, name in enumerate(extra_volumes):
            write_random(self.path("east", name), SIZE // 2, seed=8 + i)
        rb = {
            "kind": "drctl-runbook", "version": 1, "cluster": "life", "lease_ttl": 2,
            "etcd": etcd.etcd_config(),
            "sites": {s: {"address": a, "data_dir": os.path.join(workdir, s, "data"),
                          "endpoints": {"replication": f"127.0.0.1:{self.ports[s]['repl']}"}}
                      for s, a in (("east", "10.0.0.1"), ("west", "10.0.0.2"))},
            "dns": {"zones": {named.zone: {"servers": [f"127.0.0.1:{named.port}"],
                                           "tsig": {"name": named.key_name, "file": key}}}},
            "services": {"app": {
                "primary": "east", "replica": "west",
                "volumes": [{"name": n, "path": self.volume.replace("data.img", f"{n}.img")}
                            for n in ("data", *extra_volumes)],
                "replication": {"mode": "hot", "rpo": 30, "export": {
                    s: f"127.0.0.1:{self.ports[s]['nbd']}" for s in ("east", "west")}},
                "failover": {"automatic": True, "grace": 1, "damping": 0},
                "dns": [{"zone": named.zone, "name": "app", "ttl": 5}],
                "steps": steps or [{"type": "promote"}, {"type": "dns"}]}},
        }
        self.config = os.path.join(workdir, "runbook.yaml")
        with open(self.config, "w") as fh:
            json.dump(rb, fh)
        self.agents: dict[str, Proc] = {}
        self.named = named
        # mutual TLS on the data path; the controller signs the epoch tokens
        self.tls_dir = pki().dir
        self.controller = Proc([*DRCTL, "--log-level", "INFO", "controller", "--config",
                                self.config, "--tls-dir", self.tls_dir],
                               os.path.join(workdir, "controller.log"))

    def path(self, site: str, volume: str = "data") -> str:
        return self.volume.replace("{site}", site).replace("data.img", f"{volume}.img")

    def data(self, site: str) -> str:
        return os.path.join(self.workdir, site, "data")

    def start_agent(self, site: str) -> None:
        self.agents[site] = Proc([*DRCTL, "--log-level", "INFO", "agent", "--config",
                                  self.config, "--site", site, "--tls-dir", self.tls_dir],
                                 os.path.join(self.workdir, f"agent-{site}.log")).start()

    def start(self) -> None:
        """Both site agents and the controller."""
        self.start_agent("east")
        self.start_agent("west")
        self.controller.start()

    def stop(self) -> None:
        """Every process this cluster started, by PID."""
        self.controller.stop()
        for a in self.agents.values():
            a.stop()

    def status(self) -> dict[str, object]:
        p = run([*DRCTL, "status", "--config", self.config, "--json"])
        assert p.returncode == 0, p.stderr
        out: dict[str, object] = json.loads(p.stdout)["services"]["app"]
        return out

    def wait_state(self, state: str, primary: str, timeout: float = 60) -> None:
        def ok() -> bool:
            s = self.status()
            return s["state"] == state and s["primary"] == primary
        try:
            wait_for(ok, timeout, f"{state} with primary {primary}", interval=0.3)
        except TimeoutError:
            raise AssertionError(f"{self.status()}\n{self.logs()}") from None

    def wait_primary(self, primary: str, timeout: float) -> None:
        """Until ``primary`` serves (failed over, resyncing or healthy again)."""
        def ok() -> bool:
            s = self.status()
            return s["primary"] == primary and s["state"] in ("failed_over", "resyncing",
                                                              "healthy")
        try:
            wait_for(ok, timeout, f"primary {primary}", interval=0.3)
        except TimeoutError:
            raise AssertionError(f"{self.status()}\n{self.logs()}") from None

    def logs(self) -> str:
        out = []
        for p in glob.glob(os.path.join(self.workdir, "*.log")) + glob.glob(
                os.path.join(self.workdir, "*", "data", "logs", "*.log")):
            with open(p, errors="replace") as fh:
                out.append(f"--- {p}\n{fh.read()[-3000:]}")
        return "\n".join(out)


class ModelWriter:
    """Synchronous writes through the primary's export; ``model`` holds every acknowledged
    block's content, ``at`` the site that acknowledged it."""

    def __init__(self, cluster: Cluster, seed: int) -> None:
        self.cluster = cluster
        self.rng = random.Random(seed)
        with open(cluster.path("east"), "rb") as fh:
            base = fh.read(HOT_BLOCKS * BS)
        self.model = {b: base[b * BS:(b + 1) * BS] for b in range(HOT_BLOCKS)}
        self.pending: tuple[int, bytes] | None = None  # sent, no answer: either content
        self.written: dict[str, set[int]] = {"east": set(), "west": set()}
        self.site = "east"
        self.stop = threading.Event()
        self.thread: threading.Thread | None = None
        self.acked = 0

    def start(self, site: str) -> None:
        self.site = site
        self.stop.clear()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def halt(self) -> None:
        self.stop.set()
        if self.thread is not None:
            self.thread.join(30)

    def _run(self) -> None:
        port = self.cluster.ports[self.site]["nbd"]
        client: NbdClient | None = None
        while not self.stop.is_set():
            try:
                if client is None:
                    client = NbdClient("127.0.0.1", port, "data", timeout=60)
                b = self.rng.randrange(HOT_BLOCKS)
                data = self.rng.randbytes(BS)
                self.pending = (b, data)
                client.write(b * BS, data)
                self.model[b] = data
                self.written[self.site].add(b)
                self.pending = None
                self.acked += 1
                if self.acked % 16 == 0:
                    client.flush()
                time.sleep(0.002)
            except (OSError, ConnectionError, Exception):  # the export went away
                if client is not None:
                    client.sock.close()
                client = None
                time.sleep(0.1)
        if client is not None:
            client.close()

    def resolve_pending(self, volume: str) -> None:
        """A write that got no answer may or may not have happened: take what is there."""
        if self.pending is not None:
            b, _ = self.pending
            with open(volume, "rb") as fh:
                fh.seek(b * BS)
                self.model[b] = fh.read(BS)
            self.pending = None


def check_model(writer: ModelWriter, volume: str, aside: dict[int, bytes]) -> None:
    """Every acknowledged write is in ``volume``, or was set aside (``aside``) by a demoted
    site, in which case the loss is accepted (the block takes the serving content)."""
    with open(volume, "rb") as fh:
        data = fh.read(HOT_BLOCKS * BS)
    lost = []
    for b, want in writer.model.items():
        got = data[b * BS:(b + 1) * BS]
        if got == want:
            continue
        if aside.get(b) == want:
            writer.model[b] = got  # recoverable from the aside file
            continue
        lost.append(b)
    assert not lost, f"{len(lost)} acknowledged writes lost, e.g. blocks {lost[:10]}"


def aside_blocks(cluster: Cluster, site: str) -> dict[int, bytes]:
    out: dict[int, bytes] = {}
    for listing in sorted(glob.glob(os.path.join(cluster.data(site), "unreplicated", "app",
                                                  "*", "blocks.json"))):
        with open(listing) as fh:
            doc = json.load(fh)
        with open(os.path.join(os.path.dirname(listing), "data.img"), "rb") as fh:
            for b in doc["blocks"].get("data", []):
                fh.seek(b * BS)
                out[b] = fh.read(BS)
    return out


def verify_equal(cluster: Cluster, primary: str, replica: str, volume: str = "data") -> None:
    p = run([*DRCTL, "replicate", "verify", cluster.path(primary, volume), "--to",
             f"127.0.0.1:{cluster.ports[replica]['repl']}", "--volume", volume,
             *pki().flags(primary, replica)])
    assert p.returncode == 0, f"{p.stdout}{p.stderr}\n{cluster.logs()}"


def push_log(c: Cluster, site: str) -> str:
    with open(os.path.join(c.data(site), "logs", "push-app.log"), errors="replace") as fh:
        return fh.read()


def resync_bytes(cluster: Cluster, site: str) -> list[int]:
    return [int(m) for m in re.findall(r"resync \(exact delta\) shipped (\d+) bytes",
                                       push_log(cluster, site))]


def wait_protected(cluster: Cluster, primary: str) -> None:
    cluster.wait_state("healthy", primary, 90)
    wait_for(lambda: cluster.status()["protected"] is True, 60, "protected", interval=0.3)


def fail_over_and_reprotect(c: Cluster, writer: ModelWriter, cycle: int) -> tuple[int, int,
                                                                                    int]:
    """kill -9 east while writing, fail over, write at west, bring east back: re-protected
    by the exact delta. Returns (bytes the resync shipped, changed bytes, blocks set aside)."""
    writer.start("east")
    goal = writer.acked + 200
    wait_for(lambda: writer.acked > goal, 30, f"writes at east (cycle {cycle})")
    c.agents["east"].kill9()
    c.wait_primary("west", 60)
    writer.halt()
    writer.resolve_pending(c.path("east"))
    goal = len(writer.written["west"]) + 100
    writer.start("west")
    wait_for(lambda: len(writer.written["west"]) > goal, 30, "writes at west")
    c.start_agent("east")
    wait_protected(c, "west")
    writer.halt()
    writer.resolve_pending(c.path("west"))
    wait_for(lambda: c.status()["lag_seconds"] == 0, 30, "lag 0 after writes")
    aside = aside_blocks(c, "east")
    check_model(writer, c.path("west"), aside)
    verify_equal(c, "west", "east")
    shipped = resync_bytes(c, "west")
    assert shipped, c.logs()
    changed = len(writer.written["west"] | set(aside)) * BS
    assert shipped[-1] <= 2 * changed, (shipped, changed)
    return shipped[-1], changed, len(aside)


def fail_back(c: Cluster, writer: ModelWriter) -> int:
    """A failback while writing at west: drain under the write barrier, fence, promote east,
    re-protect west; nothing acknowledged is lost. Returns the bytes its resync shipped."""
    writer.written = {"east": set(), "west": set()}
    writer.start("west")
    wait_for(lambda: len(writer.written["west"]) > 50, 30, "writes before failback")
    p = run([*DRCTL, "failback", "app", "--config", c.config])
    assert p.returncode == 0, p.stderr
    c.wait_primary("east", 90)
    writer.halt()
    writer.resolve_pending(c.path("east"))
    writer.start("east")
    c.wait_state("healthy", "east", 90)
    writer.halt()
    writer.resolve_pending(c.path("east"))
    wait_for(lambda: c.status()["lag_seconds"] == 0, 30, "lag 0 after failback")
    check_model(writer, c.path("east"), {})  # a planned switchover loses nothing
    verify_equal(c, "east", "west")
    back = resync_bytes(c, "east")
    assert back, c.logs()  # the failback re-protected west by the exact delta too
    assert back[-1] <= 2 * max(1, len(writer.written["east"])) * BS + (1 << 20), back
    writer.written = {"east": set(), "west": set()}
    return back[-1]


def test_failover_reprotect_failback_three_cycles(workdir: str, etcd: EtcdServer,
                                                  named: NamedServer) -> None:
    c = Cluster(workdir, etcd, named)
    c.start()
    writer = ModelWriter(c, seed=3)
    try:
        wait_protected(c, "east")
        wait_for(lambda: c.status()["lag_seconds"] == 0, 30, "lag 0", interval=0.3)
        for cycle in range(3):
            shipped, changed, aside = fail_over_and_reprotect(c, writer, cycle)
            back = fail_back(c, writer)
            print(f"cycle {cycle}: re-protect shipped {shipped} bytes for {changed} changed "
                  f"({aside} blocks set aside); failback resync shipped {back}")
    finally:
        writer.halt()
        c.stop()
    for name in ("controller.log", "agent-east.log", "agent-west.log"):
        with open(os.path.join(workdir, name), errors="replace") as fh:
            assert "Traceback" not in fh.read(), name


def test_a_lost_journal_falls_back_to_comparing_both_images(workdir: str, etcd: EtcdServer,
                                                             named: NamedServer) -> None:
    """The old primary's journal is gone (a wiped state disk): its divergence is unknown, so
    the re-protect compares both images, says so, and still ends with equal volumes."""
    c = Cluster(workdir, etcd, named)
    c.start()
    writer = ModelWriter(c, seed=5)
    try:
        wait_protected(c, "east")
        writer.start("east")
        wait_for(lambda: writer.acked > 100, 30, "writes at east")
        c.agents["east"].kill9()
        c.wait_primary("west", 60)
        writer.halt()
        writer.start("west")
        wait_for(lambda: len(writer.written["west"]) > 50, 30, "writes at west")
        writer.halt()
        shutil.rmtree(os.path.join(c.data("east"), "push"))  # the journal is lost
        c.start_agent("east")
        wait_protected(c, "west")
        wait_for(lambda: c.status()["lag_seconds"] == 0, 30, "lag 0")
        verify_equal(c, "west", "east")
        assert "re-protect falls back to a hash comparison of both images" in push_log(c, "west")
        assert "resync (exact delta)" not in push_log(c, "west")
        with open(os.path.join(workdir, "agent-east.log"), errors="replace") as fh:
            assert "the divergence is unknown" in fh.read()
    finally:
        writer.halt()
        c.stop()


def test_a_two_volume_service_fails_over_and_back_as_one_group(workdir: str, etcd: EtcdServer,
                                                              named: NamedServer) -> None:
    """Multi-volume services go through the same path: one capture agent, one journal, both
    volumes promoted, demoted and re-protected together."""
    c = Cluster(workdir, etcd, named, extra_volumes=("log",))
    c.start()
    try:
        wait_protected(c, "east")

        def scribble(site: str, seed: int) -> None:
            rng = random.Random(seed)
            for name in ("data", "log"):
                client = NbdClient("127.0.0.1", c.ports[site]["nbd"], name)
                try:
                    for _ in range(64):
                        client.write(rng.randrange(2048) * BS, rng.randbytes(BS))
                    client.flush()
                finally:
                    client.close()

        scribble("east", 1)
        wait_for(lambda: c.status()["lag_seconds"] == 0, 30, "lag 0")
        c.agents["east"].kill9()
        c.wait_primary("west", 60)
        scribble("west", 2)
        c.start_agent("east")
        wait_protected(c, "west")
        wait_for(lambda: c.status()["lag_seconds"] == 0, 30, "lag 0 at west")
        for name in ("data", "log"):
            verify_equal(c, "west", "east", name)
        assert "resync (exact delta)" in push_log(c, "west")
        p = run([*DRCTL, "failback", "app", "--config", c.config])
        assert p.returncode == 0, p.stderr
        c.wait_state("healthy", "east", 90)
        scribble("east", 3)
        wait_for(lambda: c.status()["lag_seconds"] == 0, 30, "lag 0 at east")
        for name in ("data", "log"):
            verify_equal(c, "east", "west", name)
    finally:
        c.stop()
