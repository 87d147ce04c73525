"""Lease keepalive, written once, and leader election on top of it.

A ``LeaseKeeper`` refreshes its lease every ttl/3 (counted from when the last successful
refresh was sent), and at once again after a refresh that failed or outlived its ttl/6 budget.
It keeps a *local* deadline on the monotonic clock, shorter than the TTL (3/4 of it): if no
refresh has succeeded by then, the lease is treated as lost before etcd could have expired it,
so leader-only work (and a site's writes) stop first. A refresh still in flight at the deadline
is abandoned; one that finds the lease gone sets ``lost`` at once; nothing renews a lost lease.
After a suspend the monotonic clock has moved past the deadline, so the keeper gives up without
trusting the old lease (etcd's TTL is the authority).

With etcd the keepalive runs on a thread of its own with its own loop and etcd channel
(keeper_thread.py), so a holder whose event loop is busy (hashing, scrapes, DNS, children) does
not lose its lease; ``lost`` is set on the holder's loop (call_soon_threadsafe).

Logging: INFO once a minute, the keeper's timings (scheduling delay: how late a refresh woke;
round trip); WARNING a failed refresh (retried) and a lost lease.

``Election.campaign()`` is create-if-absent of the leader key with our lease; losers wait for
the key to go away and try again. ``Leadership.scope()`` runs leader-only work in a task group
that is cancelled the moment the lease is lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Coroutine

from failover.coordination.base import CoordinationStore, Lease
from failover.errors import FailoverError, LeaseLostError, StoreUnavailableError
from failover.keeper_thread import KeeperThread, lease_on, store_factory

log = logging.getLogger(__name__)


def check_timings(ttl: float, heartbeat_interval: float, retry_timeout: float) -> None:
    """Reject, with the reason, timings that cannot keep a lease alive."""
    if heartbeat_interval + 2 * retry_timeout > ttl:
        raise FailoverError(
            f"heartbeat_interval ({heartbeat_interval}s) + 2 x retry_timeout ({retry_timeout}s)"
            f" must not exceed the lease TTL ({ttl}s): otherwise one slow refresh and one retry"
            " outlive the lease and the holder loses it while healthy")


class KeeperTimings:
    """How late the keeper's refreshes woke after they were due (scheduling delay) and how
    long they took (round trip), per window; ``summary()`` states a window and starts the
    next."""

    def __init__(self) -> None:
        self._reset()

    def _reset(self) -> None:
        self.delays: list[float] = []
        self.trips: list[float] = []
        self.failed = 0
        self.started = time.monotonic()

    @staticmethod
    def _ms(xs: list[float]) -> str:
        if not xs:
            return "-"
        s = sorted(xs)
        p50, p99 = s[len(s) // 2], s[min(len(s) - 1, int(len(s) * 0.99))]
        return f"p50 {1000 * p50:.0f} p99 {1000 * p99:.0f} max {1000 * s[-1]:.0f} ms"

    def summary(self) -> str:
        out = (f"{len(self.trips)} refreshes in {time.monotonic() - self.started:.0f}s,"
               f" {self.failed} failed; scheduling delay {self._ms(self.delays)};"
               f" round trip {self._ms(self.trips)}")
        self._reset()
        return out


class LeaseKeeper:
    """Grant a lease, keep it alive, say when it is lost (``lost``, an event of the loop that
    called ``run()``).

    With an etcd store the keepalive runs on a thread of its own, with its own loop and its
    own etcd channel (keeper_thread.py): a busy event loop in the holder does not delay it.
    Every time is on the monotonic clock; the local deadline counts from when the last
    successful refresh was *sent* (etcd restarted the TTL no earlier than that)."""

    SUMMARY_EVERY = 60.0  # seconds between two INFO lines of keeper timings

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
        self.lost_at: float | None = None  # monotonic: when the keeper gave the lease up
        self.timings = KeeperTimings()
        self._thread_store = store_factory(store)  # None: the keepalive stays on our loop
        self._thread: KeeperThread | None = None
        self._last_ok = 0.0
        self._failed_at = 0.0  # the last failed refresh: the next one waits 50 ms at least

    @property
    def threaded(self) -> bool:
        return self._thread_store is not None

    async def grant(self) -> Lease:
        """Grant the lease. With its own thread, the keeper's etcd channel is opened first:
        its TLS handshake and authentication are not paid out of the lease's time. Then
        ``run()`` (to keep it) or ``revoke()``."""
        if self._thread_store is not None and self._thread is None:
            self._thread = KeeperThread(self._thread_store, "lease-keeper")
            await self._thread.start()
        try:
            sent = time.monotonic()
            self.lease = await self.store.grant_lease(self.ttl)
        except BaseException:
            await self._close_thread()
            raise
        self._last_ok = sent
        return self.lease

    async def run(self) -> None:
        """Keep the lease alive until it is lost (``lost`` is set, then this returns) or the
        task is cancelled. A keepalive that fails (raises) sets ``lost`` too."""
        lease = self.lease
        assert lease is not None, "grant() first"
        main = asyncio.get_running_loop()

        def lost() -> None:
            with contextlib.suppress(RuntimeError):  # our loop is closed: nobody to tell
                main.call_soon_threadsafe(self.lost.set)

        try:
            if self._thread is None:
                await self._keep(lease, self.lost.set)
            else:
                await self._thread.run(lambda store: self._keep(lease_on(store, lease), lost))
        except Exception:
            self.lost.set()  # nobody keeps the lease: the holder stops at once
            raise
        finally:
            await self._close_thread()

    async def _close_thread(self) -> None:
        thread, self._thread = self._thread, None
        if thread is not None:
            await thread.close()

    async def _keep(self, lease: Lease, lost: Callable[[], None]) -> None:
        """The keepalive (on whichever loop runs it). A refresh is sent ``interval`` after the
        last successful one was sent. A slow refresh is not abandoned: after ``retry_timeout``
        without an answer another is sent beside it (a hung connection), after a failed one
        another at once; whichever succeeds first counts from its own send time, and the
        others are cancelled. At the local deadline, lost (attempts still in flight are
        cancelled)."""
        attempts: dict[asyncio.Task[Exception | None], float] = {}  # -> when sent
        async with asyncio.TaskGroup() as tg:
            try:
                while True:
                    now = time.monotonic()
                    deadline = self._last_ok + self.local_deadline
                    if now >= deadline:
                        self._lose(lease, "no successful refresh within the local deadline "
                                   f"({_in_flight(attempts, now)})", lost)
                        return
                    due = (max(attempts.values()) + self.retry_timeout if attempts
                           else max(self._last_ok + self.interval, self._failed_at + 0.05))
                    if due <= now:
                        attempts[tg.create_task(_refresh(lease))] = now
                        continue
                    if now - self.timings.started >= self.SUMMARY_EVERY:
                        log.info("lease %x keeper: %s", lease.id, self.timings.summary())
                    wake = min(due, deadline)
                    done = await _first(set(attempts), wake - now)
                    if not done:
                        self.timings.delays.append(time.monotonic() - wake)
                    gone = self._settle(lease, done, attempts)
                    if gone is not None:
                        self._lose(lease, str(gone), lost)
                        return
            finally:
                for task in attempts:
                    task.cancel()

    def _settle(self, lease: Lease, done: set[asyncio.Task[Exception | None]],
                attempts: dict[asyncio.Task[Exception | None], float],
                ) -> LeaseLostError | None:
        """Account for finished refreshes; the error of one that found the lease gone."""
        for task in done:
            sent = attempts.pop(task)
            error = task.result()
            if isinstance(error, LeaseLostError):
                return error
            if error is not None:
                self.timings.failed += 1
                self._failed_at = time.monotonic()
                log.warning("lease %x: refresh failed after %.0f ms (%s): sending another",
                            lease.id, 1000 * (time.monotonic() - sent),
                            error or type(error).__name__)
                continue
            self.timings.trips.append(time.monotonic() - sent)
            if sent > self._last_ok:  # etcd restarted the TTL after we sent it
                self._last_ok = sent
            for other in attempts:  # the lease is refreshed: the others are moot
                other.cancel()
            attempts.clear()
            break
        return None

    def _lose(self, lease: Lease, why: str, lost: Callable[[], None]) -> None:
        self.lost_at = time.monotonic()
        log.warning("lease %x lost: %s (keeper: %s)", lease.id, why, self.timings.summary())
        lost()

    async def revoke(self) -> None:
        await self._close_thread()
        if self.lease is not None:
            with contextlib.suppress(StoreUnavailableError, LeaseLostError):
                await self.lease.revoke()
        self.lost.set()


async def _refresh(lease: Lease) -> Exception | None:
    """One refresh; what went wrong is returned: the lease gone (LeaseLostError), or anything
    else (etcd unreachable or refusing us): another is sent, until the local deadline."""
    try:
        await lease.refresh()
    except Exception as exc:
        return exc
    return None


def _in_flight(attempts: dict[asyncio.Task[Exception | None], float], now: float) -> str:
    ages = ", ".join(f"{1000 * (now - sent):.0f}" for sent in sorted(attempts.values()))
    return f"refreshes in flight for {ages} ms" if attempts else "no refresh in flight"


async def _first(tasks: set[asyncio.Task[Exception | None]],
                 timeout: float) -> set[asyncio.Task[Exception | None]]:
    """The tasks done after the first of them finishes or ``timeout`` (none: an empty set)."""
    if not tasks:
        await asyncio.sleep(timeout)
        return set()
    done, _ = await asyncio.wait(tasks, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    return done


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
        scope: LeaderScope | None = None

        async def guard() -> None:
            await self.keeper.lost.wait()
            # Cancelled once, a task can swallow it (asyncio.wait_for does in Python 3.11
            # when its inner future has just finished) and lead on without a lease: the
            # leader work is cancelled until it has ended.
            await _cancel_until_done(scope.tasks if scope is not None else [], self.node)
            raise LeaseLostError(f"{self.node} lost the leadership of {self.key}")

        try:
            async with asyncio.TaskGroup() as tg:
                scope = LeaderScope(tg)
                watchdog = tg.create_task(guard())
                yield scope
                if scope.tasks:
                    await asyncio.wait(scope.tasks)
                if not self.keeper.lost.is_set():
                    watchdog.cancel()
        except BaseExceptionGroup as group:
            lease_lost = group.subgroup(LeaseLostError)
            if lease_lost is not None:
                raise lease_lost.exceptions[0] from None
            raise


async def _cancel_until_done(tasks: list[asyncio.Task[object]], node: str) -> None:
    started, said = time.monotonic(), False
    while pending := [t for t in tasks if not t.done()]:
        for task in pending:
            task.cancel()
        await asyncio.wait(pending, timeout=0.05)
        if not said and time.monotonic() - started > 1.0:
            said = True
            log.error("%s: leader work still running 1 s after the lease was lost: %s", node,
                      ", ".join(t.get_name() for t in pending))


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
