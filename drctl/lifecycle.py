"""Signal handling shared by every daemon's supervisor (replicator and failover)."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from contextlib import AsyncExitStack

log = logging.getLogger(__name__)


def stop_on_signals(stack: AsyncExitStack, stop: asyncio.Event) -> None:
    """SIGTERM or SIGINT sets ``stop`` (graceful shutdown); a second one exits at once (130).
    The handlers are removed when ``stack`` closes."""
    loop = asyncio.get_running_loop()
    count = 0

    def on_signal() -> None:
        nonlocal count
        count += 1
        if count > 1:
            log.error("second signal: exiting without a graceful shutdown")
            os._exit(130)
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal)
        stack.callback(loop.remove_signal_handler, sig)
