"""Real servers on loopback for the demo, the benchmarks and the tests: etcd (one member or
three), named with a TSIG key, Prometheus; each on free ports in a temp dir, stopped by PID.

The recipes follow what was verified on this machine (Debian etcd-server 3.4, bind9 9.18,
prometheus 2.42). A missing binary raises MissingBinary (the tests turn it into a skip).
"""

from __future__ import annotations

import itertools
import os
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Container
from typing import Any

from failover.coordination.credentials import EtcdCredentials


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


def _ephemeral_ports() -> tuple[int, int]:
    """The kernel's range of local ports for outgoing connections."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as fh:
            lo, hi = (int(x) for x in fh.read().split())
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default
    return lo, hi


_searched = itertools.count(secrets.randbelow(1 << 16))  # this process's search (a random start)


def free_port(avoid: Container[int] = ()) -> int:
    """A TCP port free on 127.0.0.1 right now, outside the kernel's ephemeral range: a server
    that listens there again later (a site's NBD export after a failback, a restarted daemon)
    cannot find it taken meanwhile by the local port of an outgoing connection, which a
    port the kernel handed out for bind(0) could be. Successive calls in a process return
    different ports (bind and bail on a race with another process: callers retry).
    ``avoid``: ports that are someone's although free now (a configured endpoint whose
    daemon is restarting)."""
    lo, hi = _ephemeral_ports()
    first, last = (10000, lo - 1) if lo > 11000 else (hi + 1, 65535)
    span = last - first + 1
    for _ in range(min(span, 1000)) if span > 0 else ():
        port = first + next(_searched) % span
        if port in avoid:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as s:  # no room outside the range: any free port
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


class EtcdSecurity:
    """What an EtcdServer or EtcdCluster needs to serve clients over TLS with authentication:
    its own CA (drctl/pki.py), a server certificate for 127.0.0.1 (also valid as a client
    certificate: etcd's gateway dials itself with it), a client certificate for the user
    ``drctl``, and the passwords (a file of mode 0600 in the server's directory)."""

    USER = "drctl"
    PREFIX = "/drctl/"  # all the drctl user's role may read and write

    def __init__(self, directory: str, client_cert_auth: bool = False) -> None:
        from drctl import pki

        self.dir = directory
        self.client_cert_auth = client_cert_auth
        # A deployment CA (drctl certs): etcd's certificate is a "site" one (server and client
        # auth, SAN 127.0.0.1), the client's an "operator" one with CN=drctl
        ca_dir = os.path.join(directory, "pki")
        self.ca = pki.init(ca_dir, "etcd-test").ca_cert
        self.server_cert, self.server_key = pki.issue(ca_dir, pki.Identity("site", "etcd"),
                                                      hosts=("127.0.0.1", "localhost"))
        self.client_cert, self.client_key = pki.issue(ca_dir,
                                                      pki.Identity("operator", self.USER))
        self.password_file = os.path.join(directory, "drctl.password")
        self.root_password = secrets.token_urlsafe(18)
        self.password = secrets.token_urlsafe(18)
        _write_secret(self.password_file, self.password + "\n")
        self.auth_enabled = False

    def flags(self, port: int) -> list[str]:
        """etcd's client listener flags: TLS on; client certificates required only with
        ``client_cert_auth`` (etcd requires them whenever --trusted-ca-file is given)."""
        url = f"https://127.0.0.1:{port}"
        out = ["--listen-client-urls", url, "--advertise-client-urls", url,
               "--cert-file", self.server_cert, "--key-file", self.server_key]
        if self.client_cert_auth:
            out += ["--client-cert-auth", "--trusted-ca-file", self.ca]
        return out

    def healthy(self, port: int) -> bool:
        ctx = ssl.create_default_context(cafile=self.ca)
        ctx.load_cert_chain(self.server_cert, self.server_key)
        try:
            with urllib.request.urlopen(f"https://127.0.0.1:{port}/health", timeout=1,
                                        context=ctx) as r:
                return b'"true"' in r.read()
        except OSError:
            return False

    def enable_auth(self, port: int) -> None:
        """Once per data directory: root, the drctl role (readwrite on /drctl/) and user, then
        authentication on (etcd's own RPCs, as etcdctl user/role/auth would send them)."""
        if self.auth_enabled:
            return
        import grpc
        from aetcd.rpc import auth_pb2, rpc_pb2, rpc_pb2_grpc

        with open(self.ca, "rb") as a, open(self.server_key, "rb") as k, \
                open(self.server_cert, "rb") as c:
            creds = grpc.ssl_channel_credentials(a.read(), k.read(), c.read())
        with grpc.secure_channel(f"127.0.0.1:{port}", creds) as channel:
            auth = rpc_pb2_grpc.AuthStub(channel)
            perm = auth_pb2.Permission(permType=auth_pb2.Permission.READWRITE,
                                       key=self.PREFIX.encode(),
                                       range_end=self.PREFIX[:-1].encode() + b"0")
            for call, request in (
                    (auth.UserAdd, rpc_pb2.AuthUserAddRequest(name="root",
                                                              password=self.root_password)),
                    (auth.UserGrantRole, rpc_pb2.AuthUserGrantRoleRequest(user="root",
                                                                          role="root")),
                    (auth.RoleAdd, rpc_pb2.AuthRoleAddRequest(name=self.USER)),
                    (auth.RoleGrantPermission, rpc_pb2.AuthRoleGrantPermissionRequest(
                        name=self.USER, perm=perm)),
                    (auth.UserAdd, rpc_pb2.AuthUserAddRequest(name=self.USER,
                                                              password=self.password)),
                    (auth.UserGrantRole, rpc_pb2.AuthUserGrantRoleRequest(user=self.USER,
                                                                          role=self.USER)),
                    (auth.AuthEnable, rpc_pb2.AuthEnableRequest())):
                call(request, timeout=10)
        self.auth_enabled = True

    def etcd_config(self, endpoints: list[tuple[str, int]]) -> dict[str, Any]:
        out: dict[str, Any] = {"endpoints": [f"{h}:{p}" for h, p in endpoints],
                               "user": self.USER, "password_file": self.password_file,
                               "ca": self.ca}
        if self.client_cert_auth:
            out.update(cert=self.client_cert, key=self.client_key)
        return out

    def credentials(self) -> EtcdCredentials:
        return EtcdCredentials(self.USER, self.password_file, None, self.ca,
                               self.client_cert if self.client_cert_auth else None,
                               self.client_key if self.client_cert_auth else None).resolved()


def _write_secret(path: str, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)


class EtcdServer:
    """A single-member etcd with fast elections (10 ms heartbeat, 100 ms election).

    By default it serves clients over TLS with authentication on (EtcdSecurity: its own CA,
    a ``drctl`` user allowed /drctl/ only); ``etcd_config()`` is the ``etcd:`` value for a
    runbook or cluster.yaml and ``credentials()`` the same for an EtcdStore.
    ``secure=False``: plain gRPC without authentication (as before)."""

    def __init__(self, secure: bool = True, client_cert_auth: bool = False) -> None:
        self.binary = require("etcd")
        self.dir = tempfile.mkdtemp(prefix="drctl-etcd-")
        self.client_port = _free_port()
        self.peer_port = _free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.security = EtcdSecurity(self.dir, client_cert_auth) if secure else None

    @property
    def endpoint(self) -> tuple[str, int]:
        return ("127.0.0.1", self.client_port)

    def etcd_config(self) -> dict[str, Any] | list[str]:
        """The ``etcd:`` value of a runbook or cluster.yaml that reaches this server."""
        if self.security is None:
            return [f"127.0.0.1:{self.client_port}"]
        return self.security.etcd_config([self.endpoint])

    def credentials(self) -> EtcdCredentials | None:
        """What an EtcdStore needs for this server (None: none needed)."""
        return self.security.credentials() if self.security is not None else None

    def start(self, timeout: float = 20.0) -> EtcdServer:
        c, p = self.client_port, self.peer_port
        client = (self.security.flags(c) if self.security is not None else
                  ["--listen-client-urls", f"http://127.0.0.1:{c}",
                   "--advertise-client-urls", f"http://127.0.0.1:{c}"])
        log = open(os.path.join(self.dir, "etcd.log"), "ab")
        self.proc = subprocess.Popen(
            [self.binary, "--name", "t0", "--data-dir", os.path.join(self.dir, "data"),
             *client,
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
            if _healthy(self.security, c):
                if self.security is not None:
                    self.security.enable_auth(c)
                return self
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


def _healthy(security: EtcdSecurity | None, port: int) -> bool:
    if security is not None:
        return security.healthy(port)
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as r:
            return b'"true"' in r.read()
    except OSError:
        return False


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
        """Start named; if another process took the port meanwhile (named then runs without
        listening there), start it again on another port (three tries)."""
        for attempt in range(3):
            self._start(timeout)
            if self._answers_tcp(timeout):
                return self
            log = self.log()
            if self.proc is not None:
                _stop_pid(self.proc)
                self.proc = None
            if attempt == 2:
                self.stop()
                raise RuntimeError(f"named does not listen on 127.0.0.1:{self.port}: "
                                   f"{log[-2000:]}")
            self.port = _free_tcp_udp_port()
        return self

    def _answers_tcp(self, timeout: float) -> bool:
        """Wait until named accepts TCP on its port (it may log "running" a little before,
        on a busy machine); False at once if it could not bind the port (taken)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=2).close()
                return True
            except OSError:
                if "address in use" in self.log() or time.monotonic() > deadline:
                    return False
                time.sleep(0.05)

    def _start(self, timeout: float) -> None:
        with open(os.path.join(self.dir, "tsig.key"), "w") as fh:
            fh.write(f'key "{self.key_name}" {{ algorithm hmac-sha256; '
                     f'secret "{self.secret}"; }};\n')
        with open(os.path.join(self.dir, "named.conf"), "w") as fh:
            fh.write(NAMED_CONF.format(state=self.dir, port=self.port, zone=self.zone,
                                       key=self.key_name))
        with open(os.path.join(self.dir, "zone.db"), "w") as fh:
            fh.write(ZONE.format(zone=self.zone))
        log_path = os.path.join(self.dir, "named.log")
        log = open(log_path, "wb")  # a new log per try: "running" must be this one's
        self.proc = subprocess.Popen([self.binary, "-g", "-n", "1", "-c",
                                      os.path.join(self.dir, "named.conf")],
                                     stdout=log, stderr=log)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"named exited early: {self.log()[-2000:]}")
            if " running" in self.log():
                return
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
    """Three etcd members on loopback (fast elections), each its own process; TLS and
    authentication as EtcdServer (``secure=False``: neither)."""

    def __init__(self, size: int = 3, secure: bool = True) -> None:
        self.binary = require("etcd")
        self.dir = tempfile.mkdtemp(prefix="drctl-etcd3-")
        self.names = [f"m{i}" for i in range(size)]
        self.client_ports = [_free_port() for _ in self.names]
        self.peer_ports = [_free_port() for _ in self.names]
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.security = EtcdSecurity(self.dir) if secure else None

    @property
    def endpoints(self) -> list[tuple[str, int]]:
        return [("127.0.0.1", p) for p in self.client_ports]

    def etcd_config(self) -> dict[str, Any] | list[str]:
        """The ``etcd:`` value of a runbook or cluster.yaml that reaches every member."""
        if self.security is None:
            return [f"{h}:{p}" for h, p in self.endpoints]
        return self.security.etcd_config(self.endpoints)

    def credentials(self) -> EtcdCredentials | None:
        return self.security.credentials() if self.security is not None else None

    def _start_member(self, i: int, state: str) -> None:
        name, c, p = self.names[i], self.client_ports[i], self.peer_ports[i]
        cluster = ",".join(f"{n}=http://127.0.0.1:{pp}"
                           for n, pp in zip(self.names, self.peer_ports, strict=True))
        client = (self.security.flags(c) if self.security is not None else
                  ["--listen-client-urls", f"http://127.0.0.1:{c}",
                   "--advertise-client-urls", f"http://127.0.0.1:{c}"])
        log = open(os.path.join(self.dir, f"{name}.log"), "ab")
        self.procs[name] = subprocess.Popen(
            [self.binary, "--name", name, "--data-dir", os.path.join(self.dir, name),
             *client,
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
            while not _healthy(self.security, c):
                if time.monotonic() > deadline:
                    raise TimeoutError("etcd cluster not healthy")
                time.sleep(0.05)
        if self.security is not None:
            self.security.enable_auth(self.client_ports[0])
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
