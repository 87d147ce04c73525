"""`make demo`: a two-site DR drill on loopback with real etcd and BIND, through the whole
protection lifecycle.

Starts etcd, an authoritative named for dr.test (TSIG key), a controller, the web page and two
site agents (east, west) driven by one runbook. Each agent runs the data path of its role: the
primary's capture agent serves the volume over NBD (an application writes through it, ~200
writes/s) and replicates it to the standby's target daemon. Then, unless DEMO_CYCLE=0, the
demo runs the lifecycle and prints each phase (the page shows it too):

  1. east is lost (its agent is killed with its data path): automatic failover to west
  2. writes continue at west (the application follows the primary)
  3. east comes back: demoted, its unreplicated writes set aside, re-protected by the exact
     delta (only the diverged blocks move)
  4. Failback: drain under a write barrier, fence, promote east, re-protect west

Afterwards the page's buttons (Failover, Switchover, Failback, Drill, Retry, Cancel) work by
hand. Runs until Ctrl-C (or DEMO_SECONDS), then stops everything by PID.

Replication runs over mutual TLS: the demo makes a deployment CA (`drctl certs init`) with
certificates for east, west and the API's drills (operator ``api``), and the controller signs
the epoch tokens (docs/security.md).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import hashlib
import json
import os
import random
import re
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from drctl.argtypes import seconds_or_zero
from drctl.localservers import EtcdServer, NamedServer, free_port, wait_port
from failover.api.users import add_user
from failover.status import lag_words

DRCTL = [sys.executable, "-m", "drctl"]


@dataclass
class DemoCluster:
    """Every process of the drill; ``start()`` then ``stop()`` (also used by the browser
    test)."""

    work: str = field(default_factory=lambda: tempfile.mkdtemp(prefix="drctl-demo-"))
    token: str = ""  # the API user "admin" (role admin): made by start()
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    etcd: EtcdServer | None = None
    named: NamedServer | None = None
    api_port: int = 0
    tls_dir: str = ""  # the deployment's CA and certificates (made by start())
    _stop_writer: threading.Event = field(default_factory=threading.Event)
    crashed: dict[str, int] = field(default_factory=dict)  # what exited under it: dead()

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.api_port}/"

    def https(self) -> ssl.SSLContext:
        """A client context that trusts the demo's CA (the API's certificate is from it)."""
        return ssl.create_default_context(cafile=os.path.join(self.tls_dir, "ca.crt"))

    def api_spki(self) -> str:
        """base64 SHA-256 of the API certificate's public key (a browser can pin it)."""
        from cryptography.hazmat.primitives import serialization

        from drctl.pki import load_cert

        der = load_cert(os.path.join(self.tls_dir, "servers", "api.crt")).public_key() \
            .public_bytes(serialization.Encoding.DER,
                          serialization.PublicFormat.SubjectPublicKeyInfo)
        return base64.b64encode(hashlib.sha256(der).digest()).decode()

    def _spawn(self, name: str, args: list[str], env: dict[str, str] | None = None) -> None:
        log = open(os.path.join(self.work, f"{name}.log"), "ab")
        self.procs[name] = subprocess.Popen(
            [*DRCTL, "--log-level", "INFO", *args], stdout=log, stderr=log,
            env={**os.environ, "DRCTL_AUDIT_FILE": os.path.join(self.work, "audit.jsonl"),
                 **(env or {})})
        log.close()

    def _certificates(self) -> None:
        """The deployment's CA, the sites' certificates (valid for 127.0.0.1: everything
        runs on loopback), the API's client certificate (drills) and its HTTPS certificate
        (docs/security.md)."""
        from drctl.pki import Identity, init, issue

        self.tls_dir = os.path.join(self.work, "tls")
        init(self.tls_dir, "demo")
        for site in ("east", "west"):
            issue(self.tls_dir, Identity("site", site), ("127.0.0.1", "localhost"))
        issue(self.tls_dir, Identity("operator", "api"))
        issue(self.tls_dir, Identity("server", "api"), ("127.0.0.1", "localhost"))

    def start(self) -> DemoCluster:
        self._certificates()
        self.etcd = EtcdServer().start()
        self.named = NamedServer().start()
        key = os.path.join(self.work, "tsig.key")
        with open(key, "w") as fh:
            fh.write(f'key "{self.named.key_name}" {{ algorithm hmac-sha256; '
                     f'secret "{self.named.secret}"; }};\n')
        self.api_port = free_port()
        cmetrics = free_port()
        self.ports = {s: {"replication": free_port(), "export": free_port()}
                      for s in ("east", "west")}
        volume = os.path.join(self.work, "{site}", "volumes", "app-data.img")
        first = volume.replace("{site}", "east")
        os.makedirs(os.path.dirname(first))
        with open(first, "wb") as fh:
            rng = random.Random(1)
            for i in range(64):
                fh.write(rng.randbytes(1 << 20) if i % 3 else bytes(1 << 20))
        runbook = {
            "kind": "drctl-runbook", "version": 1, "cluster": "demo", "lease_ttl": 2,
            "etcd": self.etcd.etcd_config(),  # TLS, user drctl (password file 0600)
            "sites": {s: {"address": a, "data_dir": os.path.join(self.work, s, "data"),
                          "endpoints": {"replication":
                                        f"127.0.0.1:{self.ports[s]['replication']}"}}
                      for s, a in (("east", "10.0.0.1"), ("west", "10.0.0.2"))},
            "dns": {"zones": {self.named.zone: {
                "servers": [f"127.0.0.1:{self.named.port}"],
                "tsig": {"name": self.named.key_name, "file": key}}}},
            "services": {"app": {
                "primary": "east", "replica": "west",
                "volumes": [{"name": "app-data", "path": volume}],
                "replication": {"mode": "hot", "rate_limit": "50MB/s", "rpo": 30,
                                "export": {s: f"127.0.0.1:{p['export']}"
                                           for s, p in self.ports.items()}},
                "failover": {"automatic": True, "grace": 2, "damping": 0},
                "dns": [{"zone": self.named.zone, "name": "app", "ttl": 5}],
                "steps": [
                    {"type": "precheck", "name": "lag within budget",
                     "check": "replication_lag"},
                    {"type": "promote"},
                    {"type": "dns"}]}},
        }
        self.config = os.path.join(self.work, "runbook.yaml")
        with open(self.config, "w") as fh:
            json.dump(runbook, fh, indent=1)
        for site in ("east", "west"):
            self.start_agent(site)
        self._spawn("controller", ["controller", "--config", self.config, "--metrics-port",
                                   str(cmetrics), "--tls-dir", self.tls_dir])
        users = os.path.join(self.work, "api-users.json")
        self.token = add_user(users, "admin", "admin")
        self._spawn("api", ["api", "--config", self.config, "--listen",
                            f"127.0.0.1:{self.api_port}", "--users", users,
                            "--tls-cert", os.path.join(self.tls_dir, "servers", "api.crt"),
                            "--tls-key", os.path.join(self.tls_dir, "servers", "api.key")],
                    {"DRCTL_TLS_DIR": self.tls_dir, "DRCTL_TLS_AS": "operator/api"})
        wait_port(self.api_port)
        threading.Thread(target=self._writer, daemon=True).start()
        return self

    def start_agent(self, site: str) -> None:
        self._spawn(f"agent-{site}", ["agent", "--config", self.config, "--site", site,
                                      "--tls-dir", self.tls_dir])

    def kill_agent(self, site: str) -> None:
        """The site is lost: its agent dies (kill -9) and its data path with it."""
        p = self.procs.pop(f"agent-{site}")
        p.kill()
        p.wait()

    def _writer(self) -> None:
        """The application: 4 KiB writes (~200/s, a FLUSH every 20) through the NBD export of
        whichever site is primary (it follows the service record, as a client follows DNS)."""
        from drctl.nbdclient import NbdClient

        rng = random.Random(2)
        client: NbdClient | None = None
        self.writes = 0
        while not self._stop_writer.is_set():
            try:
                if client is None:
                    primary = str(self.status()["services"]["app"]["primary"])  # type: ignore[index]
                    client = NbdClient("127.0.0.1", self.ports[primary]["export"], "app-data",
                                       timeout=10)
                client.write(rng.randrange(16384) * 4096, rng.randbytes(4096))
                self.writes += 1
                if self.writes % 20 == 0:
                    client.flush()
                time.sleep(0.005)
            except (OSError, ValueError, KeyError, Exception):
                if client is not None:
                    client.sock.close()
                client = None
                self._stop_writer.wait(0.3)
        if client is not None:
            client.close()

    def request(self, op: str) -> None:
        req = urllib.request.Request(f"{self.url}api/v1/services/app/{op}", data=b"{}",
                                     method="POST", headers={
                                         "Authorization": f"Bearer {self.token}",
                                         "Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=5, context=self.https()) as r:
            r.read()

    def status(self) -> dict[str, object]:
        req = urllib.request.Request(f"{self.url}api/v1/status",
                                     headers={"Authorization": f"Bearer {self.token}"})
        with urllib.request.urlopen(req, timeout=5, context=self.https()) as r:
            out: dict[str, object] = json.loads(r.read())
        return out

    def dead(self) -> dict[str, int]:
        """The demo's processes that exited on their own (not a site the lifecycle killed),
        with their exit status."""
        procs = {**self.procs, **{label: server.proc for label, server in
                                  (("etcd", self.etcd), ("named", self.named))
                                  if server is not None and server.proc is not None}}
        return {name: p.returncode for name, p in procs.items() if p.poll() is not None}

    def stop(self, interrupted: bool = False) -> str:
        """Stop everything; returns what was done, in a line. If something exited under the
        demo (``crashed``, or a process found gone at the stop, unless ``interrupted``: a
        Ctrl-C, which the terminal sends to the demo's processes too), the directory is
        kept: its logs say why."""
        self._stop_writer.set()
        ended, exited = self._stop_processes(interrupted)
        servers = self._stop_servers()
        if servers:
            ended += f"; {' and '.join(servers)} stopped"
        if self.crashed or (exited and not interrupted):
            return f"stopped: {ended}; {self.work} kept (its logs)"
        shutil.rmtree(self.work, ignore_errors=True)
        return f"stopped: {ended}; {self.work} removed"

    def _stop_processes(self, interrupted: bool) -> tuple[str, bool]:
        """SIGTERM to the drctl processes still running, a kill after 10 s; (what was done,
        whether one had exited before)."""
        exited = {name: p.returncode for name, p in self.procs.items() if p.poll() is not None}
        for name, p in reversed(list(self.procs.items())):
            if name not in exited:
                p.send_signal(signal.SIGTERM)
        killed = []
        for name, p in self.procs.items():
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
                killed.append(name)
        ended = f"{len(self.procs) - len(exited) - len(killed)} drctl processes ended on SIGTERM"
        if exited and interrupted:
            ended += f", {len(exited)} on the Ctrl-C itself"
        elif exited:  # before the stop: a crash the logs explain
            ended += ", " + ", ".join(f"{name} had exited already (status {rc})"
                                      for name, rc in exited.items())
        if killed:
            ended += f", {', '.join(killed)} killed after 10 s"
        return ended, bool(exited)

    def _stop_servers(self) -> list[str]:
        """named and etcd stopped (the log of one that exited under the demo copied into its
        directory first: the server's own directory goes with it)."""
        out = []
        for label, server in (("named", self.named), ("etcd", self.etcd)):
            if server is None:
                continue
            gone = label in self.crashed
            if gone:
                with contextlib.suppress(OSError):
                    shutil.copy(os.path.join(server.dir, f"{label}.log"), self.work)
            server.stop()
            out.append(f"{label} (had exited already)" if gone else label)
        return out


def _sample(demo: DemoCluster) -> tuple[dict[str, Any] | None, str]:
    """The service's status (None if unavailable) and its line."""
    try:
        app = demo.status()["services"]["app"]  # type: ignore[index]
        return app, _line(app)
    except urllib.error.HTTPError as exc:  # it answered, with an error
        return None, f"status unavailable: the API answered {exc.code} {exc.reason}"
    except urllib.error.URLError as exc:  # (an OSError)
        return None, f"status unavailable: the API at {demo.url} does not answer ({exc.reason})"
    except (OSError, ValueError, KeyError) as exc:
        return None, f"status unavailable: {exc}"


def _line(app: dict[str, Any]) -> str:
    dns = ", ".join(a for answers in (app.get("dns") or {}).values() for a in (answers or ["-"]))
    shown = lag_words(app, digits=2)  # as drctl status says it
    extra = "; ".join(app.get("progress") or [])
    op = app.get("operation")
    doing = f" ({op['label']}, {op['asked']})" if op and op.get("current") else ""
    return (f"{time.strftime('%H:%M:%S')} app: {app['state']:<13}{doing} "
            f"primary={app['primary']:<5} lag={shown:<6} "
            f"app.dr.test -> {dns}" + (f"  [{extra}]" if extra else ""))


def _news(line: str) -> str:
    """What a status line says, without its time and lag (which move every sample)."""
    return re.sub(r" lag=\S+?(\([^)]*\))? +", " ", line.partition(" ")[2])


def _cli() -> str:
    """How to run this drctl from a shell: its script beside the interpreter, if there."""
    script = os.path.join(os.path.dirname(sys.executable), "drctl")
    if os.access(script, os.X_OK):
        return os.path.relpath(script) if script.startswith(os.getcwd() + os.sep) else script
    return f"{sys.executable} -m drctl"


def _gone(demo: DemoCluster, stopping: threading.Event) -> bool:
    """A process the demo needs exited on its own: say which, and stop."""
    dead = demo.dead()
    if dead:
        said = ", ".join(f"{name} (status {rc})" for name, rc in dead.items())
        print(f"  the demo cannot go on: {said} exited (logs in {demo.work})", flush=True)
        demo.crashed = dead
        stopping.set()
    return bool(dead)


def _until(demo: DemoCluster, what: str, ok: object, stopping: threading.Event,
           timeout: float = 180) -> bool:
    """Print the status every second until ``ok(app)`` holds."""
    deadline = time.monotonic() + timeout
    shown, printed = "", 0.0
    while not stopping.is_set() and time.monotonic() < deadline:
        if _gone(demo, stopping):
            return False
        app, line = _sample(demo)
        try:
            done = app is not None and bool(ok(app))  # type: ignore[operator]
        except KeyError:
            done = False
        if _news(line) != shown or time.monotonic() - printed > 10:
            print(f"    {line}", flush=True)
            shown, printed = _news(line), time.monotonic()
        if done:
            return True
        stopping.wait(1)
    if not stopping.is_set():
        print(f"    (gave up waiting for {what} after {timeout:.0f}s)", flush=True)
    return False


def cycle(demo: DemoCluster, stopping: threading.Event) -> bool:
    """The protection lifecycle, phase by phase."""
    def healthy(at: str) -> object:
        return lambda a: (a["state"] == "healthy" and a["primary"] == at
                          and a["lag_seconds"] is not None and a["lag_seconds"] < 1)

    print("phase 0: initial sync east -> west", flush=True)
    if not _until(demo, "protected", healthy("east"), stopping):
        return False
    print(f"phase 1: site east lost (agent and data path killed) after {demo.writes} writes: "
          "automatic failover", flush=True)
    demo.kill_agent("east")
    if not _until(demo, "failover", lambda a: a["primary"] == "west" and a["state"] in (
            "failed_over", "resyncing", "healthy"), stopping):
        return False
    print("phase 2: writes continue at west for 5 s", flush=True)
    before = demo.writes
    stopping.wait(5)
    print(f"    {demo.writes - before} writes acknowledged by west", flush=True)
    print("phase 3: site east comes back: demoted, re-protected by the exact delta", flush=True)
    demo.start_agent("east")
    if not _until(demo, "re-protect", lambda a: a["state"] == "healthy"
                  and a["primary"] == "west", stopping):
        return False
    log = os.path.join(demo.work, "west", "data", "logs", "push-app.log")
    with open(log, errors="replace") as fh:
        shipped = [ln.split(": ", 1)[-1].strip() for ln in fh if "shipped" in ln]
    if shipped:
        print(f"    west's capture agent: {shipped[-1]}", flush=True)
    print("phase 4: Failback (drain under a write barrier, fence, promote east)", flush=True)
    demo.request("failback")
    if not _until(demo, "failback", lambda a: a["state"] == "healthy"
                  and a["primary"] == "east", stopping):
        return False
    print("the service is home at east and protected by west again", flush=True)
    return True


def settings(env: Mapping[str, str]) -> tuple[float, bool]:
    """DEMO_SECONDS (stop after this long; 0 or unset: at Ctrl-C) and DEMO_CYCLE (1 or unset:
    run the scripted lifecycle; 0: skip it). ValueError, naming the variable and what it
    accepts, for anything else: a typo is not taken for a default."""
    seconds_text = env.get("DEMO_SECONDS", "").strip() or "0"
    try:
        seconds = seconds_or_zero(seconds_text)
    except argparse.ArgumentTypeError:
        raise ValueError(f"DEMO_SECONDS={env['DEMO_SECONDS']!r}: expected seconds >= 0 (stop "
                         "the demo after that long; 0 or unset: run until Ctrl-C)") from None
    cycle_text = env.get("DEMO_CYCLE", "").strip() or "1"
    if cycle_text not in ("0", "1"):
        raise ValueError(f"DEMO_CYCLE={env['DEMO_CYCLE']!r}: expected 1 (run the scripted "
                         "lifecycle; the default) or 0 (skip it)")
    return seconds, cycle_text == "1"


def main() -> int:
    try:
        seconds, run_cycle = settings(os.environ)
    except ValueError as exc:  # before anything is started
        print(f"drctl: error [usage]: {exc}", file=sys.stderr)
        return 2
    interrupted = False  # a Ctrl-C: the terminal sent it to every process of the demo
    demo = DemoCluster()
    stopping = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    try:
        demo.start()
        print(f"\ndrctl demo is up (logs in {demo.work})\n\n  open  {demo.url}#token="
              f"{demo.token}\n\n  (HTTPS with a certificate from the demo's own CA, "
              f"{demo.tls_dir}/ca.crt: the browser asks once to accept it)\n\n"
              f"  the CLI: {_cli()} status --config {demo.config}\n"
              "  (and switchover, failover, failback with the service's name: app)\n\n"
              "Ctrl-C stops everything.\n", flush=True)
        started = time.monotonic()
        if run_cycle:
            if cycle(demo, stopping):
                print("\nthe lifecycle is done; the page's buttons work by hand now\n",
                      flush=True)
        shown, shown_at = "", 0.0
        while not stopping.is_set() and (not seconds or time.monotonic() - started < seconds):
            if _gone(demo, stopping):
                break
            _app, line = _sample(demo)
            # a line when something changed (the time aside), else one a minute
            if _news(line) != shown or time.monotonic() - shown_at >= 60:
                print(f"  {line}", flush=True)
                shown, shown_at = _news(line), time.monotonic()
            stopping.wait(2)
    except KeyboardInterrupt:
        interrupted = True
    finally:
        print("stopping...", flush=True)
        print(demo.stop(interrupted), flush=True)
    return 1 if demo.crashed else 0


if __name__ == "__main__":
    sys.exit(main())
