"""An in-memory CoordinationStore for fast unit tests. Same guarantees as etcd, single process;
lease expiry follows a clock the test controls (time.monotonic by default)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable

from failover.coordination.base import (
    CoordinationStore,
    Entry,
    EventKind,
    Lease,
    Snapshot,
    WatchEvent,
)
from failover.errors import LeaseLostError


class MemoryLease(Lease):
    def __init__(self, store: MemoryStore, lease_id: int, ttl: int) -> None:
        self.store = store
        self.id = lease_id
        self.ttl = ttl

    async def refresh(self) -> int:
        self.store.expire()
        if self.id not in self.store.deadlines:
            raise LeaseLostError(f"lease {self.id:x} expired")
        self.store.deadlines[self.id] = self.store.clock() + self.ttl
        return self.ttl

    async def revoke(self) -> None:
        self.store.drop_lease(self.id)


class MemoryStore(CoordinationStore):
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.revision = 1
        self.entries: dict[str, Entry] = {}
        self.history: list[WatchEvent] = []
        self.deadlines: dict[int, float] = {}
        self._next_lease = 0x1000
        self._changed = asyncio.Condition()

    # -- internals ------------------------------------------------------------------------

    def expire(self) -> None:
        now = self.clock()
        for lease_id, deadline in list(self.deadlines.items()):
            if deadline <= now:
                self.drop_lease(lease_id)

    def drop_lease(self, lease_id: int) -> None:
        self.deadlines.pop(lease_id, None)
        doomed = [k for k, e in self.entries.items() if e.lease == lease_id]
        if doomed:
            self.revision += 1
            for k in doomed:
                del self.entries[k]
                self.history.append(WatchEvent(EventKind.DELETE, k, b"", self.revision))
            self._notify()

    def _notify(self) -> None:
        async def wake() -> None:
            async with self._changed:
                self._changed.notify_all()

        try:
            asyncio.get_running_loop().create_task(wake())
        except RuntimeError:
            pass

    def _write(self, key: str, value: bytes, lease: Lease | None) -> int:
        self.revision += 1
        old = self.entries.get(key)
        self.entries[key] = Entry(key, value, self.revision,
                                  old.create_revision if old else self.revision,
                                  lease.id if lease else 0)
        self.history.append(WatchEvent(EventKind.PUT, key, value, self.revision))
        self._notify()
        return self.revision

    def _check_lease(self, lease: Lease | None) -> None:
        if lease is not None and lease.id not in self.deadlines:
            raise LeaseLostError(f"lease {lease.id:x} not found")

    # -- interface --------------------------------------------------------------------------

    async def snapshot(self, prefix: str) -> Snapshot:
        self.expire()
        return Snapshot(self.revision, {k: e for k, e in self.entries.items()
                                        if k.startswith(prefix)})

    async def put(self, key: str, value: bytes, lease: Lease | None = None) -> int:
        self.expire()
        self._check_lease(lease)
        return self._write(key, value, lease)

    async def create(self, key: str, value: bytes, lease: Lease | None = None) -> bool:
        self.expire()
        if key in self.entries:
            return False
        self._check_lease(lease)
        self._write(key, value, lease)
        return True

    async def compare_and_set(self, key: str, value: bytes, expected_mod_revision: int,
                              lease: Lease | None = None) -> bool:
        self.expire()
        current = self.entries.get(key)
        if (current.mod_revision if current else 0) != expected_mod_revision:
            return False
        self._check_lease(lease)
        self._write(key, value, lease)
        return True

    async def delete_if(self, key: str, expected_mod_revision: int) -> bool:
        self.expire()
        current = self.entries.get(key)
        if current is None or current.mod_revision != expected_mod_revision:
            return False
        self.revision += 1
        del self.entries[key]
        self.history.append(WatchEvent(EventKind.DELETE, key, b"", self.revision))
        self._notify()
        return True

    async def grant_lease(self, ttl: int) -> Lease:
        self._next_lease += 1
        self.deadlines[self._next_lease] = self.clock() + ttl
        return MemoryLease(self, self._next_lease, ttl)

    async def watch(self, prefix: str, start_revision: int) -> AsyncIterator[WatchEvent]:
        position = 0
        while True:
            self.expire()
            while position < len(self.history):
                event = self.history[position]
                position += 1
                if event.revision >= start_revision and event.key.startswith(prefix):
                    yield event
            async with self._changed:
                try:
                    await asyncio.wait_for(self._changed.wait(), 0.1)
                except TimeoutError:
                    pass

    async def close(self) -> None:
        return None

    async def create_and_swap(self, key: str, value: bytes, head: str, head_value: bytes,
                              expected_head_revision: int) -> int:
        self.expire()
        current = self.entries.get(head)
        if key in self.entries or (current.mod_revision if current else 0) != \
                expected_head_revision:
            return 0
        self.revision += 1  # one transaction: both keys at one revision
        for k, v in ((key, value), (head, head_value)):
            old = self.entries.get(k)
            self.entries[k] = Entry(k, v, self.revision,
                                    old.create_revision if old else self.revision, 0)
            self.history.append(WatchEvent(EventKind.PUT, k, v, self.revision))
        self._notify()
        return self.revision
