"""JS-SDK: the wx.config signature (official vectors), the emulator's getticket, the jsapi_ticket
held by a TokenManager (single flight, persisted, refreshed ahead, budget) and the admin routes."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import tempfile
from typing import Any

import pytest
import tornado.web
from tornado.testing import AsyncHTTPTestCase, gen_test

from tests.helpers import ADMIN_TOKEN
from tests.sandbox_fixture import START, ClientCase, FakeClock, SandboxTestCase
from wxd import admin
from wxd.admin import jssdk as admin_jssdk
from wxd.errors import TokenBudgetError
from wxd.retry import next_utc_midnight
from wxd.sandbox import FakeWeChat, SandboxServer
from wxd.store.db import Database
from wxd.tokens import TokenManager
from wxd.wechat import jssdk
from wxd.wechat.client import WeChatClient
from wxd.wechat.oa import OfficialAccountAPI
from wxd.wechat.transport import KeepAliveClient

GETTICKET = "/cgi-bin/ticket/getticket"
# The official vector (JS-SDK 附录1), re-computed locally.
TICKET = ("sM4AOVdWfPE4DxkXGEs8VMCPGGVi4C3VM0P37wVUCFvkVAy_90u5h9nbSlYy3-Sl-HhTdfl2fzFy1AOcHKP7qg")
NONCE = "Wm3WZYTPz0wzccnW"
TIMESTAMP = 1414587457
DAY_START = next_utc_midnight(START) + 3600  # 01:00 UTC: the budget day does not change


def test_official_signature_vectors() -> None:
    url = "http://mp.weixin.qq.com?params=value"
    assert jssdk.signature(TICKET, NONCE, TIMESTAMP, url) == \
        "0f9de62fce790f9a083d5c99e95740ceb90c27ed"
    # The #fragment is not signed.
    assert jssdk.signature(TICKET, NONCE, TIMESTAMP, url + "#xxxx") == \
        "0f9de62fce790f9a083d5c99e95740ceb90c27ed"
    assert jssdk.signature(TICKET, NONCE, TIMESTAMP, "http://mp.weixin.qq.com") == \
        "f4d90daf4b3bca3078ab155816175ba34c443a7b"
    assert jssdk.page_url("https://h5.example.com/a?b=c#/route?x=1") == \
        "https://h5.example.com/a?b=c"


def test_nonce_is_16_letters_and_digits() -> None:
    nonces = {jssdk.new_nonce() for _ in range(50)}
    assert len(nonces) == 50
    assert all(len(n) == 16 and n.isascii() and n.isalnum() for n in nonces)


class GetTicketEndpoint(SandboxTestCase):
    def ticket(self, **query: str) -> dict[str, Any]:
        return self.api_json("GET", GETTICKET, query)

    def test_shape_token_check_and_expiry(self) -> None:
        token = self.token("oa")
        answer = self.ticket(access_token=token, type="jsapi")
        assert answer["errcode"] == 0 and answer["expires_in"] == 7200
        assert isinstance(answer["ticket"], str) and len(answer["ticket"]) >= 80
        assert self.ticket(access_token=token, type="jsapi")["ticket"] == answer["ticket"]
        assert self.ticket(access_token=token, type="wx_card")["ticket"] != answer["ticket"]
        assert self.ticket(access_token=token, type="other")["errcode"] == 40097
        assert self.ticket(type="jsapi")["errcode"] == 41001
        assert self.ticket(access_token=self.token("mp"), type="jsapi")["errcode"] == 48001
        newer = self.token("oa")
        assert self.ticket(access_token=newer, type="jsapi")["ticket"] != answer["ticket"]
        self.clock.advance(7200)
        assert self.ticket(access_token=newer, type="jsapi")["errcode"] == 42001


class TicketManagerTest(ClientCase):
    """The jsapi_ticket is TokenManager's job with another fetch (app "jsapi")."""

    database = True

    def manager(self, app: str = "oa", **options: Any) -> TokenManager:
        return self.stack.tokens(app, **options)

    def ticket_manager(self, oa: TokenManager, **options: Any) -> TokenManager:
        options.setdefault("clock", self.clock)
        manager = TokenManager("jsapi", self.creds.oa_appid, "", self.client, self.stack.db,
                               fetch=OfficialAccountAPI(self.client, oa).jsapi_ticket, **options)
        self.stack.managers.append(manager)  # stopped with the stack
        return manager

    def calls(self, path: str) -> int:
        return self.fake.count_calls(path)

    @gen_test(timeout=30)
    async def test_single_flight_persisted_and_refreshed_ahead(self) -> None:
        oa = self.manager("oa")
        tickets = self.ticket_manager(oa, refresh_margin_s=900)
        values = await asyncio.gather(*(tickets.get() for _ in range(200)))
        assert len(set(values)) == 1 and self.calls(GETTICKET) == 1
        current = tickets.current()
        assert current is not None and current[1] == self.clock.now() + 7200
        # Persisted: a restarted daemon reuses it without calling getticket.
        await tickets.stop()
        again = self.ticket_manager(oa)
        await again.start()
        assert again.current() == current and self.calls(GETTICKET) == 1
        # Refreshed ahead of expiry, from the timer's check.
        assert not await again.refresh_if_due()
        self.clock.advance(7200 - 900)
        assert await again.refresh_if_due()
        assert self.calls(GETTICKET) == 2

    @gen_test(timeout=30)
    async def test_a_rejected_access_token_is_refreshed_once(self) -> None:
        oa = self.manager("oa")
        tickets = self.ticket_manager(oa)
        await oa.get()
        self.fake.script_fault(GETTICKET, "40001")
        assert await tickets.get()
        assert self.calls(GETTICKET) == 2 and oa.fetches == 2

    @gen_test(timeout=30)
    async def test_daily_budget(self) -> None:
        tickets = self.ticket_manager(self.manager("oa"), daily_budget=1)
        first = await tickets.get()
        await tickets.invalidate(first)
        with pytest.raises(TokenBudgetError):
            await tickets.get()
        assert self.calls(GETTICKET) == 1


class TicketRoutes(AsyncHTTPTestCase):
    """GET /v1/tickets/jsapi and POST /v1/jssdk/signature; the sandbox on a second port."""

    def get_app(self) -> tornado.web.Application:
        self.clock = FakeClock(DAY_START)
        self.fake = FakeWeChat(users=10, clock=self.clock)
        self.server = SandboxServer(self.fake)
        self.io_loop.run_sync(self.server.start)
        self.http = KeepAliveClient()
        self.tmp = tempfile.TemporaryDirectory()
        self.db = self.io_loop.run_sync(
            lambda: Database.open(os.path.join(self.tmp.name, "wxd.db")))
        client = WeChatClient(self.http, self.server.base_url, 1.0, 5.0)
        creds = self.fake.credentials
        self.oa = TokenManager("oa", creds.oa_appid, creds.oa_secret, client, self.db,
                               clock=self.clock)
        self.ticket = TokenManager("jsapi", creds.oa_appid, "", client, self.db,
                                   clock=self.clock,
                                   fetch=OfficialAccountAPI(client, self.oa).jsapi_ticket)
        common = admin.common_kwargs(ADMIN_TOKEN, None)
        return admin.make_app(common, [admin_jssdk.routes(common, self.ticket, creds.oa_appid,
                                                          self.clock)])

    def tearDown(self) -> None:
        for manager in (self.ticket, self.oa):
            self.io_loop.run_sync(manager.stop)
        self.io_loop.run_sync(self.db.close)
        self.http.close()
        self.io_loop.run_sync(self.server.stop)
        self.tmp.cleanup()
        super().tearDown()

    def call(self, method: str, path: str, body: Any = None) -> tuple[int, dict[str, Any]]:
        response = self.fetch(path, method=method, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
                              body=None if body is None else json.dumps(body))
        return response.code, json.loads(response.body)

    def test_ticket_route_starts_the_refresher_on_first_use(self) -> None:
        assert self.fake.count_calls(GETTICKET) == 0
        status, body = self.call("GET", "/v1/tickets/jsapi")
        assert status == 200 and set(body) == {"ticket", "expires_at"}
        assert body["expires_at"] == int(DAY_START + 7200)
        assert self.call("GET", "/v1/tickets/jsapi")[1] == body
        assert self.fake.count_calls(GETTICKET) == 1

    def test_signature_route(self) -> None:
        url = "https://h5.example.com/page?from=mp&x=%E4%BD%A0"
        status, body = self.call("POST", "/v1/jssdk/signature", {"url": url + "#/tab?y=2"})
        assert status == 200, body
        assert set(body) == {"appId", "timestamp", "nonceStr", "signature"}
        assert body["appId"] == self.fake.credentials.oa_appid
        assert body["timestamp"] == int(DAY_START)
        ticket = self.call("GET", "/v1/tickets/jsapi")[1]["ticket"]
        text = (f"jsapi_ticket={ticket}&noncestr={body['nonceStr']}&timestamp={body['timestamp']}"
                f"&url={url}")
        assert body["signature"] == hashlib.sha1(text.encode()).hexdigest()  # noqa: S324
        for bad in ({}, {"url": 5}, {"url": "ftp://x"}, {"url": "https://" + "a" * 5000}):
            status, error = self.call("POST", "/v1/jssdk/signature", bad)
            assert status == 400, (bad, error)

    def test_no_ticket_is_503(self) -> None:
        self.fake.script_fault(GETTICKET, "45009")
        status, body = self.call("POST", "/v1/jssdk/signature", {"url": "https://h5.example.com/"})
        assert status == 503 and body["error"]["code"] == "ticket_unavailable"
