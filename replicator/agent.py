"""Supervisor of a source agent (`drctl replicate push`): one owner for its lifecycle.

Startup: metrics registry and endpoint, driver (state, channel, volume map). Then either one
verified sync (--once) or a loop of passes triggered by changes to the volume. On SIGTERM or
SIGINT the current pass is cancelled, the state is saved and the channel closed; a second signal
forces the exit.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import stat
import time
from collections.abc import Coroutine
from contextlib import AsyncExitStack
from typing import Any

from drctl.lifecycle import stop_on_signals
from replicator.driver import PushDriver, PushOptions
from replicator.errors import ReplanNeededError, ReplicatorError, unwrap_group
from replicator.metrics import SourceMetrics, serve_metrics
from replicator.progress import ProgressBar
from replicator.report import PushReport, PushState

log = logging.getLogger(__name__)


class Interrupted(ReplicatorError):
    code = "interrupted"
    exit_code = 130


def _signature(path: str) -> tuple[int, int, bool]:
    st = os.stat(path)
    return st.st_mtime_ns, st.st_size, stat.S_ISBLK(st.st_mode)


async def _until_stopped(coro: Coroutine[Any, Any, Any], stop: asyncio.Event) -> bool:
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


async def run_push(opts: PushOptions, metrics_port: int | None = None,
                   show_progress: bool = True) -> PushReport:
    metrics = SourceMetrics(opts.volume)
    if metrics_port is not None:
        from prometheus_client import CollectorRegistry

        registry = CollectorRegistry()
        metrics.register(registry)
        serve_metrics(registry, metrics_port)
    stop = asyncio.Event()

    started = time.monotonic()
    async with AsyncExitStack() as stack:
        stop_on_signals(stack, stop)
        driver = PushDriver(opts, metrics)
        stack.push_async_callback(driver.close)
        try:
            async with asyncio.TaskGroup() as tg:
                gauges = tg.create_task(_refresh_gauges(driver))
                bar = ProgressBar()
                follow = None
                if show_progress and bar.enabled:
                    follow = tg.create_task(bar.follow(
                        f"{opts.volume}", lambda: (driver.progress.scanned, driver.progress.total,
                                                   driver.totals.wire_bytes,
                                                   driver.progress.started)))
                try:
                    if opts.once:
                        completed = await _until_stopped(driver.sync_once(), stop)
                    else:
                        completed = await _continuous(driver, opts, stop)
                finally:
                    gauges.cancel()
                    if follow is not None:
                        follow.cancel()
                    if driver.planner is not None:
                        driver.save_state()
        except BaseExceptionGroup as group:
            raise unwrap_group(group) from None
        if opts.once and not completed:
            raise Interrupted("interrupted before the replica was verified; state saved, "
                              "the next run resumes")
        return driver.report(PushState.DONE if opts.once else PushState.IDLE,
                             time.monotonic() - started)
    raise AssertionError("unreachable")


async def _refresh_gauges(driver: PushDriver) -> None:
    while True:
        driver.update_gauges()
        await asyncio.sleep(0.5)


async def _continuous(driver: PushDriver, opts: PushOptions, stop: asyncio.Event) -> bool:
    if opts.nbd_listen:
        return await _captured(driver, opts, stop)
    driver.open_volume()
    if not await _until_stopped(driver.reconcile(), stop):
        return False
    last: tuple[int, int, bool] | None = None
    prev_poll = time.time()
    while not stop.is_set():
        polled = time.time()
        sig = _signature(opts.path)
        if sig != last or sig[2]:
            if last is not None and sig != last:
                # written after the previous poll: the conservative start of the lag
                driver.note_dirty(prev_poll)
            if sig[1] != driver.geo.size:
                driver.open_volume()
                await driver.reconcile()
            try:
                if not await _until_stopped(driver.run_pass(), stop):
                    return False
            except ReplanNeededError as exc:
                log.warning("%s: planning again", exc)
                await driver.reconcile()
                continue
            last = sig
            if time.monotonic() - driver._last_save >= opts.save_interval:
                await asyncio.to_thread(driver.save_state)
        prev_poll = polled
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), opts.interval)
    return True


async def _captured(driver: PushDriver, opts: PushOptions, stop: asyncio.Event) -> bool:
    """Serve the volume over NBD; ship exactly the blocks clients write (no rescans).

    The first pass after start compares the whole volume with the replica (it catches up with
    anything written while the agent was down); after that each pass covers the blocks the
    journal recorded. A pass's blocks leave the journal only once the target acknowledged it.
    """
    from replicator.capture.nbd import NbdExport, NbdServer
    from replicator.units import parse_hostport

    assert opts.nbd_listen is not None
    os.makedirs(opts.state_dir, exist_ok=True)
    wake = asyncio.Event()
    export = NbdExport(opts.volume, opts.path, os.path.join(opts.state_dir, "journal"),
                       opts.block_size, on_change=wake.set)
    journal = export.journal
    if journal.replayed:
        log.warning("volume %s: replayed %d journaled writes into the volume", opts.volume,
                    journal.replayed)
    server = NbdServer(export)
    host, port = parse_hostport(opts.nbd_listen)
    bound = await server.start(host, port)
    print(f"drctl replicate push: NBD export {opts.volume!r} on {host}:{bound}", flush=True)
    driver.capture_clock = lambda: journal.first_dirty_at
    try:
        driver.open_volume()
        if not await _until_stopped(driver.reconcile(), stop):
            return False
        blocks: set[int] | None = None  # None: a full pass first
        while not stop.is_set():
            if blocks is None or blocks:
                if blocks is None:
                    journal.take()
                try:
                    if not await _until_stopped(driver.run_pass(blocks), stop):
                        if blocks:
                            journal.checkpoint(blocks)
                        return False
                except ReplanNeededError as exc:
                    log.warning("%s: planning again", exc)
                    await driver.reconcile()
                    if blocks:
                        journal.checkpoint(blocks)
                    blocks = None
                    continue
                journal.checkpoint(set())
            if time.monotonic() - driver._last_save >= opts.save_interval:
                await asyncio.to_thread(driver.save_state)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(_first(stop, wake), opts.interval)
            wake.clear()
            blocks = journal.take()
        return True
    finally:
        await server.close()
        export.close()


async def _first(*events: asyncio.Event) -> None:
    waiters = [asyncio.ensure_future(e.wait()) for e in events]
    try:
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waiters:
            w.cancel()
