"""Wake-ups on change: a watch on the cluster prefix that sets an event for every change, so
ticks run as soon as something moves instead of on the next interval."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from failover.coordination.base import CoordinationStore
from failover.errors import CompactedError, StoreUnavailableError

log = logging.getLogger(__name__)


class ChangeFeed:
    def __init__(self, store: CoordinationStore, prefix: str) -> None:
        self.store = store
        self.prefix = prefix
        self.changed = asyncio.Event()

    async def run(self) -> None:
        """Follow the prefix forever (the store resumes broken watches from last + 1)."""
        while True:
            try:
                snap = await self.store.snapshot(self.prefix)
                async for _event in self.store.watch(self.prefix, snap.revision + 1):
                    self.changed.set()
            except (CompactedError, StoreUnavailableError) as exc:
                log.warning("change feed on %s: %s: starting again", self.prefix, exc)
                self.changed.set()
                await asyncio.sleep(0.5)
            except Exception as exc:
                log.error("change feed on %s failed (%s: %s): starting again", self.prefix,
                          type(exc).__name__, exc)
                self.changed.set()
                await asyncio.sleep(1.0)

    async def wait(self, timeout: float) -> None:
        """Until something changed or ``timeout`` passed; then re-arm."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.changed.wait(), timeout)
        self.changed.clear()
