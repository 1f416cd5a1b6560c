"""Call pacing for upstream jobs: a calls/s limiter, retry backoff, WeChat's quota clock.

Pure (layer 0 with errors/config): standard library only; the clock and sleep are injected.
"""

from __future__ import annotations

import math
import random
from collections.abc import Awaitable, Callable
from typing import Any

DAY_S = 86400.0
BEIJING_UTC_OFFSET_S = 8 * 3600.0
_RNG = random.Random()  # jitter only, never secrets


def next_beijing_midnight(now: float) -> float:
    """The next 00:00 Asia/Shanghai (UTC+8, no DST) strictly after `now`, unix seconds.

    WeChat's daily quotas (45009) are assumed to reset then (unconfirmed):
    https://developers.weixin.qq.com/doc/offiaccount/Message_Management/API_Call_Limits.html
    """
    offset = BEIJING_UTC_OFFSET_S
    return (math.floor((now + offset) / DAY_S) + 1) * DAY_S - offset


def backoff_s(attempt: int, base_s: float, cap_s: float, rng: random.Random | None = None) -> float:
    """Exponential backoff with jitter for retry number `attempt` (1, 2, ...): a uniform draw
    in [½, 1] × min(base·2^(attempt-1), cap)."""
    draw = (rng or _RNG).uniform(0.5, 1.0)
    return float(min(base_s * 2 ** (attempt - 1), cap_s) * draw)


def until_next_minute_s(now: float, rng: random.Random | None = None) -> float:
    """Seconds until the next wall-clock minute plus up to 1 s of jitter: 45011 ("api
    minute-quota reach limit, must slower retry next minute") means nothing passes before."""
    return 60.0 - now % 60.0 + (rng or _RNG).uniform(0.0, 1.0)


class RateLimiter:
    """At most `rate_per_s` acquisitions a second after a burst of `burst`; 0 = unlimited.

    GCRA reservations: each acquire books its slot at once and sleeps until it, so concurrent
    callers end up 1/rate apart without polling. `hold_until(t)` pushes every later slot past
    t (e.g. after a 45011). Time comes from the injected `clock` and `sleep` (seconds).
    """

    def __init__(self, rate_per_s: float, burst: int, clock: Callable[[], float],
                 sleep: Callable[[float], Awaitable[Any]]) -> None:
        self.rate_per_s = rate_per_s
        self._interval = 1.0 / rate_per_s if rate_per_s > 0 else 0.0
        self._burst_s = max(burst - 1, 0) * self._interval
        self._clock, self._sleep = clock, sleep
        self._tat = -math.inf     # GCRA theoretical arrival time of the next call
        self._hold = -math.inf

    def hold_until(self, at: float) -> None:
        self._hold = max(self._hold, at)

    async def acquire(self) -> None:
        now = self._clock()
        slot = max(now, self._hold)
        if self._interval > 0:
            slot = max(slot, self._tat - self._burst_s)
            self._tat = max(self._tat, slot) + self._interval
        if slot > now:
            await self._sleep(slot - now)
