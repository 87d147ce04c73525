"""A one-line progress bar for the initial sync, drawn on a terminal only."""

from __future__ import annotations

import asyncio
import sys
import time
from typing import TextIO

from replicator.units import format_bytes


class ProgressBar:
    def __init__(self, stream: TextIO = sys.stderr, width: int = 30) -> None:
        self.stream = stream
        self.width = width
        self.enabled = stream.isatty()
        self._drawn = False

    def draw(self, label: str, done: int, total: int, shipped: int, started: float) -> None:
        if not self.enabled:
            return
        frac = done / total if total else 1.0
        filled = int(self.width * frac)
        elapsed = max(1e-6, time.monotonic() - started)
        rate = done / elapsed
        eta = (total - done) / rate if rate > 0 else 0
        bar = "#" * filled + "-" * (self.width - filled)
        self.stream.write(
            f"\r{label} [{bar}] {frac * 100:5.1f}% {format_bytes(done)}/{format_bytes(total)} "
            f"shipped {format_bytes(shipped)} {format_bytes(rate)}/s eta {eta:4.0f}s "
        )
        self.stream.flush()
        self._drawn = True

    def finish(self) -> None:
        if self._drawn:
            self.stream.write("\n")
            self.stream.flush()

    async def follow(self, label: str, snapshot: object, interval: float = 0.25) -> None:
        """Redraw from ``snapshot()`` -> (done, total, shipped, started) until cancelled."""
        try:
            while True:
                done, total, shipped, started = snapshot()  # type: ignore[operator]
                self.draw(label, done, total, shipped, started)
                await asyncio.sleep(interval)
        finally:
            self.finish()
