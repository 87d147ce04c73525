"""A one-line progress bar for a sync, drawn on a terminal only.

What it says, and where each figure comes from (``Progress`` in driver.py):

* the bar and the percentage: how much of the volume has been checked (hashed and, where it
  differs from the replica, planned for shipping), advanced every 2 MiB, not every scan window;
* ``shipped``: raw bytes the target acknowledged, of the bytes planned so far;
* the rate: acknowledged raw bytes per second over the last few seconds (under a rate limit,
  the shipping rate, not the speed of the scan);
* the ETA: what is left to ship (planned but unacknowledged, plus the unchecked part of the
  volume times the share of checked bytes that had to be shipped) at that rate, or the
  unchecked part at the scan's own rate if that takes longer.

Log lines never land on the bar's line: while the bar is up, the console handler of
drctl/logsetup.py clears it before it writes a line (both under one lock).
"""

from __future__ import annotations

import asyncio
import sys
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TextIO

from drctl.logsetup import CONSOLE_LOCK, before_each_line
from replicator.units import format_bytes

WINDOW_S = 5.0  # the rates are measured over this much recent time


@dataclass(frozen=True)
class Sample:
    checked: int  # volume bytes checked
    total: int  # volume bytes
    planned: int  # raw bytes planned for shipping
    acked: int  # raw bytes the target acknowledged
    at: float  # time.monotonic()


class Estimate:
    """Rates over the last WINDOW_S seconds, and the ETA they give."""

    def __init__(self, window: float = WINDOW_S) -> None:
        self.window = window
        self.samples: deque[Sample] = deque()

    def add(self, s: Sample) -> None:
        self.samples.append(s)
        while len(self.samples) > 2 and s.at - self.samples[1].at >= self.window:
            self.samples.popleft()

    def rates(self) -> tuple[float, float]:
        """(acknowledged raw bytes/s, checked volume bytes/s)."""
        if len(self.samples) < 2:
            return 0.0, 0.0
        a, b = self.samples[0], self.samples[-1]
        dt = b.at - a.at
        if dt <= 0:
            return 0.0, 0.0
        return (b.acked - a.acked) / dt, (b.checked - a.checked) / dt

    def eta(self) -> float | None:
        """Seconds left, None while there is no rate to go by."""
        s = self.samples[-1]
        ship_rate, check_rate = self.rates()
        unchecked = max(0, s.total - s.checked)
        share = s.planned / s.checked if s.checked else 1.0
        to_ship = max(0, s.planned - s.acked) + unchecked * share
        times = []
        if to_ship > 0:
            if ship_rate <= 0:
                return None
            times.append(to_ship / ship_rate)
        if unchecked > 0:
            if check_rate <= 0:
                return None
            times.append(unchecked / check_rate)
        return max(times, default=0.0)


class ProgressBar:
    def __init__(self, stream: TextIO = sys.stderr, width: int = 24) -> None:
        self.stream = stream
        self.width = width
        self.enabled = stream.isatty()
        self._line = ""
        self.estimate = Estimate()

    def render(self, label: str, s: Sample) -> str:
        self.estimate.add(s)
        frac = min(1.0, s.checked / s.total) if s.total else 1.0
        filled = int(self.width * frac)
        bar = "#" * filled + "-" * (self.width - filled)
        ship_rate, _ = self.estimate.rates()
        eta = self.estimate.eta()
        eta_text = "--" if eta is None else f"{eta:.0f}s"
        return (f"{label} [{bar}] {frac * 100:5.1f}% checked {format_bytes(s.checked)}/"
                f"{format_bytes(s.total)}, shipped {format_bytes(s.acked)}/"
                f"{format_bytes(s.planned)} at {format_bytes(ship_rate)}/s, eta {eta_text}")

    def draw(self, label: str, s: Sample) -> None:
        if not self.enabled:
            return
        line = self.render(label, s)
        with CONSOLE_LOCK:
            pad = " " * max(0, len(self._line) - len(line))
            self.stream.write(f"\r{line}{pad}")
            self.stream.flush()
            self._line = line

    def clear(self) -> None:
        """Erase the bar (before something else is printed); the next draw puts it back."""
        with CONSOLE_LOCK:
            if self._line:
                self.stream.write("\r\x1b[K")
                self.stream.flush()
                self._line = ""

    def finish(self) -> None:
        with CONSOLE_LOCK:
            if self._line:
                self.stream.write("\n")
                self.stream.flush()
                self._line = ""

    async def follow(self, label: str, snapshot: Callable[[], Sample],
                     interval: float = 0.25) -> None:
        """Redraw from ``snapshot()`` until cancelled; log lines (drctl/logsetup.py) clear
        the bar before they are written, so none lands on its line."""
        with before_each_line(self.clear):
            try:
                while True:
                    self.draw(label, snapshot())
                    await asyncio.sleep(interval)
            finally:
                if self.enabled:
                    self.draw(label, snapshot())
                self.finish()
