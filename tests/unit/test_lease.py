"""The lease keeper's schedule (on the in-memory store, where it runs on the caller's loop):
a refresh that fails is retried at once, and the lease is given up at the local deadline
(3/4 of the TTL after the last successful refresh was sent), before it can expire. Under a
busy loop with a real etcd: tests/conformance/test_lease_under_load.py."""

from __future__ import annotations

import asyncio
import time

from failover.coordination.base import Lease
from failover.coordination.memory import MemoryLease, MemoryStore
from failover.lease import LeaseKeeper


class HangingLease(MemoryLease):
    """Refreshes numbered in ``hang`` (1-based) never answer."""

    def __init__(self, store: MemoryStore, lease_id: int, ttl: int, hang: set[int]) -> None:
        super().__init__(store, lease_id, ttl)
        self.hang = hang
        self.calls: list[float] = []

    async def refresh(self) -> int:
        self.calls.append(time.monotonic())
        if len(self.calls) in self.hang or 0 in self.hang:
            await asyncio.sleep(3600)
        return await super().refresh()


class Store(MemoryStore):
    def __init__(self, hang: set[int]) -> None:
        super().__init__()
        self.hang = hang

    async def grant_lease(self, ttl: int) -> Lease:
        plain = await super().grant_lease(ttl)
        return HangingLease(self, plain.id, ttl, self.hang)


async def test_a_refresh_that_times_out_is_retried_at_once() -> None:
    keeper = LeaseKeeper(Store(hang={1}), ttl=1)  # refresh every 0.33 s, 0.17 s each, 0.75 s
    assert not keeper.threaded
    lease = await keeper.grant()
    assert isinstance(lease, HangingLease)
    task = asyncio.create_task(keeper.run())
    await asyncio.sleep(1.5)
    assert not keeper.lost.is_set(), "one slow refresh cost the lease"
    first, retry = lease.calls[:2]
    assert retry - first < keeper.retry_timeout + 0.1  # not a whole interval later
    assert keeper.timings.failed == 1 and len(lease.calls) >= 4
    task.cancel()


async def test_the_lease_is_given_up_at_the_local_deadline() -> None:
    keeper = LeaseKeeper(Store(hang={0}), ttl=1)
    granted = time.monotonic()
    await keeper.grant()
    task = asyncio.create_task(keeper.run())
    await asyncio.wait_for(keeper.lost.wait(), 5)
    after = time.monotonic() - granted
    assert keeper.local_deadline <= after < keeper.ttl  # before etcd could expire it
    await task
