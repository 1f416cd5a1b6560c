"""Event handling: EventRouter turns a stored webhook message into follower/push state;
EventWorkers drain the durable job queue (store/jobs.py) through it, with retries.

Imports base modules, pacing, retry, wxd.wechat.messages and wxd.store only; linking
(refresh_follower), QR links (on_scan) and the handlers of other job kinds are injected.
"""

from __future__ import annotations

import asyncio
import logging
import random
import sqlite3
from collections.abc import Awaitable, Callable, Mapping
from typing import Protocol

from wxd import pacing
from wxd.clock import SYSTEM_CLOCK, Clock
from wxd.errors import MessageError, StorageError
from wxd.metrics import Registry
from wxd.pacing import IDLE_MAX_S, LEASE_S
from wxd.retry import Backoff, Fail, Pause, Policy, decide, pause_cause
from wxd.store import followers, inbox, links
from wxd.store import jobs as job_store
from wxd.store import pushes as push_store
from wxd.store.callbacks import OFF, Outbox
from wxd.store.db import Database
from wxd.wechat.messages import (
    Message,
    ScanEvent,
    SubscribeEvent,
    TemplateSendJobFinish,
    UnsubscribeEvent,
)

log = logging.getLogger(__name__)

JOB_TIMEOUT_S = 60.0     # a job running longer is abandoned (well within its lease, LEASE_S)
IDLE_MIN_S = 0.05        # idle polling backs off up to IDLE_MAX_S; the doorbell wakes at once
PRUNE_EVERY_S = 3600.0
UNREACHABLE_PROBE_S = 60.0  # a job that met user/info's 40164 tries again after this long
JOBS_RETENTION_S = 7 * 86400.0     # finished jobs kept for inspection
INBOX_RETENTION_S = 30 * 86400.0   # far beyond WeChat's retries (seconds) and the replay window
LINK_CODES_RETENTION_S = 30 * 86400.0  # link codes kept this long after they expire


class FollowerRefresher(Protocol):
    """Satisfied by linking.Linking: user/info for one follower, stored and linked."""

    async def refresh_follower(self, oa_openid: str) -> None: ...


class ScanLinker(Protocol):
    """Satisfied by qrlinks.QrLinks: link the person who scanned a QR link code."""

    async def on_scan(self, oa_openid: str, scene: str, ticket: str, at: float, *,
                      backstop: bool = False) -> str: ...


JobHandler = Callable[[Mapping[str, object]], Awaitable[str]]
"""Runs one job of another kind from its JSON payload; returns the action (a log label)."""


class EventRouter:
    """Applies one message. Idempotent: a job may run again after a crash or a retry.

    subscribe → followers.record_subscribe (scene/EventKey/Ticket kept), then
    refresher.refresh_follower (user/info → unionid → link); unsubscribe →
    followers.record_unsubscribe(purge=purge_on_unsubscribe), the unionid is kept;
    SCAN → EventKey/Ticket kept on the follower (refreshed first when unknown);
    a subscribe or SCAN carrying a QR link scene → scans.on_scan (the link; the webhook
    normally made it before answering, so this is the idempotent backstop);
    TEMPLATESENDJOBFINISH → push_store.apply_delivery_report (an unknown MsgID is matched by
    recipient and time to a push sent without a known msgid, else stored for late matching
    there; a MsgID of 0 or none is matched by recipient and time, or left unmatched);
    anything else → nothing (it is in the inbox).
    With an `outbox`, an applied follow or unfollow writes its follower.* callback, and a report
    that moves a push its push.* callback, in the transaction that applies it (a follower
    callback's id derives from the message, so a job run again writes it once).
    Upstream errors propagate to the caller (EventWorkers retries them).
    """

    def __init__(self, db: Database, refresher: FollowerRefresher, *,
                 purge_on_unsubscribe: bool = False, clock: Clock = SYSTEM_CLOCK,
                 metrics: Registry | None = None, scans: ScanLinker | None = None,
                 outbox: Outbox = OFF) -> None:
        self._db = db
        self._refresher = refresher
        self._scans = scans
        self._outbox = outbox
        self._purge = purge_on_unsubscribe
        self._clock = clock
        registry = metrics if metrics is not None else Registry()
        self._actions = registry.counter(
            "wxd_events_actions_total", "Webhook messages applied, by action.", ("action",)
        )
        # The same series the push workers count their transitions in.
        self._push_transitions = registry.counter(
            "wxd_pushes_total", "Push status transitions by new status.", ("status",))

    async def handle(self, message: Message) -> str:
        """Apply `message`; returns the action taken (a metrics label)."""
        action = await self._apply(message)
        self._actions.inc(action=action)
        return action

    async def _apply(self, msg: Message) -> str:
        openid, at, now = msg.from_user, float(msg.create_time), self._clock.now()
        outbox, key = self._outbox, msg.dedupe_key
        if isinstance(msg, SubscribeEvent):
            def subscribe(conn: sqlite3.Connection) -> None:
                if followers.record_subscribe(conn, openid, at, now, scene=msg.scene,
                                              event_key=msg.event_key or None,
                                              ticket=msg.ticket or None):
                    outbox.follower(conn, "follower.subscribed", openid, key, now)

            await self._db.write(subscribe)
            if self._scans is not None and msg.scene:
                await self._scans.on_scan(openid, msg.scene, msg.ticket, at, backstop=True)
            await self._refresher.refresh_follower(openid)
            return "subscribe"
        if isinstance(msg, UnsubscribeEvent):
            def unsubscribe(conn: sqlite3.Connection) -> None:
                if followers.record_unsubscribe(conn, openid, at, now, purge=self._purge):
                    outbox.follower(conn, "follower.unsubscribed", openid, key, now)

            await self._db.write(unsubscribe)
            return "unsubscribe"
        if isinstance(msg, ScanEvent):
            if self._scans is not None and msg.event_key:
                await self._scans.on_scan(openid, msg.event_key, msg.ticket, at, backstop=True)
            known = await self._db.write(
                lambda conn: followers.record_scan(conn, openid, at, now, msg.event_key, msg.ticket))
            if not known:
                # Only followers can scan into a SCAN event: learn who this is, then keep it.
                await self._refresher.refresh_follower(openid)
                await self._db.write(
                    lambda conn: followers.record_scan(conn, openid, at, self._clock.now(), msg.event_key,
                                              msg.ticket))
            return "scan"
        if isinstance(msg, TemplateSendJobFinish):
            msgid = msg.msgid

            def report(conn: sqlite3.Connection) -> tuple[str | None, str | None]:
                if msgid is None:  # MsgID 0 or missing: match by recipient and time
                    push_id, moved = push_store.match_delivery_report_by_time(
                        conn, openid, at, msg.status, now)
                else:
                    push_id, moved = push_store.match_delivery_report(conn, msgid, msg.status,
                                                                      openid, now, at)
                if push_id is not None and moved is not None:
                    outbox.push(conn, push_id, [f"push.{moved}"], now)
                return push_id, moved

            matched, new_status = await self._db.write(report)
            if new_status is not None:
                self._push_transitions.inc(status=new_status)
            if matched is not None:
                return "delivery_matched"
            return "delivery_stored" if msgid is not None else "delivery_unmatched"
        return "ignored"


class EventWorkers:
    """N named asyncio tasks that lease event jobs and run them through the router.

    `ring()` (the webhook's on_stored) wakes idle workers at once; idle polling backs off
    between IDLE_MIN_S and IDLE_MAX_S (on the clock) otherwise, and wakes when the next job
    is due or the next lease ends (a job whose outcome could not be written runs again then).
    A failed job is classified by wxd.retry.decide: transient, token and unexpected errors go
    back to the queue after backoff_base_s·2^(n-1) (-20 % jitter, at most backoff_max_s; 45011
    not before the next minute; 43117, the per-user frequency limit, after
    frequency_backoff_base_s·2^(n-1), at most frequency_backoff_max_s: minutes to hours) until
    `max_attempts` leases, then the job fails with the error kept. Pauses wait without using
    an attempt: 45009 (user/info's daily quota) until quota_resume_s after the next Beijing
    midnight, a spent token budget until the next UTC midnight, WeChat unreachable for wxd
    (no access_token, or user/info answered 40164/61004) until the next probe, or earlier:
    reachable() (the token manager's on_available) makes those jobs due at once. Terminal
    failures (e.g. 40003 invalid openid, a malformed message) fail at once.
    Jobs of other kinds than inbox.EVENT_JOB run through `handlers` (kind → JobHandler, e.g.
    qrlinks.CARD_JOB), with the same leases and retries. While `yield_to()` is True (the daemon
    passes the webhook's busy()), each worker holds its next job back up to pacing.YIELD_MAX_S:
    acknowledging WeChat within its 5 seconds comes first; the stored jobs wait.
    `start()` first requeues leases left by a previous process. `stop()` lets running jobs
    finish within drain_timeout_s, then cancels them (their lease is recovered at the next
    start). Both are idempotent.
    """

    def __init__(self, db: Database, router: EventRouter, *, workers: int = 2,
                 max_attempts: int = 10, backoff_base_s: float = 2.0,
                 backoff_max_s: float = 600.0, quota_resume_s: float = 300.0,
                 frequency_backoff_base_s: float = 60.0,
                 frequency_backoff_max_s: float = 14400.0, clock: Clock = SYSTEM_CLOCK,
                 rng: random.Random | None = None,
                 metrics: Registry | None = None, lease_s: float = LEASE_S,
                 job_timeout_s: float = JOB_TIMEOUT_S,
                 jobs_retention_s: float = JOBS_RETENTION_S,
                 inbox_retention_s: float = INBOX_RETENTION_S,
                 drain_timeout_s: float = 5.0,
                 handlers: Mapping[str, JobHandler] | None = None,
                 unreachable_probe_s: float = UNREACHABLE_PROBE_S,
                 yield_to: Callable[[], bool] | None = None) -> None:
        self._db = db
        self._router = router
        self._yield_to = yield_to
        self._handlers = dict(handlers or {})
        self.drain_timeout_s = drain_timeout_s
        self._workers = workers
        rng = rng if rng is not None else random.Random()
        self.policy = Policy(Backoff(backoff_base_s, backoff_max_s, 0.2, rng),
                             max_attempts=max_attempts, quota_resume_s=quota_resume_s,
                             frequency=Backoff(frequency_backoff_base_s,
                                               frequency_backoff_max_s, 0.2, rng),
                             unreachable_probe_s=unreachable_probe_s)
        self._clock = clock
        self._lease_s = lease_s
        self._job_timeout_s = min(job_timeout_s, lease_s)
        self._jobs_retention_s = jobs_retention_s
        self._inbox_retention_s = inbox_retention_s
        self._next_prune = 0.0
        self._doorbell = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = False
        self._state = "new"
        self._unreachable: set[int] = set()  # jobs waiting for WeChat to be reachable again
        self._hasten = False  # reachable() was called: make those jobs due now
        registry = metrics if metrics is not None else Registry()
        self._outcomes = registry.counter(
            "wxd_events_jobs_total",
            "Event jobs run, by outcome (done, retried, postponed: paused without using an "
            "attempt, failed).", ("outcome",),
        )
        self._depth = registry.gauge("wxd_events_jobs", "Event jobs by state.", ("state",))
        registry.add_collector(self._collect)

    @property
    def state(self) -> str:
        """"new" | "running" | "stopping" | "stopped"."""
        return self._state

    async def _collect(self) -> None:
        for state, count in (await self._db.read(job_store.counts)).items():
            self._depth.set(count, state=state)

    def ring(self) -> None:
        """Wake idle workers (new work was committed)."""
        self._doorbell.set()

    def reachable(self) -> None:
        """A token fetch succeeded (TokenManager.on_available): jobs postponed because WeChat
        was unreachable become due now."""
        if self._unreachable:
            self._hasten = True
            self._doorbell.set()

    async def start(self) -> None:
        if self._state != "new":
            return
        self._state = "running"
        recovered = await self._db.write(
            lambda conn: job_store.recover(conn, self._clock.now()))
        if recovered:
            log.info("requeued %d event jobs left leased by a previous run", recovered)
        for index in range(self._workers):
            task = asyncio.create_task(self._loop(), name=f"wxd-event-worker-{index}")
            task.add_done_callback(self._task_done)
            self._tasks.append(task)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error("%s exited: %r", task.get_name(), task.exception())

    async def stop(self) -> None:
        """Stop leasing; jobs in flight get drain_timeout_s (real time: it bounds the process's
        exit) to finish, then are cancelled (their lease expires and they run again after a
        restart)."""
        if self._state != "running":
            if self._state == "new":
                self._state = "stopped"
            return
        self._state = "stopping"
        self._stopping = True
        self._doorbell.set()
        if self._tasks:
            _, pending = await asyncio.wait(self._tasks, timeout=self.drain_timeout_s)
            for task in pending:
                task.cancel()
            if pending:
                log.warning("cancelled %d event jobs still running at stop", len(pending))
                await asyncio.wait(pending)
        self._tasks.clear()
        self._state = "stopped"

    async def _loop(self) -> None:
        idle = IDLE_MIN_S
        while not self._stopping:
            self._doorbell.clear()
            unavailable = False
            try:
                await pacing.yield_to(self._yield_to, self._clock, lambda: not self._stopping)
                await self._hasten_if_asked()
                ran = await self.run_once(limit=1)
            except StorageError as exc:  # no traceback: the database is full, busy, read-only
                log.warning("event worker: cannot lease jobs (%s); retrying", exc)
                ran, unavailable = 0, True
            except Exception:
                log.exception("event worker loop error; continuing")
                ran = 0
            if ran:
                idle = IDLE_MIN_S
                continue
            if self._stopping:
                break
            try:
                await self.prune_if_due()
            except Exception:
                log.exception("pruning the inbox and finished jobs failed; continuing")
            timeout = idle
            try:
                due = await self._db.read(job_store.next_wake)
            except Exception:
                log.exception("reading the next due job failed; continuing")
                due = None
            if due is not None and not unavailable:  # while writes fail, back off instead
                timeout = min(idle, max(due - self._clock.now(), IDLE_MIN_S))
            if await self._clock.wait(self._doorbell, timeout):
                idle = IDLE_MIN_S
            else:
                idle = min(idle * 2, IDLE_MAX_S)

    async def _hasten_if_asked(self) -> None:
        if not self._hasten:
            return
        self._hasten = False
        ids, now = sorted(self._unreachable), self._clock.now()
        self._unreachable.clear()
        hastened = await self._db.write(lambda conn: job_store.hasten(conn, ids, now))
        if hastened:
            log.info("WeChat reachable again: %d postponed event jobs are due now", hastened)

    async def prune_if_due(self) -> tuple[int, int]:
        """At most every PRUNE_EVERY_S (when idle): delete done jobs older than the jobs
        retention, inbox rows older than the inbox retention (pending work is kept) and link
        codes expired for LINK_CODES_RETENTION_S. Returns (jobs, inbox rows) deleted."""
        now = self._clock.now()
        if now < self._next_prune:
            return 0, 0
        self._next_prune = now + PRUNE_EVERY_S
        jobs, rows, codes = await self._db.write(lambda conn: (
            job_store.prune(conn, now - self._jobs_retention_s),
            inbox.prune(conn, now - self._inbox_retention_s),
            links.prune_codes(conn, now - LINK_CODES_RETENTION_S)))
        if jobs or rows or codes:
            log.info("pruned %d finished event jobs, %d inbox rows and %d link codes", jobs,
                     rows, codes)
        return jobs, rows

    async def run_once(self, limit: int = 100) -> int:
        """Lease up to `limit` due jobs and run them one by one; returns how many ran.

        What the worker tasks do; tests call it directly with an injected clock.
        """
        now = self._clock.now()
        jobs = await self._db.write(
            lambda conn: job_store.lease(conn, now, limit, self._lease_s))
        for job in jobs:
            try:
                await self._run_job(job)
            except StorageError as exc:
                # Its outcome (done, retry, failed) was not written: the job stays leased, and
                # jobs.lease takes it again once the lease has passed, in this very process.
                log.warning("event job %d: recording its outcome failed (%s); it runs again "
                            "when its lease ends", job.id, exc)
        return len(jobs)

    async def _run_job(self, job: job_store.Job) -> None:
        try:
            handler = self._handlers.get(job.kind)
            if handler is not None:
                action = await asyncio.wait_for(handler(job.payload_json()),
                                                self._job_timeout_s)
            elif job.kind != inbox.EVENT_JOB:
                raise MessageError(f"unknown job kind {job.kind!r}")
            else:
                inbox_id = job.payload_json().get("inbox_id")
                if not isinstance(inbox_id, int):
                    raise MessageError("job payload has no inbox_id")
                message = await self._db.read(lambda conn: inbox.load(conn, inbox_id))
                if message is None:
                    raise MessageError(f"inbox row {inbox_id} is gone")
                action = await asyncio.wait_for(self._router.handle(message),
                                                self._job_timeout_s)
        except Exception as exc:
            await self._failed(job, exc)
            return
        self._unreachable.discard(job.id)
        await self._db.write(lambda conn: job_store.finish(conn, job.id, self._clock.now()))
        self._outcomes.inc(outcome="done")
        log.debug("event job %d done: %s", job.id, action)

    async def _failed(self, job: job_store.Job, exc: Exception) -> None:
        error = f"{type(exc).__name__}: {exc}"
        now = self._clock.now()
        decision = decide(exc, job.attempts, now, self.policy)
        if isinstance(decision, Pause):
            await self._postpone(job, decision, error, now)
            return
        self._unreachable.discard(job.id)
        if not isinstance(decision, Fail):
            due = now + decision.delay_s
            if decision.unexpected:
                log.error("event job %d raised unexpectedly (attempt %d); retrying in %.0f s",
                          job.id, job.attempts, due - now, exc_info=exc)
            else:
                log.warning("event job %d attempt %d failed (%s); retrying in %.0f s",
                            job.id, job.attempts, error, due - now)
            await self._db.write(lambda conn: job_store.retry(conn, job.id, error, due))
            self._outcomes.inc(outcome="retried")
            return
        log.error("event job %d failed for good after %d attempts: %s", job.id, job.attempts,
                  error)
        await self._db.write(lambda conn: job_store.fail(conn, job.id, error, now))
        self._outcomes.inc(outcome="failed")

    async def _postpone(self, job: job_store.Job, pause: Pause, error: str, now: float) -> None:
        """Back to the queue until the pause ends, the attempt given back. Logged once while
        WeChat stays unreachable (not per job), else once per job at INFO."""
        if pause.reason == "unreachable":
            if not self._unreachable:
                log.warning("%s; event jobs that need WeChat wait until it answers again "
                            "(%s)", pause_cause(pause.reason, pause.errcode, pause.ip), error)
            self._unreachable.add(job.id)
        else:
            self._unreachable.discard(job.id)
            log.info("event job %d waits %.0f s: %s", job.id, pause.until - now,
                     pause_cause(pause.reason, pause.errcode, pause.ip))
        await self._db.write(
            lambda conn: job_store.retry(conn, job.id, error, pause.until, refund=True))
        self._outcomes.inc(outcome="postponed")
