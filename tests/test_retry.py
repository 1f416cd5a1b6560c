"""wxd.retry: the one classifier walked with every errcode of the table (and the other errors)
for each use, with the policies the services really build; Backoff's bounds; the calendar
(the next minute, Beijing midnight and the quota reset, UTC midnight)."""

from __future__ import annotations

import asyncio
import datetime
import math
import random
from typing import Any

import pytest

from wxd.backfill import FollowerBackfill
from wxd.errors import (
    MessageError,
    NoMsgidError,
    StorageError,
    TokenBudgetError,
    TokenUnavailable,
    TransportError,
    WeChatAPIError,
)
from wxd.events import EventWorkers
from wxd.push_workers import PushWorkers
from wxd.retry import (
    BEIJING,
    Backoff,
    Decision,
    Duplicate,
    Fail,
    Pause,
    Policy,
    Retry,
    decide,
    duplicate_send,
    next_beijing_midnight,
    next_quota_reset,
    next_utc_midnight,
    until_next_minute_s,
)
from wxd.tokens import TokenManager
from wxd.wechat.errcodes import ERROR_KINDS

NOW = 1_700_000_000.0  # 2023-11-14 22:13:20 UTC = 06:13:20 Beijing; 40 s to the next minute
RETRY_AT = NOW + 37.5  # when the token manager of the TokenUnavailable below fetches again
UNKNOWN_CODES = (40003, 40037, 43004, 47003, 48001, 99999)
USES = ("pushes", "events", "backfill", "tokens")


def policies() -> dict[str, Policy]:
    """The policies as the services build them from their (default) settings."""
    none: Any = None
    return {
        "pushes": PushWorkers(none, none, max_attempts=8).policy,
        "events": EventWorkers(none, none, max_attempts=10).policy,
        "backfill": FollowerBackfill(none, none, max_attempts=8).policy,
        "tokens": TokenManager("oa", "wx0123456789abcdef", "s", none, none).policy,
    }


def expected(use: str, exc: BaseException) -> str:
    """The decision each use must make, by name: retry, retry-minute (45011), retry-user
    (43117), retry-unexpected, pause-reset (Beijing reset time), pause-hour, pause-utc,
    pause-probe (no token: until the token manager's next fetch; the IP whitelist answered
    by a business call: a minute), fail."""
    if isinstance(exc, TokenBudgetError):
        return "pause-utc"
    terminal = "retry" if use == "tokens" else "fail"
    if isinstance(exc, TokenUnavailable):
        return "retry" if use == "tokens" else "pause-probe"
    if isinstance(exc, WeChatAPIError):
        kind = ERROR_KINDS.get(exc.errcode, "terminal")
        if kind == "quota":
            return {"pushes": "pause-reset", "backfill": "pause-reset", "events": "pause-reset",
                    "tokens": "pause-hour"}[use]
        if kind == "unreachable":  # the token manager's own fetch: its backoff is the probe
            return "retry" if use == "tokens" else "pause-probe"
        if kind == "terminal":
            return terminal
        return {45011: "retry-minute", 43117: "retry-user"}.get(exc.errcode, "retry")
    if isinstance(exc, MessageError):
        return terminal
    if isinstance(exc, (TransportError, StorageError, asyncio.TimeoutError)):
        return "retry"
    return "retry-unexpected"


def named(use: str, decision: Decision) -> str:
    if isinstance(decision, Fail):
        assert decision.reason == "terminal"
        return "fail"
    if isinstance(decision, Pause):
        if decision.reason == "token_budget":
            assert decision.until == next_utc_midnight(NOW)
            return "pause-utc"
        if decision.reason == "unreachable":
            assert decision.errcode in (40164, 61004, 89503, None)
            assert decision.until in (RETRY_AT, NOW + 60)
            return "pause-probe"
        assert decision.reason == "quota" and decision.errcode == 45009
        if decision.until == NOW + 3600:
            return "pause-hour"
        resume = {"pushes": 5 * 60.0, "backfill": 60.0, "events": 5 * 60.0}[use]
        assert decision.until == next_quota_reset(NOW, resume)
        assert 0 < decision.until - next_beijing_midnight(NOW) == resume
        return "pause-reset"
    assert decision.delay_s > 0
    if decision.scope == "app":
        assert 40.0 <= decision.delay_s <= 41.0  # not before the next wall-clock minute
        return "retry-minute"
    if decision.scope == "user":
        if use in ("pushes", "events"):  # 43117: minutes to hours, not seconds
            assert 30.0 <= decision.delay_s <= 60.0
        return "retry-user"
    return "retry-unexpected" if decision.unexpected else "retry"


ERRORS: list[BaseException] = [
    *(WeChatAPIError(code, "errmsg", "/cgi-bin/x", ERROR_KINDS[code]) for code in ERROR_KINDS),
    *(WeChatAPIError(code, "errmsg", "/cgi-bin/x") for code in UNKNOWN_CODES),
    TransportError("POST /cgi-bin/x: HTTP 502", "/cgi-bin/x", 502),
    StorageError("commit failed: disk I/O error"),
    TokenBudgetError("oa: the daily budget of 1500 upstream token fetches is spent"),
    TokenUnavailable("oa", WeChatAPIError(40164, "invalid ip 1.2.3.4 ipv6 ::ffff:1.2.3.4, not in "
                                          "whitelist", "/cgi-bin/stable_token", "unreachable"),
                     RETRY_AT, "1.2.3.4"),
    TokenUnavailable("oa", WeChatAPIError(89503, "risky ip", "/cgi-bin/token"), RETRY_AT),
    TokenUnavailable("oa", TransportError("POST /cgi-bin/stable_token: HTTP 500",
                                          "/cgi-bin/stable_token", 500), RETRY_AT),
    asyncio.TimeoutError(),
    MessageError("malformed XML"),
    KeyError("msgid"),
]


@pytest.mark.parametrize("use", USES)
@pytest.mark.parametrize("exc", ERRORS, ids=repr)
def test_every_error_for_every_use(use: str, exc: BaseException) -> None:
    policy = policies()[use]
    assert named(use, decide(exc, 1, NOW, policy)) == expected(use, exc)


@pytest.mark.parametrize("use", USES)
def test_retries_end_after_max_attempts_pauses_do_not(use: str) -> None:
    policy = policies()[use]
    last = {"pushes": 8, "events": 10, "backfill": 8, "tokens": 10_000}[use]
    for exc in ERRORS:
        first = decide(exc, 1, NOW, policy)
        before, at_max = decide(exc, last - 1, NOW, policy), decide(exc, last, NOW, policy)
        if isinstance(first, Retry):
            assert isinstance(before, Retry)
            # The token manager never gives up; the others fail once the tries are spent.
            assert at_max == Fail("exhausted") if use != "tokens" else isinstance(at_max, Retry)
        else:
            assert type(at_max) is type(first)


def test_every_errcode_class_is_known() -> None:
    assert set(ERROR_KINDS.values()) == {"token", "transient", "quota", "unreachable"}


def test_an_unreachable_pause_names_the_errcode_and_the_ip() -> None:
    policy = policies()["pushes"]
    refused = WeChatAPIError(40164, "invalid ip 203.0.113.9 ipv6 ::ffff:203.0.113.9, not in "
                             "whitelist rid: 1", "/cgi-bin/message/template/send", "unreachable")
    assert decide(refused, 3, NOW, policy) == Pause(NOW + 60, "unreachable", 40164,
                                                    "203.0.113.9")
    no_token = TokenUnavailable("oa", refused, RETRY_AT, "203.0.113.9")
    assert (no_token.errcode, no_token.ip, no_token.cause) == (40164, "203.0.113.9", refused)
    assert decide(no_token, 3, NOW, policy) == Pause(RETRY_AT, "unreachable", 40164,
                                                     "203.0.113.9")
    # A token manager about to fetch again: the pause still lasts a moment (no busy probing).
    soon = TokenUnavailable("oa", refused, NOW)
    assert decide(soon, 1, NOW, policy) == Pause(NOW + 1, "unreachable", 40164, None)


def test_backoff_bounds_and_determinism() -> None:
    backoff = Backoff(2.0, 100.0, 0.5, random.Random(1))
    for attempt in range(1, 40):
        full = min(100.0, 2.0 * 2 ** (attempt - 1))
        assert full * 0.5 <= backoff.delay(attempt) <= full
    assert backoff.delay(0) <= 2.0  # attempt numbers start at 1
    assert Backoff(5.0, 300.0, 0.0).delay(1) == 5.0  # no jitter: the nominal delay
    assert Backoff(5.0, 300.0, 0.0).delay(100) == 300.0  # the cap
    draws = [Backoff(5.0, 300.0, 0.2, random.Random(7)).delay(n) for n in range(1, 9)]
    assert draws == [Backoff(5.0, 300.0, 0.2, random.Random(7)).delay(n) for n in range(1, 9)]
    spread = [Backoff(10.0, 10.0, 0.2, random.Random(n)).delay(1) for n in range(200)]
    assert 8.0 <= min(spread) < 8.2 and 9.8 < max(spread) <= 10.0  # the whole [0.8, 1] range
    with pytest.raises(ValueError):
        Backoff(1.0, 2.0, 1.5)


def test_the_calendar() -> None:
    # 2023-11-14 22:13:20 UTC = 2023-11-15 06:13:20 Beijing.
    assert next_beijing_midnight(NOW) == 1_700_064_000
    assert next_quota_reset(NOW, 6 * 3600 + 30 * 60) - NOW == pytest.approx(16 * 60 + 40)
    assert next_quota_reset(1_700_064_300, 300) == 1_700_064_300 + 86400  # strictly after
    assert next_utc_midnight(NOW) == 1_700_006_400
    assert next_utc_midnight(1_700_006_400) == 1_700_006_400 + 86400


def api_error(errcode: int, resent: bool = False, **extra: Any) -> WeChatAPIError:
    return WeChatAPIError(errcode, "dup", SEND, "terminal",
                          answer={"errcode": errcode, "errmsg": "dup", **extra}, resent=resent)


SEND = "/cgi-bin/message/template/send"


def test_duplicate_answers_are_sent_only_on_a_resend() -> None:
    no_msgid = NoMsgidError("no msgid", SEND, {"errcode": 0, "errmsg": "ok"})
    assert duplicate_send(no_msgid, resend=True) == Duplicate(None)
    assert duplicate_send(no_msgid, resend=False) is None
    assert isinstance(decide(no_msgid, 1, NOW, policies()["pushes"]), Retry)  # a first send
    for code in (45065, 40241, 45066):
        assert duplicate_send(api_error(code), resend=True) == Duplicate(None)
        assert duplicate_send(api_error(code), resend=False) is None
        assert duplicate_send(api_error(code, resent=True), resend=False) == Duplicate(None)
        assert decide(api_error(code), 1, NOW, policies()["pushes"]) == Fail("terminal")
    assert duplicate_send(api_error(45065, msg_id=123), True) == Duplicate("123")
    assert duplicate_send(api_error(45065, msgid="456"), True) == Duplicate("456")
    for bogus in (0, "", True, None, [1]):
        assert duplicate_send(api_error(45065, msgid=bogus), True) == Duplicate(None)
    for other in (api_error(43004), api_error(-1), TransportError("reset", SEND)):
        assert duplicate_send(other, resend=True) is None


def test_backoff_and_minute_wait() -> None:
    backoff = Backoff(0.5, 30.0)
    delays = [backoff.delay(attempt) for attempt in range(1, 10)]
    assert 0.25 <= delays[0] <= 0.5 and 0.5 <= delays[1] <= 1.0 and delays[-1] <= 30.0
    assert 15.0 <= delays[-1]
    rng = random.Random()
    assert 40.0 <= until_next_minute_s(1_700_000_000.0, rng) <= 41.0  # :20 past → 40 s + jitter
    assert 0.0 < until_next_minute_s(1_700_000_039.9, rng) <= 1.1


def test_next_beijing_midnight() -> None:
    # 2023-11-14 22:13:20 UTC is 2023-11-15 06:13:20 in Beijing; next midnight 11-16 00:00 +08.
    assert next_beijing_midnight(1_700_000_000) == 1_700_064_000
    assert next_beijing_midnight(1_700_064_000) == 1_700_064_000 + 86_400
    assert math.isclose(next_beijing_midnight(1_700_063_999.5), 1_700_064_000)


def test_next_quota_reset_is_beijing_time() -> None:
    # 2023-11-14 22:13:20 UTC = 2023-11-15 06:13:20 Beijing.
    now = 1_700_000_000.0
    resume = next_quota_reset(now, 5 * 60)  # 00:05
    local = datetime.datetime.fromtimestamp(resume, BEIJING)
    assert (local.day, local.hour, local.minute) == (16, 0, 5)
    assert resume - now == pytest.approx(17 * 3600 + 51 * 60 + 40)
    assert next_quota_reset(now, 6 * 3600 + 30 * 60) - now == pytest.approx(16 * 60 + 40)
    assert next_quota_reset(resume, 300) == resume + 86400  # strictly after
