"""Who drctl is to etcd and whom it trusts: a user and password, and TLS files.

The configuration's ``etcd:`` is either a list of HOST:PORT (no authentication, plain gRPC)
or a mapping::

    etcd:
      endpoints: [10.0.0.5:2379, 10.0.0.6:2379]
      user: drctl
      password_file: /etc/drctl/etcd.password     # mode 0600 (or stricter); or password_env: VAR
      ca: /etc/drctl/etcd-ca.pem                  # trust only this CA for etcd's certificate
      cert: /etc/drctl/etcd-client.pem            # a client certificate (--client-cert-auth)
      key: /etc/drctl/etcd-client.key             # mode 0600 (or stricter)

Any of ``ca``/``cert``/``key`` turns TLS on (without ``ca``: the system's trusted roots).
The password is never written in the configuration itself: it is read from a file that only
its owner can read (checked on every read: a file the group or others can read is refused, as
is such a client key) or from an environment variable. Both loaders (failover/config.py,
runbooks/loader.py) parse the mapping with ``parse``; ``resolved`` reads the secrets and the
TLS files (at load time and again when a store is built). Standard library only: the loaders
import it.
"""

from __future__ import annotations

import ipaddress
import os
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from failover.errors import FailoverError

FIELDS = ("endpoints", "user", "password_file", "password_env", "ca", "cert", "key")


class CredentialsError(FailoverError, ValueError):
    """The etcd credentials in the configuration cannot be used (a missing or readable-by-
    others password file, an unset variable, an unreadable certificate). ``field`` names the
    offending key of ``etcd:``."""

    code = "etcd_credentials"
    http_status = 500
    exit_code = 2

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


@dataclass(frozen=True)
class EtcdCredentials:
    user: str | None = None
    password_file: str | None = None
    password_env: str | None = None
    ca: str | None = None
    cert: str | None = None
    key: str | None = None
    # Filled in by resolved(): the secret and the PEM bytes gRPC wants (never printed)
    password: str | None = field(default=None, repr=False, compare=False)
    ca_pem: bytes | None = field(default=None, repr=False, compare=False)
    cert_pem: bytes | None = field(default=None, repr=False, compare=False)
    key_pem: bytes | None = field(default=None, repr=False, compare=False)
    is_resolved: bool = field(default=False, repr=False, compare=False)

    @property
    def tls(self) -> bool:
        return bool(self.ca or self.cert or self.key)

    @property
    def anonymous(self) -> bool:
        return self.user is None and not self.tls

    def problems(self) -> list[tuple[str, str]]:
        """The rules between fields (no I/O): ``(field, message)`` for each one broken."""
        out: list[tuple[str, str]] = []
        has_password = self.password_file is not None or self.password_env is not None
        if self.user is None and has_password:
            out.append(("user", "a password_file:/password_env: needs a user:"))
        elif self.user is not None and (self.password_file is None) == (
                self.password_env is None):
            out.append(("user", "give exactly one of password_file: or password_env: (never "
                                "the password itself)"))
        if (self.cert is None) != (self.key is None):
            out.append(("cert" if self.cert is None else "key",
                        "cert: and key: come together (a client certificate and its key)"))
        return out

    def check_endpoints(self, hosts: list[str]) -> None:
        """A password over plain gRPC crosses the network in clear: refused unless every
        endpoint is on this host (loopback)."""
        if self.user is not None and not self.tls and not all(map(_loopback, hosts)):
            raise CredentialsError("user", "a password without TLS would cross the network in "
                                           "clear: give ca: (etcd's CA) too")

    def resolved(self) -> EtcdCredentials:
        """A copy holding the password and the PEM files, read now. Raises CredentialsError
        naming the field (a password file readable by others is refused: chmod 600 it)."""
        for fld, message in self.problems():
            raise CredentialsError(fld, message)
        password = None
        if self.password_file is not None:
            password = _read_password_file(self.password_file)
        elif self.password_env is not None:
            password = os.environ.get(self.password_env)
            if not password:
                raise CredentialsError("password_env", f"environment variable "
                                                       f"{self.password_env} is not set")
        return replace(self, password=password, ca_pem=_pem("ca", self.ca, True),
                       cert_pem=_pem("cert", self.cert, True),
                       key_pem=_pem("key", self.key, False), is_resolved=True)


def _host(endpoint: str) -> str:
    host, sep, _ = endpoint.rpartition(":")
    return host if sep else endpoint


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _read_private(fld: str, path: str) -> bytes:
    """A secret file's bytes, refused if its group or others may read or write it."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as exc:
        raise CredentialsError(fld, f"{path}: {exc.strerror}") from None
    with os.fdopen(fd, "rb") as fh:
        mode = stat.S_IMODE(os.fstat(fh.fileno()).st_mode)
        if mode & 0o077:
            raise CredentialsError(fld, f"{path} has mode {mode:04o}: group or others can "
                                        f"read it, refused (chmod 600 {path})")
        return fh.read()


def _read_password_file(path: str) -> str:
    text = _read_private("password_file", path).decode("utf-8", "replace").rstrip("\r\n")
    if not text:
        raise CredentialsError("password_file", f"{path} is empty")
    return text


def _pem(fld: str, path: str | None, certificate: bool) -> bytes | None:
    if path is None:
        return None
    if not certificate:
        data = _read_private(fld, path)
    else:
        try:
            with open(path, "rb") as fh:
                data = fh.read()
        except OSError as exc:
            raise CredentialsError(fld, f"{path}: {exc.strerror}") from None
    marker = b"-----BEGIN CERTIFICATE-----" if certificate else b"PRIVATE KEY-----"
    if marker not in data:
        what = "a PEM certificate" if certificate else "a PEM private key"
        raise CredentialsError(fld, f"{path} is not {what}")
    return data


def parse(value: Any) -> tuple[list[Any], EtcdCredentials, list[tuple[str | None, str]]]:
    """The ``etcd:`` value as ``(endpoints, credentials, problems)``: a list is endpoints
    alone; a mapping has the keys of FIELDS. Endpoints are returned as given (each loader
    parses HOST:PORT its own way); a problem is ``(key or None, message)``."""
    if isinstance(value, list):
        return value, EtcdCredentials(), []
    if not isinstance(value, Mapping):
        return [], EtcdCredentials(), [(None, "expected a list of HOST:PORT or a mapping with "
                                              "endpoints: (and user:, password_file:, ca:...)")]
    problems: list[tuple[str | None, str]] = []
    for key in value:
        if key == "password":
            problems.append((key, "inline passwords are not allowed: give password_file: (a "
                                  "file of mode 0600) or password_env: (a variable)"))
        elif key not in FIELDS:
            problems.append((str(key), f"unknown key (allowed: {', '.join(sorted(FIELDS))})"))
    endpoints = value.get("endpoints")
    if not isinstance(endpoints, list) or not endpoints:
        problems.append(("endpoints" if "endpoints" in value else None,
                         "expected a non-empty list of HOST:PORT under endpoints:"))
        endpoints = []
    strings: dict[str, str | None] = {}
    for key in FIELDS[1:]:
        v = value.get(key)
        if v is not None and (not isinstance(v, str) or not v):
            problems.append((key, f"expected a non-empty string, got {v!r}"))
            v = None
        strings[key] = v
    creds = EtcdCredentials(strings["user"], strings["password_file"], strings["password_env"],
                            strings["ca"], strings["cert"], strings["key"])
    problems += creds.problems()
    try:
        creds.check_endpoints([_host(str(e)) for e in endpoints])
    except CredentialsError as exc:
        problems.append((exc.field, str(exc)))
    return endpoints, creds, problems
