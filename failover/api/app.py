"""`drctl api`: an aiohttp API with bearer-token auth and a one-page operator UI.

Handlers never run a failover inline: a request writes a command record to etcd (exactly
what `drctl failover` does) and returns 202 with the operation id; the leading controller
carries it out and the page follows the service record.

  GET  /                                   the web page (it asks for the token)
  GET  /api/v1/status                      services, sites, leader, DNS answers, operations
  POST /api/v1/services/{name}/{op}        op: failover | switchover | failback | retry |
                                           cancel -> 202; 409 when the stored record rules
                                           it out (a target holding no replica, a
                                           switchover while not healthy, a retry or cancel
                                           while nothing failed)
  POST /api/v1/services/{name}/drill       a DR drill (runbook configured) -> 202; its
                                           progress and report appear in the status
"""

from __future__ import annotations

import asyncio
import hmac
import json
import os
import time
import uuid
from importlib import resources
from typing import Any

from aiohttp import web

from failover.config import ClusterConfig
from failover.coordination.base import CoordinationStore
from failover.dns.rfc2136 import DnsUpdater
from failover.errors import FailoverError, InvalidTransition, StoreUnavailableError
from failover.fsm import Command
from failover.records import (
    CommandRecord,
    command_key,
    refuse_request,
    service_record,
    state_key,
)
from failover.status import cluster_status

STORE = web.AppKey("store", CoordinationStore)
RUNBOOK = web.AppKey("runbook", object)  # runbooks.model.Runbook | None
DRILLS = web.AppKey("drills", dict)  # service -> recent drill records
TASKS = web.AppKey("tasks", set)
CONFIG = web.AppKey("config", ClusterConfig)
TOKEN = web.AppKey("token", str)
_OPS = {"failover": Command.FAILOVER, "switchover": Command.SWITCHOVER,
        "failback": Command.SWITCHOVER, "retry": Command.RETRY, "cancel": Command.CANCEL}


@web.middleware
async def auth(request: web.Request, handler: Any) -> web.StreamResponse:
    if request.path.startswith("/api/"):
        expected = request.app[TOKEN]
        given = request.headers.get("Authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {expected}".encode()):
            return web.json_response({"error": "unauthorized", "message": "send "
                                      "'Authorization: Bearer <token>'"}, status=401)
    try:
        response: web.StreamResponse = await handler(request)
        return response
    except StoreUnavailableError as exc:
        return web.json_response({"error": exc.code, "message": str(exc)}, status=503)
    except FailoverError as exc:
        return web.json_response({"error": exc.code, "message": str(exc)},
                                 status=exc.http_status)


async def page(request: web.Request) -> web.Response:
    html = resources.files("failover.api").joinpath("index.html").read_text(encoding="utf-8")
    return web.Response(text=html, content_type="text/html")


async def dns_answers(cfg: ClusterConfig) -> dict[str, dict[str, list[str] | None]]:
    out: dict[str, dict[str, list[str] | None]] = {}
    for name, svc in cfg.services.items():
        if svc.dns is None:
            continue
        up = DnsUpdater(svc.dns.key, timeout=0.5)
        rr = svc.dns.record
        got = await asyncio.gather(*(up.answers(rr, s) for s in svc.dns.servers))
        out[name] = {str(s): (sorted(g) if g is not None else None)
                     for s, g in zip(svc.dns.servers, got, strict=True)}
    return out


async def status(request: web.Request) -> web.Response:
    cfg, store = request.app[CONFIG], request.app[STORE]
    snap = await store.snapshot(cfg.prefix)
    out = cluster_status(cfg, snap, time.time())
    answers = await dns_answers(cfg)
    for name, svc in out["services"].items():
        svc["dns"] = answers.get(name)
        svc["drills"] = request.app[DRILLS].get(name, [])[-5:][::-1]
        svc["drill_available"] = request.app[RUNBOOK] is not None
    return web.json_response(out)


async def operate(request: web.Request) -> web.Response:
    cfg, store = request.app[CONFIG], request.app[STORE]
    name, op = request.match_info["name"], request.match_info["op"]
    svc = cfg.services.get(name)
    if svc is None:
        return web.json_response({"error": "not_found", "message": f"no service {name!r}"},
                                 status=404)
    if op == "drill":
        return await _drill(request, name)
    if op not in _OPS:
        return web.json_response({"error": "bad_operation", "message": f"unknown operation "
                                  f"{op!r} ({', '.join([*_OPS, 'drill'])})"}, status=400)
    body: dict[str, Any] = {}
    if request.can_read_body:
        try:
            raw: Any = await request.json()
        except ValueError:
            raw = None
        if not isinstance(raw, dict):
            return web.json_response({"error": "bad_request", "message": "body is not a "
                                      "JSON object"}, status=400)
        body = raw
    command = _OPS[op]
    if op == "failover" and body.get("force"):
        command = Command.FORCE_FAILOVER
    target = svc.primary if op == "failback" else None if op in ("retry", "cancel") \
        else body.get("to")
    if target is not None and target not in cfg.sites:
        return web.json_response({"error": "bad_request", "message": f"unknown site "
                                  f"{target!r}"}, status=400)
    key = state_key(cfg.prefix, name)
    stored = service_record((await store.snapshot(key)).value(key), svc.primary, svc.replica)
    refusal = refuse_request(stored, name, op, target)
    if refusal is not None:
        raise InvalidTransition(refusal)  # 409 {"error": "invalid_transition", "message"}
    rec = CommandRecord(command, target, uuid.uuid4().hex[:12], time.time())
    if not await store.create(command_key(cfg.prefix, name), rec.encode()):
        return web.json_response({"error": "busy", "message": f"{name}: another request is "
                                  "still pending"}, status=409)
    return web.json_response({"operation": rec.id, "service": name, "request": op,
                              "status": "queued"}, status=202)


async def _drill(request: web.Request, name: str) -> web.Response:
    rb = request.app[RUNBOOK]
    if rb is None:
        return web.json_response({"error": "no_runbook", "message": "start the API with a "
                                  "runbook as --config to run drills"}, status=409)
    drills = request.app[DRILLS].setdefault(name, [])
    if any(d["status"] == "running" for d in drills):
        return web.json_response({"error": "busy", "message": f"a drill of {name} is "
                                  "already running"}, status=409)
    record: dict[str, Any] = {"id": uuid.uuid4().hex[:12], "status": "running",
                              "started_at": time.time(), "report": None}
    drills.append(record)

    async def work() -> None:
        from runbooks.drill import run_drill

        try:
            report = await run_drill(rb, name, f"drill-{record['id']}")  # type: ignore[arg-type]
            record["report"] = json.loads(report.to_json())
            record["status"] = "passed" if report.ok else "failed"
        except Exception as exc:
            record["status"], record["error"] = "failed", f"{type(exc).__name__}: {exc}"

    task = asyncio.get_running_loop().create_task(work())
    request.app[TASKS].add(task)
    task.add_done_callback(request.app[TASKS].discard)
    return web.json_response({"operation": record["id"], "service": name, "request": "drill",
                              "status": "queued"}, status=202)


async def _tasks_ctx(app: web.Application) -> Any:
    """Background drills belong to the app: cancelled and awaited on shutdown."""
    tasks: set[asyncio.Task[None]] = set()
    app[TASKS] = tasks
    yield
    for task in list(tasks):
        task.cancel()
    if tasks:
        await asyncio.wait(tasks)


def make_app(cfg: ClusterConfig, store: CoordinationStore, token: str,
             runbook: object | None = None) -> web.Application:
    if len(token) < 16:
        raise FailoverError("the API token must be at least 16 characters")
    app = web.Application(middlewares=[auth])
    app[CONFIG], app[STORE], app[TOKEN] = cfg, store, token
    app[RUNBOOK], app[DRILLS] = runbook, {}
    app.cleanup_ctx.append(_tasks_ctx)
    app.router.add_get("/", page)
    app.router.add_get("/api/v1/status", status)
    app.router.add_post("/api/v1/services/{name}/{op}", operate)
    return app


def read_token(path: str | None) -> str:
    if path:
        with open(path, encoding="utf-8") as fh:
            return fh.read().strip()
    token = os.environ.get("DRCTL_API_TOKEN", "")
    if not token:
        raise FailoverError("no API token: pass --token-file or set DRCTL_API_TOKEN")
    return token
