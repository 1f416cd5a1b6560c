"""PushWorkers against the sandbox over real HTTP: the body WeChat receives, every error class,
the quota pause, delivery reports in both orders, graceful stop and crash recovery."""

from __future__ import annotations

import asyncio
import datetime
import random
from typing import Any

from tornado.testing import gen_test

from tests.helpers import eventually, fetchall, fetchone
from tests.push_case import NOTICE_DATA, SEND_PATH, TEMPLATES_PATH, PushCase, sends
from tests.storage_faults import read_only
from wxd.errors import WeChatAPIError
from wxd.pacing import LEASE_S
from wxd.push_workers import PushWorkers
from wxd.retry import BEIJING, Retry, decide
from wxd.retry import next_quota_reset as next_resume
from wxd.sandbox import NOTICE_TEMPLATE_ID, ORDER_TEMPLATE_ID, Person
from wxd.store import pushes as push_store


class DeliveryTest(PushCase):
    @gen_test
    async def test_body_wechat_receives(self) -> None:
        person = self.person(used_mp=True)
        workers = self.make_workers()
        await workers.start()
        push = await self.push({"to": {"mp_openid": person.mp_openid},
                                "template_id": NOTICE_TEMPLATE_ID,
                                "data": {k: {"value": v} for k, v in NOTICE_DATA.items()},
                                "url": "https://example.com/o/1",
                                "miniprogram": {"pagepath": "pages/order?id=1"}})
        done = await self.until_status(push["id"], "sent")
        self.assertEqual(done["attempts"], 1)
        [call] = sends(self)
        body = call.body
        self.assertEqual(body["touser"], person.oa_openid)
        self.assertEqual(body["client_msg_id"], push["id"])
        self.assertEqual(body["miniprogram"], {"appid": self.creds.mp_appid,
                                               "pagepath": "pages/order?id=1"})
        self.assertNotIn("miniprogram", body["data"])
        self.assertEqual(body["data"], {k: {"value": v} for k, v in NOTICE_DATA.items()})
        [message] = self.fake.inbox(person.oa_openid)
        self.assertEqual(str(message["msgid"]), done["msgid"])
        self.assertEqual(message["client_msg_id"], push["id"])
        counter = self.metrics.counter("wxd_pushes_total", "", ("status",))

        async def counted() -> bool:  # counted when the background write's callback runs
            return counter.get(status="sent") == 1

        await eventually(counted, "the sent transition metric")
        self.assertEqual(counter.get(status="sending"), 1)
        await self.metrics.collect()
        self.assertIn("wxd_push_queue_depth 0", self.metrics.render())
        self.assertIn("wxd_push_send_seconds_count 1", self.metrics.render())

    @gen_test
    async def test_many_pushes_each_delivered_once(self) -> None:
        people = [self.person(skip=i) for i in range(5)]
        workers = self.make_workers(workers=3)
        await workers.start()
        status, answer = await self.call("POST", "/v1/pushes/batch", {"pushes": [
            {"to": {"unionid": p.unionid}, "template_id": NOTICE_TEMPLATE_ID,
             "data": NOTICE_DATA} for p in people for _ in range(4)]})
        self.assertEqual(status, 202)
        for result in answer["results"]:
            await self.until_status(result["id"], "sent")
        self.assertEqual(len(sends(self)), 20)
        for person in people:
            self.assertEqual(len(self.fake.inbox(person.oa_openid)), 4)


class KeepAliveResendTest(PushCase):
    """transport.py resends a send reset on a reused connection: same client_msg_id, one
    attempt, one message (WeChat's dedupe would absorb a send that had been processed)."""

    @gen_test
    async def test_reset_on_a_reused_connection_is_resent_within_one_attempt(self) -> None:
        workers = self.make_workers()
        await workers.start()
        first = await self.push(self.order(self.person()))
        await self.until_status(first["id"], "sent")  # leaves an idle connection
        self.fake.script_fault(SEND_PATH, "reset")
        push = await self.push(self.order(self.person(skip=1)))
        done = await self.until_status(push["id"], "sent")
        self.assertEqual(done["attempts"], 1)
        self.assertEqual([c.body["client_msg_id"] for c in sends(self)][1:], [push["id"]] * 2)
        self.assertEqual(len(self.fake.inbox(self.person(skip=1).oa_openid)), 1)
        self.assertEqual(self.upstream.stats.retried_stale, 1)

class ErrorClassTest(PushCase):
    request_timeout_s = 0.5
    keep_alive = False  # every fault reaches the worker's own error handling

    async def failing_once(self, fault: str) -> dict[str, Any]:
        """One push whose first send answers `fault`; returns the row after that attempt."""
        workers = self.make_workers()
        await workers.start()
        self.fake.script_fault(SEND_PATH, fault)
        push = await self.push(self.order(self.person()))
        await eventually(lambda: self._attempted(push["id"]), "the first attempt")
        row = await self.until_status(push["id"], "queued")
        self.assertEqual(row["attempts"], 1)
        self.assertGreater(row["next_attempt_at"], self.clock())
        self.assertEqual(self.fake.inbox(self.person().oa_openid), [])
        # Time passes; the retry succeeds with the same client_msg_id.
        self.clock.advance(row["next_attempt_at"] - self.clock())
        workers.ring()
        done = await self.until_status(push["id"], "sent")
        self.assertEqual(done["attempts"], 2)
        self.assertEqual([c.body["client_msg_id"] for c in sends(self)], [push["id"]] * 2)
        self.assertEqual(len(self.fake.inbox(self.person().oa_openid)), 1)
        return row

    async def _attempted(self, push_id: str) -> bool:
        row = await self.db.read(lambda c: push_store.get(c, push_id))
        return row is not None and row["attempts"] >= 1 and row["status"] == "queued"

    @gen_test
    async def test_system_error_then_success(self) -> None:
        row = await self.failing_once("-1")
        self.assertEqual((row["errcode"], row["error_code"]), (-1, "wechat_error"))

    @gen_test
    async def test_minute_quota_waits_a_minute(self) -> None:
        row = await self.failing_once("45011")
        self.assertEqual(row["errcode"], 45011)
        # Not before the next wall-clock minute ("retry next minute").
        self.assertGreaterEqual(row["next_attempt_at"], (row["last_attempt_at"] // 60 + 1) * 60)

    @gen_test
    async def test_http_500(self) -> None:
        row = await self.failing_once("http500")
        self.assertEqual((row["errcode"], row["error_code"]), (None, "transport_error"))
        self.assertIn("500", row["error"])

    @gen_test(timeout=10)
    async def test_hang_times_out(self) -> None:
        row = await self.failing_once("hang")
        self.assertEqual(row["error_code"], "transport_error")

    @gen_test
    async def test_reset(self) -> None:
        await self.failing_once("reset")

    @gen_test
    async def test_token_error_refreshes_and_retries_within_one_attempt(self) -> None:
        workers = self.make_workers()
        await workers.start()
        self.fake.script_fault(SEND_PATH, "40001")
        push = await self.push(self.order(self.person()))
        done = await self.until_status(push["id"], "sent")
        self.assertEqual(done["attempts"], 1)
        self.assertEqual(len(sends(self)), 2)

    @gen_test
    async def test_attempts_exhausted_keeps_last_error(self) -> None:
        workers = self.make_workers(max_attempts=2, backoff_base_s=0.001)
        await workers.start()
        self.fake.script_fault(SEND_PATH, "-1")
        self.fake.script_fault(SEND_PATH, "45011")
        push = await self.push(self.order(self.person()))
        await eventually(lambda: self._attempted(push["id"]), "the first attempt")
        self.clock.advance(120)
        workers.ring()
        row = await self.until_status(push["id"], "failed")
        self.assertEqual((row["attempts"], row["errcode"], row["error_code"]),
                         (2, 45011, "attempts_exhausted"))
        self.assertIn("minute-quota", row["error"])

    async def terminal(self, prepare: Any, errcode: int, person: Person | None = None
                       ) -> dict[str, Any]:
        person = person or self.person()
        before = len(sends(self))
        push = await self.push(self.order(person))
        prepare(person)  # after wxd's checks: WeChat's state changed meanwhile
        workers = self.make_workers()
        await workers.start()
        row = await self.until_status(push["id"], "failed")
        self.assertEqual((row["attempts"], row["errcode"], row["error_code"]),
                         (1, errcode, "rejected"))
        self.assertTrue(row["error"])
        self.assertEqual(len(sends(self)) - before, 1)
        await workers.stop()
        return row

    @gen_test
    async def test_unsubscribed_43004(self) -> None:
        workers = self.make_workers()
        person = self.person()
        push = await self.push(self.order(person))
        self.fake.unfollow(person)  # after wxd checked: WeChat knows better
        await workers.start()
        row = await self.until_status(push["id"], "failed")
        self.assertEqual((row["errcode"], row["error_code"]), (43004, "rejected"))
        self.assertIn("require subscribe", row["error"])

    @gen_test
    async def test_invalid_template_40037_refreshes_the_cache(self) -> None:
        await self.terminal(lambda _: self.fake.templates.pop(ORDER_TEMPLATE_ID), 40037)
        fetches = self.fake.count_calls(TEMPLATES_PATH)
        await self.refused(self.order(self.person()), "template_unknown", 422)
        self.assertEqual(self.fake.count_calls(TEMPLATES_PATH), fetches + 1)

    @gen_test
    async def test_argument_invalid_47003_and_invalid_openid_40003(self) -> None:
        await self.terminal(lambda _: self.fake.script_fault(SEND_PATH, "47003"), 47003)
        await self.terminal(lambda _: self.fake.script_fault(SEND_PATH, "40003"), 40003)


class QuotaTest(PushCase):
    @gen_test
    async def test_daily_quota_pauses_everything_until_resume_time(self) -> None:
        workers = self.make_workers()
        await workers.start()
        self.fake.script_fault(SEND_PATH, "45009")
        first = await self.push(self.order(self.person()))
        await eventually(lambda: self._paused(workers), "the pause")
        expected = next_resume(self.clock(), 5 * 60)  # the default quota_resume_s, 00:05
        self.assertEqual(workers.paused_until, expected)
        self.assertEqual(datetime.datetime.fromtimestamp(expected, BEIJING).strftime("%H:%M"),
                         "00:05")
        row = await self.until_status(first["id"], "queued")
        self.assertEqual(row["attempts"], 0, "a quota refusal must not use an attempt")
        stats = await self.service.stats()
        self.assertEqual(stats["paused_until"], expected)
        self.assertIn('wxd_push_paused{reason="quota"} 1', self.metrics.render())
        self.assertEqual((await self.service.stats())["paused"],
                         {"reason": "quota", "errcode": 45009, "since": self.clock(), "until": expected})
        # Nothing is sent while paused, new pushes included.
        second = await self.push(self.order(self.person(skip=1)))
        self.clock.advance(60)
        workers.ring()
        await eventually(self._waiting, "the dispatcher back in its paused wait")
        self.assertEqual(len(sends(self)), 1)
        # The pause survives a restart (persisted in meta).
        await workers.stop()
        workers = self.make_workers()
        await workers.start()
        self.assertEqual(workers.paused_until, expected)
        self.clock.advance(expected - self.clock() + 1)
        workers.ring()
        await self.until_status(first["id"], "sent")
        await self.until_status(second["id"], "sent")
        self.assertIsNone(workers.paused_until)
        self.assertIsNone((await self.service.stats())["paused_until"])
        self.assertIn('wxd_push_paused{reason="quota"} 0', self.metrics.render())

    async def _waiting(self) -> bool:
        return bool(self.clock.pending())  # only the dispatcher waits on the clock here

    async def _paused(self, workers: PushWorkers) -> bool:
        return workers.paused_until is not None


async def report(case: PushCase, msgid: Any, status: str, person: Person) -> bool:
    """A TEMPLATESENDJOBFINISH for `msgid` as the event router stores it; True if it matched."""
    now = case.clock()
    matched, _ = await case.db.write(lambda c: push_store.apply_delivery_report(
        c, msgid, status, person.oa_openid, now))
    return bool(matched)


class DeliveryReportTest(PushCase):
    @gen_test
    async def test_report_after_sent(self) -> None:
        person = self.person()
        workers = self.make_workers()
        await workers.start()
        push = await self.push(self.order(person))
        sent = await self.until_status(push["id"], "sent")
        self.assertTrue(await report(self, int(sent["msgid"]), "success", person))
        self.assertEqual((await self.get_push(push["id"]))["status"], "delivered")
        other = await self.push(self.order(person))
        sent = await self.until_status(other["id"], "sent")
        self.assertTrue(await report(self, sent["msgid"], "failed:user block", person))
        row = await self.get_push(other["id"])
        self.assertEqual((row["status"], row["error"]), ("failed", "failed:user block"))


class LostAnswerReportTest(PushCase):
    request_timeout_s = 0.3  # the lost answer (hang_after) times out soon

    @gen_test
    async def test_report_before_the_send_answer_is_stored(self) -> None:
        """WeChat accepts the message but its answer is lost (hang_after); the report arrives
        first; the retry with the same client_msg_id learns the msgid → delivered, one message."""
        person = self.person()
        workers = self.make_workers()
        await workers.start()
        self.fake.script_fault(SEND_PATH, "hang_after")
        push = await self.push(self.order(person))
        row = await self.until_status(push["id"], "queued", timeout=5)
        self.assertEqual(row["attempts"], 1)
        [message] = self.fake.inbox(person.oa_openid)
        self.assertFalse(await report(self, message["msgid"], "success", person))
        self.clock.advance(row["next_attempt_at"] - self.clock())
        workers.ring()
        done = await self.until_status(push["id"], "delivered")
        self.assertEqual(done["msgid"], str(message["msgid"]))
        self.assertEqual(len(self.fake.inbox(person.oa_openid)), 1)
        self.assertEqual(len(sends(self)), 2)


class StopAndRecoveryTest(PushCase):
    @gen_test
    async def test_graceful_stop_finishes_in_flight_and_leaves_rest_queued(self) -> None:
        self.fake.latency_s = 0.15
        workers = self.make_workers(workers=2)
        await workers.start()
        _, answer = await self.call("POST", "/v1/pushes/batch", {"pushes": [
            self.order(self.person(skip=i % 5)) for i in range(10)]})
        ids = [r["id"] for r in answer["results"]]
        await eventually(lambda: self._some_sending(), "sends in flight")
        await workers.stop()
        rows = [await self.service.get(push_id) for push_id in ids]
        states = [r["status"] for r in rows if r]
        self.assertNotIn("sending", states)
        self.assertIn("sent", states)
        self.assertIn("queued", states)
        self.assertEqual(len(sends(self)), states.count("sent"))
        for row in rows:
            assert row is not None
            if row["status"] == "queued":
                self.assertEqual(row["attempts"], 0, "a push never POSTed used an attempt")

    async def _some_sending(self) -> bool:
        row = await fetchone(self.db, "SELECT COUNT(*) FROM pushes WHERE status = 'sending'")
        return row is not None and row[0] > 0

    @gen_test(timeout=10)
    async def test_stop_is_bounded_when_a_send_hangs(self) -> None:
        self.fake.script_fault(SEND_PATH, "hang")
        workers = self.make_workers(drain_timeout_s=0.2)
        await workers.start()
        push = await self.push(self.order(self.person()))
        await eventually(lambda: self._some_sending(), "the send")
        await eventually(lambda: sends(self), "the send to hang at WeChat")
        started = self.io_loop.time()
        await workers.stop()
        self.assertLess(self.io_loop.time() - started, 2.0)
        row = await self.until_status(push["id"], "queued")
        self.assertEqual(row["attempts"], 1)

    @gen_test(timeout=15)
    async def test_crash_with_pushes_sending_each_delivered_exactly_once(self) -> None:
        """A worker killed mid-send (answer lost) and pushes leased but never POSTed: the rows
        stay `sending`. A new PushWorkers recovers them; client_msg_id makes WeChat drop the
        duplicates, so every person's inbox shows each message once."""
        people = [self.person(skip=i) for i in range(6)]
        pushes = [await self.push(self.order(p)) for p in people]
        ids = [p["id"] for p in pushes]
        # 1. Three sends reach WeChat, whose answers never come back to wxd (hang_after).
        self.fake.script_fault(SEND_PATH, "hang_after", times=3)
        first = self.make_workers(workers=3)
        await first.start()
        await eventually(lambda: self._inbox_count(people, 3), "three accepted messages")
        # 2. Kill: the tasks die without the graceful path (no requeue).
        for task in first._tasks:
            task.cancel()
        await asyncio.gather(*first._tasks, return_exceptions=True)
        first._state = "stopped"
        self.workers.remove(first)
        # 3. Some more pushes were leased (attempt recorded) but never POSTed.
        now = self.clock()
        await self.db.write(lambda c: push_store.lease(c, now, 10, 60))
        states = await fetchall(self.db, "SELECT status FROM pushes")
        self.assertEqual({r[0] for r in states}, {"sending"})
        # 4. Restart.
        self.clock.advance(30)
        second = self.make_workers(workers=3)
        await second.start()
        self.assertEqual(second.recovered["requeued"], 6)
        for push_id in ids:
            await self.until_status(push_id, "sent")
        for person in people:
            self.assertEqual(len(self.fake.inbox(person.oa_openid)), 1, person.oa_openid)
        for push_id, person in zip(ids, people, strict=True):
            row = await self.get_push(push_id)
            self.assertEqual(row["msgid"], str(self.fake.inbox(person.oa_openid)[0]["msgid"]))

    async def _inbox_count(self, people: list[Person], n: int) -> bool:
        return sum(len(self.fake.inbox(p.oa_openid)) for p in people) >= n

    @gen_test
    async def test_stale_sending_fail_policy(self) -> None:
        push = await self.push(self.order(self.person()))
        now = self.clock()
        await self.db.write(lambda c: push_store.lease(c, now, 1, 60))
        self.clock.advance(601)
        workers = self.make_workers(stale_sending="fail")
        await workers.start()
        row = await self.get_push(push["id"])
        self.assertEqual((row["status"], row["error_code"]), ("failed", "outcome_unknown"))
        status, answer = await self.call("POST", f"/v1/pushes/{push['id']}/retry")
        self.assertEqual((status, answer["status"]), (200, "queued"))
        await self.until_status(push["id"], "sent")


class LeaseExpiryTest(PushCase):
    """WeChat accepted a push but recording `sent` failed (disk full, database locked): the
    push stays `sending`; once its lease has passed the running workers send it again with the
    same client_msg_id, WeChat drops the duplicate, and the person gets one message."""

    async def outcome_lost(self, workers: PushWorkers) -> None:
        """Make the database read-only while the send is answered, until the sender's outcome
        write has failed."""
        send_seconds = self.metrics.histogram("wxd_push_send_seconds", "")
        await eventually(lambda: self._called(), "the send to reach WeChat")
        async with read_only(self.db):
            await eventually(lambda: self._answered(workers, send_seconds.count()),
                             "the answer and its outcome write")
        assert self.db.write_error is not None

    async def _called(self) -> bool:
        return self.fake.count_calls(SEND_PATH) == 1

    async def _answered(self, workers: PushWorkers, sends: int) -> bool:
        # A sender drops the push from _inflight once its outcome write has returned (or failed).
        return sends == 1 and not workers._inflight

    @gen_test(timeout=20)
    async def test_a_push_whose_outcome_write_failed_is_sent_again_after_its_lease(
            self) -> None:
        person = self.person()
        workers = self.make_workers()
        await workers.start()
        self.fake.script_fault(SEND_PATH, "delay:0.3")
        push = await self.push(self.order(person))
        await self.outcome_lost(workers)
        row = await self.get_push(push["id"])
        self.assertEqual((row["status"], row["attempts"], row["msgid"]), ("sending", 1, None))
        self.assertEqual(len(self.fake.inbox(person.oa_openid)), 1)
        lease_end = self.clock() + LEASE_S
        self.clock.set(lease_end - 1)  # the workers keep leasing; this lease has not passed
        await eventually(self.clock.pending, "the dispatcher back in its wait")
        self.assertEqual(self.fake.count_calls(SEND_PATH), 1)
        self.assertEqual((await self.get_push(push["id"]))["attempts"], 1)  # not leased again
        self.clock.set(lease_end + 1)  # no doorbell: the dispatcher wakes at the lease end
        done = await self.until_status(push["id"], "sent")
        self.assertEqual((done["attempts"], done["client_msg_id"]), (2, push["id"]))
        self.assertEqual([c.body["client_msg_id"] for c in sends(self)], [push["id"]] * 2)
        [message] = self.fake.inbox(person.oa_openid)  # delivered once
        self.assertEqual(done["msgid"], str(message["msgid"]))
        self.assertIsNone(self.db.write_error)

    @gen_test(timeout=20)
    async def test_the_lease_length_is_the_workers_lease_s(self) -> None:
        """[wxd] lease_s: a push being sent is leased that long (LEASE_S by default)."""
        person = self.person()
        workers = self.make_workers(lease_s=15.0)
        await workers.start()
        self.fake.script_fault(SEND_PATH, "delay:0.3")
        push = await self.push(self.order(person))
        await eventually(lambda: self._called(), "the send to reach WeChat")
        row = await fetchone(self.db, "SELECT leased_until - last_attempt_at FROM pushes"
                                      " WHERE id = ?", (push["id"],))
        assert row is not None
        self.assertAlmostEqual(row[0], 15.0)

    @gen_test(timeout=20)
    async def test_past_the_dedupe_window_the_stale_sending_policy_decides(self) -> None:
        person = self.person()
        workers = self.make_workers(stale_sending="fail")
        await workers.start()
        self.fake.script_fault(SEND_PATH, "delay:0.3")
        push = await self.push(self.order(person))
        await self.outcome_lost(workers)
        # The database took no writes for longer than WeChat's 10-minute client_msg_id window.
        self.clock.advance(push_store.CLIENT_MSG_ID_WINDOW_S + 1)
        workers.ring()
        done = await self.until_status(push["id"], "failed")
        self.assertEqual((done["error_code"], done["attempts"]), ("outcome_unknown", 1))
        self.assertEqual(self.fake.count_calls(SEND_PATH), 1)


class RateTest(PushCase):
    @gen_test(timeout=10)
    async def test_rate_limit_spaces_sends(self) -> None:
        self.clock.autojump = True  # the limiter's sleeps move the fake clock at once
        workers = self.make_workers(workers=4, rate_per_s=10)
        await workers.start()
        started = self.clock()
        _, answer = await self.call("POST", "/v1/pushes/batch", {"pushes": [
            self.order(self.person(skip=i % 5)) for i in range(15)]})
        for result in answer["results"]:
            await self.until_status(result["id"], "sent")
        # 10 sends a second, no burst: the 15th send is not before 1.4 s.
        self.assertGreaterEqual(max(c.at for c in sends(self)) - started, 1.4 - 1e-3)
        self.assertGreaterEqual(sum(self.clock.sleeps), 1.4 - 1e-3)


def test_backoff_bounds() -> None:
    workers = PushWorkers(None, None, backoff_base_s=2, backoff_max_s=100,  # type: ignore[arg-type]
                          max_attempts=20, rng=random.Random(1))

    def delay(attempts: int, now: float, errcode: int) -> float:
        decision = decide(WeChatAPIError(errcode, "", "/p"), attempts, now, workers.policy)
        assert isinstance(decision, Retry)
        return decision.delay_s

    for attempts in range(1, 12):
        full = min(100, 2 * 2 ** (attempts - 1))
        assert full / 2 <= delay(attempts, 0.0, -1) <= full
    # 45011: not before the next wall-clock minute.
    assert 45 <= delay(1, 1_699_999_995.0, 45011) <= 46  # :15 past the minute
