"""Lease keepalive and leader election, against the fake and a real etcd."""

from __future__ import annotations

import asyncio

import pytest

from failover.coordination.base import CoordinationStore
from failover.coordination.etcd import EtcdStore
from failover.errors import FailoverError, LeaseLostError
from failover.lease import Election, LeaseKeeper, check_timings
from tests.services import EtcdServer


def test_timing_invariant_is_enforced() -> None:
    check_timings(ttl=6, heartbeat_interval=2, retry_timeout=2)
    with pytest.raises(FailoverError, match="must not exceed the lease TTL"):
        check_timings(ttl=3, heartbeat_interval=2, retry_timeout=1)


async def test_one_leader_then_the_other(store: CoordinationStore,
                                         request: pytest.FixtureRequest) -> None:
    key = f"/drctl/e/{request.node.name}/leader"
    a, b = Election(store, key, "a", ttl=2), Election(store, key, "b", ttl=2)
    la = await a.campaign()
    assert await a.leader() == "a"
    b_task = asyncio.create_task(b.campaign(poll=0.05))
    await asyncio.sleep(0.3)
    assert not b_task.done(), "two leaders at once"
    keep = asyncio.create_task(la.keeper.run())
    await asyncio.sleep(1.0)  # a keeps the lease past half its TTL
    assert await a.leader() == "a" and not b_task.done()
    keep.cancel()
    await la.keeper.revoke()  # a resigns: b takes over
    lb = await asyncio.wait_for(b_task, 5)
    assert await b.leader() == "b"
    await lb.keeper.revoke()


async def test_lost_lease_cancels_leader_work(store: CoordinationStore,
                                              request: pytest.FixtureRequest) -> None:
    key = f"/drctl/e/{request.node.name}/leader"
    lead = await Election(store, key, "a", ttl=1).campaign()
    assert lead.keeper.lease is not None
    await lead.keeper.lease.revoke()  # the lease disappears under the leader
    started = asyncio.Event()

    async def leader_work() -> None:
        started.set()
        await asyncio.sleep(30)

    with pytest.raises(LeaseLostError):
        async with asyncio.timeout(10):
            keeper = asyncio.create_task(lead.keeper.run())
            async with lead.scope() as scope:
                scope.spawn(leader_work())
    assert started.is_set()
    await keeper


async def test_keeper_gives_up_before_etcd_expiry_when_etcd_dies() -> None:
    server = EtcdServer().start()
    store = EtcdStore([server.endpoint], timeout=0.5, credentials=server.credentials())
    try:
        keeper = LeaseKeeper(store, ttl=2)
        await keeper.grant()
        task = asyncio.create_task(keeper.run())
        await asyncio.sleep(0.8)
        assert not keeper.lost.is_set()
        server.kill9()
        t0 = asyncio.get_running_loop().time()
        await asyncio.wait_for(keeper.lost.wait(), 5)
        assert asyncio.get_running_loop().time() - t0 <= 2.0  # before the TTL could pass
        await task
    finally:
        await store.close()
        server.stop()
