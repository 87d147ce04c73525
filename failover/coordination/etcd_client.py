"""aetcd's Client made fit for an etcd with TLS and authentication (EtcdStore's only client).

Why an adapter rather than another client. aetcd 1.0.0 is the client this project chose (the
envcheck report: KV, leases, prefix watches from a revision, transactions, clean exceptions).
It authenticates with a user and password, but three things stand in the way of a secured etcd:

1. ``Client.connect()`` always opens ``grpc.aio.insecure_channel`` and takes no channel
   credentials: no TLS. ``Client.connect()`` below is aetcd 1.0.0's own, line for line, except
   that it opens ``grpc.aio.secure_channel(target, ssl_channel_credentials(ca, key, cert))``
   when it is given credentials, and closes the channel if authenticating fails (aetcd leaks
   it). Stubs, the token passed as metadata on every call and the watcher stay aetcd's.
2. aetcd authenticates once per connection. etcd forgets its (simple) tokens when it restarts,
   and a token idle for --auth-token-ttl expires: from then on every call fails with
   UNAUTHENTICATED "invalid auth token". ``reauthenticate()`` fetches a new token in place
   (calls in flight are undisturbed) and reopens the watch stream, whose token is the one it
   was opened with (its watches see a broken connection, and EtcdStore resumes them).
3. etcd refuses a watch it does not permit (no token, a stale token, no permission on the
   range) by creating it already cancelled, with the reason in ``cancel_reason``. aetcd's
   watcher ignores ``canceled``: such a watch waits forever. ``_Watcher`` turns it into the
   error the reason names.

The alternatives: etcd3aio 0.3 does TLS but is young and its leases are not kept alive while
held; the Rust binding etcd-client-py has no type stubs and no election API. A few dozen lines
here are cheaper than moving EtcdStore to another client. The adapter leans on aetcd internals
(``connect``'s body, ``Watcher._handle_response``/``_terminate_stream``, ``_handle_exception``);
the conformance suite runs against an etcd with TLS and authentication on, so a change in
aetcd shows up there first.
"""

from __future__ import annotations

import asyncio
import re
from typing import Any

import aetcd
import aetcd.exceptions as ae
import aetcd.watcher
from aetcd import rpc

# Authenticating costs etcd a bcrypt comparison and a raft round: more than a read, and under
# load more than the short per-call timeouts of the CLI (see EtcdStore.call)
AUTH_TIMEOUT = 5

_REASON = re.compile(r"code = (\w+) desc = (.*)", re.S)
_BY_GRPC_NAME: dict[str, type[ae.ClientError]] = {
    "Unauthenticated": ae.UnauthenticatedError,
    "InvalidArgument": ae.InvalidArgumentError,
    "Unavailable": ae.ConnectionFailedError,
}


def _cancel_error(reason: str) -> ae.ClientError:
    """The error a cancel_reason names (``rpc error: code = Unauthenticated desc = ...``)."""
    m = _REASON.search(reason)
    if m is None:
        return ae.ClientError(reason)
    return _BY_GRPC_NAME.get(m.group(1), ae.ClientError)(m.group(2))


class _Watcher(aetcd.watcher.Watcher):  # type: ignore[misc]
    async def _handle_response(self, response: Any) -> None:
        if not (response.canceled and response.cancel_reason) or response.compact_revision:
            await super()._handle_response(response)
            return
        error = _cancel_error(response.cancel_reason)
        async with self._lock:
            if response.created and self._new_callback is not None:
                self._new_callback.error = error  # add_callback() raises it
                self._new_callback_ready.notify_all()
                return
            callback = self._callbacks.pop(response.watch_id, None)
        if callback is not None:
            await self._process_callback(callback, error)

    async def reopen(self, metadata: Any) -> None:
        """The next watch opens a new stream with ``metadata``; the watches on the current
        one end with ConnectionFailedError (their owners resume them)."""
        self._metadata = metadata
        await self._terminate_stream(ae.ConnectionFailedError("etcd token renewed: the "
                                                              "watch stream is reopened"))


class Client(aetcd.Client):  # type: ignore[misc]
    """aetcd.Client over TLS when ``credentials`` (grpc.ChannelCredentials) are given, with
    token renewal and refused watches surfaced (see the module docstring)."""

    def __init__(self, host: str, port: int, *, username: str | None = None,
                 password: str | None = None, timeout: int | None = None,
                 credentials: Any = None, options: dict[str, Any] | None = None) -> None:
        super().__init__(host=host, port=port, username=username, password=password,
                         timeout=timeout, options=options)
        self._channel_credentials = credentials
        self._auth_lock = asyncio.Lock()
        self.token_generation = 0  # +1 on every renewal (see reauthenticate)

    @property
    def username(self) -> str | None:
        return self._username  # type: ignore[no-any-return]

    @property
    def connected(self) -> bool:
        return self._connected.is_set()  # type: ignore[no-any-return]

    async def connect(self) -> None:
        try:
            await self._connect()
        except rpc.AioRpcError as e:
            ae._handle_exception(e)

    async def _connect(self) -> None:
        if self._connected.is_set():
            return
        if self._is_connecting:  # type: ignore[has-type]  # another task is connecting
            await asyncio.wait_for(self._connected.wait(), self._connect_wait_timeout)
            return
        self._is_connecting = True
        try:
            target = f"{self._host}:{self._port}"
            options = list(self._options.items())
            if self._channel_credentials is None:
                channel = rpc.insecure_channel(target, options=options)
            else:
                channel = rpc.secure_channel(target, self._channel_credentials, options=options)
            try:
                metadata = await self._authenticate(channel)
            except BaseException:
                await channel.close()
                raise
            self.channel, self.metadata = channel, metadata
            self.kvstub = rpc.KVStub(channel)
            self.clusterstub = rpc.ClusterStub(channel)
            self.leasestub = rpc.LeaseStub(channel)
            self.maintenancestub = rpc.MaintenanceStub(channel)
            self._watcher = _Watcher(rpc.WatchStub(channel), timeout=self._timeout,
                                     metadata=metadata)
            self._connected.set()
        finally:
            self._is_connecting = False

    async def _authenticate(self, channel: Any) -> Any:
        if self._username is None or self._password is None:
            return None
        self.auth_stub = rpc.AuthStub(channel)
        resp = await self.auth_stub.Authenticate(
            rpc.AuthenticateRequest(name=self._username, password=self._password),
            timeout=max(self._timeout or 0, AUTH_TIMEOUT))
        return (("token", resp.token),)

    async def reauthenticate(self, generation: int) -> None:
        """A new token, unless one was fetched since ``generation`` (the token_generation the
        failed call saw) or the client is not connected (connecting authenticates anyway)."""
        async with self._auth_lock:
            if generation != self.token_generation or not self._connected.is_set():
                return
            try:
                metadata = await self._authenticate(self.channel)
            except rpc.AioRpcError as e:
                ae._handle_exception(e)
            self.metadata = metadata
            self.token_generation += 1
            if isinstance(self._watcher, _Watcher):
                await self._watcher.reopen(metadata)
