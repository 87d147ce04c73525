"""A token-bucket bandwidth cap for bytes put on the wire."""

from __future__ import annotations

import asyncio
import time


class TokenBucket:
    """Admits ``rate`` bytes per second on average, with bursts of at most ``burst`` bytes.

    A request larger than the burst is admitted once the bucket is full and then drives it
    negative, so the long-run rate still holds for messages of any size.
    """

    def __init__(self, rate: float, burst: float | None = None) -> None:
        if rate <= 0:
            raise ValueError("rate must be positive")
        self.rate = float(rate)
        self.burst = float(burst if burst is not None else max(rate * 0.05, 64 * 1024))
        self.tokens = self.burst
        self.stamp = time.monotonic()

    def _refill(self) -> None:
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now

    def delay_for(self, amount: int) -> float:
        """Seconds to wait before ``amount`` bytes may go (0 if they may go now)."""
        self._refill()
        need = min(float(amount), self.burst)
        if self.tokens >= need:
            return 0.0
        return (need - self.tokens) / self.rate

    async def acquire(self, amount: int) -> None:
        while (wait := self.delay_for(amount)) > 0:
            await asyncio.sleep(wait)
        self.tokens -= amount
