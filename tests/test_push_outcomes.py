"""Send outcomes the emulator's fault switches produce as real WeChat does: every answer to a resend
of the same client_msg_id (FakeWeChat.answer_duplicates) on a retry, a crash recovery, the
transport's own resend and an operator retry; and a 43004 after a missed unsubscribe event."""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

from tornado.testing import gen_test

from tests.helpers import eventually, fetchone
from tests.push_case import SEND_PATH, PushCase, sends
from wxd.push_workers import PushWorkers
from wxd.sandbox import Person
from wxd.store import followers
from wxd.store import pushes as push_store

# mode → (the first msgid is learnt, the errcode answered or None for errcode 0)
MODES: dict[str, tuple[bool, int | None]] = {
    "ok": (True, None),
    "ok_no_msgid": (False, None),
    "45065": (False, 45065),
    "45065_msg_id": (True, 45065),
    "45065_msgid": (True, 45065),
    "40241": (False, 40241),
    "45066": (False, 45066),
}


class ResendCase(PushCase):
    request_timeout_s = 0.5
    keep_alive = False  # a lost answer reaches the worker (no transport resend) unless a test wants it

    async def attempted(self, push_id: str, status: str = "queued") -> dict[str, Any]:
        """The push once its first attempt's outcome is recorded with `status`."""

        async def check() -> bool:
            row = await self.service.get(push_id)
            return row is not None and row["attempts"] >= 1 and row["status"] == status

        await eventually(check, f"the first attempt ending {status}")
        return await self.get_push(push_id)

    async def lost_first_answer(self, person: Person, **options: Any
                                ) -> tuple[PushWorkers, dict[str, Any], dict[str, Any]]:
        """A push whose first send WeChat accepts but whose answer never comes back (timeout):
        (the workers, the push, its row after that attempt)."""
        self.fake.script_fault(SEND_PATH, "hang_after")
        workers = self.make_workers(**options)
        await workers.start()
        push = await self.push(self.order(person))
        status = "failed" if options.get("max_attempts") == 1 else "queued"
        row = await self.attempted(push["id"], status)
        self.assertEqual(row["error_code"], "attempts_exhausted" if status == "failed"
                         else "transport_error")
        self.assertEqual(len(self.fake.inbox(person.oa_openid)), 1)  # WeChat has it
        return workers, push, row

    async def check_sent(self, row: dict[str, Any], person: Person, mode: str) -> None:
        """`row` was recorded sent as WeChat's `mode` answer to a duplicate says."""
        knows_msgid, errcode = MODES[mode]
        [message] = self.fake.inbox(person.oa_openid)  # delivered once
        self.assertEqual(row["status"], "sent", mode)
        self.assertEqual(row["msgid"], str(message["msgid"]) if knows_msgid else None, mode)
        self.assertIsNone(row["errcode"], mode)
        if mode == "ok":  # a plain acceptance: the msgid says it all
            self.assertIsNone(row.get("last_answer"))
            return
        answer = row["last_answer"]
        self.assertEqual(answer["errcode"], errcode or 0, mode)
        key = mode.partition("_")[2]
        if key in ("msg_id", "msgid"):
            self.assertEqual(answer[key], message["msgid"], mode)
        self.assertNotIn(await self.tokens.get(), json.dumps(row))


class DuplicateAnswerTest(ResendCase):
    async def retried(self, mode: str, skip: int) -> None:
        person = self.person(skip=skip)
        rule = self.fake.answer_duplicates(mode)
        workers, push, row = await self.lost_first_answer(person)
        self.clock.advance(row["next_attempt_at"] - self.clock())
        workers.ring()
        done = await self.until_status(push["id"], "sent", "failed")
        self.assertEqual(done["attempts"], 2, mode)
        await self.check_sent(done, person, mode)
        mine = [c for c in sends(self) if c.body["touser"] == person.oa_openid]
        self.assertEqual([c.body["client_msg_id"] for c in mine], [push["id"]] * 2)
        self.fake.clear_faults(rule_id=rule.id)
        await workers.stop()

    @gen_test(timeout=30)
    async def test_every_duplicate_answer_to_a_retry_is_sent(self) -> None:
        for skip, mode in enumerate(MODES):
            await self.retried(mode, skip)

    @gen_test
    async def test_on_a_first_send_the_codes_keep_their_class(self) -> None:
        workers = self.make_workers()
        await workers.start()
        for skip, code in enumerate(("45065", "40241", "45066")):
            self.fake.script_fault(SEND_PATH, code)
            push = await self.push(self.order(self.person(skip=skip)))
            row = await self.until_status(push["id"], "failed")
            self.assertEqual((row["attempts"], row["errcode"], row["error_code"]),
                             (1, int(code), "rejected"))
            self.assertEqual(row["last_answer"]["errcode"], int(code))
            self.assertIn("rid:", row["last_answer"]["errmsg"])

    @gen_test(timeout=15)
    async def test_crash_recovery_resend_answered_45065_is_sent(self) -> None:
        person = self.person()
        self.fake.answer_duplicates("45065")
        self.client._request_timeout_s = 5.0
        self.fake.script_fault(SEND_PATH, "hang_after")
        first = self.make_workers()
        await first.start()
        push = await self.push(self.order(person))

        async def accepted() -> bool:
            return len(self.fake.inbox(person.oa_openid)) == 1

        await eventually(accepted, "WeChat accepting the first send")
        for task in first._tasks:  # killed mid-send: the row stays `sending`
            task.cancel()
        await asyncio.gather(*first._tasks, return_exceptions=True)
        first._state = "stopped"
        self.workers.remove(first)
        self.clock.advance(30)
        second = self.make_workers()
        await second.start()
        self.assertEqual(second.recovered["requeued"], 1)
        done = await self.until_status(push["id"], "sent", "failed")
        self.assertEqual(done["attempts"], 2)
        await self.check_sent(done, person, "45065")


class TransportResendTest(ResendCase):
    keep_alive = True
    request_timeout_s = 5.0

    @gen_test
    async def test_a_keep_alive_resend_answered_45065_is_sent_within_one_attempt(self) -> None:
        """transport.py resends a POST whose reused connection died before any answer byte;
        here WeChat had processed it (reset_after), so the resend is a duplicate."""
        workers = self.make_workers()
        await workers.start()
        first = await self.push(self.order(self.person(skip=1)))
        await self.until_status(first["id"], "sent")  # leaves an idle connection
        self.fake.answer_duplicates("45065_msgid")
        self.fake.script_fault(SEND_PATH, "reset_after")
        person = self.person()
        push = await self.push(self.order(person))
        done = await self.until_status(push["id"], "sent", "failed")
        self.assertEqual(self.upstream.stats.retried_stale, 1)
        self.assertEqual(done["attempts"], 1)
        await self.check_sent(done, person, "45065_msgid")


class OperatorRetryTest(ResendCase):
    """POST /v1/pushes/{id}/retry of a push WeChat may have accepted (its answer was lost and
    the attempts ran out): the same client_msg_id inside WeChat's 10-minute window (WeChat
    drops the retry), a new one past it, and the answer says which."""

    @gen_test
    async def test_within_the_window_the_client_msg_id_is_kept(self) -> None:
        person = self.person()
        self.fake.answer_duplicates("45065")
        _, push, _ = await self.lost_first_answer(person, max_attempts=1)
        self.clock.advance(300)
        status, answer = await self.call("POST", f"/v1/pushes/{push['id']}/retry")
        self.assertEqual((status, answer["status"]), (200, "queued"))
        self.assertEqual((answer["client_msg_id"], answer["client_msg_id_reused"]),
                         (push["id"], True))
        self.assertNotIn("warning", answer)
        done = await self.until_status(push["id"], "sent", "failed")
        await self.check_sent(done, person, "45065")

    @gen_test
    async def test_past_the_window_a_new_client_msg_id_and_a_warning(self) -> None:
        person = self.person()
        _, push, _ = await self.lost_first_answer(person, max_attempts=1)
        self.clock.advance(601)
        with self.assertLogs("wxd.pushes", logging.WARNING) as logs:
            status, answer = await self.call("POST", f"/v1/pushes/{push['id']}/retry")
        self.assertEqual((status, answer["status"]), (200, "queued"))
        self.assertEqual((answer["client_msg_id"], answer["client_msg_id_reused"]),
                         (f"{push['id']}-r1", False))
        self.assertIn("10-minute", answer["warning"])
        self.assertIn("twice", answer["warning"])
        self.assertIn(push["id"], logs.output[0])
        done = await self.until_status(push["id"], "sent")
        self.assertEqual(done["client_msg_id"], f"{push['id']}-r1")
        # The double delivery the warning announced: nothing could prevent it.
        self.assertEqual(len(self.fake.inbox(person.oa_openid)), 2)

    @gen_test
    async def test_a_refused_push_keeps_its_client_msg_id(self) -> None:
        person = self.person()
        push = await self.push(self.order(person))
        self.fake.script_fault(SEND_PATH, "47003")
        workers = self.make_workers()
        await workers.start()
        await self.until_status(push["id"], "failed")
        self.clock.advance(601)
        status, answer = await self.call("POST", f"/v1/pushes/{push['id']}/retry")
        self.assertEqual((status, answer["client_msg_id"], answer["client_msg_id_reused"]),
                         (200, push["id"], True))
        self.assertNotIn("warning", answer)
        await self.until_status(push["id"], "sent")
        self.assertEqual(len(self.fake.inbox(person.oa_openid)), 1)


class NotFollowingTest(PushCase):
    """A silent unfollow (no unsubscribe event reached wxd): the send's 43004 corrects the
    follower row, so later pushes are refused at enqueue instead of failing one by one."""

    async def subscribed(self, person: Person) -> int:
        row = await fetchone(self.db, "SELECT subscribed FROM followers WHERE oa_openid = ?",
                             (person.oa_openid,))
        assert row is not None
        return int(row[0])

    @gen_test
    async def test_43004_marks_the_follower_unsubscribed(self) -> None:
        person = self.person()
        push = await self.push({**self.order(person), "to": {"unionid": person.unionid}})
        self.fake.unfollow(person)  # silent
        workers = self.make_workers()
        await workers.start()
        row = await self.until_status(push["id"], "failed")
        self.assertEqual((row["errcode"], row["error_code"]), (43004, "rejected"))
        self.assertEqual(await self.subscribed(person), 0)
        for to in ({"oa_openid": person.oa_openid}, {"unionid": person.unionid}):
            error = await self.refused({**self.order(person), "to": to},
                                       "recipient_not_following", 422)
            self.assertIn("43004", error["message"])
        self.assertEqual(len(sends(self)), 1)
        self.assertEqual(row["last_answer"]["errcode"], 43004)
        # A later subscribe event flips it back.
        self.fake.follow(person)
        self.clock.advance(5)
        now = self.clock()
        await self.db.write(lambda c: followers.record_subscribe(c, person.oa_openid, now, now))
        again = await self.push(self.order(person))
        await self.until_status(again["id"], "sent")

    @gen_test
    async def test_an_event_from_the_same_second_wins(self) -> None:
        """A subscribe event created in the send's second is newer than the 43004 (WeChat's
        CreateTime has whole seconds): the row stays subscribed."""
        person = self.person()
        push = await self.push(self.order(person))
        self.fake.unfollow(person)
        now = self.clock()
        await self.db.write(lambda c: followers.record_subscribe(
            c, person.oa_openid, float(int(now)), now))
        workers = self.make_workers()
        await workers.start()
        await self.until_status(push["id"], "failed")
        self.assertEqual(await self.subscribed(person), 1)
        stored = await self.db.read(lambda c: push_store.get(c, push["id"]))
        assert stored is not None and stored["errcode"] == 43004
