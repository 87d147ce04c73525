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
    await _first_of(None, events)


async def wait_at_most(seconds: float, *events: asyncio.Event) -> None:
    """Return after ``seconds`` or as soon as any of ``events`` is set."""
    await _first_of(seconds, events)


async def _first_of(seconds: float | None, events: tuple[asyncio.Event, ...]) -> None:
    """One future woken by the first event or the timer: half the cost of ``asyncio.wait``
    inside ``asyncio.wait_for`` (the capture loop waits once per consistency point)."""
    if any(e.is_set() for e in events):
        return
    loop = asyncio.get_running_loop()
    woken: asyncio.Future[None] = loop.create_future()

    def wake(_: object = None) -> None:
        if not woken.done():
            woken.set_result(None)

    timer = loop.call_later(seconds, wake) if seconds is not None else None
    waiters = [asyncio.ensure_future(e.wait()) for e in events]
    for w in waiters:
        w.add_done_callback(wake)
    try:
        await woken
    finally:
        if timer is not None:
            timer.cancel()
        for w in waiters:
            w.cancel()
