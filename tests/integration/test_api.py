"""The HTTP API against a real etcd: users and roles, same-origin POSTs, queued operations,
clear errors, every refusal in the audit log."""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator

import pytest
from aiohttp.test_utils import TestClient, TestServer

from failover.api.app import make_app
from failover.api.users import Users, add_user
from failover.audit import AuditLog, read_etcd, verify
from failover.config import load
from failover.coordination.etcd import EtcdStore
from failover.errors import FailoverError
from tests.services import EtcdServer

TOKENS: dict[str, str] = {}


@pytest.fixture
async def client(workdir: str) -> AsyncIterator[TestClient]:  # type: ignore[type-arg]
    users = os.path.join(workdir, "users.json")
    for role in ("viewer", "operator", "admin"):
        TOKENS[role] = add_user(users, role[:3] + "-user", role)
    TOKENS["alice"] = add_user(users, "alice", "operator")
    AUTH["Authorization"] = f"Bearer {TOKENS['admin']}"
    etcd = EtcdServer().start()
    path = os.path.join(workdir, "c.yaml")
    with open(path, "w") as fh:
        json.dump({"cluster": "api", "etcd": etcd.etcd_config(),
                   "sites": {"east": {"address": "10.0.0.1"}, "west": {"address": "10.0.0.2"},
                             "north": {"address": "10.0.0.3"}},
                   "services": {"app": {"primary": "east", "replica": "west"}}}, fh)
    cfg = load(path)
    store = EtcdStore(list(cfg.etcd), credentials=cfg.etcd_credentials)
    audit = AuditLog(store, cfg.prefix, os.path.join(workdir, "audit.jsonl"))
    c = TestClient(TestServer(make_app(cfg, store, Users(users), audit=audit)))
    await c.start_server()
    try:
        yield c
    finally:
        await c.close()
        await store.close()
        etcd.stop()


def auth(role: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {TOKENS[role]}"}


AUTH: dict[str, str] = {}  # the admin's header (its token is made per test)


async def _chain(client: TestClient) -> list[dict[str, object]]:  # type: ignore[type-arg]
    from failover.api.app import CONFIG, STORE

    app = client.app
    assert app is not None
    chain = await read_etcd(app[STORE], app[CONFIG].prefix)
    verify(chain, "etcd", with_head=True)
    return [s.record for s in chain.slots if s.record is not None]


async def test_token_is_required(client: TestClient) -> None:  # type: ignore[type-arg]
    r = await client.get("/api/v1/status")
    assert r.status == 401
    assert set(await r.json()) == {"error", "message"}
    r = await client.get("/api/v1/status", headers={"Authorization": "Bearer wrong"})
    assert r.status == 401 and (await r.json())["error"] == "unauthorized"
    forged = TOKENS["admin"][:-4] + "AAAA"  # the admin's name, not its token
    r = await client.post("/api/v1/services/app/failover", json={},
                          headers={"Authorization": f"Bearer {forged}"})
    assert r.status == 401
    page = await client.get("/")  # the page itself asks for the token
    assert page.status == 200 and "drctl" in await page.text()
    assert "script-src 'sha256-" in page.headers["Content-Security-Policy"]
    assert "Set-Cookie" not in page.headers
    records = await _chain(client)
    assert [(r["actor"], r["action"], str(r["outcome"]).split(" ")[0]) for r in records] == [
        ("anonymous", "api.status", "401"), ("anonymous", "api.status", "401"),
        ("anonymous", "api.failover", "401")]
    assert records[2]["params"]["claimed_user"] == "adm-user"  # type: ignore[index]
    assert TOKENS["admin"] not in json.dumps(records) and forged not in json.dumps(records)


async def test_roles(client: TestClient) -> None:  # type: ignore[type-arg]
    from failover.api.app import CONFIG, STORE
    from failover.fsm import State
    from failover.records import ServiceRecord, command_key, state_key

    app = client.app
    assert app is not None
    # protected once (a new service is unprotected: no switchover)
    await app[STORE].put(state_key(app[CONFIG].prefix, "app"),
                         ServiceRecord(State.HEALTHY, 1.0, "east", "west").encode())
    s = await (await client.get("/api/v1/status", headers=auth("viewer"))).json()
    assert s["user"] == {"name": "vie-user", "role": "viewer", "may": []}
    r = await client.post("/api/v1/services/app/failover", headers=auth("viewer"), json={})
    assert r.status == 403
    assert await r.json() == {"error": "forbidden", "message": "vie-user (viewer) may not "
                              "failover: it needs admin"}
    assert (await client.post("/api/v1/services/app/switchover", headers=auth("viewer"),
                              json={})).status == 403
    r = await client.post("/api/v1/services/app/failover", headers=auth("operator"),
                          json={"force": True})
    assert r.status == 403 and "needs admin" in (await r.json())["message"]
    for op in ("retry", "cancel"):
        assert (await client.post(f"/api/v1/services/app/{op}",
                                  headers=auth("operator"))).status == 403
    r = await client.post("/api/v1/services/app/switchover", headers=auth("operator"),
                          json={})
    assert r.status == 202, await r.text()
    key = command_key(app[CONFIG].prefix, "app")
    entry = (await app[STORE].snapshot(key)).entries[key]
    assert await app[STORE].delete_if(key, entry.mod_revision)
    r = await client.post("/api/v1/services/app/failover", headers=auth("admin"),
                          json={"force": True})
    assert r.status == 202
    records = await _chain(client)
    assert [(r["actor"], r["action"], str(r["outcome"])[:3]) for r in records] == [
        ("vie-user", "api.failover", "403"), ("vie-user", "api.switchover", "403"),
        ("ope-user", "api.failover", "403"), ("ope-user", "api.retry", "403"),
        ("ope-user", "api.cancel", "403"), ("ope-user", "api.switchover", "202"),
        ("adm-user", "api.failover", "202")]
    assert records[-1]["params"]["body"] == {"force": True}  # type: ignore[index]
    assert records[-1]["target"] == "app"


async def test_cross_origin_and_non_json_posts_are_refused(
        client: TestClient) -> None:  # type: ignore[type-arg]
    url = "/api/v1/services/app/failover"
    for headers in ({"Origin": "https://evil.example"}, {"Sec-Fetch-Site": "cross-site"},
                    {"Sec-Fetch-Site": "same-site", "Origin": "https://a.example"}):
        r = await client.post(url, headers={**auth("admin"), **headers}, json={})
        assert r.status == 403, headers
        assert (await r.json())["error"] == "cross_origin"
    r = await client.post(url, headers=auth("admin"), data="to=west")
    assert r.status == 415 and (await r.json())["error"] == "unsupported_media_type"
    s = await (await client.get("/api/v1/status", headers=auth("admin"))).json()
    assert s["services"]["app"]["pending"] is None  # nothing was written
    own = str(client.make_url("/")).rstrip("/")
    r = await client.post(url, json={}, headers={**auth("admin"), "Origin": own,
                                                 "Sec-Fetch-Site": "same-origin"})
    assert r.status == 202, await r.text()
    outcomes = [str(r["outcome"])[:3] for r in await _chain(client)]
    assert outcomes == ["403", "403", "403", "415", "202"]


async def test_status_and_queued_operations(client: TestClient) -> None:  # type: ignore[type-arg]
    s = await (await client.get("/api/v1/status", headers=AUTH)).json()
    app = s["services"]["app"]
    # a new service, before its primary's first protected report: it says so
    assert (app["state"], app["primary"], app["pending"]) == ("unprotected", "east", None)
    assert (app["lag_seconds"], app["protected"], app["history"], app["operations"]) == (
        None, None, [], [])
    assert app["summary"] == app["message"] == ("unprotected: a new service; its primary has "
                                                "not reported its replica protected yet")
    assert app["progress"] == ["unprotected: the replica site west is down"]
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
    # a field misspelt or of another type is refused, never read loosely: the string
    # "false" must not force a failover, nor "target" fail over to the default site
    for op, body, words in (
            ("failover", {"force": "false"}, 'force must be true or false, not "false"'),
            ("failover", {"target": "west"}, "unknown field 'target' (it takes to, force)"),
            ("switchover", {"force": True}, "unknown field 'force' (it takes to)"),
            ("failback", {"to": "west"}, "unknown field 'to' (it takes none)"),
            ("failover", {"to": 1}, "to must be a site name, not 1")):
        r = await client.post(f"/api/v1/services/app/{op}", headers=AUTH, json=body)
        assert r.status == 400, (op, body)
        assert words in (await r.json())["message"]
    s = await (await client.get("/api/v1/status", headers=AUTH)).json()
    assert s["services"]["app"]["pending"] is None  # nothing was queued


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
                                               "service is unprotected)")
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
    assert r.status == 400  # a retry goes where the failed operation went: it takes no site
    assert "unknown field 'to' (it takes none)" in (await r.json())["message"]
    r = await client.post("/api/v1/services/app/retry", headers=AUTH, json={})
    assert r.status == 202 and (await r.json())["request"] == "retry"
    s = await (await client.get("/api/v1/status", headers=AUTH)).json()
    svc = s["services"]["app"]
    assert (svc["pending"], svc["state"], svc["error"]) == ("retry", "failed", "DNS refused")
    assert svc["progress"] == ["failed in rerouting: DNS refused (retry or cancel)"]
    r = await client.post("/api/v1/services/app/cancel", headers=AUTH)
    assert r.status == 409 and (await r.json())["error"] == "busy"  # one request at a time


async def test_the_status_names_who_asked_for_the_operation(
        client: TestClient) -> None:  # type: ignore[type-arg]
    """alice (operator) asks for a switchover: the queued command, then the operation the
    controller starts and its state change, name her and her role."""
    import time

    from failover.api.app import CONFIG, STORE
    from failover.controller import Controller
    from failover.fsm import State
    from failover.records import (
        CommandRecord,
        Heartbeat,
        ServiceHealth,
        ServiceRecord,
        command_key,
        heartbeat_key,
        state_key,
    )

    app = client.app
    assert app is not None
    cfg, store = app[CONFIG], app[STORE]
    await store.put(state_key(cfg.prefix, "app"),
                    ServiceRecord(State.HEALTHY, time.time(), "east", "west").encode())
    for site, health in (("east", ServiceHealth("primary", 1, lag_seconds=0.1, protected=True,
                                                data_path="running")),
                         ("west", ServiceHealth("replica", 1, data_path="running"))):
        await store.put(heartbeat_key(cfg.prefix, site),
                        Heartbeat(site, time.time(), {"app": health}).encode())
    asked = time.time()
    r = await client.post("/api/v1/services/app/switchover", headers=auth("alice"))
    assert r.status == 202, await r.text()
    raw = (await store.snapshot(cfg.prefix)).value(command_key(cfg.prefix, "app"))
    assert raw is not None
    cmd = CommandRecord.decode(raw)
    assert (cmd.by and (cmd.by.name, cmd.by.role, cmd.by.via)) == ("alice", "operator", "api")
    s = await (await client.get("/api/v1/status", headers=AUTH)).json()
    svc = s["services"]["app"]
    assert (svc["pending"], svc["pending_asked"]) == ("switchover", "asked by alice (operator)")
    controller = Controller(cfg, store, "c0")
    controller.leader_since = time.monotonic() - 10 * cfg.lease_ttl
    await controller.tick()
    s = await (await client.get("/api/v1/status", headers=AUTH)).json()
    svc = s["services"]["app"]
    assert svc["state"] == "draining" and svc["pending"] is None
    op = svc["operation"]
    assert (op["kind"], op["target"], op["current"]) == ("switchover", "west", True)
    assert op["asked_by"] == {"name": "alice", "role": "operator", "via": "api"}
    assert op["asked"] == "asked by alice (operator)"
    assert asked - 1 <= op["asked_at"] <= time.time()
    change = svc["operations"][0]
    assert (change["from"], change["to"]) == ("healthy", "draining")
    assert change["operation"]["asked"] == "asked by alice (operator)"


def test_short_tokens_are_refused() -> None:
    with pytest.raises(FailoverError, match="at least 16"):
        make_app(None, None, "short")  # type: ignore[arg-type]


def test_a_users_file_others_may_read_is_refused(workdir: str) -> None:
    path = os.path.join(workdir, "users.json")
    add_user(path, "alice", "admin")
    os.chmod(path, 0o644)
    with pytest.raises(FailoverError, match="group or others may access"):
        Users(path)


async def test_the_page_and_its_icon_need_no_token(client: TestClient) -> None:  # type: ignore[type-arg]
    r = await client.get("/")
    assert r.status == 200 and '<link rel="icon" type="image/svg+xml" href="/favicon.svg">' \
        in await r.text()
    for path in ("/favicon.svg", "/favicon.ico"):
        r = await client.get(path)
        assert r.status == 200 and r.content_type == "image/svg+xml"
        assert (await r.text()).startswith("<svg ")
