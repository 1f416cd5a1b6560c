"""Admin routes of explicit links: QR link codes, OAuth links, their status, and removing a link.

Thin handlers over qrlinks.QrLinks, oauth_links.OAuthLinks and linking.Linking; no SQL here.
    POST /v1/links/qrcodes {"mp_openid", "expires_in"?} → 201 the code (scene, ticket, image_url)
    GET  /v1/links/qrcodes/{id}                    → {"id", "status", "oa_openid"?, "linked_at"?}
    POST /v1/links/oauth {"mp_openid", "return_url"?, "expires_in"?} → 201 {"id", "url", ...}
    GET  /v1/links/oauth/{id}                      → as for QR codes
    DELETE /v1/links?mp_openid=X                   → {"removed": {...}}
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import tornado.web
from tornado.routing import URLSpec

from wxd.admin.base import ApiError, JsonHandler
from wxd.admin.users import raise_api_error
from wxd.errors import StorageError, TokenBudgetError, TransportError, WeChatAPIError
from wxd.linking import Linking, LinkingError
from wxd.oauth_links import OAuthLinks
from wxd.qrlinks import DEFAULT_EXPIRES_S, QrLinks

# WeChat openids are 28 characters of [A-Za-z0-9_-]; some room is left.
_OPENID_RE = re.compile(r"[A-Za-z0-9_-]{1,128}")
_ID = r"([A-Za-z0-9_-]{1,64})"


def _mp_openid(value: object) -> str:
    if value is None or value == "":
        raise ApiError(400, "missing_field", "'mp_openid' is required", field="mp_openid")
    if not isinstance(value, str) or not _OPENID_RE.fullmatch(value):
        raise ApiError(400, "invalid_field", "'mp_openid' must be 1..128 characters of "
                       "letters, digits, '_' and '-'", field="mp_openid")
    return value


def _expires_in(body: Mapping[str, Any], low: int, high: int) -> int:
    value = body.get("expires_in", DEFAULT_EXPIRES_S)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ApiError(400, "invalid_field", f"'expires_in' must be an integer of {low}..{high} "
                       "seconds", field="expires_in")
    return value


class _LinksHandler(JsonHandler):
    def initialize(self, qrcodes: QrLinks, oauth: OAuthLinks | None,  # type: ignore[override]
                   linking: Linking, **kwargs: Any) -> None:
        super().initialize(**kwargs)
        self._qrcodes = qrcodes
        self._oauth = oauth
        self._linking = linking

    def _oauth_links(self) -> OAuthLinks:
        if self._oauth is None:
            raise ApiError(409, "oauth_not_configured", "OAuth links need [webhook] public_url "
                           "(the address browsers reach wxd's public listener at)")
        return self._oauth


class QrCodesHandler(_LinksHandler):
    """POST {"mp_openid", "expires_in"?} → 201 {"id", "scene", "ticket", "url", "image_url",
    "expires_at", "status": "pending"}."""

    route_name = "link_qrcodes"

    async def post(self) -> None:
        body = self.json_body()
        mp_openid = _mp_openid(body.get("mp_openid"))
        expires_in = _expires_in(body, 60, 2_592_000)
        try:
            code = await self._qrcodes.create(mp_openid, expires_in)
        except (WeChatAPIError, TransportError, TokenBudgetError, StorageError) as exc:
            raise_api_error(exc)
        self.send_json(code, status=201)


class QrCodeHandler(_LinksHandler):
    """GET → {"id", "status": "pending"|"linked"|"expired", "oa_openid"?, "linked_at"?}."""

    route_name = "link_qrcode"

    async def get(self, code_id: str) -> None:
        try:
            status = await self._qrcodes.status(code_id)
        except StorageError as exc:
            raise_api_error(exc)
        if status is None:
            raise ApiError(404, "link_code_not_found", "no QR link code with this id")
        self.send_json(status)


class OAuthStartHandler(_LinksHandler):
    """POST {"mp_openid", "return_url"?, "expires_in"?} → 201 {"id", "url", "expires_at"}."""

    route_name = "link_oauth"

    async def post(self) -> None:
        oauth = self._oauth_links()
        body = self.json_body()
        mp_openid = _mp_openid(body.get("mp_openid"))
        return_url = body.get("return_url")
        if return_url is not None and (not isinstance(return_url, str)
                                       or not oauth.return_url_allowed(return_url)):
            raise ApiError(400, "return_url_not_allowed", "'return_url' must be an https URL "
                           "on a host listed in [linking] oauth_return_hosts", field="return_url")
        expires_in = _expires_in(body, 60, 86_400)
        try:
            created = await oauth.create(mp_openid, return_url, expires_in)
        except StorageError as exc:
            raise_api_error(exc)
        self.send_json(created, status=201)


class OAuthStatusHandler(_LinksHandler):
    """GET → {"id", "status": "pending"|"linked"|"expired", "oa_openid"?, "linked_at"?}."""

    route_name = "link_oauth_status"

    async def get(self, code_id: str) -> None:
        if self._oauth is None:
            raise ApiError(404, "link_code_not_found", "no OAuth link with this id")
        try:
            status = await self._oauth.status(code_id)
        except StorageError as exc:
            raise_api_error(exc)
        if status is None:
            raise ApiError(404, "link_code_not_found", "no OAuth link with this id")
        self.send_json(status)


class LinksHandler(_LinksHandler):
    """DELETE ?mp_openid=X → {"removed": {"mp_openid", "oa_openid", "source", "linked_at"}};
    404 link_not_found, 409 link_derived (a unionid link cannot be removed)."""

    route_name = "links"

    async def delete(self) -> None:
        mp_openid = _mp_openid(self.get_query_argument("mp_openid", None))
        try:
            removed = await self._linking.unlink(mp_openid)
        except (LinkingError, StorageError) as exc:
            raise_api_error(exc)
        self.send_json({"removed": removed.to_json()})


def routes(common: dict[str, Any], qrcodes: QrLinks, oauth: OAuthLinks | None,
           linking: Linking) -> list[URLSpec]:
    kwargs = {**common, "qrcodes": qrcodes, "oauth": oauth, "linking": linking}
    return [
        tornado.web.url(r"/v1/links", LinksHandler, kwargs),
        tornado.web.url(r"/v1/links/qrcodes", QrCodesHandler, kwargs),
        tornado.web.url(rf"/v1/links/qrcodes/{_ID}", QrCodeHandler, kwargs),
        tornado.web.url(r"/v1/links/oauth", OAuthStartHandler, kwargs),
        tornado.web.url(rf"/v1/links/oauth/{_ID}", OAuthStatusHandler, kwargs),
    ]
