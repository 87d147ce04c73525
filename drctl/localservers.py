"""Real servers on loopback for the demo, the benchmarks and the tests: etcd (one member or
three), named with a TSIG key, Prometheus; each on free ports in a temp dir, stopped by PID.

The recipes follow what was verified on this machine (Debian etcd-server 3.4, bind9 9.18,
prometheus 2.42). A missing binary raises MissingBinary (the tests turn it into a skip).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request


class MissingBinary(RuntimeError):
    pass


def _free_tcp_udp_port() -> int:
    while True:
        t = socket.socket()
        t.bind(("127.0.0.1", 0))
        port = int(t.getsockname()[1])
        u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            u.bind(("127.0.0.1", port))
        except OSError:
            continue
        finally:
            t.close()
            u.close()
        return port


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (bind and bail on a race: callers retry)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 30.0) -> None:
    """Until something accepts connections on 127.0.0.1:port."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.02)
    raise TimeoutError(f"nothing listening on 127.0.0.1:{port} after {timeout}s")


_free_port = free_port


def _stop_pid(proc: subprocess.Popen[bytes], timeout: float = 5.0) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def require(binary: str) -> str:
    path = shutil.which(binary)
    if path is None:
        raise MissingBinary(f"{binary} is not installed (scripts/install-deps.sh installs it)")
    return path


class EtcdServer:
    """A single-member etcd with fast elections (10 ms heartbeat, 100 ms election)."""

    def __init__(self) -> None:
        self.binary = require("etcd")
        self.dir = tempfile.mkdtemp(prefix="drctl-etcd-")
        self.client_port = _free_port()
        self.peer_port = _free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> tuple[str, int]:
        return ("127.0.0.1", self.client_port)

    def start(self, timeout: float = 20.0) -> EtcdServer:
        c, p = self.client_port, self.peer_port
        log = open(os.path.join(self.dir, "etcd.log"), "ab")
        self.proc = subprocess.Popen(
            [self.binary, "--name", "t0", "--data-dir", os.path.join(self.dir, "data"),
             "--listen-client-urls", f"http://127.0.0.1:{c}",
             "--advertise-client-urls", f"http://127.0.0.1:{c}",
             "--listen-peer-urls", f"http://127.0.0.1:{p}",
             "--initial-advertise-peer-urls", f"http://127.0.0.1:{p}",
             "--initial-cluster", f"t0=http://127.0.0.1:{p}", "--initial-cluster-state", "new",
             "--listen-metrics-urls", "", "--heartbeat-interval", "10",
             "--election-timeout", "100", "--logger", "zap", "--log-outputs", "stderr"],
            stdout=log, stderr=log)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"etcd exited early: {self.log()[-2000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{c}/health", timeout=1) as r:
                    if b'"true"' in r.read():
                        return self
            except OSError:
                pass
            time.sleep(0.02)
        raise TimeoutError(f"etcd not healthy after {timeout}s: {self.log()[-2000:]}")

    def log(self) -> str:
        with open(os.path.join(self.dir, "etcd.log"), errors="replace") as fh:
            return fh.read()

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None:
            _stop_pid(self.proc)
        shutil.rmtree(self.dir, ignore_errors=True)


NAMED_CONF = """options {{
    directory "{state}";
    pid-file "{state}/named.pid";
    session-keyfile "{state}/session.key";
    managed-keys-directory "{state}";
    listen-on port {port} {{ 127.0.0.1; }};
    listen-on-v6 {{ none; }};
    recursion no;
    allow-query {{ 127.0.0.1; }};
    allow-transfer {{ none; }};
    dnssec-validation no;
    notify no;
}};
controls {{ }};
logging {{
    channel to_stderr {{ stderr; severity info; print-time yes; print-category yes; }};
    category default {{ to_stderr; }};
    category update {{ to_stderr; }};
    category update-security {{ to_stderr; }};
    category lame-servers {{ null; }};
}};
include "{state}/tsig.key";
zone "{zone}" {{
    type primary;
    file "{state}/zone.db";
    update-policy {{ grant {key} zonesub ANY; }};
}};
"""

ZONE = """$ORIGIN {zone}.
$TTL 60
@       IN SOA  ns1.{zone}. hostmaster.{zone}. ( 1 60 30 3600 5 )
        IN NS   ns1.{zone}.
ns1     IN A    127.0.0.1
app     IN A    10.0.0.1
"""


class NamedServer:
    """An authoritative named for one zone, accepting TSIG-signed updates (hmac-sha256)."""

    def __init__(self, zone: str = "dr.test", key_name: str = "dr-updater",
                 secret: str | None = None) -> None:
        self.binary = require("named")
        self.zone = zone
        self.key_name = key_name
        self.dir = tempfile.mkdtemp(prefix="drctl-named-")
        self.port = _free_tcp_udp_port()
        self.proc: subprocess.Popen[bytes] | None = None
        if secret is None:
            out = subprocess.run([require("tsig-keygen"), "-a", "hmac-sha256", key_name],
                                 capture_output=True, text=True, check=True).stdout
            secret = out.split('secret "')[1].split('"')[0]
        self.secret = secret

    def start(self, timeout: float = 10.0) -> NamedServer:
        with open(os.path.join(self.dir, "tsig.key"), "w") as fh:
            fh.write(f'key "{self.key_name}" {{ algorithm hmac-sha256; '
                     f'secret "{self.secret}"; }};\n')
        with open(os.path.join(self.dir, "named.conf"), "w") as fh:
            fh.write(NAMED_CONF.format(state=self.dir, port=self.port, zone=self.zone,
                                       key=self.key_name))
        with open(os.path.join(self.dir, "zone.db"), "w") as fh:
            fh.write(ZONE.format(zone=self.zone))
        log_path = os.path.join(self.dir, "named.log")
        log = open(log_path, "ab")
        self.proc = subprocess.Popen([self.binary, "-g", "-n", "1", "-c",
                                      os.path.join(self.dir, "named.conf")],
                                     stdout=log, stderr=log)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"named exited early: {self.log()[-2000:]}")
            if " running" in self.log():
                return self
            time.sleep(0.02)
        raise TimeoutError(f"named not ready after {timeout}s")

    def log(self) -> str:
        with open(os.path.join(self.dir, "named.log"), errors="replace") as fh:
            return fh.read()

    def stop(self) -> None:
        if self.proc is not None:
            _stop_pid(self.proc)
        shutil.rmtree(self.dir, ignore_errors=True)


class EtcdCluster:
    """Three etcd members on loopback (fast elections), each its own process."""

    def __init__(self, size: int = 3) -> None:
        self.binary = require("etcd")
        self.dir = tempfile.mkdtemp(prefix="drctl-etcd3-")
        self.names = [f"m{i}" for i in range(size)]
        self.client_ports = [_free_port() for _ in self.names]
        self.peer_ports = [_free_port() for _ in self.names]
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    @property
    def endpoints(self) -> list[tuple[str, int]]:
        return [("127.0.0.1", p) for p in self.client_ports]

    def _start_member(self, i: int, state: str) -> None:
        name, c, p = self.names[i], self.client_ports[i], self.peer_ports[i]
        cluster = ",".join(f"{n}=http://127.0.0.1:{pp}"
                           for n, pp in zip(self.names, self.peer_ports, strict=True))
        log = open(os.path.join(self.dir, f"{name}.log"), "ab")
        self.procs[name] = subprocess.Popen(
            [self.binary, "--name", name, "--data-dir", os.path.join(self.dir, name),
             "--listen-client-urls", f"http://127.0.0.1:{c}",
             "--advertise-client-urls", f"http://127.0.0.1:{c}",
             "--listen-peer-urls", f"http://127.0.0.1:{p}",
             "--initial-advertise-peer-urls", f"http://127.0.0.1:{p}",
             "--initial-cluster", cluster, "--initial-cluster-state", state,
             "--initial-cluster-token", os.path.basename(self.dir),
             "--listen-metrics-urls", "", "--heartbeat-interval", "20",
             "--election-timeout", "200", "--logger", "zap", "--log-outputs", "stderr"],
            stdout=log, stderr=log)
        log.close()

    def start(self, timeout: float = 30.0) -> EtcdCluster:
        for i in range(len(self.names)):
            self._start_member(i, "new")
        deadline = time.monotonic() + timeout
        for c in self.client_ports:
            while True:
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{c}/health", timeout=1) as r:
                        if b'"true"' in r.read():
                            break
                except OSError:
                    pass
                if time.monotonic() > deadline:
                    raise TimeoutError("etcd cluster not healthy")
                time.sleep(0.05)
        return self

    def kill9(self, i: int) -> None:
        proc = self.procs[self.names[i]]
        proc.kill()
        proc.wait()

    def stop(self) -> None:
        for proc in self.procs.values():
            _stop_pid(proc)
        shutil.rmtree(self.dir, ignore_errors=True)


class PrometheusServer:
    """Prometheus scraping the given loopback targets every second, with our alert rules."""

    def __init__(self, targets: list[str], rules: str | None = None) -> None:
        self.binary = require("prometheus")
        self.dir = tempfile.mkdtemp(prefix="drctl-prom-")
        self.port = _free_port()
        self.targets = targets
        self.rules = rules
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 20.0) -> PrometheusServer:
        cfg = os.path.join(self.dir, "prometheus.yml")
        rules = f"rule_files: [{self.rules}]\n" if self.rules else ""
        with open(cfg, "w") as fh:
            fh.write("global: {scrape_interval: 1s, evaluation_interval: 1s}\n" + rules +
                     "scrape_configs:\n  - job_name: drctl\n    static_configs:\n"
                     f"      - targets: {self.targets!r}\n".replace("'", '"'))
        log = open(os.path.join(self.dir, "prometheus.log"), "ab")
        self.proc = subprocess.Popen(
            [self.binary, f"--config.file={cfg}", f"--storage.tsdb.path={self.dir}/data",
             f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"],
            stdout=log, stderr=log)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("prometheus exited early")
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=1) as r:
                    if r.status == 200:
                        return self
            except OSError:
                pass
            time.sleep(0.05)
        raise TimeoutError("prometheus not ready")

    def query(self, expr: str) -> dict[str, object]:
        import json
        import urllib.parse

        url = f"{self.url}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                out: dict[str, object] = json.loads(r.read())
        except urllib.error.HTTPError as exc:
            out = json.loads(exc.read())
        return out

    def stop(self) -> None:
        if self.proc is not None:
            _stop_pid(self.proc)
        shutil.rmtree(self.dir, ignore_errors=True)
