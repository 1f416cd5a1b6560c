"""Pacing of background work: a calls/s limiter, yielding to the webhook, the lease length,
the idle-poll bound.

Time comes from the injected wxd.clock.Clock (monotonic readings and sleeps).
"""

from __future__ import annotations

import math
from collections.abc import Callable

from wxd.clock import Clock

# A leased push or event job is recorded with leased_until = now + LEASE_S; a job running longer
# than its own timeout is abandoned well before. A lease that passed without its outcome being
# recorded (the write failed, the worker died) is taken again by the running daemon; recovery
# at start frees the leases of a previous process at once.
LEASE_S = 120.0
# The longest idle wait between looks at a queue: a safety net only (the doorbell rings on new
# work, retries wake at their due time), long enough that an idle daemon stays asleep.
IDLE_MAX_S = 30.0
# While the webhook is busy, deferred work (event jobs, callbacks) holds each next step back in
# steps of YIELD_STEP_S, at most YIELD_MAX_S per step: WeChat's 5-second answer comes first.
YIELD_STEP_S = 0.05
YIELD_MAX_S = 1.0


async def yield_to(busy: Callable[[], bool] | None, clock: Clock,
                   keep_going: Callable[[], bool] = lambda: True) -> float:
    """Wait while `busy()` (the webhook's: requests wait for their commit) and `keep_going()`,
    at most YIELD_MAX_S; returns the seconds waited. Deferred work slows to a trickle during a
    burst of webhook traffic (never stops: one step per YIELD_MAX_S per worker) and catches
    up after it."""
    waited = 0.0
    if busy is None:
        return waited
    while waited < YIELD_MAX_S and busy() and keep_going():
        await clock.sleep(YIELD_STEP_S)
        waited += YIELD_STEP_S
    return waited


class RateLimiter:
    """At most `rate_per_s` acquisitions a second after a burst of `burst`; 0 = unlimited.

    GCRA reservations: each acquire books its slot at once and sleeps until it, so concurrent
    callers end up 1/rate apart without polling. `hold_for(s)` pushes every later slot at least
    s seconds from now (e.g. after a 45011), also when unlimited.
    """

    def __init__(self, rate_per_s: float, burst: int, clock: Clock) -> None:
        self.rate_per_s = rate_per_s
        self._interval = 1.0 / rate_per_s if rate_per_s > 0 else 0.0
        self._burst_s = max(burst - 1, 0) * self._interval
        self._clock = clock
        self._tat = -math.inf     # GCRA theoretical arrival time of the next call
        self._hold = -math.inf

    def hold_for(self, seconds: float) -> None:
        self._hold = max(self._hold, self._clock.monotonic() + seconds)

    async def acquire(self) -> None:
        now = self._clock.monotonic()
        slot = max(now, self._hold)
        if self._interval > 0:
            slot = max(slot, self._tat - self._burst_s)
            self._tat = max(self._tat, slot) + self._interval
        if slot > now:
            await self._clock.sleep(slot - now)
