"""TokenManager and GET /v1/tokens against the sandbox over real HTTP, with an injected clock."""

from __future__ import annotations

import asyncio
import json
import os
import random
import tempfile
from typing import Any

import pytest
import tornado.httpclient
from tornado.testing import AsyncHTTPTestCase, gen_test

from tests.helpers import ADMIN_TOKEN, capture_logs, eventually, exception_text, fetchall, fetchone
from tests.sandbox_fixture import START, ClientCase, FakeClock, WeChatStack
from wxd import admin
from wxd.admin import tokens as admin_tokens
from wxd.errors import TokenBudgetError, TokenUnavailable, TransportError, WeChatAPIError
from wxd.metrics import Registry
from wxd.retry import next_utc_midnight
from wxd.sandbox import FakeWeChat
from wxd.store.db import Database
from wxd.store.tokens import fetch_counts, utc_day
from wxd.tokens import TokenManager
from wxd.wechat.oa import OfficialAccountAPI

STABLE = "/cgi-bin/stable_token"
LEGACY = "/cgi-bin/token"
TEMPLATES = "/cgi-bin/template/get_all_private_template"
DAY_START = next_utc_midnight(START) + 3600  # 01:00 UTC


class TokenCase(ClientCase):
    """ClientCase plus a SQLite file in a temp dir and a factory of TokenManagers."""

    database = True

    def setUp(self) -> None:
        super().setUp()
        self.openid = self.fake.follower_openids[0]

    @property
    def db(self) -> Database:
        return self.stack.db

    async def reopen_db(self) -> None:
        await self.stack.reopen_db()

    def manager(self, app: str = "oa", **options: Any) -> TokenManager:
        options.setdefault("rng", random.Random(4))
        return self.stack.tokens(app, **options)

    def calls(self, path: str) -> int:
        return self.fake.count_calls(path)

    def token_errors(self) -> list[Any]:
        return [c for c in self.fake.calls if c.errcode in (40001, 40014, 42001)]


class TestSingleFlight(TokenCase):
    @gen_test(timeout=60)
    async def test_cold_start_1000_concurrent_get_is_one_fetch(self) -> None:
        for app, mode, path in (("oa", "stable", STABLE), ("mp", "legacy", LEGACY)):
            manager = self.manager(app, mode=mode)
            tokens = await asyncio.gather(*(manager.get() for _ in range(1000)))
            assert len(set(tokens)) == 1
            assert self.calls(path) == 1
            assert manager.fetches == 1

    @gen_test(timeout=60)
    async def test_1000_failures_with_the_same_expired_token_refresh_once(self) -> None:
        manager = self.manager()
        await manager.start()
        oa = OfficialAccountAPI(self.client, manager)
        stale = await manager.get()
        self.fake.tokens.expire_all()  # every business call with `stale` now answers 42001
        infos = await asyncio.gather(*(oa.user_info(self.openid) for _ in range(1000)))
        assert {info["openid"] for info in infos} == {self.openid}
        assert self.calls(STABLE) == 2
        assert await manager.get() != stale
        assert len(self.token_errors()) == 1000  # each failed once, each retry succeeded

    @gen_test(timeout=60)
    async def test_1000_failures_with_a_superseded_legacy_token_refresh_once(self) -> None:
        manager = self.manager(mode="legacy")
        await manager.start()
        oa = OfficialAccountAPI(self.client, manager)
        # Another process takes a /cgi-bin/token; ours dies 5 minutes later ("not latest").
        await self.client.fetch_token(self.creds.oa_appid, self.creds.oa_secret, "legacy")
        self.clock.advance(301)
        infos = await asyncio.gather(*(oa.templates() for _ in range(1000)))
        assert len(infos) == 1000
        assert self.calls(LEGACY) == 3
        assert {c.errcode for c in self.token_errors()} == {40001}

    @gen_test
    async def test_invalidating_an_old_token_does_nothing(self) -> None:
        manager = self.manager()
        await manager.start()
        await manager.invalidate("86_" + "x" * 40)
        assert self.calls(STABLE) == 1
        assert manager.current() is not None


class TestRestart(TokenCase):
    @gen_test
    async def test_valid_stored_token_is_reused_and_expired_one_refetched(self) -> None:
        first = self.manager()
        await first.start()
        token = await first.get()
        await first.stop()
        await self.reopen_db()

        second = self.manager()
        await second.start()
        assert await second.get() == token
        assert self.calls(STABLE) == 1  # zero fetches on restart

        await second.stop()
        await self.reopen_db()
        self.clock.advance(7200)
        third = self.manager()
        await third.start()
        fresh = await third.get()
        assert fresh != token
        assert self.calls(STABLE) == 2  # exactly one
        row = await fetchone(self.db, "SELECT access_token, expires_at FROM tokens WHERE app='oa'")
        assert row is not None and row["access_token"] == fresh
        assert row["expires_at"] == pytest.approx(self.clock() + 7200)

    @gen_test
    async def test_a_stored_token_of_another_appid_is_ignored(self) -> None:
        await self.db.write(lambda conn: conn.execute(
            "INSERT INTO tokens VALUES ('oa', 'wx0000000000000000', '86_old', ?, ?)",
            (self.clock() + 7000, self.clock())))
        manager = self.manager()
        await manager.start()
        assert await manager.get() != "86_old"
        assert self.calls(STABLE) == 1


class TestTokenErrors(TokenCase):
    @gen_test
    async def test_business_40001_one_refresh_one_retry_then_the_error(self) -> None:
        manager = self.manager()
        await manager.start()
        oa = OfficialAccountAPI(self.client, manager)
        self.fake.script_fault("/cgi-bin/user/info", "40001", times=2)
        with pytest.raises(WeChatAPIError) as info:
            await oa.user_info(self.openid)
        assert info.value.errcode == 40001 and info.value.token_invalid
        assert self.calls("/cgi-bin/user/info") == 2
        assert self.calls(STABLE) == 2

        # Stable mode gave the same token back; failing again within a minute refetches nothing.
        self.fake.script_fault("/cgi-bin/user/info", "40001")
        assert (await oa.user_info(self.openid))["openid"] == self.openid
        assert self.calls(STABLE) == 2
        self.clock.advance(61)
        self.fake.script_fault("/cgi-bin/user/info", "40014")
        assert (await oa.user_info(self.openid))["openid"] == self.openid
        assert self.calls(STABLE) == 3

    @gen_test
    async def test_oa_and_mp_tokens_never_cross(self) -> None:
        oa_manager, mp_manager = self.manager("oa"), self.manager("mp", mode="legacy")
        await oa_manager.start()
        await mp_manager.start()
        assert await oa_manager.get() != await mp_manager.get()
        oa = OfficialAccountAPI(self.client, oa_manager)
        await oa.user_get()
        await oa.user_info(self.openid)
        assert {c.app for c in self.fake.calls} == {"oa", "mp"}
        assert all(c.errcode == 0 for c in self.fake.calls)  # no 48001 anywhere
        stable = next(c for c in self.fake.calls if c.path == STABLE)
        assert stable.body["appid"] == self.creds.oa_appid
        legacy = next(c for c in self.fake.calls if c.path == LEGACY)
        assert legacy.query["appid"] == self.creds.mp_appid
        rows = await fetchall(self.db, "SELECT app, appid FROM tokens ORDER BY app")
        assert [tuple(r) for r in rows] == [("mp", self.creds.mp_appid),
                                            ("oa", self.creds.oa_appid)]
        # The sandbox enforces isolation: the MP token on an OA API is 48001, terminal, and
        # is not "fixed" by refreshing.
        wrong = OfficialAccountAPI(self.client, mp_manager)
        with pytest.raises(WeChatAPIError) as info:
            await wrong.user_get()
        assert info.value.errcode == 48001 and info.value.kind == "terminal"
        assert self.calls(LEGACY) == 1


class TestRefresher(TokenCase):
    @gen_test
    async def test_legacy_renews_once_before_expiry(self) -> None:
        manager = self.manager(mode="legacy")
        await manager.start()
        token = await manager.get()
        expires_at = START + 7200
        assert not manager.needs_refresh(self.clock())
        assert not manager.needs_refresh(expires_at - 900 * 1.2 - 1)
        assert manager.needs_refresh(expires_at - 900)
        while await manager.get() == token:
            self.clock.advance(30)
            await manager.refresh_if_due()
        assert expires_at - 900 * 1.2 - 30 <= self.clock() <= expires_at - 900 + 30
        assert self.calls(LEGACY) == 2

    @gen_test(timeout=60)
    async def test_stable_keeps_a_valid_token_for_three_hours(self) -> None:
        manager = self.manager()
        await manager.start()
        oa = OfficialAccountAPI(self.client, manager)
        seen = [await manager.get()]
        for _ in range(3 * 3600 // 30):
            self.clock.advance(30)
            await manager.refresh_if_due()
            await oa.templates()
            if (token := await manager.get()) != seen[-1]:
                seen.append(token)
        assert len(seen) == 2  # renewed once, before the first token expired
        assert self.token_errors() == []
        # stable_token answers the remaining lifetime; halving the margin costs a few fetches
        assert 2 <= self.calls(STABLE) <= 6

    @gen_test(timeout=60)
    async def test_legacy_48_hours_no_self_inflicted_40001(self) -> None:
        manager = self.manager(mode="legacy")
        await manager.start()
        oa = OfficialAccountAPI(self.client, manager)
        shared: tuple[str, float] | None = None  # another local process caching /v1/tokens
        for _ in range(48 * 3600 // 300):
            self.clock.advance(300)
            await manager.refresh_if_due()
            await oa.templates()
            if shared is None or self.clock() >= shared[1]:
                shared = manager.current()
                assert shared is not None
            await self.client.call("GET", TEMPLATES, params={"access_token": shared[0]})
        assert self.token_errors() == []
        assert 27 <= self.calls(LEGACY) <= 35  # about one per (7200 - 900 - jitter) s

    @gen_test
    async def test_legacy_current_expiry_ends_five_minutes_after_the_next_refresh(self) -> None:
        manager = self.manager(mode="legacy", refresh_margin_s=900)
        await manager.start()
        current = manager.current()
        assert current is not None
        assert current[1] <= START + 7200 - 900 + 300
        stable = self.manager("mp")
        await stable.start()
        current = stable.current()
        assert current is not None and current[1] == START + 7200

    @gen_test
    async def test_timer_refreshes_and_stops_cleanly(self) -> None:
        manager = self.manager(mode="legacy", check_interval_s=30)
        await manager.start()
        await manager.start()  # idempotent
        assert manager.state == "running"
        await self.ticking()
        self.clock.advance(7200 - 200)  # the timer's sleep ends: one tick, one refresh
        await eventually(lambda: self.calls(LEGACY), "the timer's refresh", until=lambda n: n == 2)
        await self.ticking()  # the next tick waits 30 s (fake) again
        assert self.calls(LEGACY) == 2  # the timer refreshed, once
        await manager.stop()
        await manager.stop()
        assert manager.state == "stopped" and self.clock.pending() == []  # no timer left
        self.clock.advance(7200)
        assert self.calls(LEGACY) == 2

    async def ticking(self) -> None:
        """Until the refresher task sleeps on the clock (its next tick 30 s ahead)."""
        await eventually(self.clock.pending, "the timer to wait 30 s",
                         until=lambda pending: pending == [self.clock() + 30])

    @gen_test
    async def test_quota_error_is_not_retried(self) -> None:
        manager = self.manager()
        self.fake.script_fault(STABLE, "45009")
        with capture_logs() as logs, pytest.raises(TokenUnavailable) as info:
            await manager.get()
        assert isinstance(info.value.cause, WeChatAPIError) and info.value.cause.kind == "quota"
        assert (info.value.errcode, info.value.retry_at) == (45009, self.clock() + 3600)
        with pytest.raises(TokenUnavailable):
            await manager.get()
        assert not await manager.refresh_if_due()
        assert self.calls(STABLE) == 1
        assert manager.retry_at == self.clock() + 3600
        assert len(logs.lines("wxd.tokens")) == 1


class TestBackoff(TokenCase):
    request_timeout_s = 0.5

    @gen_test(timeout=10)
    async def test_transient_failures_back_off_and_recover(self) -> None:
        manager = self.manager()
        for fault in ("-1", "http500", "hang", "reset"):
            self.fake.script_fault(STABLE, fault)
        delays = []
        with capture_logs() as logs:
            await manager.start()  # does not raise: the timer will retry
            assert manager.current() is None
            for expected_calls in (1, 2, 3, 4):
                assert self.calls(STABLE) == expected_calls
                delays.append(manager.retry_at - self.clock())
                assert not manager.needs_refresh(self.clock())
                with pytest.raises(TokenUnavailable) as info:
                    await manager.get()  # backing off: raises without calling WeChat
                assert isinstance(info.value.cause, (WeChatAPIError, TransportError))
                assert not await manager.refresh_if_due()
                assert self.calls(STABLE) == expected_calls
                self.clock.advance(delays[-1])
                assert await manager.refresh_if_due() is (expected_calls == 4)
        assert self.calls(STABLE) == 5
        assert manager.current() is not None
        assert delays == sorted(delays) and 4 <= delays[0] <= 5 and delays[-1] >= 32
        assert len(logs.lines("wxd.tokens")) == 4  # one line per failure
        assert manager.retry_at == 0.0

    @gen_test
    async def test_stop_abandons_a_hanging_fetch(self) -> None:
        manager = self.manager(mode="legacy")
        self.fake.script_fault(LEGACY, "hang")
        waiter = asyncio.ensure_future(manager.get())
        await eventually(lambda: self.calls(LEGACY), "the fetch to reach WeChat")
        await manager.stop()
        with pytest.raises(asyncio.CancelledError):
            await waiter


class TestUnreachable(TokenCase):
    """A refused token fetch is no verdict on the call that needed the token: get() raises
    TokenUnavailable (errcode, the IP WeChat saw, when the next fetch is tried); the backoff
    probes; on_available callbacks run once a fetch succeeds again."""

    @gen_test
    async def test_refusals_raise_token_unavailable_then_listeners_hear_the_recovery(self) -> None:
        manager = self.manager()
        heard: list[float] = []
        manager.on_available(lambda: heard.append(self.clock()))
        oa = OfficialAccountAPI(self.client, manager)
        for errcode in (40164, 89503, 40125):
            self.fake.refuse_tokens(errcode, ips=["203.0.113.7"], seconds=600)
            with pytest.raises(TokenUnavailable) as info:
                await oa.user_get()  # a business call meets the token's refusal
            failure = info.value
            assert failure.errcode == errcode and failure.app == "oa"
            assert failure.ip == ("203.0.113.7" if errcode == 40164 else None)
            assert isinstance(failure.cause, WeChatAPIError)
            assert failure.retry_at == manager.retry_at > self.clock()
            assert self.calls("/cgi-bin/user/get") == 0  # never asked without a token
            # Backing off: the probes come no faster than the backoff, with the same answer.
            fetches = self.calls(STABLE)
            with pytest.raises(TokenUnavailable):
                await manager.get()
            assert self.calls(STABLE) == fetches and heard == []
            self.clock.advance(600)  # the switch expires by the emulator's clock
            assert await manager.refresh_if_due()
            assert heard == [self.clock()]
            heard.clear()
            self.clock.advance(7200)  # the token expires: the next refusal is met at once
        self.fake.script_fault("token", "http500", None, seconds=60)
        with pytest.raises(TokenUnavailable) as info:
            await manager.get()
        assert info.value.errcode is None and isinstance(info.value.cause, TransportError)
        assert "HTTP 500" in str(info.value)


class TestBudget(TokenCase):
    @gen_test
    async def test_daily_budget_stops_fetching_until_the_next_utc_day(self) -> None:
        self.clock.set(DAY_START)
        manager = self.manager(mode="legacy", daily_budget=2)
        await manager.get()
        self.clock.advance(7200)
        await manager.get()
        self.clock.advance(7200)
        with capture_logs() as logs:
            with pytest.raises(TokenBudgetError) as info:
                await manager.get()
            with pytest.raises(TokenBudgetError):
                await manager.get()
        assert "daily budget of 2" in str(info.value)
        assert self.calls(LEGACY) == 2
        [line] = logs.lines("wxd.tokens")
        assert "budget" in line
        day = utc_day(self.clock())
        assert await self.db.read(lambda conn: fetch_counts(conn, day)) == {"oa": 2}
        self.clock.set(next_utc_midnight(self.clock()) + 1)
        await manager.get()
        assert self.calls(LEGACY) == 3


class TestSecrets(TokenCase):
    @gen_test
    async def test_no_token_or_secret_in_logs_errors_or_reprs(self) -> None:
        registry = Registry()
        manager = self.manager(mode="legacy", metrics=registry)
        texts = [repr(manager)]
        with capture_logs() as logs:
            self.fake.script_fault(LEGACY, "40125")
            await manager.start()
            assert manager.fetches == 1
            self.clock.advance(manager.retry_at - self.clock())
            await manager.refresh_if_due()
            token = await manager.get()
            oa = OfficialAccountAPI(self.client, manager)
            self.fake.script_fault("/cgi-bin/user/info", "40001", times=2)
            try:
                await oa.user_info(self.openid)
            except WeChatAPIError as exc:
                texts.append(exception_text(exc))
        texts.append(logs.text)
        for text in texts:
            assert self.creds.oa_secret not in text
            assert token not in text
        await registry.collect()
        rendered = registry.render()
        assert 'wxd_token_fetches_total{app="oa"} 3' in rendered
        assert 'wxd_token_fetch_failures_total{app="oa"} 1' in rendered
        assert 'wxd_token_expires_in_seconds{app="oa"}' in rendered


class TestAdminRoute(AsyncHTTPTestCase):
    """GET /v1/tokens/{oa|mp} on the admin app; the sandbox runs on a second port."""

    def get_app(self) -> tornado.web.Application:
        self.managers: dict[str, TokenManager] = {}
        common = admin.common_kwargs(ADMIN_TOKEN, None)
        return admin.make_app(common, [admin_tokens.routes(common, self.managers)])

    def setUp(self) -> None:
        super().setUp()
        self.clock = FakeClock(DAY_START)  # far from a UTC midnight: the budget day is fixed
        self.fake = FakeWeChat(users=10, clock=self.clock)
        self.tmp = tempfile.TemporaryDirectory()
        self.stack = WeChatStack(self.fake, os.path.join(self.tmp.name, "wxd.db"),
                                 clock=self.clock, connect_timeout_s=1.0, request_timeout_s=5.0)
        self.io_loop.run_sync(self.stack.start)
        self.managers["oa"] = self.stack.tokens(daily_budget=1)

    def tearDown(self) -> None:
        self.io_loop.run_sync(self.stack.close)
        self.tmp.cleanup()
        super().tearDown()

    def get(self, path: str, auth: bool = True) -> tuple[int, dict[str, Any]]:
        headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"} if auth else {}
        response = self.fetch(path, headers=headers)
        assert self.fake.credentials.oa_secret.encode() not in response.body
        return response.code, json.loads(response.body)

    def test_token_route(self) -> None:
        status, body = self.get("/v1/tokens/oa")
        assert status == 200 and set(body) == {"access_token", "expires_at"}
        assert body["expires_at"] == int(DAY_START + 7200)
        assert self.get("/v1/tokens/oa")[1] == body  # served from the cache
        assert self.fake.count_calls(STABLE) == 1
        status, body = self.get("/v1/tokens/oa", auth=False)
        assert status == 401 and body["error"]["code"] == "unauthorized"
        status, body = self.get("/v1/tokens/mp")
        assert status == 404 and body["error"]["code"] == "app_not_configured"
        assert self.get("/v1/tokens/xx")[0] == 404
        # The budget (1) is spent: once the token expires, no token can be had.
        self.clock.advance(7200)
        status, body = self.get("/v1/tokens/oa")
        assert status == 503 and body["error"]["code"] == "token_unavailable"
        assert "budget" in body["error"]["message"]
        assert self.fake.count_calls(STABLE) == 1
