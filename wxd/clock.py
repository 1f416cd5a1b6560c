"""Clock: the one source of time for every service (now, sleeps, timers, idle waits).

Standard library only. Services take `clock: Clock` (default SYSTEM_CLOCK) and never call
time.time, asyncio.sleep or loop.call_later for their own timing, nor wait for a doorbell with
asyncio.wait_for: they use the clock, so a test can move a fake clock instead of sleeping, and
"nothing happened for 30 s" takes no real time. Bounds on real work (a job's timeout, the drain
at stop, network timeouts) stay real time: they bound what the process does, not the calendar.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Protocol


class Timer(Protocol):
    """What call_later returns (asyncio.TimerHandle satisfies it)."""

    def cancel(self) -> None: ...


class Clock(Protocol):
    """Wall time (unix seconds), a monotonic reading, sleeps and timers, all in seconds."""

    def now(self) -> float:
        """Unix time: stored in rows, compared with WeChat's and the calendar's instants."""
        ...

    def monotonic(self) -> float:
        """Seconds on a clock that never jumps (spacing calls, measuring waits)."""
        ...

    async def sleep(self, seconds: float) -> None:
        """Return after `seconds` (at once when <= 0, after yielding to the loop)."""
        ...

    def call_later(self, seconds: float, fn: Callable[[], object]) -> Timer:
        """Run `fn()` on the event loop after `seconds`, unless the timer is cancelled."""
        ...

    async def wait(self, event: asyncio.Event, timeout: float | None) -> bool:
        """Wait until `event` is set or `timeout` seconds pass (None: no bound); True if set.
        The event is not cleared. Cancelling the caller cancels the wait."""
        ...


class SystemClock:
    """The real clock: time.time, time.monotonic and the running asyncio loop."""

    def now(self) -> float:
        return time.time()

    def monotonic(self) -> float:
        return time.monotonic()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(max(seconds, 0.0))

    def call_later(self, seconds: float, fn: Callable[[], object]) -> Timer:
        return asyncio.get_running_loop().call_later(max(seconds, 0.0), fn)

    async def wait(self, event: asyncio.Event, timeout: float | None) -> bool:
        if event.is_set():
            return True
        if timeout is not None and timeout <= 0:
            return False
        # Not asyncio.wait_for: before 3.12 it can swallow a cancellation that races the timeout.
        waiter = asyncio.ensure_future(event.wait())
        try:
            await asyncio.wait({waiter}, timeout=timeout)
        finally:
            if not waiter.done():
                waiter.cancel()
        return event.is_set()


SYSTEM_CLOCK = SystemClock()  # the default `clock` of every service (stateless, shareable)
