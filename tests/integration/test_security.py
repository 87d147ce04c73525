"""The replication channel's security against a real target daemon (docs/security.md):
callers without the right certificate are refused by every RPC, epochs move only on the
controller's signed token, plaintext and NBD stay on loopback, metrics can be HTTPS."""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import shutil
import socket
import ssl
import stat
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest

from drctl.epochtoken import PREFIX, Signer
from drctl.pki import Identity, Layout, init, issue
from replicator.batch import Batch, Compression, Kind
from replicator.blockmap import block_hash
from replicator.transport import wire
from tests.procs import (
    DRCTL,
    Pki,
    Proc,
    Target,
    free_port,
    port_open,
    push_cmd,
    run,
    wait_for,
    write_random,
)

SIZE = 1 << 20
VOL = "vol"
RPCS = ("Handshake", "Push", "Fence", "Clone", "DropClone", "BlockHashes")


# -- helpers ---------------------------------------------------------------------------------


def _read(path: str) -> bytes:
    with open(path, "rb") as fh:
        return fh.read()


def creds(d: str, who: Identity | None, ca_dir: str | None = None) -> grpc.ChannelCredentials:
    """TLS as ``who`` from deployment ``d`` (None: no client certificate), trusting the CA of
    ``ca_dir`` (default ``d``)."""
    ca = _read(Layout(ca_dir or d).ca_cert)
    if who is None:
        return grpc.ssl_channel_credentials(ca)
    lay = Layout(d)
    return grpc.ssl_channel_credentials(ca, _read(lay.key(who)), _read(lay.cert(who)))


def channel(target: Target, c: grpc.ChannelCredentials | None) -> grpc.aio.Channel:
    if c is None:
        return grpc.aio.insecure_channel(target.address)
    return grpc.aio.secure_channel(target.address, c,
                                   options=[("grpc.ssl_target_name_override", "west")])


def data_batch(epoch: int, seq: int, content: bytes = b"\xaa" * 4096) -> Any:
    b = Batch(volume=VOL, epoch=epoch, seq=seq, block_size=4096, volume_size=SIZE,
              indices=[0], kinds=bytes([Kind.DATA]), hashes=[block_hash(content)],
              copy_from=[], compression=Compression.NONE, raw_length=len(content),
              payload=content, commit=True).seal()
    return wire.batch_to_proto(b)


def handshake_request(epoch: int, token: str = "") -> Any:
    return wire.ProtoHandshakeRequest(protocol_version=wire.PROTOCOL_VERSION, volume=VOL,
                                      volume_size=SIZE, block_size=4096, source_id="t",
                                      epoch=epoch, epoch_token=token.encode())


async def call(ch: grpc.aio.Channel, rpc: str, epoch: int = 0, seq: int = 1,
               token: str = "", release: bool = False, opened_at: int | None = None) -> Any:
    """One RPC; its response (Push: the acks), or the AioRpcError it ended with. A Push
    ``opened_at`` an epoch starts with a flush request at that epoch, then the batch."""
    stub = wire.ReplicationStub(ch)
    try:
        if rpc == "Handshake":
            return await stub.Handshake(handshake_request(epoch, token), timeout=60)
        if rpc == "Fence":
            return await stub.Fence(wire.ProtoFenceRequest(volume=VOL, epoch=epoch,
                                                           release=release,
                                                           epoch_token=token.encode()),
                                    timeout=60)
        if rpc in ("Clone", "DropClone"):
            return await getattr(stub, rpc)(wire.ProtoCloneRequest(volume=VOL, name="c1"),
                                            timeout=60)
        if rpc == "BlockHashes":
            return [c async for c in stub.BlockHashes(
                wire.ProtoBlockHashesRequest(volume=VOL), timeout=60)]

        async def batches() -> AsyncIterator[Any]:
            if opened_at is not None:
                yield wire.flush_request(VOL, opened_at)
            yield data_batch(epoch, seq)

        return [a async for a in stub.Push(batches(), timeout=60)]
    except grpc.aio.AioRpcError as exc:
        return exc


def replica_state(target: Target) -> dict[str, bytes]:
    """Every file of the target's directory, by content (the replica, its records)."""
    out = {}
    for name in sorted(os.listdir(target.dir)):
        path = os.path.join(target.dir, name)
        if os.path.isfile(path):
            out[name] = hashlib.sha256(_read(path)).digest()
    return out


def replica_epoch(target: Target) -> float:
    from tests.procs import metric

    return metric(target.metrics(), "drctl_replication_epoch", volume=VOL)


@pytest.fixture
def rogue(workdir: str) -> str:
    """Another deployment: its own CA, a site east of its own."""
    d = os.path.join(workdir, "rogue")
    init(d, "rogue")
    issue(d, Identity("site", "east"), ("127.0.0.1",))
    return d


@pytest.fixture
def expired(workdir: str, deployment: Pki) -> str:
    """Site east's certificate from the right CA, expired yesterday (its own directory)."""
    d = os.path.join(workdir, "expired")
    os.makedirs(d)
    for name in ("ca.crt", "ca.key", "deployment.json"):
        shutil.copy(os.path.join(deployment.dir, name), d)
    past = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=2)
    issue(d, Identity("site", "east"), ("127.0.0.1",), not_before=past,
          not_after=past + datetime.timedelta(days=1))
    return d


def seeded(workdir: str, target: Target, *extra: str) -> str:
    src = os.path.join(workdir, "src.img")
    write_random(src, SIZE)
    p = run(push_cmd(src, target, VOL, os.path.join(workdir, "st"), "--once", *extra))
    assert p.returncode == 0, p.stderr
    return src


# -- who may call ----------------------------------------------------------------------------


async def test_callers_without_the_right_certificate_are_refused_by_every_rpc(
        workdir: str, target: Target, deployment: Pki, rogue: str, expired: str) -> None:
    seeded(workdir, target)
    before = replica_state(target)
    d = deployment.dir
    transport_refusals = {
        "no certificate": creds(d, None),
        "a certificate from another CA": creds(rogue, Identity("site", "east"), d),
        "an expired certificate": creds(expired, Identity("site", "east")),
        "plaintext": None,
    }
    for what, c in transport_refusals.items():
        async with channel(target, c) as ch:
            for rpc in RPCS:
                got = await call(ch, rpc, epoch=5)
                assert isinstance(got, grpc.aio.AioRpcError), f"{what}: {rpc} answered"
                assert got.code() == grpc.StatusCode.UNAVAILABLE, (what, rpc, got)
    # a valid certificate of a site that may not use this target: refused by the policy
    for who in (Identity("site", "north"), Identity("operator", "tester")):
        async with channel(target, creds(d, who)) as ch:
            for rpc in RPCS:
                if who.kind == "operator" and rpc in ("Clone", "DropClone", "BlockHashes"):
                    continue  # operators may run drills and read hashes (--allow operator:)
                got = await call(ch, rpc, epoch=5)
                assert isinstance(got, grpc.aio.AioRpcError), f"{who}: {rpc} answered"
                assert got.code() == grpc.StatusCode.PERMISSION_DENIED, (who, rpc, got)
                assert got.details().count("\n") == 0
    assert replica_state(target) == before, "a refused caller changed the replica"
    assert replica_epoch(target) == 0
    assert target.proc is not None
    log = target.proc.log()
    assert "refused Push vol from site north" in log
    assert "refused Fence vol from operator tester" in log
    # the CLI says it in one line, with its exit code
    p = run([*DRCTL, "replicate", "push", os.path.join(workdir, "src.img"), "--to",
             target.address, "--volume", VOL, "--state-dir", os.path.join(workdir, "n"),
             "--once", *deployment.flags("north", "west")])
    assert p.returncode == 77 and "[permission_denied]" in p.stderr, p.stderr
    # in the words of what was asked, not an RPC's name
    assert (f"site north may not replicate (push) volume {VOL} here: this target's --allow "
            "rules do not name site north") in p.stderr, p.stderr


async def test_the_allowed_site_and_an_operator_get_through(workdir: str, target: Target,
                                                            deployment: Pki) -> None:
    src = seeded(workdir, target)
    async with channel(target, creds(deployment.dir, Identity("operator", "tester"))) as ch:
        chunks = await call(ch, "BlockHashes")
        assert not isinstance(chunks, grpc.aio.AioRpcError), chunks
        clone = await call(ch, "Clone")
        assert not isinstance(clone, grpc.aio.AioRpcError), clone
        assert await call(ch, "DropClone") is not None
    p = run([*DRCTL, "replicate", "verify", src, "--to", target.address, "--volume", VOL,
             "--tls-dir", deployment.dir, "--operator", "tester", "--target-site", "west"])
    assert p.returncode == 0, p.stderr


# -- the epoch gate --------------------------------------------------------------------------


def _tamper(token: str, **changes: object) -> str:
    import base64
    import json

    payload, sig = token[len(PREFIX):].split(".")
    body = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    body.update(changes)
    raw = base64.urlsafe_b64encode(json.dumps(body, sort_keys=True,
                                              separators=(",", ":")).encode())
    return f"{PREFIX}{raw.rstrip(b'=').decode()}.{sig}"


async def test_forged_epochs_are_refused_and_change_nothing(workdir: str,
                                                            deployment: Pki) -> None:
    target = Target(workdir, None, "--allow", "north").start()
    d = deployment.dir
    src = seeded(workdir, target, "--epoch", "1", "--epoch-token",
                 deployment.token_file(os.path.join(workdir, "t1"), (VOL,), "east", 1))
    assert replica_epoch(target) == 1
    before = replica_state(target)
    from cryptography.hazmat.primitives.asymmetric import ed25519

    other_key = Signer(ed25519.Ed25519PrivateKey.generate())
    forged = {
        "no token": "",
        "a token for another site": deployment.sign((VOL,), "north", 2),
        "a token for another volume": deployment.sign(("other",), "east", 2),
        "a token for another epoch": deployment.sign((VOL,), "east", 3),
        "a tampered token": _tamper(deployment.sign((VOL,), "east", 1), epoch=2),
        "a token from another key": other_key.sign("svc", [VOL], "east", 2),
    }
    async with channel(target, creds(d, Identity("site", "east"))) as ch:
        for what, token in forged.items():
            for rpc in ("Handshake", "Fence"):
                got = await call(ch, rpc, epoch=2, token=token)
                assert isinstance(got, grpc.aio.AioRpcError), f"{what}: {rpc} answered"
                assert got.code() == grpc.StatusCode.FAILED_PRECONDITION, (what, rpc, got)
                assert got.details().startswith("epoch_not_granted"), got.details()
        # a handshake at the granted epoch, then batches claiming a higher one
        ok = await call(ch, "Handshake", epoch=1)
        assert not isinstance(ok, grpc.aio.AioRpcError), ok
        # a replica that does not exist yet starts at epoch 0: creating it higher needs a token
        fresh = wire.ProtoHandshakeRequest(protocol_version=wire.PROTOCOL_VERSION,
                                           volume="fresh", volume_size=SIZE, block_size=4096,
                                           source_id="t", epoch=3)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await wire.ReplicationStub(ch).Handshake(fresh, timeout=60)
        assert refused.value.details().startswith("epoch_not_granted"), refused.value
        assert not [n for n in os.listdir(target.dir) if n.startswith("fresh")]
        for opened_at in (None, 1):  # the stream's first message, or a later one
            got = await call(ch, "Push", epoch=5, seq=ok.applied_seq + 1, opened_at=opened_at)
            assert isinstance(got, grpc.aio.AioRpcError), "a batch raised the epoch"
            assert got.code() == grpc.StatusCode.FAILED_PRECONDITION, got
            assert "epoch_not_granted" in got.details(), got.details()
    assert replica_state(target) == before, "a refused epoch changed the replica"
    assert replica_epoch(target) == 1
    # the CLI: one line, exit 77
    p = run(push_cmd(src, target, VOL, os.path.join(workdir, "st"), "--once", "--epoch", "2"))
    assert p.returncode == 77 and "[epoch_not_granted]" in p.stderr, p.stderr
    target.stop()


async def test_a_granted_epoch_then_a_failover_shuts_the_old_primary_out(
        workdir: str, deployment: Pki) -> None:
    target = Target(workdir, None, "--allow", "north").start()
    d = deployment.dir
    src = seeded(workdir, target, "--epoch", "1", "--epoch-token",
                 deployment.token_file(os.path.join(workdir, "t1"), (VOL,), "east", 1))
    good2 = deployment.sign((VOL,), "east", 2)
    # east at epoch 2 with its token
    with open(src, "r+b") as fh:
        fh.write(b"\x01" * 4096)
    token2 = os.path.join(workdir, "t2")
    with open(token2, "w") as fh:
        fh.write(good2)
    os.chmod(token2, 0o600)
    p = run(push_cmd(src, target, VOL, os.path.join(workdir, "st"), "--once", "--epoch", "2",
                     "--epoch-token", token2))
    assert p.returncode == 0, p.stderr
    assert replica_epoch(target) == 2
    # a failover to north at epoch 3: from then on the old primary is refused at any epoch
    async with channel(target, creds(d, Identity("site", "north"))) as ch:
        got = await call(ch, "Handshake", epoch=2)  # north at east's epoch: not granted
        assert isinstance(got, grpc.aio.AioRpcError)
        assert got.code() == grpc.StatusCode.PERMISSION_DENIED, got
        assert "granted to site east" in got.details()
        ok = await call(ch, "Fence", epoch=3, token=deployment.sign((VOL,), "north", 3))
        assert not isinstance(ok, grpc.aio.AioRpcError), ok
        assert ok.epoch == 3
    async with channel(target, creds(d, Identity("site", "east"))) as ch:
        got = await call(ch, "Handshake", epoch=3)
        assert isinstance(got, grpc.aio.AioRpcError)
        assert got.code() == grpc.StatusCode.PERMISSION_DENIED, got
        got = await call(ch, "Handshake", epoch=2, token=good2)
        assert isinstance(got, grpc.aio.AioRpcError)
        assert got.details().startswith("stale_epoch"), got.details()
    # the target's own site promotes its replica (Fence with release) on its own token
    async with channel(target, creds(d, Identity("site", "west"))) as ch:
        assert isinstance(await call(ch, "Handshake", epoch=3), grpc.aio.AioRpcError)
        for epoch in (3, 4):  # a promotion needs the token, even without a new epoch
            got = await call(ch, "Fence", epoch=epoch, release=True)
            assert isinstance(got, grpc.aio.AioRpcError)
            assert got.details().startswith("epoch_not_granted"), got.details()
        ok = await call(ch, "Fence", epoch=4, release=True,
                        token=deployment.sign((VOL,), "west", 4))
        assert not isinstance(ok, grpc.aio.AioRpcError), ok
    assert os.path.exists(os.path.join(target.dir, f"{VOL}.primary"))
    target.stop()


# -- the CLI's guards ------------------------------------------------------------------------


def test_plaintext_and_nbd_stay_on_loopback(workdir: str, deployment: Pki) -> None:
    src = os.path.join(workdir, "src.img")
    write_random(src, SIZE)
    rdir = os.path.join(workdir, "r")
    p = run([*DRCTL, "replicate", "serve", "--listen", "0.0.0.0:7400", "--dir", rdir,
             "--insecure"])
    assert p.returncode == 2 and "loopback" in p.stderr and "warning" in p.stderr, p.stderr
    p = run([*DRCTL, "replicate", "push", src, "--to", "192.0.2.1:7400", "--volume", VOL,
             "--once", "--insecure"])
    assert p.returncode == 2 and "not a loopback address" in p.stderr, p.stderr
    p = run([*DRCTL, "replicate", "serve", "--listen", "127.0.0.1:7400", "--dir", rdir])
    assert p.returncode == 2 and "--tls-dir" in p.stderr, p.stderr
    p = run([*DRCTL, "replicate", "push", src, "--to", "127.0.0.1:1", "--volume", VOL,
             "--nbd-listen", "0.0.0.0:10809", *deployment.flags("east", "west")])
    assert p.returncode == 2 and "NBD without TLS has no authentication" in p.stderr \
        and "--nbd-tls" in p.stderr and "--insecure-nbd" in p.stderr, p.stderr


def test_nbd_on_a_unix_socket(workdir: str, target: Target) -> None:
    from tests.nbdclient import NbdClient

    src = os.path.join(workdir, "src.img")
    write_random(src, SIZE)
    sock = os.path.join(workdir, "nbd.sock")
    agent = Proc(push_cmd(src, target, VOL, os.path.join(workdir, "st"), "--nbd-listen",
                          f"unix:{sock}"), os.path.join(workdir, "push.log")).start()
    wait_for(lambda: os.path.exists(sock), 20, "the NBD socket")
    assert stat.S_IMODE(os.stat(sock).st_mode) & 0o077 == 0
    client = NbdClient.__new__(NbdClient)
    client.sock = socket.socket(socket.AF_UNIX)
    client.sock.settimeout(10)
    client.sock.connect(sock)
    client.handle = 0
    client._handshake(VOL)
    client.write(8192, b"\x5a" * 4096)
    client.flush()
    client.close()

    def replicated() -> bool:
        if not os.path.exists(target.image(VOL)):
            return False
        with open(target.image(VOL), "rb") as fh:
            fh.seek(8192)
            return fh.read(4096) == b"\x5a" * 4096

    wait_for(replicated, 20, "the write through the unix socket to replicate")
    agent.stop()


def test_metrics_over_https_with_client_certificates(workdir: str, deployment: Pki) -> None:
    port = free_port()
    target = Target(workdir, None, "--metrics-listen", f"127.0.0.1:{port}", "--metrics-tls")
    target.metrics_port = port
    target.proc = Proc([*DRCTL, "replicate", "serve", "--listen", target.address, "--dir",
                        target.dir, *target.security_flags(), *target.extra],
                       os.path.join(workdir, "target.log")).start()
    wait_for(lambda: port_open(port) and port_open(target.port), 20, "the target")
    url = f"https://127.0.0.1:{port}/metrics"
    lay = Layout(deployment.dir)
    ctx = ssl.create_default_context(cafile=lay.ca_cert)
    ctx.check_hostname = False
    with pytest.raises((ssl.SSLError, urllib.error.URLError, ConnectionError)):
        urllib.request.urlopen(url, context=ctx, timeout=5).read()
    with pytest.raises((ssl.SSLError, urllib.error.URLError, ConnectionError)):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read()
    who = Identity("operator", "tester")
    ctx.load_cert_chain(lay.cert(who), lay.key(who))
    with urllib.request.urlopen(url, context=ctx, timeout=5) as r:
        assert b"drctl_replication" in r.read()
    target.stop()


def test_certs_cli(workdir: str) -> None:
    d = os.path.join(workdir, "dep")
    assert run([*DRCTL, "certs", "init", "--dir", d, "--deployment", "prod"]).returncode == 0
    p = run([*DRCTL, "certs", "issue", "--dir", d, "--site", "east", "--host", "10.0.0.5"])
    assert p.returncode == 0, p.stderr
    assert run([*DRCTL, "certs", "issue", "--dir", d, "--operator", "ann"]).returncode == 0
    p = run([*DRCTL, "certs", "show", os.path.join(d, "sites", "east.crt")])
    assert p.returncode == 0, p.stderr
    assert "site east" in p.stdout and "drctl://site/east" in p.stdout
    assert "10.0.0.5" in p.stdout and "issued by" in p.stdout
    for sub in ("sites/east.key", "operators/ann.key", "ca.key", "epoch.key"):
        assert stat.S_IMODE(os.stat(os.path.join(d, sub)).st_mode) == 0o600
    token = os.path.join(workdir, "tok")
    with open(token, "w") as fh:
        fh.write(Signer.load(os.path.join(d, "epoch.key")).sign("app", ["data"], "east", 4))
    p = run([*DRCTL, "certs", "show", token])
    assert p.returncode == 0 and "site east is the primary at epoch 4" in p.stdout, p.stdout
    log = os.path.join(d, "audit.jsonl")  # the CA's own audit chain: init and each issue
    with open(log) as fh:
        recs = [json.loads(line) for line in fh]
    assert [(r["action"], r["target"]) for r in recs] == [
        ("certs.init", "prod"), ("certs.issue", "site east"), ("certs.issue", "operator ann")]
    assert recs[1]["params"]["hosts"] == ["10.0.0.5"] and "key" not in json.dumps(recs)
    assert run([*DRCTL, "audit", "verify", "--file", log]).returncode == 0
    recs[1]["params"]["days"] = 3650  # an edited record is named
    with open(log, "w") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in recs)
    p = run([*DRCTL, "audit", "verify", "--file", log])
    assert p.returncode == 1 and "record 2" in p.stderr, p.stderr
    os.chmod(os.path.join(d, "sites", "east.key"), 0o644)
    p = run([*DRCTL, "certs", "show", os.path.join(d, "sites", "east.key")])
    assert p.returncode == 2 and p.stderr.count("\n") == 1, p.stderr
    assert "[key_permissions]" in p.stderr


def test_the_controller_signs_the_epoch_into_the_record(deployment: Pki) -> None:
    """`_act` signs the grant when the epoch is bumped and whenever it is missing."""
    from drctl.epochtoken import Verifier
    from failover.config import Hooks, ServiceConfig
    from failover.controller import Controller
    from failover.fsm import Policy
    from failover.records import Operation, ServiceRecord, State

    svc = ServiceConfig("app", "east", "west", Policy(), None, Hooks(), ("data",))
    c = Controller.__new__(Controller)
    c.signer = Signer.load(os.path.join(deployment.dir, "epoch.key"))
    verify = Verifier.load(os.path.join(deployment.dir, "epoch.pub")).verify
    rec = ServiceRecord(State.HEALTHY, 0.0, "east", "west")
    c._grant(rec, svc)
    t = verify(rec.epoch_token)
    assert (t.site, t.epoch, t.volumes) == ("east", 1, ("data",))
    same = rec.epoch_token
    c._grant(rec, svc)
    assert rec.epoch_token == same  # valid: not signed again
    rec.epoch, rec.operation = 2, Operation("failover", "east", "west", 0.0)
    c._grant(rec, svc)
    assert (verify(rec.epoch_token).site, verify(rec.epoch_token).epoch) == ("west", 2)
    rec.primary, rec.replica = "west", "east"  # promoting
    c._grant(rec, svc)
    assert verify(rec.epoch_token).site == "west"
    rec.epoch_token = _tamper(rec.epoch_token, epoch=9)
    c._grant(rec, svc)
    assert verify(rec.epoch_token).epoch == 2


def test_site_and_controller_metrics_over_https(workdir: str, deployment: Pki) -> None:
    """`drctl agent --metrics-tls` serves the site's metrics with the site's certificate, and
    `drctl controller --metrics-tls` with servers/controller: both ask scrapers for a client
    certificate from the deployment's CA."""
    from prometheus_client import CollectorRegistry, Gauge

    from drctl.metrics_http import MetricsEndpoint, serve_registry
    from drctl.pki import issue
    from sites.metrics import serve

    lay = Layout(deployment.dir)
    issue(deployment.dir, Identity("server", "controller"), ("127.0.0.1",))
    ctx = ssl.create_default_context(cafile=lay.ca_cert)
    ctx.check_hostname = False
    scraper = ssl.create_default_context(cafile=lay.ca_cert)
    scraper.check_hostname = False
    who = Identity("operator", "tester")
    scraper.load_cert_chain(lay.cert(who), lay.key(who))
    for name, start in (
            ("site", lambda reg, port: serve(reg, f"127.0.0.1:{port}", deployment.dir, "west")),
            ("controller", lambda reg, port: serve_registry(reg, MetricsEndpoint.from_tls_dir(
                "127.0.0.1", port, deployment.dir, "servers/controller")))):
        reg = CollectorRegistry()
        Gauge(f"drctl_test_{name}_up", "a probe", registry=reg).set(1)
        port = free_port()
        start(reg, port)
        url = f"https://127.0.0.1:{port}/metrics"
        with pytest.raises((ssl.SSLError, urllib.error.URLError, ConnectionError)):
            urllib.request.urlopen(url, context=ctx, timeout=5).read()  # no client certificate
        with urllib.request.urlopen(url, context=scraper, timeout=5) as r:
            assert f"drctl_test_{name}_up 1.0".encode() in r.read()
