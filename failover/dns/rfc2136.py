"""RFC 2136 dynamic updates signed with TSIG (dnspython), verified on every authoritative server.

A failover step rewrites a record set atomically on each update target (delete the RRset, add
the new values, in one signed UPDATE message), then polls every authoritative server until all
of them answer exactly the new values. A refused update (REFUSED, NOTAUTH, a bad signature or
an unknown key) stops the step with DnsUpdateRefused naming the server and the reason; servers
that never converge raise DnsVerifyTimeout naming each one and what it still answers.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass

import dns.asyncquery
import dns.exception
import dns.message
import dns.name
import dns.rcode
import dns.rdatatype
import dns.tsig
import dns.update

from failover.errors import DnsUpdateRefused, DnsVerifyTimeout, FailoverError

_ALGORITHMS = {
    "hmac-sha256": dns.tsig.HMAC_SHA256,
    "hmac-sha384": dns.tsig.HMAC_SHA384,
    "hmac-sha512": dns.tsig.HMAC_SHA512,
}
_KEY_RE = re.compile(r'key\s+"?([^"\s]+)"?\s*\{\s*algorithm\s+([\w-]+)\s*;\s*secret\s+"([^"]+)"',
                     re.S)


@dataclass(frozen=True)
class TsigKey:
    name: str
    secret: str  # base64
    algorithm: str = "hmac-sha256"

    def __post_init__(self) -> None:
        if self.algorithm not in _ALGORITHMS:
            raise FailoverError(f"TSIG key {self.name}: unsupported algorithm "
                                f"{self.algorithm!r} (use one of {', '.join(_ALGORITHMS)})")
        try:
            base64.b64decode(self.secret, validate=True)
        except binascii.Error as exc:
            raise FailoverError(f"TSIG key {self.name}: secret is not base64") from exc

    @classmethod
    def from_bind_file(cls, path: str) -> TsigKey:
        """A key file as written by tsig-keygen (key "name" { algorithm ...; secret "..."; };)."""
        try:
            with open(path, encoding="utf-8") as fh:
                text = fh.read()
        except OSError as exc:
            raise FailoverError(f"TSIG key file {path}: {exc.strerror}") from exc
        m = _KEY_RE.search(text)
        if not m:
            raise FailoverError(f"TSIG key file {path}: no 'key \"name\" {{ algorithm ...; "
                                f"secret \"...\"; }}' block found")
        return cls(m.group(1), m.group(3), m.group(2).lower())

    @classmethod
    def from_env(cls, name: str, variable: str, algorithm: str = "hmac-sha256") -> TsigKey:
        secret = os.environ.get(variable)
        if not secret:
            raise FailoverError(f"TSIG key {name}: environment variable {variable} is not set")
        return cls(name, secret, algorithm)

    def keyring(self) -> dns.tsig.Key:
        return dns.tsig.Key(self.name, self.secret, _ALGORITHMS[self.algorithm])


@dataclass(frozen=True)
class Server:
    host: str
    port: int = 53

    @classmethod
    def parse(cls, text: str, default_port: int = 53) -> Server:
        """HOST:PORT, or HOST alone with ``default_port``; ValueError if malformed."""
        if "://" in str(text):
            raise ValueError(f"invalid address {text!r}: expected HOST:PORT, without a "
                             "scheme")
        host, sep, port = str(text).rpartition(":")
        if not sep:
            host, port = str(text), str(default_port)
        if not host or not port.isdigit():
            raise ValueError(f"invalid address {text!r}")
        if not 0 < int(port) < 65536:
            raise ValueError(f"invalid address {text!r}: port {port} out of range")
        return cls(host, int(port))

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


@dataclass(frozen=True)
class RecordSet:
    zone: str
    name: str  # relative to the zone ("app") or absolute ("app.dr.test.")
    rtype: str
    ttl: int
    values: tuple[str, ...]

    @property
    def fqdn(self) -> dns.name.Name:
        return dns.name.from_text(self.name, origin=dns.name.from_text(self.zone))


class DnsUpdater:
    def __init__(self, key: TsigKey, timeout: float = 3.0) -> None:
        self.key = key
        self.timeout = timeout

    async def replace(self, rrset: RecordSet, targets: Sequence[Server]) -> None:
        """Atomically replace the record set on every update target."""
        for server in targets:
            await self._update_one(rrset, server)

    async def delete(self, rrset: RecordSet, targets: Sequence[Server]) -> None:
        """Remove the record set (idempotent) on every update target."""
        for server in targets:
            await self._update_one(rrset, server, delete=True)

    async def _update_one(self, rrset: RecordSet, server: Server, delete: bool = False) -> None:
        update = dns.update.UpdateMessage(rrset.zone, keyring=self.key.keyring())
        if delete:
            update.delete(rrset.fqdn, rrset.rtype)
        else:
            update.replace(rrset.fqdn, rrset.ttl, rrset.rtype, *rrset.values)
        try:
            response = await dns.asyncquery.tcp(update, server.host, port=server.port,
                                                timeout=self.timeout)
        except dns.tsig.PeerError as exc:  # BADSIG, BADKEY, BADTIME from the server
            raise DnsUpdateRefused(f"update of {rrset.fqdn} {rrset.rtype} refused by {server}: "
                                   f"TSIG {type(exc).__name__}") from exc
        except (dns.exception.Timeout, OSError) as exc:
            raise DnsUpdateRefused(f"update of {rrset.fqdn} {rrset.rtype}: {server} did not "
                                   f"answer ({exc})") from exc
        rcode = response.rcode()
        if rcode != dns.rcode.NOERROR:
            raise DnsUpdateRefused(f"update of {rrset.fqdn} {rrset.rtype} refused by {server}: "
                                   f"{dns.rcode.to_text(rcode)}")

    async def answers(self, rrset: RecordSet, server: Server) -> frozenset[str] | None:
        """What ``server`` answers for the record set (None if it did not answer)."""
        query = dns.message.make_query(rrset.fqdn, rrset.rtype)
        try:
            response = await dns.asyncquery.udp(query, server.host, port=server.port,
                                                timeout=self.timeout)
        except (dns.exception.Timeout, OSError):
            return None
        rtype = dns.rdatatype.from_text(rrset.rtype)
        for answer in response.answer:
            if answer.rdtype == rtype:
                return frozenset(r.to_text() for r in answer)
        return frozenset()

    async def verify(self, rrset: RecordSet, servers: Sequence[Server], deadline: float,
                     interval: float = 0.1) -> None:
        """Poll every server until all answer exactly ``rrset.values`` or ``deadline`` seconds
        pass."""
        want = frozenset(rrset.values)
        loop = asyncio.get_running_loop()
        until = loop.time() + deadline
        pending = list(servers)
        last: dict[Server, frozenset[str] | None] = {}
        while True:
            results = await asyncio.gather(*(self.answers(rrset, s) for s in pending))
            last = dict(zip(pending, results, strict=True))
            pending = [s for s, got in last.items() if got != want]
            if not pending:
                return
            if loop.time() >= until:
                detail = "; ".join(f"{s} answers {_show(last[s])}" for s in pending)
                raise DnsVerifyTimeout(f"{rrset.fqdn} {rrset.rtype} not {sorted(want)} after "
                                       f"{deadline}s: {detail}")
            await asyncio.sleep(interval)


def _show(got: frozenset[str] | None) -> str:
    return "nothing (no reply)" if got is None else str(sorted(got))
