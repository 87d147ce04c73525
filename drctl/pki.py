"""A deployment's private certificate authority (`drctl certs`), with `cryptography`.

One directory per deployment (``drctl certs init --dir D``); what each host needs is a copy of
the public files and its own certificate and key, in the same layout:

  D/deployment.json          the deployment's name and the CA's fingerprint
  D/ca.crt                   the CA certificate (ECDSA P-256): every process trusts it
  D/ca.key                   the CA key: only `drctl certs issue` needs it (keep it offline)
  D/epoch.pub                the controllers' epoch-token verification key(s) (Ed25519, PEM;
                             several keys concatenated while a key is rotated)
  D/epoch.key                the controllers' epoch-token signing key (controllers only)
  D/sites/NAME.crt, .key     a site's certificate: CN=NAME, SAN URI drctl://site/NAME and
                             DNS:NAME (+ --host names/addresses); server and client auth
  D/operators/NAME.crt, .key an operator's certificate: CN=NAME, SAN URI
                             drctl://operator/NAME; client auth only

Every file is written with mode 0600 (the public ones too: chmod them if you publish them).
A private key that is readable by the group or by others is refused when loaded.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import stat
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from drctl.files import atomic_write

URI_SCHEME = "drctl"
KINDS = ("site", "operator", "server")  # server: HTTPS only (the API), no client auth
CA_DAYS = 3650
CERT_DAYS = 397


class PkiError(Exception):
    """A certificate or key that cannot be used (missing, unreadable, unsafe, wrong kind).

    Carries ``code`` and ``exit_code`` like the packages' own errors, so the CLI prints it
    as one line."""

    code = "pki"
    exit_code = 2

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class KeyPermissionError(PkiError):
    code = "key_permissions"


@dataclass(frozen=True)
class Identity:
    """Who a certificate names: ``kind`` site, operator or server (HTTPS, e.g. the API's), and
    the name."""

    kind: str
    name: str

    @property
    def uri(self) -> str:
        return f"{URI_SCHEME}://{self.kind}/{self.name}"

    def __str__(self) -> str:
        return f"{self.kind} {self.name}"


def check_name(name: str) -> str:
    if not name or len(name) > 64 or not all(c.isalnum() or c in "-_." for c in name) \
            or name[0] in "-.":
        raise PkiError(f"invalid name {name!r}: letters, digits, '-', '_', '.' (at most 64)")
    return name


# -- files -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Layout:
    """Where a deployment directory keeps what."""

    root: str

    @property
    def ca_cert(self) -> str:
        return os.path.join(self.root, "ca.crt")

    @property
    def ca_key(self) -> str:
        return os.path.join(self.root, "ca.key")

    @property
    def epoch_pub(self) -> str:
        return os.path.join(self.root, "epoch.pub")

    @property
    def epoch_key(self) -> str:
        return os.path.join(self.root, "epoch.key")

    @property
    def info(self) -> str:
        return os.path.join(self.root, "deployment.json")

    def cert(self, who: Identity) -> str:
        return os.path.join(self.root, f"{who.kind}s", f"{who.name}.crt")

    def key(self, who: Identity) -> str:
        return os.path.join(self.root, f"{who.kind}s", f"{who.name}.key")

    def names(self, kind: str) -> list[str]:
        """The names that have a certificate of ``kind`` here."""
        try:
            files = os.listdir(os.path.join(self.root, f"{kind}s"))
        except OSError:
            return []
        return sorted(f[: -len(".crt")] for f in files if f.endswith(".crt"))

    def check_issued(self, who: Identity) -> None:
        """Refuse a name without a certificate here, naming those that have one."""
        if os.path.exists(self.cert(who)):
            return
        names = self.names(who.kind)
        raise PkiError(f"{self.root} has no certificate for {who}: "
                       + (f"its {who.kind}s are {', '.join(names)}" if names else
                          f"it has no {who.kind} certificates (drctl certs issue --{who.kind} "
                          "NAME)"))


def write_private(path: str, data: bytes, overwrite: bool = False) -> None:
    """Write ``data`` to ``path`` with mode 0600 (whatever the umask), via a temporary file."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    if os.path.exists(path) and not overwrite:
        raise PkiError(f"{path} exists (--force replaces it)")
    atomic_write(path, data, 0o600)


def check_key_file(path: str) -> None:
    """Refuse a private key file that others could read."""
    try:
        st = os.stat(path)
    except OSError as exc:
        raise PkiError(f"cannot read key {path}: {exc.strerror}") from None
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise KeyPermissionError(
            f"key {path} is accessible by group or others (mode "
            f"{stat.S_IMODE(st.st_mode):04o}): refused; chmod 600 {path}")


def read_file(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as fh:
            return fh.read()
    except OSError as exc:
        raise PkiError(f"cannot read {what} {path}: {exc.strerror}") from None


def read_key_pem(path: str) -> bytes:
    """A private key file's PEM bytes, after the permission check."""
    check_key_file(path)
    return read_file(path, "key")


def load_private_key(path: str) -> Any:
    data = read_key_pem(path)
    try:
        return serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise PkiError(f"{path}: not a PEM private key ({exc})") from None


def load_cert(path: str) -> x509.Certificate:
    data = read_file(path, "certificate")
    try:
        return x509.load_pem_x509_certificate(data)
    except ValueError as exc:
        raise PkiError(f"{path}: not a PEM certificate ({exc})") from None


def _pem_key(key: Any) -> bytes:
    out: bytes = key.private_bytes(serialization.Encoding.PEM,
                                   serialization.PrivateFormat.PKCS8,
                                   serialization.NoEncryption())
    return out


def _pem_cert(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def fingerprint(cert: x509.Certificate) -> str:
    return cert.fingerprint(hashes.SHA256()).hex()


# -- the CA ----------------------------------------------------------------------------------


def _dns_names(path: str) -> set[str]:
    try:
        cert = load_cert(path)
        return set(cert.extensions.get_extension_for_class(
            x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName))
    except (PkiError, x509.ExtensionNotFound):
        return set()


def _no_site_impersonation(lay: Layout, who: Identity, hosts: tuple[str, ...]) -> None:
    """A replication client checks its target by the site's name (a DNS name in the site's
    certificate): no server certificate (the API's, the controller's metrics') may carry a
    site's name, or its key could pose as that site's target or export."""
    def stems(kind: str) -> list[str]:
        d = os.path.join(lay.root, f"{kind}s")
        return sorted(f[:-4] for f in os.listdir(d) if f.endswith(".crt")) \
            if os.path.isdir(d) else []

    if who.kind == "server":
        taken = {who.name, *hosts} & set(stems("site"))
        if taken:
            raise PkiError(f"server {who.name}: {', '.join(sorted(taken))} is a site's name: a "
                           "server certificate with it could pose as that site (choose "
                           "another name or --host)")
    elif who.kind == "site":
        for server in stems("server"):
            if who.name in _dns_names(os.path.join(lay.root, "servers", f"{server}.crt")):
                raise PkiError(f"site {who.name}: the server certificate {server} already "
                               "carries that name (it could pose as the site): issue the "
                               "server's again under another name first")


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def init(directory: str, deployment: str = "drctl", days: int = CA_DAYS,
         force: bool = False) -> Layout:
    """A new CA and epoch-signing key for a deployment."""
    check_name(deployment)
    lay = Layout(directory)
    if os.path.exists(lay.ca_key) and not force:
        raise PkiError(f"{directory} already holds a CA ({lay.ca_key}); --force replaces it "
                       "(every certificate it issued stops being trusted)")
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "drctl"),
                      x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, deployment),
                      x509.NameAttribute(NameOID.COMMON_NAME, f"drctl CA {deployment}")])
    now = _now()
    cert = (x509.CertificateBuilder()
            .subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False,
                                         key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, key_cert_sign=True,
                                         crl_sign=True, encipher_only=False,
                                         decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                           critical=False)
            .sign(key, hashes.SHA256()))
    write_private(lay.ca_key, _pem_key(key), overwrite=force)
    write_private(lay.ca_cert, _pem_cert(cert), overwrite=True)
    signing = ed25519.Ed25519PrivateKey.generate()
    write_private(lay.epoch_key, _pem_key(signing), overwrite=True)
    write_private(lay.epoch_pub, public_pem(signing.public_key()), overwrite=True)
    info = {"deployment": deployment, "ca_sha256": fingerprint(cert),
            "created": now.isoformat(timespec="seconds")}
    write_private(lay.info, (json.dumps(info, indent=1) + "\n").encode(), overwrite=True)
    return lay


def public_pem(key: ed25519.Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.PEM,
                            serialization.PublicFormat.SubjectPublicKeyInfo)


def deployment_name(lay: Layout) -> str:
    try:
        with open(lay.info, encoding="utf-8") as fh:
            return str(json.load(fh)["deployment"])
    except (OSError, ValueError, KeyError):
        return "drctl"


def issue(directory: str, who: Identity, hosts: tuple[str, ...] = (), days: int = CERT_DAYS,
          force: bool = False, not_before: datetime.datetime | None = None,
          not_after: datetime.datetime | None = None) -> tuple[str, str]:
    """A certificate and key for a site or an operator, signed by the deployment's CA;
    returns their paths. ``not_before``/``not_after`` override the validity (tests)."""
    if who.kind not in KINDS:
        raise PkiError(f"unknown kind {who.kind!r}")
    check_name(who.name)
    lay = Layout(directory)
    ca_key = load_private_key(lay.ca_key)
    ca_cert = load_cert(lay.ca_cert)
    cert_path, key_path = lay.cert(who), lay.key(who)
    if os.path.exists(cert_path) and not force:
        raise PkiError(f"{cert_path} exists (--force issues a new one in its place)")
    _no_site_impersonation(lay, who, hosts)
    key = ec.generate_private_key(ec.SECP256R1())
    names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(who.uri)]
    usages = [ExtendedKeyUsageOID.CLIENT_AUTH]
    if who.kind == "server" and not hosts:
        raise PkiError("a server certificate needs --host (the names and addresses it serves)")
    if who.kind in ("site", "server"):
        usages.insert(0, ExtendedKeyUsageOID.SERVER_AUTH)
        if who.kind == "server":
            usages.remove(ExtendedKeyUsageOID.CLIENT_AUTH)
        names.append(x509.DNSName(who.name))
        for h in hosts:
            try:
                names.append(x509.IPAddress(ipaddress.ip_address(h)))
            except ValueError:
                names.append(x509.DNSName(h))
    elif hosts:
        raise PkiError("--host is for site certificates (operators are clients only)")
    now = _now()
    subject = x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "drctl"),
        x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME,
                           f"{deployment_name(lay)} {who.kind}"),
        x509.NameAttribute(NameOID.COMMON_NAME, who.name)])
    cert = (x509.CertificateBuilder()
            .subject_name(subject).issuer_name(ca_cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before or now - datetime.timedelta(minutes=5))
            .not_valid_after(not_after or now + datetime.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False,
                                         key_encipherment=False, data_encipherment=False,
                                         key_agreement=True, key_cert_sign=False,
                                         crl_sign=False, encipher_only=False,
                                         decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                ca_cert.public_key()), critical=False)  # type: ignore[arg-type]
            .sign(ca_key, hashes.SHA256()))
    write_private(key_path, _pem_key(key), overwrite=True)
    write_private(cert_path, _pem_cert(cert), overwrite=True)
    return cert_path, key_path


def identity_of(cert: x509.Certificate) -> Identity | None:
    """The drctl identity a certificate names (its drctl:// SAN URI), if it names one."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return None
    for uri in san.get_values_for_type(x509.UniformResourceIdentifier):
        prefix = f"{URI_SCHEME}://"
        if not uri.startswith(prefix):
            continue
        kind, _, name = uri[len(prefix):].partition("/")
        if kind in KINDS and name and "/" not in name:
            return Identity(kind, name)
    return None


def verify_issued(cert: x509.Certificate, ca: x509.Certificate) -> None:
    """Is ``cert`` signed by ``ca`` and valid now? (TLS checks this on every connection;
    this is for `certs show` and start-up checks.)"""
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature) as exc:
        raise PkiError(f"not issued by this CA ({exc or 'bad signature'})") from None
    now = _now()
    if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
        raise PkiError(f"not valid now (valid {cert.not_valid_before_utc:%Y-%m-%d %H:%M} .. "
                       f"{cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC)")
