"""Supervisor of a source agent (`drctl replicate push`): one owner for its lifecycle.

Startup: metrics registry and endpoint, driver (state, channel, volume map). Then either one
verified sync (--once) or a loop of passes triggered by changes to the volume. On SIGTERM or
SIGINT the current pass is cancelled, the state is saved and the channel closed; a second signal
forces the exit.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import stat
import time
from collections.abc import Iterator
from contextlib import AsyncExitStack, contextmanager

from drctl.lifecycle import stop_on_signals
from drctl.listening import describe as describe_bind_error
from replicator.driver import PushDriver, PushOptions
from replicator.errors import ReplanNeededError, ReplicatorError, UsageError, unwrap_group
from replicator.metrics import MetricsEndpoint, SourceMetrics, serve_sources
from replicator.progress import ProgressBar, Sample
from replicator.report import PushReport, PushState
from replicator.tcpcheck import warn_if_probe_rtt
from replicator.throttle import TokenBucket
from replicator.waiting import until_stopped, wait_at_most

log = logging.getLogger(__name__)


MTIME_SLACK_S = 0.05  # a file's mtime comes from a coarse clock: it may read a little early


class Interrupted(ReplicatorError):
    """Stopped by a signal before the replica was verified; the state is saved and the next
    run resumes."""

    code = "interrupted"
    exit_code = 130


def _signature(path: str) -> tuple[int, int, bool]:
    st = os.stat(path)
    return st.st_mtime_ns, st.st_size, stat.S_ISBLK(st.st_mode)


async def run_push(opts: PushOptions, metrics_port: MetricsEndpoint | int | None = None,
                   show_progress: bool = True) -> PushReport:
    metrics = SourceMetrics(opts.volume)
    if metrics_port is not None:
        serve_sources([metrics], metrics_port)
    stop = asyncio.Event()

    started = time.monotonic()
    if not opts.once:
        await asyncio.to_thread(warn_if_probe_rtt, opts.address)
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
                    p = driver.progress
                    follow = tg.create_task(bar.follow(
                        f"{opts.volume}", lambda: Sample(p.scanned, p.total, p.pass_planned,
                                                         p.pass_acked, time.monotonic())))
                try:
                    if opts.once:
                        completed = await until_stopped(driver.sync_once(), stop)
                    else:
                        completed = await _continuous(driver, opts, stop)
                finally:
                    gauges.cancel()
                    if follow is not None:
                        follow.cancel()
                    if driver.planner is not None:
                        driver.save_state(clean=True)  # a clean stop (capture/resume.py)
        except BaseExceptionGroup as group:
            raise unwrap_group(group) from None
        if opts.once and not completed:
            raise Interrupted("interrupted before the replica was verified; state saved, "
                              "the next run resumes")
        return driver.report(PushState.DONE if opts.once else PushState.IDLE,
                             time.monotonic() - started)
    raise AssertionError("unreachable")


async def run_group(members: list[PushOptions], journal_path: str,
                    metrics_port: MetricsEndpoint | int | None = None) -> list[PushReport]:
    """A consistency group: the members' volumes are served over NBD by one agent and their
    writes journaled in one order (``journal_path``); a shared token bucket caps the group."""
    metrics = [SourceMetrics(o.volume) for o in members]
    if metrics_port is not None:
        serve_sources(metrics, metrics_port)
    stop = asyncio.Event()
    started = time.monotonic()
    await asyncio.to_thread(warn_if_probe_rtt, members[0].address)
    async with AsyncExitStack() as stack:
        stop_on_signals(stack, stop)
        drivers: list[PushDriver] = []
        for o, m in zip(members, metrics, strict=True):
            driver = PushDriver(o, m)
            stack.push_async_callback(driver.close)
            drivers.append(driver)
        if members[0].rate_limit:
            shared = TokenBucket(members[0].rate_limit)
            for driver in drivers:
                driver.bucket = shared
        try:
            async with asyncio.TaskGroup() as tg:
                gauges = [tg.create_task(_refresh_gauges(d)) for d in drivers]
                try:
                    from replicator.capture.shipper import run_captured

                    with _nbd_bind_errors(members[0]):
                        await run_captured(drivers, stop, journal_path)
                finally:
                    for g in gauges:
                        g.cancel()
                    for d in drivers:
                        if d.planner is not None:
                            d.save_state(clean=True)  # a clean stop (capture/resume.py)
        except BaseExceptionGroup as group:
            raise unwrap_group(group) from None
        return [d.report(PushState.IDLE, time.monotonic() - started) for d in drivers]
    raise AssertionError("unreachable")


async def _refresh_gauges(driver: PushDriver) -> None:
    while True:
        driver.update_gauges()
        await asyncio.sleep(0.5)


async def _continuous(driver: PushDriver, opts: PushOptions, stop: asyncio.Event) -> bool:
    if opts.nbd_listen:
        return await _captured(driver, opts, stop)
    driver.open_volume()
    if not await until_stopped(driver.reconcile(), stop):
        return False
    last: tuple[int, int, bool] | None = None
    prev_poll = time.time()
    while not stop.is_set():
        polled = time.time()
        sig = _signature(opts.path)
        if sig == last and not sig[2]:
            # unchanged since the signature the last pass began with: nothing written before
            # this poll is unshipped (less the granularity of mtime), so the lag of a write
            # after a long idle time counts from here, not from the last pass
            driver.still_clean(polled - MTIME_SLACK_S)
        if sig != last or sig[2]:
            if last is not None and sig != last:
                # written after the previous poll: the conservative start of the lag
                driver.note_dirty(prev_poll)
            if sig[1] != driver.geo.size:
                driver.open_volume()
                await driver.reconcile()
            try:
                if not await until_stopped(driver.run_pass(), stop):
                    return False
            except ReplanNeededError as exc:
                log.warning("%s: planning again", exc)
                await driver.reconcile()
                continue
            last = sig
            await driver.save_if_due()
        prev_poll = polled
        await wait_at_most(opts.interval, stop)
    return True


async def _captured(driver: PushDriver, opts: PushOptions, stop: asyncio.Event) -> bool:
    from replicator.capture.shipper import run_captured

    with _nbd_bind_errors(opts):
        return await run_captured([driver], stop, os.path.join(opts.state_dir, "journal"))


@contextmanager
def _nbd_bind_errors(opts: PushOptions) -> Iterator[None]:
    """The NBD export's address taken since the CLI checked it: one line naming the flag."""
    try:
        yield
    except OSError as exc:
        if exc.errno not in (errno.EADDRINUSE, errno.EADDRNOTAVAIL):
            raise
        raise UsageError(f"--nbd-listen {opts.nbd_listen}: cannot listen there: "
                         f"{describe_bind_error(exc)}") from None
