"""wxd.pacing.RateLimiter: a burst, then one call per 1/rate s; hold_for() holds every caller."""

from __future__ import annotations

import asyncio

import pytest

from tests.helpers import FakeClock
from wxd.pacing import RateLimiter


def test_rate_limiter_spacing() -> None:
    clock = FakeClock(0.0, autojump=True)
    limiter = RateLimiter(10, 3, clock)

    async def go() -> list[float]:
        times = []
        for _ in range(8):
            await limiter.acquire()
            times.append(clock())
        limiter.hold_for(60)
        await limiter.acquire()
        times.append(clock())
        return times

    times = asyncio.run(go())
    assert times[:3] == [0.0, 0.0, 0.0]  # the burst
    assert times[3:8] == pytest.approx([0.1, 0.2, 0.3, 0.4, 0.5])
    assert times[8] == pytest.approx(60.5)
