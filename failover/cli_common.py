"""What the failover commands share: the cluster configuration (a cluster.yaml or a runbook),
the etcd store, a daemon's run until a signal, the audit record of a short-lived command, and
the checks of an address to listen on."""

from __future__ import annotations

import asyncio
import os
from contextlib import AsyncExitStack
from typing import TYPE_CHECKING, Any

from drctl.argtypes import parse_hostport

if TYPE_CHECKING:  # heavy imports stay out of every other drctl command's start-up
    from failover.config import ClusterConfig
    from failover.coordination.etcd import EtcdStore
    from runbooks.model import Runbook


def _config(path: str, secrets: bool = True) -> ClusterConfig:
    """``secrets`` false: for a command that only reads etcd (the TSIG keys are not read)."""
    return _load(path, secrets)[0]


def load_config(path: str) -> ClusterConfig:
    """The cluster configuration from a runbook or a cluster.yaml (ConfigError if unusable)."""
    return _config(path)


def _load(path: str, secrets: bool = True) -> tuple[ClusterConfig, Runbook | None]:
    """A cluster configuration, or a runbook (``kind: drctl-runbook``) and the configuration
    it makes."""
    from failover.config import ConfigError, load

    try:
        with open(path, "rb") as fh:
            is_runbook = b"drctl-runbook" in fh.read(4096)
    except OSError as exc:
        raise ConfigError(f"{path}: {exc.strerror}") from exc
    if not is_runbook:
        return load(path, secrets), None
    from runbooks.cluster import to_cluster
    from runbooks.loader import RunbookError
    from runbooks.loader import load as load_runbook

    try:
        runbook = load_runbook(path)
    except RunbookError as exc:
        raise ConfigError("\n".join(exc.errors)) from None
    return to_cluster(runbook, secrets), runbook


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
