"""wxd.wechat.client against the sandbox over real HTTP: errcode table, errors, token retry, no leaks."""

from __future__ import annotations

import json
from typing import Any

import pytest
import tornado.httpclient
import tornado.httputil
import tornado.web
from tornado.testing import AsyncHTTPTestCase, bind_unused_port, gen_test

from tests.helpers import capture_logs, exception_text
from tests.sandbox_fixture import ClientCase
from wxd.errors import NoMsgidError, TransportError, WeChatAPIError
from wxd.sandbox import LEGACY_TEMPLATE_ID
from wxd.wechat.client import WeChatClient
from wxd.wechat.errcodes import ERROR_KINDS, KINDS, classify, refusal_hint, reported_ip
from wxd.wechat.mp import MiniProgramAPI
from wxd.wechat.oa import OfficialAccountAPI
from wxd.wechat.transport import KeepAliveClient


def test_classify_table() -> None:
    for code in (40001, 40014, 42001):
        assert classify(code) == "token"
    for code in (-1, 45011, 43117):
        assert classify(code) == "transient"
    assert classify(45009) == "quota"
    for code in (40164, 61004):  # the IP whitelist guards every API: no verdict on the request
        assert classify(code) == "unreachable"
    # A token fetch's 40125, 89503, ... leave wxd without a token (TokenUnavailable); answered
    # by a business call they would be about that call.
    for code in (40003, 43004, 47003, 48001, 40037, 40125, 89503, 41028, 12345):
        assert classify(code) == "terminal"
    assert set(ERROR_KINDS.values()) <= set(KINDS)


def test_reported_ip_and_refusal_hints() -> None:
    assert reported_ip("invalid ip 1.2.3.4 ipv6 ::ffff:1.2.3.4, not in whitelist rid: x") == \
        "1.2.3.4"
    assert reported_ip("invalid ip 2001:db8::1 ipv6 2001:db8::1, not in whitelist") == \
        "2001:db8::1"
    assert reported_ip("access clientip is not registered rid: 1") is None
    assert "whitelist" in refusal_hint(40164) and "admin" in refusal_hint(89503)
    assert "network" in refusal_hint(None) and refusal_hint(12345)


class TestCalls(ClientCase):
    @gen_test
    async def test_token_fetch_modes(self) -> None:
        a, life_a = await self.client.fetch_token(self.creds.oa_appid, self.creds.oa_secret,
                                                  "stable")
        b, _ = await self.client.fetch_token(self.creds.oa_appid, self.creds.oa_secret, "stable")
        assert a == b and life_a == 7200  # normal mode: the same token while it is valid
        c, _ = await self.client.fetch_token(self.creds.oa_appid, self.creds.oa_secret, "legacy")
        d, _ = await self.client.fetch_token(self.creds.oa_appid, self.creds.oa_secret, "legacy")
        assert c != d and a not in (c, d)
        stable_call = next(c for c in self.fake.calls if c.path == "/cgi-bin/stable_token")
        assert stable_call.method == "POST"
        assert stable_call.body["force_refresh"] is False
        with pytest.raises(ValueError):
            await self.client.fetch_token(self.creds.oa_appid, self.creds.oa_secret, "other")

    @gen_test
    async def test_errcode_becomes_typed_error_without_query(self) -> None:
        oa = OfficialAccountAPI(self.client, self.oa_source())
        with pytest.raises(WeChatAPIError) as info:
            await oa.user_info("not-an-openid")
        exc = info.value
        assert (exc.errcode, exc.kind, exc.path) == (40003, "terminal", "/cgi-bin/user/info")
        assert exc.errmsg.startswith("invalid openid") and exc.kind == "terminal"
        assert "?" not in str(exc) and "access_token" not in str(exc)

    @gen_test
    async def test_bad_secret_is_terminal_and_hidden(self) -> None:
        wrong = "0123456789abcdef0123456789abcdef"
        for mode in ("stable", "legacy"):
            with pytest.raises(WeChatAPIError) as info:
                await self.client.fetch_token(self.creds.oa_appid, wrong, mode)
            assert info.value.errcode == 40125 and info.value.kind == "terminal"
            assert wrong not in exception_text(info.value)

    @gen_test
    async def test_official_account_endpoints(self) -> None:
        oa = OfficialAccountAPI(self.client, self.oa_source())
        page = await oa.user_get()
        openids = page["data"]["openid"]
        assert page["count"] == len(openids) > 0
        infos = await oa.batchget(openids[:100])
        assert [info["openid"] for info in infos] == openids[:100]
        info = await oa.user_info(openids[0])
        assert info["subscribe"] == 1
        templates = await oa.templates()
        assert LEGACY_TEMPLATE_ID in {t["template_id"] for t in templates}
        with pytest.raises(ValueError):
            await oa.batchget([])
        with pytest.raises(ValueError):
            await oa.batchget(openids[:1] * 101)
        msgid = await oa.send_template({
            "touser": openids[0], "template_id": LEGACY_TEMPLATE_ID,
            "data": {"keyword1": {"value": "巧克力"}, "keyword2": {"value": "通过"}},
        })
        assert isinstance(msgid, str) and msgid.isdigit()
        [message] = self.fake.inbox(openids[0])
        assert str(message["msgid"]) == msgid
        assert message["data"]["keyword1"]["value"] == "巧克力"
        assert {c.app for c in self.fake.calls if c.path.startswith("/cgi-bin/user")} == {"oa"}

    @gen_test
    async def test_code2session(self) -> None:
        mp = MiniProgramAPI(self.client, self.creds.mp_appid, self.creds.mp_secret)
        person = self.fake.person(3)
        code = self.fake.issue_login_code(person)
        answer = await mp.code2session(code)
        assert answer["openid"] == person.mp_openid and answer["session_key"]
        with pytest.raises(WeChatAPIError) as info:
            await mp.code2session(code)  # single use
        assert info.value.errcode == 40163 and info.value.kind == "terminal"
        text = exception_text(info.value) + repr(mp)
        assert code not in text and self.creds.mp_secret not in text

    @gen_test
    async def test_code2session_is_not_resent_after_a_lost_answer(self) -> None:
        # WeChat exchanged the code, then the reused keep-alive connection was reset before
        # the answer: a resend would answer 40163 and a good login would look like a bad code.
        mp = MiniProgramAPI(self.client, self.creds.mp_appid, self.creds.mp_secret)
        person = self.fake.person(4)
        await mp.code2session(self.fake.issue_login_code(person))  # leaves an idle connection
        assert self.http.idle_connections() == 1
        self.fake.script_fault("/sns/jscode2session", "reset_after")
        with pytest.raises(TransportError) as info:
            await mp.code2session(self.fake.issue_login_code(person))
        assert info.value.status is None
        assert self.fake.count_calls("/sns/jscode2session") == 2  # the second one, once
        assert self.http.stats.retried_stale == 0

    @gen_test
    async def test_token_error_refreshes_once_and_retries_once(self) -> None:
        source = self.oa_source()
        oa = OfficialAccountAPI(self.client, source)
        openid = self.fake.follower_openids[0]
        self.fake.script_fault("/cgi-bin/user/info", "40001")
        assert (await oa.user_info(openid))["openid"] == openid
        assert len(source.invalidated) == 1
        self.fake.script_fault("/cgi-bin/user/info", "42001", times=5)
        with pytest.raises(WeChatAPIError) as info:
            await oa.user_info(openid)
        assert info.value.errcode == 42001 and info.value.token_invalid
        assert len(source.invalidated) == 2  # one more invalidate, never a second retry
        assert self.fake.count_calls("/cgi-bin/user/info") == 4
        assert self.fake.count_calls("/cgi-bin/token") == 3

    @gen_test
    async def test_non_token_errors_are_not_retried(self) -> None:
        source = self.oa_source()
        oa = OfficialAccountAPI(self.client, source)
        for fault, kind in (("-1", "transient"), ("45011", "transient"), ("45009", "quota"),
                            ("48001", "terminal")):
            self.fake.script_fault("/cgi-bin/user/get", fault)
            with pytest.raises(WeChatAPIError) as info:
                await oa.user_get()
            assert info.value.kind == kind
        assert self.fake.count_calls("/cgi-bin/user/get") == 4
        assert source.invalidated == []

    @gen_test
    async def test_http_errors_and_resets_are_transport_errors(self) -> None:
        oa = OfficialAccountAPI(self.client, self.oa_source())
        token = await self.oa_source().get()
        with capture_logs() as logs:
            self.fake.script_fault("/cgi-bin/user/get", "http500")
            with pytest.raises(TransportError) as info:
                await oa.user_get()
            assert info.value.status == 500 and info.value.path == "/cgi-bin/user/get"
            # Twice: a GET reset on a reused keep-alive connection is resent once (transport.py).
            self.fake.script_fault("/cgi-bin/user/get", "reset", times=2)
            with pytest.raises(TransportError) as reset:
                await oa.user_get()
            assert reset.value.status is None
            with pytest.raises(TransportError) as unknown:  # 404 from an unknown path
                await self.client.call("GET", "/cgi-bin/nope", params={"access_token": token})
            assert unknown.value.status == 404
        for exc in (info.value, reset.value, unknown.value):
            assert token not in exception_text(exc)
            assert exc.__cause__ is None and exc.__context__ is None
        assert token not in logs.text
        requests = self.registry.counter("wxd_wechat_requests_total", "", ("path", "outcome"))
        assert requests.get(path="/cgi-bin/user/get", outcome="transport") == 2

    @gen_test
    async def test_connection_refused_is_a_transport_error(self) -> None:
        sock, port = bind_unused_port()
        sock.close()  # nothing listens there now
        client = WeChatClient(self.http, f"http://127.0.0.1:{port}", 1.0, 2.0)
        with capture_logs() as logs, pytest.raises(TransportError) as info:
            await client.fetch_token(self.creds.oa_appid, self.creds.oa_secret, "legacy")
        assert info.value.path == "/cgi-bin/token" and info.value.status is None
        assert self.creds.oa_secret not in exception_text(info.value) + logs.text


class TestTimeout(ClientCase):
    request_timeout_s = 0.3

    @gen_test
    async def test_timeout_is_a_transport_error_without_url(self) -> None:
        with capture_logs() as logs:
            self.fake.script_fault("/cgi-bin/token", "hang")
            with pytest.raises(TransportError) as info:
                await self.client.fetch_token(self.creds.oa_appid, self.creds.oa_secret,
                                              "legacy")
            self.fake.script_fault("/cgi-bin/stable_token", "hang")
            with pytest.raises(TransportError):
                await self.client.fetch_token(self.creds.oa_appid, self.creds.oa_secret,
                                              "stable")
        assert info.value.status is None and "timed out" in str(info.value)
        for secret in self.secrets():
            assert secret not in exception_text(info.value)
            assert secret not in logs.text


class Recorder(tornado.web.RequestHandler):
    """Records raw requests and answers a canned body (used to see the bytes on the wire)."""

    def initialize(self, seen: list[tornado.httputil.HTTPServerRequest], answer: bytes) -> None:
        self.seen, self.answer = seen, answer

    def check_xsrf_cookie(self) -> None:
        pass

    def post(self) -> None:
        self.seen.append(self.request)
        self.finish(self.answer)

    get = post


class WireCase(AsyncHTTPTestCase):
    answer = b'{"errcode":0,"errmsg":"ok"}'

    def get_app(self) -> tornado.web.Application:
        self.seen: list[Any] = []
        return tornado.web.Application(
            [(r"/.*", Recorder, {"seen": self.seen, "answer": self.answer})])

    def setUp(self) -> None:
        super().setUp()
        self.upstream = KeepAliveClient()
        self.client = WeChatClient(self.upstream, self.get_url(""), 1.0, 5.0)

    def tearDown(self) -> None:
        self.upstream.close()
        super().tearDown()


class TestWire(WireCase):
    @gen_test
    async def test_json_body_is_utf8_without_escapes(self) -> None:
        body = {"touser": "o1", "data": {"thing1": {"value": "巧克力"}}}
        await self.client.call("POST", "/cgi-bin/message/template/send", body=body)
        request = self.seen[0]
        assert request.headers["Content-Type"].startswith("application/json")
        assert "巧克力".encode() in request.body and b"\\u" not in request.body
        assert json.loads(request.body) == body


class TestWireNotJson(WireCase):
    answer = b"<html>oops</html>"

    @gen_test
    async def test_a_non_json_answer_is_a_transport_error(self) -> None:
        with pytest.raises(TransportError) as info:
            await self.client.call("GET", "/cgi-bin/user/get")
        assert info.value.status == 200 and "not a JSON object" in str(info.value)


class StaticToken:
    """A TokenSource with one fixed token."""

    def __init__(self, token: str) -> None:
        self.token = token

    async def get(self) -> str:
        return self.token

    async def invalidate(self, token: str) -> None:
        pass


SECRET_TOKEN = "TOKEN-7f3a9c-never-shown"


class TestWireErrorBody(WireCase):
    answer = json.dumps({"errcode": 45065, "errmsg": f"clientmsgid exist {SECRET_TOKEN}",
                         "msg_id": 12345, "echo": {SECRET_TOKEN: [SECRET_TOKEN]}}).encode()

    @gen_test
    async def test_the_error_carries_the_whole_answer_scrubbed(self) -> None:
        oa = OfficialAccountAPI(self.client, StaticToken(SECRET_TOKEN))
        with pytest.raises(WeChatAPIError) as info:
            await oa.send_template({"touser": "o1", "template_id": "T", "data": {}})
        exc = info.value
        assert (exc.errcode, exc.answer["msg_id"], exc.resent) == (45065, 12345, False)
        assert exc.answer["errmsg"] == "clientmsgid exist <redacted>" == exc.errmsg
        assert exc.answer["echo"] == {"<redacted>": ["<redacted>"]}
        assert SECRET_TOKEN not in exception_text(exc)


class TestWireNoMsgid(WireCase):
    @gen_test
    async def test_an_acceptance_without_msgid_raises_with_the_answer(self) -> None:
        oa = OfficialAccountAPI(self.client, StaticToken(SECRET_TOKEN))
        with pytest.raises(NoMsgidError) as info:
            await oa.send_template({"touser": "o1", "template_id": "T", "data": {}})
        assert isinstance(info.value, TransportError) and info.value.status == 200
        assert info.value.answer == {"errcode": 0, "errmsg": "ok"}
        assert "has no msgid" in str(info.value)
