"""FollowerBackfill: a resumable sync of every OA follower (user/get pages → batchget ×100 → rows).

Imports base modules, coalesce, pacing, retry, wxd.wechat.oa (BATCHGET_MAX) and the store only;
the API arrives as a FollowerSource (wechat.OfficialAccountAPI satisfies it). Never imports
wxd.sandbox.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
import random
import sqlite3
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from wxd.clock import SYSTEM_CLOCK, Clock, Timer
from wxd.coalesce import split_refused
from wxd.errors import StorageError, TokenUnavailable, TransportError, WeChatAPIError
from wxd.metrics import Registry
from wxd.pacing import RateLimiter
from wxd.retry import DAY_S, Backoff, Fail, Pause, Policy, decide, pause_cause
from wxd.store import backfill as backfill_store
from wxd.store import followers, ingest
from wxd.store.backfill import STATES, BackfillState
from wxd.store.callbacks import OFF, Outbox
from wxd.store.db import Database
from wxd.store.meta import Paused
from wxd.wechat.oa import BATCHGET_MAX

log = logging.getLogger(__name__)
QUEUED_PAGES = 3            # page writes that may wait for the group commit (each a page of rows)
# A first sync builds the unionid index at its end (ingest.defer_unionid_index) when it starts
# at the head of the list with fewer rows stored than this, for an account of more than one page
# and at most DEFER_INDEX_MAX_TOTAL followers (building the index blocks writes, the longer the
# more rows there are).
DEFER_INDEX_MAX_ROWS = 10_000
DEFER_INDEX_MAX_TOTAL = 2_000_000
# user/get's answer to a saved cursor it no longer accepts (WeChat's list order is unspecified;
# a cursor saved yesterday may be refused today).
# https://developers.weixin.qq.com/community/develop/doc/00004a44da0088b5c171180f66bc00
STALE_CURSOR_ERRCODE = 40003
# A run restarts from the head of the list at most this often (each restart redoes the pages
# listed so far); one more stale cursor then fails it (40003) or ends it without the sweep.
MAX_RESTARTS_FROM_HEAD = 2
# batchget errcodes that refuse a whole chunk because of some openids in it: 50005 (a lone
# openid that unfollowed), 40003 (an openid WeChat listed itself), 40032 (reported for a chunk
# of exactly 100). The chunk is split (coalesce.split_refused); the openids refused alone are
# skipped and counted.
# https://developers.weixin.qq.com/doc/offiaccount/User_Management/Get_users_basic_information_UnionID.html
# https://developers.weixin.qq.com/community/develop/doc/000882d36a45e80b796be46be5b800
# https://developers.weixin.qq.com/community/develop/doc/0004e25a390b58e0419b79efd51400
CHUNK_REFUSALS = frozenset({50005, 40003, 40032})
UNREACHABLE_PROBE_S = 60.0  # after user/get's or batchget's 40164, the run tries again this often


class FollowerSource(Protocol):
    """The OA endpoints the backfill needs (wechat.OfficialAccountAPI): user/get, batchget, and
    user/info for an openid a batchget chunk was refused for."""

    async def user_get(self, next_openid: str = "") -> dict[str, Any]: ...
    async def batchget(self, openids: Sequence[str]) -> list[dict[str, Any]]: ...
    async def user_info(self, openid: str) -> dict[str, Any]: ...


def listing_slack(total: int) -> int:
    """How many of `total` followers a complete listing may miss: 0.1 % of them, at least 10
    (at most a tenth of a smaller account). It covers the follows during a run that land
    behind the cursor (a follower's place in the list is unspecified); such followers are
    never swept anyway (their subscribe event is newer than the run's start)."""
    return max(total // 1000, min(10, total // 10))


def listing_complete(seen: int, total: int | None) -> bool:
    """Whether a run that listed `seen` distinct followers (across its restarts from the head)
    saw the whole list of `total` (user/get's latest): seen >= total - listing_slack(total).
    Only a complete listing may mark the followers it did not see unsubscribed; an unknown
    total is never complete."""
    return total is not None and seen >= total - listing_slack(total)


_Fetched = tuple[ingest.InfoBatch, float, list[str]]


@dataclass
class _Page:
    """A user/get page: asked at `cursor`; storing it moves the cursor to `after`; `has_next` =
    another page follows. Its batchget chunks run on the run's workers; `done` gets the
    prepared followers, the earliest request time and the openids WeChat refused to describe
    (skipped), or None if stop() abandoned the page before any of its chunks started."""

    cursor: str
    openids: list[str]
    after: str
    has_next: bool
    done: asyncio.Future[_Fetched | None]
    unanswered: int
    started: bool = False
    observed: float = math.inf
    rows: list[Any] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class _End:
    """Where a pass over the list ended: user/get at `cursor` answered an empty page (or a
    last page), or `refused` the saved cursor (40003); `total` is its latest total."""

    cursor: str
    total: int | None
    refused: WeChatAPIError | None = None


class _Paused(Exception):
    """45009 (the daily quota), the token budget is spent or WeChat is unreachable for wxd;
    the run pauses as `pause` says (until pause.until)."""

    def __init__(self, cause: Exception, pause: Pause) -> None:
        super().__init__(str(cause))
        self.pause = pause
        self.until = pause.until


class _Stopping(Exception):
    """stop() was requested (seen at a page boundary or before a retry)."""


def _parse_page(answer: dict[str, Any]) -> tuple[list[str], str, int | None]:
    """(openids, next_openid, total) of a user/get answer; no openids = the list is exhausted
    (count 0 and no `data` after the last page or on an empty account).
    https://developers.weixin.qq.com/doc/offiaccount/User_Management/Getting_a_User_List.html"""
    data, total, nxt = answer.get("data"), answer.get("total"), answer.get("next_openid")
    raw = data.get("openid") if isinstance(data, dict) else None
    openids = [o for o in raw if isinstance(o, str) and o] if isinstance(raw, list) else []
    return ([] if answer.get("count") == 0 else openids, nxt if isinstance(nxt, str) else "",
            total if isinstance(total, int) and not isinstance(total, bool) else None)


class FollowerBackfill:
    """Pages /cgi-bin/user/get from the persisted cursor and stores every follower via batchget.

    Per page (≤ 10,000 openids; at most two pages are being fetched, see _sync): chunks of 100
    go to batchget through `concurrency` workers and a calls/s limit (`rate_per_s`,
    0 = unlimited); each page is stored by ONE db.write that also moves the
    cursor and counters, so a crash never loses or repeats a counted page. Page writes are
    submitted in order while the next page is fetched; up to QUEUED_PAGES wait, so the group
    commit stores several pages per transaction when SQLite is the slower side (on a large
    account each transaction rewrites random pages of the unionid index: fewer, larger
    transactions cost less per follower). Pages wait as prepared rows (ingest.InfoBatch).
    With `defer_index`, a first sync (see DEFER_INDEX_MAX_ROWS) builds the unionid index once at
    its end, or when it halts, instead of row by row; meanwhile lookups by unionid scan.
    Errors are classified by wxd.retry.decide: transient (-1, 43117, HTTP/network, a token
    error after the client's refresh) are retried after backoff_base_s·2^(n-1) (-50 % jitter,
    at most backoff_max_s), `max_attempts` tries per call, then the run fails; 45011 holds
    every call until the next minute; 45009 pauses the run until quota_resume_s after the next
    (Beijing; it resumes by itself then), a spent token budget until the next UTC midnight,
    WeChat unreachable for wxd (no access_token, or 40164/61004) until the next probe (the
    token manager's next fetch), or until reachable() (its on_available) resumes it; the
    pause's reason is status()["paused"]; a resume whose write fails (disk full, database
    locked) is tried again after the policy's backoff. Terminal errors fail the run. begin() resumes a
    failed or paused run from its cursor (or, with from_start, begins a new run at the head).
    Time (unix s, rate limit and backoff sleeps, the resume/re-sync timer) comes from `clock`.

    A stale cursor (WeChat's list order is unspecified, and a big account resumes the next
    day): when user/get refuses a saved cursor (40003) or answers an empty page there before
    the listing is complete (listing_complete: seen ≈ total), the run restarts from the head
    of the list, at most `max_restarts_from_head` times (one WARNING line each, counted in
    restarts_from_head); then a 40003 fails the run and an empty page ends it. The head
    refusing 40003 fails the run. Followers the run did not list are marked unsubscribed only
    after a complete listing (the row's `complete`). A batchget chunk refused because of some
    openids (CHUNK_REFUSALS) is bisected; openids refused alone (batchget and user/info) are
    skipped and counted (`skipped`), never stored, and not judged by the sweep.
    A follower a page links to an MP user gets its user.linked callback through `outbox` in
    the page's write; what the sync observes otherwise (who follows) is no callback: it is a
    snapshot, not an event.
    """

    def __init__(self, db: Database, oa_api: FollowerSource, *, concurrency: int = 4,
                 rate_per_s: float = 100.0, resync_interval_s: float = 0.0,
                 defer_index: bool = True, clock: Clock = SYSTEM_CLOCK,
                 rng: random.Random | None = None, metrics: Registry | None = None,
                 max_attempts: int = 8, backoff_base_s: float = 0.5,
                 backoff_max_s: float = 30.0, quota_resume_s: float = 60.0,
                 drain_timeout_s: float = 5.0,
                 max_restarts_from_head: int = MAX_RESTARTS_FROM_HEAD,
                 outbox: Outbox = OFF,
                 unreachable_probe_s: float = UNREACHABLE_PROBE_S) -> None:
        if concurrency < 1:
            raise ValueError("concurrency must be >= 1")
        self._db, self._api, self._clock = db, oa_api, clock
        self._outbox = outbox
        self._concurrency = concurrency
        self._resync_s = resync_interval_s
        self._defer_index = defer_index
        self._max_restarts = max(max_restarts_from_head, 0)
        self._index_deferred = False  # followers_unionid dropped by this run, not yet rebuilt
        self._limiter = RateLimiter(rate_per_s, concurrency, clock)
        self.policy = Policy(Backoff(backoff_base_s, backoff_max_s, 0.5,
                                     rng if rng is not None else random.Random()),
                             max_attempts=max(max_attempts, 1),
                             quota_resume_s=quota_resume_s,
                             unreachable_probe_s=unreachable_probe_s)
        self.drain_timeout_s = drain_timeout_s
        self._row = BackfillState()
        self._pause: Paused | None = None  # why the run is paused (persisted beside the row)
        self._task: asyncio.Task[None] | None = None
        self._timer: Timer | None = None
        self._resume_failures = 0  # resumes in a row whose write failed (storage faults)
        self._timer_task: asyncio.Task[None] | None = None
        self._begin_lock = asyncio.Lock()
        self._stop_requested = False
        self._state = "new"
        self._unsaved_calls = 0      # calls made and not yet handed to a page write
        self._page_progress = 0      # followers fetched so far in the page being fetched
        self._queued_calls = 0       # calls and followers of page writes not yet committed
        self._queued_followers = 0
        self._session = (0.0, 0)     # (clock, followers_done) when this process (re)started it
        self._rate = 0.0
        registry = metrics if metrics is not None else Registry()
        self._m_followers = registry.counter(
            "wxd_backfill_followers_total", "Followers stored by the backfill.")
        self._m_pages = registry.counter("wxd_backfill_pages_total", "user/get pages fully stored.")
        self._m_skipped = registry.counter(
            "wxd_backfill_skipped_total", "Listed openids WeChat refused to describe (skipped).")
        self._m_restarts = registry.counter(
            "wxd_backfill_restarts_from_head_total",
            "Runs restarted from the head of the list after a stale cursor.")
        self._m_calls = registry.counter(
            "wxd_backfill_calls_total", "Upstream calls made by the backfill.",
            ("endpoint", "outcome"))
        self._m_state = registry.gauge("wxd_backfill_state", "1 for the backfill's state.",
                                       ("state",))
        self._set_row(self._row)

    # Lifecycle -----------------------------------------------------------------------------

    @property
    def state(self) -> str:
        """The service's lifecycle: "new" | "running" | "stopping" | "stopped" (the run's own
        state is status()["state"]; `running` says whether a run is active)."""
        return self._state

    async def start(self) -> None:
        """Load the row; resume a run a previous process left running (crash recovery); arm the
        auto-resume of a 45009 pause and, when configured, the periodic re-sync. Idempotent."""
        if self._state != "new":
            return
        self._state = "running"
        self._set_row(await self._db.read(backfill_store.load))
        if self._row.state == "paused":
            self._pause = await self._db.read(backfill_store.load_pause)
        if self._row.state == "running" and not self.running:
            log.info("resuming backfill run %d (%d followers done)", self._row.run,
                     self._row.followers_done)
            await self.begin()
        else:
            self._arm_timer()

    async def stop(self) -> None:
        """Halt at a page boundary (cursor and state kept: start() resumes); a page still busy
        after drain_timeout_s (real time) is abandoned and redone on resume. Nothing starts
        after stop(). Idempotent."""
        if self._state in ("stopping", "stopped"):
            return
        self._state = "stopping"
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        task = self._task
        if task is not None and not task.done():
            self._stop_requested = True
            done, _ = await asyncio.wait({task}, timeout=self.drain_timeout_s)
            if not done:
                log.warning("backfill page busy after %.1f s; abandoning it",
                            self.drain_timeout_s)
                await _discard(task)
        self._state = "stopped"

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    async def begin(self, force: bool = False, from_start: bool = False) -> dict[str, Any]:
        """Start or resume a run; return the status (the running one's if a run is active)."""
        return (await self.begin_run(force, from_start))[1]

    async def begin_run(self, force: bool = False,
                        from_start: bool = False) -> tuple[bool, dict[str, Any]]:
        """(started, status). Resumes a running/paused/failed run from its cursor, else starts
        a new run; `from_start` always starts a new run at the head of the list (the operator
        distrusts the saved cursor). A 45009 pause is not resumed (nor replaced) before
        `paused_until` unless `force` (after an operator reset the quota). Nothing starts after
        stop(), nor while a run is active."""
        async with self._begin_lock:
            row = self._row
            if self.running or self._state in ("stopping", "stopped") or (
                    row.state == "paused" and not force and row.paused_until is not None
                    and self._clock.now() < row.paused_until):
                return False, self.status()

            def resume(conn: sqlite3.Connection) -> BackfillState:
                backfill_store.save_pause(conn, None)  # running again: no reason to show
                return backfill_store.begin_run(conn, self._clock.now(), from_start=from_start)

            self._set_row(await self._db.write(resume))
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            self._stop_requested = False
            self._session, self._rate = (self._clock.now(), self._row.followers_done), 0.0
            self._task = asyncio.create_task(self._run(self._row, self._pause),
                                             name="wxd-backfill")
            self._pause = None
            self._task.add_done_callback(_log_crash)
            log.info("backfill run %d started (%s)", self._row.run,
                     "at a saved cursor" if self._row.cursor else "at the head of the list")
            return True, self.status()

    async def join(self) -> dict[str, Any]:
        """Wait until the current run (if any) ends; return the status."""
        if self._task is not None:
            await asyncio.gather(asyncio.shield(self._task), return_exceptions=True)
        return self.status()

    def status(self) -> dict[str, Any]:
        """The progress document of GET /v1/backfill: backfill_store.status_document, with
        rate_per_s = followers/s since this process (re)started the run, plus paused (why a
        paused run waits: meta.Paused.document(), else None), next_run_at (auto-resume or
        re-sync time) and the settings."""
        row, now = self._row, self._clock.now()
        active = row.state == "running" and self.running
        if active and now > self._session[0]:
            self._rate = (row.followers_done - self._session[1]) / (now - self._session[0])
        return backfill_store.status_document(
            row, now, active=active, rate_per_s=self._rate,
            unsaved_calls=self._unsaved_calls + self._queued_calls,
            page_progress=self._page_progress + self._queued_followers if active else 0,
        ) | {"paused": (self._pause.document()
                        if self._pause is not None and row.state == "paused" else None),
             "next_run_at": self._next_due(), "unionid_index_deferred": self._index_deferred,
             "concurrency": self._concurrency,
             "call_rate_limit_per_s": self._limiter.rate_per_s,
             "resync_interval_s": self._resync_s}

    def _set_row(self, row: BackfillState) -> None:
        self._row = row
        for name in STATES:
            self._m_state.set(1.0 if name == row.state else 0.0, state=name)

    # Timers: auto-resume after a 45009 pause, periodic re-sync --------------------------------

    def _next_due(self) -> float | None:
        row = self._row
        if row.state == "paused":
            return row.paused_until
        if self._resync_s > 0 and row.state in ("idle", "done"):
            # Never ran: the first sync is due now.
            return self._clock.now() if row.finished_at is None else row.finished_at + self._resync_s
        return None

    def _arm_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        due = self._next_due()
        if due is not None and self._state not in ("stopping", "stopped"):
            delay = min(max(due - self._clock.now(), 0.0), DAY_S)
            self._timer = self._clock.call_later(delay, self._on_timer)

    def reachable(self) -> None:
        """A token fetch succeeded (TokenManager.on_available): a run paused because WeChat
        was unreachable resumes now."""
        pause = self._pause
        if (pause is None or pause.reason != "unreachable" or self._row.state != "paused"
                or self.running or self._state in ("stopping", "stopped")):
            return
        self._resume(force=True)

    def _on_timer(self) -> None:
        self._timer = None
        due = self._next_due()
        if due is None or self._state in ("stopping", "stopped"):
            return
        if self._clock.now() < due:
            self._arm_timer()
        else:
            self._resume(force=False)

    def _resume(self, force: bool) -> None:
        """begin() on behalf of a timer or reachable() (nobody waits for its answer)."""
        self._timer_task = asyncio.create_task(self._begin_or_retry(force),
                                               name="wxd-backfill-resume")
        self._timer_task.add_done_callback(_log_crash)

    async def _begin_or_retry(self, force: bool) -> None:
        """begin(); when its write fails (disk full, a database locked or made read-only), try
        again after the policy's backoff, as reachable() or the timer would have: the run must
        not stay paused until an operator starts it."""
        try:
            await self.begin(force=force)
        except StorageError as exc:
            self._resume_failures += 1
            delay = self.policy.backoff.delay(self._resume_failures)
            log.warning("backfill could not resume (%s); trying again in %.1f s", exc, delay)
            if self._state in ("stopping", "stopped"):
                return
            if self._timer is not None:
                self._timer.cancel()
            self._timer = self._clock.call_later(delay, self._retry_resume(force))
        else:
            self._resume_failures = 0

    def _retry_resume(self, force: bool) -> Callable[[], None]:
        def again() -> None:
            self._timer = None
            if force:
                self.reachable()  # still paused because WeChat was unreachable?
            else:
                self._on_timer()  # still due?
        return again

    # The run ------------------------------------------------------------------------------

    async def _run(self, row: BackfillState, resumed: Paused | None) -> None:
        """One run from the row's cursor; `resumed` is the pause it resumes from, if any."""
        run, cursor, total = row.run, row.cursor or "", row.total
        queued: collections.deque[asyncio.Task[None]] = collections.deque()
        try:
            await self._sync(run, cursor, total, queued)
        except _Stopping:
            await self._halt(run, queued, "running")
            log.info("backfill stopped at a page boundary (run %d, %d followers done)", run,
                     self._row.followers_done)
        except _Paused as exc:
            pause = self._paused(exc, resumed)
            await self._halt(run, queued, "paused", last_error=str(exc), paused_until=exc.until,
                             pause=pause)
        except (WeChatAPIError, TransportError, StorageError, sqlite3.Error) as exc:
            await self._halt(run, queued, "failed", last_error=str(exc))
            log.error("backfill run %d failed: %s", run, exc)
        except Exception as exc:  # the top of a long-running job: record, never crash the daemon
            log.exception("backfill run %d failed unexpectedly", run)
            await self._halt(run, queued, "failed",
                             last_error=f"internal error: {type(exc).__name__}")
        finally:
            for store in queued:  # cancelled (crash, stop timeout): a submitted write still lands
                if not store.done():
                    store.cancel()
            self._page_progress = 0
            self._arm_timer()

    def _paused(self, exc: _Paused, resumed: Paused | None) -> Paused:
        """The pause to record (a run that resumed from a pause of the same reason keeps its
        `since`), logged loudly when WeChat turns unreachable, not at every failed probe."""
        decided, now = exc.pause, self._clock.now()
        same = resumed if resumed is not None and resumed.reason == decided.reason else None
        pause = Paused(decided.reason, same.since if same else now, decided.until,
                       decided.errcode, decided.ip)
        cause = pause_cause(pause.reason, pause.errcode, pause.ip)
        if pause.reason != "unreachable":
            log.warning("backfill paused until %.0f: %s (%s)", exc.until, cause, exc)
        elif same is None or same.errcode != pause.errcode:
            log.error("backfill paused: %s; it resumes when WeChat answers again (%s)", cause,
                      exc)
        else:
            log.info("backfill still paused: WeChat unreachable (errcode %s); next try in "
                     "%.0f s", pause.errcode, exc.until - now)
        return pause

    async def _sync(self, run: int, cursor: str, total: int | None,
                    queued: collections.deque[asyncio.Task[None]]) -> None:
        """Page from `cursor` to the end of the list, then finish the run.

        Pipeline: the batchgets of page N+1 queue behind page N's for the same `concurrency`
        slots as soon as its user/get answers, so the workers never idle at a page boundary.
        Each fetched page is one write (its followers + the cursor move), appended to `queued`
        in page order; up to QUEUED_PAGES writes wait, so when SQLite is the slower side the
        group commit stores several pages per transaction (fewer rewrites of random index
        pages). stop(): the page being fetched and one already started complete, then
        _Stopping; nothing after them is asked for. A pass that ends at a saved cursor before
        the listing is complete (refused or empty: a stale cursor) starts again at the head,
        within max_restarts_from_head."""
        jobs: asyncio.Queue[tuple[_Page, int]] = asyncio.Queue()
        workers = [asyncio.create_task(self._batchgets(jobs)) for _ in range(self._concurrency)]
        try:
            while True:
                end = await self._list(run, cursor, total, jobs, workers, queued)
                while queued:
                    await queued.popleft()
                total = end.total
                complete = listing_complete(self._row.seen, total)
                if complete or not end.cursor or (end.refused is None and total is None):
                    break  # the end of the list (or no total to judge an early end by)
                if self._row.restarts_from_head >= self._max_restarts:
                    if end.refused is not None:
                        raise end.refused
                    break
                await self._restart_from_head(run, end)
                cursor = ""
            await self._finish(run, total, complete)
        finally:  # no batchget runs on (or retries) after this
            await _cancel_all(workers)

    async def _list(self, run: int, cursor: str, total: int | None,
                    jobs: asyncio.Queue[tuple[_Page, int]], workers: Sequence[asyncio.Task[None]],
                    queued: collections.deque[asyncio.Task[None]]) -> _End:
        """One pass over the list from `cursor` (see _sync): pages until user/get answers an
        empty (or a last) page or refuses a saved cursor; returns where it ended. The pages
        before that end are submitted to `queued`."""
        following: _Page | None = None
        answer = await self._user_get(cursor)
        if isinstance(answer, WeChatAPIError):
            return _End(cursor, total, answer)
        openids, nxt, page_total = _parse_page(answer)
        total = page_total if page_total is not None else total
        if (self._defer_index and not cursor and not self._index_deferred
                and page_total is not None and len(openids) < page_total <= DEFER_INDEX_MAX_TOTAL):
            await self._defer_unionid_index(page_total)
        end = _End(cursor, total)
        page = self._start_page(cursor, openids, nxt, jobs)
        recount = self._row.restarts_from_head > 0  # pages may list followers seen before
        while page is not None:
            end = _End(page.after, total)
            stopping = page.has_next and self._stop_requested
            if page.has_next and not stopping:
                # The next user/get runs while this page's batchgets do.
                answer = await self._user_get(page.after)
                if isinstance(answer, WeChatAPIError):
                    end = _End(page.after, total, answer)
                else:
                    openids, nxt, page_total = _parse_page(answer)
                    total = page_total if page_total is not None else total
                    end = _End(page.after, total)
                    following = self._start_page(page.after, openids, nxt, jobs)
            fetched = await _fetched(page, workers)
            if fetched is None:
                raise _Stopping
            while len(queued) >= QUEUED_PAGES:
                await queued.popleft()
            # Created in page order, each task hands its write to db.write before it first
            # yields: the group commit applies pages in order.
            store = asyncio.create_task(self._store_page(
                run, page.cursor, page.after, page.openids if recount else None,
                len(page.openids), total, *fetched))
            store.add_done_callback(_retrieve)  # failures surface here or via _halt
            queued.append(store)
            if stopping:
                raise _Stopping
            page, following = following, None
        return end

    async def _user_get(self, cursor: str) -> dict[str, Any] | WeChatAPIError:
        """The user/get page at `cursor`, or the 40003 refusing a saved (non-empty) cursor."""
        try:
            answer: dict[str, Any] = await self._call("user_get", cursor)
        except WeChatAPIError as exc:
            if cursor and exc.errcode == STALE_CURSOR_ERRCODE:
                return exc
            raise
        return answer

    async def _restart_from_head(self, run: int, end: _End) -> None:
        """Record the restart (pass counters zeroed, restarts_from_head + 1) and say so once."""
        before, calls, now = self._row, self._unsaved_calls, self._clock.now()
        row = await self._db.write(lambda conn: backfill_store.restart_from_head(
            conn, run, calls, end.total, now))
        self._unsaved_calls -= calls
        self._set_row(row)
        self._session, self._rate = (now, 0), 0.0
        self._m_restarts.inc()
        what = (f"refused the saved cursor (errcode {end.refused.errcode})"
                if end.refused is not None else "answered an empty page at the saved cursor")
        age = f"{now - before.cursor_at:.0f} s" if before.cursor_at is not None else "unknown"
        log.warning(
            "backfill run %d: user/get %s after %d of %s followers (%d pages; cursor age %s, "
            "%d followers seen by the run): the cursor went stale; restarting from the head "
            "of the list (restart %d of %d)", run, what, before.followers_done,
            "?" if end.total is None else f"{end.total}", before.pages_done, age, row.seen,
            row.restarts_from_head, self._max_restarts)

    async def _defer_unionid_index(self, total: int) -> None:
        self._index_deferred = await self._db.write(
            lambda conn: ingest.defer_unionid_index(conn, DEFER_INDEX_MAX_ROWS))
        if self._index_deferred:
            log.info("first sync of %d followers: the unionid index is built at its end "
                     "(lookups by unionid scan the table until then)", total)

    def _start_page(self, cursor: str, openids: list[str], nxt: str,
                    jobs: asyncio.Queue[tuple[_Page, int]]) -> _Page | None:
        """Queue the batchgets of the page user/get answered at `cursor`; None when it is empty
        (the list is exhausted)."""
        if not openids:
            return None
        # The last page carries next_openid = its last openid (sandbox, wechatpy's comment) or
        # nothing; either way its last openid is a valid resume position.
        starts = range(0, len(openids), BATCHGET_MAX)
        page = _Page(cursor, openids, nxt or openids[-1], bool(nxt) and nxt != cursor,
                     asyncio.get_running_loop().create_future(), len(starts))
        for start in starts:
            jobs.put_nowait((page, start))
        return page

    async def _batchgets(self, jobs: asyncio.Queue[tuple[_Page, int]]) -> None:
        """A worker: batchget chunks in queue (= page) order until cancelled or a call fails
        (the run then fails: see _fetched). Each answer is cleaned as it arrives, between other
        requests; the page's last answer completes it. After stop() a page none of whose chunks
        has started is abandoned."""
        while True:
            page, start = await jobs.get()
            if page.done.done():
                continue  # abandoned
            if not page.started:
                if self._stop_requested:
                    page.done.set_result(None)
                    continue
                page.started = True
            asked_at = self._clock.now()
            infos, skipped = await self._describe(page.openids[start:start + BATCHGET_MAX])
            page.rows.extend(ingest.info_rows(infos))
            page.skipped.extend(skipped)
            page.observed = min(page.observed, asked_at)
            self._page_progress += min(BATCHGET_MAX, len(page.openids) - start)
            page.unanswered -= 1
            if not page.unanswered:
                page.done.set_result((ingest.batch_rows(page.rows), page.observed, page.skipped))
                page.rows = []

    async def _describe(self, chunk: list[str]) -> tuple[list[dict[str, Any]], list[str]]:
        """batchget of one chunk: (the infos, the openids skipped). A chunk refused because of
        some openids (CHUNK_REFUSALS) is bisected (coalesce.split_refused; user/info for a lone
        openid); the openids refused alone are skipped: their count is logged at INFO, the
        openids (personal data) at DEBUG only."""
        try:
            return await self._batchget(chunk), []
        except WeChatAPIError as exc:
            if exc.errcode not in CHUNK_REFUSALS:
                raise
            refusal = exc
        infos, failures = await split_refused(
            chunk, refusal, self._batchget, _chunk_refusal, single=self._user_info)
        skipped = [openid for openid, _ in failures]
        if skipped:
            codes = sorted({str(getattr(error, "errcode", "?")) for _, error in failures})
            log.info("backfill: WeChat refused to describe %d of %d openids of a batchget chunk "
                     "(errcode %s); skipped", len(skipped), len(chunk), ", ".join(codes))
            log.debug("backfill: skipped openids %s", " ".join(skipped))
        return infos, skipped

    async def _batchget(self, openids: list[str]) -> list[dict[str, Any]]:
        infos: list[dict[str, Any]] = await self._call("batchget", openids)
        return infos

    async def _user_info(self, openid: str) -> dict[str, Any]:
        info: dict[str, Any] = await self._call("user_info", openid)
        return info

    async def _store_page(self, run: int, cursor: str, after: str, listed: list[str] | None,
                          count: int, total: int | None, batch: ingest.InfoBatch,
                          observed: float, skipped: list[str]) -> None:
        """Store the page's followers and count the page (cursor `cursor` → `after`) in one
        write; backfill_store.advance refuses it (rolling it back) if an earlier page failed.
        `listed` (the page's openids, given once the run restarted from the head): count in
        `seen` only those the run had not listed before. `skipped` openids keep their rows,
        marked as listed by the run."""
        calls = self._unsaved_calls
        self._unsaved_calls -= calls
        self._queued_calls += calls
        self._queued_followers += count   # no longer "in the pages being fetched"
        self._page_progress -= count

        def store(conn: sqlite3.Connection) -> BackfillState:
            now = self._clock.now()
            seen = None if listed is None else followers.count_unlisted(conn, listed, run)
            if batch:
                linked = ingest.apply_info_batch(conn, batch, observed, now, run=run)
                self._outbox.linked(conn, linked, "unionid", now)
            if skipped:
                followers.mark_listed(conn, skipped, run)
            return backfill_store.advance(conn, run, cursor, after, count, calls, total, now,
                                          seen=seen, skipped=len(skipped))

        try:
            row = await self._db.write(store)
        except BaseException:
            self._unsaved_calls += calls  # the halt records them
            raise
        finally:
            self._queued_calls -= calls
            self._queued_followers -= count
        self._set_row(row)
        self._m_followers.inc(count)
        self._m_pages.inc()
        if skipped:
            self._m_skipped.inc(len(skipped))

    async def _finish(self, run: int, total: int | None, complete: bool) -> None:
        calls, since = self._unsaved_calls, self._row.started_at

        def finish(conn: sqlite3.Connection) -> tuple[BackfillState, int]:
            now = self._clock.now()
            # Only a complete listing may judge who left; events since the run began still win.
            gone = (followers.mark_unseen_unsubscribed(conn, run, now, since=since)
                    if complete else 0)
            ingest.restore_unionid_index(conn)
            return backfill_store.finish(conn, run, calls, total, now, complete=complete), gone

        row, gone = await self._db.write(finish)
        self._index_deferred = False
        self._unsaved_calls -= calls
        self._set_row(row)
        extra = "".join((f"; {row.skipped} skipped" if row.skipped else "",
                         f"; {row.restarts_from_head} restarts from the head"
                         if row.restarts_from_head else ""))
        if complete:
            log.info("backfill run %d done: %d followers, %d pages, %d calls; %d no longer "
                     "follow%s", run, row.followers_done, row.pages_done, row.calls, gone, extra)
        else:
            log.warning("backfill run %d done with an incomplete listing: %d of %s followers "
                        "seen, %d pages, %d calls%s; nobody was marked unsubscribed (the next "
                        "run lists again from the head)", run, row.seen,
                        "?" if row.total is None else row.total, row.pages_done, row.calls, extra)

    async def _halt(self, run: int, queued: Sequence[asyncio.Task[None]], state: str, *,
                    last_error: str | None = None, paused_until: float | None = None,
                    pause: Paused | None = None) -> None:
        # Let the page writes already submitted land (or fail) first.
        await asyncio.gather(*queued, return_exceptions=True)
        calls = self._unsaved_calls
        self._pause = pause

        def halt(conn: sqlite3.Connection) -> BackfillState:
            ingest.restore_unionid_index(conn)  # a halted run may stay halted for long
            backfill_store.save_pause(conn, pause)
            return backfill_store.halt(conn, run, state, calls, self._clock.now(),
                                      last_error=last_error, paused_until=paused_until)

        try:
            row = await self._db.write(halt)
        except (StorageError, sqlite3.Error) as exc:
            log.error("cannot record backfill state %s: %s", state, exc)
            row = replace(self._row, state=state, last_error=last_error, paused_until=paused_until)
        else:
            self._unsaved_calls -= calls
            self._index_deferred = False
        self._set_row(row)

    async def _call(self, endpoint: str, arg: Any) -> Any:
        """user_get(arg), batchget(arg) or user_info(arg) through the rate limit, retried as
        wxd.retry.decide says; raises _Paused (quota, token budget), _Stopping, or the call's
        error (failed)."""
        fns: dict[str, Callable[[Any], Awaitable[Any]]] = {
            "user_get": self._api.user_get, "batchget": self._api.batchget,
            "user_info": self._api.user_info}
        fn = fns[endpoint]
        attempt = 0
        while True:
            await self._limiter.acquire()
            self._unsaved_calls += 1
            attempt += 1
            try:
                result = await fn(arg)
            except Exception as exc:
                outcome = exc.kind if isinstance(exc, WeChatAPIError) else (
                    "transport" if isinstance(exc, TransportError) else
                    "unreachable" if isinstance(exc, TokenUnavailable) else "error")
                self._m_calls.inc(endpoint=endpoint, outcome=outcome)
                decision = decide(exc, attempt, self._clock.now(), self.policy)
                if isinstance(decision, Pause):
                    raise _Paused(exc, decision) from exc
                if isinstance(decision, Fail) and decision.reason == "terminal":
                    raise
                if self._stop_requested:
                    raise _Stopping from exc
                if isinstance(decision, Fail):
                    raise
                error: Exception = exc
            else:
                self._m_calls.inc(endpoint=endpoint, outcome="ok")
                return result
            if decision.scope == "app":  # 45011: nothing passes before then; hold every caller
                self._limiter.hold_for(decision.delay_s)
            log.log(logging.ERROR if decision.unexpected else logging.INFO,
                    "backfill %s failed (%s); retry %d of %d in %.1f s", endpoint, error,
                    attempt, self.policy.max_attempts - 1, decision.delay_s,
                    exc_info=error if decision.unexpected else None)
            await self._clock.sleep(decision.delay_s)


def _chunk_refusal(exc: Exception) -> bool:
    return isinstance(exc, WeChatAPIError) and exc.errcode in CHUNK_REFUSALS


def _retrieve(task: asyncio.Task[Any]) -> None:
    if not task.cancelled():
        task.exception()


def _log_crash(task: asyncio.Task[Any]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("backfill task ended unexpectedly", exc_info=task.exception())


async def _discard(task: asyncio.Task[Any] | None) -> None:
    """Cancel `task` if still pending and collect its outcome (no "never retrieved" noise)."""
    if task is not None:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def _cancel_all(tasks: Iterable[asyncio.Task[Any]]) -> None:
    """Cancel every task, then collect them (all cancelled before any of them runs again)."""
    tasks = list(tasks)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def _fetched(page: _Page, workers: Sequence[asyncio.Task[None]]) -> _Fetched | None:
    """The page's result once it is complete; raises the error of a worker that failed first."""
    waits: list[asyncio.Future[Any]] = [page.done, *workers]
    await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    if not page.done.done():
        for worker in workers:
            if worker.done():
                worker.result()  # raises: workers only end by failing
    return page.done.result()
