"""`drctl controller`, `drctl failover|switchover|failback|retry|cancel|status`, `drctl api`
(and `drctl api users`), `drctl audit show|verify`.

Requests, controller decisions and agent role changes are appended to the audit log
(failover/audit.py); `record_audit()` appends one record from any other short-lived command.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
import uuid
from contextlib import AsyncExitStack
from typing import TYPE_CHECKING, Any

from drctl.argtypes import hostport, natural, parse_hostport, port

if TYPE_CHECKING:  # heavy imports stay out of every other drctl command's start-up
    from drctl.epochtoken import Signer
    from failover.config import ClusterConfig
    from failover.coordination.etcd import EtcdStore
    from runbooks.model import Runbook


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    c = sub.add_parser("controller", help="run a failover controller (one of them leads)")
    c.add_argument("--config", required=True)
    c.add_argument("--id", help="controller id (default: host-pid)")
    c.add_argument("--metrics-port", type=port, metavar="PORT",
                   help="serve the controller's metrics on 127.0.0.1:PORT")
    c.add_argument("--metrics-listen", type=hostport, metavar="HOST:PORT",
                   help="serve them on this address instead (Prometheus on another host)")
    c.add_argument("--metrics-tls", action="store_true",
                   help="serve them over HTTPS with TLS_DIR/servers/controller.crt and .key "
                   "(`drctl certs issue --server controller --host HOST`); scrapers need a "
                   "client certificate from the deployment's CA")
    c.add_argument("--audit-file", help=_AUDIT_FILE_HELP)
    key = c.add_mutually_exclusive_group()
    key.add_argument("--tls-dir", metavar="DIR",
                     help="the deployment directory (`drctl certs`): epoch tokens are signed "
                     "with DIR/epoch.key (default: $DRCTL_TLS_DIR; docs/security.md)")
    key.add_argument("--epoch-key", metavar="FILE", help="the epoch-token signing key itself")
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
        p.add_argument("--audit-file", help=_AUDIT_FILE_HELP)
        p.set_defaults(func=cmd_request, request=name)

    _add_api_parser(sub)
    _add_audit_parser(sub)

    s = sub.add_parser("status", help="services, sites and the leading controller")
    s.add_argument("--config", required=True)
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_status)


def _add_api_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    w = sub.add_parser("api", help="serve the HTTP API and the operator's web page (HTTPS); "
                                   "`drctl api users` manages its users")
    w.add_argument("--config", help="the cluster configuration or runbook (required to serve)")
    w.add_argument("--listen", default="127.0.0.1:8080", type=hostport, metavar="HOST:PORT")
    w.add_argument("--users", metavar="FILE", help="the users file (`drctl api users add`)")
    w.add_argument("--token-file", help="one more user, 'admin' (role admin), whose token is "
                   "this file's content (default: $DRCTL_API_TOKEN, if no --users)")
    w.add_argument("--tls-cert", metavar="FILE", help="the server certificate (PEM, chain)")
    w.add_argument("--tls-key", metavar="FILE", help="its private key (mode 0600: refused "
                   "if group or others may read it)")
    w.add_argument("--insecure", action="store_true", help="plain HTTP, only on a loopback "
                   "address (a warning is printed)")
    w.add_argument("--allow-origin", action="append", default=[], metavar="ORIGIN",
                   help="another origin allowed to POST (e.g. https://dr.example.com behind a "
                        "proxy); repeatable")
    w.add_argument("--audit-file", help=_AUDIT_FILE_HELP)
    w.set_defaults(func=cmd_api)
    users = w.add_subparsers(dest="api_command", metavar="users").add_parser(
        "users", help="add, remove or list the API's users")
    us = users.add_subparsers(dest="users_command", required=True, metavar="add|remove|list")
    add = us.add_parser("add", help="add a user; prints its new token once (the file keeps "
                                    "only a salted scrypt hash)")
    add.add_argument("name")
    add.add_argument("--role", required=True, choices=["viewer", "operator", "admin"])
    add.add_argument("--replace", action="store_true", help="give an existing user a new "
                                                            "token (and this role)")
    rm = us.add_parser("remove", help="remove a user (its token stops working at once)")
    rm.add_argument("name")
    ls = us.add_parser("list", help="users and roles")
    for p in (add, rm, ls):
        p.add_argument("--file", required=True, help="the users file (created mode 0600)")
    for p in (add, rm):
        p.add_argument("--config", dest="users_config", help="also record the change in this "
                                                             "cluster's audit log")
        p.add_argument("--audit-file", dest="users_audit_file", help=_AUDIT_FILE_HELP)
        p.set_defaults(func=cmd_users)
    ls.set_defaults(func=cmd_users)


def _add_audit_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    a = sub.add_parser("audit", help="the hash-chained audit log: show it, verify it")
    verbs = a.add_subparsers(dest="audit_command", required=True, metavar="show|verify")
    show = verbs.add_parser("show", help="the records in etcd, oldest first")
    show.add_argument("--config", required=True)
    show.add_argument("--json", action="store_true", help="one JSON record per line")
    show.add_argument("--last", type=natural, metavar="N", help="only the last N records")
    show.set_defaults(func=cmd_audit_show)
    v = verbs.add_parser("verify", help="exit 0 if the chain verifies, 1 (one line naming "
                                        "the record) if one was edited, removed or reordered")
    v.add_argument("--config", help="verify the chain in this cluster's etcd")
    v.add_argument("--file", help="verify this local mirror (with --config: also that it "
                                  "matches etcd)")
    v.set_defaults(func=cmd_audit_verify)


_AUDIT_FILE_HELP = ("the local mirror of the audit log (default: $DRCTL_AUDIT_FILE, else "
                    "$XDG_STATE_HOME/drctl/audit/<cluster>-<chain id>.jsonl; 'none': no "
                    "mirror)")


def _config(path: str) -> ClusterConfig:
    return _load(path)[0]


def load_config(path: str) -> ClusterConfig:
    """The cluster configuration from a runbook or a cluster.yaml (ConfigError if unusable)."""
    return _config(path)


def _load(path: str) -> tuple[ClusterConfig, Runbook | None]:
    """A cluster configuration, or a runbook (``kind: drctl-runbook``) and the configuration
    it makes."""
    from failover.config import ConfigError, load

    try:
        with open(path, "rb") as fh:
            is_runbook = b"drctl-runbook" in fh.read(4096)
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

    return EtcdStore(list(cfg.etcd), timeout=max(1.0, cfg.lease_ttl / 2),
                     credentials=cfg.etcd_credentials)


async def _daemon(cfg: ClusterConfig, make: Any, audit_file: str | None = None) -> None:
    from drctl.lifecycle import stop_on_signals
    from failover.audit import AuditLog, mirror_file

    stop = asyncio.Event()
    async with AsyncExitStack() as stack:
        stop_on_signals(stack, stop)
        store = _store(cfg)
        stack.push_async_callback(store.close)
        await store.check_access(cfg.prefix)  # wrong etcd credentials: one line, exit 77
        daemon = make(store)
        daemon.audit = AuditLog(store, cfg.prefix, mirror_file(audit_file))
        await daemon.run(stop)


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
            rec = CommandRecord(command, target, uuid.uuid4().hex[:12], time.time())
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

    cfg = _config(args.config)

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


def cli_actor() -> str:
    """Who runs this command, for the audit log: user@host."""
    import getpass
    import socket

    try:
        user = getpass.getuser()
    except (OSError, KeyError):
        user = f"uid {os.getuid()}"
    return f"{user}@{socket.gethostname()}"


def record_audit(cfg: ClusterConfig, actor: str, action: str, target: str,
                 params: dict[str, Any] | None = None, outcome: str = "ok",
                 audit_file: str | None = None) -> dict[str, Any] | None:
    """Append one audit record from a short-lived command (e.g. `drctl certs issue`);
    secrets in ``params`` are redacted by key name. A failure is logged and returns None."""
    from failover.audit import AuditLog, mirror_file

    async def append() -> dict[str, Any] | None:
        store = _store(cfg)
        try:
            return await AuditLog(store, cfg.prefix, mirror_file(audit_file)).try_append(
                actor, action, target, params, outcome)
        finally:
            await store.close()

    return asyncio.run(append())


def cmd_api(args: argparse.Namespace) -> int:
    from aiohttp import web

    from drctl.lifecycle import stop_on_signals
    from failover.api.app import make_app, read_token
    from failover.api.users import Users
    from failover.audit import AuditLog, mirror_file
    from failover.config import ConfigError

    if not args.config:
        raise ConfigError("drctl api: --config is required (or: drctl api users ...)")
    cfg, runbook = _load(args.config)
    try:
        token = read_token(args.token_file) if args.token_file or not args.users else None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"--token-file {args.token_file}: "
                          f"{getattr(exc, 'strerror', None) or exc}") from None
    if args.users is None and token is None:
        raise ConfigError("drctl api: no users: pass --users FILE (drctl api users add NAME "
                          "--role R --file FILE), or --token-file")
    if args.users is not None and not os.path.exists(args.users):
        raise ConfigError(f"--users {args.users}: no such file (drctl api users add NAME "
                          f"--role R --file {args.users})")
    users = Users(args.users, token)
    host, number = parse_hostport(args.listen)  # the parser has checked it
    tls = _api_tls(args, host)
    _check_listen("--listen", args.listen)

    async def serve() -> None:
        stop = asyncio.Event()
        async with AsyncExitStack() as stack:
            stop_on_signals(stack, stop)
            store = _store(cfg)
            stack.push_async_callback(store.close)
            audit = AuditLog(store, cfg.prefix, mirror_file(args.audit_file))
            runner = web.AppRunner(make_app(cfg, store, users, runbook, audit,
                                            args.allow_origin), access_log=None)
            await runner.setup()
            stack.push_async_callback(runner.cleanup)
            site = web.TCPSite(runner, host, number, ssl_context=tls)
            try:
                await site.start()
            except OSError as exc:
                raise _bind_error("--listen", args.listen, exc) from None
            shown = f"[{host}]" if ":" in host else host
            print(f"drctl api: {'https' if tls else 'http'}://{shown}:{number}/", flush=True)
            await stop.wait()

    asyncio.run(serve())
    return 0


def _check_listen(flag: str, address: str) -> None:
    """Refuse an address this host cannot listen on now (in use, not this host's, a name
    that does not resolve), before anything is started."""
    from drctl.listening import bind_problem
    from failover.config import ConfigError

    problem = bind_problem(*parse_hostport(address))
    if problem:
        raise ConfigError(f"{flag} {address}: cannot listen there: {problem}")


def _bind_error(flag: str, address: str, exc: OSError) -> Exception:
    """A failed bind, in one line naming the flag (not a traceback)."""
    import socket

    from drctl.listening import BIND_ERRNOS, describe
    from failover.config import ConfigError

    if exc.errno not in BIND_ERRNOS and not isinstance(exc, socket.gaierror):
        return exc
    return ConfigError(f"{flag} {address}: cannot listen there: {describe(exc)}")


def _api_tls(args: argparse.Namespace, host: str) -> Any:
    """The server's TLS context; None (plain HTTP) only with --insecure on loopback."""
    import ipaddress

    from failover.config import ConfigError

    if args.tls_cert or args.tls_key:
        if not (args.tls_cert and args.tls_key):
            raise ConfigError("--tls-cert and --tls-key go together")
        if args.insecure:
            raise ConfigError("--insecure: not with --tls-cert (that is HTTPS)")
        return _server_context(args.tls_cert, args.tls_key)
    if not args.insecure:
        raise ConfigError("drctl api serves HTTPS: pass --tls-cert FILE --tls-key FILE (or "
                          "--insecure for plain HTTP on a loopback address)")
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise ConfigError(f"--insecure: plain HTTP only on a loopback address, not {host}")
    print("drctl api: warning: plain HTTP (--insecure): tokens are sent unencrypted; "
          "loopback only", file=sys.stderr, flush=True)
    return None


def _server_context(cert: str, key: str) -> Any:
    """The API's TLS server context from --tls-cert and --tls-key; a ConfigError naming the
    file (every one that cannot be read, not only the first) otherwise."""
    import ssl
    import stat

    from failover.config import ConfigError

    unusable = []
    for flag, path in (("--tls-cert", cert), ("--tls-key", key)):
        try:
            with open(path, "rb"):
                pass
        except OSError as exc:
            unusable.append(f"{flag} {path}: {exc.strerror or exc}")
    if unusable:
        raise ConfigError("; ".join(unusable))
    mode = stat.S_IMODE(os.stat(key).st_mode)
    if mode & 0o077:
        raise ConfigError(f"--tls-key {key}: mode {mode:04o}: group or others may read the "
                          "private key (chmod 600)")
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(cert, key)
    except ssl.SSLError as exc:  # OpenSSL's words ("[SSL] PEM lib") name no file
        if exc.reason == "KEY_VALUES_MISMATCH":
            raise ConfigError(f"--tls-key {key}: not the private key of --tls-cert "
                              f"{cert}") from None
        if _pem_certificate(cert):
            raise ConfigError(f"--tls-key {key}: not a PEM private key (or not the key of "
                              f"--tls-cert {cert})") from None
        raise ConfigError(f"--tls-cert {cert}: not a PEM certificate (or the key does not "
                          "match)") from None
    except OSError as exc:
        raise ConfigError(f"--tls-cert/--tls-key: {exc.strerror or exc}") from None
    return ctx


def _pem_certificate(path: str) -> bool:
    """Whether ``path`` starts with a PEM certificate ssl can decode."""
    import ssl

    begin, end = "-----BEGIN CERTIFICATE-----", "-----END CERTIFICATE-----"
    try:
        with open(path, encoding="ascii", errors="replace") as fh:
            text = fh.read(1 << 20)
        start = text.index(begin)
        ssl.PEM_cert_to_DER_cert(text[start:text.index(end, start) + len(end)])
    except (OSError, ValueError):
        return False
    return True


def cmd_users(args: argparse.Namespace) -> int:
    from failover.api.users import add_user, list_users, remove_user

    verb, path = args.users_command, args.file
    if verb == "list":
        for user in list_users(path):
            print(f"{user.name}\t{user.role}")
        return 0
    if verb == "add":
        token = add_user(path, args.name, args.role, args.replace)
        print(token, flush=True)
        print(f"user {args.name} ({args.role}) {'given a new token' if args.replace else 'added'}"
              f" in {path}: the token above is shown once (the file keeps only its hash)",
              file=sys.stderr)
        outcome, params = "done", {"role": args.role, "replace": args.replace, "file": path}
    else:
        remove_user(path, args.name)
        print(f"user {args.name} removed from {path}", file=sys.stderr)
        outcome, params = "done", {"file": path}
    if args.users_config:
        record_audit(_config(args.users_config), cli_actor(), f"api.users.{verb}", args.name,
                     params, outcome, args.users_audit_file)
    return 0


def cmd_audit_show(args: argparse.Namespace) -> int:
    from failover.audit import describe, read_etcd

    cfg = _config(args.config)

    async def read() -> list[Any]:
        store = _store(cfg)
        try:
            return (await read_etcd(store, cfg.prefix)).slots
        finally:
            await store.close()

    slots = asyncio.run(read())
    if args.last is not None:
        slots = slots[-args.last:] if args.last > 0 else []
    for slot in slots:
        if slot.record is None:
            print(f"{slot.seq:>6} (not a record: {slot.where})")
        elif args.json:
            print(json.dumps(slot.record, sort_keys=True))
        else:
            print(describe(slot.record))
    return 0


def cmd_audit_verify(args: argparse.Namespace) -> int:
    """Exit 0 if the chain verifies; AuditChainBroken (exit 1, one line naming the record)
    if not."""
    from failover.audit import compare, read_etcd, read_file, verify
    from failover.config import ConfigError

    if not args.config and not args.file:
        raise ConfigError("drctl audit verify: give --config (the chain in etcd), --file (a "
                          "local mirror), or both")
    said = []
    chain = None
    if args.config:
        cfg = _config(args.config)

        async def read() -> Any:
            store = _store(cfg)
            try:
                return await read_etcd(store, cfg.prefix)
            finally:
                await store.close()

        chain = asyncio.run(read())
        count, head = verify(chain, "etcd", with_head=True)
        said.append(f"{count} records in etcd (head {head[:16]})")
    if args.file:
        try:
            mirror = read_file(args.file)
        except OSError as exc:
            raise ConfigError(f"--file {args.file}: {exc.strerror}") from exc
        count, head = verify(mirror, args.file)
        if chain is not None:
            compare(chain, mirror, args.file)
        said.append(f"{count} records in {args.file} (head {head[:16]}"
                    + (", the same as in etcd)" if chain is not None else ")"))
    print(f"audit log verified: {'; '.join(said)}")
    return 0
