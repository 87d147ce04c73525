"""`drctl api`: an aiohttp API with named users and roles, and a one-page operator UI.

Handlers never run a failover inline: a request writes a command record to etcd (exactly
what `drctl failover` does) and returns 202 with the operation id; the leading controller
carries it out and the page follows the service record.

  GET  /                                   the web page (it asks for a token)
  GET  /favicon.svg, /favicon.ico          the page's icon (no token needed)
  GET  /api/v1/status                      services, sites, leader, DNS answers, operations,
                                           and who is asking (viewer and up)
  POST /api/v1/services/{name}/{op}        op: switchover | failback (operator), failover |
                                           retry | cancel (admin) -> 202; 409 when the stored
                                           record rules it out (a target holding no replica,
                                           a switchover while not healthy, a retry or cancel
                                           while nothing failed)
  POST /api/v1/services/{name}/drill       a DR drill (operator; runbook configured) -> 202;
                                           its progress and report appear in the status

A command record names who asked (the user and role: records.Actor); the controller carries
it into the operation and its state changes, and the status (so the page) shows it.

Every API request carries ``Authorization: Bearer <token>`` (users.py: users, roles, tokens);
no cookie is ever set or read, so a page of another site cannot make the browser send a
credential. A POST must also be same-origin (Sec-Fetch-Site, else Origin, when the client
sends them: browsers do) and its body, if any, JSON. Refusals are JSON ``{error, message}``,
checked in this order: 401 (no or unknown token), 403 (another origin), 415 (not JSON), 403
(role too low). Every POST and every refusal is appended to the audit log (failover/audit.py)
with the user as the actor; refusals of unauthenticated requests at most ~1 per 5 s after a
burst of 20 (the rest are counted in the next record), so nobody without a token can flood
etcd through the log. Successful reads (GET) are not recorded.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
import os
import re
import time
import uuid
from collections.abc import Iterable
from dataclasses import asdict
from importlib import resources
from typing import Any

from aiohttp import web

from failover.api.users import NEEDS, User, Users, UsersFileError
from failover.audit import AuditLog
from failover.config import ClusterConfig
from failover.coordination.base import CoordinationStore
from failover.dns.rfc2136 import DnsUpdater
from failover.errors import FailoverError, InvalidTransition, StoreUnavailableError
from failover.fsm import Command
from failover.records import (
    Actor,
    CommandRecord,
    audit_prefix,
    command_key,
    refuse_request,
    service_record,
    state_key,
)
from failover.status import cluster_status

log = logging.getLogger(__name__)

STORE = web.AppKey("store", CoordinationStore)
RUNBOOK = web.AppKey("runbook", object)  # runbooks.model.Runbook | None
DRILLS = web.AppKey("drills", dict)  # service -> recent drill records
TASKS = web.AppKey("tasks", set)
CONFIG = web.AppKey("config", ClusterConfig)
USERS = web.AppKey("users", Users)
AUDIT = web.AppKey("audit", object)  # AuditLog | None
ORIGINS = web.AppKey("origins", frozenset)  # more origins allowed to POST (a proxy's)
ANONYMOUS = web.AppKey("anonymous", object)  # _Bucket: audit records of unknown callers
PAGE = web.AppKey("page", tuple)  # (html, its Content-Security-Policy)
USER = web.RequestKey("user", User)  # who is asking (authenticated)
CLAIMED = web.RequestKey("claimed_user", str)  # the name in a token that was not accepted
AUDIT_PARAMS = web.RequestKey("audit_params", dict)  # what the handler adds to the record
_OPS = {"failover": Command.FAILOVER, "switchover": Command.SWITCHOVER,
        "failback": Command.SWITCHOVER, "retry": Command.RETRY, "cancel": Command.CANCEL}
# what each operation's JSON body may hold ("to": a site name or null; "force": a boolean)
_FIELDS = {"failover": ("to", "force"), "switchover": ("to",), "failback": (), "retry": (),
           "cancel": ()}
_CLAIMED = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_@-]{0,63}$")


def _error(status: int, error: str, message: str) -> web.Response:
    return web.json_response({"error": error, "message": message}, status=status)


class _Bucket:
    """A token bucket: ``burst`` at once, then one per ``every`` seconds."""

    def __init__(self, burst: int = 20, every: float = 5.0) -> None:
        self.burst, self.every = burst, every
        self.tokens, self.at, self.dropped = float(burst), time.monotonic(), 0

    def take(self) -> bool:
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.at) / self.every)
        self.at = now
        if self.tokens >= 1:
            self.tokens -= 1
            return True
        self.dropped += 1
        return False


def _cross_origin(request: web.Request) -> str | None:
    """Why a state-changing request is not same-origin (None: it is, or the client is not a
    browser: no Sec-Fetch-Site, no Origin)."""
    site = request.headers.get("Sec-Fetch-Site")
    if site is not None and site not in ("same-origin", "none"):
        return f"cross-origin request refused (Sec-Fetch-Site: {site})"
    origin = request.headers.get("Origin")
    own = f"{request.scheme}://{request.host}"
    if origin is not None and origin != own and origin not in request.app[ORIGINS]:
        return f"cross-origin request refused (Origin {origin}, this API is {own})"
    return None


def _request_name(request: web.Request) -> tuple[str, str]:
    """(what is asked: a key of NEEDS or a path, the service) for checks and the audit."""
    if request.path == "/api/v1/status":
        return "status", ""
    op = request.match_info.get("op")
    if op is not None:
        return op, request.match_info.get("name", "")
    return f"{request.method} {request.path}", ""


async def _audit(request: web.Request, user: User | None, status: int,
                 outcome: str) -> None:
    audit = request.app[AUDIT]
    if not isinstance(audit, AuditLog):
        return
    what, service = _request_name(request)
    params: dict[str, Any] = {"method": request.method, "remote": request.remote or ""}
    params.update(request.get(AUDIT_PARAMS, {}))
    if user is None:
        bucket = request.app[ANONYMOUS]
        assert isinstance(bucket, _Bucket)
        if not bucket.take():
            return
        if bucket.dropped:
            params["unrecorded_before"], bucket.dropped = bucket.dropped, 0
        claimed = request.get(CLAIMED)
        if claimed:
            params["claimed_user"] = claimed
    await audit.try_append(user.name if user else "anonymous", f"api.{what}", service,
                           params, f"{status} {outcome}")


async def _authenticate(request: web.Request) -> User | None:
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    token = token.strip()
    claimed = token.partition(".")[0]
    if _CLAIMED.match(claimed) and "." in token:
        request[CLAIMED] = claimed
    return await request.app[USERS].authenticate(token)


def _outcome(response: web.StreamResponse) -> str:
    """What the response said, for the audit record."""
    if isinstance(response, web.Response) and response.content_type == "application/json":
        try:
            body = json.loads(response.text or "{}")
        except ValueError:
            body = {}
        if isinstance(body, dict):
            if "operation" in body:
                return f"{body.get('status', 'queued')} (operation {body['operation']})"
            if "error" in body:
                return f"{body['error']}: {body.get('message', '')}"
    return response.reason or ""


@web.middleware
async def guard(request: web.Request, handler: Any) -> web.StreamResponse:
    """Authentication, same-origin and role checks, error bodies, the audit (API paths)."""
    if not request.path.startswith("/api/"):
        return await _handle(request, handler)
    response = await _checked(request, handler)
    if request.method not in ("GET", "HEAD") or response.status in (401, 403, 415):
        await _audit(request, request.get(USER), response.status, _outcome(response))
    response.headers["Cache-Control"] = "no-store"
    return response


async def _checked(request: web.Request, handler: Any) -> web.StreamResponse:
    """Who asks (401 if nobody we know), whether the request may come from where it does
    (403), is JSON (415) and is allowed to the user's role (403); then the handler."""
    try:
        user = await _authenticate(request)
    except UsersFileError as exc:
        log.error("api: %s: nobody gets in until it is fixed", exc)
        return _error(503, exc.code, "the users file is not readable: see the API's log")
    if user is None:
        return _error(401, "unauthorized", "send 'Authorization: Bearer <token>' with a "
                                           "valid token")
    request[USER] = user
    if request.method not in ("GET", "HEAD"):
        refusal = _cross_origin(request)
        if refusal is not None:
            return _error(403, "cross_origin", refusal)
        if request.can_read_body and request.content_type != "application/json":
            return _error(415, "unsupported_media_type", "send the body as JSON "
                                                         "(Content-Type: application/json)")
    what, _ = _request_name(request)
    if what in NEEDS and not user.may(what):
        return _error(403, "forbidden", f"{user.name} ({user.role}) may not {what}: it "
                                        f"needs {NEEDS[what]}")
    return await _handle(request, handler)


async def _handle(request: web.Request, handler: Any) -> web.StreamResponse:
    try:
        response: web.StreamResponse = await handler(request)
        return response
    except StoreUnavailableError as exc:
        return _error(503, exc.code, str(exc))
    except FailoverError as exc:
        return _error(exc.http_status, exc.code, str(exc))
    except web.HTTPException as exc:
        if not request.path.startswith("/api/"):
            raise
        return _error(exc.status, exc.reason.lower().replace(" ", "_"), exc.reason)


async def _headers(request: web.Request, response: web.StreamResponse) -> None:
    h = response.headers
    h.setdefault("X-Content-Type-Options", "nosniff")
    h.setdefault("Referrer-Policy", "no-referrer")
    h.setdefault("X-Frame-Options", "DENY")
    if request.secure:
        h.setdefault("Strict-Transport-Security", "max-age=31536000")


def _page() -> tuple[str, str]:
    """The page and a Content-Security-Policy that allows its one inline script only."""
    html = resources.files("failover.api").joinpath("index.html").read_text(encoding="utf-8")
    script = html.split("<script>", 1)[1].split("</script>", 1)[0]
    digest = base64.b64encode(hashlib.sha256(script.encode()).digest()).decode()
    return html, ("default-src 'none'; connect-src 'self'; style-src 'unsafe-inline'; "
                  f"script-src 'sha256-{digest}'; img-src 'self'; base-uri 'none'; "
                  "form-action 'none'; frame-ancestors 'none'")


async def page(request: web.Request) -> web.Response:
    html, policy = request.app[PAGE]
    return web.Response(text=html, content_type="text/html",
                        headers={"Content-Security-Policy": policy,
                                 "Cache-Control": "no-store"})


# a shield: an SVG the page links to, also served as /favicon.ico (browsers ask for it)
FAVICON = ('<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 16 16">'
           '<path d="M8 1 2 3v5c0 3.5 2.6 6 6 7 3.4-1 6-3.5 6-7V3z" fill="#12b76a"/></svg>')


async def favicon(request: web.Request) -> web.Response:
    return web.Response(text=FAVICON, content_type="image/svg+xml",
                        headers={"Cache-Control": "max-age=86400"})


async def dns_answers(cfg: ClusterConfig) -> dict[str, dict[str, list[str] | None]]:
    out: dict[str, dict[str, list[str] | None]] = {}
    for name, svc in cfg.services.items():
        if not svc.dns:
            continue
        out[name] = {}
        for d in svc.dns:  # every record of the service, on every server
            up = DnsUpdater(d.tsig(), timeout=0.5)
            rr = d.record
            got = await asyncio.gather(*(up.answers(rr, s) for s in d.servers))
            out[name].update({(f"{rr.name}.{rr.zone} @ {s}" if len(svc.dns) > 1 else str(s)):
                              (sorted(g) if g is not None else None)
                              for s, g in zip(d.servers, got, strict=True)})
    return out


async def status(request: web.Request) -> web.Response:
    cfg, store = request.app[CONFIG], request.app[STORE]
    snap = await store.snapshot_without(cfg.prefix, audit_prefix(cfg.prefix))
    out = cluster_status(cfg, snap, time.time())
    answers = await dns_answers(cfg)
    for name, svc in out["services"].items():
        svc["dns"] = answers.get(name)
        svc["drills"] = request.app[DRILLS].get(name, [])[-5:][::-1]
        svc["drill_available"] = request.app[RUNBOOK] is not None
    user = request[USER]
    out["user"] = {"name": user.name, "role": user.role,
                   "may": [op for op in NEEDS if op != "status" and user.may(op)]}
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
    request[AUDIT_PARAMS] = {"body": body}
    problem = _body_problem(op, body)
    if problem is not None:
        return web.json_response({"error": "bad_request", "message": problem}, status=400)
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
    rec = CommandRecord(command, target, uuid.uuid4().hex[:12], time.time(),
                        _actor(request[USER]))
    if not await store.create(command_key(cfg.prefix, name), rec.encode()):
        return web.json_response({"error": "busy", "message": f"{name}: another request is "
                                  "still pending"}, status=409)
    return web.json_response({"operation": rec.id, "service": name, "request": op,
                              "status": "queued"}, status=202)


def _body_problem(op: str, body: dict[str, Any]) -> str | None:
    """Why ``body`` is not a request for ``op`` (None: it is). Unknown fields and values of
    another type are refused, not ignored: {"force": "false"} must not force a failover, nor
    {"target": "west"} fail over to the default site."""
    allowed = _FIELDS[op]
    unknown = sorted(k for k in body if k not in allowed)
    if unknown:
        takes = f"it takes {', '.join(allowed)}" if allowed else "it takes none"
        return f"{op}: unknown field {', '.join(map(repr, unknown))} ({takes})"
    if "force" in body and not isinstance(body["force"], bool):
        return f"{op}: force must be true or false, not {json.dumps(body['force'])}"
    if "to" in body and body["to"] is not None and not isinstance(body["to"], str):
        return f"{op}: to must be a site name, not {json.dumps(body['to'])}"
    return None


def _actor(user: User) -> Actor:
    """Who asks, as the command record (and so the operation) names them."""
    return Actor(user.name, user.role, "api")


async def _drill(request: web.Request, name: str) -> web.Response:
    rb = request.app[RUNBOOK]
    if rb is None:
        return web.json_response({"error": "no_runbook", "message": "start the API with a "
                                  "runbook as --config to run drills"}, status=409)
    drills = request.app[DRILLS].setdefault(name, [])
    if any(d["status"] == "running" for d in drills):
        return web.json_response({"error": "busy", "message": f"a drill of {name} is "
                                  "already running"}, status=409)
    by = _actor(request[USER])
    record: dict[str, Any] = {"id": uuid.uuid4().hex[:12], "status": "running",
                              "started_at": time.time(), "report": None,
                              "asked_by": asdict(by), "asked": by.describe()}
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


def make_app(cfg: ClusterConfig, store: CoordinationStore, users: Users | str,
             runbook: object | None = None, audit: AuditLog | None = None,
             origins: Iterable[str] = ()) -> web.Application:
    """``users``: a Users, or one token (a single admin, as with --token-file)."""
    if isinstance(users, str):
        users = Users(token=users)
    app = web.Application(middlewares=[guard])
    app[CONFIG], app[STORE], app[USERS], app[AUDIT] = cfg, store, users, audit
    app[ORIGINS], app[ANONYMOUS], app[PAGE] = frozenset(origins), _Bucket(), _page()
    app[RUNBOOK], app[DRILLS] = runbook, {}
    app.cleanup_ctx.append(_tasks_ctx)
    app.on_response_prepare.append(_headers)
    app.router.add_get("/", page)
    app.router.add_get("/favicon.svg", favicon)
    app.router.add_get("/favicon.ico", favicon)
    app.router.add_get("/api/v1/status", status)
    app.router.add_post("/api/v1/services/{name}/{op}", operate)
    return app


def read_token(path: str | None) -> str | None:
    """The --token-file token (or $DRCTL_API_TOKEN); None if neither is given."""
    if path:
        with open(path, encoding="utf-8") as fh:
            return fh.read().strip()
    return os.environ.get("DRCTL_API_TOKEN") or None

