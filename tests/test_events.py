"""EventRouter and EventWorkers: unit tests on a real SQLite file with a refresh double, then the
whole path (sandbox → webhook → inbox → job → real Linking → user/info → follower) end to end."""

from __future__ import annotations

import asyncio
import os
import tempfile
from collections.abc import Awaitable, Callable
from typing import Any

from tornado.httpserver import HTTPServer
from tornado.testing import AsyncHTTPTestCase, AsyncTestCase, bind_unused_port, gen_test

from tests.helpers import FakeClock, FakeTime, eventually, fetchall, fetchone, store_message
from tests.sandbox_fixture import WeChatStack
from wxd.errors import TokenBudgetError, TransportError, WeChatAPIError
from wxd.events import EventRouter, EventWorkers
from wxd.linking import Linking
from wxd.metrics import Registry
from wxd.pacing import IDLE_MAX_S, LEASE_S
from wxd.retry import Fail, Pause, Retry, decide, next_quota_reset
from wxd.sandbox import FakeWeChat, SignedRequest, WebhookSender
from wxd.store import ingest
from wxd.store import jobs as job_store
from wxd.store import pushes as push_store
from wxd.store.db import Database
from wxd.store.identity import find_identity
from wxd.webhook import Webhook, make_app
from wxd.wechat.crypto import MessageCrypto
from wxd.wechat.messages import Message, parse_message
from wxd.wechat.oa import OfficialAccountAPI

T0 = 1_700_000_000.0


def event(openid: str, name: str, create_time: int = int(T0), **extra: str) -> Message:
    return parse_message({"ToUserName": "gh_0123456789ab", "FromUserName": openid,
                          "CreateTime": str(create_time), "MsgType": "event", "Event": name,
                          **extra})


class FakeRefresher:
    """Test double of Linking.refresh_follower: stores a user/info answer, or raises."""

    def __init__(self, db: Database, clock: Any) -> None:
        self.db = db
        self.clock = clock
        self.calls: list[str] = []
        self.errors: list[BaseException] = []
        self.gate: asyncio.Event | None = None
        self.after: Callable[[], Awaitable[None]] | None = None  # once, after the write

    async def refresh_follower(self, oa_openid: str) -> None:
        self.calls.append(oa_openid)
        if self.gate is not None:
            await self.gate.wait()
        if self.errors:
            raise self.errors.pop(0)
        info = {"subscribe": 1, "openid": oa_openid, "unionid": f"u-{oa_openid}",
                "subscribe_time": int(T0)}
        now = self.clock()
        await self.db.write(lambda conn: ingest.apply_user_infos(conn, [info], now, now))
        after, self.after = self.after, None
        if after is not None:
            await after()


class EventsCase(FakeTime, AsyncTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.tmp = tempfile.TemporaryDirectory()
        self.clock = FakeClock(T0)
        self.metrics = Registry()
        self.db = self.io_loop.run_sync(
            lambda: Database.open(os.path.join(self.tmp.name, "wxd.db")))
        self.refresher = FakeRefresher(self.db, self.clock)
        self.router = EventRouter(self.db, self.refresher, clock=self.clock,
                                  metrics=self.metrics)
        self.workers = EventWorkers(self.db, self.router, workers=2, max_attempts=3,
                                    clock=self.clock, metrics=self.metrics)

    def tearDown(self) -> None:
        self.io_loop.run_sync(self.workers.stop)
        self.io_loop.run_sync(self.db.close)
        super().tearDown()
        self.tmp.cleanup()

    async def follower(self, openid: str) -> dict[str, Any] | None:
        row = await fetchone(self.db, "SELECT * FROM followers WHERE oa_openid = ?", (openid,))
        return dict(row) if row is not None else None

    async def store(self, msg: Message) -> bool:
        stored: bool = await self.db.write(lambda conn: store_message(conn, msg, self.now))
        return stored

    async def jobs(self) -> dict[str, int]:
        counts: dict[str, int] = await self.db.read(job_store.counts)
        return counts


class RouterTest(EventsCase):
    @gen_test
    async def test_subscribe_records_scene_then_refreshes(self) -> None:
        msg = event("oA", "subscribe", EventKey="qrscene_bind_ab12", Ticket="gQ1")
        assert await self.router.handle(msg) == "subscribe"
        row = await self.follower("oA")
        assert row is not None
        assert (row["subscribed"], row["subscribed_at"], row["qr_scene_str"], row["event_key"],
                row["ticket"], row["unionid"]) == (1, T0, "bind_ab12", "qrscene_bind_ab12",
                                                   "gQ1", "u-oA")
        assert self.refresher.calls == ["oA"]
        plain = event("oB", "subscribe", EventKey="")
        await self.router.handle(plain)
        row = await self.follower("oB")
        assert row is not None and row["event_key"] is None and row["qr_scene"] is None

    @gen_test
    async def test_unsubscribe_keeps_unionid_and_purges_when_asked(self) -> None:
        await self.router.handle(event("oA", "subscribe", EventKey="qrscene_5", Ticket="t"))
        await self.router.handle(event("oA", "unsubscribe", create_time=int(T0) + 10))
        row = await self.follower("oA")
        assert row is not None
        assert (row["subscribed"], row["unsubscribed_at"], row["unionid"], row["qr_scene"]) == \
            (0, T0 + 10, "u-oA", 5)
        purging = EventRouter(self.db, self.refresher, purge_on_unsubscribe=True,
                              clock=self.clock)
        await self.router.handle(event("oB", "subscribe", EventKey="qrscene_6", Ticket="t"))
        await purging.handle(event("oB", "unsubscribe", create_time=int(T0) + 10))
        row = await self.follower("oB")
        assert row is not None
        assert (row["subscribed"], row["unionid"], row["qr_scene"], row["ticket"]) == \
            (0, "u-oB", None, None)
        assert self.refresher.calls == ["oA", "oB"]  # unsubscribe asks WeChat nothing

    @gen_test
    async def test_scan_keeps_event_key_for_known_and_unknown_followers(self) -> None:
        await self.router.handle(event("oA", "subscribe"))
        assert await self.router.handle(
            event("oA", "SCAN", create_time=int(T0) + 5, EventKey="bind_cd34", Ticket="gQ2")
        ) == "scan"
        row = await self.follower("oA")
        assert row is not None
        assert (row["event_key"], row["ticket"], row["subscribed"]) == ("bind_cd34", "gQ2", 1)
        assert self.refresher.calls == ["oA"]
        await self.router.handle(event("oNew", "SCAN", EventKey="42", Ticket="gQ3"))
        row = await self.follower("oNew")
        assert row is not None
        assert (row["event_key"], row["unionid"], row["subscribed"]) == ("42", "u-oNew", 1)
        assert self.refresher.calls == ["oA", "oNew"]

    @gen_test
    async def test_template_report_matches_a_push_or_is_kept(self) -> None:
        report = event("oA", "TEMPLATESENDJOBFINISH", MsgID="3487542469355618313",
                       Status="failed: system failed")
        assert await self.router.handle(report) == "delivery_stored"
        row = await fetchone(self.db, "SELECT msgid, status, oa_openid FROM delivery_reports")
        assert row is not None
        assert tuple(row) == ("3487542469355618313", "failed: system failed", "oA")

        def sent_push(conn: Any) -> str:
            push = push_store.NewPush(push_store.new_push_id(), None, {"oa_openid": "oB"}, "oB",
                                     "tpl", {"touser": "oB", "template_id": "tpl", "data": {}})
            push_store.insert(conn, push, T0)
            push_store.lease(conn, T0, 1, 60)
            push_store.mark_sent(conn, push.id, "777", T0)
            return push.id

        push_id = await self.db.write(sent_push)
        delivered = event("oB", "TEMPLATESENDJOBFINISH", MsgID="777", Status="success")
        assert await self.router.handle(delivered) == "delivery_matched"
        push = await self.db.read(lambda conn: push_store.get(conn, push_id))
        assert push is not None and push["status"] == "delivered"
        transitions = self.metrics.counter("wxd_pushes_total", "", ("status",))
        assert transitions.get(status="delivered") == 1
        # WeChat's retry of the same report is matched again but moves nothing.
        assert await self.router.handle(delivered) == "delivery_matched"
        assert transitions.get(status="delivered") == 1

    @gen_test
    async def test_template_report_without_msgid_matches_by_recipient_and_time(self) -> None:
        def sent_push(openid: str, msgid: str, at: float) -> Any:
            def write(conn: Any) -> str:
                push = push_store.NewPush(push_store.new_push_id(), None, {"oa_openid": openid},
                                         openid, "tpl",
                                         {"touser": openid, "template_id": "tpl", "data": {}})
                push_store.insert(conn, push, at)
                push_store.lease(conn, at, 1, 60)
                push_store.mark_sent(conn, push.id, msgid, at + 1)
                return push.id
            return write

        async def status(push_id: str) -> str:
            push = await self.db.read(lambda conn: push_store.get(conn, push_id))
            assert push is not None
            return str(push["status"])

        one = await self.db.write(sent_push("oA", "801", T0 - 30))
        two = await self.db.write(sent_push("oB", "802", T0 - 30))
        zero = event("oA", "TEMPLATESENDJOBFINISH", MsgID="0", Status="success")
        missing = event("oB", "TEMPLATESENDJOBFINISH", Status="failed:user block")
        assert zero.dedupe_key == f"tsjf:oA:{int(T0)}" and missing.dedupe_key == f"tsjf:oB:{int(T0)}"
        assert await self.router.handle(zero) == "delivery_matched"
        assert await self.router.handle(missing) == "delivery_matched"
        assert (await status(one), await status(two)) == ("delivered", "failed")
        # Two candidates (ambiguous) or none within the hour (too old): nothing is guessed.
        three = await self.db.write(sent_push("oC", "803", T0 - 60))
        four = await self.db.write(sent_push("oC", "804", T0 - 20))
        assert await self.router.handle(
            event("oC", "TEMPLATESENDJOBFINISH", MsgID="0", Status="success")) == "delivery_unmatched"
        five = await self.db.write(sent_push("oD", "805", T0 - 7200))
        assert await self.router.handle(
            event("oD", "TEMPLATESENDJOBFINISH", Status="success")) == "delivery_unmatched"
        assert [await status(p) for p in (three, four, five)] == ["sent"] * 3
        transitions = self.metrics.counter("wxd_pushes_total", "", ("status",))
        assert (transitions.get(status="delivered"), transitions.get(status="failed")) == (1, 1)

    @gen_test
    async def test_anything_else_is_ignored(self) -> None:
        assert await self.router.handle(event("oA", "CLICK", EventKey="menu")) == "ignored"
        assert await self.follower("oA") is None
        assert self.refresher.calls == []


class WorkersTest(EventsCase):
    @gen_test
    async def test_jobs_run_once_and_finish(self) -> None:
        assert await self.store(event("oA", "subscribe"))
        assert not await self.store(event("oA", "subscribe"))  # WeChat's retry
        assert await self.workers.run_once() == 1
        assert await self.workers.run_once() == 0
        assert await self.jobs() == {"queued": 0, "leased": 0, "done": 1, "failed": 0}
        assert self.refresher.calls == ["oA"]

    @gen_test
    async def test_transient_errors_retry_with_backoff_then_fail(self) -> None:
        await self.store(event("oA", "subscribe"))
        self.refresher.errors = [TransportError("timeout", "/cgi-bin/user/info"),
                                 WeChatAPIError(-1, "system error", "/cgi-bin/user/info",
                                                kind="transient")]
        assert await self.workers.run_once() == 1
        row = await fetchone(self.db, "SELECT state, attempts, not_before, last_error FROM jobs")
        assert row is not None and row["state"] == "queued" and row["attempts"] == 1
        assert T0 + 1.5 <= row["not_before"] <= T0 + 2.5
        assert "TransportError" in row["last_error"]
        assert await self.workers.run_once() == 0  # not due yet
        self.now = row["not_before"]
        assert await self.workers.run_once() == 1
        row = await fetchone(self.db, "SELECT state, attempts, not_before FROM jobs")
        assert row is not None and (row["state"], row["attempts"]) == ("queued", 2)
        self.now = row["not_before"]
        assert await self.workers.run_once() == 1
        assert await self.jobs() == {"queued": 0, "leased": 0, "done": 1, "failed": 0}
        follower = await self.follower("oA")
        assert follower is not None and follower["unionid"] == "u-oA"
        # Exhausting max_attempts (3) fails the job with the last error kept.
        await self.store(event("oB", "subscribe"))
        self.refresher.errors = [TransportError("reset", "/x") for _ in range(3)]
        for _ in range(3):
            self.now += 10_000
            assert await self.workers.run_once() == 1
        row = await fetchone(self.db, "SELECT state, last_error FROM jobs WHERE state = 'failed'")
        assert row is not None and "reset" in row["last_error"]
        counter = self.metrics.counter("wxd_events_jobs_total", "", ("outcome",))
        assert (counter.get(outcome="retried"), counter.get(outcome="failed")) == (4, 1)

    @gen_test
    async def test_terminal_error_fails_at_once_unexpected_error_retries(self) -> None:
        await self.store(event("oA", "subscribe"))
        self.refresher.errors = [WeChatAPIError(40003, "invalid openid", "/cgi-bin/user/info")]
        await self.workers.run_once()
        assert (await self.jobs())["failed"] == 1
        await self.store(event("oB", "subscribe"))
        self.refresher.errors = [RuntimeError("bug")]
        await self.workers.run_once()
        assert (await self.jobs())["queued"] == 1

    def test_classification_and_backoff(self) -> None:
        policy = EventWorkers(self.db, self.router, max_attempts=50).policy

        def delay(exc: Exception, attempts: int = 1) -> float:
            decision = decide(exc, attempts, T0, policy)
            assert isinstance(decision, Retry), decision
            return decision.delay_s

        assert 1.6 <= delay(TransportError("x", "/p")) <= 2.4
        # 45009 waits for the daily reset ([events] quota_resume_time, 00:05 Beijing), not seconds.
        assert decide(WeChatAPIError(45009, "quota", "/p", kind="quota"), 3, T0, policy) == \
            Pause(next_quota_reset(T0, 300), "quota", 45009)
        assert 48 <= delay(WeChatAPIError(43117, "too frequently", "/p")) <= 60  # minutes
        assert delay(WeChatAPIError(-1, "busy", "/p"), 40) <= 600 * 1.2
        assert decide(WeChatAPIError(40003, "openid", "/p"), 1, T0, policy) == Fail("terminal")
        assert isinstance(decide(TokenBudgetError("spent"), 1, T0, policy), Pause)

    @gen_test
    async def test_doorbell_wakes_workers_and_stop_drains(self) -> None:
        await self.workers.start()
        await self.workers.start()  # idempotent
        # Nothing to do: the idle waits back off (fake time) until both wait IDLE_MAX_S.
        def backed_off(pending: list[float]) -> bool:
            return len(pending) == 2 and all(at == self.now + IDLE_MAX_S for at in pending)

        def idle_waits() -> list[float]:
            pending = self.clock.pending()
            if pending and not backed_off(pending):
                self.clock.set(pending[0])  # the earliest idle wait ends
            return pending

        await eventually(idle_waits, "both idle waits at IDLE_MAX_S", until=backed_off)
        await self.store(event("oA", "subscribe"))
        self.workers.ring()  # wakes them at once: no time passes
        await eventually(self.jobs, "the job done", until=lambda jobs: jobs["done"] == 1)
        # A job in flight at stop() is allowed to finish within the bound.
        gate = self.refresher.gate = asyncio.Event()
        await self.store(event("oB", "subscribe"))
        self.workers.ring()
        await eventually(lambda: self.refresher.calls, "the second job in flight",
                         until=lambda calls: calls == ["oA", "oB"])
        stopping = asyncio.ensure_future(self.workers.stop())  # drain_timeout_s: 5 s
        await eventually(lambda: self.workers.state, "stop() draining",
                         until=lambda state: state == "stopping")
        gate.set()
        await stopping
        assert await self.jobs() == {"queued": 0, "leased": 0, "done": 2, "failed": 0}
        assert self.workers.state == "stopped"

    @gen_test
    async def test_stop_bound_cancels_and_start_recovers(self) -> None:
        self.refresher.gate = asyncio.Event()  # never set: the job hangs
        await self.store(event("oA", "subscribe"))
        await self.workers.start()
        await eventually(lambda: self.refresher.calls, "the job in flight")
        self.workers.drain_timeout_s = 0.05
        await self.workers.stop()
        assert (await self.jobs())["leased"] == 1
        self.refresher.gate = None
        again = EventWorkers(self.db, self.router, clock=self.clock)
        await again.start()  # requeues the orphaned lease, due at once
        try:
            await eventually(self.jobs, "the requeued job done",
                             until=lambda jobs: jobs["done"] == 1)
        finally:
            await again.stop()
        assert await self.jobs() == {"queued": 0, "leased": 0, "done": 1, "failed": 0}

    @gen_test
    async def test_metrics_collector_reports_queue_depth(self) -> None:
        await self.store(event("oA", "subscribe"))
        await self.metrics.collect()
        assert 'wxd_events_jobs{state="queued"} 1' in self.metrics.render()


class LeaseExpiryTest(EventsCase):
    """The follow was applied but recording the job's outcome failed (the disk filled up,
    another process held the database): the job stays leased and runs again once its lease
    has passed, in the same process, without a restart."""

    async def fault_until_turned_off(self) -> None:
        await self.db.read(lambda conn: conn.execute("PRAGMA query_only = ON"))

    async def writable(self) -> None:
        await self.db.read(lambda conn: conn.execute("PRAGMA query_only = OFF"))

    @gen_test
    async def test_a_job_whose_outcome_write_failed_runs_again_after_its_lease(self) -> None:
        await self.store(event("oA", "subscribe"))
        self.refresher.after = self.fault_until_turned_off
        assert await self.workers.run_once() == 1  # no exception escapes: the outcome is lost
        await self.writable()
        assert await self.jobs() == {"queued": 0, "leased": 1, "done": 0, "failed": 0}
        assert self.db.write_error is not None
        assert await self.workers.run_once() == 0  # its lease still runs
        assert await self.db.read(job_store.next_wake) == T0 + LEASE_S
        self.now = T0 + LEASE_S
        assert await self.workers.run_once() == 1
        assert await self.jobs() == {"queued": 0, "leased": 0, "done": 1, "failed": 0}
        assert self.refresher.calls == ["oA", "oA"]  # the follow is applied again (idempotent)
        assert self.db.write_error is None

    @gen_test(timeout=20)
    async def test_running_workers_take_it_again_without_a_restart(self) -> None:
        self.refresher.after = self.fault_until_turned_off
        await self.workers.start()
        await self.store(event("oA", "subscribe"))
        self.workers.ring()
        await eventually(lambda: self.refresher.calls and self.db.write_error is not None,
                         "the follow applied and its outcome write failed", timeout=10)
        await self.writable()
        # The workers keep polling (fake time up to just before the lease ends): nothing is due.
        self.now = T0 + LEASE_S - 1
        await eventually(self.clock.pending, "both workers back in their idle wait",
                         until=lambda pending: len(pending) == 2)
        assert (await self.jobs())["leased"] == 1 and self.refresher.calls == ["oA"]
        self.now = T0 + LEASE_S + 1
        await eventually(self.jobs, "the job done again", until=lambda jobs: jobs["done"] == 1,
                         timeout=10)
        assert await self.jobs() == {"queued": 0, "leased": 0, "done": 1, "failed": 0}
        assert self.refresher.calls == ["oA", "oA"]
        row = await self.follower("oA")
        assert row is not None and row["unionid"] == "u-oA"


class EndToEndTest(FakeTime, AsyncHTTPTestCase):
    """Sandbox fires events at the webhook; real workers, Linking, TokenManager, sandbox API."""

    def get_app(self) -> Any:
        self.clock = FakeClock(T0)
        self.tmp = tempfile.TemporaryDirectory()
        self.path = os.path.join(self.tmp.name, "wxd.db")
        self.fake = FakeWeChat(users=20, seed=3, clock=self.clock, follow_ratio=0.0)
        self.io_loop.run_sync(self._start)
        return make_app("/wechat", self.webhook)

    async def _start(self) -> None:
        self.stack = await WeChatStack(self.fake, self.path, clock=self.clock).start()
        await self._open()

    async def _open(self) -> None:
        creds = self.fake.credentials
        self.db = self.stack.db
        self.tokens = self.stack.tokens()
        self.linking = Linking(self.db, None, OfficialAccountAPI(self.stack.client, self.tokens),
                               mp_appid=None, clock=self.clock)
        router = EventRouter(self.db, self.linking, clock=self.clock)
        self.workers = EventWorkers(self.db, router, clock=self.clock)
        await self.workers.start()
        crypto = MessageCrypto(creds.webhook_token, creds.encoding_aes_key, creds.oa_appid)
        self.webhook = Webhook(creds.webhook_token, crypto, self.db, clock=self.clock,
                               on_stored=self.workers.ring)

    async def restart(self) -> None:
        """Everything closed and rebuilt on the same database file (the sandbox stays)."""
        await self.workers.stop()
        await self.stack.stop_tokens()
        await self.stack.reopen_db()
        await self._open()

    async def _stop(self) -> None:
        await self.workers.stop()
        await self.stack.close()

    def tearDown(self) -> None:
        self.io_loop.run_sync(self._stop)
        super().tearDown()
        self.tmp.cleanup()

    async def settled(self) -> dict[str, int]:
        counts: dict[str, int] = await eventually(
            lambda: self.db.read(job_store.counts), "the jobs to settle",
            until=lambda counts: counts["queued"] == counts["leased"] == 0)
        return counts

    @gen_test
    async def test_subscribe_to_linked_follower_once_across_retries_and_restart(self) -> None:
        person = self.fake.person(4)
        self.fake.follow(person, scene="ADD_SCENE_QR_CODE", qr_scene_str="bind_ab12")
        sender = WebhookSender(self.get_url("/wechat"), self.fake.credentials, "safe",
                               clock=self.clock, http_client=self.http_client)
        request = sender.build(sender.subscribe_fields(person.oa_openid, scene="bind_ab12"))
        for _ in range(2):  # WeChat's retry: same URL, same body
            delivery = await sender.send(request)
            assert (delivery.status, delivery.body) == (200, b"success")
        assert await self.settled() == {"queued": 0, "leased": 0, "done": 1, "failed": 0}
        identity = await self.db.read(
            lambda conn: find_identity(conn, oa_openid=person.oa_openid))
        assert identity is not None
        assert (identity.unionid, identity.subscribed, identity.qr_scene_str) == \
            (person.unionid, True, "bind_ab12")
        assert self.fake.count_calls("/cgi-bin/user/info") == 1
        # Restart: everything closed and rebuilt on the same file; the resend is a no-op.
        await self.restart()
        server_socket, port = bind_unused_port()
        server = HTTPServer(make_app("/wechat", self.webhook))
        server.add_sockets([server_socket])
        try:
            url = f"http://127.0.0.1:{port}/wechat"
            delivery = await sender.send(SignedRequest(
                url + request.url[request.url.index("?"):], request.query, request.body,
                request.xml))
        finally:
            server.stop()
        assert (delivery.status, delivery.body) == (200, b"success")
        assert await self.settled() == {"queued": 0, "leased": 0, "done": 1, "failed": 0}
        assert self.fake.count_calls("/cgi-bin/user/info") == 1
        assert self.webhook.requests.get(result="duplicate") == 1

    @gen_test
    async def test_unsubscribe_and_template_report_through_the_webhook(self) -> None:
        person = self.fake.person(2)
        self.fake.follow(person)
        sender = WebhookSender(self.get_url("/wechat"), self.fake.credentials, "compat",
                               clock=self.clock, http_client=self.http_client, seed=1)
        assert (await sender.subscribe(person.oa_openid)).body == b"success"
        await self.settled()
        self.now += 60
        self.fake.unfollow(person)
        assert (await sender.unsubscribe(person.oa_openid)).body == b"success"
        assert (await sender.template_finished(person.oa_openid, 99, "failed:user block")
                ).body == b"success"
        assert await self.settled() == {"queued": 0, "leased": 0, "done": 3, "failed": 0}
        identity = await self.db.read(
            lambda conn: find_identity(conn, oa_openid=person.oa_openid))
        assert identity is not None
        assert (identity.subscribed, identity.unsubscribed_at, identity.unionid) == \
            (False, T0 + 60, person.unionid)
        report = await fetchone(self.db, "SELECT status FROM delivery_reports WHERE msgid = '99'")
        assert report is not None and report[0] == "failed:user block"

    @gen_test
    async def test_reports_without_msgid_and_colliding_msgids_through_the_webhook(self) -> None:
        """MsgID 0 / no MsgID reports are matched to the one push sent to that openid; a MsgId
        reused by another user is a second message, a repeat from the same user a retry."""
        first, second = self.fake.person(2), self.fake.person(3)

        def sent(openid: str, msgid: str, at: float) -> Any:
            def write(conn: Any) -> str:
                push = push_store.NewPush(push_store.new_push_id(), None, {"oa_openid": openid},
                                         openid, "tpl",
                                         {"touser": openid, "template_id": "tpl", "data": {}})
                push_store.insert(conn, push, at)
                push_store.lease(conn, at, 1, 60)
                push_store.mark_sent(conn, push.id, msgid, at + 1)
                return push.id
            return write

        one = await self.db.write(sent(first.oa_openid, "901", self.now - 30))
        two = await self.db.write(sent(second.oa_openid, "902", self.now - 30))
        sender = WebhookSender(self.get_url("/wechat"), self.fake.credentials, "safe",
                               clock=self.clock, http_client=self.http_client, seed=2)
        assert (await sender.template_finished(first.oa_openid, 0, "success")).body == b"success"
        assert (await sender.template_finished(second.oa_openid, None, "failed:user block")
                ).body == b"success"
        assert (await sender.text(first.oa_openid, "hi")).body == b"success"
        collision = sender.build(sender.text_fields(second.oa_openid, "hello",
                                                    msg_id=sender.last_msg_id))
        assert (await sender.send(collision)).body == b"success"
        assert (await sender.send(collision)).body == b"success"  # WeChat's retry
        await self.settled()
        rows = [await fetchone(self.db, "SELECT status FROM pushes WHERE id = ?", (push_id,))
                for push_id in (one, two)]
        assert [row[0] if row else None for row in rows] == ["delivered", "failed"]
        texts = await fetchall(self.db, "SELECT from_user FROM inbox WHERE msg_type = 'text'")
        assert sorted(r[0] for r in texts) == sorted([first.oa_openid, second.oa_openid])
        assert self.webhook.requests.get(result="duplicate") == 1

    @gen_test
    async def test_a_push_sent_without_a_known_msgid_takes_its_report(self) -> None:
        """A resend answered as a duplicate without the first msgid (push `sent`, msgid null):
        the accepted first send's report is matched by recipient and time, whether it came
        while the push waited for its resend or after the duplicate answer."""
        early, late = self.fake.person(4), self.fake.person(5)
        at = self.now - 30

        def timed_out(openid: str) -> Any:  # the first POST accepted, its answer lost
            def write(conn: Any) -> str:
                push = push_store.NewPush(push_store.new_push_id(), None, {"oa_openid": openid},
                                         openid, "tpl",
                                         {"touser": openid, "template_id": "tpl", "data": {}})
                push_store.insert(conn, push, at)
                push_store.lease(conn, at, 1, 60)
                push_store.mark_retry(conn, push.id, at, at + 2, None, "transport_error",
                                      "request timed out")
                return push.id
            return write

        one = await self.db.write(timed_out(early.oa_openid))
        two = await self.db.write(timed_out(late.oa_openid))
        sender = WebhookSender(self.get_url("/wechat"), self.fake.credentials, "safe",
                               clock=self.clock, http_client=self.http_client, seed=4)
        assert (await sender.template_finished(early.oa_openid, 911, "success")).body == \
            b"success"
        await self.settled()

        def duplicate_answers(conn: Any) -> list[str]:
            assert {item.resend for item in push_store.lease(conn, at + 2, 2, 60)} == {True}
            return [push_store.mark_sent(conn, push_id, None, at + 3,
                                         {"errcode": 45065, "errmsg": "clientmsgid exist"})
                    for push_id in (one, two)]

        assert await self.db.write(duplicate_answers) == ["delivered", "sent"]
        assert (await sender.template_finished(late.oa_openid, 912, "failed:user block")
                ).body == b"success"
        await self.settled()
        rows = [await fetchone(self.db, "SELECT status, msgid FROM pushes WHERE id = ?", (p,))
                for p in (one, two)]
        assert [tuple(row) if row else None for row in rows] == [
            ("delivered", "911"), ("failed", "912")]
        assert await fetchone(self.db, "SELECT * FROM delivery_reports") is None


class PruneTest(EventsCase):
    @gen_test
    async def test_prune_runs_hourly_and_keeps_recent_and_pending(self) -> None:
        await self.store(event("oOld", "subscribe"))
        await self.workers.run_once()
        await self.store(event("oPending", "subscribe"))
        self.now = T0 + 31 * 86400
        await self.store(event("oNew", "subscribe"))
        assert await self.workers.prune_if_due() == (1, 1)  # the old done job and its row
        rows = await fetchall(self.db, "SELECT from_user FROM inbox ORDER BY id")
        assert [r[0] for r in rows] == ["oPending", "oNew"]
        self.now += 60
        assert await self.workers.prune_if_due() == (0, 0)  # not due again within the hour
        assert await self.jobs() == {"queued": 2, "leased": 0, "done": 0, "failed": 0}
