"""Epoch tokens: the failover controller's signed word that a site may write a service's
volumes at an epoch. Shared by ``failover`` (the leading controller signs, the service record
carries the token) and ``replicator`` (a target raises a replica's epoch only on a valid one).

Format (ASCII, one line)::

    drctl-epoch.v1.<payload>.<signature>

``payload`` is base64url (no padding) of compact JSON with sorted keys
``{"epoch", "issued_at", "kid", "service", "site", "volumes"}``; ``signature`` is base64url of
the Ed25519 signature over the ASCII bytes ``drctl-epoch.v1.<payload>``. ``kid`` is the first
16 hex digits of SHA-256 over the raw public key, so a verifier holding several keys (a
rotation) knows which one to use.

A token does not expire: what it grants ends when a higher epoch is granted (a replica never
goes back to an older epoch). It is not a bearer credential either: a target honours it only
from a caller whose certificate names the token's site.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import time
from collections.abc import Iterable
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from drctl.pki import PkiError, load_private_key, read_file

PREFIX = "drctl-epoch.v1."
MAX_LENGTH = 8192


class TokenError(Exception):
    """A token that grants nothing; ``reason`` is a stable code (malformed, unknown_key,
    bad_signature)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class EpochToken:
    service: str
    volumes: tuple[str, ...]
    site: str  # the site the service's primary is at this epoch
    epoch: int
    issued_at: float
    key_id: str

    def grants(self, site: str, volume: str, epoch: int) -> bool:
        return self.site == site and volume in self.volumes and self.epoch == epoch


def key_id(key: ed25519.Ed25519PublicKey) -> str:
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _split(text: str) -> tuple[str, bytes, bytes]:
    if len(text) > MAX_LENGTH or not text.startswith(PREFIX):
        raise TokenError("malformed", "not a drctl epoch token")
    payload_b64, sep, sig_b64 = text[len(PREFIX):].partition(".")
    if not sep:
        raise TokenError("malformed", "epoch token without a signature")
    try:
        return payload_b64, _unb64(payload_b64), _unb64(sig_b64)
    except (binascii.Error, ValueError):
        raise TokenError("malformed", "epoch token is not base64url") from None


def parse(text: str) -> EpochToken:
    """The token's fields, without checking its signature (for display)."""
    _, payload, _ = _split(text)
    try:
        d = json.loads(payload)
        return EpochToken(str(d["service"]), tuple(str(v) for v in d["volumes"]),
                          str(d["site"]), int(d["epoch"]), float(d["issued_at"]),
                          str(d["kid"]))
    except (ValueError, KeyError, TypeError):
        raise TokenError("malformed", "epoch token payload is not valid") from None


class Verifier:
    """The controllers' public keys (several while a signing key is rotated)."""

    def __init__(self, keys: Iterable[ed25519.Ed25519PublicKey]) -> None:
        self.keys = {key_id(k): k for k in keys}

    @classmethod
    def load(cls, path: str) -> Verifier:
        """Every Ed25519 public key in a PEM file (``epoch.pub``: keys concatenated)."""
        data = read_file(path, "epoch verification key")
        marker = b"-----BEGIN PUBLIC KEY-----"
        keys = []
        for part in data.split(marker)[1:]:
            try:
                key = serialization.load_pem_public_key(marker + part)
            except ValueError as exc:
                raise PkiError(f"{path}: not a PEM public key ({exc})") from None
            if not isinstance(key, ed25519.Ed25519PublicKey):
                raise PkiError(f"{path}: epoch keys are Ed25519, found {type(key).__name__}")
            keys.append(key)
        if not keys:
            raise PkiError(f"{path}: no public key in it")
        return cls(keys)

    def verify(self, text: str) -> EpochToken:
        payload_b64, _, sig = _split(text)
        token = parse(text)
        key = self.keys.get(token.key_id)
        if key is None:
            raise TokenError("unknown_key", f"epoch token signed by unknown key {token.key_id}")
        try:
            key.verify(sig, (PREFIX + payload_b64).encode())
        except InvalidSignature:
            raise TokenError("bad_signature", "epoch token signature does not verify") from None
        return token


class Signer:
    """The leading controller's signing key."""

    def __init__(self, key: ed25519.Ed25519PrivateKey) -> None:
        self.key = key
        self.key_id = key_id(key.public_key())
        self.verifier = Verifier([key.public_key()])

    @classmethod
    def load(cls, path: str) -> Signer:
        key = load_private_key(path)
        if not isinstance(key, ed25519.Ed25519PrivateKey):
            raise PkiError(f"{path}: the epoch signing key must be Ed25519")
        return cls(key)

    def sign(self, service: str, volumes: Iterable[str], site: str, epoch: int,
             now: float | None = None) -> str:
        body = {"epoch": int(epoch), "issued_at": round(now if now is not None else
                                                         time.time(), 3),
                "kid": self.key_id, "service": service, "site": site,
                "volumes": sorted(volumes)}
        payload_b64 = _b64(json.dumps(body, sort_keys=True, separators=(",", ":")).encode())
        sig = self.key.sign((PREFIX + payload_b64).encode())
        return f"{PREFIX}{payload_b64}.{_b64(sig)}"

    def current(self, text: str, service: str, volumes: Iterable[str], site: str,
                epoch: int) -> bool:
        """Is ``text`` this key's valid token for exactly these fields (nothing to re-sign)?"""
        if not text:
            return False
        try:
            t = self.verifier.verify(text)
        except TokenError:
            return False
        return (t.service, t.volumes, t.site, t.epoch) == (service, tuple(sorted(volumes)),
                                                           site, epoch)
