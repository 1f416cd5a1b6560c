"""JS-SDK support for H5 pages: GET /v1/tickets/jsapi and POST /v1/jssdk/signature.

The OA's jsapi_ticket is held by a TokenManager (app "jsapi"), started on first use and from
then on refreshed ahead like the access_tokens. A page that uses `wx-open-subscribe` or
`wx-open-launch-weapp` needs a `wx.config` signed over its own URL: the signature route does
that without the ticket leaving the server.
"""

from __future__ import annotations

from typing import Any

import tornado.web
from tornado.routing import URLSpec

from wxd.admin.base import ApiError, JsonHandler
from wxd.clock import SYSTEM_CLOCK, Clock
from wxd.errors import WxdError
from wxd.tokens import TokenManager
from wxd.wechat import jssdk

MAX_URL = 4096


class _TicketHandler(JsonHandler):
    def initialize(self, ticket: TokenManager, appid: str,  # type: ignore[override]
                   clock: Clock = SYSTEM_CLOCK, **kwargs: Any) -> None:
        super().initialize(**kwargs)
        self._ticket = ticket
        self._appid = appid
        self._clock = clock

    async def current(self) -> tuple[str, float]:
        """(ticket, expires_at); 503 `ticket_unavailable` when none can be had."""
        await self._ticket.start()  # idempotent: the first use starts the refresher
        try:
            await self._ticket.get()
        except WxdError as exc:
            raise ApiError(503, "ticket_unavailable", f"no jsapi_ticket available: {exc}") from None
        current = self._ticket.current()
        if current is None:
            raise ApiError(503, "ticket_unavailable", "no jsapi_ticket available")
        return current


class TicketHandler(_TicketHandler):
    """`{"ticket", "expires_at"}` (unix seconds): the OA's jsapi_ticket for local processes
    that sign wx.config themselves. Cache it until shortly before expires_at."""

    route_name = "jsapi_ticket"

    async def get(self) -> None:
        ticket, expires_at = await self.current()
        self.send_json({"ticket": ticket, "expires_at": int(expires_at)})


class SignatureHandler(_TicketHandler):
    """POST {"url"} → {"appId", "timestamp", "nonceStr", "signature"}: the wx.config fields for
    the page at `url` (its #fragment is not signed; the front end sends location.href)."""

    route_name = "jssdk_signature"

    async def post(self) -> None:
        url = self.json_body().get("url")
        if url is None or url == "":
            raise ApiError(400, "missing_field", "'url' is required", field="url")
        if (not isinstance(url, str) or len(url) > MAX_URL
                or not url.startswith(("http://", "https://"))):
            raise ApiError(400, "invalid_field", f"'url' must be an http(s) URL of at most "
                           f"{MAX_URL} characters", field="url")
        ticket, _ = await self.current()
        timestamp = int(self._clock.now())
        nonce = jssdk.new_nonce()
        self.send_json({"appId": self._appid, "timestamp": timestamp, "nonceStr": nonce,
                        "signature": jssdk.signature(ticket, nonce, timestamp, url)})


def routes(common: dict[str, Any], ticket: TokenManager, appid: str,
           clock: Clock = SYSTEM_CLOCK) -> list[URLSpec]:
    """The ticket and signature routes; `appid` is the OA's (wx.config's appId)."""
    kwargs = {**common, "ticket": ticket, "appid": appid, "clock": clock}
    return [
        tornado.web.url(r"/v1/tickets/jsapi", TicketHandler, kwargs),
        tornado.web.url(r"/v1/jssdk/signature", SignatureHandler, kwargs),
    ]
