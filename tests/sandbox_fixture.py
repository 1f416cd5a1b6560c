"""The sandbox and what wxd talks to it through, for tests.

- `sandbox` (a pytest fixture) yields a started SandboxThread (own loop, free loopback port,
  200 people) for code that is not async or runs in another process;
- SandboxTestCase mounts make_app(fake) in a tornado AsyncHTTPTestCase for endpoint tests on
  the test's own IOLoop; ClientCase adds a WeChatClient pointed at it;
- WeChatStack is the one builder of "sandbox + KeepAliveClient + WeChatClient + Database +
  TokenManagers" for test cases whose app under test is something else (admin, webhook):
  the sandbox then listens on a second port;
- FetchedToken is a minimal TokenSource (the protocol only, no TokenManager).
"""

from __future__ import annotations

import json
import os
import tempfile
import urllib.parse
from collections.abc import Iterator
from typing import Any, ClassVar

import pytest
from tornado.httpclient import HTTPResponse
from tornado.testing import AsyncHTTPTestCase

from tests.helpers import START, FakeClock
from wxd.clock import Clock
from wxd.metrics import Registry
from wxd.sandbox import FakeWeChat, SandboxApplication, SandboxServer, SandboxThread, make_app
from wxd.store.db import Database
from wxd.tokens import TokenManager
from wxd.wechat.client import WeChatClient
from wxd.wechat.transport import KeepAliveClient

__all__ = ["START", "ClientCase", "FakeClock", "FetchedToken", "SandboxTestCase", "WeChatStack",
           "sandbox"]


@pytest.fixture
def sandbox() -> Iterator[SandboxThread]:
    """A running sandbox on 127.0.0.1:<free port> with 200 seeded people (seed 7)."""
    with SandboxThread(FakeWeChat(users=200, seed=7)) as thread:
        yield thread


class SandboxTestCase(AsyncHTTPTestCase):
    """AsyncHTTPTestCase serving make_app(self.fake); `self.clock` drives the fake's time.

    Override `users`, `seed` or `fake_options` (extra FakeWeChat keyword arguments), or
    make_fake() itself.
    """

    users: ClassVar[int] = 200
    seed: ClassVar[int] = 0
    fake_options: ClassVar[dict[str, Any]] = {}

    def make_fake(self, clock: FakeClock) -> FakeWeChat:
        return FakeWeChat(users=self.users, seed=self.seed, clock=clock, **self.fake_options)

    def get_app(self) -> SandboxApplication:
        self.clock = FakeClock()
        self.fake = self.make_fake(self.clock)
        self.sandbox_app = make_app(self.fake)
        return self.sandbox_app

    def tearDown(self) -> None:
        self.io_loop.run_sync(self.sandbox_app.aclose)
        super().tearDown()

    def call_api(
        self,
        method: str,
        path: str,
        query: dict[str, str] | None = None,
        body: Any = None,
        **kwargs: Any,
    ) -> HTTPResponse:
        """One request; `body` that is not bytes/str is sent as JSON."""
        url = path + ("?" + urllib.parse.urlencode(query) if query else "")
        if body is not None and not isinstance(body, (bytes, str)):
            body = json.dumps(body, ensure_ascii=False).encode("utf-8")
        if method == "POST" and body is None:
            body = b""
        return self.fetch(url, method=method, body=body, **kwargs)

    def api_json(
        self, method: str, path: str, query: dict[str, str] | None = None, body: Any = None
    ) -> dict[str, Any]:
        """One request that must answer HTTP 200 with a JSON object."""
        response = self.call_api(method, path, query, body)
        assert response.code == 200, (response.code, response.body)
        value = json.loads(response.body)
        assert isinstance(value, dict)
        return value

    def token(self, app: str = "oa") -> str:
        """A fresh /cgi-bin/token access_token for "oa" or "mp"."""
        creds = self.fake.credentials
        appid, secret = (
            (creds.oa_appid, creds.oa_secret) if app == "oa" else (creds.mp_appid, creds.mp_secret)
        )
        answer = self.api_json(
            "GET",
            "/cgi-bin/token",
            {"grant_type": "client_credential", "appid": appid, "secret": secret},
        )
        token = answer["access_token"]
        assert isinstance(token, str)
        return token


class FetchedToken:
    """A real TokenSource without TokenManager: fetches a token (`mode` "stable" or "legacy")
    when it has none, forgets it on invalidate. `issued` and `invalidated` record both."""

    def __init__(self, client: WeChatClient, appid: str, secret: str,
                 mode: str = "legacy") -> None:
        self.client, self.appid, self.secret, self.mode = client, appid, secret, mode
        self.token: str | None = None
        self.issued: list[str] = []
        self.invalidated: list[str] = []

    async def get(self) -> str:
        if self.token is None:
            self.token, _ = await self.client.fetch_token(self.appid, self.secret, self.mode)
            self.issued.append(self.token)
        return self.token

    async def invalidate(self, token: str) -> None:
        self.invalidated.append(token)
        if token == self.token:
            self.token = None


class WeChatStack:
    """A sandbox serving `fake` on a free loopback port (or the one already at `base_url`),
    the KeepAliveClient and WeChatClient wxd calls it with, a Database file at `db_path` (none
    without one), and the TokenManagers made by tokens(). `await start()`, then
    `await close()` (managers, database, sandbox, connections).

    Timeouts and connection settings are WeChatClient's/KeepAliveClient's; `clock` is every
    TokenManager's unless given; `metrics` is shared by the client and the database.
    """

    client: WeChatClient

    def __init__(self, fake: FakeWeChat, db_path: str | None = None, *,
                 base_url: str | None = None, clock: Clock | None = None,
                 connect_timeout_s: float = 5.0, request_timeout_s: float = 10.0,
                 max_connections: int = 64, idle_timeout_s: float = 30.0,
                 metrics: Registry | None = None) -> None:
        self.fake = fake
        self.creds = fake.credentials
        self.db_path = db_path
        self.clock = clock
        self.metrics = metrics
        self.server = SandboxServer(fake) if base_url is None else None
        self.base_url = base_url or ""
        self.upstream = KeepAliveClient(max_connections, idle_timeout_s=idle_timeout_s)
        self._timeouts = (connect_timeout_s, request_timeout_s)
        self.managers: list[TokenManager] = []
        self._db: Database | None = None

    async def start(self) -> WeChatStack:
        if self.server is not None:
            await self.server.start()
            self.base_url = self.server.base_url
        self.client = WeChatClient(self.upstream, self.base_url, *self._timeouts, self.metrics)
        if self.db_path is not None:
            self._db = await Database.open(self.db_path, metrics=self.metrics)
        return self

    @property
    def db(self) -> Database:
        assert self._db is not None, "a WeChatStack with a db_path, started"
        return self._db

    def credentials(self, app: str = "oa") -> tuple[str, str]:
        """(appid, secret) of "oa" or "mp"."""
        c = self.creds
        return (c.oa_appid, c.oa_secret) if app == "oa" else (c.mp_appid, c.mp_secret)

    def tokens(self, app: str = "oa", **options: Any) -> TokenManager:
        """A TokenManager for `app` on this stack's client and database (stopped by close())."""
        if self.clock is not None:
            options.setdefault("clock", self.clock)
        manager = TokenManager(app, *self.credentials(app), self.client, self.db, **options)
        self.managers.append(manager)
        return manager

    def token_source(self, app: str = "oa", mode: str = "stable") -> FetchedToken:
        """A FetchedToken for `app` (the protocol alone, no TokenManager)."""
        return FetchedToken(self.client, *self.credentials(app), mode)

    async def stop_tokens(self) -> None:
        """Stop every TokenManager made so far (a restart makes new ones)."""
        managers, self.managers = self.managers, []
        for manager in managers:
            await manager.stop()

    async def reopen_db(self) -> Database:
        """Close the database and open the file again (what a restarted process sees)."""
        await self.db.close()
        self._db = await Database.open(self.db.path, metrics=self.metrics)
        return self._db

    async def close(self) -> None:
        await self.stop_tokens()
        if self._db is not None:
            await self._db.close()
        if self.server is not None:
            await self.server.stop()
        self.upstream.close()


class ClientCase(SandboxTestCase):
    """The sandbox on the test's loop plus a WeChatStack pointed at it: `self.client`
    (WeChatClient, 100 connections, metrics in `self.registry`), `self.http` (its
    KeepAliveClient); with `database = True` also a database file (`self.stack.db`, and
    TokenManagers from `self.stack.tokens()`)."""

    # Generous: 1,000-call bursts queue in the client (tornado's queue timeout is the smaller
    # of the two timeouts) and the machine may be busy.
    request_timeout_s = 30.0
    database = False

    def setUp(self) -> None:
        super().setUp()
        self.tmp = tempfile.TemporaryDirectory()
        self.addCleanup(self.tmp.cleanup)
        self.registry = Registry()
        self.stack = WeChatStack(
            self.fake, os.path.join(self.tmp.name, "wxd.db") if self.database else None,
            base_url=self.get_url(""), clock=self.clock, connect_timeout_s=30.0,
            request_timeout_s=self.request_timeout_s, max_connections=100,
            metrics=self.registry)
        self.io_loop.run_sync(self.stack.start)
        self.http, self.client, self.creds = self.stack.upstream, self.stack.client, self.fake.credentials

    def tearDown(self) -> None:
        self.io_loop.run_sync(self.stack.close)
        super().tearDown()

    def oa_source(self) -> FetchedToken:
        return self.stack.token_source(mode="legacy")

    def secrets(self) -> list[str]:
        return [self.creds.oa_secret, self.creds.mp_secret]
