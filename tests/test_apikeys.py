"""Scoped API keys: issued once and stored as a hash, every scope boundary on every admin route,
revocation at once, last use written at most once a minute, never in logs; `wxd keys`."""

from __future__ import annotations

import json
import pathlib
import re
import sqlite3
import tempfile
from collections.abc import Iterator
from typing import Any

import pytest
from tornado.httpclient import AsyncHTTPClient
from tornado.testing import AsyncTestCase, gen_test

from tests.admin_routes import routes
from tests.helpers import ADMIN_TOKEN, FakeClock, capture_logs, config_text
from wxd import config
from wxd.admin.openapi import DOCUMENT
from wxd.admin.scopes import ANY, PUBLIC, ROUTE_SCOPES, required_scope
from wxd.apikeys import SCOPES, ApiKeyError, ApiKeys, key_hash
from wxd.daemon import Daemon
from wxd.store.db import Database

KEY_RE = re.compile(r"wxd_[A-Za-z0-9_-]{32,}")
# A concrete value for each path parameter when a route is called ("missing1" elsewhere).
SAMPLE = {"/v1/tokens/{}": "oa", "/v1/keys/{}": "nobody"}


def routed(daemon: Daemon) -> Iterator[tuple[str, str, str, str]]:
    """(path template, path to call, METHOD, route_name) for every method of every route."""
    assert daemon.admin is not None
    for path, method, handler in routes(daemon.admin.app):
        call = path.replace("{}", SAMPLE.get(path, "missing1"))
        yield path, call, method.upper(), handler.route_name  # type: ignore[attr-defined]


def test_the_table_names_known_scopes_and_fails_closed() -> None:
    for methods in ROUTE_SCOPES.values():
        for scope in methods.values():
            assert scope in SCOPES or scope in (ANY, PUBLIC)
    assert required_scope("no_such_route", "GET") == "admin"
    assert required_scope("pushes", "DELETE") == "admin"


class KeyServiceTest(AsyncTestCase):
    def setUp(self) -> None:
        super().setUp()
        tmp = tempfile.TemporaryDirectory()
        self.addCleanup(tmp.cleanup)
        self.path = str(pathlib.Path(tmp.name) / "wxd.db")
        self.clock = FakeClock()
        self.db = self.io_loop.run_sync(lambda: Database.open(self.path))
        self.keys = ApiKeys(self.db, clock=self.clock, touch_interval_s=60)
        self.io_loop.run_sync(self.keys.start)

    def tearDown(self) -> None:
        self.io_loop.run_sync(self.keys.stop)
        self.io_loop.run_sync(self.db.close)
        super().tearDown()

    def rows(self) -> list[tuple[Any, ...]]:
        with sqlite3.connect(self.path) as conn:
            return conn.execute("SELECT * FROM api_keys").fetchall()

    @gen_test
    async def test_issued_once_stored_as_a_hash(self) -> None:
        info, key = await self.keys.create("billing", ["pushes:write", "tokens:read", "tokens:read"])
        assert KEY_RE.fullmatch(key) and len(key) >= 4 + 32
        assert info.scopes == ("tokens:read", "pushes:write")
        assert self.keys.scopes_of(key) == frozenset({"tokens:read", "pushes:write"})
        assert self.keys.scopes_of(key + "x") is None and self.keys.scopes_of("") is None
        [row] = self.rows()
        assert key not in repr(row) and key_hash(key) in row
        assert key not in pathlib.Path(self.path + "-wal").read_bytes().decode("latin-1")
        assert key not in repr(info) and key not in json.dumps([i.to_json() for i in self.keys.listing()])
        with pytest.raises(ApiKeyError, match="exists"):
            await self.keys.create("billing", ["admin"])
        for name, scopes in (("bad name", ["admin"]), ("x", []), ("x", ["tokens:write"])):
            with pytest.raises(ApiKeyError):
                await self.keys.create(name, scopes)
        # Another instance (a restarted daemon) loads the key from the database.
        other = ApiKeys(self.db, clock=self.clock)
        await other.start()
        assert other.scopes_of(key) == frozenset({"tokens:read", "pushes:write"})
        await other.stop()

    @gen_test
    async def test_revoked_at_once(self) -> None:
        _, key = await self.keys.create("ops", ["console"])
        assert self.keys.scopes_of(key) is not None
        assert await self.keys.revoke("ops")
        assert self.keys.scopes_of(key) is None
        assert self.rows() == [] and not await self.keys.revoke("ops")

    @gen_test
    async def test_last_use_is_written_at_most_once_a_minute(self) -> None:
        _, key = await self.keys.create("ops", ["console"])
        start = self.clock.now()
        for _ in range(100):
            self.keys.scopes_of(key)
            self.clock.advance(0.5)
            await self.keys.flush()  # what the timer calls
        # 50 s of requests: one write (the first use), the time in memory is the newest.
        assert self.rows()[0][4] == start
        assert self.keys.listing()[0].last_used_at == start + 49.5
        self.clock.advance(11)
        assert await self.keys.flush() == 1 and self.rows()[0][4] == start + 49.5
        assert await self.keys.flush() == 0
        self.keys.scopes_of(key)
        await self.keys.stop()  # writes what is pending
        assert self.rows()[0][4] == self.clock.now()


class ScopeBoundaryTest(AsyncTestCase):
    """Every route of a real Daemon with keys that lack, and keys that hold, its scope."""

    def setUp(self) -> None:
        super().setUp()
        tmp = tempfile.TemporaryDirectory()
        self.addCleanup(tmp.cleanup)
        self.config = config.load_text(config_text(str(pathlib.Path(tmp.name) / "wxd.db")))
        self.http = AsyncHTTPClient(force_instance=True)

    def tearDown(self) -> None:
        self.http.close()
        super().tearDown()

    async def call(self, daemon: Daemon, method: str, path: str, key: str | None,
                   body: Any = None) -> tuple[int, dict[str, Any]]:
        assert daemon.admin is not None
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        if body is None and method in ("POST", "PUT", "PATCH"):
            body = {}
        response = await self.http.fetch(
            f"http://127.0.0.1:{daemon.admin.port}{path}", method=method, headers=headers,
            body=None if body is None else json.dumps(body), raise_error=False,
            allow_nonstandard_methods=True)
        text = response.body.decode()
        try:
            value = json.loads(text)
        except ValueError:
            value = {"text": text}
        return response.code, value if isinstance(value, dict) else {"value": value}

    async def key(self, daemon: Daemon, name: str, scopes: list[str]) -> str:
        status, body = await self.call(daemon, "POST", "/v1/keys", ADMIN_TOKEN,
                                       {"name": name, "scopes": scopes})
        assert status == 201, body
        assert KEY_RE.fullmatch(body["key"])
        return str(body["key"])

    @gen_test(timeout=90)
    async def test_every_scope_boundary_on_every_route(self) -> None:
        daemon = Daemon(self.config)
        await daemon.start()
        try:
            all_but = {scope: await self.key(daemon, f"all-but-{scope.replace(':', '-')}",
                                             [s for s in SCOPES if s not in (scope, "admin")])
                       for scope in SCOPES}
            only = {scope: await self.key(daemon, f"only-{scope.replace(':', '-')}", [scope])
                    for scope in SCOPES}
            seen = set()
            documented = {re.sub(r"\{[^}]+\}", "{}", p): ops
                          for p, ops in DOCUMENT["paths"].items()}
            for template, path, method, route in routed(daemon):
                needed = required_scope(route, method)
                seen.add((path, method))
                if needed == PUBLIC:
                    status, _ = await self.call(daemon, method, path, None)
                    assert status not in (401, 403), (method, path)
                    continue
                status, body = await self.call(daemon, method, path, None)
                assert status == 401, (method, path, status, body)
                if needed == ANY:
                    status, body = await self.call(daemon, method, path, only["console"])
                    assert status not in (401, 403), (method, path, status, body)
                    continue
                # The OpenAPI document states the scope of each operation.
                assert documented[template][method.lower()]["x-scope"] == needed, (method, path)
                status, body = await self.call(daemon, method, path, all_but[needed])
                assert status == 403, (method, path, status, body)
                assert body["error"]["code"] == "insufficient_scope"
                assert body["error"]["scope"] == needed and needed in body["error"]["message"]
                for key in (only[needed], only["admin"], ADMIN_TOKEN):
                    status, body = await self.call(daemon, method, path, key)
                    assert status not in (401, 403), (method, path, status, body)
            assert len(seen) == sum(len(ops) for ops in DOCUMENT["paths"].values())
            # A refused call changed nothing: every key still exists.
            status, body = await self.call(daemon, "GET", "/v1/keys", ADMIN_TOKEN)
            assert len(body["keys"]) == 2 * len(SCOPES)
        finally:
            await daemon.stop()

    @gen_test(timeout=30)
    async def test_revoked_key_is_refused_at_once_and_keys_never_logged(self) -> None:
        with capture_logs() as logs:
            daemon = Daemon(self.config)
            await daemon.start()
            try:
                key = await self.key(daemon, "reader", ["users:read"])
                status, body = await self.call(daemon, "GET", "/v1/users?unionid=u1", key)
                assert status == 404 and body["error"]["code"] == "user_not_found"
                status, body = await self.call(daemon, "GET", "/v1/keys", ADMIN_TOKEN)
                assert [k["name"] for k in body["keys"]] == ["reader"]
                assert body["keys"][0]["last_used_at"] is not None
                assert key not in json.dumps(body)
                status, _ = await self.call(daemon, "DELETE", "/v1/keys/reader", key)
                assert status == 403  # a users:read key cannot manage keys
                status, body = await self.call(daemon, "DELETE", "/v1/keys/reader", ADMIN_TOKEN)
                assert status == 200 and body == {"name": "reader", "revoked": True}
                status, body = await self.call(daemon, "GET", "/v1/users?unionid=u1", key)
                assert status == 401 and body["error"]["code"] == "unauthorized"
                status, _ = await self.call(daemon, "DELETE", "/v1/keys/reader", ADMIN_TOKEN)
                assert status == 404
            finally:
                await daemon.stop()
        assert "reader" in logs.text  # the name is logged, the key never
        assert key not in logs.text and key[4:] not in logs.text
