"""wxd.clock: the Clock contract, held by SystemClock and by the tests' FakeClock alike (tests
drive services with FakeClock, so it must behave as the real clock does, only faster)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import pytest

from tests.helpers import FakeClock
from wxd.clock import SYSTEM_CLOCK, Clock


class Real:
    """SystemClock: time passes by waiting for it (short steps)."""

    step = 0.05

    def __init__(self) -> None:
        self.clock: Clock = SYSTEM_CLOCK

    async def pass_time(self, seconds: float) -> None:
        await asyncio.sleep(seconds + 0.01)  # and what fell due has run


class Fake:
    """FakeClock: time passes when advanced (long steps, no waiting)."""

    step = 600.0

    def __init__(self) -> None:
        self.fake = FakeClock()
        self.clock: Clock = self.fake

    async def pass_time(self, seconds: float) -> None:
        await settle()  # what was just started is waiting on the clock
        self.fake.advance(seconds)
        await settle()  # what fell due has run


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


Driver = Real | Fake


def run(make: Callable[[], Driver], test: Callable[[Driver], Awaitable[None]]) -> None:
    async def main() -> None:
        await test(make())

    asyncio.run(main())


DRIVERS = pytest.mark.parametrize("make", [Real, Fake], ids=["system", "fake"])
TOLERANCE_S = 1e-3  # the event loop runs a timer due within its clock resolution


@DRIVERS
def test_sleep_returns_after_the_time_and_at_once_when_not_positive(
        make: Callable[[], Driver]) -> None:
    async def test(d: Driver) -> None:
        await asyncio.wait_for(d.clock.sleep(0), 1)
        await asyncio.wait_for(d.clock.sleep(-5), 1)
        start = d.clock.monotonic()
        sleeper = asyncio.ensure_future(d.clock.sleep(2 * d.step))
        done_at: list[float] = []
        sleeper.add_done_callback(lambda _: done_at.append(d.clock.monotonic() - start))
        await d.pass_time(d.step)
        await d.pass_time(2 * d.step)
        await asyncio.wait_for(sleeper, 1)
        assert done_at[0] >= 2 * d.step - TOLERANCE_S  # never before its time

    run(make, test)


@DRIVERS
def test_call_later_fires_once_due_unless_cancelled(make: Callable[[], Driver]) -> None:
    async def test(d: Driver) -> None:
        start = d.clock.monotonic()
        fired: dict[str, float] = {}  # name -> when it ran (since start)

        def mark(name: str) -> Callable[[], object]:
            return lambda: fired.setdefault(name, d.clock.monotonic() - start)

        d.clock.call_later(2 * d.step, mark("late"))
        d.clock.call_later(d.step, mark("early"))
        d.clock.call_later(d.step, mark("cancelled")).cancel()
        d.clock.call_later(0, mark("now"))
        await d.pass_time(0)
        assert "now" in fired
        await d.pass_time(1.5 * d.step)
        assert "early" in fired
        await d.pass_time(d.step)
        assert set(fired) == {"now", "early", "late"}  # the cancelled one never ran
        # Never before its time (a busy loop may run them later, never earlier), in order.
        assert fired["early"] >= d.step - TOLERANCE_S
        assert fired["late"] >= 2 * d.step - TOLERANCE_S
        assert fired["now"] <= fired["early"] <= fired["late"]

    run(make, test)


@DRIVERS
def test_wait_is_true_when_the_event_is_set_false_at_the_timeout(
        make: Callable[[], Driver]) -> None:
    async def test(d: Driver) -> None:
        event = asyncio.Event()
        assert await d.clock.wait(event, 0) is False
        timed_out = asyncio.ensure_future(d.clock.wait(event, d.step))
        await d.pass_time(2 * d.step)
        assert await asyncio.wait_for(timed_out, 1) is False
        woken = asyncio.ensure_future(d.clock.wait(event, 1000 * d.step))
        unbounded = asyncio.ensure_future(d.clock.wait(event, None))
        await d.pass_time(d.step)
        assert not woken.done() and not unbounded.done()
        event.set()
        assert await asyncio.wait_for(woken, 1) is True
        assert await asyncio.wait_for(unbounded, 1) is True
        assert event.is_set()  # not cleared
        assert await d.clock.wait(event, 0) is True

    run(make, test)


@DRIVERS
def test_cancelling_the_caller_cancels_the_wait(make: Callable[[], Driver]) -> None:
    async def test(d: Driver) -> None:
        event = asyncio.Event()
        waiter = asyncio.ensure_future(d.clock.wait(event, 100 * d.step))
        await d.pass_time(0)
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        if isinstance(d, Fake):
            assert d.fake.pending() == []  # its timer went with it

    run(make, test)


def test_system_clock_reads_unix_and_monotonic_time() -> None:
    assert abs(SYSTEM_CLOCK.now() - time.time()) < 1
    first = SYSTEM_CLOCK.monotonic()
    assert abs(first - time.monotonic()) < 1 and SYSTEM_CLOCK.monotonic() >= first
