"""CoordinationStore on etcd v3 (aetcd). Lease keepalive and watch resume are written here once.

Atomicity comes from etcd transactions: create-if-absent compares create_revision == 0,
compare-and-set compares mod_revision. Reads are linearizable (etcd's default). aetcd errors
are translated at this boundary: ConnectionFailedError/ConnectionTimeoutError ->
StoreUnavailableError, RevisionCompactedError -> CompactedError.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import aetcd
import aetcd.exceptions as ae

from failover.coordination.base import (
    CoordinationStore,
    Entry,
    EventKind,
    Lease,
    Snapshot,
    WatchEvent,
)
from failover.errors import CompactedError, LeaseLostError, StoreUnavailableError

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
        except (LeaseLostError, ae.ClientError):
            pass


class EtcdStore(CoordinationStore):
    def __init__(self, endpoints: list[tuple[str, int]], timeout: float = 5.0) -> None:
        if not endpoints:
            raise ValueError("at least one etcd endpoint is needed")
        self.endpoints = endpoints
        self.timeout = timeout
        self._clients: list[Any] = [aetcd.Client(host=h, port=p, timeout=int(timeout) or 1)
                                    for h, p in endpoints]
        self._current = 0

    @property
    def client(self) -> Any:
        return self._clients[self._current]

    async def call(self, fn: Callable[..., Awaitable[T]], *args: Any, **kw: Any) -> T:
        """Run ``fn``, retrying across endpoints with backoff until ``timeout`` has passed;
        then raise StoreUnavailableError. (gRPC reconnects in the background meanwhile.)"""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        delay = 0.05
        last: Exception | None = None
        while True:
            try:
                remaining = max(0.2, deadline - loop.time())
                return await asyncio.wait_for(fn(*args, **kw), remaining)
            except ae.RevisionCompactedError as exc:
                raise CompactedError(str(exc)) from exc
            except (*_UNAVAILABLE, TimeoutError, OSError) as exc:
                last = exc
            if loop.time() + delay >= deadline:
                raise StoreUnavailableError(f"etcd unreachable at {self._describe()}: {last}")
            self._current = (self._current + 1) % len(self._clients)
            fn = _rebind(fn, self)
            await asyncio.sleep(delay)
            delay = min(0.5, delay * 2)

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
            except (*_UNAVAILABLE, StoreUnavailableError) as exc:
                log.warning("watch of %s broke (%s): resuming from revision %d", prefix, exc,
                            next_rev)
                await asyncio.sleep(backoff)
                backoff = min(2.0, backoff * 2)
                self._current = (self._current + 1) % len(self._clients)

    async def close(self) -> None:
        for c in self._clients:
            try:
                await c.close()
            except ae.ClientError:
                pass


def _rebind(fn: Callable[..., Awaitable[T]], store: EtcdStore) -> Callable[..., Awaitable[T]]:
    """The same bound method on the store's current client (after an endpoint switch)."""
    owner = getattr(fn, "__self__", None)
    if owner in store._clients:
        return getattr(store.client, fn.__name__)  # type: ignore[no-any-return]
    return fn


async def _quiet_cancel(w: Any) -> None:
    try:
        await w.cancel()
    except (ae.ClientError, RuntimeError):
        pass
