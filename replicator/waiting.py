"""Small asyncio helpers shared by the agent's loops."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Coroutine
from typing import Any


async def until_stopped(coro: Coroutine[Any, Any, Any], stop: asyncio.Event) -> bool:
    """Run ``coro``; if ``stop`` is set first, cancel it. True if it completed."""
    task = asyncio.ensure_future(coro)
    stopper = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopper.cancel()
    if task.done():
        task.result()
        return True
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    return False


async def first_of(*events: asyncio.Event) -> None:
    """Return once any of ``events`` is set."""
    waiters = [asyncio.ensure_future(e.wait()) for e in events]
    try:
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waiters:
            w.cancel()


async def wait_at_most(seconds: float, *events: asyncio.Event) -> None:
    """Return after ``seconds`` or as soon as any of ``events`` is set."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(first_of(*events), seconds)
