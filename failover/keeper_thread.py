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
``KeeperThread`` is the thread: ``start()`` opens its store (the TLS handshake and etcd's
password check take a while on a busy machine: the keeper does this before it is granted its
lease, not out of the lease's time), ``run(work)`` runs ``work(store)`` there, ``close()``
cancels what still runs, closes the store and joins the thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable, Coroutine
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
            await asyncio.wait_for(store.client.connect(), max(2.0, 2 * store.timeout))


class KeeperThread:
    """A thread running an event loop of its own with a store of its own, from ``start()``
    (which returns once the store is connected) to ``close()``."""

    def __init__(self, factory: StoreFactory, name: str) -> None:
        self.factory = factory
        self.name = name
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._store: CoordinationStore | None = None

    async def start(self) -> None:
        main = asyncio.get_running_loop()
        started: asyncio.Future[None] = main.create_future()

        def report(exc: BaseException | None) -> None:
            def settle() -> None:
                if started.done():
                    return
                if exc is None:
                    started.set_result(None)
                else:
                    started.set_exception(exc)
            with contextlib.suppress(RuntimeError):  # the caller's loop is gone
                main.call_soon_threadsafe(settle)

        self._thread = threading.Thread(target=self._main, args=(report,), name=self.name,
                                        daemon=True)
        self._thread.start()
        try:
            await started
        except BaseException:
            await self.close()
            raise

    async def run(self, work: Callable[[CoordinationStore], Coroutine[Any, Any, None]],
                  ) -> None:
        """Run ``work(store)`` on the thread until it returns (or raises: re-raised here).
        Cancelled, it is cancelled on the thread too (``close()`` waits for it to end)."""
        assert self._loop is not None and self._store is not None, "start() first"
        future = asyncio.run_coroutine_threadsafe(work(self._store), self._loop)
        await asyncio.wrap_future(future)

    async def close(self) -> None:
        """Cancel what still runs on the thread, close its store, stop it, join it."""
        thread, loop, self._thread = self._thread, self._loop, None
        if thread is None:
            return
        if loop is not None:
            with contextlib.suppress(RuntimeError):  # already closed: the thread is ending
                loop.call_soon_threadsafe(loop.stop)
        await asyncio.to_thread(thread.join)
        self._loop = self._store = None

    def _main(self, report: Callable[[BaseException | None], None]) -> None:
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)  # this thread's (grpc.aio and aetcd look it up)
        self._loop = loop
        try:
            try:
                self._store = loop.run_until_complete(self._open())
            except Exception as exc:
                report(exc)
                return
            report(None)
            loop.run_forever()  # until close()
            pending = asyncio.all_tasks(loop)
            for task in pending:
                task.cancel()
            loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            loop.run_until_complete(self._store.close())
            loop.run_until_complete(loop.shutdown_asyncgens())
        finally:
            asyncio.set_event_loop(None)
            loop.close()

    async def _open(self) -> CoordinationStore:
        store = self.factory()
        await _connect(store)
        return store
