"""A storage fault under a running daemon (read-only database, an outside writer holding the
lock): the webhook answers 503 and acknowledges nothing, every admin route answers JSON 503
`storage_unavailable`, /healthz and /metrics say so, and everything resumes without a restart.
The daemon talks to the sandbox over real HTTP; faults are SQLite's own (tests/storage_faults.py).
"""

from __future__ import annotations

import json
import logging
import pathlib
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import tornado.gen
import tornado.web
from tornado.httpclient import AsyncHTTPClient
from tornado.routing import URLSpec
from tornado.testing import AsyncHTTPTestCase, AsyncTestCase, gen_test

from tests.helpers import ADMIN_TOKEN, eventually, sandbox_config_text
from tests.storage_faults import FAULTS
from wxd import config
from wxd.admin import common_kwargs, make_app
from wxd.admin.base import JsonHandler
from wxd.daemon import Daemon
from wxd.errors import StorageError
from wxd.sandbox import NOTICE_TEMPLATE_ID, FakeWeChat, SandboxServer, WebhookSender


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@contextmanager
def captured() -> Iterator[Records]:
    handler = Records()
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        yield handler
    finally:
        root.removeHandler(handler)


class DaemonStorageFaultTest(AsyncTestCase):
    def setUp(self) -> None:
        super().setUp()
        tmp = tempfile.TemporaryDirectory()
        self.addCleanup(tmp.cleanup)
        self.tmp = pathlib.Path(tmp.name)
        self.http = AsyncHTTPClient(force_instance=True)
        self.fake = FakeWeChat(users=12, seed=21, follow_ratio=1.0)
        self.people = [p for p in self.fake.people if p.follows and p.unionid]

    def tearDown(self) -> None:
        self.http.close()
        super().tearDown()

    async def admin(self, method: str, path: str, body: Any = None,
                    raw: bool = False) -> tuple[int, Any, str]:
        """(status, JSON answer or text, Content-Type) from the daemon's admin API."""
        assert self.daemon.admin is not None
        payload = json.dumps(body).encode() if body is not None else (
            b"" if method == "POST" else None)
        response = await self.http.fetch(
            f"http://127.0.0.1:{self.daemon.admin.port}{path}", method=method, body=payload,
            headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}, raise_error=False)
        text = response.body.decode()
        content_type = response.headers.get("Content-Type", "")
        return response.code, (text if raw else json.loads(text)), content_type

    async def follower_known(self, oa_openid: str) -> bool:
        code, _, _ = await self.admin("GET", f"/v1/users?oa_openid={oa_openid}")
        return code == 200

    def push(self, index: int) -> dict[str, Any]:
        return {"to": {"oa_openid": self.people[index].oa_openid},
                "template_id": NOTICE_TEMPLATE_ID,
                "data": {"thing1": "您的预约已确认", "time2": "2024-01-01 09:30"}}

    @gen_test(timeout=60)
    async def test_webhook_and_every_admin_route_answer_503_then_resume(self) -> None:
        sandbox = SandboxServer(self.fake)
        await sandbox.start()
        cfg = config.load_text(sandbox_config_text(
            str(self.tmp / "wxd.db"), self.fake.credentials, sandbox.base_url, 0, 0,
            {"events": {"workers": 1}}))
        self.daemon = Daemon(cfg)
        await self.daemon.start()
        try:
            assert self.daemon.webhook is not None and self.daemon.db is not None
            url = f"http://127.0.0.1:{self.daemon.webhook.port}/wechat"
            sender = WebhookSender(url, self.fake.credentials, mode="safe",
                                   http_client=self.http, seed=3)
            first = self.people[0].oa_openid
            assert (await sender.subscribe(first)).status == 200
            await eventually(lambda: self.follower_known(first), "the first follower",
                             timeout=10, interval=0.02)
            for number, (name, fault) in enumerate(FAULTS.items(), start=1):
                follower = self.people[number].oa_openid
                with captured() as logs:
                    async with fault(self.daemon.db):
                        follow = sender.build(sender.subscribe_fields(follower))
                        assert (await sender.send(follow)).status == 503, name
                        await self.during_the_fault(name)
                    # WeChat retries the follow: now it is stored and processed, no restart.
                    assert (await sender.send(follow)).status == 200, name
                    await eventually(lambda: self.follower_known(follower),  # noqa: B023
                                     f"the follow sent during {name}", timeout=10,
                                     interval=0.02)
                    code, answer, _ = await self.admin("POST", "/v1/pushes", self.push(number))
                    assert code == 202, (name, answer)
                    assert (await self.admin("GET", "/healthz"))[:2] == (200, {"status": "ok"})
                    metrics = (await self.admin("GET", "/metrics", raw=True))[1]
                    assert "wxd_storage_up 1" in metrics.splitlines(), name
                tracebacks = [r.getMessage() for r in logs.records
                              if r.exc_info and r.name.startswith(("wxd.admin", "tornado"))]
                assert tracebacks == [], (name, tracebacks)
                assert any("storage unavailable" in r.getMessage() for r in logs.records
                           if r.name == "wxd.admin.base"), name
        finally:
            await self.daemon.stop()
            await sandbox.stop()

    async def during_the_fault(self, name: str) -> None:
        # Every write route: JSON 503 storage_unavailable, never tornado's 500.
        for method, path, body in (
                ("POST", "/v1/pushes", self.push(0)),
                ("POST", "/v1/pushes/batch", {"pushes": [self.push(0)]}),
                ("POST", "/v1/backfill", None)):
            code, answer, content_type = await self.admin(method, path, body)
            assert (code, answer["error"]["code"]) == (503, "storage_unavailable"), \
                (name, path, answer)
            assert content_type.startswith("application/json")
            assert "Traceback" not in json.dumps(answer)
        # Reads still work on a read-only or locked database.
        code, answer, _ = await self.admin("GET", "/v1/pushes")
        assert code == 200 and "pushes" in answer, (name, answer)
        assert (await self.admin("GET", "/v1/stats"))[0] == 200
        code, health, _ = await self.admin("GET", "/healthz")
        assert (code, health["status"]) == (503, "storage_unavailable"), (name, health)
        assert health["error"] and "INSERT" not in health["error"]
        code, metrics, _ = await self.admin("GET", "/metrics", raw=True)
        lines = metrics.splitlines()
        assert code == 200 and "wxd_storage_up 0" in lines, name
        assert any(line.startswith('wxd_storage_errors_total{op="write"}') for line in lines)


class Faulty(JsonHandler):
    """Raises what the test asks for from a read, as a handler over a broken database would."""

    route_name = "faulty"

    async def get(self, kind: str) -> None:
        if kind == "storage":
            raise StorageError("database error: disk I/O error")
        raise KeyError("a bug")


class JsonHandlerStorageTest(AsyncHTTPTestCase):
    def get_app(self) -> tornado.web.Application:
        common = common_kwargs(ADMIN_TOKEN, None)
        return make_app(common, [[tornado.web.url(r"/faulty/(\w+)", Faulty, common)]])

    def get(self, path: str) -> tuple[int, dict[str, Any]]:
        response = self.fetch(path, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
        return response.code, json.loads(response.body)

    def test_a_storage_error_from_any_handler_is_json_503_in_one_log_line(self) -> None:
        with captured() as logs:
            code, answer = self.get("/faulty/storage")
        assert (code, answer["error"]["code"]) == (503, "storage_unavailable")
        assert "disk I/O" not in answer["error"]["message"]  # the reason is for the log
        [line] = [r for r in logs.records if r.name == "wxd.admin.base"]
        assert line.exc_info is None and "disk I/O error" in line.getMessage()
        assert "/faulty/storage" in line.getMessage()
        with captured():  # a bug stays a 500 with its traceback in the log
            code, answer = self.get("/faulty/bug")
        assert (code, answer["error"]["code"]) == (500, "internal_error")


class EveryRouteTest(AsyncTestCase):
    @gen_test(timeout=20)
    async def test_every_admin_route_is_a_json_handler(self) -> None:
        """The 503 mapping lives in JsonHandler: every route of the daemon inherits it."""
        tmp = tempfile.TemporaryDirectory()
        self.addCleanup(tmp.cleanup)
        fake = FakeWeChat(users=2, seed=1)
        cfg = config.load_text(sandbox_config_text(
            str(pathlib.Path(tmp.name) / "x.db"), fake.credentials, "http://127.0.0.1:9", 0, 0))
        daemon = Daemon(cfg)
        await daemon.start()
        try:
            assert daemon.admin is not None
            rules = [rule for rule in daemon.admin._app.wildcard_router.rules
                     if isinstance(rule, URLSpec)]
            assert len(rules) > 10
            for rule in rules:
                assert issubclass(rule.target, JsonHandler), rule.regex.pattern
        finally:
            await daemon.stop()
