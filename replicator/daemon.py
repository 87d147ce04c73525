"""Supervisor of the target daemon: one owner for the gRPC server's lifecycle.

Startup: registry + metrics endpoint, service, gRPC server. Shutdown (SIGTERM/SIGINT): stop
accepting and drain streams with a grace period (in-flight batches finish and are committed),
then close the replicas. A second signal forces the exit.
"""

from __future__ import annotations

import asyncio
import logging
import os
import tempfile
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack

import grpc
from prometheus_client import CollectorRegistry

from drctl.lifecycle import stop_on_signals
from drctl.listening import bind_problem
from replicator.errors import ReplicatorError, UsageError
from replicator.metrics import MetricsEndpoint, TargetMetrics, serve_metrics
from replicator.transport import wire
from replicator.transport.security import AccessPolicy, Authorizer, EpochGate, TlsConfig
from replicator.transport.server import ReplicationService
from replicator.transport.slots import Limits

log = logging.getLogger(__name__)

GRPC_OPTIONS = [
    ("grpc.max_receive_message_length", 16 << 20),
    ("grpc.max_send_message_length", 16 << 20),
    ("grpc.http2.max_frame_size", 4 << 20),
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.so_reuseport", 0),  # a second target on the same port is refused, not load-balanced
]


def check_directory(directory: str) -> None:
    """``--dir``: an existing directory this process can write in, or a new one whose parent
    exists (made once the daemon listens; never a chain of parents)."""
    if os.path.isdir(directory):
        _check_writable(directory, directory)
        return
    if os.path.lexists(directory):
        raise UsageError(f"--dir {directory}: not a directory")
    parent = os.path.dirname(os.path.abspath(directory))
    if not os.path.isdir(parent):
        raise UsageError(f"--dir {directory}: no such directory, nor its parent {parent} "
                         "(create it first)")
    _check_writable(directory, parent)


def _check_writable(directory: str, where: str) -> None:
    try:
        with tempfile.TemporaryFile(dir=where):
            pass
    except OSError as exc:
        raise UsageError(f"--dir {directory}: not writable ({exc.strerror})") from None


async def serve(listen: str, directory: str, metrics_port: MetricsEndpoint | int | None = None,
                grace: float = 10.0, mode: str = "hot",
                apply_interval: float | None = None, tls: TlsConfig | None = None,
                policy: AccessPolicy | None = None, limits: Limits | None = None) -> None:
    """``mode``: "hot" writes each complete consistency point into the replica at once; "warm"
    keeps them in the redo journal until promotion (Fence), a drill (Clone) or, every
    ``apply_interval`` seconds, the schedule. ``tls`` and ``policy``: mutual TLS and who may
    call what (replicator/transport/security.py); without them the target is plaintext and
    open (loopback tests only, checked by the CLI)."""
    check_directory(directory)
    registry = CollectorRegistry()
    metrics = TargetMetrics(registry)
    if metrics_port is not None:
        serve_metrics(registry, metrics_port)
    stop = asyncio.Event()

    async with AsyncExitStack() as stack:
        stop_on_signals(stack, stop)
        service = ReplicationService(directory, metrics, mode, limits)  # limits: slots.py
        stack.callback(service.close)
        interceptors = []
        if tls is not None:
            assert policy is not None
            gate = EpochGate(tls.epoch_keys, directory, _epoch_reader(service))
            interceptors.append(Authorizer(policy, gate))
        server = grpc.aio.server(options=GRPC_OPTIONS, interceptors=interceptors)
        wire.add_servicer(service, server)
        try:
            if tls is None:
                port = server.add_insecure_port(listen)
            else:
                port = server.add_secure_port(listen, tls.server_credentials())
        except RuntimeError:  # grpc says only that the bind failed: find out why
            port = 0
        if port == 0:
            host, _, port_text = listen.rpartition(":")
            why = bind_problem(host.strip("[]"), int(port_text)) or "the bind failed"
            raise UsageError(f"--listen {listen}: cannot listen there: {why}")
        created = not os.path.isdir(directory)
        if created:
            os.mkdir(directory)
        await server.start()
        stack.push_async_callback(server.stop, grace)
        how = (f"mutual TLS as {tls.identity}; writers: {policy.describe()}" if tls and policy
               else "PLAINTEXT (--insecure)")
        log.info("replication target listening on %s, replicas in %s (%s mode), %s", listen,
                 directory, mode, how)
        print(f"drctl replicate serve: listening on {listen} (dir {directory}"
              f"{', created' if created else ''}, {mode}, {how})", flush=True)
        if mode == "warm" and apply_interval:
            scheduler = asyncio.ensure_future(_apply_every(service, apply_interval))
            stack.callback(scheduler.cancel)
        await stop.wait()
        log.info("shutting down: draining streams for up to %.0fs", grace)


async def _apply_every(service: ReplicationService, seconds: float) -> None:
    while True:
        await asyncio.sleep(seconds)
        await service.apply_all()


def _epoch_reader(service: ReplicationService) -> Callable[[str], Awaitable[int]]:
    """The epoch a replica is at, for the epoch gate: 0 for one that does not exist yet (a
    handshake creates it at 0) or cannot be opened (the RPC's handler then says why)."""

    async def epoch_of(volume: str) -> int:
        try:
            slot = await service._slot(volume)
        except (ReplicatorError, OSError):
            return 0
        return int(slot.replica.record.epoch)

    return epoch_of
