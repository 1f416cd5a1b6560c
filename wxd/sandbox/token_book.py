"""access_token bookkeeping for the emulator: /cgi-bin/token, /cgi-bin/stable_token and the check.

Pure: stdlib only; must not import tornado. Time comes from the injected clock (unix seconds).
"""

from __future__ import annotations

import base64
import random
import re
from collections.abc import Callable
from dataclasses import dataclass

TOKEN_LIFETIME_S = 7200
# WeChat keeps the previous /cgi-bin/token token working for 5 minutes after a new one is issued,
# and rotates a stable token 5 minutes before it expires.
# https://developers.weixin.qq.com/doc/offiaccount/Basic_Information/Get_access_token.html
# https://developers.weixin.qq.com/doc/offiaccount/Basic_Information/getStableAccessToken.html
OVERLAP_S = 300
FORCE_REFRESH_PER_DAY = 20
FORCE_REFRESH_SPACING_S = 30

# Well-formed tokens look like WeChat's ("<version>_<base64url text>"). Anything else is
# answered 40014 (malformed); a well-formed token the emulator never issued gets 40001.
_TOKEN_RE = re.compile(r"[0-9]{1,4}_[A-Za-z0-9_-]{20,600}")

# Quotas reset at midnight Beijing time (UTC+8); the exact hour is unconfirmed.
# https://developers.weixin.qq.com/doc/offiaccount/Message_Management/API_Call_Limits.html
_BEIJING_OFFSET_S = 8 * 3600


def beijing_day(now: float) -> int:
    """The day number used for daily quota counters."""
    return int((now + _BEIJING_OFFSET_S) // 86400)


def next_beijing_midnight(now: float) -> float:
    """The unix time of the first Beijing midnight after `now` (when daily quotas reset)."""
    return float((beijing_day(now) + 1) * 86400 - _BEIJING_OFFSET_S)


@dataclass(eq=False, slots=True)
class TokenRecord:
    """One issued access_token. `dead_at` is set when a newer token superseded it."""

    token: str
    app: str  # "oa" or "mp"
    kind: str  # "classic" (/cgi-bin/token) or "stable" (/cgi-bin/stable_token)
    issued_at: float
    expires_at: float
    dead_at: float | None = None


@dataclass(frozen=True, slots=True)
class TokenGrant:
    """What the token endpoints answer: the token and its remaining lifetime in seconds."""

    token: str
    expires_in: int


class TokenBook:
    """All tokens of both apps, with WeChat's supersede, expiry, quota and stable-token rules.

    Methods return an errcode (int, non-zero) on failure instead of raising: the endpoint layer
    turns codes into WeChat's JSON.
    """

    def __init__(
        self, clock: Callable[[], float], rng: random.Random, classic_daily_quota: int
    ) -> None:
        self._clock = clock
        self._rng = rng
        self.classic_daily_quota = classic_daily_quota
        self._records: dict[str, TokenRecord] = {}
        self._latest_classic: dict[str, TokenRecord] = {}
        self._stable: dict[str, TokenRecord] = {}
        self._classic_count: dict[tuple[str, int], int] = {}
        self._force_count: dict[tuple[str, int], int] = {}
        self._last_force: dict[str, float] = {}

    def _new_token(self, app: str, kind: str, now: float) -> TokenRecord:
        version = "86" if kind == "classic" else "87"
        text = base64.urlsafe_b64encode(self._rng.randbytes(96)).decode("ascii")
        record = TokenRecord(f"{version}_{text}", app, kind, now, now + TOKEN_LIFETIME_S)
        self._records[record.token] = record
        return record

    def classic_fetches_today(self, app: str) -> int:
        """How many /cgi-bin/token tokens `app` obtained today (Beijing day)."""
        return self._classic_count.get((app, beijing_day(self._clock())), 0)

    def issue_classic(self, app: str) -> TokenGrant | int:
        """/cgi-bin/token: a new token; the previous one keeps working for OVERLAP_S only."""
        now = self._clock()
        day_key = (app, beijing_day(now))
        if self._classic_count.get(day_key, 0) >= self.classic_daily_quota:
            return 45009
        self._classic_count[day_key] = self._classic_count.get(day_key, 0) + 1
        previous = self._latest_classic.get(app)
        if previous is not None and previous.dead_at is None:
            previous.dead_at = now + OVERLAP_S
        record = self._new_token(app, "classic", now)
        self._latest_classic[app] = record
        return TokenGrant(record.token, TOKEN_LIFETIME_S)

    def issue_stable(self, app: str, force_refresh: bool) -> TokenGrant | int:
        """/cgi-bin/stable_token, independent from classic tokens.

        Normal mode returns the current token with its remaining lifetime, and rotates it in its
        last OVERLAP_S (the old one then runs to its own expiry), so expires_in >= 300.
        force_refresh kills the current token at once and issues a new one; at most 20 a day
        (then 45009), and within 30 s of the previous forced refresh nothing is refreshed and
        the current token is returned (the documented "no refresh", not an error).
        """
        now = self._clock()
        current = self._stable.get(app)
        usable = (
            current
            if current is not None
            and current.dead_at is None
            and now < current.expires_at - OVERLAP_S
            else None
        )
        if force_refresh:
            last = self._last_force.get(app)
            if last is not None and now - last < FORCE_REFRESH_SPACING_S and usable is not None:
                return TokenGrant(usable.token, int(usable.expires_at - now))
            day_key = (app, beijing_day(now))
            if self._force_count.get(day_key, 0) >= FORCE_REFRESH_PER_DAY:
                return 45009
            self._force_count[day_key] = self._force_count.get(day_key, 0) + 1
            self._last_force[app] = now
            if current is not None and current.dead_at is None:
                current.dead_at = now
        elif usable is not None:
            return TokenGrant(usable.token, int(usable.expires_at - now))
        record = self._new_token(app, "stable", now)
        self._stable[app] = record
        return TokenGrant(record.token, TOKEN_LIFETIME_S)

    def check(self, token: str | None) -> TokenRecord | int:
        """Validate an access_token: 41001 missing, 40014 malformed, 40001 unknown/superseded,
        42001 expired. The caller checks the app (48001)."""
        if not token:
            return 41001
        if not _TOKEN_RE.fullmatch(token):
            return 40014
        record = self._records.get(token)
        if record is None:
            return 40001
        now = self._clock()
        # A superseded token past its overlap is "not latest" (40001) even if also expired.
        if record.dead_at is not None and now >= record.dead_at:
            return 40001
        if now >= record.expires_at:
            return 42001
        return record

    def expire_all(self) -> None:
        """Make every token of both apps expired now (a test hook: next use answers 42001)."""
        now = self._clock()
        for record in self._records.values():
            record.expires_at = min(record.expires_at, now)
