"""CallbackWorkers: deliver the callback outbox (store/callbacks.py) to the backend's URL, signed,
at least once, with the one retry policy.

Imports base modules, pacing, retry, wxd.wechat.transport (the keep-alive client) and the store
only; never tornado.web. The secret never leaves this module: not logged, not in a repr, not in
an error, not in the database.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import random
import sqlite3
import threading
import time
import urllib.parse
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from wxd import pacing
from wxd.clock import SYSTEM_CLOCK, Clock
from wxd.errors import CallbackError, StorageError
from wxd.metrics import Registry
from wxd.pacing import IDLE_MAX_S, LEASE_S
from wxd.retry import Backoff, Fail, Pause, Policy, decide
from wxd.store import callbacks as callback_store
from wxd.store.db import Database
from wxd.wechat.transport import FetchError, KeepAliveClient, Response

log = logging.getLogger(__name__)

# The receiver's answer: read up to this many bytes (the rest is never read), and only
# callback_store.ANSWER_EXCERPT_CHARS of it are stored.
MAX_ANSWER_BYTES = 16 * 1024
SIGNATURE_HEADER = "Wxd-Signature"
PRUNE_EVERY_S = 3600.0
DONE_RETENTION_S = 7 * 86400.0    # delivered callbacks kept for `wxd callbacks list`
DEAD_RETENTION_S = 30 * 86400.0   # dead ones wait this long for an operator's retry
_STOP = object()


class Poster(Protocol):
    """What delivery needs from wechat.transport.KeepAliveClient."""

    async def fetch(self, method: str, url: str, *, headers: Mapping[str, str] | None = None,
                    body: bytes | None = None, connect_timeout_s: float = 10.0,
                    request_timeout_s: float = 30.0, replay_safe: bool | None = None
                    ) -> Response: ...


def signature(secret: bytes, timestamp: int, body: bytes) -> str:
    """The Wxd-Signature header: t=<unix>,v1=<hex HMAC-SHA256(secret, "<t>.<raw body>")>."""
    mac = hmac.new(secret, f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={mac}"


def safe_url(url: str) -> str:
    """scheme://host[:port]/path of `url`: what logs may show (no credentials, no query)."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    netloc = f"[{host}]" if ":" in host else host
    try:
        if parts.port:
            netloc += f":{parts.port}"
    except ValueError:
        pass
    return f"{parts.scheme}://{netloc}{parts.path}"


class CallbackWorkers:
    """A dispatcher that leases due callbacks and `concurrency` senders that POST them.

    Each attempt is recorded (attempts + 1, leased) before its POST; the body is the same bytes
    on every attempt and the headers carry Wxd-Event-Id, Wxd-Event-Type and a fresh
    Wxd-Signature. Any 2xx → done. Anything else (a status, a 3xx included: redirects are
    never followed; a timeout after timeout_s; a refused or reset connection; a TLS error) →
    pending again after retry_base_s·2^(n-1) (-50 % jitter, at most retry_max_s), never later
    than max_age_s after the callback was written (or revived by the operator), then → dead.
    The answer body is read up to MAX_ANSWER_BYTES; a short excerpt is kept with the status.
    Outcomes waiting at a commit are recorded by one statement (db.write_many). `ring()` (or
    `notify()`, from any thread: the outbox's doorbell) wakes the dispatcher; otherwise it
    looks again when the next callback or lease is due, or after idle_max_s. `start()` first
    makes leases of a previous process due again; `stop()` lets POSTs in flight finish within
    drain_timeout_s (real time), then cancels them (due again at once, the attempt counted).
    While `yield_to()` is True (the daemon passes the webhook's busy()), each sender waits up
    to pacing.YIELD_MAX_S before its next POST: WeChat's 5-second answer comes first,
    callbacks catch up after the burst (at least concurrency / YIELD_MAX_S a second go out).
    """

    def __init__(self, db: Database, url: str, secret: str, *, http: Poster | None = None,
                 concurrency: int = 8, timeout_s: float = 10.0, retry_base_s: float = 5.0,
                 retry_max_s: float = 3600.0, max_age_s: float = 86400.0,
                 clock: Clock = SYSTEM_CLOCK, rng: random.Random | None = None,
                 metrics: Registry | None = None, drain_timeout_s: float = 10.0,
                 idle_max_s: float = IDLE_MAX_S,
                 yield_to: Callable[[], bool] | None = None) -> None:
        self._db = db
        self._yield_to = yield_to
        self._url = url
        self._secret = secret.encode()
        self.concurrency = max(1, concurrency)
        self._owned: KeepAliveClient | None = None
        if http is None:
            http = self._owned = KeepAliveClient(self.concurrency, max_body_bytes=MAX_ANSWER_BYTES,
                                                 truncate_body=True)
        self._http = http
        self._timeout_s = timeout_s
        self._max_age_s = max_age_s
        self.policy = Policy(Backoff(retry_base_s, retry_max_s, 0.5,
                                     rng if rng is not None else random.Random()))
        self._clock = clock
        self._lease_s = max(LEASE_S, 4 * timeout_s)
        self.drain_timeout_s = drain_timeout_s
        self._idle_max_s = idle_max_s
        self._capacity = 8 * self.concurrency
        self._queue: asyncio.Queue[Any] = asyncio.Queue()
        self._doorbell = asyncio.Event()
        self._room = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread = 0
        self._rung = False
        self._tasks: list[asyncio.Task[None]] = []
        self._inflight: dict[str, callback_store.Leased] = {}  # leased, outcome not recorded
        self._recording: set[asyncio.Task[None]] = set()
        self._next_prune = 0.0
        self._state = "new"
        registry = metrics if metrics is not None else Registry()
        self._m_outcomes = registry.counter(
            "wxd_callbacks_total", "Callback delivery attempts by type and outcome (done, "
            "retried, dead).", ("type", "outcome"))
        self._m_post = registry.histogram(
            "wxd_callback_post_seconds", "Callback POST latency (request to answer).")
        self._m_lag = registry.histogram(
            "wxd_callback_delivery_seconds", "Callback written to delivered.",
            buckets=(0.01, 0.05, 0.1, 0.5, 1, 5, 30, 60, 300, 1800, 3600, 21600, 86400))
        self._m_backlog = registry.gauge("wxd_callbacks", "Callbacks by status.", ("status",))
        self._m_oldest = registry.gauge(
            "wxd_callback_oldest_pending_seconds",
            "Age of the oldest pending callback (0 when none).")
        registry.add_collector(self._collect)

    def __repr__(self) -> str:
        return f"CallbackWorkers({safe_url(self._url)!r}, state={self._state})"

    @property
    def state(self) -> str:
        """"new" | "running" | "stopping" | "stopped"."""
        return self._state

    async def _collect(self) -> None:
        if self._state != "running":
            return
        counts, oldest = await self._db.read(
            lambda conn: (callback_store.counts(conn), callback_store.oldest_pending(conn)))
        for status, count in counts.items():
            self._m_backlog.set(count, status=status)
        self._m_oldest.set(max(0.0, self._clock.now() - oldest) if oldest is not None else 0.0)

    def ring(self) -> None:
        """The doorbell: callbacks were committed; look at the outbox now."""
        self._doorbell.set()

    def notify(self) -> None:
        """ring() from any thread (the outbox calls it on the database thread, inside the
        transaction: the dispatcher's next lease is a later write, so it sees the commit)."""
        loop = self._loop
        if loop is None or self._rung:
            return
        if threading.get_ident() == self._loop_thread:
            self._doorbell.set()
            return
        self._rung = True
        try:
            loop.call_soon_threadsafe(self._rung_from_thread)
        except RuntimeError:  # the loop is closed: nothing left to wake
            self._rung = False

    def _rung_from_thread(self) -> None:
        self._rung = False
        self._doorbell.set()

    # Lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        """Make leases left by a previous process due, then start the tasks. Idempotent."""
        if self._state != "new":
            return
        now = self._clock.now()
        recovered = await self._db.write(lambda conn: callback_store.recover(conn, now))
        if recovered:
            log.info("%d callbacks were being delivered when wxd stopped; due again now",
                     recovered)
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self._state = "running"
        self._tasks.append(asyncio.create_task(self._dispatch(), name="wxd-callback-dispatcher"))
        for number in range(self.concurrency):
            self._tasks.append(asyncio.create_task(self._sender(),
                                                   name=f"wxd-callback-sender-{number}"))
        for task in self._tasks:
            task.add_done_callback(self._task_done)
        log.info("callbacks go to %s", safe_url(self._url))

    def _task_done(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error("callback task %s died", task.get_name(), exc_info=task.exception())

    async def stop(self) -> None:
        """Stop leasing; leased callbacks not yet POSTed are due again (attempt refunded); POSTs
        in flight get drain_timeout_s, then are cancelled (due again, attempt counted)."""
        if self._state != "running":
            if self._state == "new":
                self._state = "stopped"
                self._close_owned()
            return
        self._state = "stopping"
        self._doorbell.set()
        self._room.set()
        dispatcher, senders = self._tasks[0], self._tasks[1:]
        await asyncio.gather(dispatcher, return_exceptions=True)
        unsent: list[str] = []
        while not self._queue.empty():
            item = self._queue.get_nowait()
            if isinstance(item, callback_store.Leased):
                unsent.append(item.id)
        for _ in senders:
            self._queue.put_nowait(_STOP)
        started = time.monotonic()
        _, pending = await asyncio.wait(senders, timeout=self.drain_timeout_s)
        for task in pending:
            task.cancel()
        await asyncio.gather(*senders, return_exceptions=True)
        if self._recording:  # outcomes on their way to the database
            await asyncio.wait(set(self._recording),
                               timeout=max(0.1, self.drain_timeout_s - (time.monotonic() - started)))
        if pending:
            log.warning("%d callback deliveries did not finish within %.1f s; due again at the "
                        "next start", len(self._inflight), self.drain_timeout_s)
        cut = list(self._inflight)
        self._inflight.clear()
        now = self._clock.now()

        def release(conn: sqlite3.Connection) -> None:
            callback_store.release(conn, unsent, now, refund=True)
            callback_store.release(conn, cut, now, refund=False)

        if unsent or cut:
            try:
                await self._db.write(release)
            except StorageError as exc:  # the leases expire; recover() at the next start
                log.warning("could not release leased callbacks at stop: %s", exc)
        self._tasks.clear()
        self._close_owned()
        self._state = "stopped"

    def _close_owned(self) -> None:
        if self._owned is not None:
            self._owned.close()
            self._owned = None

    # Dispatcher -----------------------------------------------------------------------------

    async def _dispatch(self) -> None:
        while self._state == "running":
            try:
                room = self._room_to_lease()
                if room == 0:
                    self._room.clear()
                    await self._room.wait()
                    continue
                self._doorbell.clear()
                now = self._clock.now()
                leased = await self._db.write(
                    lambda conn: callback_store.lease(conn, now, room, self._lease_s))  # noqa: B023
                for item in leased:
                    self._queue.put_nowait(item)
                if len(leased) < room:
                    await self._idle()
            except asyncio.CancelledError:
                raise
            except StorageError as exc:
                log.warning("callback dispatcher: the database is not available (%s); retrying",
                            exc)
                await self._clock.sleep(1.0)
            except Exception:
                log.exception("callback dispatcher error; retrying shortly")
                await self._clock.sleep(1.0)

    def _room_to_lease(self) -> int:
        """How many to lease now: none until `concurrency` fit, unless the senders are about
        to starve. Up to 8 × concurrency are leased ahead or awaiting their outcome's commit,
        so that senders never wait for a lease to commit."""
        buffered = self._queue.qsize()
        room = self._capacity - len(self._inflight) - buffered
        return room if room >= self.concurrency or (room > 0 and buffered == 0) else 0

    async def _idle(self) -> None:
        """Prune when due, then wait for the doorbell, the next due callback or lease end (by
        the injected clock), or idle_max_s."""
        if self._doorbell.is_set():
            return
        await self._prune_if_due()
        due = await self._db.read(callback_store.next_due)
        wait = self._idle_max_s
        if due is not None:
            wait = min(wait, max(0.0, due - self._clock.now()))
        await self._clock.wait(self._doorbell, wait)

    async def _prune_if_due(self) -> int:
        now = self._clock.now()
        if now < self._next_prune:
            return 0
        self._next_prune = now + PRUNE_EVERY_S
        pruned = await self._db.write(lambda conn: callback_store.prune(
            conn, now - DONE_RETENTION_S, now - DEAD_RETENTION_S))
        if pruned:
            log.info("pruned %d delivered or long-dead callbacks", pruned)
        return pruned

    # Senders --------------------------------------------------------------------------------

    async def _sender(self) -> None:
        while True:
            item = await self._queue.get()
            if item is _STOP:
                return
            self._inflight[item.id] = item
            # Cancelled mid-POST (stop's bound passed), the item stays in _inflight and stop()
            # makes it due again.
            await self._hold_back()
            outcome = await self.attempt(item)
            # Recorded in the background: the next POST does not wait for this commit (the
            # outcomes waiting at a commit share it); the item stays in flight until then.
            task = asyncio.create_task(self._record(item, outcome))
            self._recording.add(task)
            task.add_done_callback(self._recording.discard)

    async def _hold_back(self) -> None:
        await pacing.yield_to(self._yield_to, self._clock, lambda: self._state == "running")

    async def _record(self, item: callback_store.Leased, outcome: callback_store.Outcome) -> None:
        _ = outcome.text  # its JSON, encoded here rather than on the database thread
        try:
            status = await self._db.write_many(callback_store.record, outcome)
        except Exception as exc:  # the lease expires and a later attempt repeats it
            log.error("recording the outcome of callback %s failed: %s", item.id, exc)
            status = ""
        if status:
            self._count(item, status, outcome)
        if status == "pending":  # due before the lease end the dispatcher may wait for
            self._doorbell.set()
        self._inflight.pop(item.id, None)
        if not self._room.is_set() and self._room_to_lease():
            self._room.set()

    def _count(self, item: callback_store.Leased, status: str,
               outcome: callback_store.Outcome) -> None:
        label = {"done": "done", "pending": "retried", "dead": "dead"}[status]
        self._m_outcomes.inc(type=item.type, outcome=label)
        if status == "done":
            self._m_lag.observe(max(0.0, outcome.at - item.created_at))

    def headers(self, item: callback_store.Leased, body: bytes, timestamp: int) -> dict[str, str]:
        return {"Content-Type": "application/json; charset=utf-8",
                "Wxd-Event-Id": item.id, "Wxd-Event-Type": item.type,
                SIGNATURE_HEADER: signature(self._secret, timestamp, body)}

    async def attempt(self, item: callback_store.Leased) -> callback_store.Outcome:
        """POST one leased callback; return its outcome (not yet recorded)."""
        body = item.body()
        headers = self.headers(item, body, int(self._clock.now()))
        started = time.perf_counter()
        try:
            # replay_safe: a resend after a stale kept-alive connection can only repeat a
            # callback, which the receiver deduplicates on the id.
            answer = await self._http.fetch("POST", self._url, headers=headers, body=body,
                                            connect_timeout_s=self._timeout_s,
                                            request_timeout_s=self._timeout_s, replay_safe=True)
        except FetchError as exc:
            self._m_post.observe(time.perf_counter() - started)
            return self._failed(item, CallbackError(exc.reason), None)
        self._m_post.observe(time.perf_counter() - started)
        excerpt = answer.body[:callback_store.ANSWER_EXCERPT_CHARS * 4].decode(
            "utf-8", "replace")[:callback_store.ANSWER_EXCERPT_CHARS]
        if 200 <= answer.code < 300:
            return callback_store.Outcome(item.id, item.attempts, "done", self._clock.now(),
                                          http_status=answer.code, answer=excerpt)
        return self._failed(item, CallbackError(f"HTTP {answer.code} {answer.reason}"[:100],
                                                answer.code), excerpt)

    def _failed(self, item: callback_store.Leased, exc: CallbackError,
                excerpt: str | None) -> callback_store.Outcome:
        now = self._clock.now()
        deadline = item.retry_since + self._max_age_s
        decision = decide(exc, item.attempts, now, self.policy)
        if isinstance(decision, Pause):  # not for a CallbackError; the policy's one answer
            due = decision.until
        elif isinstance(decision, Fail):
            due = deadline
        else:
            due = now + decision.delay_s
        if now >= deadline or isinstance(decision, Fail):
            log.warning("callback %s (%s) is dead after %d attempts: %s", item.id, item.type,
                        item.attempts, exc)
            return callback_store.Outcome(item.id, item.attempts, "dead", now,
                                          http_status=exc.status, error=str(exc),
                                          answer=excerpt)
        due = min(due, deadline)  # the last attempt falls on the deadline
        log.info("callback %s attempt %d failed (%s); retrying in %.1f s", item.id,
                 item.attempts, exc, due - now)
        return callback_store.Outcome(item.id, item.attempts, "pending", now, due=due,
                                      http_status=exc.status, error=str(exc), answer=excerpt)


class Callbacks:
    """The operator's view of the outbox (admin API, CLI, /v1/stats): list, show, retry.

    Works whether delivery is on or not (`enabled`); `on_retry` (the workers' ring) is called
    after an operator's retry is committed.
    """

    def __init__(self, db: Database, *, enabled: bool, clock: Clock = SYSTEM_CLOCK,
                 on_retry: Callable[[], None] | None = None) -> None:
        self._db = db
        self.enabled = enabled
        self._clock = clock
        self._on_retry = on_retry

    async def list(self, status: str | None, kind: str | None, limit: int = 50,
                   cursor: str | None = None) -> tuple[list[dict[str, Any]], str | None]:
        """Newest first. ValueError for an unknown status or type, a bad limit or cursor."""
        if status is not None and status not in callback_store.STATUSES:
            raise ValueError(f"status must be one of {', '.join(callback_store.STATUSES)}")
        if kind is not None and kind not in callback_store.TYPES:
            raise ValueError(f"type must be one of {', '.join(callback_store.TYPES)}")
        if not 1 <= limit <= 500:
            raise ValueError("limit must be within 1..500")
        return await self._db.read(
            lambda conn: callback_store.list_callbacks(conn, status, kind, limit, cursor))

    async def get(self, callback_id: str) -> dict[str, Any] | None:
        return await self._db.read(lambda conn: callback_store.get(conn, callback_id))

    async def retry(self, callback_id: str) -> tuple[str, dict[str, Any] | None]:
        """dead → pending now. Returns ("ok" | "not_found" | "invalid_state", the callback)."""
        now = self._clock.now()

        def revive(conn: sqlite3.Connection) -> tuple[str, dict[str, Any] | None]:
            outcome, _ = callback_store.operator_retry(conn, callback_id, now)
            return outcome, callback_store.get(conn, callback_id)

        outcome, found = await self._db.write(revive)
        if outcome == "ok":
            self._rang()
        return outcome, found

    async def retry_dead(self, since: float) -> int:
        """Every callback that went dead at or after `since` (unix s) → pending now."""
        now = self._clock.now()
        count = await self._db.write(lambda conn: callback_store.retry_dead(conn, since, now))
        if count:
            self._rang()
        return count

    def _rang(self) -> None:
        if self._on_retry is not None:
            self._on_retry()

    async def stats(self) -> dict[str, Any]:
        """For /v1/stats: enabled, by_status, oldest_pending_at."""
        counts, oldest = await self._db.read(
            lambda conn: (callback_store.counts(conn), callback_store.oldest_pending(conn)))
        return {"enabled": self.enabled, "by_status": counts, "oldest_pending_at": oldest}
