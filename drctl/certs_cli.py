"""`drctl certs init|issue|show`: a deployment's private CA, site and operator certificates,
the controllers' epoch-token key (drctl/pki.py; docs/security.md)."""

from __future__ import annotations

import argparse
import datetime
import os
import stat
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")

# drctl/pki.py (and cryptography) is imported by the commands, not by every drctl start-up
CA_DAYS = 3650
CERT_DAYS = 397
AUDIT_FILE = "audit.jsonl"  # the CA's own audit chain, in its directory


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    c = sub.add_parser("certs", help="a deployment's CA, site and operator certificates")
    csub = c.add_subparsers(dest="certs_cmd", required=True, metavar="COMMAND")

    i = csub.add_parser("init", help="create a deployment's CA and epoch-token signing key")
    i.add_argument("--dir", required=True, help="the deployment directory")
    i.add_argument("--deployment", default="drctl", metavar="NAME",
                   help="the deployment's name (in every certificate's OU)")
    i.add_argument("--days", type=int, default=CA_DAYS, help="the CA's validity")
    i.add_argument("--force", action="store_true", help="replace an existing CA")
    _add_audit_args(i)
    i.set_defaults(func=cmd_init)

    s = csub.add_parser("issue", help="a certificate and key for a site or an operator")
    s.add_argument("--dir", required=True, help="the deployment directory (holding ca.key)")
    who = s.add_mutually_exclusive_group(required=True)
    who.add_argument("--site", metavar="NAME")
    who.add_argument("--operator", metavar="NAME")
    who.add_argument("--server", metavar="NAME",
                     help="an HTTPS server certificate (the API's: drctl api --tls-cert)")
    s.add_argument("--host", action="append", default=[], metavar="NAME|ADDRESS",
                   help="sites and servers: another name or address it is reached by "
                   "(repeatable)")
    s.add_argument("--days", type=int, default=CERT_DAYS)
    s.add_argument("--force", action="store_true", help="replace an existing certificate")
    _add_audit_args(s)
    s.set_defaults(func=cmd_issue)

    w = csub.add_parser("show", help="describe a certificate, a key or an epoch token")
    w.add_argument("file")
    w.set_defaults(func=cmd_show)


def _add_audit_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="RUNBOOK",
                   help="also append the record to this deployment's audit log in etcd "
                   "(always: DIR/audit.jsonl, the CA's own log)")
    p.add_argument("--audit-file", help="the etcd log's local mirror (see drctl audit)")


def _deployment_log(args: argparse.Namespace) -> Any:
    """With --config: the deployment's configuration, read before the CA is touched (a bad
    --config must not leave a replaced CA behind an error)."""
    if not args.config:
        return None
    from failover.cli import load_config

    return load_config(args.config)


def _audit(args: argparse.Namespace, cfg: Any, action: str, target: str,
           params: dict[str, object], outcome: str = "ok") -> None:
    """Record a CA operation: always in the CA directory's own chain (DIR/audit.jsonl, which
    `drctl audit verify --file` checks; the CA is usually offline), and with --config in the
    deployment's chain in etcd too."""
    from drctl.pki import PkiError
    from failover.audit import AuditNotRecordedError, append_file
    from failover.cli import cli_actor, record_audit

    actor = cli_actor()
    local = os.path.join(args.dir, AUDIT_FILE)
    try:
        append_file(local, actor, action, target, params, outcome)
    except OSError as exc:
        raise PkiError(f"{action} {target}: done, but not recorded in {local}: "
                       f"{exc.strerror}") from None
    if cfg is not None and record_audit(cfg, actor, action, target, params, outcome,
                                        args.audit_file) is None:
        raise AuditNotRecordedError(f"{action} {target}: done, but not recorded in the etcd "
                                    f"audit log (see the line above); it is in {local}")


def _pki_io(what: str, fn: Callable[[], T]) -> T:
    """Run a CA operation; an OS error (a path that is not a directory, no permission) is one
    line naming the path, not a traceback."""
    from drctl.pki import PkiError

    try:
        return fn()
    except OSError as exc:
        raise PkiError(f"{exc.filename or what}: {exc.strerror}") from None


def cmd_init(args: argparse.Namespace) -> int:
    from drctl.pki import PkiError, init

    if args.days <= 0:
        raise PkiError("--days must be positive")
    if os.path.lexists(args.dir) and not os.path.isdir(args.dir):
        raise PkiError(f"--dir {args.dir}: not a directory")
    cfg = _deployment_log(args)
    lay = _pki_io(f"--dir {args.dir}",
                  lambda: init(args.dir, args.deployment, args.days, args.force))
    _audit(args, cfg, "certs.init", args.deployment,
           {"days": args.days, "replaced": bool(args.force), "ca": _cert_facts(lay.ca_cert)})
    print(f"deployment {args.deployment}: CA {lay.ca_cert}, epoch-token key {lay.epoch_key}\n"
          f"keep {lay.ca_key} offline; give every host {lay.ca_cert} and {lay.epoch_pub}, "
          "the controllers also epoch.key")
    return 0


def cmd_issue(args: argparse.Namespace) -> int:
    from drctl.pki import Identity, PkiError, issue

    if args.days <= 0:
        raise PkiError("--days must be positive")
    who = (Identity("site", args.site) if args.site else
           Identity("server", args.server) if args.server else
           Identity("operator", args.operator))
    if not os.path.exists(os.path.join(args.dir, "ca.key")):
        raise PkiError(f"--dir {args.dir}: no CA there (no ca.key): make one with drctl certs "
                       f"init --dir {args.dir}, or give the directory that holds it")
    cfg = _deployment_log(args)
    cert, key = _pki_io(f"--dir {args.dir}",
                        lambda: issue(args.dir, who, tuple(args.host), args.days, args.force))
    _audit(args, cfg, "certs.issue", str(who),
           {"hosts": list(args.host), "days": args.days, "replaced": bool(args.force),
            "certificate": _cert_facts(cert)})
    print(f"{who}: certificate {cert}, key {key} ({who.uri})")
    return 0


def _cert_facts(path: str) -> dict[str, object]:
    from drctl.pki import fingerprint, load_cert

    cert = load_cert(path)
    return {"path": path, "serial": format(cert.serial_number, "x"),
            "sha256": fingerprint(cert),
            "not_after": cert.not_valid_after_utc.isoformat(timespec="seconds")}


def cmd_show(args: argparse.Namespace) -> int:
    print("\n".join(describe(args.file)))
    return 0


def describe(path: str) -> list[str]:
    """A certificate, a private key, public keys or an epoch token, in words."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    from drctl.epochtoken import TokenError, key_id, parse
    from drctl.pki import PkiError, load_private_key, read_file

    data = read_file(path, "file")
    if b"BEGIN CERTIFICATE" in data:
        try:
            return _describe_cert(path, x509.load_pem_x509_certificate(data))
        except ValueError as exc:
            raise PkiError(f"{path}: not a PEM certificate ({exc})") from None
    if b"PRIVATE KEY" in data:
        key = load_private_key(path)
        return [f"{path}: private key ({_key_type(key.public_key())}), mode "
                f"{stat.S_IMODE(os.stat(path).st_mode):04o}"]
    if b"BEGIN PUBLIC KEY" in data:
        marker = b"-----BEGIN PUBLIC KEY-----"
        out = []
        for part in data.split(marker)[1:]:
            k = serialization.load_pem_public_key(marker + part)
            kid = f", epoch key id {key_id(k)}" if isinstance(k, ed25519.Ed25519PublicKey) \
                else ""
            out.append(f"{path}: public key {_key_type(k)}{kid}")
        return out
    try:
        token = parse(data.decode().strip())
    except (TokenError, UnicodeDecodeError) as exc:
        raise PkiError(f"{path}: not a certificate, a key or an epoch token ({exc})") from None
    issued = datetime.datetime.fromtimestamp(token.issued_at, datetime.UTC)
    return [f"{path}: epoch token (signature not checked here)",
            f"  service {token.service}, volumes {', '.join(token.volumes) or '-'}",
            f"  site {token.site} is the primary at epoch {token.epoch}",
            f"  issued {issued:%Y-%m-%d %H:%M:%S} UTC, key id {token.key_id}"]


def _key_type(key: object) -> str:
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519

    if isinstance(key, ec.EllipticCurvePublicKey):
        return f"ECDSA {key.curve.name}"
    if isinstance(key, ed25519.Ed25519PublicKey):
        return "Ed25519"
    return type(key).__name__


def _describe_cert(path: str, cert: object) -> list[str]:
    from cryptography import x509

    from drctl.pki import PkiError, fingerprint, identity_of, load_cert, verify_issued

    assert isinstance(cert, x509.Certificate)
    who = identity_of(cert)
    try:
        alt = [str(v.value) for v in
               cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value]
    except x509.ExtensionNotFound:
        alt = []
    try:
        is_ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        is_ca = False
    now = datetime.datetime.now(datetime.UTC)
    if now < cert.not_valid_before_utc:
        validity = "NOT YET VALID"
    elif now > cert.not_valid_after_utc:
        validity = "EXPIRED"
    else:
        validity = f"valid, {(cert.not_valid_after_utc - now).days} days left"
    lines = [f"{path}: {'CA certificate' if is_ca else 'certificate'}"
             + (f" for {who}" if who else ""),
             f"  subject  {cert.subject.rfc4514_string()}",
             f"  issuer   {cert.issuer.rfc4514_string()}"]
    if alt:
        lines.append(f"  names    {', '.join(alt)}")
    lines += [f"  valid    {cert.not_valid_before_utc:%Y-%m-%d %H:%M} .. "
              f"{cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC ({validity})",
              f"  key      {_key_type(cert.public_key())}",
              f"  sha256   {fingerprint(cert)}"]
    ca_path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(path))), "ca.crt")
    if not is_ca and os.path.exists(ca_path):
        try:
            verify_issued(cert, load_cert(ca_path))
            lines.append(f"  chain    issued by {ca_path}")
        except PkiError as exc:
            lines.append(f"  chain    {ca_path}: {exc}")
    return lines
