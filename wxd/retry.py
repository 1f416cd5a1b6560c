"""What to do after a failed call: one classifier (`decide`), one backoff, WeChat's quota calendar.

Every retrying service (push sends, event jobs, the follower backfill, token fetches) hands its
exception to `decide(exc, attempts, now, policy)` and acts on the Decision; only the Policy
(backoff, attempts, how a daily quota is waited out) differs between them. The errcode classes
come from the one table in wxd.wechat.errcodes (ERROR_KINDS); the special rules live here, once:

- No access_token (TokenUnavailable: the token fetch failed in any way, 40164 / 61004 / 89503 /
  40243 / 40125 / HTTP errors / timeouts alike) and a business call answered 40164 / 61004 (the
  IP whitelist): Pause("unreachable") — it is no verdict on the work — until the next probe:
  the token manager's next fetch, or policy.unreachable_probe_s from now; the service resumes
  earlier when told that a token fetch succeeded. The attempt does not count.
- 45009 (daily quota): Pause until the daily reset (or for a fixed time, or back off: policy);
  the local token budget (TokenBudgetError): Pause until the next UTC midnight.
- 45011 ("api minute-quota reach limit, must slower retry next minute"): Retry not before the
  next wall-clock minute, app-wide (every caller of the app should hold until then).
- 43117 (sending to this openid too frequently): Retry for this user only, after the policy's
  `frequency` backoff (minutes to hours) when it has one.
- -1, HTTP/network failures (TransportError), storage errors (StorageError, sqlite3.Error),
  timeouts and a token error that survived WeChatClient's one refresh-and-retry: Retry with
  backoff until policy.max_attempts, then Fail("exhausted").
- Any other errcode, bad input (WebhookError, MiniProgramError, ConfigError): Fail("terminal"),
  unless the policy retries everything (the token manager never gives up; its own 40164 is
  backed off like any other fetch error: its backoff is the probe the services wait for).
- Anything else (a programming error): Retry with backoff, marked unexpected (log it loudly).
- A resend of the same template/send client_msg_id (a retry, a crash recovery, the transport's
  own resend) answered as a duplicate (errcode 0 without a msgid, 45065, 40241, 45066):
  `duplicate_send` says "sent" (with the first msgid when the error body names it); push
  senders ask it before `decide`. On a first send those answers keep their class above.

The token class's own reaction (invalidate the token, refresh, retry once) stays inside
WeChatClient.call, which reads the same table; it cannot import this module.
"""

from __future__ import annotations

import asyncio
import datetime
import math
import random
import sqlite3
from dataclasses import dataclass, field

from wxd.errors import (
    ConfigError,
    MiniProgramError,
    NoMsgidError,
    StorageError,
    TokenBudgetError,
    TokenUnavailable,
    TransportError,
    WebhookError,
    WeChatAPIError,
    WxdError,
)
from wxd.wechat.errcodes import (
    DUPLICATE_SEND_ERRCODES,
    classify,
    refusal_hint,
    reported_ip,
)

DAY_S = 86400.0
BEIJING_UTC_OFFSET_S = 8 * 3600.0
BEIJING = datetime.timezone(datetime.timedelta(hours=8), "Asia/Shanghai")  # for log lines
MIN_PROBE_S = 1.0  # an unreachable pause lasts at least this long (no busy probing)
PAUSE_REASONS = ("quota", "token_budget", "unreachable")


# The calendar ------------------------------------------------------------------------------

def next_beijing_midnight(now: float) -> float:
    """The next 00:00 Asia/Shanghai (UTC+8, no DST) strictly after `now`, unix seconds.

    WeChat's daily quotas (45009) are assumed to reset then (unconfirmed):
    https://developers.weixin.qq.com/doc/offiaccount/Message_Management/API_Call_Limits.html
    """
    offset = BEIJING_UTC_OFFSET_S
    return (math.floor((now + offset) / DAY_S) + 1) * DAY_S - offset


def next_quota_reset(now: float, resume_s: float) -> float:
    """The next Beijing time of day `resume_s` (seconds after midnight) strictly after `now`:
    when work paused by a 45009 resumes (midnight plus a margin)."""
    return next_beijing_midnight(now - resume_s) + resume_s


def next_utc_midnight(now: float) -> float:
    """The next 00:00 UTC strictly after `now`: when the local token budget day turns."""
    return (now // DAY_S + 1) * DAY_S


def until_next_minute_s(now: float, rng: random.Random) -> float:
    """Seconds until the next wall-clock minute plus up to 1 s of jitter (45011)."""
    return 60.0 - now % 60.0 + rng.uniform(0.0, 1.0)


# Backoff -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Backoff:
    """Exponential backoff: retry number `attempt` (1, 2, ...) waits min(base·2^(attempt-1), cap)
    scaled by a uniform draw in [1 - jitter, 1]: never longer than the cap, at most `jitter`
    (a fraction, 0..1) shorter. `rng` draws the jitter only, never secrets."""

    base_s: float
    cap_s: float
    jitter: float = 0.5
    rng: random.Random = field(default_factory=random.Random, compare=False, repr=False)

    def __post_init__(self) -> None:
        if not 0.0 <= self.jitter <= 1.0:
            raise ValueError("jitter must be within 0..1")

    def delay(self, attempt: int) -> float:
        full = min(self.base_s * 2.0 ** min(max(attempt, 1) - 1, 62), self.cap_s)
        return float(full * self.rng.uniform(1.0 - self.jitter, 1.0))


# Decisions ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Retry:
    """Try again after `delay_s`. `scope`: "call" (this call only), "user" (this recipient is
    throttled, 43117) or "app" (nothing of this app passes before then, 45011). `unexpected`:
    not a failure wxd anticipates (a programming error): log it with its traceback."""

    delay_s: float
    scope: str = "call"
    unexpected: bool = False


@dataclass(frozen=True)
class Pause:
    """Stop this kind of work until `until` (unix s); the attempt does not count against it.
    `reason`: "quota" (45009), "token_budget" (the local daily budget of token fetches) or
    "unreachable" (no token, or the IP whitelist: `until` is the next probe, and a successful
    token fetch ends the pause earlier). `errcode` and `ip` (the address WeChat reported for
    40164) say why, for the operator."""

    until: float
    reason: str
    errcode: int | None = None
    ip: str | None = None


@dataclass(frozen=True)
class Fail:
    """Give up. `reason`: "terminal" (retrying changes nothing) or "exhausted" (max attempts)."""

    reason: str


Decision = Retry | Pause | Fail


@dataclass(frozen=True)
class Policy:
    """How one use retries. `max_attempts` counts every try (0 = never give up); a 45009 pauses
    until the next Beijing `quota_resume_s` (seconds after midnight), else for `quota_pause_s`,
    else is backed off like a transient error; `fail_terminal` False retries even errors that
    retrying cannot fix (with backoff: an operator may fix the cause). `frequency` backs off a
    43117 (per-user frequency: minutes to hours) instead of `backoff`. With
    `unreachable_probe_s`, no token and the IP whitelist pause the work (probing again after
    that long when the refusal came from a business call); without, they are retried."""

    backoff: Backoff
    max_attempts: int = 0
    quota_resume_s: float | None = None
    quota_pause_s: float | None = None
    fail_terminal: bool = True
    frequency: Backoff | None = None
    unreachable_probe_s: float | None = None


def errcode_of(exc: BaseException) -> int | None:
    return exc.errcode if isinstance(exc, WeChatAPIError) else None


def decide(exc: BaseException, attempts: int, now: float, policy: Policy) -> Decision:
    """The one classifier: what to do after `exc` ended try number `attempts` (1, 2, ...) at
    unix time `now`. Pure apart from the backoff's jitter draw."""
    errcode = errcode_of(exc)
    if isinstance(exc, TokenBudgetError):
        return Pause(next_utc_midnight(now), "token_budget")
    probe_s = policy.unreachable_probe_s
    if isinstance(exc, TokenUnavailable) and probe_s is not None:
        return Pause(max(exc.retry_at, now + MIN_PROBE_S), "unreachable", exc.errcode, exc.ip)
    if errcode is not None:
        kind = classify(errcode)
        if kind == "unreachable" and probe_s is not None:
            ip = reported_ip(exc.errmsg) if isinstance(exc, WeChatAPIError) else None
            return Pause(now + max(probe_s, MIN_PROBE_S), "unreachable", errcode, ip)
        if kind == "quota" and policy.quota_resume_s is not None:
            return Pause(next_quota_reset(now, policy.quota_resume_s), "quota", errcode)
        if kind == "quota" and policy.quota_pause_s is not None:
            return Pause(now + policy.quota_pause_s, "quota", errcode)
        if kind == "terminal" and policy.fail_terminal:
            return Fail("terminal")
    elif isinstance(exc, (WebhookError, MiniProgramError, ConfigError)) and policy.fail_terminal:
        return Fail("terminal")
    if policy.max_attempts and attempts >= policy.max_attempts:
        return Fail("exhausted")
    delay = policy.backoff.delay(attempts)
    if errcode == 45011:
        return Retry(max(delay, until_next_minute_s(now, policy.backoff.rng)), "app")
    if errcode == 43117:
        if policy.frequency is not None:
            delay = policy.frequency.delay(attempts)
        return Retry(delay, "user")
    return Retry(delay, unexpected=not anticipated(exc))


@dataclass(frozen=True)
class Duplicate:
    """WeChat answered a resend as a duplicate: an earlier send of this client_msg_id was
    accepted. `msgid`: the first message's id when the answer names it, else None."""

    msgid: str | None


def duplicate_send(exc: BaseException, resend: bool) -> Duplicate | None:
    """Whether `exc`, ending a template/send, is WeChat's answer to a duplicate: only when the
    send was a `resend` of its client_msg_id (or the transport resent it: exc.resent), and the
    answer is errcode 0 without a msgid (NoMsgidError) or one of DUPLICATE_SEND_ERRCODES. The
    msgid is read from an error body's `msgid` or `msg_id` (the mass-send API's key). A success
    answer does not say whether the transport resent it: after that resend an errcode 0 without
    a msgid is retried once like a transport failure, and the retry (a resend) is recognised."""
    if isinstance(exc, NoMsgidError):
        return Duplicate(None) if resend else None
    if not isinstance(exc, WeChatAPIError) or exc.errcode not in DUPLICATE_SEND_ERRCODES:
        return None
    if not (resend or exc.resent):
        return None
    for key in ("msgid", "msg_id"):
        value = exc.answer.get(key)
        if isinstance(value, (int, str)) and not isinstance(value, bool) \
                and str(value) not in ("", "0"):
            return Duplicate(str(value))
    return Duplicate(None)


def anticipated(exc: BaseException) -> bool:
    """A failure wxd expects now and then (any WxdError, a storage error, a timeout), as
    opposed to a programming error, which deserves its traceback in the log."""
    return isinstance(exc, (WxdError, TransportError, StorageError, sqlite3.Error,
                            asyncio.TimeoutError))


def pause_cause(reason: str, errcode: int | None, ip: str | None) -> str:
    """Why work pauses, in words for the one loud log line of a pause: the errcode, the address
    WeChat reported (40164) and what the operator can do about it."""
    if reason == "quota":
        return f"WeChat's daily quota is reached (errcode {errcode})"
    if reason == "token_budget":
        return "the local daily budget of token fetches is spent"
    seen = f", WeChat sees this server as {ip}" if ip else ""
    code = f"errcode {errcode}" if errcode is not None else "no answer"
    return f"WeChat is unreachable for wxd ({code}{seen}): {refusal_hint(errcode)}"
