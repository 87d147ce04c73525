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
                   "sites": {"east": {"address": "10.0.0.1"}, "west": {"address": "10.0.0.2"},
                             "north": {"address": "10.0.0.3"}},
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


async def test_requests_the_record_rules_out_are_refused_409(
        client: TestClient) -> None:  # type: ignore[type-arg]
    for body in ({"to": "north"}, {"to": "east"}):
        r = await client.post("/api/v1/services/app/failover", headers=AUTH, json=body)
        assert r.status == 409
        err = await r.json()
        assert err["error"] == "invalid_transition"
        assert err["message"].startswith(f"failover to {body['to']} refused: ")
        assert "(replica: west)" in err["message"]
    r = await client.post("/api/v1/services/app/failover", headers=AUTH, json={"to": "north"})
    assert "north holds no replica of app" in (await r.json())["message"]
    r = await client.post("/api/v1/services/app/failback", headers=AUTH)  # east is primary
    assert r.status == 409 and "already the primary" in (await r.json())["message"]
    for op in ("retry", "cancel"):  # nothing failed
        r = await client.post(f"/api/v1/services/app/{op}", headers=AUTH)
        assert r.status == 409
        assert (await r.json())["message"] == (f"{op} of app refused: nothing failed (the "
                                               "service is healthy)")
    s = await (await client.get("/api/v1/status", headers=AUTH)).json()
    assert s["services"]["app"]["pending"] is None  # nothing was written
    r = await client.post("/api/v1/services/app/failover", headers=AUTH, json=["west"])
    assert r.status == 400


async def test_retry_and_cancel_queue_commands_when_failed(
        client: TestClient) -> None:  # type: ignore[type-arg]
    from failover.api.app import CONFIG, STORE
    from failover.fsm import State
    from failover.records import Operation, ServiceRecord, state_key

    app = client.app
    assert app is not None
    failed = ServiceRecord(State.FAILED, 1.0, "east", "west", epoch=2,
                           operation=Operation("failover", "east", "west", 1.0,
                                               failed_step="rerouting", error="DNS refused"))
    await app[STORE].put(state_key(app[CONFIG].prefix, "app"), failed.encode())
    r = await client.post("/api/v1/services/app/switchover", headers=AUTH)
    assert r.status == 409 and "the service is failed, not healthy" in (await r.json())["message"]
    r = await client.post("/api/v1/services/app/retry", headers=AUTH, json={"to": "north"})
    assert r.status == 202 and (await r.json())["request"] == "retry"
    s = await (await client.get("/api/v1/status", headers=AUTH)).json()
    svc = s["services"]["app"]
    assert (svc["pending"], svc["state"], svc["error"]) == ("retry", "failed", "DNS refused")
    assert svc["progress"] == ["failed in rerouting: DNS refused (retry or cancel)"]
    r = await client.post("/api/v1/services/app/cancel", headers=AUTH)
    assert r.status == 409 and (await r.json())["error"] == "busy"  # one request at a time


def test_short_tokens_are_refused() -> None:
    with pytest.raises(FailoverError, match="at least 16"):
        make_app(None, None, "short")  # type: ignore[arg-type]
