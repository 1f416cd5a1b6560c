"""PushWorkers: a dispatcher that leases due pushes and N sender coroutines that POST them.

Imports base modules, pacing and wxd.store (pushes, db) only; never pushes.py or
tornado.web (the upstream API and the template-cache hook arrive as constructor arguments).
"""

from __future__ import annotations

import asyncio
import datetime
import functools
import logging
import random
import sqlite3
import time
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from wxd import pacing
from wxd.errors import WeChatAPIError, WxdError
from wxd.metrics import Registry
from wxd.store import pushes as push_store
from wxd.store.db import Database

log = logging.getLogger(__name__)

BEIJING = datetime.timezone(datetime.timedelta(hours=8), "Asia/Shanghai")  # for log lines
LEASE_S = 120.0          # informational leased_until; recovery at start is what frees leases
IDLE_MAX_S = 2.0         # longest idle wait between looks at the queue (doorbell or due time)
FLUSH_DELAY_S = 0.05     # outcomes wait this long to share a commit (nobody waits for them)
REPORT_KEEP_S = 7 * 86400.0  # unmatched delivery reports older than this are dropped at start
_STOP = object()


class SendAPI(Protocol):
    """What PushWorkers needs from wechat.OfficialAccountAPI (token refresh + one retry for
    40001/40014/42001 happens inside it)."""

    async def send_template(self, body: Mapping[str, Any]) -> str: ...


def next_resume(now: float, time_of_day_s: float) -> float:
    """The next Beijing (UTC+8) time of day `time_of_day_s` strictly after `now` (unix s).
    WeChat's daily quotas are assumed to reset at midnight Beijing time (unconfirmed;
    https://developers.weixin.qq.com/doc/offiaccount/Message_Management/API_Call_Limits.html)."""
    return pacing.next_beijing_midnight(now - time_of_day_s) + time_of_day_s


class PushWorkers:
    """Drains the push queue through template/send with the push's id as client_msg_id.

    One dispatcher task leases due pushes in chunks (the lease IS the attempt record: status
    sending, attempts + 1, committed before any POST), keeping up to 3 × `workers` leased
    ahead, and `workers` sender tasks POST them; outcomes are committed in the background,
    many per write (with the next lease when busy). push_store.Outcomes: errcode 0 → sent (a delivery
    report that came first is applied at once); transient (-1, 45011, 43117, HTTP errors, timeouts, resets, a
    token error that survived the client's one refresh-and-retry) → queued again after
    backoff_base_s·2^(n-1) with jitter, capped at backoff_max_s, failed after max_attempts;
    45009 → back to queued without using the attempt and ALL sending paused until the next
    quota_resume_s (after Beijing midnight), persisted in meta; anything else → failed at once (40037 also
    calls `on_template_invalid`). `rate_per_s` caps sends per second (0 = unlimited).
    """

    def __init__(self, db: Database, oa_api: SendAPI, *, workers: int = 8,
                 rate_per_s: float = 0.0, max_attempts: int = 8, backoff_base_s: float = 2.0,
                 backoff_max_s: float = 600.0, quota_resume_s: float = 300.0,
                 stale_sending: str = "resend", clock: Callable[[], float] = time.time,
                 rng: random.Random | None = None, metrics: Registry | None = None,
                 on_template_invalid: Callable[[], None] | None = None,
                 drain_timeout_s: float = 10.0, idle_max_s: float = IDLE_MAX_S) -> None:
        if stale_sending not in ("resend", "fail"):
            raise ValueError("stale_sending must be 'resend' or 'fail'")
        self._db = db
        self._api = oa_api
        self.workers = max(1, workers)
        # Real time (not the injected clock): it spaces POSTs, it stores nothing.
        self._limiter = pacing.RateLimiter(rate_per_s, 1, time.monotonic, asyncio.sleep)
        self._limited = rate_per_s > 0
        self._capacity = self.workers if self._limited else 4 * self.workers
        self._max_attempts = max_attempts
        self._base_s = backoff_base_s
        self._max_s = backoff_max_s
        self._resume_at = quota_resume_s
        self._stale_sending = stale_sending
        self._clock = clock
        self._rng = rng if rng is not None else random.Random()
        self._on_template_invalid = on_template_invalid
        self._drain_s = drain_timeout_s
        self._idle_max_s = idle_max_s
        self._queue: asyncio.Queue[Any] = asyncio.Queue()
        self._doorbell = asyncio.Event()
        self._room = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._inflight: dict[str, push_store.Leased] = {}
        self._outcomes: list[push_store.Outcome] = []
        self._flusher: asyncio.Task[None] | None = None
        self._paused_until: float | None = None
        self._state = "new"
        self.recovered: dict[str, int] = {}
        self._setup_metrics(metrics)

    def _setup_metrics(self, metrics: Registry | None) -> None:
        self._metrics = metrics
        if metrics is None:
            return
        self._m_transitions = metrics.counter(
            "wxd_pushes_total", "Push status transitions by new status.", ("status",))
        self._m_send = metrics.histogram(
            "wxd_push_send_seconds", "template/send latency as seen by the workers.")
        self._m_depth = metrics.gauge("wxd_push_queue_depth", "Pushes queued (due or waiting).")
        self._m_oldest = metrics.gauge(
            "wxd_push_oldest_queued_seconds", "Age of the oldest queued push (0 when none).")
        self._m_paused = metrics.gauge(
            "wxd_push_paused", "1 while sending is paused by WeChat's daily quota (45009).")
        metrics.add_collector(self._collect)

    async def _collect(self) -> None:
        if self._state != "running" or self._metrics is None:
            return
        depth, oldest = await self._db.read(push_store.queue_depth)
        self._m_depth.set(depth)
        self._m_oldest.set(max(0.0, self._clock() - oldest) if oldest is not None else 0.0)

    def _transition(self, status: str, count: int = 1) -> None:
        if self._metrics is not None and count:
            self._m_transitions.inc(count, status=status)

    @property
    def paused_until(self) -> float | None:
        """Unix seconds until which sending is paused by a 45009, or None."""
        return self._paused_until

    def wake(self) -> None:
        """The doorbell: new or re-queued pushes are committed; look at the queue now."""
        self._doorbell.set()

    # Lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        """Recover pushes left `sending` by a previous run, load the quota pause, start tasks."""
        if self._state != "new":
            return
        now = self._clock()

        def recover(conn: sqlite3.Connection) -> tuple[dict[str, int], float | None]:
            counts = push_store.recover(conn, now, self._stale_sending)
            push_store.prune_reports(conn, now - REPORT_KEEP_S)
            paused = push_store.paused_until(conn)
            if paused is not None and paused <= now:  # the pause ended while wxd was down
                push_store.set_paused_until(conn, None)
                paused = None
            return counts, paused

        self.recovered, paused = await self._db.write(recover)
        if self.recovered["requeued"] or self.recovered["failed"]:
            log.warning("pushes left sending by the last run: %(requeued)d requeued, "
                        "%(failed)d failed as outcome_unknown (%(stale)d were past WeChat's "
                        "10-minute client_msg_id window)", self.recovered)
        self._set_paused(paused)
        self._state = "running"
        self._tasks.append(asyncio.create_task(self._dispatch(), name="wxd-push-dispatcher"))
        for number in range(self.workers):
            self._tasks.append(asyncio.create_task(self._sender(), name=f"wxd-push-sender-{number}"))
        for task in self._tasks:
            task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error("push task %s died", task.get_name(), exc_info=task.exception())

    async def stop(self) -> None:
        """Stop leasing; requeue leased pushes not yet POSTed; let in-flight sends finish within
        drain_timeout_s, then cancel them (requeued, attempt counted: same client_msg_id)."""
        if self._state != "running":
            if self._state == "new":
                self._state = "stopped"
            return
        self._state = "stopping"
        self._doorbell.set()
        self._room.set()
        dispatcher, senders = self._tasks[0], self._tasks[1:]
        await asyncio.gather(dispatcher, return_exceptions=True)
        unsent: list[str] = []
        while not self._queue.empty():
            item = self._queue.get_nowait()
            if isinstance(item, push_store.Leased):
                unsent.append(item.id)
        for _ in senders:
            self._queue.put_nowait(_STOP)
        _, pending = await asyncio.wait(senders, timeout=self._drain_s)
        for task in pending:
            task.cancel()
        await asyncio.gather(*senders, return_exceptions=True)
        if pending:
            log.warning("%d push sends did not finish within %.1f s; they stay queued",
                        len(self._inflight), self._drain_s)
        cut = list(self._inflight)
        self._inflight.clear()
        now = self._clock()

        def requeue(conn: sqlite3.Connection) -> None:
            push_store.release(conn, unsent, now, refund=True)
            push_store.release(conn, cut, now, refund=False)

        if unsent or cut:
            await self._db.write(requeue)
        if self._flusher is not None:
            await asyncio.gather(self._flusher, return_exceptions=True)
        self._tasks.clear()
        self._state = "stopped"

    # Dispatcher -----------------------------------------------------------------------------

    async def _dispatch(self) -> None:
        while self._state == "running":
            try:
                if await self._wait_while_paused():
                    continue
                room = self._room_to_lease()
                if room == 0:
                    self._room.clear()
                    await self._room.wait()
                    continue
                self._doorbell.clear()
                # push_store.Outcomes waiting for the flusher ride along in the same commit.
                pending, self._outcomes = self._outcomes, []
                statuses, leased = await self._db.write(functools.partial(
                    push_store.apply_and_lease, outcomes=pending, now=self._clock(), limit=room,
                    lease_s=LEASE_S))
                self._count(statuses)
                self._transition("sending", len(leased))
                for item in leased:
                    self._queue.put_nowait(item)
                if len(leased) < room:
                    await self._idle()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("push dispatcher error; retrying shortly")
                await asyncio.sleep(1.0)

    def _room_to_lease(self) -> int:
        """How many pushes to lease now: 0 until a chunk of 2 × workers fits, unless the
        senders are about to starve (fewer commits). Up to 3 × workers are leased ahead, none
        when sends are rate-limited (they would wait while already recorded as attempted)."""
        buffered = self._queue.qsize()
        room = self._capacity - len(self._inflight) - buffered
        chunk = min(2 * self.workers, self._capacity)
        return room if room >= chunk or (room > 0 and buffered == 0) else 0

    async def _idle(self) -> None:
        """Wait for the doorbell, the next due push (by the injected clock) or idle_max_s."""
        if self._doorbell.is_set():
            return
        due = await self._db.read(push_store.next_due)
        wait = self._idle_max_s
        if due is not None:
            wait = min(wait, max(0.0, due - self._clock()))
        if wait > 0:
            try:
                await asyncio.wait_for(self._doorbell.wait(), wait)
            except asyncio.TimeoutError:
                pass

    async def _wait_while_paused(self) -> bool:
        """True if paused (after waiting a while); clears an expired pause."""
        until = self._paused_until
        if until is None:
            return False
        now = self._clock()
        if now >= until:
            await self._db.write(lambda conn: push_store.set_paused_until(conn, None))
            self._set_paused(None)
            log.info("quota pause over; push sending resumes")
            return False
        self._doorbell.clear()
        try:
            await asyncio.wait_for(self._doorbell.wait(), min(self._idle_max_s, until - now))
        except asyncio.TimeoutError:
            pass
        return True

    def _set_paused(self, until: float | None) -> None:
        self._paused_until = until
        if self._metrics is not None:
            self._m_paused.set(1.0 if until is not None else 0.0)

    # Senders --------------------------------------------------------------------------------

    async def _sender(self) -> None:
        while True:
            item = await self._queue.get()
            if item is _STOP:
                return
            self._inflight[item.id] = item
            # Cancelled mid-send (stop's bound passed), the item stays in _inflight and stop()
            # requeues it with the attempt counted.
            write = await self._send(item)
            del self._inflight[item.id]
            if not self._room.is_set() and self._room_to_lease():
                self._room.set()
            # push_store.Outcomes are committed in the background, many per write, so the next send need
            # not wait for an fsync; stop() waits for the flusher.
            self._outcomes.append(write)
            if self._flusher is None or self._flusher.done():
                self._flusher = asyncio.create_task(self._flush(), name="wxd-push-outcomes")

    async def _flush(self) -> None:
        """Record outcomes the dispatcher did not take along with a lease (it takes them when
        busy), after FLUSH_DELAY_S, many per write."""
        while self._outcomes:
            if self._state == "running":
                await asyncio.sleep(FLUSH_DELAY_S)
            batch, self._outcomes = self._outcomes, []
            if not batch:
                continue
            try:
                self._count(await self._db.write(
                    functools.partial(push_store.apply_outcomes, outcomes=batch)))
            except Exception as exc:  # the pushes stay `sending`; recovery requeues them
                log.error("recording %d push outcomes failed: %s", len(batch), exc)

    def _count(self, statuses: list[str]) -> None:
        for status in statuses:
            if status:
                self._transition(status)

    async def _send(self, item: push_store.Leased) -> push_store.Outcome:
        """POST one push; return the write fn recording its outcome."""
        if self._paused_until is not None:
            return lambda conn: push_store.noted(push_store.release(conn, [item.id], self._clock(),
                                                         refund=True), "queued")
        if self._limited:
            await self._limiter.acquire()
        started = time.perf_counter()
        try:
            msgid = await self._api.send_template(item.wechat_body())
        except WeChatAPIError as exc:
            return self._failure(item, exc.errcode, exc.errmsg, exc.kind, started)
        except WxdError as exc:  # TransportError, TokenBudgetError (no token to send with)
            return self._failure(item, None, str(exc), "transient", started)
        except Exception as exc:
            log.exception("unexpected error sending push %s", item.id)
            return self._failure(item, None, f"internal error: {type(exc).__name__}",
                                 "transient", started)
        self._observe(started)
        now = self._clock()
        return lambda conn: push_store.mark_sent(conn, item.id, msgid, now)

    def _observe(self, started: float) -> None:
        if self._metrics is not None:
            self._m_send.observe(time.perf_counter() - started)

    def backoff_s(self, attempts: int, now: float, errcode: int | None = None) -> float:
        """Delay before the next attempt after `attempts` failed ones: base·2^(attempts-1)
        jittered to 50–100 %, at most backoff_max_s; after 45011 ("retry next minute") not
        before the next wall-clock minute."""
        delay = pacing.backoff_s(max(1, attempts), self._base_s, self._max_s, self._rng)
        if errcode == 45011:
            delay = max(delay, pacing.until_next_minute_s(now, self._rng))
        return delay

    def _failure(self, item: push_store.Leased, errcode: int | None, error: str, kind: str,
                 started: float) -> push_store.Outcome:
        self._observe(started)
        now = self._clock()
        if kind == "quota":
            until = next_resume(now, self._resume_at)
            if self._paused_until is None or until > self._paused_until:
                log.warning("WeChat daily quota reached (45009); push sending paused until %s",
                            datetime.datetime.fromtimestamp(until, BEIJING).isoformat())
            self._set_paused(until)

            def pause(conn: sqlite3.Connection) -> str:
                push_store.set_paused_until(conn, until)
                return push_store.noted(push_store.release(conn, [item.id], now, refund=True), "queued")

            return pause
        if kind in ("transient", "token") and item.attempts < self._max_attempts:
            due = now + self.backoff_s(item.attempts, now, errcode)
            code = "wechat_error" if errcode is not None else "transport_error"
            log.info("push %s attempt %d failed (%s); retrying in %.1f s", item.id,
                     item.attempts, errcode if errcode is not None else error, due - now)
            return lambda conn: push_store.noted(push_store.mark_retry(
                conn, item.id, now, due, errcode, code, error), "queued")
        if kind in ("transient", "token"):
            code = "attempts_exhausted"
        else:
            code = "rejected"
            if errcode == 40037 and self._on_template_invalid is not None:
                self._on_template_invalid()
        log.info("push %s failed: %s (errcode %s)", item.id, error, errcode)
        return lambda conn: push_store.noted(push_store.mark_failed(
            conn, item.id, now, errcode, code, error), "failed")
