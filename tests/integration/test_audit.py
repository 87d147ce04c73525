"""The audit log with real processes: etcd, `drctl api` (users and roles), a controller and
two site agents, CLI requests. After a series of operations `drctl audit verify` passes; an
edited, removed or swapped record (in etcd, in the mirror file) makes it fail naming it."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import json
import os
import ssl
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from drctl.localservers import free_port, wait_port
from failover.coordination.etcd import EtcdStore
from failover.records import audit_key
from tests.procs import DRCTL, Proc, run, wait_for
from tests.services import EtcdServer


@dataclass
class Cluster:
    workdir: str
    config: str
    etcd: EtcdServer
    users: str
    tokens: dict[str, str]
    mirror: str
    api_port: int = 0

    def call(self, method: str, path: str, token: str | None = None,
             body: Any = None, headers: dict[str, str] | None = None,
             scheme: str = "http", context: ssl.SSLContext | None = None
             ) -> tuple[int, dict[str, Any]]:
        h = dict(headers or {})
        if token is not None:
            h["Authorization"] = f"Bearer {token}"
        data = None
        if body is not None:
            data, h["Content-Type"] = json.dumps(body).encode(), "application/json"
        req = urllib.request.Request(f"{scheme}://127.0.0.1:{self.api_port}{path}", data=data,
                                     method=method, headers=h)
        try:
            with urllib.request.urlopen(req, timeout=10, context=context) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())

    def app(self) -> dict[str, Any]:
        code, s = self.call("GET", "/api/v1/status", self.tokens["viewer"])
        assert code == 200, s
        return s["services"]["app"]  # type: ignore[no-any-return]

    def drctl(self, *args: str) -> tuple[int, str, str]:
        p = run([*DRCTL, *args])
        return p.returncode, p.stdout, p.stderr


def _store(c: Cluster) -> EtcdStore:
    return EtcdStore([c.etcd.endpoint], credentials=c.etcd.credentials())


def _etcd(c: Cluster, op: Any) -> Any:
    async def go() -> Any:
        store = _store(c)
        try:
            return await op(store)
        finally:
            await store.close()

    return asyncio.run(go())


@pytest.fixture
def cluster(workdir: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[Cluster]:
    mirror = os.path.join(workdir, "audit.jsonl")
    monkeypatch.setenv("DRCTL_AUDIT_FILE", mirror)  # every drctl process below mirrors here
    etcd = EtcdServer().start()
    hooks = {h: "true" for h in ("start", "stop", "fence", "promote")}
    cfg = {"cluster": "aud", "lease_ttl": 2, "etcd": etcd.etcd_config(),
           "sites": {"east": {"address": "10.0.0.1"}, "west": {"address": "10.0.0.2"}},
           "services": {"app": {"primary": "east", "replica": "west", "hooks": hooks,
                                "policy": {"automatic": False}}}}
    path = os.path.join(workdir, "cluster.yaml")
    with open(path, "w") as fh:
        json.dump(cfg, fh)
    c = Cluster(workdir, path, etcd, os.path.join(workdir, "users.json"), {}, mirror)
    try:
        for role in ("viewer", "operator", "admin"):
            code, out, err = c.drctl("api", "users", "add", f"{role}-1", "--role", role,
                                     "--file", c.users, "--config", path)
            assert code == 0, err
            c.tokens[role] = out.strip()
            assert "shown once" in err and c.tokens[role] not in err
        yield c
    finally:
        etcd.stop()


def _start(c: Cluster) -> list[Proc]:
    c.api_port = free_port()
    procs = [Proc([*DRCTL, "--log-level", "INFO", "agent", "--config", c.config, "--site", s],
                  os.path.join(c.workdir, f"agent-{s}.log")).start() for s in ("east", "west")]
    procs.append(Proc([*DRCTL, "--log-level", "INFO", "controller", "--config", c.config,
                       "--id", "c0"], os.path.join(c.workdir, "controller.log")).start())
    procs.append(Proc([*DRCTL, "api", "--config", c.config, "--users", c.users, "--insecure",
                       "--listen", f"127.0.0.1:{c.api_port}"],
                      os.path.join(c.workdir, "api.log")).start())
    wait_port(c.api_port)
    return procs


def _operate(c: Cluster) -> None:
    """The series: refusals, a failover through the API, requests from the CLI."""
    post = "/api/v1/services/app/failover"
    assert c.call("GET", "/api/v1/status")[0] == 401
    code, err = c.call("POST", post, c.tokens["viewer"], {})
    assert (code, err["error"]) == (403, "forbidden"), err
    code, err = c.call("POST", post, c.tokens["operator"], {"force": True})
    assert (code, err["error"]) == (403, "forbidden"), err
    code, err = c.call("POST", post, c.tokens["admin"], {},
                       {"Origin": "https://evil.example", "Sec-Fetch-Site": "cross-site"})
    assert (code, err["error"]) == (403, "cross_origin"), err
    wait_for(lambda: all(v and v["role"] in ("primary", "replica")
                         for v in c.app()["sites"].values()), 30, "both agents reporting")
    code, body = c.call("POST", post, c.tokens["admin"], {})
    assert code == 202, body
    wait_for(lambda: c.app()["primary"] == "west" and c.app()["state"] == "healthy", 60,
             "the failover and the re-protection")
    code, _, said = c.drctl("retry", "app", "--config", c.config)
    assert code == 65, said  # nothing failed: refused, and recorded
    code, _, said = c.drctl("failover", "app", "--config", c.config, "--to", "west")
    assert code == 65 and "already the primary" in said, said


def _verify(c: Cluster, *extra: str) -> tuple[int, str]:
    code, out, err = c.drctl("audit", "verify", *extra)
    return code, (out + err).strip()


def test_operations_are_audited_and_tampering_is_named(cluster: Cluster) -> None:
    c = cluster
    procs = _start(c)
    try:
        _operate(c)
    finally:
        for p in reversed(procs):
            p.stop()
    for p in procs:
        assert "Traceback" not in p.log() and "audit: " not in p.log(), p.log()[-3000:]

    ca = os.path.join(os.path.dirname(c.config), "ca")
    code, _out, err = c.drctl("certs", "init", "--dir", ca, "--deployment", "aud")
    assert code == 0, err
    code, _out, err = c.drctl("certs", "issue", "--dir", ca, "--operator", "zed",
                              "--config", c.config)
    assert code == 0, err
    code, said = _verify(c, "--file", os.path.join(ca, "audit.jsonl"))  # the CA's own log
    assert code == 0 and "2 records" in said, said

    code, out, err = c.drctl("audit", "show", "--config", c.config, "--json")
    assert code == 0, err
    records = [json.loads(line) for line in out.splitlines()]
    seen = {(r["actor"].split("@")[0], r["action"]) for r in records}
    issued = records.pop()
    assert (issued["action"], issued["target"]) == ("certs.issue", "operator zed"), issued
    assert len(issued["params"]["certificate"]["sha256"]) == 64
    cli = records[-1]["actor"]
    assert records[-1]["action"] == "cli.failover" and "@" in cli
    for want in (("anonymous", "api.status"), ("viewer-1", "api.failover"),
                 ("operator-1", "api.failover"), ("admin-1", "api.failover"),
                 ("controller:c0", "controller.fence"), ("controller:c0", "controller.promote"),
                 ("site:east", "agent.role_change"), ("site:west", "agent.role_change"),
                 (cli.split("@")[0], "cli.retry"), (cli.split("@")[0], "api.users.add")):
        assert want in seen, (want, sorted(seen))
    outcomes = {(r["actor"], r["action"]): r["outcome"] for r in records}
    assert outcomes[("viewer-1", "api.failover")].startswith("403 forbidden")
    assert outcomes[("anonymous", "api.status")].startswith("401 unauthorized")
    assert "refused: retry of app refused: nothing failed" in outcomes[(cli, "cli.retry")]
    west = [r for r in records if r["actor"] == "site:west"
            and r["action"] == "agent.role_change"]
    assert any(r["params"]["to"] == "primary" and r["params"]["epoch"] == 2 for r in west)
    text = json.dumps(records)
    assert all(t not in text for t in c.tokens.values())  # never a token
    code, out, _ = c.drctl("audit", "show", "--config", c.config, "--last", "2")
    assert code == 0 and len(out.splitlines()) == 2 and "cli.failover" in out

    code, said = _verify(c, "--config", c.config, "--file", c.mirror)
    assert code == 0, said
    assert said.startswith(f"audit log verified: {len(records) + 1} records in etcd"), said
    _tamper_etcd(c, len(records))
    _tamper_file(c)


def _tamper_etcd(c: Cluster, count: int) -> None:
    seq = count // 2
    key, next_key = audit_key("/drctl/aud/", seq), audit_key("/drctl/aud/", seq + 1)
    original: dict[str, bytes] = _etcd(c, lambda s: _values(s, [key, next_key]))

    def restore() -> None:
        for k, v in original.items():
            _etcd(c, lambda s, k=k, v=v: s.put(k, v))
        assert _verify(c, "--config", c.config)[0] == 0

    edited = json.loads(original[key])
    edited["outcome"] = "nothing happened"
    _etcd(c, lambda s: s.put(key, json.dumps(edited).encode()))
    _fails(c, seq, "edited", "--config", c.config)
    restore()
    _etcd(c, lambda s: _delete(s, key))
    _fails(c, seq, "removed", "--config", c.config)
    restore()
    _etcd(c, lambda s: s.put(key, original[next_key]))
    _etcd(c, lambda s: s.put(next_key, original[key]))
    _fails(c, seq, "reordered", "--config", c.config)
    restore()


def _tamper_file(c: Cluster) -> None:
    with open(c.mirror) as fh:
        lines = fh.read().splitlines()
    copy = os.path.join(c.workdir, "copy.jsonl")

    def check(changed: list[str], words: str, seq: int = 3) -> None:
        with open(copy, "w") as fh:
            fh.write("\n".join(changed) + "\n")
        _fails(c, seq, words, "--file", copy)
        _fails(c, seq, words, "--config", c.config, "--file", copy)

    rec = json.loads(lines[2])
    rec["actor"] = "someone-else"
    check([*lines[:2], json.dumps(rec), *lines[3:]], "edited")
    check([*lines[:2], *lines[3:]], "removed")
    check([*lines[:2], lines[3], lines[2], *lines[4:]], "reordered")
    rec["hash"] = "0" * 64  # the last record edited, its hash too: only etcd can tell
    from failover.audit import record_hash

    last = json.loads(lines[-1])
    last["outcome"] = "refused"
    last["hash"] = record_hash(last)
    with open(copy, "w") as fh:
        fh.write("\n".join([*lines[:-1], json.dumps(last)]) + "\n")
    assert _verify(c, "--file", copy)[0] == 0
    _fails(c, len(lines), "differs between etcd and", "--config", c.config, "--file", copy)


def _fails(c: Cluster, seq: int, words: str, *args: str) -> None:
    code, said = _verify(c, *args)
    assert code == 1, said
    assert len(said.splitlines()) == 1, said
    assert said.startswith(f"drctl: error [audit_chain_broken]: record {seq}: "), said
    assert words in said, said


async def _values(store: EtcdStore, keys: list[str]) -> dict[str, bytes]:
    out = {}
    for k in keys:
        v = (await store.snapshot(k)).value(k)
        assert v is not None
        out[k] = v
    return out


async def _delete(store: EtcdStore, key: str) -> None:
    entry = (await store.snapshot(key)).entries[key]
    assert await store.delete_if(key, entry.mod_revision)


def _self_signed(workdir: str) -> tuple[str, str]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "drctl api test")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = os.path.join(workdir, "api.pem"), os.path.join(workdir, "api.key")
    with open(cert_path, "wb") as fh:
        fh.write(cert.public_bytes(serialization.Encoding.PEM))
    with open(key_path, "wb") as fh:
        fh.write(key.private_bytes(serialization.Encoding.PEM,
                                   serialization.PrivateFormat.PKCS8,
                                   serialization.NoEncryption()))
    return cert_path, key_path


def test_https_and_where_plain_http_is_allowed(cluster: Cluster) -> None:
    c = cluster
    cert, key = _self_signed(c.workdir)
    port = free_port()
    base = ["api", "--config", c.config, "--users", c.users]
    os.chmod(key, 0o640)
    code, _, err = c.drctl(*base, "--tls-cert", cert, "--tls-key", key)
    assert code == 2 and "group or others may read the private key" in err, err
    code, _, err = c.drctl(*base, "--listen", f"127.0.0.1:{port}")
    assert code == 2 and "serves HTTPS" in err, err
    code, _, err = c.drctl(*base, "--insecure", "--listen", f"0.0.0.0:{port}")
    assert code == 2 and "only on a loopback address" in err, err
    os.chmod(key, 0o600)
    c.api_port = port
    api = Proc([*DRCTL, *base, "--tls-cert", cert, "--tls-key", key, "--listen",
                f"127.0.0.1:{port}"], os.path.join(c.workdir, "api-tls.log")).start()
    try:
        wait_port(port)
        ctx = ssl.create_default_context(cafile=cert)
        code, s = c.call("GET", "/api/v1/status", c.tokens["operator"], scheme="https",
                         context=ctx)
        assert code == 200 and s["user"]["name"] == "operator-1", s
        with pytest.raises(urllib.error.URLError):  # not trusted without the certificate
            c.call("GET", "/api/v1/status", c.tokens["operator"], scheme="https")
    finally:
        api.stop()
    assert "https://127.0.0.1" in api.log()
