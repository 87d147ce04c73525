"""A lease keeper's own thread: its own event loop and its own store (its own gRPC channel).

A site agent's event loop also hashes blocks, scrapes metrics and supervises children; a
controller's sends DNS updates and verifies them. On a busy machine such a loop can wake a
timer hundreds of milliseconds late, and a lease refreshed from it then misses its local
deadline although the process is merely busy (measured: docs/performance.md, "Lease timing
under load"). So the keepalive runs here, on a thread that does nothing else, against a second
store: aetcd's client and its grpc.aio channel belong to the loop they were created on, so the
thread makes its own (same endpoints, same credentials) rather than share the main loop's.

``store_factory(store)`` says how to make that second store (None for a store that cannot be
used from another thread, e.g. the in-memory fake: its keeper stays on the caller's loop);
``lease_on(store, lease)`` is the same lease seen through the thread's store;
``KeeperThread.run(work)`` runs ``work(store)`` on a new thread until it returns, raises or
the caller is cancelled, then closes the store and joins the thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Awaitable, Callable
from typing import Any

from failover.coordination.base import CoordinationStore, Lease
from failover.coordination.etcd import EtcdLease, EtcdStore

StoreFactory = Callable[[], CoordinationStore]


def store_factory(store: CoordinationStore) -> StoreFactory | None:
    """A factory of stores like ``store`` for another thread's loop, or None."""
    if isinstance(store, EtcdStore):
        endpoints, timeout, creds = list(store.endpoints), store.timeout, store.credentials
        return lambda: EtcdStore(endpoints, timeout=timeout, credentials=creds)
    return None


class _ClientLease:
    """An aetcd lease handle that refreshes through whichever endpoint its store uses now
    (EtcdStore.call moves to the next endpoint after a failure)."""

    def __init__(self, store: EtcdStore, lease_id: int, ttl: int) -> None:
        self.store, self.id, self.ttl = store, lease_id, ttl

    async def refresh(self) -> Any:
        return await self.store.client.refresh_lease(self.id)

    async def revoke(self) -> Any:
        return await self.store.client.revoke_lease(self.id)


def lease_on(store: CoordinationStore, lease: Lease) -> Lease:
    """``lease`` (granted through another store) refreshed through ``store``."""
    if isinstance(store, EtcdStore):
        return EtcdLease(store, _ClientLease(store, lease.id, lease.ttl))
    raise TypeError(f"{type(store).__name__} cannot keep a lease from another thread")


async def _connect(store: CoordinationStore) -> None:
    """Open the thread's channel now (TLS handshake, authentication), not in the first
    refresh's time budget. Failing is fine: the refreshes retry."""
    if isinstance(store, EtcdStore):
        with contextlib.suppress(Exception):
            await asyncio.wait_for(store.client.connect(), store.timeout)


class KeeperThread:
    def __init__(self, factory: StoreFactory, name: str) -> None:
        self.factory = factory
        self.name = name
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._error: BaseException | None = None

    async def run(self, work: Callable[[CoordinationStore], Awaitable[None]]) -> None:
        """Run ``work(store)`` on the thread; return when it does (re-raising what it raised).
        Cancelled: the thread's work is cancelled, its store closed and the thread joined
        before the cancellation goes on."""
        main = asyncio.get_running_loop()
        finished = asyncio.Event()

        def done() -> None:
            with contextlib.suppress(RuntimeError):  # the caller's loop is gone: nobody waits
                main.call_soon_threadsafe(finished.set)

        thread = threading.Thread(target=self._main, args=(work, done), name=self.name,
                                  daemon=True)
        thread.start()
        try:
            await finished.wait()
        finally:
            self._stop()
            await asyncio.to_thread(thread.join)
        if self._error is not None and not isinstance(self._error, asyncio.CancelledError):
            raise self._error

    def _stop(self) -> None:
        with self._lock:
            self._stopping = True
            if self._loop is not None and self._task is not None:
                with contextlib.suppress(RuntimeError):  # its loop is closed: it is over
                    self._loop.call_soon_threadsafe(self._task.cancel)

    def _main(self, work: Callable[[CoordinationStore], Awaitable[None]],
              done: Callable[[], None]) -> None:
        try:
            asyncio.run(self._serve(work))
        except BaseException as exc:  # handed to the caller's loop
            self._error = exc
        finally:
            done()

    async def _serve(self, work: Callable[[CoordinationStore], Awaitable[None]]) -> None:
        with self._lock:
            if self._stopping:
                return
            self._loop, self._task = asyncio.get_running_loop(), asyncio.current_task()
        store = self.factory()
        try:
            await _connect(store)
            await work(store)
        finally:
            await store.close()
