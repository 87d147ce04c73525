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


PARENT_ENV = "DRCTL_DIE_WITH_PARENT"  # the pid of the supervisor this process must not outlive


def die_with_parent_if_asked() -> None:
    """A supervised child (a site agent's target daemon or capture agent) asks the kernel for
    SIGKILL when its supervisor dies, so a killed agent leaves no export acknowledging writes
    behind. Done here, in the new process, not between fork and exec (unsafe with threads)."""
    want = os.environ.pop(PARENT_ENV, "")
    if not want:
        return
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if str(os.getppid()) != want:  # the supervisor died before the request took effect
        os._exit(137)
