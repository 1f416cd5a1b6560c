"""TokenManager: one app's access_token, persisted, refreshed ahead with jitter, fetched once.

Imports base modules, retry, the store and wxd.wechat.client; never another service module
and never tornado.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial

from wxd.clock import SYSTEM_CLOCK, Clock
from wxd.errors import TokenUnavailable, TransportError, WeChatAPIError, WxdError
from wxd.metrics import Registry
from wxd.retry import Backoff, Pause, Policy, Retry, decide
from wxd.store import tokens as token_store
from wxd.store.db import Database
from wxd.store.tokens import utc_day
from wxd.wechat.client import WeChatClient
from wxd.wechat.errcodes import reported_ip

log = logging.getLogger(__name__)

MODES = ("stable", "legacy")
# /cgi-bin/token: the previous token keeps working for 5 minutes after a new one is issued:
# https://developers.weixin.qq.com/doc/offiaccount/Basic_Information/Get_access_token.html
# A stable token is never superseded by a normal-mode fetch:
# https://developers.weixin.qq.com/doc/offiaccount/Basic_Information/getStableAccessToken.html
OVERLAP_S = 300.0
USE_GUARD_S = 60.0  # get() fetches rather than hand out a token this close to its expiry
JITTER_FRACTION = 0.2  # the refresh point moves earlier by up to this share of the margin
ECHO_WINDOW_S = 60.0  # see invalidate(): a refetch that gave back the rejected token


@dataclass(frozen=True)
class _Held:
    """The token we hold and the instants derived from it when it was fetched (unix seconds)."""

    token: str
    fetched_at: float
    expires_at: float
    refresh_at: float  # the timer refreshes from here on (margin and jitter applied)
    stale_at: float  # get() stops handing it out from here on


class TokenManager:
    """The single authority for one app's ("oa" or "mp") access_token; a wechat.TokenSource.

    - The token and its expiry live in SQLite (table tokens): start() reuses a stored token
      that is still valid and fetches only when it is missing or stale.
    - A task sleeping check_interval_s on the clock between ticks runs refresh_if_due(): it
      refreshes once needs_refresh(now) holds, i.e. refresh_margin_s (at most half the token's
      lifetime, minus up to 20 % jitter) before expiry. A failed fetch is classified by
      wxd.retry.decide and logged once: any error backs off exponentially (backoff_base_s ..
      backoff_max_s, -20 % jitter; a wrong secret too: an operator fixes it, the timer keeps
      trying), quota_pause_s after 45009, until the next UTC midnight after the budget.
    - Single flight: every caller that needs a token while a fetch runs awaits that fetch.
    - Fetches are counted per app per UTC day (table token_fetches); past daily_budget a fetch
      raises TokenBudgetError instead of calling WeChat.
    - Without a usable token, get() raises TokenUnavailable (the fetch's error as its cause):
      a failed token fetch says nothing about the call that needed the token, whatever WeChat
      answered (40164, 89503, 40125, ...). The timer's backoff is the probe: callers wait for
      the callbacks registered with on_available(), run after every successful fetch.
    - mode "stable" uses /cgi-bin/stable_token (normal mode); "legacy" uses /cgi-bin/token,
      whose every fetch supersedes the previous token 5 minutes later.
    - `fetch`, when given, replaces the token endpoint: any credential WeChat hands out with an
      expires_in (the OA's jsapi_ticket: app "jsapi") gets the same persistence, refresh ahead,
      single flight and daily budget. It returns (credential, expires_in seconds).
    """

    def __init__(self, app: str, appid: str, secret: str, client: WeChatClient, db: Database,
                 *, mode: str = "stable", refresh_margin_s: float = 900.0,
                 check_interval_s: float = 30.0, daily_budget: int = 1500,
                 backoff_base_s: float = 5.0, backoff_max_s: float = 300.0,
                 quota_pause_s: float = 3600.0, clock: Clock = SYSTEM_CLOCK,
                 rng: random.Random | None = None, metrics: Registry | None = None,
                 fetch: Callable[[], Awaitable[tuple[str, float]]] | None = None) -> None:
        if mode not in MODES:
            raise ValueError(f"token mode must be one of {MODES}, not {mode!r}")
        self._upstream = fetch
        self._via = ("stable_token" if mode == "stable" else "token") if fetch is None else \
            getattr(fetch, "__name__", "fetch")
        self.app = app
        self.appid = appid
        self._secret = secret
        self._client = client
        self._db = db
        self.mode = mode
        self._margin_s = refresh_margin_s
        self._interval_s = check_interval_s
        self._budget = daily_budget
        self._clock = clock
        self._rng = rng if rng is not None else random.Random()
        # Token fetches never give up; a 45009 on the token endpoint waits quota_pause_s.
        self.policy = Policy(Backoff(backoff_base_s, backoff_max_s, 0.2, self._rng),
                              quota_pause_s=quota_pause_s, fail_terminal=False)
        self._held: _Held | None = None
        self._inflight: asyncio.Task[str] | None = None
        self._timer: asyncio.Task[None] | None = None
        self._failures = 0
        self._retry_at = 0.0
        self._last_error: WxdError | None = None
        self._echo: tuple[str, float] | None = None
        self._listeners: list[Callable[[], None]] = []
        self._state = "new"
        self.fetches = 0  # upstream fetch attempts by this instance
        registry = metrics if metrics is not None else Registry()
        self._fetches = registry.counter(
            "wxd_token_fetches_total", "Upstream access_token fetches.", ("app",))
        self._failed_total = registry.counter(
            "wxd_token_fetch_failures_total", "Failed upstream access_token fetches.", ("app",))
        self._expires_in = registry.gauge(
            "wxd_token_expires_in_seconds", "Seconds until the held access_token expires.",
            ("app",))
        registry.add_collector(self._collect)

    def __repr__(self) -> str:
        return f"TokenManager(app={self.app!r}, appid={self.appid!r}, mode={self.mode!r})"

    # Lifecycle ---------------------------------------------------------------------------

    @property
    def state(self) -> str:
        """"new" | "running" | "stopping" | "stopped"."""
        return self._state

    async def start(self) -> None:
        """Load the stored token, fetch one if it is missing or stale, start the timer.

        A failed first fetch is logged and does not fail start(): the timer keeps trying with
        backoff and get() raises until a token is had. Idempotent.
        """
        if self._state != "new":
            return
        self._state = "running"
        stored = await self._db.read(partial(token_store.load, app=self.app))
        if stored is not None and stored.appid == self.appid and self._held is None:
            self._held = self._make(stored.access_token, stored.fetched_at,
                                    stored.expires_at - stored.fetched_at)
        held = self._held
        if held is None or self._clock.now() >= held.stale_at:
            try:
                await self._shared()
            except WxdError:
                pass  # logged by _failed; the timer retries after the backoff
        else:
            log.info("%s access_token loaded from the database (expires in %.0f s)", self.app,
                     held.expires_at - self._clock.now())
        if self._state == "running":  # not stopped meanwhile
            self._timer = asyncio.create_task(self._tick(), name=f"wxd-token-{self.app}")

    async def _tick(self) -> None:
        """The timer: refresh_if_due every check_interval_s (ticks never overlap)."""
        while True:
            await self._clock.sleep(self._interval_s)
            await self.refresh_if_due()

    async def stop(self) -> None:
        """Stop the timer and abandon a fetch in flight (its awaiters get CancelledError).
        Idempotent."""
        if self._state in ("stopping", "stopped"):
            return
        self._state = "stopping"
        tasks = [task for task in (self._timer, self._inflight)
                 if task is not None and not task.done()]
        self._timer = None
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)
        self._state = "stopped"

    # Handing out ------------------------------------------------------------------------------

    def on_available(self, callback: Callable[[], None]) -> None:
        """Call `callback()` (on the event loop, synchronously) after every successful fetch:
        work paused because WeChat was unreachable may resume."""
        self._listeners.append(callback)

    async def get(self) -> str:
        """A valid access_token; fetches (single flight) only when none is held or it is stale.

        Raises TokenUnavailable (the fetch's TransportError or WeChatAPIError as its cause)
        when the fetch fails, and again without asking WeChat while backing off after a failure
        with no unexpired token held; TokenBudgetError when the daily budget is spent.
        """
        held = self._held
        now = self._clock.now()
        if held is not None and now < held.stale_at:
            return held.token
        if self._inflight is None and now < self._retry_at and self._last_error is not None:
            if held is not None and now < held.expires_at:
                return held.token  # better a token with seconds left than none
            raise self._unavailable(self._last_error)
        try:
            return await self._shared()
        except (TransportError, WeChatAPIError) as exc:
            raise self._unavailable(exc) from None

    def _unavailable(self, exc: WxdError) -> WxdError:
        """What get() raises for the fetch error `exc` (never the same object twice: a raised
        exception collects the frames it passes)."""
        if not isinstance(exc, (TransportError, WeChatAPIError)):
            return exc.with_traceback(None)  # the token budget, a storage error
        ip = reported_ip(exc.errmsg) if isinstance(exc, WeChatAPIError) else None
        return TokenUnavailable(self.app, exc, self._retry_at, ip)

    async def invalidate(self, token: str) -> None:
        """WeChat rejected `token` (40001/40014/42001): refetch only if it is still current.

        Any number of concurrent failures with one token cause one fetch; later callers find a
        different current token and return at once. If a fetch just gave back this very token
        (stable mode keeps a token WeChat still considers valid), another is not tried for
        60 s. Fetch errors are not raised here; the following get() raises them.
        """
        held = self._held
        if held is None or held.token != token:
            if self._inflight is not None:
                await self._settle()
            return
        now = self._clock.now()
        if self._echo is not None and self._echo[0] == token and now - self._echo[1] < ECHO_WINDOW_S:
            return
        self._held = None  # known bad: nobody else gets it while the new one is fetched
        self._echo = (token, now)
        if self._inflight is None and now < self._retry_at:
            return  # backing off: get() raises the last error
        await self._settle()

    def current(self) -> tuple[str, float] | None:
        """(access_token, expires_at unix seconds) for sharing with other processes, or None.

        In legacy mode expires_at is cut to 5 minutes after the next refresh, because that
        refresh supersedes the token: a process caching it until expires_at never sees 40001.
        """
        held = self._held
        if held is None:
            return None
        now = self._clock.now()
        expires_at = held.expires_at
        if self.mode == "legacy":
            expires_at = min(expires_at, max(held.refresh_at, now) + OVERLAP_S)
        if now >= expires_at:
            return None
        return held.token, expires_at

    @property
    def retry_at(self) -> float:
        """Unix time before which no fetch is tried after a failure (0.0 when not backing off)."""
        return self._retry_at

    # Refreshing -------------------------------------------------------------------------------

    def needs_refresh(self, now: float) -> bool:
        """Pure check run by the timer: no token, or past its refresh point, and not backing off."""
        if now < self._retry_at:
            return False
        held = self._held
        return held is None or now >= held.refresh_at

    async def refresh_if_due(self) -> bool:
        """One timer tick: refresh if needs_refresh(clock()). True if a fetch succeeded."""
        if self._inflight is None and not self.needs_refresh(self._clock.now()):
            return False
        try:
            await self._shared()
        except WxdError:
            return False  # logged once by _failed
        except Exception:
            log.exception("%s token refresh failed unexpectedly", self.app)
            return False
        return True

    def _shared(self) -> Awaitable[str]:
        # Nothing is awaited before the task exists, so concurrent callers all join one fetch.
        task = self._inflight
        if task is None:
            task = asyncio.ensure_future(self._fetch())
            self._inflight = task
            task.add_done_callback(self._fetch_done)
        # shield: a cancelled caller must not cancel the fetch the others wait for.
        return asyncio.shield(task)

    async def _settle(self) -> None:
        try:
            await self._shared()
        except WxdError:
            pass

    def _fetch_done(self, task: asyncio.Task[str]) -> None:
        if self._inflight is task:
            self._inflight = None
        if not task.cancelled():
            task.exception()  # retrieved: a failure nobody awaited is not "never retrieved"

    def _make(self, token: str, fetched_at: float, expires_in: float) -> _Held:
        lifetime = max(expires_in, 0.0)
        # stable_token may answer a short remaining lifetime (>= 300 s): never let the margin
        # exceed half of it, or every tick would refetch the same token.
        margin = min(self._margin_s, lifetime / 2)
        jitter = self._rng.uniform(0.0, margin * JITTER_FRACTION)
        return _Held(
            token=token, fetched_at=fetched_at, expires_at=fetched_at + lifetime,
            refresh_at=fetched_at + lifetime - margin - jitter,
            stale_at=fetched_at + lifetime - min(USE_GUARD_S, lifetime / 4),
        )

    async def _fetch(self) -> str:
        now = self._clock.now()
        day = utc_day(now)
        try:
            count = await self._db.write(
                lambda conn: token_store.count_fetch(conn, self.app, day, self._budget))
            self.fetches += 1
            self._fetches.inc(app=self.app)
            token, expires_in = await (
                self._upstream() if self._upstream is not None
                else self._client.fetch_token(self.appid, self._secret, self.mode))
        except WxdError as exc:
            self._failed(exc, now)
            raise
        previous, failures = self._held, self._failures
        held = self._make(token, now, expires_in)
        self._held = held
        self._failures, self._retry_at, self._last_error = 0, 0.0, None
        if failures:
            log.info("%s access_token fetched again after %d failed fetches", self.app,
                     failures)
        if self._echo is not None and self._echo[0] != token:
            self._echo = None
        log.info("%s access_token %s via %s: expires in %.0f s, next refresh in %.0f s "
                 "(fetch %d of %d today)", self.app,
                 "unchanged" if previous is not None and previous.token == token else "fetched",
                 self._via, expires_in,
                 held.refresh_at - now, count, self._budget)
        try:
            await self._db.write(lambda conn: token_store.save(conn, self.app, self.appid, token,
                                                               held.expires_at, held.fetched_at))
        except WxdError as exc:  # the token in memory is still good; a restart refetches
            log.error("%s access_token could not be stored: %s", self.app, exc)
        for callback in list(self._listeners):
            try:
                callback()
            except Exception:
                log.exception("%s on_available callback failed", self.app)
        return token

    def _failed(self, exc: WxdError, now: float) -> None:
        self._failures += 1
        self._last_error = exc
        self._failed_total.inc(app=self.app)
        decision = decide(exc, self._failures, now, self.policy)
        # The token policy never fails: every error is retried later.
        retry_at = now + decision.delay_s if isinstance(decision, Retry) else (
            decision.until if isinstance(decision, Pause) else now)
        self._retry_at = retry_at
        level = logging.WARNING if self._held is not None else logging.ERROR
        if isinstance(decision, Pause):  # quota or budget: nothing works until it passes
            level = logging.ERROR
        log.log(level, "%s access_token fetch failed (%d in a row): %s; next attempt in %.0f s",
                self.app, self._failures, exc, retry_at - now)

    async def _collect(self) -> None:
        current = self.current()
        self._expires_in.set(max(0.0, current[1] - self._clock.now()) if current else 0.0,
                             app=self.app)
