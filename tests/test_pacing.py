"""wxd.pacing.RateLimiter: a burst, then one call per 1/rate s; hold_for() holds every caller."""

from __future__ import annotations

import asyncio

import pytest

from tests.helpers import FakeClock
from wxd.pacing import YIELD_MAX_S, YIELD_STEP_S, RateLimiter, yield_to


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


def test_yield_to_waits_while_busy_at_most_its_bound() -> None:
    clock = FakeClock(0.0, autojump=True)

    async def go() -> tuple[float, float, float, float]:
        started = clock()
        always = await yield_to(lambda: True, clock)
        bounded_at = clock() - started
        checks = iter([True, True, False])
        briefly = await yield_to(lambda: next(checks), clock)
        idle = await yield_to(lambda: False, clock) + await yield_to(None, clock)
        return always, bounded_at, briefly, idle

    always, bounded_at, briefly, idle = asyncio.run(go())
    assert always == pytest.approx(YIELD_MAX_S) and bounded_at == pytest.approx(YIELD_MAX_S)
    assert briefly == pytest.approx(2 * YIELD_STEP_S)
    assert idle == 0.0


def test_yield_to_stops_when_asked() -> None:
    clock = FakeClock(0.0, autojump=True)
    assert asyncio.run(yield_to(lambda: True, clock, lambda: False)) == 0.0
