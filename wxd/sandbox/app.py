"""The emulator's tornado Application: the WeChat API routes plus the /_sandbox/ control routes.

Imports tornado, stdlib and the sandbox's own modules; never wxd's service layers.
"""

from __future__ import annotations

import asyncio
import logging

import tornado.web
from tornado.log import access_log

from wxd.sandbox.control import control_routes, person_named
from wxd.sandbox.endpoints import Answer, dispatch
from wxd.sandbox.qrcodes import image_jpeg
from wxd.sandbox.runtime import SandboxRuntime
from wxd.sandbox.state import FakeWeChat
from wxd.sandbox.webauth import AUTHORIZE_PATH, Refused

_HTTP500_PAGE = "<html><body><h1>500 Internal Server Error</h1></body></html>"


class SandboxApplication(tornado.web.Application):
    """make_app's result: `fake` is the state, `runtime` the background work.
    `await app.aclose()` releases hanging requests and report tasks (SandboxServer.stop does)."""

    def __init__(self, fake: FakeWeChat) -> None:
        self.fake = fake
        self.runtime = SandboxRuntime(fake)
        kw = {"runtime": self.runtime}
        super().__init__(
            [*control_routes(self.runtime),
             (r"/cgi-bin/showqrcode", ShowQrCodeHandler, kw),
             (AUTHORIZE_PATH, AuthorizeHandler, kw),
             (r"/.*", ApiHandler, kw)],
            log_function=_log_request,
        )

    async def aclose(self) -> None:
        await self.runtime.aclose()


def _log_request(handler: tornado.web.RequestHandler) -> None:
    """Access log without the query string: it carries secrets, codes and access_tokens."""
    status = handler.get_status()
    level = logging.INFO if status < 400 else logging.WARNING
    access_log.log(level, "%d %s %s %.2fms", status, handler.request.method,
                   handler.request.path, 1000.0 * handler.request.request_time())


class ApiHandler(tornado.web.RequestHandler):
    """Every path outside /_sandbox/: handed to endpoints.dispatch, then faults are applied."""

    _released: asyncio.Event | None = None
    _client_gone = False

    def initialize(self, runtime: SandboxRuntime) -> None:
        self.runtime = runtime

    def check_xsrf_cookie(self) -> None:
        """No XSRF: these are server-to-server API calls."""

    async def get(self, *_args: str) -> None:
        await self._serve("GET")

    async def post(self, *_args: str) -> None:
        await self._serve("POST")

    def on_connection_close(self) -> None:
        self._client_gone = True
        if self._released is not None:
            self._released.set()

    async def _serve(self, method: str) -> None:
        runtime = self.runtime
        query = {
            key: values[0].decode("utf-8", "replace")
            for key, values in self.request.query_arguments.items()
            if values
        }
        answer = dispatch(
            runtime.fake,
            method,
            self.request.path,
            query,
            self.request.body,
            self.request.remote_ip or "127.0.0.1",
        )
        if answer.delay_s > 0:
            await asyncio.sleep(answer.delay_s)
        if answer.report is not None:
            runtime.schedule_report(answer.report)
        await self._answer(answer)

    async def _answer(self, answer: Answer) -> None:
        if answer.fault in ("hang", "hang_after"):
            self._released = asyncio.Event()
            if not self._client_gone:
                await self.runtime.hang(self._released)
            self._drop()
            return
        if answer.fault in ("reset", "reset_after"):
            self._drop()
            return
        if answer.fault == "http500":
            self.set_status(500)
            self.set_header("Content-Type", "text/html")
            self.finish(_HTTP500_PAGE)
            return
        assert answer.text is not None  # only the transport faults above answer no JSON
        self.set_status(answer.status)
        self.set_header("Content-Type", "application/json; charset=utf-8")
        self.finish(answer.text)

    def _drop(self) -> None:
        """Close the connection without any response (what a reset or a lost answer looks
        like to the client)."""
        self.detach().close()


class ShowQrCodeHandler(tornado.web.RequestHandler):
    """GET /cgi-bin/showqrcode?ticket=... (mp.weixin.qq.com in WeChat): the code's image for a
    valid ticket (image/jpg, cacheable a week), HTTP 404 for an unknown or expired one.
    https://developers.weixin.qq.com/doc/offiaccount/Account_Management/Generating_a_Parametric_QR_Code.html"""

    def initialize(self, runtime: SandboxRuntime) -> None:
        self.fake = runtime.fake

    def get(self) -> None:
        ticket = self.get_query_argument("ticket", "")
        if self.fake.qrcodes.valid(ticket) is None:
            self.set_status(404)
            self.finish("")
            return
        self.set_header("Content-Type", "image/jpg")
        self.set_header("Cache-Control", "max-age=604800")
        self.finish(image_jpeg())


class AuthorizeHandler(tornado.web.RequestHandler):
    """GET /connect/oauth2/authorize (open.weixin.qq.com in WeChat) as the person's browser
    inside WeChat would: the `X-Sandbox-Person` header names the person (index, oa_openid,
    mp_openid or unionid); `X-Sandbox-Snapshot: 1` plays the snapshot page, `X-Sandbox-Decline:
    1` a refusal. A 302 to the redirect_uri, or the error page WeChat shows (200, HTML).
    Browsers never send the #wechat_redirect fragment: POST /_sandbox/oauth/authorize checks it."""

    def initialize(self, runtime: SandboxRuntime) -> None:
        self.fake = runtime.fake

    def get(self) -> None:
        who = self.request.headers.get("X-Sandbox-Person", "")
        person = person_named(self.fake, who) if who else None
        if person is None:
            self.set_status(400)
            self.finish("sandbox: name the browsing person with the X-Sandbox-Person header")
            return
        result = self.fake.webauth.authorize(
            person, self.request.uri or "", fragment_seen=False,
            snapshot=self.request.headers.get("X-Sandbox-Snapshot") == "1",
            decline=self.request.headers.get("X-Sandbox-Decline") == "1")
        if isinstance(result, Refused):
            self.set_header("Content-Type", "text/html; charset=utf-8")
            self.finish(f"<html><body>{result.errcode or ''} {result.message}</body></html>")
            return
        self.redirect(result)


def make_app(fake: FakeWeChat) -> SandboxApplication:
    """The emulator for `fake`: WeChat API paths and the JSON control API under /_sandbox/."""
    return SandboxApplication(fake)
