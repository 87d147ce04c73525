"""`drctl agent`, `drctl controller`, `drctl failover|switchover|failback|retry|cancel|status`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
import uuid
from contextlib import AsyncExitStack
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # heavy imports stay out of every other drctl command's start-up
    from failover.config import ClusterConfig
    from failover.coordination.etcd import EtcdStore
    from runbooks.model import Runbook


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    c = sub.add_parser("controller", help="run a failover controller (one of them leads)")
    c.add_argument("--config", required=True)
    c.add_argument("--id", help="controller id (default: host-pid)")
    c.add_argument("--metrics-port", type=int)
    c.set_defaults(func=cmd_controller)

    for name, helptext in (("failover", "fail a service over to its replica site"),
                           ("switchover", "planned switchover: drain to zero lag first"),
                           ("failback", "planned switchover back to the configured primary"),
                           ("retry", "run a failed service's failed step again"),
                           ("cancel", "abandon a failed operation: back to healthy with the "
                                      "roles as recorded")):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("service")
        p.add_argument("--config", required=True)
        if name == "failover":
            p.add_argument("--to", help="target site (default: the replica)")
            p.add_argument("--force", action="store_true",
                           help="fail over even beyond the RPO budget (accepts data loss)")
        p.set_defaults(func=cmd_request, request=name)

    w = sub.add_parser("api", help="serve the HTTP API and the operator's web page")
    w.add_argument("--config", required=True)
    w.add_argument("--listen", default="127.0.0.1:8080", metavar="HOST:PORT")
    w.add_argument("--token-file", help="file holding the bearer token "
                   "(default: $DRCTL_API_TOKEN)")
    w.set_defaults(func=cmd_api)

    s = sub.add_parser("status", help="services, sites and the leading controller")
    s.add_argument("--config", required=True)
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_status)


def _config(path: str) -> ClusterConfig:
    return _load(path)[0]


def _load(path: str) -> tuple[ClusterConfig, Runbook | None]:
    """A cluster configuration, or a runbook (``kind: drctl-runbook``) and the configuration
    it makes."""
    from failover.config import ConfigError, load

    try:
        with open(path, encoding="utf-8") as fh:
            is_runbook = "drctl-runbook" in fh.read(4096)
    except OSError as exc:
        raise ConfigError(f"{path}: {exc.strerror}") from exc
    if not is_runbook:
        return load(path), None
    from runbooks.cluster import to_cluster
    from runbooks.loader import RunbookError
    from runbooks.loader import load as load_runbook

    try:
        runbook = load_runbook(path)
    except RunbookError as exc:
        raise ConfigError("\n".join(exc.errors)) from None
    return to_cluster(runbook), runbook


def _store(cfg: ClusterConfig) -> EtcdStore:
    from failover.coordination.etcd import EtcdStore

    return EtcdStore(list(cfg.etcd), timeout=max(1.0, cfg.lease_ttl / 2))


async def _daemon(cfg: ClusterConfig, make: Any) -> None:
    from drctl.lifecycle import stop_on_signals

    stop = asyncio.Event()
    async with AsyncExitStack() as stack:
        stop_on_signals(stack, stop)
        store = _store(cfg)
        stack.push_async_callback(store.close)
        await make(store).run(stop)


def cmd_controller(args: argparse.Namespace) -> int:
    from failover.controller import Controller

    cfg = _config(args.config)
    metrics = None
    if args.metrics_port:
        from prometheus_client import CollectorRegistry, start_http_server

        from failover.metrics import ControllerMetrics

        registry = CollectorRegistry()
        metrics = ControllerMetrics(registry, list(cfg.sites))
        metrics.known_services(list(cfg.services))
        start_http_server(args.metrics_port, addr="127.0.0.1", registry=registry)
    asyncio.run(_daemon(cfg, lambda store: Controller(cfg, store, args.id, metrics)))
    return 0


_COMMANDS = {"switchover": "switchover", "failback": "switchover", "retry": "retry",
             "cancel": "cancel"}


def cmd_request(args: argparse.Namespace) -> int:
    """Write the request as a command record for the leading controller. A request the stored
    record already rules out (a target that holds no replica, a switchover of a service that
    is not healthy, a retry of one that has not failed) is refused here, before anything is
    written."""
    from failover.config import ConfigError
    from failover.errors import FailoverError, InvalidTransition
    from failover.fsm import Command
    from failover.records import (
        CommandRecord,
        command_key,
        refuse_request,
        service_record,
        state_key,
    )

    cfg = _config(args.config)
    svc = cfg.services.get(args.service)
    if svc is None:
        raise ConfigError(f"unknown service {args.service!r} (services: "
                          f"{', '.join(sorted(cfg.services))})")
    target = getattr(args, "to", None)
    if target is not None and target not in cfg.sites:
        raise ConfigError(f"--to {target}: unknown site")
    if args.request == "failover":
        command = Command.FORCE_FAILOVER if args.force else Command.FAILOVER
    else:
        command = Command(_COMMANDS[args.request])
        if args.request == "failback":
            target = svc.primary

    async def send() -> str:
        store = _store(cfg)
        try:
            stored = service_record(await _value(store, state_key(cfg.prefix, svc.name)),
                                    svc.primary, svc.replica)
            refusal = refuse_request(stored, svc.name, args.request, target)
            if refusal is not None:
                raise InvalidTransition(refusal)
            rec = CommandRecord(command, target, uuid.uuid4().hex[:12], time.time())
            if not await store.create(command_key(cfg.prefix, svc.name), rec.encode()):
                raise FailoverError(f"{svc.name}: another request is still pending")
            return rec.id
        finally:
            await store.close()

    op = asyncio.run(send())
    print(f"{args.request} of {svc.name} requested (operation {op}); follow it with "
          f"`drctl status --config {args.config}`")
    return 0


async def _value(store: EtcdStore, key: str) -> bytes | None:
    return (await store.snapshot(key)).value(key)


def cmd_status(args: argparse.Namespace) -> int:
    from failover.status import cluster_status

    cfg = _config(args.config)

    async def read() -> dict[str, Any]:
        store = _store(cfg)
        try:
            snap = await store.snapshot(cfg.prefix)
        finally:
            await store.close()
        return cluster_status(cfg, snap, time.time())

    status = asyncio.run(read())
    if args.json:
        print(json.dumps(status, indent=1, default=str))
    else:
        print("\n".join(status_lines(status)))
    return 0


def status_lines(status: dict[str, Any]) -> list[str]:
    from failover.fsm import seconds

    out = [f"leader: {status['leader']}"]
    for site, s in status["sites"].items():
        out.append(f"site {site}: {'alive' if s['alive'] else 'DOWN'}")
        out += [f"  {name}: {v['role']} at epoch {v['epoch']}, data path "
                f"{v['data_path'] or 'not reported'}" for name, v in s["services"].items()]
    for name, s in status["services"].items():
        out.append(f"service {name}: {s['state']} primary={s['primary']} "
                   f"replica={s['replica']} epoch={s['epoch']} "
                   f"lag={seconds(s['lag_seconds'])} -- {s['message']}"
                   + (f" [error: {s['error']}]" if s["error"] else ""))
        out += [f"  {line}" for line in s["progress"]]
    return out


def cmd_api(args: argparse.Namespace) -> int:
    from aiohttp import web

    from drctl.lifecycle import stop_on_signals
    from failover.api.app import make_app, read_token

    cfg, runbook = _load(args.config)
    token = read_token(args.token_file)
    host, _, port = args.listen.rpartition(":")

    async def serve() -> None:
        stop = asyncio.Event()
        async with AsyncExitStack() as stack:
            stop_on_signals(stack, stop)
            store = _store(cfg)
            stack.push_async_callback(store.close)
            runner = web.AppRunner(make_app(cfg, store, token, runbook), access_log=None)
            await runner.setup()
            stack.push_async_callback(runner.cleanup)
            site = web.TCPSite(runner, host or "127.0.0.1", int(port))
            await site.start()
            print(f"drctl api: http://{host or '127.0.0.1'}:{port}/", flush=True)
            await stop.wait()

    asyncio.run(serve())
    return 0
