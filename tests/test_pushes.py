"""Push enqueue through the admin API over real HTTP: recipients, validation, templates,
idempotency, batch, list/show, retry/cancel. Sandbox on a second port, real SQLite file.

`PushCase` is the harness test_workers.py builds on (it has no tests of its own).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Awaitable, Callable
from typing import Any

import tornado.gen
import tornado.httpclient
import tornado.web
from tornado.testing import AsyncHTTPTestCase, gen_test

from tests.helpers import ADMIN_TOKEN, fetchall, fetchone
from tests.sandbox_fixture import FakeClock
from wxd.admin import common_kwargs, make_app
from wxd.admin import pushes as pushes_admin
from wxd.metrics import Registry
from wxd.push_workers import PushWorkers
from wxd.pushes import PushService
from wxd.sandbox import (
    LEGACY_TEMPLATE_ID,
    NOTICE_TEMPLATE_ID,
    ORDER_TEMPLATE_ID,
    FakeWeChat,
    Person,
    SandboxServer,
)
from wxd.store import followers, ingest, mp_users
from wxd.store import pushes as push_store
from wxd.store.db import Database
from wxd.tokens import TokenManager
from wxd.wechat.client import WeChatClient
from wxd.wechat.oa import OfficialAccountAPI
from wxd.wechat.transport import KeepAliveClient

TEMPLATES_PATH = "/cgi-bin/template/get_all_private_template"
SEND_PATH = "/cgi-bin/message/template/send"
ORDER_DATA = {"character_string1": "A20240101001", "thing2": "巧克力", "amount3": "39.8元",
              "time4": "2024年1月1日 12:00", "phrase5": "配送中"}
NOTICE_DATA = {"thing1": "您的预约已确认", "time2": "2024-01-01 09:30"}


class PushCase(AsyncHTTPTestCase):
    """Admin app (push routes) + SandboxServer + real SQLite file + real TokenManager/WeChatClient.

    wxd's follower/MP tables are seeded from the emulator's population (as backfill and logins
    would have done): followers subscribed, some former followers unsubscribed, MP users.
    """

    mini_program = True
    request_timeout_s = 5.0
    keep_alive = True  # False: a connection per send, so a reset is never resent by transport.py

    def get_app(self) -> tornado.web.Application:
        self.clock = FakeClock()
        self.tmp = tempfile.TemporaryDirectory()
        self.path = os.path.join(self.tmp.name, "wxd.db")
        self.fake = FakeWeChat(users=60, seed=11, clock=self.clock, follow_ratio=0.6,
                               mp_ratio=0.6)
        self.creds = self.fake.credentials
        self.metrics = Registry()
        self.workers: list[PushWorkers] = []
        self.io_loop.run_sync(self._start)
        common = common_kwargs(ADMIN_TOKEN, self.metrics)
        return make_app(common, [pushes_admin.routes(common, self.service)])

    async def _start(self) -> None:
        self.sandbox = SandboxServer(self.fake)
        await self.sandbox.start()
        self.upstream = KeepAliveClient(idle_timeout_s=30.0 if self.keep_alive else 0.0)
        self.client = WeChatClient(self.upstream, self.sandbox.base_url, 2.0,
                                   self.request_timeout_s, self.metrics)
        self.db = await Database.open(self.path, metrics=self.metrics)
        self.tokens = TokenManager("oa", self.creds.oa_appid, self.creds.oa_secret, self.client,
                                   self.db, clock=self.clock)
        self.oa = OfficialAccountAPI(self.client, self.tokens)
        self.service = PushService(
            self.db, self.oa, mp_appid=self.creds.mp_appid if self.mini_program else None,
            template_cache_s=3600, clock=self.clock, metrics=self.metrics,
            on_enqueued=self.ring_workers)
        self.former = [p for p in self.fake.people if not p.follows][:3]
        await self.db.write(self._seed)

    def _seed(self, conn: Any) -> None:
        now = self.clock()
        for person in self.fake.people:
            if person.follows or person in self.former:
                ingest.apply_user_infos(conn, [{
                    "subscribe": 1, "openid": person.oa_openid, "unionid": person.unionid,
                    "subscribe_time": int(now) - 100}], now - 100, now - 100)
            if person in self.former:
                followers.record_unsubscribe(conn, person.oa_openid, now - 50, now - 50)
            if person.used_mp:
                mp_users.upsert(conn, person.mp_openid, person.unionid, None, now)

    async def _stop(self) -> None:
        for workers in self.workers:
            await workers.stop()
        await self.tokens.stop()
        await self.sandbox.stop()
        self.upstream.close()
        await self.db.close()

    def tearDown(self) -> None:
        try:
            self.io_loop.run_sync(self._stop)
            super().tearDown()
        finally:
            self.tmp.cleanup()

    # Helpers ----------------------------------------------------------------------------------

    def person(self, *, follows: bool = True, used_mp: bool | None = None,
               skip: int = 0) -> Person:
        matches = [p for p in self.fake.people if p.follows == follows and p.unionid
                   and p not in self.former and (used_mp is None or p.used_mp == used_mp)]
        return matches[skip]

    def make_workers(self, **options: Any) -> PushWorkers:
        settings: dict[str, Any] = {
            "workers": 2, "rate_per_s": 0, "max_attempts": 4, "backoff_base_s": 2.0,
            "backoff_max_s": 600.0, "quota_resume_s": 300.0, "stale_sending": "resend",
            "clock": self.clock, "metrics": self.metrics, "idle_max_s": 0.05,
            "on_template_invalid": self.service.invalidate_templates, "drain_timeout_s": 2.0,
        }
        settings.update(options)
        workers = PushWorkers(self.db, self.oa, **settings)
        self.workers.append(workers)
        return workers

    def ring_workers(self) -> None:
        """The service's doorbell (the daemon wires it to its PushWorkers.ring)."""
        for workers in self.workers:
            workers.ring()

    async def call(self, method: str, path: str, body: Any = None,
                   auth: bool = True) -> tuple[int, Any]:
        headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"} if auth else {}
        payload = body if isinstance(body, bytes) or body is None else json.dumps(
            body, ensure_ascii=False).encode()
        if method == "POST" and payload is None:
            payload = b""
        response = await self.http_client.fetch(self.get_url(path), method=method,
                                                headers=headers, body=payload, raise_error=False)
        return response.code, json.loads(response.body)

    def order(self, person: Person, **extra: Any) -> dict[str, Any]:
        return {"to": {"oa_openid": person.oa_openid}, "template_id": ORDER_TEMPLATE_ID,
                "data": dict(ORDER_DATA), **extra}

    async def push(self, body: dict[str, Any], expect: int = 202) -> dict[str, Any]:
        status, answer = await self.call("POST", "/v1/pushes", body)
        self.assertEqual(status, expect, answer)
        return answer  # type: ignore[no-any-return]

    async def refused(self, body: Any, code: str, status: int | None = None) -> dict[str, Any]:
        before = await self.count()
        got, answer = await self.call("POST", "/v1/pushes", body)
        self.assertEqual(answer["error"]["code"], code, answer)
        if status is not None:
            self.assertEqual(got, status, answer)
        self.assertEqual(await self.count(), before, "a refused push was queued")
        return answer["error"]  # type: ignore[no-any-return]

    async def count(self) -> int:
        row = await fetchone(self.db, "SELECT COUNT(*) FROM pushes")
        assert row is not None
        return int(row[0])

    async def get_push(self, push_id: str) -> dict[str, Any]:
        status, answer = await self.call("GET", f"/v1/pushes/{push_id}")
        self.assertEqual(status, 200, answer)
        return answer  # type: ignore[no-any-return]

    async def eventually(self, check: Callable[[], Awaitable[bool]], what: str,
                         timeout: float = 5.0) -> None:
        deadline = self.io_loop.time() + timeout
        while not await check():
            if self.io_loop.time() > deadline:
                raise AssertionError(f"timed out waiting for {what}")
            await tornado.gen.sleep(0.01)

    async def until_status(self, push_id: str, *states: str, timeout: float = 5.0
                           ) -> dict[str, Any]:
        seen: dict[str, Any] = {}

        async def check() -> bool:
            seen.update(await self.service.get(push_id) or {})
            return seen.get("status") in states

        try:
            await self.eventually(check, f"{push_id} to reach {states}", timeout)
        except AssertionError as exc:
            raise AssertionError(f"{exc} (last: {seen.get('status')})") from None
        return seen


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
