"""The progress bar: what it says comes from what was checked, planned and acknowledged, and
log lines never land on its line."""

from __future__ import annotations

import asyncio
import io
import logging
import re
import sys

import pytest

from drctl.logsetup import setup_logging
from replicator.progress import Estimate, ProgressBar, Sample

MIB = 1 << 20


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_the_eta_is_what_is_left_to_ship_at_the_shipping_rate() -> None:
    e = Estimate(window=5.0)
    # half of a 100 MiB volume checked, 20 MiB of it had to ship, 10 MiB acknowledged so far,
    # acknowledged at 2 MiB/s while checking ran at 10 MiB/s
    e.add(Sample(40 * MIB, 100 * MIB, 16 * MIB, 8 * MIB, at=0.0))
    e.add(Sample(50 * MIB, 100 * MIB, 20 * MIB, 10 * MIB, at=1.0))
    ship, check = e.rates()
    assert (ship, check) == (2 * MIB, 10 * MIB)
    # left: 10 MiB planned and unacknowledged + 50 MiB unchecked x 40% = 30 MiB at 2 MiB/s
    assert e.eta() == pytest.approx(15.0)


def test_the_rate_is_recent_and_no_rate_means_no_eta() -> None:
    e = Estimate(window=5.0)
    e.add(Sample(0, 10 * MIB, 0, 0, at=0.0))
    assert e.eta() is None  # nothing to go by yet
    for t in range(1, 20):  # 1 MiB/s for 10 s, then 4 MiB/s: the window forgets the start
        done = min(t, 10) * MIB + max(0, t - 10) * 4 * MIB
        e.add(Sample(min(done, 10 * MIB), 10 * MIB, done, done, at=float(t)))
    assert e.rates()[0] == pytest.approx(4 * MIB, rel=0.01)


def test_render_says_checked_shipped_rate_and_eta() -> None:
    bar = ProgressBar(_Tty(), width=10)
    bar.render("db", Sample(0, 4 * MIB, 0, 0, at=0.0))
    line = bar.render("db", Sample(2 * MIB, 4 * MIB, 1 * MIB, MIB // 2, at=1.0))
    assert line == ("db [#####-----]  50.0% checked 2.0 MiB/4.0 MiB, shipped 512.0 KiB/1.0 "
                    "MiB at 512.0 KiB/s, eta 3s")


def test_a_log_line_clears_the_bar_first(monkeypatch: pytest.MonkeyPatch) -> None:
    out = _Tty()
    monkeypatch.setattr(sys, "stderr", out)
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    setup_logging("INFO")
    bar = ProgressBar(out)

    async def run() -> None:
        task = asyncio.create_task(bar.follow("vol", lambda: Sample(MIB, 4 * MIB, 0, 0, 0.0),
                                              interval=0.01))
        await asyncio.sleep(0.1)
        logging.getLogger("drctl.test").warning("a log line")
        await asyncio.sleep(0.3)  # the queue's listener thread writes it meanwhile
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    try:
        asyncio.run(run())
    finally:
        root.handlers[:], _ = saved[0], root.setLevel(saved[1])
    text = out.getvalue()
    # the bar was up, then cleared, then the log line written from the start of the line
    assert re.search(r"eta --\r\x1b\[K\d{4}-\d\d-\d\d [\d:,]+ WARNING drctl.test: a log "
                     r"line\n", text), text[-400:]
    logged = [ln for ln in text.replace("\r\x1b[K", "\n").split("\n") if "a log line" in ln]
    assert len(logged) == 1 and "vol [" not in logged[0], logged
