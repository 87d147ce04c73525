"""The HTTP API against a real etcd: token auth, queued operations, clear errors."""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator

import pytest
from aiohttp.test_utils import TestClient, TestServer

from failover.api.app import make_app
from failover.config import load
from failover.coordination.etcd import EtcdStore
from failover.errors import FailoverError
from tests.services import EtcdServer

TOKEN = "t" * 24


@pytest.fixture
async def client(workdir: str) -> AsyncIterator[TestClient]:  # type: ignore[type-arg]
    etcd = EtcdServer().start()
    path = os.path.join(workdir, "c.yaml")
    with open(path, "w") as fh:
        json.dump({"cluster": "api", "etcd": [f"127.0.0.1:{etcd.client_port}"],
                   "sites": {"east": {"address": "10.0.0.1"}, "west": {"address": "10.0.0.2"}},
                   "services": {"app": {"primary": "east", "replica": "west"}}}, fh)
    cfg = load(path)
    store = EtcdStore(list(cfg.etcd))
    c = TestClient(TestServer(make_app(cfg, store, TOKEN)))
    await c.start_server()
    try:
        yield c
    finally:
        await c.close()
        await store.close()
        etcd.stop()


AUTH = {"Authorization": f"Bearer {TOKEN}"}


async def test_token_is_required(client: TestClient) -> None:  # type: ignore[type-arg]
    r = await client.get("/api/v1/status")
    assert r.status == 401
    r = await client.get("/api/v1/status", headers={"Authorization": "Bearer wrong"})
    assert r.status == 401
    page = await client.get("/")  # the page itself asks for the token
    assert page.status == 200 and "drctl" in await page.text()


async def test_status_and_queued_operations(client: TestClient) -> None:  # type: ignore[type-arg]
    s = await (await client.get("/api/v1/status", headers=AUTH)).json()
    app = s["services"]["app"]
    assert (app["state"], app["primary"], app["pending"]) == ("healthy", "east", None)
    assert s["sites"]["east"]["alive"] is False
    r = await client.post("/api/v1/services/app/failover", headers=AUTH, json={})
    assert r.status == 202
    body = await r.json()
    assert body["status"] == "queued" and len(body["operation"]) == 12
    s = await (await client.get("/api/v1/status", headers=AUTH)).json()
    assert s["services"]["app"]["pending"] == "failover"
    r = await client.post("/api/v1/services/app/switchover", headers=AUTH)
    assert r.status == 409  # one request at a time per service


async def test_bad_requests(client: TestClient) -> None:  # type: ignore[type-arg]
    assert (await client.post("/api/v1/services/nope/failover", headers=AUTH)).status == 404
    assert (await client.post("/api/v1/services/app/explode", headers=AUTH)).status == 400
    r = await client.post("/api/v1/services/app/failover", headers=AUTH, json={"to": "mars"})
    assert r.status == 400 and "mars" in (await r.json())["message"]


def test_short_tokens_are_refused() -> None:
    with pytest.raises(FailoverError, match="at least 16"):
        make_app(None, None, "short")  # type: ignore[arg-type]
