"""The resync gauges of a capture loop (shipper.py): what the running resync covers, what is
left of it, and an ETA from its rate so far."""

from __future__ import annotations

import time

from replicator.driver import PushDriver


class ResyncProgress:
    """The resync gauges: what it covers, what is left, an ETA from the rate so far."""

    def __init__(self, drivers: list[PushDriver]) -> None:
        self.drivers = drivers
        self.sizes: list[int] = [0] * len(drivers)
        self.by_blocks = False
        self.acked0 = [0] * len(drivers)
        self.started = 0.0
        for d in drivers:
            d.m.set(d.m.resync_eta, -1)
            self._wrap(d)

    def _wrap(self, d: PushDriver) -> None:
        inner = d.m.refresh
        i = self.drivers.index(d)

        def refresh() -> None:
            if inner is not None:
                inner()
            self._update(i, d)

        d.m.refresh = refresh

    def start(self, sets: dict[int, set[int] | None], by_blocks: bool) -> None:
        self.started = time.monotonic()
        self.by_blocks = by_blocks
        for i, d in enumerate(self.drivers):
            blocks = sets.get(i)
            self.sizes[i] = d.geo.size if blocks is None else len(blocks) * d.geo.block_size
            self.acked0[i] = d.progress.acked_raw
            d.m.set(d.m.resync_exact, int(by_blocks))
            self._update(i, d)

    def stop(self) -> None:
        self.sizes = [0] * len(self.drivers)
        for i, d in enumerate(self.drivers):
            self._update(i, d)

    def _update(self, i: int, d: PushDriver) -> None:
        size = self.sizes[i]
        if not size:
            d.m.set(d.m.resync_size, 0)
            d.m.set(d.m.resync_remaining, 0)
            d.m.set(d.m.resync_eta, -1)
            return
        done = (d.progress.acked_raw - self.acked0[i]) if self.by_blocks \
            else d.progress.scanned
        done = max(0, min(size, done))
        left = size - done
        elapsed = time.monotonic() - self.started
        d.m.set(d.m.resync_size, size)
        d.m.set(d.m.resync_remaining, left)
        d.m.set(d.m.resync_eta, elapsed * left / done if done and elapsed > 1.0 else -1)
