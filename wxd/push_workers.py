"""PushWorkers: a dispatcher that leases due pushes and N sender coroutines that POST them.

Imports base modules, pacing, retry and wxd.store (pushes, db) only; never pushes.py or
tornado.web (the upstream API and the template-cache hook arrive as constructor arguments).
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import random
import sqlite3
import time
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from wxd.clock import SYSTEM_CLOCK, Clock
from wxd.errors import NoMsgidError, StorageError, WeChatAPIError
from wxd.metrics import Registry
from wxd.pacing import IDLE_MAX_S, LEASE_S, RateLimiter
from wxd.retry import (
    BEIJING,
    PAUSE_REASONS,
    Backoff,
    Fail,
    Pause,
    Policy,
    anticipated,
    decide,
    duplicate_send,
    errcode_of,
    pause_cause,
)
from wxd.store import pushes as push_store
from wxd.store.callbacks import OFF, Outbox
from wxd.store.db import Database
from wxd.store.meta import Paused

log = logging.getLogger(__name__)

REPORT_KEEP_S = 7 * 86400.0  # unmatched delivery reports older than this are dropped at start
UNREACHABLE_PROBE_S = 60.0  # after a business call's 40164, one push probes this often
_STOP = object()


class SendAPI(Protocol):
    """What PushWorkers needs from wechat.OfficialAccountAPI (token refresh + one retry for
    40001/40014/42001 happens inside it)."""

    async def send_template(self, body: Mapping[str, Any]) -> str: ...


class PushWorkers:
    """Drains the push queue through template/send with the push's id as client_msg_id.

    One dispatcher task leases due pushes in chunks (the lease IS the attempt record: status
    sending, attempts + 1, committed before any POST), keeping up to 3 × `workers` leased
    ahead, and `workers` sender tasks POST them; each sender records its outcome with
    db.write_many(push_store.apply_outcomes, ...), so the outcomes waiting at a commit share
    one statement batch. Outcomes, classified by wxd.retry.decide: errcode 0 → sent (a
    delivery report that came first is applied at once); transient (-1, 45011, 43117, HTTP
    errors, timeouts, resets, a token error that survived the client's one refresh-and-retry,
    unexpected errors) → queued again after backoff_base_s·2^(n-1) (-50 % jitter, at most
    backoff_max_s; 45011 not before the next minute, and every sender holds until then),
    failed after max_attempts (43117 backs off frequency_backoff_base_s .. _max_s: minutes to
    hours); 45009 → back to queued without using the attempt and ALL sending paused until the
    next quota_resume_s after Beijing midnight, persisted in meta (a spent token budget
    likewise, until the next UTC midnight); WeChat unreachable for wxd (no access_token: the
    token fetch failed in any way; or a send answered 40164/61004, the IP whitelist) → the
    same, reason "unreachable", logged once per pause, until reachable() is called (the token
    manager's on_available) or, at the next probe time, one push sent as a probe gets an
    answer; anything else → failed at once (40037 also calls `on_template_invalid`; 43004
    also marks the follower unsubscribed in the same transaction, so later pushes to the
    person are refused at enqueue). A resend of the same client_msg_id (attempt 2+, a
    recovered push, an operator retry that kept the id, the transport's own resend) answered
    as a duplicate (errcode 0 without a msgid, 45065, 40241, 45066: wxd.retry.duplicate_send)
    → sent, with the first msgid when the answer names it; WeChat's answer is kept on the push
    (last_answer). `rate_per_s` caps sends per second (0 = unlimited). Time (stored instants,
    idle waits, the rate limit) comes from `clock`.
    A push whose outcome could not be written (disk full, database locked) stays `sending`;
    once its lease (`lease_s`) has passed the dispatcher queues it again with the same
    client_msg_id (push_store.requeue_expired; past WeChat's 10-minute window `stale_sending`
    decides, as at start).
    Each move to sent, delivered or failed writes its push.* callback through `outbox` in the
    transaction that records it.
    """

    def __init__(self, db: Database, oa_api: SendAPI, *, workers: int = 8,
                 rate_per_s: float = 0.0, max_attempts: int = 8, backoff_base_s: float = 2.0,
                 backoff_max_s: float = 600.0, quota_resume_s: float = 300.0,
                 frequency_backoff_base_s: float = 60.0,
                 frequency_backoff_max_s: float = 14400.0,
                 stale_sending: str = "resend", clock: Clock = SYSTEM_CLOCK,
                 rng: random.Random | None = None, metrics: Registry | None = None,
                 on_template_invalid: Callable[[], None] | None = None,
                 drain_timeout_s: float = 10.0, idle_max_s: float = IDLE_MAX_S,
                 outbox: Outbox = OFF,
                 lease_s: float = LEASE_S,
                 unreachable_probe_s: float = UNREACHABLE_PROBE_S) -> None:
        if stale_sending not in ("resend", "fail"):
            raise ValueError("stale_sending must be 'resend' or 'fail'")
        self._db = db
        self._outbox = outbox
        self._api = oa_api
        self.workers = max(1, workers)
        self._limiter = RateLimiter(rate_per_s, 1, clock)
        self._capacity = self.workers if rate_per_s > 0 else 4 * self.workers
        rng = rng if rng is not None else random.Random()
        self.policy = Policy(Backoff(backoff_base_s, backoff_max_s, 0.5, rng),
                             max_attempts=max_attempts,
                             quota_resume_s=quota_resume_s,
                             frequency=Backoff(frequency_backoff_base_s,
                                               frequency_backoff_max_s, 0.5, rng),
                             unreachable_probe_s=unreachable_probe_s)
        self._lease_s = lease_s
        self._stale_sending = stale_sending
        self._clock = clock
        self._on_template_invalid = on_template_invalid
        self._drain_s = drain_timeout_s
        self._idle_max_s = idle_max_s
        self._queue: asyncio.Queue[Any] = asyncio.Queue()
        self._doorbell = asyncio.Event()
        self._room = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._inflight: dict[str, push_store.Leased] = {}
        # Leased by this process and not yet done with (queued for a sender, being sent, its
        # outcome being written): never re-leased, even when a send outlasts its lease.
        self._held: set[str] = set()
        self._pause: Paused | None = None
        self._probing = False  # the pause's probe time passed: one push at a time tries
        self._persist_pause = False  # the pause ended in memory; the dispatcher stores that
        self._state = "new"
        self.recovered: dict[str, int] = {}
        registry = metrics if metrics is not None else Registry()
        self._m_transitions = registry.counter(
            "wxd_pushes_total", "Push status transitions by new status.", ("status",))
        self._m_send = registry.histogram(
            "wxd_push_send_seconds", "template/send latency as seen by the workers.")
        self._m_depth = registry.gauge("wxd_push_queue_depth", "Pushes queued (due or waiting).")
        self._m_oldest = registry.gauge(
            "wxd_push_oldest_queued_seconds", "Age of the oldest queued push (0 when none).")
        self._m_paused = registry.gauge(
            "wxd_push_paused",
            "1 while sending is paused, by reason (quota: 45009, WeChat's daily quota; "
            "token_budget; unreachable: no access_token, or the IP whitelist).", ("reason",))
        registry.add_collector(self._collect)

    async def _collect(self) -> None:
        if self._state != "running":
            return
        depth, oldest = await self._db.read(push_store.queue_depth)
        self._m_depth.set(depth)
        self._m_oldest.set(max(0.0, self._clock.now() - oldest) if oldest is not None else 0.0)

    def _transition(self, status: str, count: int = 1) -> None:
        if status and count:
            self._m_transitions.inc(count, status=status)

    @property
    def state(self) -> str:
        """"new" | "running" | "stopping" | "stopped"."""
        return self._state

    @property
    def paused_until(self) -> float | None:
        """Unix seconds until which sending is paused (45009, the token budget; for WeChat
        unreachable, the next probe), or None."""
        return self._pause.until if self._pause is not None else None

    @property
    def pause(self) -> Paused | None:
        """The current pause (reason, errcode, since, until, ip), or None."""
        return self._pause

    def ring(self) -> None:
        """The doorbell: new or re-queued pushes are committed; look at the queue now."""
        self._doorbell.set()

    def reachable(self) -> None:
        """A token fetch succeeded (TokenManager.on_available): a pause because WeChat was
        unreachable ends now. If WeChat still refuses the sends, the next one pauses again."""
        if self._pause is not None and self._pause.reason == "unreachable":
            self._resume("a token fetch succeeded")

    # Lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        """Recover pushes left `sending` by a previous run, load the quota pause, start tasks.
        Idempotent."""
        if self._state != "new":
            return
        now = self._clock.now()

        def recover(conn: sqlite3.Connection) -> tuple[dict[str, int], Paused | None]:
            counts = push_store.recover(conn, now, self._stale_sending)
            self._report_unknown(conn, counts, now)
            push_store.prune_reports(conn, now - REPORT_KEEP_S)
            paused = push_store.load_pause(conn)
            if paused is not None and paused.reason != "unreachable" and paused.until <= now:
                push_store.save_pause(conn, None)  # the pause ended while wxd was down
                paused = None
            return counts, paused

        self.recovered, paused = await self._db.write(recover)
        if self.recovered["requeued"] or self.recovered["failed"]:
            log.warning("pushes left sending by the last run: %(requeued)d requeued, "
                        "%(failed)d failed as outcome_unknown (%(stale)d were past WeChat's "
                        "10-minute client_msg_id window)", self.recovered)
        self._set_paused(paused)
        # WeChat unreachable when the last run stopped: a probe tells at once whether it still is.
        self._probing = paused is not None and paused.reason == "unreachable"
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
        """Stop leasing; requeue leased pushes not yet POSTed; let in-flight sends finish (and
        their outcomes commit) within drain_timeout_s (real time: it bounds the process's exit),
        then cancel them (requeued, attempt counted: same client_msg_id). Idempotent."""
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
        now = self._clock.now()

        def requeue(conn: sqlite3.Connection) -> None:
            # Only rows still `sending`: an outcome a cancelled sender submitted commits first.
            push_store.release(conn, unsent, now, refund=True)
            push_store.release(conn, cut, now, refund=False)

        if unsent or cut:
            await self._db.write(requeue)
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
                now = self._clock.now()
                held = frozenset(self._held)
                expired, leased = await self._db.write(
                    lambda conn: self._lease(conn, now, room, held))  # noqa: B023
                if expired["requeued"] or expired["failed"]:
                    log.warning("pushes still sending after their lease (outcome not recorded): "
                                "%(requeued)d queued again with their client_msg_id, "
                                "%(failed)d failed as outcome_unknown", expired)
                self._transition("failed", expired["failed"])
                self._transition("sending", len(leased))
                self._held.update(item.id for item in leased)
                for item in leased:
                    self._queue.put_nowait(item)
                if len(leased) < room:
                    await self._idle()
            except asyncio.CancelledError:
                raise
            except StorageError as exc:  # no traceback: the database is full, locked, read-only
                log.warning("push dispatcher: the database is not available (%s); retrying", exc)
                await self._clock.sleep(1.0)
            except Exception:
                log.exception("push dispatcher error; retrying shortly")
                await self._clock.sleep(1.0)

    def _lease(self, conn: sqlite3.Connection, now: float, room: int, held: frozenset[str]
               ) -> tuple[dict[str, int], list[push_store.Leased]]:
        """One write: queue again the pushes left `sending` past their lease that this process
        does not hold (their outcome was never recorded), then lease up to `room` due ones.
        Returns (requeue_expired's counts, leased)."""
        expired = push_store.requeue_expired(conn, now, self._stale_sending, held)
        self._report_unknown(conn, expired, now)
        return expired, push_store.lease(conn, now, room, self._lease_s)

    def _report_unknown(self, conn: sqlite3.Connection, counts: dict[str, int],
                        now: float) -> None:
        """push.failed for the pushes recover/requeue_expired just failed as outcome_unknown."""
        if counts["failed"] and self._outbox.wants("push.failed"):
            for push_id in push_store.failed_unknown_at(conn, now):
                self._outbox.push(conn, push_id, ["push.failed"], now)

    def _room_to_lease(self) -> int:
        """How many pushes to lease now: 0 until a chunk of 2 × workers fits, unless the
        senders are about to starve (fewer commits). Up to 3 × workers are leased ahead, none
        when sends are rate-limited (they would wait while already recorded as attempted).
        While probing whether WeChat is reachable again: one, when nothing else is out."""
        buffered = self._queue.qsize()
        if self._probing:
            return 0 if self._inflight or buffered else 1
        room = self._capacity - len(self._inflight) - buffered
        chunk = min(2 * self.workers, self._capacity)
        return room if room >= chunk or (room > 0 and buffered == 0) else 0

    async def _idle(self) -> None:
        """Wait for the doorbell, the next due push or lease end (by the injected clock) or
        idle_max_s."""
        if self._doorbell.is_set():
            return
        now = self._clock.now()
        due = await self._db.read(lambda conn: push_store.next_wake(conn, now))
        wait = self._idle_max_s
        if due is not None:
            wait = min(wait, max(0.0, due - self._clock.now()))
        await self._clock.wait(self._doorbell, wait)

    async def _wait_while_paused(self) -> bool:
        """True if paused (after waiting a while); clears an expired pause, or starts probing
        when an "unreachable" pause reaches its probe time."""
        if self._persist_pause:  # reachable() or a probe ended the pause in memory
            self._persist_pause = False
            pause = self._pause  # whatever holds now (a newer pause's own write came first)
            await self._db.write(lambda conn: push_store.save_pause(conn, pause))
        pause = self._pause
        if pause is None or self._probing:
            return False
        now = self._clock.now()
        if now >= pause.until:
            if pause.reason == "unreachable":
                self._probing = True
                log.info("probing whether WeChat answers again with one push")
                return False
            await self._db.write(lambda conn: push_store.save_pause(conn, None))
            self._set_paused(None)
            log.info("quota pause over; push sending resumes")
            return False
        self._doorbell.clear()
        await self._clock.wait(self._doorbell, min(self._idle_max_s, pause.until - now))
        return True

    def _set_paused(self, pause: Paused | None) -> None:
        self._pause = pause
        if pause is None:
            self._probing = False
        for reason in PAUSE_REASONS:
            self._m_paused.set(1.0 if pause is not None and pause.reason == reason else 0.0,
                               reason=reason)

    def _resume(self, why: str) -> None:
        """End an "unreachable" pause (in memory now; the dispatcher stores it) and wake up."""
        pause = self._pause
        if pause is None:
            return
        log.warning("WeChat answers again (%s): push sending resumes after %.0f s paused", why,
                    self._clock.now() - pause.since)
        self._set_paused(None)
        self._persist_pause = True
        self._doorbell.set()
        self._room.set()

    # Senders --------------------------------------------------------------------------------

    async def _sender(self) -> None:
        while True:
            item = await self._queue.get()
            if item is _STOP:
                return
            self._inflight[item.id] = item
            # Cancelled mid-send (stop's bound passed), the item stays in _inflight and stop()
            # requeues it with the attempt counted.
            outcome = await self._send(item)
            try:
                self._transition(await self._db.write_many(push_store.apply_outcomes, outcome))
            except Exception as exc:  # it stays `sending`: queued again when its lease ends
                log.error("recording the outcome of push %s failed: %s", item.id, exc)
            del self._inflight[item.id]
            self._held.discard(item.id)
            if not self._room.is_set() and self._room_to_lease():
                self._room.set()

    async def _send(self, item: push_store.Leased) -> push_store.Outcome:
        """POST one push; return the write fn recording its outcome."""
        if self._pause is not None and not self._probing:
            return lambda conn: push_store.noted(
                push_store.release(conn, [item.id], self._clock.now(), refund=True), "queued")
        await self._limiter.acquire()  # the rate limit, and 45011's hold on every sender
        posted_at = self._clock.now()
        started = time.perf_counter()
        try:
            msgid = await self._api.send_template(item.wechat_body())
        except Exception as exc:
            return self._failure(item, exc, started, posted_at)
        self._observe(started)
        now = self._clock.now()
        if self._pause is not None and self._pause.reason == "unreachable":
            self._resume("a push was accepted")
        return self._reported(item.id, lambda conn: push_store.mark_sent(conn, item.id, msgid, now),
                              now, sent=True)

    def _reported(self, push_id: str, outcome: push_store.Outcome, now: float, *,
                  sent: bool) -> push_store.Outcome:
        """`outcome` with its push.* callbacks in the same transaction: push.sent when WeChat
        accepted the push (`sent`), push.delivered / push.failed for those statuses (a report
        that came before the answer is applied by mark_sent at once)."""
        if not self._outbox.types:
            return outcome

        def run(conn: sqlite3.Connection) -> str:
            status = outcome(conn)
            kinds = ["push.sent"] if sent and status else []
            if status in ("delivered", "failed"):
                kinds.append(f"push.{status}")
            if kinds:
                self._outbox.push(conn, push_id, kinds, now)
            return status

        return run

    def _observe(self, started: float) -> None:
        self._m_send.observe(time.perf_counter() - started)

    def _failure(self, item: push_store.Leased, exc: Exception, started: float,
                 posted_at: float) -> push_store.Outcome:
        self._observe(started)
        now = self._clock.now()
        answer = exc.answer if isinstance(exc, (WeChatAPIError, NoMsgidError)) else None
        duplicate = duplicate_send(exc, item.resend)
        if duplicate is not None:
            msgid = duplicate.msgid
            log.info("push %s: WeChat answered the resend of client_msg_id %s as a duplicate "
                     "(%s); recorded as sent (msgid %s)", item.id, item.client_msg_id,
                     errcode_of(exc) or "errcode 0 without a msgid", msgid or "unknown")
            if self._pause is not None and self._pause.reason == "unreachable":
                self._resume("a push was answered")
            return self._reported(
                item.id, lambda conn: push_store.mark_sent(conn, item.id, msgid, now, answer),
                now, sent=True)
        errcode = errcode_of(exc)
        if isinstance(exc, WeChatAPIError):
            error = exc.errmsg
        elif anticipated(exc):  # TransportError, TokenBudgetError (no token to send with), ...
            error = str(exc)
        else:
            log.error("unexpected error sending push %s", item.id, exc_info=exc)
            error = f"internal error: {type(exc).__name__}"
        decision = decide(exc, item.attempts, now, self.policy)
        if isinstance(decision, Pause):
            paused = self._paused(decision, now, error)

            def pause(conn: sqlite3.Connection) -> str:
                push_store.save_pause(conn, paused)
                return push_store.noted(push_store.release(conn, [item.id], now, refund=True),
                                        "queued")

            return pause
        if self._probing:  # the probe got an answer other than "unreachable"
            self._resume(f"a push was answered: {error}")
        if not isinstance(decision, Fail):
            if decision.scope == "app":  # 45011: nothing passes before the next minute
                self._limiter.hold_for(decision.delay_s)
            due = now + decision.delay_s
            code = "wechat_error" if errcode is not None else "transport_error"
            log.info("push %s attempt %d failed (%s); retrying in %.1f s", item.id,
                     item.attempts, errcode if errcode is not None else error, due - now)
            return lambda conn: push_store.noted(push_store.mark_retry(
                conn, item.id, now, due, errcode, code, error, answer), "queued")
        if decision.reason == "exhausted":
            code = "attempts_exhausted"
        else:
            code = "rejected"
            if errcode == 40037 and self._on_template_invalid is not None:
                self._on_template_invalid()
        log.info("push %s failed: %s (errcode %s)", item.id, error, errcode)
        if errcode == 43004 and code == "rejected":  # an unsubscribe event was missed
            return self._reported(item.id, lambda conn: push_store.noted(
                push_store.mark_not_following(conn, item.id, item.oa_openid, now, posted_at,
                                              error, answer), "failed"), now, sent=False)
        return self._reported(item.id, lambda conn: push_store.noted(push_store.mark_failed(
            conn, item.id, now, errcode, code, error, answer), "failed"), now, sent=False)

    def _paused(self, decision: Pause, now: float, error: str) -> Paused:
        """Pause ALL sending as `decision` says; the one loud log line when a pause begins
        (or its reason or errcode changes), not for every push it sends back to the queue."""
        previous = self._pause
        same = previous if previous is not None and previous.reason == decision.reason else None
        pause = Paused(decision.reason, same.since if same else now, decision.until,
                       decision.errcode, decision.ip)
        if decision.reason == "unreachable":
            if same is None or same.errcode != pause.errcode:
                log.error("%s; push sending paused until WeChat answers again (%s)",
                          pause_cause(pause.reason, pause.errcode, pause.ip), error)
            elif self._probing:
                log.info("WeChat still unreachable (%s); next probe in %.0f s", error,
                         pause.until - now)
        elif same is None or pause.until > same.until:
            log.warning("%s; push sending paused until %s",
                        pause_cause(pause.reason, pause.errcode, pause.ip),
                        datetime.datetime.fromtimestamp(pause.until, BEIJING).isoformat())
        self._set_paused(pause)
        self._probing = False  # a probe that met the pause again: wait for the next probe time
        return pause
