"""Token sharing for other local processes: GET /v1/tokens/{oa|mp} (WeChat's "central server").

Imports tornado.web and wxd.admin.base. The only route that returns an access_token; it never
returns or logs the app secret.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import tornado.web
from tornado.routing import URLSpec

from wxd.admin.base import ApiError, JsonHandler
from wxd.errors import WxdError
from wxd.tokens import TokenManager

log = logging.getLogger(__name__)


class TokenHandler(JsonHandler):
    """`{"access_token", "expires_at"}` (expires_at in unix seconds) for one app.

    404 `app_not_configured` when the app has no manager (no [mini_program] section);
    503 `token_unavailable` when no token can be had (upstream down, quota, daily budget).
    Callers should cache the token until shortly before expires_at, not fetch per call.
    """

    route_name = "tokens"

    def initialize(self, managers: Mapping[str, TokenManager],  # type: ignore[override]
                   **kwargs: Any) -> None:
        super().initialize(**kwargs)
        self._managers = managers

    async def get(self, app: str) -> None:
        if app not in ("oa", "mp"):
            raise ApiError(404, "not_found", "no such app: use /v1/tokens/oa or /v1/tokens/mp")
        manager = self._managers.get(app)
        if manager is None:
            raise ApiError(404, "app_not_configured", f"no {app} app is configured")
        try:
            await manager.get()
        except WxdError as exc:
            raise ApiError(503, "token_unavailable",
                           f"no {app} access_token available: {exc}") from None
        current = manager.current()
        if current is None:
            raise ApiError(503, "token_unavailable", f"no {app} access_token available")
        token, expires_at = current
        self.send_json({"access_token": token, "expires_at": int(expires_at)})


def routes(common: dict[str, Any], managers: Mapping[str, TokenManager]
           ) -> list[URLSpec]:
    """The token route; `managers` maps "oa"/"mp" to the TokenManager of each configured app."""
    return [tornado.web.url(r"/v1/tokens/([a-z]+)", TokenHandler, {**common, "managers": managers})]
