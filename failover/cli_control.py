"""`drctl controller` (run a failover controller), `drctl failover|switchover|failback|retry|
cancel` (a request for the leading controller) and `drctl status`."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
import uuid
from typing import TYPE_CHECKING, Any

from drctl.argtypes import parse_hostport
from failover.cli_common import _bind_error, _check_listen, _config, _daemon, _store, cli_actor

if TYPE_CHECKING:  # heavy imports stay out of every other drctl command's start-up
    from drctl.epochtoken import Signer
    from failover.coordination.etcd import EtcdStore


def cmd_controller(args: argparse.Namespace) -> int:
    from failover.controller import Controller

    cfg = _config(args.config)
    metrics = None
    if args.metrics_tls and not (args.metrics_port or args.metrics_listen):
        from failover.config import ConfigError

        raise ConfigError("--metrics-tls needs --metrics-listen or --metrics-port")
    if args.metrics_port or args.metrics_listen:
        import ssl

        from prometheus_client import CollectorRegistry

        from drctl.metrics_http import MetricsEndpoint, MetricsTlsError, serve_registry
        from failover.config import ConfigError
        from failover.metrics import ControllerMetrics

        registry = CollectorRegistry()
        metrics = ControllerMetrics(registry, list(cfg.sites))
        metrics.known_services(list(cfg.services))
        flag, listen = (("--metrics-listen", args.metrics_listen) if args.metrics_listen
                        else ("--metrics-port", f"127.0.0.1:{args.metrics_port}"))
        addr, number = parse_hostport(listen)  # the parser has checked it
        _check_listen(flag, listen)
        tls_dir = args.tls_dir or os.environ.get("DRCTL_TLS_DIR")
        try:
            if args.metrics_tls:
                if not tls_dir:
                    raise ConfigError("--metrics-tls needs --tls-dir (servers/controller.crt)")
                endpoint = MetricsEndpoint.from_tls_dir(addr, number, tls_dir,
                                                        "servers/controller")
            else:
                endpoint = MetricsEndpoint(addr, number)
            serve_registry(registry, endpoint)
        except (MetricsTlsError, ssl.SSLError) as exc:
            raise ConfigError(f"--metrics-tls: {exc}") from None
        except OSError as exc:
            raise _bind_error(flag, listen, exc) from None
    signer = _epoch_signer(args, any(s.volumes for s in cfg.services.values()))

    def controller(store: EtcdStore) -> Controller:
        c = Controller(cfg, store, args.id, metrics)
        c.signer = signer
        return c

    asyncio.run(_daemon(cfg, controller, args.audit_file))
    return 0


def _epoch_signer(args: argparse.Namespace, volumes: bool) -> Signer | None:
    """The key the controller signs epoch tokens with (None if none is configured: TLS
    replication targets then refuse every epoch change, so with volumes that is a warning)."""
    from drctl.epochtoken import Signer

    key = args.epoch_key
    directory = args.tls_dir or os.environ.get("DRCTL_TLS_DIR")
    if key is None and directory:
        key = os.path.join(directory, "epoch.key")
    if key is None:
        if volumes:
            print("drctl: warning: no --tls-dir/--epoch-key: epoch tokens are not signed (TLS "
                  "replication targets refuse epoch changes without them)", file=sys.stderr)
        return None
    return Signer.load(key)


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
        Actor,
        CommandRecord,
        command_key,
        refuse_request,
        service_record,
        state_key,
    )

    cfg = _config(args.config, secrets=False)  # a request is written to etcd: no key needed
    svc = cfg.services.get(args.service)
    if svc is None:
        raise ConfigError(f"unknown service {args.service!r} (services: "
                          f"{', '.join(sorted(cfg.services))})")
    target = getattr(args, "to", None)
    if target is not None and target not in cfg.sites:
        raise ConfigError(f"--to {target}: unknown site (sites: {', '.join(sorted(cfg.sites))})")
    if args.request == "failover":
        command = Command.FORCE_FAILOVER if args.force else Command.FAILOVER
    else:
        command = Command(_COMMANDS[args.request])
        if args.request == "failback":
            target = svc.primary

    async def send() -> str:
        from failover.audit import AuditLog, mirror_file
        from failover.errors import StoreUnavailableError

        store = _store(cfg)
        audit = AuditLog(store, cfg.prefix, mirror_file(args.audit_file))
        params: dict[str, Any] = {"to": target}
        if args.request == "failover":
            params["force"] = bool(args.force)
        try:
            stored = service_record(await _value(store, state_key(cfg.prefix, svc.name)),
                                    svc.primary, svc.replica)
            refusal = refuse_request(stored, svc.name, args.request, target)
            if refusal is not None:
                raise InvalidTransition(refusal)
            # who asks: the actor of the audit record (user@host)
            rec = CommandRecord(command, target, uuid.uuid4().hex[:12], time.time(),
                                Actor(cli_actor(), via="cli"))
            if not await store.create(command_key(cfg.prefix, svc.name), rec.encode()):
                raise FailoverError(f"{svc.name}: another request is still pending")
            await audit.try_append(cli_actor(), f"cli.{args.request}", svc.name, params,
                                   f"queued (operation {rec.id})")
            return rec.id
        except FailoverError as exc:
            if not isinstance(exc, StoreUnavailableError):  # no etcd: no audit log either
                await audit.try_append(cli_actor(), f"cli.{args.request}", svc.name, params,
                                       f"refused: {exc}")
            raise
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

    cfg = _config(args.config, secrets=False)  # reads etcd only: no TSIG key needed

    async def read() -> dict[str, Any]:
        from failover.records import audit_prefix

        store = _store(cfg)
        try:
            snap = await store.snapshot_without(cfg.prefix, audit_prefix(cfg.prefix))
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
    from failover.status import lag_words, operation_line

    out = [f"leader: {status['leader']}"]
    for site, s in status["sites"].items():
        out.append(f"site {site}: {'alive' if s['alive'] else 'DOWN'}")
        out += [f"  {name}: {v['role']} at epoch {v['epoch']}, data path "
                f"{v['data_path'] or 'not reported'}" for name, v in s["services"].items()]
    for name, s in status["services"].items():
        lag = lag_words(s)
        out.append(f"service {name}: {s['state']} primary={s['primary']} "
                   f"replica={s['replica']} epoch={s['epoch']} lag={lag} -- {s['summary']}"
                   + (f" [error: {s['error']}]" if s["error"] else ""))
        out += [f"  {line}" for line in s["progress"]]
        if s.get("pending"):
            out.append(f"  queued: {s['pending']}, {s['pending_asked']}")
        if s.get("operation"):  # who asked for it: "switchover to west, asked by alice ..."
            out.append(f"  {operation_line(s['operation'])}")
    return out
