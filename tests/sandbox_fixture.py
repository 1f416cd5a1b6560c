"""Sandbox helpers for tests: a fake clock, the `sandbox` fixture and SandboxTestCase.

`sandbox` yields a started SandboxThread (own loop, free loopback port, 200 people) for code
that is not async or runs in another process; SandboxTestCase mounts make_app(fake) in a
tornado AsyncHTTPTestCase for endpoint tests on the test's own IOLoop.
"""

from __future__ import annotations

import json
import urllib.parse
from collections.abc import Iterator
from typing import Any, ClassVar

import pytest
from tornado.httpclient import HTTPResponse
from tornado.testing import AsyncHTTPTestCase

from tests.helpers import START, FakeClock
from wxd.sandbox import FakeWeChat, SandboxApplication, SandboxThread, make_app

__all__ = ["START", "FakeClock", "SandboxTestCase", "sandbox"]


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
