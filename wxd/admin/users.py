"""Identity routes: POST /v1/mp/login, POST /v1/mp/decrypt, GET /v1/users.

Translates Linking's results and errors into JSON; no storage or WeChat calls here.
Responses never carry the session_key (Identity.to_json has none; decrypt returns the user data).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NoReturn

import tornado.web
from tornado.routing import URLSpec

from wxd.admin.base import STORAGE_UNAVAILABLE, ApiError, JsonHandler
from wxd.errors import (
    StorageError,
    TokenBudgetError,
    TokenUnavailable,
    TransportError,
    WeChatAPIError,
)
from wxd.linking import Linking, LinkingError
from wxd.store.identity import Identity

# HTTP status per LinkingError code.
_STATUS: Mapping[str, int] = {
    "invalid_code": 400,
    "rate_limited": 429,
    "user_blocked": 403,
    "mini_program_not_configured": 409,
    "not_logged_in": 409,
    "session_key_expired": 409,
    "watermark_mismatch": 422,
    "openid_mismatch": 422,
    "link_not_found": 404,
    "link_derived": 409,
}
_KEYS = ("unionid", "mp_openid", "oa_openid")
MAX_ID = 128
MAX_CODE = 256
MAX_ENCRYPTED = 64 * 1024


def raise_api_error(exc: Exception) -> NoReturn:
    """Map a Linking/upstream/storage failure to an ApiError (never a bare 500)."""
    if isinstance(exc, LinkingError):
        raise ApiError(_STATUS.get(exc.code, 400), exc.code, exc.message) from None
    if isinstance(exc, WeChatAPIError):
        if exc.kind == "terminal":
            raise ApiError(502, "upstream_error", "WeChat refused the request",
                           errcode=exc.errcode) from None
        raise ApiError(503, "upstream_unavailable", "WeChat is busy or rate-limiting; retry later",
                       errcode=exc.errcode) from None
    if isinstance(exc, TransportError):
        raise ApiError(502, "upstream_unavailable", "WeChat could not be reached; retry later",
                       ) from None
    if isinstance(exc, TokenUnavailable):
        raise ApiError(503, "upstream_unavailable", "WeChat is unreachable for wxd (no "
                       "access_token); retry later", errcode=exc.errcode) from None
    if isinstance(exc, TokenBudgetError):
        raise ApiError(503, "upstream_unavailable", "the daily token budget is spent") from None
    if isinstance(exc, StorageError):
        raise ApiError(503, "storage_unavailable", STORAGE_UNAVAILABLE) from None
    raise exc


def _string(body: Mapping[str, Any], name: str, limit: int) -> str:
    value = body.get(name)
    if value is None or value == "":
        raise ApiError(400, "missing_field", f"'{name}' is required", field=name)
    if not isinstance(value, str) or len(value) > limit:
        raise ApiError(400, "invalid_field", f"'{name}' must be a string of at most {limit} "
                       "characters", field=name)
    return value


def _login_json(identity: Identity) -> dict[str, Any]:
    return {
        "mp_openid": identity.mp_openid,
        "unionid": identity.unionid,
        "oa_openid": identity.oa_openid,
        "subscribed": identity.subscribed,
    }


class _UsersHandler(JsonHandler):
    def initialize(self, linking: Linking, **kwargs: Any) -> None:  # type: ignore[override]
        super().initialize(**kwargs)
        self._linking = linking


class LoginHandler(_UsersHandler):
    """POST {"code"} → {"mp_openid", "unionid", "oa_openid", "subscribed"}."""

    route_name = "mp_login"

    async def post(self) -> None:
        code = _string(self.json_body(), "code", MAX_CODE)
        try:
            identity = await self._linking.login(code)
        except (LinkingError, WeChatAPIError, TransportError, TokenUnavailable,
                TokenBudgetError, StorageError) as exc:
            raise_api_error(exc)
        self.send_json(_login_json(identity))


class DecryptHandler(_UsersHandler):
    """POST {"mp_openid", "encrypted_data", "iv"} → {"data": {...}} (stores unionId, links)."""

    route_name = "mp_decrypt"

    async def post(self) -> None:
        body = self.json_body()
        mp_openid = _string(body, "mp_openid", MAX_ID)
        encrypted = _string(body, "encrypted_data", MAX_ENCRYPTED)
        iv = _string(body, "iv", 64)
        try:
            data = await self._linking.decrypt(mp_openid, encrypted, iv)
        except (LinkingError, StorageError) as exc:
            raise_api_error(exc)
        self.send_json({"data": data})


class UsersHandler(_UsersHandler):
    """GET ?unionid= | ?mp_openid= | ?oa_openid= (exactly one) → the identity; 404 user_not_found."""

    route_name = "users"

    async def get(self) -> None:
        given = {k: self.get_query_argument(k) for k in _KEYS
                 if self.get_query_argument(k, None) is not None}
        if not given:
            raise ApiError(400, "missing_field", "give one of unionid, mp_openid, oa_openid")
        if len(given) > 1:
            raise ApiError(400, "invalid_field", "give exactly one of unionid, mp_openid, "
                           "oa_openid")
        ((name, value),) = given.items()
        if not value or len(value) > MAX_ID:
            raise ApiError(400, "invalid_field", f"'{name}' must be 1..{MAX_ID} characters",
                           field=name)
        try:
            identity = await self._linking.lookup(**{name: value})
        except StorageError as exc:
            raise_api_error(exc)
        if identity is None:
            raise ApiError(404, "user_not_found", f"no user with this {name}")
        self.send_json(identity.to_json())


def routes(common: dict[str, Any], linking: Linking) -> list[URLSpec]:
    kwargs = {**common, "linking": linking}
    return [
        tornado.web.url(r"/v1/mp/login", LoginHandler, kwargs),
        tornado.web.url(r"/v1/mp/decrypt", DecryptHandler, kwargs),
        tornado.web.url(r"/v1/users", UsersHandler, kwargs),
    ]
