"""The NBD export over TLS (`push --nbd-tls`, NBD_OPT_STARTTLS; docs/security.md), with real
clients from Debian (libnbd's nbdinfo/nbdcopy and qemu-io, both on gnutls) and our own: a
client with a certificate of the deployment reads and writes and its writes reach the replica;
a plaintext client, one with a certificate of another CA, another site or an operator the
export does not name (--nbd-allow) are refused and nothing is written; plaintext sent after
STARTTLS ends the session."""

from __future__ import annotations

import datetime
import hashlib
import os
import shutil
import socket
import ssl
import struct
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from drctl.pki import Identity, Layout, init, issue
from tests.nbdclient import NbdClient, NbdError
from tests.procs import (
    DRCTL,
    Pki,
    Proc,
    Target,
    free_port,
    port_open,
    push_cmd,
    run,
    same_file,
    wait_for,
    write_random,
)

SIZE = 4 << 20
VOL = "vol"
REP_ERR_POLICY, REP_ERR_TLS_REQD = 2**31 + 2, 2**31 + 5


def need(binary: str) -> str:
    path = shutil.which(binary)
    if path is None:
        pytest.skip(f"{binary} is not installed (Debian: qemu-utils, libnbd-bin)")
    return path


def client_dir(workdir: str, name: str, d: str, who: Identity, *trust: str) -> str:
    """The directory qemu's tls-creds-x509 and libnbd's tls-certificates= read: ca-cert.pem
    (the CAs of the deployments ``trust``, default ``d``), client-cert.pem and client-key.pem
    (``who``'s from deployment ``d``)."""
    out = os.path.join(workdir, name)
    os.makedirs(out)
    lay = Layout(d)
    with open(os.path.join(out, "ca-cert.pem"), "wb") as fh:
        for t in trust or (d,):
            with open(Layout(t).ca_cert, "rb") as ca:
                fh.write(ca.read())
    shutil.copy(lay.cert(who), os.path.join(out, "client-cert.pem"))
    shutil.copy(lay.key(who), os.path.join(out, "client-key.pem"))
    return out


@dataclass
class Export:
    src: str
    port: int
    agent: Proc

    def uri(self, creds: str | None) -> str:
        if creds is None:
            return f"nbd://127.0.0.1:{self.port}/{VOL}"
        return f"nbds://127.0.0.1:{self.port}/{VOL}?tls-certificates={creds}"

    def digest(self) -> str:
        with open(self.src, "rb") as fh:
            return hashlib.sha256(fh.read()).hexdigest()


@pytest.fixture
def export(workdir: str, target: Target) -> Iterator[Export]:
    """Site east's capture agent pushing to the target, its export on every address (allowed
    with --nbd-tls) and TLS mandatory; operator tester may attach (--nbd-allow)."""
    src = os.path.join(workdir, "vol.img")
    write_random(src, SIZE, seed=71)
    port = free_port()
    agent = Proc(push_cmd(src, target, VOL, os.path.join(workdir, "st"), "--nbd-listen",
                          f"0.0.0.0:{port}", "--nbd-tls", "--nbd-allow", "operator:tester",
                          "--interval", "5"),
                 os.path.join(workdir, "agent.log")).start()
    try:
        wait_for(lambda: port_open(port), 20, "the NBD export")
        wait_for(lambda: os.path.exists(target.image(VOL))
                 and same_file(src, target.image(VOL)), 20, "initial sync")
        yield Export(src, port, agent)
    finally:
        code = agent.stop()
        assert code == 0, agent.log()[-3000:]
        assert "Traceback" not in agent.log()


def qemu_io(export: Export, creds: str | None, *cmds: str) -> subprocess.CompletedProcess[str]:
    opts = f"driver=nbd,host=127.0.0.1,port={export.port},export={VOL}"
    args = [need("qemu-io")]
    if creds is not None:
        args += ["--object", f"tls-creds-x509,id=tls0,dir={creds},endpoint=client"]
        opts += ",tls-creds=tls0"
    args += ["--image-opts", opts]
    for c in cmds:
        args += ["-c", c]
    return subprocess.run(args, capture_output=True, text=True, timeout=60)


def test_tls_clients_read_and_write_and_the_writes_reach_the_replica(
        export: Export, workdir: str, target: Target, deployment: Pki) -> None:
    operator = client_dir(workdir, "operator", deployment.dir, Identity("operator", "tester"))
    own_site = client_dir(workdir, "east", deployment.dir, Identity("site", "east"))
    info = subprocess.run([need("nbdinfo"), "--json", export.uri(operator)],
                          capture_output=True, text=True, timeout=60)
    assert info.returncode == 0, info.stderr + export.agent.log()[-2000:]
    assert f'"export-size": {SIZE}' in info.stdout
    data = os.path.join(workdir, "new.bin")
    write_random(data, SIZE, seed=72)
    p = subprocess.run([need("nbdcopy"), data, export.uri(own_site)], capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert same_file(data, export.src)
    p = qemu_io(export, operator, "write -P 0xab 4096 65536", "flush",
                "read -P 0xab 4096 65536")
    assert p.returncode == 0 and "Pattern verification failed" not in p.stdout, \
        p.stdout + p.stderr
    with open(export.src, "rb") as fh:
        fh.seek(4096)
        assert fh.read(65536) == b"\xab" * 65536
    wait_for(lambda: same_file(export.src, target.image(VOL)), 20, "the TLS writes to replicate")


def test_plaintext_clients_are_refused_and_write_nothing(export: Export,
                                                         workdir: str) -> None:
    before = export.digest()
    info = subprocess.run([need("nbdinfo"), export.uri(None)], capture_output=True, text=True,
                          timeout=60, env={**os.environ, "LIBNBD_DEBUG": "1"})
    assert info.returncode != 0
    assert "server error message: TLS required" in info.stderr, info.stderr
    p = qemu_io(export, None, "write -P 0x11 0 4096")
    assert p.returncode != 0 and "TLS negotiation required" in p.stderr, p.stdout + p.stderr
    with pytest.raises(NbdError, match=f"{REP_ERR_TLS_REQD:#x}"):
        NbdClient("127.0.0.1", export.port, VOL, timeout=10)
    # NBD_OPT_EXPORT_NAME cannot be refused with an error: the server hangs up
    with socket.create_connection(("127.0.0.1", export.port), timeout=10) as s:
        s.recv(18)
        s.sendall(struct.pack(">I", 3))
        s.sendall(struct.pack(">QII", 0x49484156454F5054, 1, len(VOL)) + VOL.encode())
        s.sendall(struct.pack(">IHHQQI", 0x25609513, 0, 1, 1, 0, 4096) + b"\x22" * 4096)
        assert _drain(s) == b""
    assert export.digest() == before


def _drain(s: socket.socket) -> bytes:
    """What the server sends until it hangs up (a reset: it closed with our request unread)."""
    out = b""
    try:
        while chunk := s.recv(4096):
            out += chunk
    except ConnectionResetError:
        pass
    return out


def test_a_certificate_of_another_ca_expired_or_of_another_site_is_refused(
        export: Export, workdir: str, deployment: Pki) -> None:
    rogue = os.path.join(workdir, "rogue")
    init(rogue, "rogue")
    issue(rogue, Identity("operator", "tester"))
    # the client trusts both CAs (so only the server can refuse) and presents the rogue one's
    creds = client_dir(workdir, "rogue-creds", rogue, Identity("operator", "tester"),
                       deployment.dir, rogue)
    before = export.digest()
    p = subprocess.run([need("nbdinfo"), export.uri(creds)], capture_output=True, text=True,
                       timeout=60)
    assert p.returncode != 0
    p = qemu_io(export, creds, "write -P 0x33 0 4096")
    # gnutls words the server's refusal by when it reads the close: either is the handshake
    assert p.returncode != 0 and ("TLS channel" in p.stderr
                                  or "TLS handshake failed" in p.stderr), p.stdout + p.stderr
    wait_for(lambda: export.agent.log().count("certificate verify failed") >= 2, 10,
             "the server to refuse both foreign certificates in the handshake")
    # the right CA, expired yesterday
    expired = os.path.join(workdir, "expired")
    os.makedirs(expired)
    for name in ("ca.crt", "ca.key", "deployment.json"):
        shutil.copy(os.path.join(deployment.dir, name), expired)
    past = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=2)
    issue(expired, Identity("operator", "old"), not_before=past,
          not_after=past + datetime.timedelta(days=1))
    creds = client_dir(workdir, "expired-creds", expired, Identity("operator", "old"))
    p = subprocess.run([need("nbdinfo"), export.uri(creds)], capture_output=True, text=True,
                       timeout=60)
    assert p.returncode != 0
    wait_for(lambda: "certificate has expired" in export.agent.log(), 10,
             "the server to refuse the expired certificate")
    north = client_dir(workdir, "north", deployment.dir, Identity("site", "north"))
    p = subprocess.run([need("nbdinfo"), export.uri(north)], capture_output=True, text=True,
                       timeout=60, env={**os.environ, "LIBNBD_DEBUG": "1"})
    assert p.returncode != 0 and "site north may not attach" in p.stderr, p.stderr
    p = qemu_io(export, north, "write -P 0x44 0 4096")
    assert p.returncode != 0 and "site north may not attach" in p.stderr, p.stdout + p.stderr
    assert export.digest() == before


def client_context(d: str, who: Identity) -> ssl.SSLContext:
    lay = Layout(d)
    ctx = ssl.create_default_context(cafile=lay.ca_cert)
    ctx.check_hostname = False
    ctx.load_cert_chain(lay.cert(who), lay.key(who))
    return ctx


def test_our_client_over_starttls(export: Export, deployment: Pki) -> None:
    ctx = client_context(deployment.dir, Identity("operator", "tester"))
    client = NbdClient("127.0.0.1", export.port, VOL, timeout=10, tls=ctx)
    try:
        client.write(8192, b"\x5a" * 4096)
        client.flush()
        assert client.read(8192, 4096) == b"\x5a" * 4096
    finally:
        client.close()


def test_an_operator_the_export_does_not_name_is_refused(export: Export,
                                                         deployment: Pki) -> None:
    """Every operator certificate of the deployment is a client certificate (Prometheus', the
    API's): only those named by --nbd-allow may attach, besides the export's own site."""
    scraper = Identity("operator", "scraper")
    if not os.path.exists(Layout(deployment.dir).cert(scraper)):
        issue(deployment.dir, scraper)
    before = export.digest()
    with pytest.raises(NbdError, match=f"{REP_ERR_POLICY:#x}.*operator scraper may not attach "
                       "to site east's export"):
        NbdClient("127.0.0.1", export.port, VOL, timeout=10,
                  tls=client_context(deployment.dir, scraper))
    wait_for(lambda: "operator scraper may not attach" in export.agent.log(), 10,
             "the refusal in the agent's log")
    for who in (Identity("operator", "tester"), Identity("site", "east")):  # named; own site
        client = NbdClient("127.0.0.1", export.port, VOL, timeout=10,
                           tls=client_context(deployment.dir, who))
        client.close()
    assert export.digest() == before


def test_plaintext_sent_after_starttls_ends_the_session(export: Export,
                                                        deployment: Pki) -> None:
    """A man in the middle appends NBD_OPT_GO to the client's STARTTLS: the server must not
    read it as sent inside TLS (under the real client's identity); it hangs up instead."""
    name = VOL.encode()
    go = struct.pack(">QII", 0x49484156454F5054, 7, len(name) + 6) + struct.pack(
        ">I", len(name)) + name + struct.pack(">H", 0)
    starttls = struct.pack(">QII", 0x49484156454F5054, 5, 0)
    with socket.create_connection(("127.0.0.1", export.port), timeout=10) as s:
        s.recv(18)
        s.sendall(struct.pack(">I", 3))
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.sendall(starttls + go)  # one segment
        ack = b""
        while len(ack) < 20 and (chunk := s.recv(20 - len(ack))):
            ack += chunk
        assert struct.unpack(">QIII", ack)[1:] == (5, 1, 0)  # STARTTLS acknowledged
        # the real client now runs the handshake and would find the injected GO answered
        ctx = client_context(deployment.dir, Identity("operator", "tester"))
        with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
            with ctx.wrap_socket(s, server_hostname="127.0.0.1") as tls:
                assert tls.recv(4096) == b""  # no NBD_REP_INFO for the injected GO
                raise ConnectionError("closed")
    wait_for(lambda: "bytes sent after NBD_OPT_STARTTLS" in export.agent.log(), 10,
             "the warning in the agent's log")
    assert export.agent.log().count("bytes sent after NBD_OPT_STARTTLS") == 1


def test_a_group_export_over_tls(workdir: str, target: Target, deployment: Pki) -> None:
    """push-group (what the site agent runs): every member's export takes TLS only."""
    paths = {"data": os.path.join(workdir, "data.img"), "log": os.path.join(workdir, "log.img")}
    write_random(paths["data"], 1 << 20, seed=73)
    write_random(paths["log"], 1 << 20, seed=74)
    port = free_port()
    agent = Proc([*DRCTL, "replicate", "push-group", "--group", "db", "--to", target.address,
                  "--nbd-listen", f"127.0.0.1:{port}", "--nbd-tls", "--nbd-allow",
                  "operator:tester", "--state-dir",
                  os.path.join(workdir, "st"), *target.client_flags(),
                  f"data={paths['data']}", f"log={paths['log']}"],
                 os.path.join(workdir, "group.log")).start()
    try:
        wait_for(lambda: port_open(port) and all(
            os.path.exists(target.image(v)) and same_file(p, target.image(v))
            for v, p in paths.items()), 30, "initial sync of both members")
        creds = client_dir(workdir, "operator", deployment.dir, Identity("operator", "tester"))
        p = subprocess.run([need("nbdinfo"), "--list", "--json",
                            f"nbds://127.0.0.1:{port}?tls-certificates={creds}"],
                           capture_output=True, text=True, timeout=60)
        assert p.returncode == 0 and '"data"' in p.stdout and '"log"' in p.stdout, p.stderr
        p = subprocess.run([need("nbdinfo"), "--list", f"nbd://127.0.0.1:{port}"],
                           capture_output=True, text=True, timeout=60)
        assert p.returncode != 0
        uri = f"nbds://127.0.0.1:{port}/log?tls-certificates={creds}"
        data = os.path.join(workdir, "new.bin")
        write_random(data, 1 << 20, seed=75)
        p = subprocess.run([need("nbdcopy"), data, uri], capture_output=True, text=True,
                           timeout=60)
        assert p.returncode == 0, p.stderr
        wait_for(lambda: same_file(data, target.image("log")), 20, "the TLS write to replicate")
    finally:
        assert agent.stop() == 0, agent.log()[-3000:]


# -- the CLI's guards ------------------------------------------------------------------------


def test_a_non_loopback_export_needs_tls_or_insecure_nbd(workdir: str,
                                                         deployment: Pki) -> None:
    src = os.path.join(workdir, "src.img")
    write_random(src, 1 << 20)
    base = [*DRCTL, "replicate", "push", src, "--to", "127.0.0.1:1", "--volume", VOL,
            "--nbd-listen", "0.0.0.0:10809"]
    p = run([*base, *deployment.flags("east", "west")])
    assert p.returncode == 2, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "--nbd-tls" in lines[0] and "--insecure-nbd" in lines[0], lines
    p = run([*base, "--nbd-tls", "--tls-dir", deployment.dir, "--operator", "tester",
             "--target-site", "west"])
    assert p.returncode == 2 and "site's certificate" in p.stderr, p.stderr
    p = run([*base, "--nbd-tls", "--insecure"])
    assert p.returncode == 2 and "--nbd-tls needs" in p.stderr, p.stderr
    p = run([*DRCTL, "replicate", "push", src, "--to", "127.0.0.1:1", "--volume", VOL,
             "--once", "--nbd-tls", *deployment.flags("east", "west")])
    assert p.returncode == 2 and "needs --nbd-listen" in p.stderr, p.stderr
    p = run([*base, "--insecure-nbd", "--nbd-allow", "operator:tester",
             *deployment.flags("east", "west")])
    assert p.returncode == 2 and "--nbd-allow" in p.stderr and "needs --nbd-tls" in p.stderr, \
        p.stderr
    p = run([*base, "--nbd-tls", "--nbd-allow", "west", *deployment.flags("east", "west")])
    assert p.returncode == 2 and "expected operator:NAME" in p.stderr, p.stderr
