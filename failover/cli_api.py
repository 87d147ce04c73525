"""`drctl api` (the HTTP API and the operator's web page, over HTTPS) and `drctl api users`."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from contextlib import AsyncExitStack
from typing import Any

from drctl.argtypes import parse_hostport
from failover.cli_common import (
    _bind_error,
    _check_listen,
    _config,
    _load,
    _store,
    cli_actor,
    record_audit,
)


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
        record_audit(_config(args.users_config, secrets=False), cli_actor(),
                     f"api.users.{verb}", args.name, params, outcome, args.users_audit_file)
    return 0
