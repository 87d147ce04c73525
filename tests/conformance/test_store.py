"""One suite, two stores: the in-memory fake and a real etcd started by the test."""

from __future__ import annotations

import asyncio

import pytest

from failover.coordination.base import CoordinationStore, EventKind
from failover.coordination.etcd import EtcdStore
from failover.errors import LeaseLostError, StoreUnavailableError
from tests.services import EtcdServer


def _p(request: pytest.FixtureRequest, key: str) -> str:
    return f"/drctl/t/{request.node.name}/{key}"


async def test_create_is_create_if_absent(store: CoordinationStore,
                                          request: pytest.FixtureRequest) -> None:
    k = _p(request, "leader")
    assert await store.create(k, b"a") is True
    assert await store.create(k, b"b") is False
    snap = await store.snapshot(_p(request, ""))
    assert snap.value(k) == b"a"


async def test_compare_and_set_on_mod_revision(store: CoordinationStore,
                                               request: pytest.FixtureRequest) -> None:
    k = _p(request, "epoch")
    assert await store.compare_and_set(k, b"1", 0) is True  # 0: only if absent
    rev = (await store.snapshot(k)).entries[k].mod_revision
    assert await store.compare_and_set(k, b"2", rev) is True
    assert await store.compare_and_set(k, b"3", rev) is False  # stale revision
    assert (await store.snapshot(k)).value(k) == b"2"
    assert await store.delete_if(k, rev) is False
    assert await store.delete_if(k, (await store.snapshot(k)).entries[k].mod_revision)


async def test_snapshot_is_one_revision(store: CoordinationStore,
                                        request: pytest.FixtureRequest) -> None:
    r1 = await store.put(_p(request, "a"), b"1")
    r2 = await store.put(_p(request, "b"), b"2")
    snap = await store.snapshot(_p(request, ""))
    assert r2 > r1
    assert snap.revision >= r2
    assert sorted(snap.entries) == [_p(request, "a"), _p(request, "b")]


async def test_lease_keeps_and_expires_keys(store: CoordinationStore,
                                            request: pytest.FixtureRequest) -> None:
    k = _p(request, "heartbeat")
    lease = await store.grant_lease(1)
    assert await store.create(k, b"alive", lease=lease)
    for _ in range(3):
        await asyncio.sleep(0.4)
        assert await lease.refresh() >= 1
    assert (await store.snapshot(k)).value(k) == b"alive"
    await lease.revoke()
    assert (await store.snapshot(k)).value(k) is None
    with pytest.raises(LeaseLostError):
        await lease.refresh()


async def test_watch_from_revision_in_order(store: CoordinationStore,
                                            request: pytest.FixtureRequest) -> None:
    prefix = _p(request, "w/")
    start = await store.put(prefix + "a", b"1")
    await store.put(prefix + "b", b"2")
    await store.put(_p(request, "other"), b"x")
    snap = await store.snapshot(prefix + "a")
    await store.delete_if(prefix + "a", snap.entries[prefix + "a"].mod_revision)
    got = []

    async def consume() -> None:
        async for ev in store.watch(prefix, start):
            got.append((ev.kind, ev.key.rsplit("/", 1)[1], ev.value))
            if len(got) == 3:
                return

    await asyncio.wait_for(consume(), 10)
    assert got == [(EventKind.PUT, "a", b"1"), (EventKind.PUT, "b", b"2"),
                   (EventKind.DELETE, "a", b"")]


async def test_unreachable_etcd_is_a_clear_error() -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    store = EtcdStore([("127.0.0.1", port)], timeout=1.0)
    try:
        with pytest.raises(StoreUnavailableError, match="etcd unreachable"):
            await store.put("/x", b"1")
    finally:
        await store.close()


async def test_watch_resumes_after_etcd_restart() -> None:
    server = EtcdServer().start()
    store = EtcdStore([server.endpoint], timeout=2.0, credentials=server.credentials())
    try:  # the restarted etcd has forgotten the client's token: it is renewed
        start = await store.put("/drctl/r/a", b"1")
        got: list[bytes] = []

        async def consume() -> None:
            async for ev in store.watch("/drctl/r/", start):
                got.append(ev.value)
                if len(got) == 2:
                    return

        task = asyncio.create_task(consume())
        await asyncio.sleep(0.3)
        assert got == [b"1"]
        server.kill9()
        await asyncio.sleep(0.5)
        server.start()
        await store.put("/drctl/r/b", b"2")
        await asyncio.wait_for(task, 20)
        assert got == [b"1", b"2"]
    finally:
        await store.close()
        server.stop()


async def test_create_and_swap_writes_both_or_neither(store: CoordinationStore,
                                                      request: pytest.FixtureRequest) -> None:
    """The audit log's append: the next record only if absent, the head only if unmoved."""
    head, k1, k2 = _p(request, "log/head"), _p(request, "log/1"), _p(request, "log/2")
    rev = await store.create_and_swap(k1, b"r1", head, b"1", 0)
    assert rev > 0
    snap = await store.snapshot(_p(request, "log/"))
    assert (snap.value(k1), snap.value(head)) == (b"r1", b"1")
    assert snap.entries[head].mod_revision == rev == snap.entries[k1].mod_revision
    assert await store.create_and_swap(k2, b"r2", head, b"2", 0) == 0  # the head moved
    assert await store.create_and_swap(k1, b"again", head, b"2", rev) == 0  # k1 exists
    snap = await store.snapshot(_p(request, "log/"))
    assert (snap.value(k1), snap.value(k2), snap.value(head)) == (b"r1", None, b"1")
    assert await store.create_and_swap(k2, b"r2", head, b"2", rev) > rev


async def test_snapshot_without_leaves_a_sub_prefix_out(store: CoordinationStore,
                                                        request: pytest.FixtureRequest) -> None:
    base = _p(request, "")
    assert (await store.snapshot_without(base, base + "audit/")).entries == {}
    for key in ("a", "audit/1", "audit/head", "auditx", "z/1"):
        last = await store.put(base + key, key.encode())
    snap = await store.snapshot_without(base, base + "audit/")
    assert sorted(snap.entries) == [base + "a", base + "auditx", base + "z/1"]
    assert snap.revision >= last
    assert snap.entries[base + "z/1"].value == b"z/1"
