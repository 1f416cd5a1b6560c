"""Issue 16, items 1 and 5, against the emulator's fault switches: "WeChat unreachable for us"
(token refusals 40164 / 89503 / 40125, HTTP 500 on the token endpoint, 40164 answered by
template/send itself) is no verdict on the work: pushes go back to the queue with the attempt
refunded and all sending pauses (visible in stats and metrics, one loud log line), event jobs
wait without spending attempts, the backfill pauses; all resume by themselves once WeChat
answers again, without a restart. Daily quotas (45009 on user/info) wait for the reset, and
per-user frequency limits (43117) back off minutes, not seconds."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import tempfile
from collections.abc import Callable
from typing import Any

import tornado.web
from tornado.httpclient import AsyncHTTPClient
from tornado.testing import AsyncHTTPTestCase, AsyncTestCase, gen_test

from tests.helpers import (
    ADMIN_TOKEN,
    FakeTime,
    LogCapture,
    capture_logs,
    eventually,
    fetchone,
    sandbox_config_text,
)
from tests.push_case import PushCase
from tests.sandbox_fixture import FakeClock, WeChatStack
from tests.storage_faults import read_only
from wxd import config
from wxd.backfill import FollowerBackfill
from wxd.daemon import Daemon
from wxd.events import EventRouter, EventWorkers
from wxd.linking import Linking
from wxd.push_workers import PushWorkers
from wxd.retry import next_quota_reset
from wxd.sandbox import NOTICE_TEMPLATE_ID, FakeWeChat, SandboxServer, WebhookSender
from wxd.sandbox.faults import FaultRule
from wxd.store import ingest
from wxd.store import jobs as job_store
from wxd.store.identity import find_identity
from wxd.tokens import TokenManager
from wxd.webhook import Webhook, make_app
from wxd.wechat.crypto import MessageCrypto
from wxd.wechat.oa import OfficialAccountAPI

USER_INFO = "/cgi-bin/user/info"
WHITELIST_IP = "203.0.113.7"  # the address WeChat reports in 40164's errmsg
OUTAGE_S = 600.0  # every switch below recovers by itself after this long (emulator clock)
T0 = 1_700_000_000.0


class PushOutageTest(PushCase):
    """A push meets WeChat unreachable: queued again (attempt refunded), ALL sending paused
    (stats, metrics, one ERROR line naming errcode and IP), resumed without a restart."""

    def start_workers(self) -> PushWorkers:
        workers = self.make_workers()
        self.tokens.on_available(workers.reachable)  # as the daemon wires them
        return workers

    async def outage(self, switch: Callable[[], FaultRule], errcode: int | None,
                     ip: str | None = None, *, warm: bool = False) -> None:
        workers = self.start_workers()
        await workers.start()
        first, second = self.person(), self.person(skip=1)
        if warm:  # a token is held: the refusal comes from template/send itself
            done = await self.push(self.order(self.person(skip=2)))
            await self.until_status(done["id"], "sent")
        switch()
        began = self.clock()
        with capture_logs() as logs:
            push = await self.push(self.order(first))
            await eventually(lambda: workers.pause, "the pause")
            row = await self.until_status(push["id"], "queued")
            self.assertEqual(row["attempts"], 0, "WeChat unreachable must not use an attempt")
            self.assertIsNone(row["error_code"])
            expected: dict[str, Any] = {"reason": "unreachable", "errcode": errcode,
                                        "since": began}
            if ip is not None:
                expected["ip"] = ip
            stats = await self.service.stats()
            self.assertEqual(stats["paused"], expected)
            self.assertGreater(stats["paused_until"], began)  # the next probe
            await self.metrics.collect()
            self.assertIn('wxd_push_paused{reason="unreachable"} 1', self.metrics.render())
            self.assertIn('wxd_push_paused{reason="quota"} 0', self.metrics.render())
            # Nothing else is sent while paused; probes meet the refusal and change nothing.
            other = await self.push(self.order(second))
            for _ in range(3):
                self.clock.advance(20)
                workers.ring()
                await asyncio.sleep(0.05)
            self.assertEqual(self.fake.inbox(first.oa_openid), [])
            for push_id in (push["id"], other["id"]):  # (a probe may still be on its way)
                row = await self.until_status(push_id, "queued")
                self.assertEqual(row["attempts"], 0)
            self.assertEqual((await self.service.stats())["paused"], expected)  # same since
            # The switch expires by the emulator's clock; nobody restarts anything.
            self.clock.advance(OUTAGE_S)
            workers.ring()
            for push_id in (push["id"], other["id"]):
                sent = await self.until_status(push_id, "sent")
                self.assertEqual(sent["attempts"], 1)
        for person in (first, second):
            self.assertEqual(len(self.fake.inbox(person.oa_openid)), 1)
        loud = self.loud(logs)
        self.assertEqual(len(loud), 1, loud)  # once per pause, not per push or probe
        self.assertIn(f"errcode {errcode}" if errcode else "no answer", loud[0])
        if ip is not None:
            self.assertIn(ip, loud[0])
        self.assertIsNone(workers.pause)
        self.assertIsNone((await self.service.stats())["paused"])
        await self.metrics.collect()
        self.assertIn('wxd_push_paused{reason="unreachable"} 0', self.metrics.render())

    def loud(self, logs: LogCapture) -> list[str]:
        return logs.lines("wxd.push_workers", logging.ERROR)

    @gen_test(timeout=20)
    async def test_ip_whitelist_40164_names_the_ip(self) -> None:
        await self.outage(lambda: self.fake.refuse_tokens(
            40164, seconds=OUTAGE_S, ips=[WHITELIST_IP]), 40164, WHITELIST_IP)

    @gen_test(timeout=20)
    async def test_risky_ip_confirmation_89503(self) -> None:
        await self.outage(lambda: self.fake.refuse_tokens(89503, seconds=OUTAGE_S), 89503)

    @gen_test(timeout=20)
    async def test_wrong_secret_40125(self) -> None:
        await self.outage(lambda: self.fake.refuse_tokens(40125, seconds=OUTAGE_S), 40125)

    @gen_test(timeout=20)
    async def test_http_500_on_the_token_endpoint(self) -> None:
        await self.outage(lambda: self.fake.script_fault(
            "token", "http500", None, seconds=OUTAGE_S), None)

    @gen_test(timeout=20)
    async def test_40164_answered_by_template_send_itself(self) -> None:
        await self.outage(lambda: self.fake.refuse_tokens(
            40164, business=True, seconds=OUTAGE_S, ips=[WHITELIST_IP]), 40164, WHITELIST_IP,
            warm=True)

    @gen_test(timeout=20)
    async def test_a_successful_token_fetch_ends_the_pause_at_once(self) -> None:
        workers = self.start_workers()
        await workers.start()
        warm = await self.push(self.order(self.person(skip=2)))
        await self.until_status(warm["id"], "sent")
        self.fake.refuse_tokens(40164, business=True, ips=[WHITELIST_IP])  # until cleared
        push = await self.push(self.order(self.person()))
        await eventually(lambda: workers.pause, "the pause")
        assert workers.paused_until is not None and workers.paused_until > self.clock()
        self.fake.clear_faults()  # the operator fixed the whitelist
        current = self.tokens.current()
        assert current is not None
        await self.tokens.invalidate(current[0])  # any successful fetch tells the workers
        sent = await self.until_status(push["id"], "sent")  # no clock moved: before the probe
        self.assertEqual(sent["attempts"], 1)
        self.assertIsNone((await self.service.stats())["paused"])

    @gen_test(timeout=20)
    async def test_a_restart_during_the_outage_probes_at_once(self) -> None:
        workers = self.start_workers()
        await workers.start()
        self.fake.refuse_tokens(40164, ips=[WHITELIST_IP])  # until cleared
        push = await self.push(self.order(self.person()))
        await eventually(lambda: workers.pause, "the pause")
        await workers.stop()
        self.assertEqual((await self.service.stats())["paused"]["reason"], "unreachable")
        self.fake.clear_faults()
        self.clock.advance(5)  # past the token manager's backoff, before the push pause's end
        again = self.start_workers()
        await again.start()
        await self.until_status(push["id"], "sent")
        self.assertIsNone((await self.service.stats())["paused"])

    @gen_test(timeout=20)
    async def test_43117_backs_off_minutes_not_seconds(self) -> None:
        workers = self.start_workers()
        await workers.start()
        person = self.person()
        self.fake.throttle_openid(person.oa_openid, times=1)
        push = await self.push(self.order(person))
        await eventually(lambda: self.attempted(push["id"]), "the first attempt")
        row = await self.get_push(push["id"])
        self.assertEqual((row["attempts"], row["errcode"]), (1, 43117))
        self.assertGreaterEqual(row["next_attempt_at"] - self.clock(), 30.0)
        self.clock.advance(row["next_attempt_at"] - self.clock())
        workers.ring()
        await self.until_status(push["id"], "sent")

    async def attempted(self, push_id: str) -> bool:
        row = await self.service.get(push_id)
        return row is not None and row["attempts"] == 1 and row["status"] == "queued"


class EventOutageTest(FakeTime, AsyncHTTPTestCase):
    """Subscribe events met by WeChat unreachable, a spent user/info quota or 43117: the job
    waits (attempts unchanged where it is no failure of the job), then links the follower.
    The sandbox fires events at the webhook; real workers, Linking and TokenManager."""

    def get_app(self) -> tornado.web.Application:
        self.clock = FakeClock(T0)
        self.tmp = tempfile.TemporaryDirectory()
        self.fake = FakeWeChat(users=20, seed=3, clock=self.clock, follow_ratio=0.0)
        self.io_loop.run_sync(self._start)
        return make_app("/wechat", self.webhook)

    async def _start(self) -> None:
        self.stack = await WeChatStack(self.fake, os.path.join(self.tmp.name, "wxd.db"),
                                       clock=self.clock).start()
        creds = self.fake.credentials
        self.db = self.stack.db
        self.tokens = self.stack.tokens()
        linking = Linking(self.db, None, OfficialAccountAPI(self.stack.client, self.tokens),
                          mp_appid=None, clock=self.clock)
        self.workers = EventWorkers(self.db, EventRouter(self.db, linking, clock=self.clock),
                                    clock=self.clock)
        self.tokens.on_available(self.workers.reachable)  # as the daemon wires them
        await self.workers.start()
        crypto = MessageCrypto(creds.webhook_token, creds.encoding_aes_key, creds.oa_appid)
        self.webhook = Webhook(creds.webhook_token, crypto, self.db, clock=self.clock,
                               on_stored=self.workers.ring)

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

    def sender(self) -> WebhookSender:
        if not hasattr(self, "_sender"):
            self._sender = WebhookSender(self.get_url("/wechat"), self.fake.credentials, "safe",
                                         clock=self.clock, http_client=self.http_client)
        return self._sender

    async def job(self) -> dict[str, Any]:
        row = await fetchone(self.db, "SELECT * FROM jobs ORDER BY id DESC LIMIT 1")
        assert row is not None
        return dict(row)

    async def until_job(self, state: str) -> dict[str, Any]:
        """The latest job once it is in `state` after a failed attempt (its error kept)."""
        job: dict[str, Any] = await eventually(
            self.job, f"the job to be {state} after a failed attempt",
            until=lambda job: job["state"] == state and job["last_error"] is not None)
        return job

    async def linked(self, oa_openid: str) -> bool:
        identity = await self.db.read(lambda conn: find_identity(conn, oa_openid=oa_openid))
        return identity is not None and identity.unionid is not None

    async def subscribe(self, index: int) -> str:
        person = self.fake.person(index)
        self.fake.follow(person)
        delivery = await self.sender().subscribe(person.oa_openid)
        assert (delivery.status, delivery.body) == (200, b"success")
        return person.oa_openid

    @gen_test(timeout=20)
    async def test_subscribe_during_the_outage_is_linked_after_recovery(self) -> None:
        self.fake.refuse_tokens(40164, seconds=OUTAGE_S, ips=[WHITELIST_IP])
        with capture_logs() as logs:
            openids = [await self.subscribe(4), await self.subscribe(5)]
            for _ in range(500):
                jobs = await self.db.read(job_store.counts)
                rows = await self.db.read(lambda conn: conn.execute(
                    "SELECT attempts, last_error FROM jobs WHERE state = 'queued'").fetchall())
                if jobs["queued"] == 2 and all(r[1] for r in rows):
                    break
                await asyncio.sleep(0.01)
            assert [r[0] for r in rows] == [0, 0], "no attempt used while WeChat is unreachable"
            assert all("40164" in r[1] for r in rows)
            assert jobs["failed"] == 0
            for openid in openids:
                assert not await self.linked(openid)
            # Probes during the outage: still waiting, still no attempt used.
            self.now += 30
            await asyncio.sleep(0.1)
            assert (await self.db.read(job_store.counts))["failed"] == 0
            self.now += OUTAGE_S  # the switch expires by the emulator's clock
            assert await self.settled() == {"queued": 0, "leased": 0, "done": 2, "failed": 0}
        for openid in openids:
            assert await self.linked(openid)
        warnings = logs.lines("wxd.events")
        assert len(warnings) == 1 and "40164" in warnings[0] and WHITELIST_IP in warnings[0]
        rows = await self.db.read(lambda conn: conn.execute(
            "SELECT attempts FROM jobs").fetchall())
        assert [r[0] for r in rows] == [1, 1]

    @gen_test(timeout=20)
    async def test_45009_on_user_info_waits_for_the_daily_reset(self) -> None:
        self.fake.exhaust_daily_quota(USER_INFO)
        openid = await self.subscribe(6)
        job = await self.until_job("queued")
        resume = next_quota_reset(self.now, 5 * 60)  # [events] quota_resume_time 00:05
        assert (job["attempts"], job["not_before"]) == (0, resume)
        assert "45009" in job["last_error"] and not await self.linked(openid)
        self.now = resume - 60  # past Beijing midnight (the quota is back), before 00:05
        await asyncio.sleep(0.1)
        assert (await self.job())["state"] == "queued"
        self.now = resume + 1
        assert await self.settled() == {"queued": 0, "leased": 0, "done": 1, "failed": 0}
        assert await self.linked(openid)
        assert (await self.job())["attempts"] == 1

    @gen_test(timeout=20)
    async def test_43117_backs_off_minutes_not_seconds(self) -> None:
        rule = self.fake.frequency_limit(0, 3600, path=USER_INFO)
        openid = await self.subscribe(7)
        job = await self.until_job("queued")
        assert job["attempts"] == 1 and "43117" in job["last_error"]
        assert job["not_before"] - self.now >= 48.0  # 60 s, at most 20 % earlier
        self.fake.clear_faults(rule_id=rule.id)
        self.now = job["not_before"]
        assert await self.settled() == {"queued": 0, "leased": 0, "done": 1, "failed": 0}
        assert await self.linked(openid)


class BackfillOutageTest(AsyncTestCase):
    """The backfill meets WeChat unreachable: paused (with the reason), not failed; it
    resumes by itself and completes once a token fetch succeeds again. Sandbox over HTTP, a
    real TokenManager and SQLite file."""

    def setUp(self) -> None:
        super().setUp()
        self.tmp = tempfile.TemporaryDirectory()
        self.clock = FakeClock(autojump=True)  # rate-limit and backoff sleeps move it at once
        self.instances: list[FollowerBackfill] = []
        self.stack: WeChatStack | None = None

    def tearDown(self) -> None:
        async def close() -> None:
            for instance in self.instances:
                await instance.stop()
            if self.stack is not None:
                await self.stack.close()

        self.io_loop.run_sync(close)
        self.tmp.cleanup()
        super().tearDown()

    async def with_token_manager(self, followers: int) -> TokenManager:
        self.fake = FakeWeChat(users=followers, seed=3, clock=self.clock, follow_ratio=1.0)
        self.stack = await WeChatStack(self.fake, os.path.join(self.tmp.name, "wxd.db"),
                                       clock=self.clock).start()
        self.tokens = self.stack.tokens()
        self.api = OfficialAccountAPI(self.stack.client, self.tokens)
        return self.tokens

    def backfill(self) -> FollowerBackfill:
        assert self.stack is not None
        instance = FollowerBackfill(self.stack.db, self.api, clock=self.clock, rate_per_s=0)
        self.instances.append(instance)
        return instance

    async def run_to_end(self, instance: FollowerBackfill) -> dict[str, Any]:
        await instance.begin()
        return await instance.join()

    async def resumed(self, instance: FollowerBackfill) -> dict[str, Any]:
        await eventually(lambda: instance.running, "the backfill to resume")
        return await instance.join()

    async def stored(self) -> int:
        assert self.stack is not None
        row = await fetchone(self.stack.db,
                             "SELECT COUNT(*) FROM followers WHERE subscribed = 1"
                             " AND unionid IS NOT NULL")
        assert row is not None
        return int(row[0])

    @gen_test(timeout=30)
    async def test_pauses_with_the_reason_then_completes(self) -> None:
        tokens = await self.with_token_manager(1_500)
        self.fake.refuse_tokens(40164, seconds=OUTAGE_S, ips=[WHITELIST_IP])
        instance = self.backfill()
        tokens.on_available(instance.reachable)
        began = self.clock()
        status = await self.run_to_end(instance)
        assert status["state"] == "paused", status
        assert status["paused"] == {"reason": "unreachable", "errcode": 40164, "since": began,
                                    "ip": WHITELIST_IP}
        assert "40164" in status["last_error"] and status["followers_done"] == 0
        assert status["next_run_at"] == status["paused_until"] == tokens.retry_at
        started, again = await instance.begin_run()
        assert not started and again["state"] == "paused"
        restarted = self.backfill()  # the reason survives a restart (stored beside the row)
        await restarted.start()
        assert restarted.status()["paused"] == status["paused"]
        await restarted.stop()
        self.clock.set(began + OUTAGE_S + 1)  # the switch expired; the resume timer fires
        status = await self.resumed(instance)
        assert (status["state"], status["followers_done"], status["run"]) == ("done", 1_500, 1)
        assert status["paused"] is None and status["last_error"] is None
        assert await self.stored() == 1_500

    @gen_test(timeout=30)
    async def test_a_resume_that_meets_a_storage_fault_is_tried_again(self) -> None:
        """The resume timer fires while the database refuses writes (the disk filled after
        the outage began): the run stays paused, and resumes by itself once writes work."""
        tokens = await self.with_token_manager(300)
        self.fake.refuse_tokens(40164, business=True, seconds=OUTAGE_S)
        instance = self.backfill()
        tokens.on_available(instance.reachable)
        began = self.clock()
        assert (await self.run_to_end(instance))["state"] == "paused"
        assert self.stack is not None
        with capture_logs() as logs:
            async with read_only(self.stack.db):
                self.clock.set(began + OUTAGE_S + 1)  # the resume timer fires: its write fails
                await eventually(lambda: "could not resume" in logs.text, "the failed resume")
                assert instance.status()["state"] == "paused" and not instance.running
            assert "ended unexpectedly" not in logs.text
        self.clock.advance(instance.policy.backoff.cap_s)  # the retry's backoff
        status = await self.resumed(instance)
        assert (status["state"], status["followers_done"]) == ("done", 300)

    @gen_test(timeout=30)
    async def test_a_successful_token_fetch_resumes_it_at_once(self) -> None:
        tokens = await self.with_token_manager(300)
        self.fake.refuse_tokens(89503)  # until cleared: the admin confirms the IP
        instance = self.backfill()
        tokens.on_available(instance.reachable)
        status = await self.run_to_end(instance)
        assert status["paused"]["reason"] == "unreachable"
        assert status["paused"]["errcode"] == 89503
        self.fake.clear_faults()
        self.clock.advance(tokens.retry_at - self.clock())
        assert await tokens.refresh_if_due()  # the token manager's own probe succeeds
        status = await self.resumed(instance)
        assert (status["state"], status["followers_done"]) == ("done", 300)


class DaemonOutageTest(AsyncTestCase):
    """The whole daemon (real time, the sandbox over HTTP): a push, a follow and a backfill
    during a 40164 outage wait; /v1/stats, /v1/backfill and /metrics say why; once WeChat
    answers the token manager's probe again, everything completes without a restart."""

    @gen_test(timeout=60)
    async def test_everything_waits_then_completes_once_the_token_fetch_succeeds(self) -> None:
        fake = FakeWeChat(users=12, seed=21, follow_ratio=1.0)
        people = [p for p in fake.people if p.follows and p.unionid]
        fake.refuse_tokens(40164, ips=[WHITELIST_IP])  # until cleared: the operator's fix
        sandbox = SandboxServer(fake)
        await sandbox.start()
        tmp = tempfile.TemporaryDirectory()
        self.addCleanup(tmp.cleanup)
        http = AsyncHTTPClient(force_instance=True)
        self.addCleanup(http.close)
        cfg = config.load_text(sandbox_config_text(
            f"{tmp.name}/wxd.db", fake.credentials, sandbox.base_url, 0, 0, {
                "events": {"workers": 2},
                "wechat": {"token_check_interval_s": 1, "token_backoff_base_s": 0.2,
                           "token_backoff_max_s": 0.5}}))
        daemon = Daemon(cfg)
        await daemon.start()
        assert daemon.admin is not None and daemon.webhook is not None

        async def admin(method: str, path: str, body: Any = None) -> tuple[int, Any]:
            payload = json.dumps(body).encode() if body is not None else (
                b"" if method == "POST" else None)
            response = await http.fetch(
                f"http://127.0.0.1:{daemon.admin.port}{path}",  # type: ignore[union-attr]
                method=method, body=payload, raise_error=False,
                headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
            text = response.body.decode()
            return response.code, (json.loads(text) if path != "/metrics" else text)

        try:
            # The backend knows the recipient (an earlier sync); WeChat now refuses this server.
            await daemon.db.write(lambda conn: ingest.apply_user_infos(  # type: ignore[union-attr]
                conn, [{"subscribe": 1, "openid": people[0].oa_openid,
                        "unionid": people[0].unionid}], 0.0, 0.0))
            code, push = await admin("POST", "/v1/pushes", {
                "to": {"oa_openid": people[0].oa_openid}, "template_id": NOTICE_TEMPLATE_ID,
                "data": {"thing1": "您的预约已确认", "time2": "2024-01-01 09:30"}})
            assert code == 202, push
            sender = WebhookSender(f"http://127.0.0.1:{daemon.webhook.port}/wechat",
                                   fake.credentials, mode="safe", http_client=http, seed=5)
            assert (await sender.subscribe(people[1].oa_openid)).status == 200
            assert (await admin("POST", "/v1/backfill"))[0] == 202

            async def paused() -> bool:
                stats = (await admin("GET", "/v1/stats"))[1]
                backfill = (await admin("GET", "/v1/backfill"))[1]
                return stats["pushes"]["paused"] is not None and backfill["state"] == "paused"

            await eventually(paused, "the pause", timeout=10)
            stats = (await admin("GET", "/v1/stats"))[1]
            assert stats["pushes"]["paused"]["reason"] == "unreachable"
            assert stats["pushes"]["paused"]["errcode"] == 40164
            assert stats["pushes"]["paused"]["ip"] == WHITELIST_IP
            assert stats["pushes"]["by_status"]["failed"] == 0
            assert stats["event_jobs"]["failed"] == 0
            backfill = (await admin("GET", "/v1/backfill"))[1]
            assert backfill["paused"]["reason"] == "unreachable", backfill
            assert 'wxd_push_paused{reason="unreachable"} 1' in (await admin("GET", "/metrics"))[1]
            assert fake.inbox(people[0].oa_openid) == []

            fake.clear_faults()  # the IP is whitelisted now; the token manager's probe succeeds

            async def recovered() -> bool:
                stats = (await admin("GET", "/v1/stats"))[1]
                backfill = (await admin("GET", "/v1/backfill"))[1]
                user = (await admin("GET", f"/v1/users?oa_openid={people[1].oa_openid}"))[1]
                return (stats["pushes"]["by_status"]["sent"] == 1
                        and stats["pushes"]["paused"] is None
                        and stats["event_jobs"]["done"] == 1
                        and backfill["state"] == "done"
                        and user.get("unionid") == people[1].unionid)

            await eventually(recovered, "the recovery", timeout=10)
            assert len(fake.inbox(people[0].oa_openid)) == 1
            assert (await admin("GET", "/v1/backfill"))[1]["followers_done"] == len(
                [p for p in fake.people if p.follows])
            assert 'wxd_push_paused{reason="unreachable"} 0' in (await admin("GET", "/metrics"))[1]
        finally:
            await daemon.stop()
            await sandbox.stop()
