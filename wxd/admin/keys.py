"""Scoped API key management: POST/GET /v1/keys and DELETE /v1/keys/{name} (scope "admin").

The key's text is in the answer to POST only, once; it is never logged or listed.
"""

from __future__ import annotations

from typing import Any

import tornado.web
from tornado.routing import URLSpec

from wxd.admin.base import ApiError, JsonHandler
from wxd.apikeys import ApiKeyError, ApiKeys

_STATUS = {"invalid_name": 400, "invalid_scope": 400, "key_exists": 409}


class _KeysHandler(JsonHandler):
    def initialize(self, api_keys: ApiKeys, **kwargs: Any) -> None:  # type: ignore[override]
        super().initialize(**kwargs)
        self._api_keys = api_keys


class KeysHandler(_KeysHandler):
    """POST {"name", "scopes": [...]} → 201 {"name", "scopes", "created_at", "last_used_at",
    "key"}; GET → {"keys": [{"name", "scopes", "created_at", "last_used_at"}]}."""

    route_name = "keys"

    async def post(self) -> None:
        body = self.json_body()
        name = body.get("name")
        if not isinstance(name, str):
            raise ApiError(400, "invalid_name", "'name' must be a string")
        scopes = body.get("scopes")
        if isinstance(scopes, str):
            scopes = [s.strip() for s in scopes.split(",") if s.strip()]
        if not isinstance(scopes, list):
            raise ApiError(400, "invalid_scope", "'scopes' must be a list of scope names")
        try:
            info, key = await self._api_keys.create(name, scopes)
        except ApiKeyError as exc:
            raise ApiError(_STATUS.get(exc.code, 400), exc.code, exc.message) from None
        self.send_json({**info.to_json(), "key": key}, status=201)

    async def get(self) -> None:
        self.send_json({"keys": [info.to_json() for info in self._api_keys.listing()]})


class KeyHandler(_KeysHandler):
    """DELETE → {"name", "revoked": true}; 404 `key_not_found`. Refused from that moment on."""

    route_name = "key"

    async def delete(self, name: str) -> None:
        revoked = await self._api_keys.revoke(name)  # a StorageError is JsonHandler's 503
        if not revoked:
            raise ApiError(404, "key_not_found", f"no key named {name!r}")
        self.send_json({"name": name, "revoked": True})


def routes(common: dict[str, Any], api_keys: ApiKeys) -> list[URLSpec]:
    kwargs = {**common, "api_keys": api_keys}
    return [
        tornado.web.url(r"/v1/keys", KeysHandler, kwargs),
        tornado.web.url(r"/v1/keys/([A-Za-z0-9_.-]{1,64})", KeyHandler, kwargs),
    ]
