from __future__ import annotations

import pytest

from replicator import throttle
from replicator.throttle import TokenBucket


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_bucket_admits_the_rate_in_the_long_run(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = Clock()
    monkeypatch.setattr(throttle.time, "monotonic", clock)
    bucket = TokenBucket(rate=1_000_000, burst=100_000)
    sent = 0
    for _ in range(1000):  # 1 MB messages, each waits what delay_for says
        wait = bucket.delay_for(1_000_000)
        clock.now += wait
        assert bucket.delay_for(1_000_000) == 0
        bucket.tokens -= 1_000_000
        sent += 1_000_000
    elapsed = clock.now - 100.0
    # the first message goes at once (full bucket); every later one is paced by the rate
    assert (sent - 1_000_000) / elapsed == pytest.approx(1_000_000, rel=0.001)


def test_bucket_rejects_nonsense() -> None:
    with pytest.raises(ValueError):
        TokenBucket(0)
