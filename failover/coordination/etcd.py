"""CoordinationStore on etcd v3 (aetcd). Lease keepalive and watch resume are written here once.

Atomicity comes from etcd transactions: create-if-absent compares create_revision == 0,
compare-and-set compares mod_revision. Reads are linearizable (etcd's default). aetcd errors
are translated at this boundary: ConnectionFailedError/ConnectionTimeoutError ->
StoreUnavailableError, RevisionCompactedError -> CompactedError, and etcd refusing us (no or
wrong credentials, no permission, a failed TLS handshake, TLS expected) -> StoreRefusedError,
at once and in one line ("etcd at HOST:PORT refused the request: ..."), never retried.

With EtcdCredentials the client speaks TLS and authenticates (etcd_client.Client: aetcd with
TLS); a token etcd has forgotten (it restarted) is renewed and the call made again.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import aetcd.exceptions as ae
import grpc

from failover.coordination.base import (
    CoordinationStore,
    Entry,
    EventKind,
    Lease,
    Snapshot,
    WatchEvent,
)
from failover.coordination.credentials import EtcdCredentials
from failover.coordination.etcd_client import AUTH_TIMEOUT, Client
from failover.errors import (
    CompactedError,
    LeaseLostError,
    StoreRefusedError,
    StoreUnavailableError,
)

log = logging.getLogger(__name__)
T = TypeVar("T")

_UNAVAILABLE = (ae.ConnectionFailedError, ae.ConnectionTimeoutError, ae.InternalError)


def _prefix_end(prefix: bytes) -> bytes:
    b = bytearray(prefix)
    for i in range(len(b) - 1, -1, -1):
        if b[i] < 0xFF:
            b[i] += 1
            return bytes(b[: i + 1])
    return b"\0"


class EtcdLease(Lease):
    def __init__(self, store: EtcdStore, lease: Any) -> None:
        self.store = store
        self.raw = lease
        self.id = int(lease.id)
        self.ttl = int(lease.ttl)

    async def refresh(self) -> int:
        reply = await self.store.call(self.raw.refresh)
        ttl = int(getattr(reply, "TTL", 0))
        if ttl <= 0:
            raise LeaseLostError(f"lease {self.id:x} expired")
        return ttl

    async def revoke(self) -> None:
        try:
            await self.store.call(self.raw.revoke)
        except (LeaseLostError, StoreRefusedError, ae.ClientError):
            pass


class EtcdStore(CoordinationStore):
    def __init__(self, endpoints: list[tuple[str, int]], timeout: float = 5.0,
                 credentials: EtcdCredentials | None = None) -> None:
        """``credentials``: a user and password, TLS files (see credentials.py); read now if
        they are not yet (CredentialsError if they cannot be)."""
        if not endpoints:
            raise ValueError("at least one etcd endpoint is needed")
        self.endpoints = endpoints
        self.timeout = timeout
        creds = credentials or EtcdCredentials()
        creds.check_endpoints([h for h, _ in endpoints])
        self.credentials = creds if creds.is_resolved else creds.resolved()
        channel = (grpc.ssl_channel_credentials(self.credentials.ca_pem, self.credentials.key_pem,
                                                self.credentials.cert_pem)
                   if self.credentials.tls else None)
        self._clients: list[Client] = [
            Client(h, p, username=self.credentials.user, password=self.credentials.password,
                   timeout=int(timeout) or 1, credentials=channel) for h, p in endpoints]
        self._current = 0
        self._probed: set[tuple[str, int]] = set()  # endpoints checked for TLS (refusals)

    @property
    def client(self) -> Client:
        return self._clients[self._current]

    async def call(self, fn: Callable[..., Awaitable[T]], *args: Any, **kw: Any) -> T:
        """Run ``fn``, retrying across endpoints with backoff until ``timeout`` has passed;
        then raise StoreUnavailableError. (gRPC reconnects in the background meanwhile.)
        A refusal raises StoreRefusedError at once; a token etcd no longer knows is renewed
        (once per endpoint) and the call made again. Connecting (TLS, authenticating) and
        renewing have their own budget (AUTH_TIMEOUT), not counted in ``timeout``: a
        one-shot command's first call must not time out on etcd's bcrypt."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        delay = 0.05
        last: Exception | None = None
        stale: int | None = None  # the token generation etcd refused as unknown
        renewed: set[int] = set()
        while True:
            client = self.client
            seen = client.token_generation
            try:
                if stale is not None or not client.connected:
                    began = loop.time()
                    await asyncio.wait_for(client.reauthenticate(stale) if stale is not None
                                           else client.connect(), AUTH_TIMEOUT)
                    deadline += loop.time() - began
                    stale, seen = None, client.token_generation
                remaining = max(0.2, deadline - loop.time())
                return await asyncio.wait_for(fn(*args, **kw), remaining)
            except ae.RevisionCompactedError as exc:
                raise CompactedError(str(exc)) from exc
            except ae.UnauthenticatedError as exc:
                if client.username is None or self._current in renewed:
                    raise self._refused(client, exc) from None
                renewed.add(self._current)
                stale, last = seen, exc
                continue
            except (*_UNAVAILABLE, TimeoutError, OSError) as exc:
                await self._raise_if_refused(client, exc)
                last = exc
            except ae.ClientError as exc:
                raise self._refused(client, exc) from None
            if loop.time() + delay >= deadline:
                why = str(last) or f"no answer within {self.timeout:g}s"
                raise StoreUnavailableError(f"etcd unreachable at {self._describe()}: {why}")
            self._current = (self._current + 1) % len(self._clients)
            stale = None
            fn = _rebind(fn, self)
            await asyncio.sleep(delay)
            delay = min(0.5, delay * 2)

    def _refused(self, client: Client, exc: ae.ClientError) -> Exception:
        """StoreRefusedError for a refusal from etcd; StoreUnavailableError for an endpoint
        that is not etcd (no such gRPC method, HTTP 404); ``exc`` itself for any other
        error."""
        reason = _refusal(str(exc), isinstance(exc, ae.UnauthenticatedError), client.username)
        where = f"{client._host}:{client._port}"
        text = " ".join(str(exc).split())
        if reason is None and ("method not found" in text.lower() or "status: 404" in text):
            return StoreUnavailableError(f"etcd at {where} does not serve etcd's v3 API (is it "
                                         f"etcd?): {text}")
        if reason is None:
            return exc  # type: ignore[no-any-return]
        return StoreRefusedError(f"etcd at {where} refused the request: {reason}")

    async def _raise_if_refused(self, client: Client, exc: Exception) -> None:
        """A connection failure that is a refusal: a TLS handshake that failed, or (without
        TLS) an endpoint that speaks only TLS (checked once per endpoint)."""
        where = (client._host, client._port)
        if self.credentials.tls:
            reason = _tls_failure(str(exc))
        elif isinstance(exc, ae.ConnectionFailedError) and where not in self._probed:
            self._probed.add(where)
            reason = ("it speaks TLS only (give etcd: a ca:, and a user: with a password)"
                      if await _speaks_tls(*where) else None)
        else:
            reason = None
        if reason is not None:
            raise StoreRefusedError(f"etcd at {where[0]}:{where[1]} refused the request: "
                                    f"{reason}") from None

    async def check_access(self, prefix: str) -> None:
        """Raise StoreRefusedError now if etcd refuses us (credentials, TLS, no permission to
        read ``prefix``), so a daemon started with the wrong ``etcd:`` stops at once with one
        line. Return otherwise, also when etcd cannot be reached (daemons wait for it)."""
        try:
            await self.call(self.client.get, prefix.encode())
        except StoreRefusedError:
            raise
        except StoreUnavailableError as exc:
            log.warning("etcd not reachable yet (%s): going on, it will be retried", exc)

    def _describe(self) -> str:
        return ",".join(f"{h}:{p}" for h, p in self.endpoints)

    async def snapshot(self, prefix: str) -> Snapshot:
        p = prefix.encode()
        rng = await self.call(self.client.get_range, p, _prefix_end(p))
        entries = {}
        for kv in rng:
            key = kv.key.decode()
            entries[key] = Entry(key, kv.value, kv.mod_revision, kv.create_revision, kv.lease)
        return Snapshot(int(rng.header.revision), entries)

    async def put(self, key: str, value: bytes, lease: Lease | None = None) -> int:
        r = await self.call(self.client.put, key.encode(), value,
                            lease=lease.id if lease else None)
        return int(r.header.revision)

    async def _txn(self, compare: list[Any], success: list[Any]) -> bool:
        ok, _ = await self.call(self.client.transaction, compare=compare, success=success,
                                failure=[])
        return bool(ok)

    async def create(self, key: str, value: bytes, lease: Lease | None = None) -> bool:
        t, k = self.client.transactions, key.encode()
        return await self._txn([t.create(k) == 0],
                               [t.put(k, value, lease=lease.id if lease else None)])

    async def compare_and_set(self, key: str, value: bytes, expected_mod_revision: int,
                              lease: Lease | None = None) -> bool:
        t, k = self.client.transactions, key.encode()
        return await self._txn([t.mod(k) == expected_mod_revision],
                               [t.put(k, value, lease=lease.id if lease else None)])

    async def delete_if(self, key: str, expected_mod_revision: int) -> bool:
        if expected_mod_revision == 0:
            return False
        t, k = self.client.transactions, key.encode()
        return await self._txn([t.mod(k) == expected_mod_revision], [t.delete(k)])

    async def grant_lease(self, ttl: int) -> Lease:
        raw = await self.call(self.client.lease, ttl)
        return EtcdLease(self, raw)

    async def watch(self, prefix: str, start_revision: int) -> AsyncIterator[WatchEvent]:
        p = prefix.encode()
        next_rev = start_revision
        backoff = 0.1
        while True:
            client = self.client
            seen = client.token_generation
            try:
                w = await self.call(self.client.watch_prefix, p, start_revision=next_rev)
                try:
                    async for ev in w:
                        backoff = 0.1
                        rev = int(ev.kv.mod_revision)
                        kind = EventKind.PUT if ev.kind == "PUT" else EventKind.DELETE
                        next_rev = rev + 1
                        yield WatchEvent(kind, ev.kv.key.decode(), ev.kv.value, rev)
                finally:
                    await _quiet_cancel(w)
            except ae.RevisionCompactedError as exc:
                raise CompactedError(f"watch of {prefix} from {next_rev}: {exc}") from exc
            except StoreRefusedError:
                raise
            except ae.UnauthenticatedError as exc:
                # etcd cancelled the watch: the token of its stream is no longer valid
                if client.username is None:
                    raise self._refused(client, exc) from None
                log.info("watch of %s: renewing the etcd token, resuming from revision %d",
                         prefix, next_rev)
                await self.call(client.reauthenticate, seen)
            except (*_UNAVAILABLE, StoreUnavailableError) as exc:
                log.warning("watch of %s broke (%s): resuming from revision %d", prefix, exc,
                            next_rev)
                await asyncio.sleep(backoff)
                backoff = min(2.0, backoff * 2)
                self._current = (self._current + 1) % len(self._clients)
            except ae.ClientError as exc:
                raise self._refused(client, exc) from None

    async def close(self) -> None:
        for c in self._clients:
            try:
                await c.close()
            except ae.ClientError:
                pass

    async def create_and_swap(self, key: str, value: bytes, head: str, head_value: bytes,
                              expected_head_revision: int) -> int:
        t, k, h = self.client.transactions, key.encode(), head.encode()
        ok, responses = await self.call(
            self.client.transaction,
            compare=[t.create(k) == 0, t.mod(h) == expected_head_revision],
            success=[t.put(k, value), t.put(h, head_value)], failure=[])
        return int(responses[-1].response_put.header.revision) if ok else 0

    async def snapshot_without(self, prefix: str, skip: str) -> Snapshot:
        """Two ranges around ``skip`` in one transaction (one revision)."""
        t, p, s = self.client.transactions, prefix.encode(), skip.encode()
        _, ranges = await self.call(self.client.transaction, compare=[], success=[
            t.get(p, s), t.get(_prefix_end(s), _prefix_end(p))], failure=[])
        kvs = [kv for r in ranges for _, kv in r]
        if not kvs:  # no header to take the revision from: the plain read says it
            return await super().snapshot_without(prefix, skip)
        return Snapshot(int(kvs[0].header.revision), {
            kv.key.decode(): Entry(kv.key.decode(), kv.value, kv.mod_revision,
                                   kv.create_revision, kv.lease) for kv in kvs})


def _rebind(fn: Callable[..., Awaitable[T]], store: EtcdStore) -> Callable[..., Awaitable[T]]:
    """The same bound method on the store's current client (after an endpoint switch)."""
    owner = getattr(fn, "__self__", None)
    if owner in store._clients:
        return getattr(store.client, fn.__name__)  # type: ignore[no-any-return]
    return fn


def _refusal(text: str, unauthenticated: bool, user: str | None) -> str | None:
    """Why etcd refused us, from its error ("etcdserver: ..."); None if it did not."""
    if "user name is empty" in text:
        return ("authentication required (give etcd: a user: and a password_file: or "
                "password_env:)")
    if "authentication failed" in text:
        return f"authentication failed for user {user!r} (wrong user or password)"
    if "permission denied" in text:
        return (f"permission denied for user {user!r} (its role needs readwrite on the "
                "cluster's prefix /drctl/CLUSTER/)")
    if "authentication is not enabled" in text:
        return (f"authentication is not enabled on etcd, but user {user!r} is configured "
                "(enable it: etcdctl auth enable)")
    if unauthenticated:
        return f"authentication rejected ({text})"
    return None


_TLS_REASONS = (
    ("CERTIFICATE_VERIFY_FAILED", "etcd's certificate is not signed by a CA we trust (is ca: "
                                  "the CA that signed it?)"),
    ("not in peer certificate", "etcd's certificate does not name the address we dialled"),
    ("WRONG_VERSION_NUMBER", "etcd does not speak TLS there (drop ca:/cert:/key:?)"),
    ("BAD_CERTIFICATE", "etcd rejected our client certificate (cert:/key: signed by the CA it "
                        "trusts)"),
    ("CERTIFICATE_REQUIRED", "etcd requires a client certificate (give cert: and key:)"),
    ("TSI_DATA_CORRUPTED", "etcd ended the TLS session (a client certificate it rejects or "
                           "requires: cert:/key:)"),
    ("andshake failed", "TLS handshake failed"),
)


def _tls_failure(text: str) -> str | None:
    for marker, reason in _TLS_REASONS:
        if marker in text:
            return reason
    return None


async def _speaks_tls(host: str, port: int) -> bool:
    """Does ``host:port`` complete a TLS handshake? (Nothing is verified or sent: it only
    tells "plain gRPC to a TLS-only etcd" apart from "etcd is down".)"""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(host, port, ssl=ctx), 2.0)
    except (OSError, TimeoutError):
        return False
    writer.close()
    try:
        await writer.wait_closed()
    except OSError:
        pass
    return True


async def _quiet_cancel(w: Any) -> None:
    try:
        await w.cancel()
    except (ae.ClientError, RuntimeError):
        pass
