"""PushCase: the harness of the push tests (test_pushes.py: enqueue through the admin API;
test_workers.py: delivery by PushWorkers), and the push constants they share."""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any

import tornado.web
from tornado.testing import AsyncHTTPTestCase

from tests.helpers import ADMIN_TOKEN, eventually, fetchone
from tests.sandbox_fixture import FakeClock, WeChatStack
from wxd.admin import common_kwargs, make_app
from wxd.admin import pushes as pushes_admin
from wxd.metrics import Registry
from wxd.push_workers import PushWorkers
from wxd.pushes import PushService
from wxd.sandbox import ORDER_TEMPLATE_ID, Call, FakeWeChat, Person
from wxd.store import followers, ingest, mp_users
from wxd.wechat.oa import OfficialAccountAPI

TEMPLATES_PATH = "/cgi-bin/template/get_all_private_template"
SEND_PATH = "/cgi-bin/message/template/send"
ORDER_DATA = {"character_string1": "A20240101001", "thing2": "巧克力", "amount3": "39.8元",
              "time4": "2024年1月1日 12:00", "phrase5": "配送中"}
NOTICE_DATA = {"thing1": "您的预约已确认", "time2": "2024-01-01 09:30"}


def sends(case: PushCase) -> list[Call]:
    """Every template/send call the case's sandbox received, in order."""
    return [c for c in case.fake.calls if c.path == SEND_PATH]


class PushCase(AsyncHTTPTestCase):
    """Admin app (push routes) + a WeChatStack (sandbox on a second port, real SQLite file,
    real TokenManager/WeChatClient) + PushService; make_workers() adds PushWorkers.

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
        self.stack = await WeChatStack(
            self.fake, self.path, clock=self.clock, connect_timeout_s=2.0,
            request_timeout_s=self.request_timeout_s,
            idle_timeout_s=30.0 if self.keep_alive else 0.0, metrics=self.metrics).start()
        self.upstream, self.client, self.db = self.stack.upstream, self.stack.client, self.stack.db
        self.tokens = self.stack.tokens()
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
        await self.stack.close()

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

    async def until_status(self, push_id: str, *states: str, timeout: float = 4.0
                           ) -> dict[str, Any]:
        """The push (PushService.get) once its status is one of `states`."""
        row = await eventually(
            lambda: self.service.get(push_id), f"{push_id} to reach {states}",
            until=lambda row: row is not None and row["status"] in states, timeout=timeout)
        assert row is not None
        return row
