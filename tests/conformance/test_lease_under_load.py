"""Lease timing holds under load (real etcd, TLS and authentication on): a holder whose event
loop is busy does not lose its lease, and a lease etcd stops answering for is still given up
at the local deadline, before it can expire, however busy the loop is."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest

from failover.coordination.etcd import EtcdStore
from failover.lease import LeaseKeeper
from tests.services import EtcdServer


def hog(seconds: float) -> None:
    """The holder's loop busy in Python (hashing, parsing a scrape...) for ``seconds``."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        sum(range(1000))


@pytest.fixture
async def etcd(etcd_server: EtcdServer) -> AsyncIterator[EtcdStore]:
    store = EtcdStore([etcd_server.endpoint], timeout=1.0,
                      credentials=etcd_server.credentials())
    try:
        yield store
    finally:
        await store.close()


async def test_a_busy_loop_keeps_its_lease(etcd: EtcdStore) -> None:
    keeper = LeaseKeeper(etcd, ttl=2)
    assert keeper.threaded
    lease = await keeper.grant()
    key = f"/drctl/t/busy/{lease.id:x}"
    await etcd.put(key, b"alive", lease=lease)
    task = asyncio.create_task(keeper.run())
    await asyncio.sleep(0.5)
    for _ in range(3):
        hog(2.5)  # longer than the TTL: an in-loop keeper could not refresh at all
        await asyncio.sleep(0.05)
    assert not keeper.lost.is_set(), "the lease was lost while the holder was busy"
    assert (await etcd.snapshot(key)).value(key) == b"alive"
    assert len(keeper.timings.trips) >= 5, "the keeper did not refresh while the loop was busy"
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await keeper.revoke()
    assert (await etcd.snapshot(key)).value(key) is None


async def test_a_busy_loop_still_gives_up_before_expiry() -> None:
    server = EtcdServer().start()
    store = EtcdStore([server.endpoint], timeout=0.5, credentials=server.credentials())
    try:
        keeper = LeaseKeeper(store, ttl=2)
        await keeper.grant()
        task = asyncio.create_task(keeper.run())
        await asyncio.sleep(0.8)
        server.kill9()
        killed = time.monotonic()
        hog(2.5)  # etcd is gone and the holder's loop is busy past the TTL
        await asyncio.wait_for(keeper.lost.wait(), 1)
        await task
        # the keeper's thread decided at its deadline, not when the busy loop looked
        assert keeper.lost_at is not None and keeper.lost_at - killed <= 1.5 + 0.2
    finally:
        await store.close()
        server.stop()
