"""Security of the replication channel (docs/security.md): mutual TLS identities, who may call
which RPC on which volume, and the epoch gate.

Identities. Every process holds a certificate from the deployment's CA (drctl/pki.py) naming
a site (``drctl://site/NAME``) or an operator (``drctl://operator/NAME``). The target asks for
the caller's certificate (TLS refuses a caller without one, with one from another CA or an
expired one, before any RPC runs) and reads the identity from it.

Authorisation (``Authorizer``, a gRPC server interceptor: every RPC passes through it, and an
RPC it has no rule for is refused):

  Handshake, Push                    a site allowed to write the volume (``serve --allow``)
  Fence                              such a site, or the target's own site (the site agent
                                     promotes its replica locally)
  Clone, DropClone, BlockHashes      such a site, or an allowed operator (drills, verify)

Anything else is PERMISSION_DENIED, logged with the peer, before the handler touches a file.

The epoch gate. A replica's epoch is raised only on the controller's signed word
(drctl/epochtoken.py): a Handshake or Fence that asks for an epoch above the replica's, or a
promotion (Fence with release), must carry a token that verifies against the controllers'
public key(s), names the volume, the caller's site and exactly that epoch. A token that does
not verify is refused even when no epoch is raised. The target keeps the last token it
honoured per volume (``NAME.grant``); at that epoch only its site may write or fence (an old
primary at the current epoch is refused). On the Push stream, a batch whose epoch is above
the replica's is refused. Refusals are FAILED_PRECONDITION ``epoch_not_granted`` and change
nothing.
"""

from __future__ import annotations

import inspect
import ipaddress
import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import grpc

from drctl.epochtoken import EpochToken, TokenError, Verifier
from drctl.pki import (
    Identity,
    Layout,
    PkiError,
    identity_of,
    read_file,
    read_key_pem,
    write_private,
)
from replicator.errors import StreamRefused, UsageError

log = logging.getLogger(__name__)

ENV_DIR = "DRCTL_TLS_DIR"  # defaults for library callers (drills): the deployment directory
ENV_AS = "DRCTL_TLS_AS"  # ... and the identity, "site/NAME" or "operator/NAME"
GRANT = ".grant"


# -- identities and credentials --------------------------------------------------------------


@dataclass(frozen=True)
class TlsConfig:
    """A process's TLS material: the CA it trusts, its certificate and key, and (targets) the
    controllers' epoch-token verification keys."""

    ca: bytes
    cert: bytes
    key: bytes
    identity: Identity
    epoch_keys: Verifier | None = None
    files: tuple[str, str, str] | None = None  # (ca, cert, key) paths, for HTTPS metrics

    @classmethod
    def from_dir(cls, directory: str, who: Identity, need_epoch_keys: bool = False
                 ) -> TlsConfig:
        lay = Layout(directory)
        lay.check_issued(who)
        return cls.from_files(lay.ca_cert, lay.cert(who), lay.key(who),
                              lay.epoch_pub if need_epoch_keys or os.path.exists(
                                  lay.epoch_pub) else None, who)

    @classmethod
    def from_files(cls, ca: str, cert: str, key: str, epoch_pub: str | None,
                   who: Identity | None = None) -> TlsConfig:
        """Load and check: the key is private (mode), the certificate is from one of the CAs
        in ``ca`` (several while a CA is rotated), valid now and names ``who`` (if given;
        else whoever it names)."""
        from cryptography import x509

        from drctl.pki import verify_issued

        ca_pem, cert_pem = read_file(ca, "CA certificate"), read_file(cert, "certificate")
        key_pem = read_key_pem(key)
        try:
            c = x509.load_pem_x509_certificate(cert_pem)
            authorities = x509.load_pem_x509_certificates(ca_pem)
        except ValueError as exc:
            raise PkiError(f"{cert} or {ca}: not PEM certificates ({exc})") from None
        problems = []
        for authority in authorities:
            try:
                verify_issued(c, authority)
                break
            except PkiError as exc:
                problems.append(str(exc))
        else:
            why = next((p for p in problems if not p.startswith("not issued")), problems[-1])
            raise PkiError(f"certificate {cert}: {why}")
        named = identity_of(c)
        if named is None:
            raise PkiError(f"certificate {cert} names no drctl site or operator")
        if who is not None and named != who:
            raise PkiError(f"certificate {cert} is for {named}, not {who}")
        keys = Verifier.load(epoch_pub) if epoch_pub else None
        return cls(ca_pem, cert_pem, key_pem, named, keys, (ca, cert, key))

    def server_credentials(self) -> grpc.ServerCredentials:
        return grpc.ssl_server_credentials([(self.key, self.cert)], root_certificates=self.ca,
                                           require_client_auth=True)

    def channel_credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(self.ca, self.key, self.cert)


@dataclass(frozen=True)
class ChannelSecurity:
    """How a client reaches a target: mutual TLS (``tls``) or, for loopback tests only,
    plaintext (``tls`` None). ``server_name``: the site the target's certificate must name
    (default: the host part of the address)."""

    tls: TlsConfig | None
    server_name: str | None = None

    @classmethod
    def insecure(cls) -> ChannelSecurity:
        return cls(None)

    @classmethod
    def from_env(cls) -> ChannelSecurity:
        """``$DRCTL_TLS_DIR`` and ``$DRCTL_TLS_AS`` (site/NAME or operator/NAME), for callers
        that take no flags of their own (a drill started by the API); plaintext if unset."""
        directory, who = os.environ.get(ENV_DIR), os.environ.get(ENV_AS)
        if not directory:
            if who:
                raise PkiError(f"${ENV_AS} is set but ${ENV_DIR} (the deployment's TLS "
                               "directory) is not")
            return cls.insecure()
        if not who:
            raise PkiError(f"${ENV_DIR} is set but ${ENV_AS} (site/NAME or operator/NAME) "
                           "is not")
        return cls(TlsConfig.from_dir(directory, identity_from_env(who)))

    def channel(self, address: str, options: list[tuple[str, Any]]) -> grpc.aio.Channel:
        if self.tls is None:
            require_loopback(address, "target")
            return grpc.aio.insecure_channel(address, options=options)
        opts = list(options)
        if self.server_name:
            opts.append(("grpc.ssl_target_name_override", self.server_name))
        return grpc.aio.secure_channel(address, self.tls.channel_credentials(), options=opts)


def identity_from_env(who: str) -> Identity:
    """``$DRCTL_TLS_AS``: site/NAME or operator/NAME (PkiError otherwise)."""
    kind, _, name = who.partition("/")
    if kind not in ("site", "operator") or not name or "/" in name or name != name.strip():
        raise PkiError(f"${ENV_AS}={who!r}: expected site/NAME or operator/NAME")
    return Identity(kind, name)


def is_loopback(host: str) -> bool:
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def require_loopback(address: str, what: str) -> None:
    """Plaintext is for loopback tests: refuse it anywhere else."""
    if address.startswith("unix:"):
        return
    host = address.rpartition(":")[0] if ":" in address else address
    if not is_loopback(host):
        raise UsageError(f"--insecure: {what} {address} is not a loopback address; plaintext "
                         "is for loopback tests only (use --tls-dir)")


# -- who may call what -----------------------------------------------------------------------

WRITE, FENCE, READ = "write", "fence", "read"
RULES = {"Handshake": WRITE, "Push": WRITE, "Fence": FENCE, "Clone": READ, "DropClone": READ,
         "BlockHashes": READ}
# what a refusal says was asked (a user ran verify, a drill, a push: not an RPC's name)
ASKED = {"Handshake": "replicate (push)", "Push": "replicate (push)", "Fence": "fence",
         "Clone": "clone (drill)", "DropClone": "drop a clone of",
         "BlockHashes": "read (verify, resync)"}


@dataclass
class AccessPolicy:
    """Which site may write which volume (``None``: every volume), this target's own site and
    the operators allowed drills and reads (``"*"``: any operator of the deployment)."""

    own_site: str
    writers: dict[str, frozenset[str] | None] = field(default_factory=dict)
    operators: frozenset[str] = frozenset()

    @classmethod
    def parse(cls, own_site: str, items: Iterable[str]) -> AccessPolicy:
        """``--allow`` values: ``SITE`` (every volume), ``SITE=VOL,VOL`` or
        ``operator:NAME`` / ``operator:*``."""
        policy = cls(own_site)
        operators: set[str] = set()
        for item in items:
            if item.startswith("operator:"):
                name = item.partition(":")[2]
                if not name:
                    raise UsageError(f"--allow {item!r}: operator:NAME or operator:*")
                operators.add(name)
                continue
            site, sep, vols = item.partition("=")
            if not site or (sep and not vols):
                raise UsageError(f"--allow {item!r}: expected SITE, SITE=VOLUME,... or "
                                 "operator:NAME")
            if not sep:
                policy.writers[site] = None
                continue
            known = policy.writers.get(site, frozenset())
            if known is not None:
                policy.writers[site] = known | {v for v in vols.split(",") if v}
        policy.operators = frozenset(operators)
        return policy

    def allows(self, who: Identity, action: str, volume: str) -> bool:
        return self.refusal(who, action, volume) is None

    def refusal(self, who: Identity, action: str | None, volume: str) -> str | None:
        """None if ``who`` may do ``action`` (None: a call no rule covers) on ``volume``, else
        why not (what a refusal says after "may not ... volume")."""
        if action is None:
            return "no access rule covers this call"
        if who.kind == "site":
            volumes = self.writers.get(who.name, frozenset())
            if volumes is None or volume in volumes:
                return None
            if action == FENCE and who.name == self.own_site:
                return None
            if who.name not in self.writers:
                return f"this target's --allow rules do not name site {who.name}"
            return ("this target's --allow rules do not name that volume for it: a misspelt "
                    "volume, or the wrong target?")
        if who.kind == "operator":
            if action != READ:
                return "an operator may only clone and read (drills, verify), never write or fence"
            if "*" in self.operators or who.name in self.operators:
                return None
            return f"this target's --allow rules do not name operator {who.name}"
        return f"no rule for a {who.kind}"

    def describe(self) -> str:
        parts = [f"{s}={','.join(sorted(v))}" if v is not None else s
                 for s, v in sorted(self.writers.items())]
        parts += [f"operator:{o}" for o in sorted(self.operators)]
        return " ".join(parts) or "nobody"


# -- the epoch gate --------------------------------------------------------------------------


class Denied(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def _not_granted(message: str) -> Denied:
    return Denied(grpc.StatusCode.FAILED_PRECONDITION, f"epoch_not_granted: {message}")


EpochOf = Callable[[str], Awaitable[int]]  # 0: a replica not created yet


class EpochGate:
    """Raises of a replica's epoch only on a valid token; the last honoured token per volume
    kept beside the replica (``NAME.grant``)."""

    def __init__(self, verifier: Verifier | None, directory: str, epoch_of: EpochOf) -> None:
        self.verifier = verifier
        self.directory = directory
        self.epoch_of = epoch_of
        self._grants: dict[str, EpochToken | None] = {}

    def _path(self, volume: str) -> str:
        return os.path.join(self.directory, volume + GRANT)

    def grant(self, volume: str) -> EpochToken | None:
        if volume not in self._grants:
            token = None
            if self.verifier is not None:
                try:
                    with open(self._path(volume), encoding="ascii") as fh:
                        token = self.verifier.verify(fh.read().strip())
                except (OSError, ValueError, TokenError):
                    token = None
            self._grants[volume] = token
        return self._grants[volume]

    def token(self, raw: bytes) -> EpochToken | None:
        """The presented token, verified (None: none presented)."""
        if not raw:
            return None
        if self.verifier is None:
            raise _not_granted("this target has no epoch verification key")
        try:
            return self.verifier.verify(raw.decode("ascii", "replace"))
        except TokenError as exc:
            raise _not_granted(str(exc)) from None

    async def check(self, who: Identity, volume: str, epoch: int, raw: bytes,
                    release: bool = False) -> EpochToken | None:
        """May ``who`` act on ``volume`` at ``epoch`` (``release``: and promote it)? Returns
        the token to record once the call succeeded (None: nothing to record)."""
        token = self.token(raw)
        if release and token is None:
            raise _not_granted(f"promoting volume {volume} (release) needs the controller's "
                               f"token for epoch {epoch}")
        if token is not None and not token.grants(who.name, volume, epoch):
            raise _not_granted(f"the token grants epoch {token.epoch} of "
                               f"{', '.join(token.volumes) or 'no volume'} to site "
                               f"{token.site}, not epoch {epoch} of {volume} to {who}")
        current = await self.epoch_of(volume)
        if epoch > current and token is None:
            raise _not_granted(f"volume {volume} is at epoch {current}: epoch {epoch} needs "
                               "the controller's token")
        held = self.grant(volume)
        if token is None and held is not None and held.epoch == current == epoch \
                and held.site != who.name:
            raise Denied(grpc.StatusCode.PERMISSION_DENIED,
                         f"epoch {current} of volume {volume} is granted to site {held.site}, "
                         f"not {who}")
        return token

    def record(self, volume: str, token: EpochToken, raw: bytes) -> None:
        held = self.grant(volume)
        if held is not None and held.epoch > token.epoch:
            return
        write_private(self._path(volume), raw, overwrite=True)
        self._grants[volume] = token


# -- the interceptor -------------------------------------------------------------------------


def peer_identity(context: grpc.aio.ServicerContext) -> Identity | None:
    """The identity in the caller's certificate (TLS has verified it against the CA)."""
    from cryptography import x509

    pems = context.auth_context().get("x509_pem_cert") or []
    if not pems:
        return None
    try:
        return identity_of(x509.load_pem_x509_certificate(pems[0]))
    except ValueError:
        return None


class Authorizer(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Every RPC: the caller's identity, the policy for its volume, the epoch gate."""

    def __init__(self, policy: AccessPolicy, gate: EpochGate) -> None:
        self.policy = policy
        self.gate = gate

    async def intercept_service(self, continuation: Callable[[Any], Awaitable[Any]],
                                details: Any) -> Any:
        handler = await continuation(details)
        if handler is None:
            return None
        method = str(details.method).rpartition("/")[2]
        action = RULES.get(method)
        if handler.unary_unary is not None:
            inner = handler.unary_unary

            async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
                token = await self._admit(method, action, request, context)
                response = await inner(request, context)
                self._record(request, token)
                return response

            return grpc.unary_unary_rpc_method_handler(
                unary, handler.request_deserializer, handler.response_serializer)
        if handler.unary_stream is not None:
            inner_stream = handler.unary_stream

            async def unary_stream(request: Any, context: grpc.aio.ServicerContext
                                   ) -> AsyncIterator[Any]:
                await self._admit(method, action, request, context)
                async for item in inner_stream(request, context):
                    yield item

            return grpc.unary_stream_rpc_method_handler(
                unary_stream, handler.request_deserializer, handler.response_serializer)
        if handler.stream_stream is not None and inspect.iscoroutinefunction(
                handler.stream_stream):
            return grpc.stream_stream_rpc_method_handler(
                self._push(method, action, handler.stream_stream),
                handler.request_deserializer, handler.response_serializer)
        return _refuse_all(handler, f"{method}: no access rule for this RPC")

    def _push(self, method: str, action: str | None, inner: Any) -> Any:
        async def push(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> Any:
            it = aiter(requests)
            try:
                first = await anext(it)
            except StopAsyncIteration:
                return None
            await self._admit(method, action, first, context)
            return await inner(self._batches(first, it, context), context)

        return push

    async def _batches(self, first: Any, rest: AsyncIterator[Any],
                       context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        """The Push stream as the handler sees it: a batch claiming an epoch above the
        replica's (one no token raised it to) ends the stream."""
        allowed = await self.gate.epoch_of(first.volume)
        msg = first
        while True:
            if msg.epoch > allowed:
                allowed = await self.gate.epoch_of(first.volume)
                if msg.epoch > allowed:
                    who = peer_identity(context)
                    text = (f"epoch_not_granted: batch {msg.seq} of {msg.volume} claims epoch "
                            f"{msg.epoch}, the replica is at {allowed}")
                    log.warning("refused Push from %s (%s): %s", who, context.peer(), text)
                    # the handler ends the call from its own task (errors.StreamRefused)
                    raise StreamRefused(grpc.StatusCode.FAILED_PRECONDITION, text)
            yield msg
            try:
                msg = await anext(rest)
            except StopAsyncIteration:
                return

    async def _admit(self, method: str, action: str | None, request: Any,
                     context: grpc.aio.ServicerContext) -> EpochToken | None:
        who = peer_identity(context)
        volume = str(getattr(request, "volume", ""))
        try:
            if who is None:
                raise Denied(grpc.StatusCode.PERMISSION_DENIED,
                             "the client certificate names no drctl site or operator")
            why = self.policy.refusal(who, action, volume)
            if why is not None:
                raise Denied(grpc.StatusCode.PERMISSION_DENIED,
                             f"{who} may not {ASKED.get(method, method)} volume "
                             f"{volume or '-'} here: {why}")
            if method in ("Handshake", "Fence"):
                return await self.gate.check(who, volume, int(request.epoch),
                                             bytes(request.epoch_token),
                                             bool(getattr(request, "release", False)))
            if method == "Push":
                await self.gate.check(who, volume, int(request.epoch), b"")
            return None
        except Denied as exc:
            log.warning("refused %s %s from %s (%s): %s", method, volume or "-", who or "?",
                        context.peer(), exc.message)
            await context.abort(exc.code, exc.message)
            raise AssertionError("unreachable") from None

    def _record(self, request: Any, token: EpochToken | None) -> None:
        if token is not None:
            try:
                self.gate.record(str(request.volume), token, bytes(request.epoch_token))
            except OSError as exc:
                log.error("volume %s: cannot keep the epoch grant: %s", request.volume, exc)


def _refuse_all(handler: Any, message: str) -> Any:
    async def refuse(request: Any, context: grpc.aio.ServicerContext) -> Any:
        log.warning("refused from %s: %s", context.peer(), message)
        await context.abort(grpc.StatusCode.PERMISSION_DENIED, message)

    if handler.stream_stream is not None:
        return grpc.stream_stream_rpc_method_handler(
            refuse, handler.request_deserializer, handler.response_serializer)
    if handler.stream_unary is not None:
        return grpc.stream_unary_rpc_method_handler(
            refuse, handler.request_deserializer, handler.response_serializer)
    return grpc.unary_unary_rpc_method_handler(
        refuse, handler.request_deserializer, handler.response_serializer)
