"""The deployment CA, epoch tokens and the target's access policy, without processes."""

from __future__ import annotations

import base64
import datetime
import json
import os
import stat
import subprocess
import sys

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from drctl.epochtoken import PREFIX, Signer, TokenError, Verifier, parse
from drctl.pki import (
    Identity,
    KeyPermissionError,
    Layout,
    PkiError,
    identity_of,
    init,
    issue,
    load_cert,
    load_private_key,
)
from replicator.errors import UsageError
from replicator.transport.security import (
    FENCE,
    READ,
    WRITE,
    AccessPolicy,
    TlsConfig,
    is_loopback,
    require_loopback,
)

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture
def ca(tmp_path: object) -> str:
    d = str(tmp_path)
    init(d, "unit")
    return d


def test_init_and_issue_write_private_files_and_name_the_identity(ca: str) -> None:
    cert, key = issue(ca, Identity("site", "east"), ("127.0.0.1", "east.example"))
    op_cert, _ = issue(ca, Identity("operator", "alice"))
    lay = Layout(ca)
    for path in (lay.ca_cert, lay.ca_key, lay.epoch_key, lay.epoch_pub, cert, key, op_cert):
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600, path
    c = load_cert(cert)
    assert identity_of(c) == Identity("site", "east")
    assert c.subject.rfc4514_string().startswith("CN=east")
    assert identity_of(load_cert(op_cert)) == Identity("operator", "alice")
    tls = TlsConfig.from_dir(ca, Identity("site", "east"), need_epoch_keys=True)
    assert tls.identity == Identity("site", "east") and tls.epoch_keys is not None
    with pytest.raises(PkiError, match="exists"):
        issue(ca, Identity("site", "east"))
    with pytest.raises(PkiError, match="already holds a CA"):
        init(ca, "again")


def test_a_server_certificate_cannot_carry_a_sites_name(ca: str) -> None:
    """Replication clients check their target by the site's name: a server certificate (the
    API's) with that name could pose as the site."""
    issue(ca, Identity("site", "east"), ("127.0.0.1",))
    for name, hosts in (("east", ("api.example",)), ("api", ("api.example", "east"))):
        with pytest.raises(PkiError, match="east is a site's name"):
            issue(ca, Identity("server", name), hosts)
    cert, _ = issue(ca, Identity("server", "api"), ("api.example", "west"))
    assert identity_of(load_cert(cert)) == Identity("server", "api")
    with pytest.raises(PkiError, match="server certificate api already carries that name"):
        issue(ca, Identity("site", "west"))


def test_group_readable_keys_are_refused(ca: str) -> None:
    _, key = issue(ca, Identity("site", "east"))
    os.chmod(key, 0o640)
    with pytest.raises(KeyPermissionError, match="chmod 600"):
        load_private_key(key)
    with pytest.raises(KeyPermissionError):
        TlsConfig.from_dir(ca, Identity("site", "east"))
    p = subprocess.run([sys.executable, "-m", "drctl", "replicate", "serve", "--listen",
                        "127.0.0.1:1", "--dir", os.path.join(ca, "r"), "--tls-dir", ca,
                        "--site", "east"], capture_output=True, text=True, cwd=REPO,
                       timeout=60)
    assert p.returncode == 2
    assert p.stderr.strip().count("\n") == 0, p.stderr
    assert "accessible by group or others" in p.stderr


def test_a_certificate_from_another_ca_or_expired_is_refused_at_load(ca: str,
                                                                     tmp_path: object) -> None:
    other = os.path.join(str(tmp_path), "other")
    init(other, "other")
    issue(other, Identity("site", "east"))
    lay, rogue = Layout(ca), Layout(other)
    with pytest.raises(PkiError, match="not issued by this CA"):
        TlsConfig.from_files(lay.ca_cert, rogue.cert(Identity("site", "east")),
                             rogue.key(Identity("site", "east")), None)
    past = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=2)
    issue(ca, Identity("site", "old"), not_before=past,
          not_after=past + datetime.timedelta(days=1))
    with pytest.raises(PkiError, match="not valid now"):
        TlsConfig.from_dir(ca, Identity("site", "old"))
    # a CA rotation: ca.crt holds both CAs, certificates of either load
    bundle = os.path.join(str(tmp_path), "both.crt")
    with open(bundle, "wb") as fh:
        for path in (lay.ca_cert, rogue.ca_cert):
            with open(path, "rb") as part:
                fh.write(part.read())
    east = Identity("site", "east")
    assert TlsConfig.from_files(bundle, rogue.cert(east), rogue.key(east), None).identity == east
    issue(ca, Identity("site", "west"))
    with pytest.raises(PkiError, match="is for site west"):
        TlsConfig.from_files(lay.ca_cert, lay.cert(Identity("site", "west")),
                             lay.key(Identity("site", "west")), None, Identity("site", "east"))


def test_epoch_tokens_verify_only_untampered_and_from_known_keys(ca: str) -> None:
    signer = Signer.load(Layout(ca).epoch_key)
    verifier = Verifier.load(Layout(ca).epoch_pub)
    text = signer.sign("app", ["data", "log"], "west", 7, now=1000.0)
    t = verifier.verify(text)
    assert (t.service, t.volumes, t.site, t.epoch) == ("app", ("data", "log"), "west", 7)
    assert t.grants("west", "log", 7)
    assert not t.grants("east", "log", 7)
    assert not t.grants("west", "other", 7)
    assert not t.grants("west", "log", 8)
    assert signer.current(text, "app", ["log", "data"], "west", 7)
    assert not signer.current(text, "app", ["data", "log"], "west", 8)

    payload_b64, sig = text[len(PREFIX):].split(".")
    body = json.loads(base64.urlsafe_b64decode(payload_b64 + "=" * (-len(payload_b64) % 4)))
    body["site"] = "east"
    forged = base64.urlsafe_b64encode(json.dumps(body, sort_keys=True,
                                                 separators=(",", ":")).encode())
    with pytest.raises(TokenError) as exc:
        verifier.verify(f"{PREFIX}{forged.rstrip(b'=').decode()}.{sig}")
    assert exc.value.reason == "bad_signature"

    rogue = Signer(ed25519.Ed25519PrivateKey.generate())
    with pytest.raises(TokenError) as exc:
        verifier.verify(rogue.sign("app", ["data"], "west", 7))
    assert exc.value.reason == "unknown_key"
    for junk in ("", "nonsense", PREFIX + "x", PREFIX + "e30.AAAA"):
        with pytest.raises(TokenError):
            verifier.verify(junk)
    # a rotation: a verifier that holds both keys accepts both
    both = Verifier([signer.key.public_key(), rogue.key.public_key()])
    assert both.verify(rogue.sign("app", ["data"], "west", 8)).epoch == 8
    assert both.verify(text).epoch == 7
    assert parse(text).key_id == signer.key_id


def test_access_policy() -> None:
    p = AccessPolicy.parse("west", ["east=data,log", "north", "operator:alice"])
    east, north, west = (Identity("site", s) for s in ("east", "north", "west"))
    alice, bob = Identity("operator", "alice"), Identity("operator", "bob")
    assert p.allows(east, WRITE, "data") and p.allows(east, FENCE, "log")
    assert not p.allows(east, WRITE, "other")
    assert p.allows(north, WRITE, "anything")
    assert not p.allows(west, WRITE, "data")
    assert p.allows(west, FENCE, "data")  # its own target: the local promotion
    assert not p.allows(west, READ, "data")
    assert p.allows(alice, READ, "data") and not p.allows(alice, WRITE, "data")
    assert not p.allows(alice, FENCE, "data")
    assert not p.allows(bob, READ, "data")
    assert AccessPolicy.parse("w", ["operator:*"]).allows(bob, READ, "x")
    for bad in ("=x", "east=", "operator:"):
        with pytest.raises(UsageError):
            AccessPolicy.parse("w", [bad])


def test_plaintext_only_on_loopback() -> None:
    for host in ("127.0.0.1", "127.3.2.1", "::1", "[::1]", "localhost"):
        assert is_loopback(host), host
    for host in ("0.0.0.0", "10.0.0.1", "standby", "::"):
        assert not is_loopback(host), host
    require_loopback("127.0.0.1:7400", "target")
    require_loopback("[::1]:7400", "target")
    with pytest.raises(UsageError, match="loopback"):
        require_loopback("0.0.0.0:7400", "listen address")
    with pytest.raises(UsageError, match="loopback"):
        require_loopback("standby:7400", "target")


def test_tls_environment_is_read_whole_or_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """$DRCTL_TLS_DIR and $DRCTL_TLS_AS go together, and the latter is site/NAME or
    operator/NAME: a drill the API starts (or a command given neither flag) says so at once
    instead of reading a certificate path made of a typo, or going plaintext."""
    from drctl.pki import PkiError
    from replicator.transport.security import ChannelSecurity

    monkeypatch.delenv("DRCTL_TLS_DIR", raising=False)
    monkeypatch.setenv("DRCTL_TLS_AS", "operator/api")
    with pytest.raises(PkiError, match=r"\$DRCTL_TLS_AS is set but \$DRCTL_TLS_DIR"):
        ChannelSecurity.from_env()
    monkeypatch.setenv("DRCTL_TLS_DIR", "/nonexistent")
    for bad in ("api", "user/api", "operator/api/x", " operator/api", "operator/"):
        monkeypatch.setenv("DRCTL_TLS_AS", bad)
        with pytest.raises(PkiError, match="expected site/NAME or operator/NAME"):
            ChannelSecurity.from_env()
