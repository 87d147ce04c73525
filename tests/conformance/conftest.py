"""The stores every conformance test runs against: the in-memory fake and a real etcd."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest

from failover.coordination.base import CoordinationStore
from failover.coordination.etcd import EtcdStore
from failover.coordination.memory import MemoryStore
from tests.services import EtcdServer


@pytest.fixture(scope="module")
def etcd_server() -> Iterator[EtcdServer]:
    server = EtcdServer().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(params=["memory", "etcd"])
async def store(request: pytest.FixtureRequest) -> AsyncIterator[CoordinationStore]:
    if request.param == "memory":
        s: CoordinationStore = MemoryStore()
    else:
        server = request.getfixturevalue("etcd_server")  # TLS and authentication on
        s = EtcdStore([server.endpoint], timeout=2.0, credentials=server.credentials())
    prefix = f"/drctl/t/{request.node.name}/"  # the drctl user may use /drctl/ only
    try:
        yield s
    finally:
        snap = await s.snapshot(prefix)
        for e in snap.entries.values():
            await s.delete_if(e.key, e.mod_revision)
        await s.close()
