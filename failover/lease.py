"""Lease keepalive, written once, and leader election on top of it.

A ``LeaseKeeper`` refreshes its lease every ttl/3. It keeps a *local* deadline on the monotonic
clock, shorter than the TTL (3/4 of it): if no refresh has succeeded by then, the lease is
treated as lost before etcd could have expired it, so leader-only work (and a site's writes)
stop first. A refresh that fails for any reason after the deadline, or that finds the lease
gone, sets ``lost``; nothing renews a lost lease. After a suspend the monotonic clock has moved
past the deadline, so the keeper gives up without trusting the old lease (etcd's TTL is the
authority).

``Election.campaign()`` is create-if-absent of the leader key with our lease; losers wait for
the key to go away and try again. ``Leadership.scope()`` runs leader-only work in a task group
that is cancelled the moment the lease is lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Coroutine

from failover.coordination.base import CoordinationStore, Lease
from failover.errors import FailoverError, LeaseLostError, StoreUnavailableError

log = logging.getLogger(__name__)


def check_timings(ttl: float, heartbeat_interval: float, retry_timeout: float) -> None:
    """Reject, with the reason, timings that cannot keep a lease alive."""
    if heartbeat_interval + 2 * retry_timeout > ttl:
        raise FailoverError(
            f"heartbeat_interval ({heartbeat_interval}s) + 2 x retry_timeout ({retry_timeout}s)"
            f" must not exceed the lease TTL ({ttl}s): otherwise one slow refresh and one retry"
            " outlive the lease and the holder loses it while healthy")


class LeaseKeeper:
    def __init__(self, store: CoordinationStore, ttl: int) -> None:
        if ttl < 1:
            raise FailoverError("lease TTL must be at least 1 s")
        self.store = store
        self.ttl = ttl
        self.interval = ttl / 3
        self.retry_timeout = ttl / 6
        check_timings(ttl, self.interval, self.retry_timeout)
        self.local_deadline = ttl * 0.75
        self.lease: Lease | None = None
        self.lost = asyncio.Event()
        self._last_ok = 0.0

    async def grant(self) -> Lease:
        sent = asyncio.get_running_loop().time()
        self.lease = await self.store.grant_lease(self.ttl)
        self._last_ok = sent
        return self.lease

    async def run(self) -> None:
        """Keep the lease alive until it is lost (then return) or the task is cancelled."""
        assert self.lease is not None, "grant() first"
        loop = asyncio.get_running_loop()
        while not self.lost.is_set():
            # Wake at the next refresh, or exactly at the local deadline if that comes first.
            remaining = self.local_deadline - (loop.time() - self._last_ok)
            await asyncio.sleep(max(0.0, min(self.interval, remaining)))
            if loop.time() - self._last_ok >= self.local_deadline:
                self._lose("no successful refresh within the local deadline")
                return
            sent = loop.time()  # etcd restarts the TTL at most now: count from here
            try:
                await asyncio.wait_for(self.lease.refresh(), self.retry_timeout)
                self._last_ok = sent
            except LeaseLostError as exc:
                self._lose(str(exc))
                return
            except (StoreUnavailableError, TimeoutError) as exc:
                log.warning("lease %x: refresh failed (%s)", self.lease.id, exc)

    def _lose(self, why: str) -> None:
        log.warning("lease %x lost: %s", self.lease.id if self.lease else 0, why)
        self.lost.set()

    async def revoke(self) -> None:
        if self.lease is not None:
            with contextlib.suppress(StoreUnavailableError, LeaseLostError):
                await self.lease.revoke()
        self.lost.set()


class Leadership:
    def __init__(self, keeper: LeaseKeeper, key: str, node: str) -> None:
        self.keeper = keeper
        self.key = key
        self.node = node

    @property
    def lost(self) -> asyncio.Event:
        return self.keeper.lost

    @contextlib.asynccontextmanager
    async def scope(self) -> AsyncIterator[LeaderScope]:
        """Leader-only work: tasks spawned in the scope run until they finish, and are all
        cancelled (the scope raises LeaseLostError) the moment the lease is lost."""

        async def guard() -> None:
            await self.keeper.lost.wait()
            raise LeaseLostError(f"{self.node} lost the leadership of {self.key}")

        try:
            async with asyncio.TaskGroup() as tg:
                watchdog = tg.create_task(guard())
                scope = LeaderScope(tg)
                yield scope
                if scope.tasks:
                    await asyncio.wait(scope.tasks)
                watchdog.cancel()
        except BaseExceptionGroup as group:
            lease_lost = group.subgroup(LeaseLostError)
            if lease_lost is not None:
                raise lease_lost.exceptions[0] from None
            raise


class LeaderScope:
    def __init__(self, tg: asyncio.TaskGroup) -> None:
        self.tg = tg
        self.tasks: list[asyncio.Task[object]] = []

    def spawn(self, coro: Coroutine[object, object, object]) -> asyncio.Task[object]:
        task = self.tg.create_task(coro)
        self.tasks.append(task)
        return task


class Election:
    def __init__(self, store: CoordinationStore, key: str, node: str, ttl: int) -> None:
        self.store = store
        self.key = key
        self.node = node
        self.ttl = ttl

    async def campaign(self, poll: float | None = None) -> Leadership:
        """Return once this node holds the leader key. The caller must run
        ``leadership.keeper.run()`` (e.g. in its task group) to keep it."""
        poll = poll if poll is not None else max(0.1, self.ttl / 4)
        while True:
            keeper = LeaseKeeper(self.store, self.ttl)
            lease = await keeper.grant()
            if await self.store.create(self.key, self.node.encode(), lease=lease):
                log.info("%s is the leader of %s", self.node, self.key)
                return Leadership(keeper, self.key, self.node)
            await keeper.revoke()
            await self._wait_vacant(poll)

    async def _wait_vacant(self, poll: float) -> None:
        while True:
            snap = await self.store.snapshot(self.key)
            if self.key not in snap.entries:
                return
            await asyncio.sleep(poll)

    async def leader(self) -> str | None:
        value = (await self.store.snapshot(self.key)).value(self.key)
        return value.decode() if value is not None else None
