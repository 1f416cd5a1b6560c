"""Push enqueue through the admin API over real HTTP: recipients, validation, templates,
idempotency, batch, list/show, retry/cancel. Sandbox on a second port, real SQLite file
(tests/push_case.py)."""

from __future__ import annotations

import json

from tornado.testing import gen_test

from tests.helpers import fetchall
from tests.push_case import NOTICE_DATA, ORDER_DATA, TEMPLATES_PATH, PushCase
from wxd.admin import pushes as pushes_admin
from wxd.sandbox import LEGACY_TEMPLATE_ID, NOTICE_TEMPLATE_ID, ORDER_TEMPLATE_ID
from wxd.store import followers
from wxd.store import pushes as push_store


class EnqueueTest(PushCase):
    @gen_test
    async def test_each_recipient_form(self) -> None:
        person = self.person(used_mp=True)
        for to in ({"oa_openid": person.oa_openid}, {"unionid": person.unionid},
                   {"mp_openid": person.mp_openid}):
            answer = await self.push({"to": to, "template_id": NOTICE_TEMPLATE_ID,
                                      "data": NOTICE_DATA})
            self.assertEqual(set(answer), {"id", "status"})
            self.assertEqual(answer["status"], "queued")
            stored = await self.get_push(answer["id"])
            self.assertEqual(stored["to"], to)
            self.assertEqual(stored["oa_openid"], person.oa_openid)
            self.assertEqual(stored["attempts"], 0)

    @gen_test
    async def test_recipients_refused_at_once(self) -> None:
        never = self.person(follows=False, used_mp=True)
        former = self.former[0]
        await self.refused({"to": {"oa_openid": "oUnknown"}, "template_id": ORDER_TEMPLATE_ID,
                            "data": ORDER_DATA}, "recipient_unknown", 422)
        await self.refused({"to": {"unionid": "uUnknown"}, "template_id": ORDER_TEMPLATE_ID,
                            "data": ORDER_DATA}, "recipient_unknown", 422)
        await self.refused({"to": {"mp_openid": "mUnknown"}, "template_id": ORDER_TEMPLATE_ID,
                            "data": ORDER_DATA}, "recipient_unknown", 422)
        # An MP user who never followed the OA; a former follower (would be 43004).
        error = await self.refused({"to": {"mp_openid": never.mp_openid},
                                    "template_id": ORDER_TEMPLATE_ID, "data": ORDER_DATA},
                                   "recipient_not_following", 422)
        self.assertEqual(error["field"], "to.mp_openid")
        await self.refused(self.order(former), "recipient_not_following", 422)
        await self.refused({"to": {"unionid": former.unionid}, "template_id": ORDER_TEMPLATE_ID,
                            "data": ORDER_DATA}, "recipient_not_following", 422)

    @gen_test
    async def test_validation_refusals(self) -> None:
        person = self.person()
        base = self.order(person)
        error = await self.refused({**base, "data": {**ORDER_DATA, "miniprogram": {
            "appid": self.creds.mp_appid, "pagepath": "pages/index"}}}, "misplaced_field", 400)
        self.assertEqual(error["field"], "data.miniprogram")
        self.assertIn("top level", error["message"])
        for key in ("pagepath", "appid", "url"):
            error = await self.refused({**base, "data": {**ORDER_DATA, key: "x"}},
                                       "misplaced_field", 400)
            self.assertIn("belongs", error["message"])
        await self.refused({k: v for k, v in base.items() if k != "template_id"},
                           "missing_field", 400)
        await self.refused({**base, "data": "thing2=x"}, "invalid_data", 400)
        await self.refused({**base, "data": {**ORDER_DATA, "thing2": 5}}, "invalid_data", 400)
        await self.refused({**base, "template_id": "nosuchtemplate"}, "template_unknown", 422)
        error = await self.refused({**base, "data": {**ORDER_DATA, "thing9": "extra"}},
                                   "template_mismatch", 422)
        self.assertIn("thing9", error["message"])
        partial = dict(ORDER_DATA)
        del partial["phrase5"]
        await self.refused({**base, "data": partial}, "template_mismatch", 422)
        error = await self.refused({**base, "data": {**ORDER_DATA, "phrase5": "shipping"}},
                                   "value_invalid", 422)
        self.assertIn("phrase5", error["message"])
        self.assertIn("Chinese", error["message"])
        await self.refused({**base, "data": {**ORDER_DATA, "thing2": "x" * 21}},
                           "value_invalid", 422)
        await self.refused({**base, "miniprogram": {"appid": self.creds.mp_appid}},
                           "missing_field", 400)
        status, answer = await self.call("POST", "/v1/pushes", b"not json")
        self.assertEqual((status, answer["error"]["code"]), (400, "invalid_json"))
        status, _ = await self.call("POST", "/v1/pushes", base, auth=False)
        self.assertEqual(status, 401)

    @gen_test
    async def test_shorthand_and_full_data_forms_and_legacy_template(self) -> None:
        person = self.person()
        full = {k: {"value": v} for k, v in ORDER_DATA.items()}
        await self.push({**self.order(person), "data": full})
        await self.push({"to": {"oa_openid": person.oa_openid},
                         "template_id": LEGACY_TEMPLATE_ID,
                         "data": {"keyword1": "测试", "keyword2": "通过"}})  # no first/remark
        rows = await fetchall(self.db, "SELECT body FROM pushes ORDER BY seq")
        self.assertEqual(json.loads(rows[0]["body"])["data"], full)

    @gen_test
    async def test_idempotency_key_returns_the_existing_push(self) -> None:
        person = self.person()
        first = await self.push(self.order(person, idempotency_key="order-42"))
        again = await self.push(self.order(person, idempotency_key="order-42"), expect=200)
        self.assertEqual(again["id"], first["id"])
        self.assertEqual(again["status"], "queued")
        self.assertEqual(await self.count(), 1)
        # Even when the person unfollowed meanwhile: the key answers, nothing new is judged.
        await self.db.write(lambda c: followers.record_unsubscribe(
            c, person.oa_openid, self.clock() + 1, self.clock() + 1))
        again = await self.push(self.order(person, idempotency_key="order-42"), expect=200)
        self.assertEqual(again["id"], first["id"])

    @gen_test
    async def test_batch_one_commit_one_result_per_item(self) -> None:
        a, b = self.person(), self.person(skip=1)
        await self.push(self.order(a, idempotency_key="known"))
        commits = self.db.commits
        status, answer = await self.call("POST", "/v1/pushes/batch", {"pushes": [
            self.order(a), self.order(b, idempotency_key="known"),
            self.order(b, idempotency_key="new-1"), self.order(b, idempotency_key="new-1"),
            {**self.order(a), "template_id": "nope"}, "junk",
            {"to": {"oa_openid": "oNobody"}, "template_id": ORDER_TEMPLATE_ID,
             "data": ORDER_DATA},
        ]})
        self.assertEqual(status, 202, answer)
        self.assertEqual(self.db.commits - commits, 1, "the batch was not one group commit")
        results = answer["results"]
        self.assertEqual(len(results), 7)
        self.assertEqual([r.get("http_status") for r in results], [202, 200, 202, 200, 422, 400, 422])
        self.assertTrue(results[0]["created"])
        self.assertEqual(results[3]["id"], results[2]["id"])
        self.assertEqual(results[4]["error"]["code"], "template_unknown")
        self.assertEqual(results[5]["error"]["code"], "invalid_body")
        self.assertEqual(results[6]["error"]["code"], "recipient_unknown")
        self.assertEqual(await self.count(), 3)
        for bad, code in (({"pushes": []}, 400), ({"pushes": "x"}, 400),
                          ({"pushes": [{}] * (pushes_admin.MAX_BATCH + 1)}, 413)):
            status, _ = await self.call("POST", "/v1/pushes/batch", bad)
            self.assertEqual(status, code)

    @gen_test
    async def test_show_list_paginate(self) -> None:
        person = self.person()
        ids = [(await self.push(self.order(person)))["id"] for _ in range(5)]
        status, answer = await self.call("GET", "/v1/pushes/p_doesnotexist")
        self.assertEqual((status, answer["error"]["code"]), (404, "not_found"))
        shown = await self.get_push(ids[0])
        for key in ("id", "status", "attempts", "msgid", "error", "errcode", "to", "template_id",
                    "created_at", "sent_at", "next_attempt_at"):
            self.assertIn(key, shown)
        self.assertEqual(shown["next_attempt_at"], self.clock())
        seen: list[str] = []
        cursor = None
        while True:
            path = "/v1/pushes?limit=2&status=queued" + (f"&cursor={cursor}" if cursor else "")
            status, page = await self.call("GET", path)
            self.assertEqual(status, 200, page)
            seen += [p["id"] for p in page["pushes"]]
            cursor = page["next_cursor"]
            if cursor is None:
                break
        self.assertEqual(seen, ids[::-1])
        for query in ("status=bogus", "limit=0", "limit=x", "cursor=%21%21"):
            status, answer = await self.call("GET", f"/v1/pushes?{query}")
            self.assertEqual((status, answer["error"]["code"]), (400, "invalid_query"), query)

    @gen_test
    async def test_cancel_and_retry_state_rules(self) -> None:
        person = self.person()
        a = (await self.push(self.order(person)))["id"]
        b = (await self.push(self.order(person)))["id"]
        status, answer = await self.call("POST", f"/v1/pushes/{a}/retry")
        self.assertEqual((status, answer["error"]["code"]), (409, "invalid_state"))
        status, answer = await self.call("POST", f"/v1/pushes/{a}/cancel")
        self.assertEqual((status, answer["status"]), (200, "cancelled"))
        status, answer = await self.call("POST", f"/v1/pushes/{a}/cancel")
        self.assertEqual((status, answer["error"]["code"]), (409, "invalid_state"))
        status, _ = await self.call("POST", "/v1/pushes/p_nope/cancel")
        self.assertEqual(status, 404)
        now = self.clock()
        await self.db.write(lambda c: (push_store.lease(c, now, 1, 60),
                                       push_store.mark_failed(c, b, now, 43004, "rejected",
                                                             "require subscribe")))
        status, answer = await self.call("POST", f"/v1/pushes/{b}/retry")
        self.assertEqual((status, answer["status"], answer["attempts"]), (200, "queued", 0))
        self.assertIsNone(answer["errcode"])


class TemplateCacheTest(PushCase):
    @gen_test
    async def test_fetched_once_then_cached(self) -> None:
        person = self.person()
        for _ in range(3):
            await self.push(self.order(person))
        self.assertEqual(self.fake.count_calls(TEMPLATES_PATH), 1)
        status, listing = await self.call("GET", "/v1/templates")
        self.assertEqual(status, 200)
        keys = {t["template_id"]: t["keys"] for t in listing["templates"]}
        self.assertEqual(keys[ORDER_TEMPLATE_ID], list(ORDER_DATA))
        # Expiry, on-demand refresh and a 40037 from a send each cause one refetch.
        self.clock.advance(3601)
        await self.push(self.order(person))
        self.assertEqual(self.fake.count_calls(TEMPLATES_PATH), 2)
        status, _ = await self.call("POST", "/v1/templates/refresh")
        self.assertEqual((status, self.fake.count_calls(TEMPLATES_PATH)), (200, 3))
        self.service.invalidate_templates()
        await self.push(self.order(person))
        self.assertEqual(self.fake.count_calls(TEMPLATES_PATH), 4)

    @gen_test
    async def test_unknown_template_refetches_at_most_once_a_minute(self) -> None:
        person = self.person()
        await self.push(self.order(person))
        self.fake.add_template("NewTemplate0001", "新模板", "内容:{{thing1.DATA}}")
        body = {"to": {"oa_openid": person.oa_openid}, "template_id": "NewTemplate0001",
                "data": {"thing1": "你好"}}
        # Fetched less than a minute ago: the cache is trusted, the id refused.
        await self.refused(body, "template_unknown", 422)
        self.assertEqual(self.fake.count_calls(TEMPLATES_PATH), 1)
        self.clock.advance(61)
        await self.push(body)
        await self.refused({**body, "template_id": "Still0unknown"}, "template_unknown")
        self.assertEqual(self.fake.count_calls(TEMPLATES_PATH), 2)

    @gen_test
    async def test_template_list_unavailable_queues_unverified(self) -> None:
        person = self.person()
        self.fake.script_fault(TEMPLATES_PATH, "http500", times=5)
        answer = await self.push(self.order(person))
        self.assertEqual(answer["status"], "queued")
        # Rules that need no template still apply.
        await self.refused({**self.order(person), "data": {**ORDER_DATA, "url": "x"}},
                           "misplaced_field")
        await self.refused({**self.order(person), "data": {**ORDER_DATA, "phrase5": "abc"}},
                           "value_invalid")
        status, answer = await self.call("POST", "/v1/templates/refresh")
        self.assertEqual((status, answer["error"]["code"]), (502, "wechat_unreachable"))


class NoMiniProgramTest(PushCase):
    mini_program = False

    @gen_test
    async def test_miniprogram_needs_appid_without_mp_config(self) -> None:
        person = self.person()
        await self.refused(self.order(person, miniprogram={"pagepath": "pages/a"}),
                           "mini_program_not_configured", 422)
        await self.push(self.order(person, miniprogram={"appid": self.creds.mp_appid,
                                                        "pagepath": "pages/a"}))
