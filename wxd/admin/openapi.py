"""The admin API described as an OpenAPI 3 document, served at `GET /v1/openapi.json`.

tests/test_openapi.py walks the daemon's routes and this document both ways, so a
route cannot be added or removed without updating its description here.
"""

from __future__ import annotations

from typing import Any

import tornado.web
from tornado.routing import URLSpec

from wxd import __version__
from wxd.admin.base import JsonHandler
from wxd.admin.scopes import ANY, PUBLIC, required_scope
from wxd.config import CALLBACK_TYPES

ERROR = {"$ref": "#/components/schemas/Error"}
OBJ: dict[str, Any] = {"type": "object"}


def _json(schema: dict[str, Any]) -> dict[str, Any]:
    return {"content": {"application/json": {"schema": schema}}}


def _op(route: str, summary: str, ok: int = 200, body: dict[str, Any] | None = None,
        params: list[dict[str, Any]] | None = None, ok_schema: dict[str, Any] = OBJ,
        errors: tuple[int, ...] = (401,), auth: bool = True) -> dict[str, Any]:
    """One operation served by the handler whose route_name is `route` (its scope is stated
    from wxd.admin.scopes once the method is known: see _stated)."""
    op: dict[str, Any] = {
        "x-route": route,
        "summary": summary,
        "responses": {str(ok): {"description": "OK", **_json(ok_schema)},
                      **{str(code): {"description": "error", **_json(ERROR)} for code in errors}},
    }
    # Any route: the database cannot be used (disk full, I/O error, busy, read-only).
    op["responses"].setdefault("503", {"description": "storage_unavailable; retry later",
                                       **_json(ERROR)})
    if body is not None:
        op["requestBody"] = {"required": True, **_json(body)}
    if params:
        op["parameters"] = params
    if not auth:
        op["security"] = []
    return op


def _path_param(name: str) -> dict[str, Any]:
    return {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}


def _query(name: str, description: str) -> dict[str, Any]:
    return {"name": name, "in": "query", "required": False, "schema": {"type": "string"},
            "description": description}


PUSH_REQUEST: dict[str, Any] = {
    "type": "object",
    "required": ["to", "template_id", "data"],
    "properties": {
        "to": {"type": "object", "description": "exactly one of unionid, mp_openid, oa_openid",
               "properties": {k: {"type": "string"} for k in ("unionid", "mp_openid", "oa_openid")}},
        "template_id": {"type": "string"},
        "data": {"type": "object", "description": '{"k": {"value": "v"}} or the shorthand {"k": "v"}'},
        "url": {"type": "string"},
        "miniprogram": {"type": "object", "required": ["pagepath"],
                        "properties": {"appid": {"type": "string"}, "pagepath": {"type": "string"}}},
        "idempotency_key": {"type": "string"},
    },
}
PUSH = {"$ref": "#/components/schemas/Push"}
CALLBACK = {"$ref": "#/components/schemas/Callback"}
_INT: dict[str, Any] = {"type": "integer"}
BACKFILL: dict[str, Any] = {"type": "object", "properties": {
    "state": {"type": "string", "enum": ["idle", "running", "paused", "failed", "done"]},
    "run": _INT,
    "pages_done": {**_INT, "description": "pages stored in the current pass over the list"},
    "followers_done": {**_INT, "description": "openids of those pages (skipped ones included)"},
    "total": {**_INT, "nullable": True, "description": "user/get's latest total"},
    "seen": {**_INT, "description": "distinct followers the run listed, across restarts"},
    "skipped": {**_INT, "description": "openids of the current pass WeChat refused to describe "
                "(batchget 50005/40003/40032, then user/info): not stored"},
    "restarts_from_head": {**_INT, "description": "times the run restarted from the head of "
                           "the list after a stale cursor (40003 or an early empty page)"},
    "complete": {"type": "boolean", "nullable": True, "description":
                 "done runs: the listing was complete (seen ≈ total), so followers not seen "
                 "were marked unsubscribed; false: nobody was"},
    "cursor_at": {"type": "number", "nullable": True, "description": "when the cursor was saved"},
    "calls": _INT, "active": {"type": "boolean"}, "percent": {"type": "number", "nullable": True},
}}
MP_OPENID = {"type": "string", "pattern": "^[A-Za-z0-9_-]{1,128}$"}
LINK_CODE = {"$ref": "#/components/schemas/LinkCode"}


def _optional_body(op: dict[str, Any]) -> dict[str, Any]:
    op["requestBody"]["required"] = False
    return op


KEY_FIELDS: dict[str, Any] = {
    "name": {"type": "string"}, "scopes": {"type": "array", "items": {"type": "string"}},
    "created_at": {"type": "number"}, "last_used_at": {"type": "number", "nullable": True}}
KEY: dict[str, Any] = {"type": "object", "properties": KEY_FIELDS}

PATHS: dict[str, dict[str, Any]] = {
    "/healthz": {"get": _op("healthz", "Liveness and database health (no auth; 503 when "
                            "unusable)", errors=(503,), auth=False)},
    "/metrics": {"get": _op("metrics", "Prometheus text format metrics",
                            ok_schema={"type": "string"})},
    "/v1/openapi.json": {"get": _op("openapi", "This document")},
    "/v1/stats": {"get": _op("stats", "Counts: followers, subscribed, linked, MP users, pushes "
                             "by status and their pause (pushes.paused: reason, errcode, since, "
                             "until, ip), token fetches today, backfill, callbacks by status")},
    "/v1/tokens/{app}": {"get": _op(
        "tokens", "The central access_token of the OA or the MP for other local processes",
        params=[_path_param("app")], errors=(401, 404, 503),
        ok_schema={"type": "object", "properties": {"access_token": {"type": "string"},
                                                    "expires_at": {"type": "number"}}})},
    "/v1/tickets/jsapi": {"get": _op(
        "jsapi_ticket", "The OA's jsapi_ticket, held and refreshed like the access_tokens",
        errors=(401, 503),
        ok_schema={"type": "object", "properties": {"ticket": {"type": "string"},
                                                    "expires_at": {"type": "number"}}})},
    "/v1/jssdk/signature": {"post": _op(
        "jssdk_signature", "wx.config fields for an H5 page (its URL is signed without the "
        "#fragment)",
        body={"type": "object", "required": ["url"], "properties": {"url": {"type": "string"}}},
        errors=(400, 401, 503),
        ok_schema={"type": "object", "properties": {
            "appId": {"type": "string"}, "timestamp": {"type": "integer"},
            "nonceStr": {"type": "string"}, "signature": {"type": "string"}}})},
    "/v1/mp/login": {"post": _op(
        "mp_login", "Exchange a wx.login code (jscode2session), store the MP user and link it",
        body={"type": "object", "required": ["code"], "properties": {"code": {"type": "string"}}},
        errors=(400, 401, 502, 503), ok_schema={"$ref": "#/components/schemas/Identity"})},
    "/v1/mp/decrypt": {"post": _op(
        "mp_decrypt", "Decrypt MP encryptedData with the stored session_key; links when it "
        "carries unionId",
        body={"type": "object", "required": ["mp_openid", "encrypted_data", "iv"],
              "properties": {k: {"type": "string"} for k in ("mp_openid", "encrypted_data", "iv")}},
        errors=(400, 401, 404, 409))},
    "/v1/users": {"get": _op(
        "users", "Look up a linked identity by exactly one key",
        params=[_query("unionid", "unionid"), _query("mp_openid", "Mini Program openid"),
                _query("oa_openid", "Official Account openid")],
        errors=(400, 401, 404), ok_schema={"$ref": "#/components/schemas/Identity"})},
    "/v1/links": {"delete": _op(
        "links", "Remove the explicit (qrcode or oauth) link of an MP user; 409 link_derived "
        "for a unionid link", params=[_query("mp_openid", "Mini Program openid (required)")],
        errors=(400, 401, 404, 409),
        ok_schema={"type": "object", "properties": {"removed": {
            "$ref": "#/components/schemas/Link"}}})},
    "/v1/links/qrcodes": {"post": _op(
        "link_qrcodes", "Create a temporary OA parametric QR code (QR_STR_SCENE, one-time "
        "scene) that links whoever scans it to mp_openid (source qrcode)", ok=201,
        body={"type": "object", "required": ["mp_openid"], "properties": {
            "mp_openid": MP_OPENID,
            "expires_in": {"type": "integer", "minimum": 60, "maximum": 2592000,
                           "default": 600, "description": "seconds"}}},
        errors=(400, 401, 502, 503),
        ok_schema={"type": "object", "properties": {
            "id": {"type": "string"}, "scene": {"type": "string"},
            "ticket": {"type": "string"}, "url": {"type": "string", "nullable": True},
            "image_url": {"type": "string", "description": "WeChat's showqrcode URL"},
            "expires_at": {"type": "number"}, "status": {"type": "string",
                                                         "enum": ["pending"]}}})},
    "/v1/links/qrcodes/{id}": {"get": _op(
        "link_qrcode", "Status of a QR link code", params=[_path_param("id")],
        errors=(401, 404), ok_schema=LINK_CODE)},
    "/v1/links/oauth": {"post": _op(
        "link_oauth", "Create a one-time OA web-authorization link "
        "({public_url}/oauth/start?t=...) that links the WeChat user opening it to mp_openid "
        "(source oauth); needs [webhook] public_url (409 oauth_not_configured)", ok=201,
        body={"type": "object", "required": ["mp_openid"], "properties": {
            "mp_openid": MP_OPENID,
            "return_url": {"type": "string", "description": "https URL on a host of "
                           "[linking] oauth_return_hosts; the callback redirects there"},
            "expires_in": {"type": "integer", "minimum": 60, "maximum": 86400,
                           "default": 600}}},
        errors=(400, 401, 409, 503),
        ok_schema={"type": "object", "properties": {
            "id": {"type": "string"}, "url": {"type": "string"},
            "expires_at": {"type": "number"}}})},
    "/v1/links/oauth/{id}": {"get": _op(
        "link_oauth_status", "Status of an OAuth link", params=[_path_param("id")],
        errors=(401, 404), ok_schema=LINK_CODE)},
    "/v1/pushes": {
        "post": _op("pushes", "Queue a template message (202 after commit; 200 for a known "
                    "idempotency_key)",
                    ok=202, body=PUSH_REQUEST, errors=(400, 401, 409, 422), ok_schema=PUSH),
        "get": _op("pushes", "List pushes, newest first",
                   params=[_query("status", "queued|sending|sent|delivered|failed|cancelled"),
                           _query("limit", "page size"), _query("cursor", "from next_cursor")]),
    },
    "/v1/pushes/batch": {"post": _op(
        "pushes_batch", "Queue many pushes in one group commit; one result per item", ok=202,
        body={"type": "object", "required": ["pushes"],
              "properties": {"pushes": {"type": "array", "items": PUSH_REQUEST}}},
        errors=(400, 401, 413))},
    "/v1/pushes/{id}": {"get": _op("push", "One push with its status, attempts, msgid and error",
                                   params=[_path_param("id")], errors=(401, 404), ok_schema=PUSH)},
    "/v1/pushes/{id}/retry": {"post": _op(
        "push_action", "Queue a failed push again; says whether its client_msg_id was kept "
        "(WeChat then drops the retry if an earlier send was accepted) and warns when it may "
        "deliver twice",
        params=[_path_param("id")], errors=(401, 404, 409),
        ok_schema={"allOf": [PUSH, {"type": "object", "required": ["client_msg_id_reused"],
                                    "properties": {
                                        "client_msg_id_reused": {"type": "boolean"},
                                        "warning": {"type": "string"}}}]})},
    "/v1/pushes/{id}/cancel": {"post": _op("push_action", "Cancel a queued push",
                                           params=[_path_param("id")], errors=(401, 404, 409),
                                           ok_schema=PUSH)},
    "/v1/templates": {"get": _op("templates", "The OA's templates (cached "
                                 "get_all_private_template) and their keys",
                                 errors=(401, 502, 503))},
    "/v1/templates/refresh": {"post": _op("templates_refresh", "Fetch the OA's template list "
                                          "again now", errors=(401, 502, 503))},
    "/v1/backfill": {
        "post": _optional_body(_op(
            "backfill", "Start or resume the follower backfill (idempotent; 200 when a run is "
            "active)",
            ok=202, errors=(400, 401, 409, 503), ok_schema=BACKFILL,
            body={"type": "object", "properties": {
                "force": {"type": "boolean", "description": "resume a paused run now"},
                "from_start": {"type": "boolean", "description":
                               "begin a new run at the head of the list instead of resuming "
                               "at the saved cursor (409 backfill_running while one is active)"},
            }})),
        "get": _op("backfill", "Backfill progress: state, pages, followers, total, rate, ETA, "
                   "last error, seen, skipped, restarts from the head", ok_schema=BACKFILL),
    },
    "/v1/keys": {
        "post": _op("keys", "Create a scoped API key; the answer holds the key, once", ok=201,
                    body={"type": "object", "required": ["name", "scopes"], "properties": {
                        "name": {"type": "string"},
                        "scopes": {"type": "array", "items": {"type": "string"}}}},
                    errors=(400, 401, 409),
                    ok_schema={"type": "object", "properties": {
                        **KEY_FIELDS, "key": {"type": "string"}}}),
        "get": _op("keys", "Every key: name, scopes, created, last used (never the key)",
                   ok_schema={"type": "object", "properties": {
                       "keys": {"type": "array", "items": KEY}}}),
    },
    "/v1/keys/{name}": {"delete": _op("key", "Revoke a key (refused from this moment on)",
                                      params=[_path_param("name")], errors=(401, 404))},
    "/v1/callbacks": {"get": _op(
        "callbacks", "List callbacks to the backend, newest first",
        params=[_query("status", "pending|done|dead"),
                _query("type", "a callback type, e.g. push.delivered"),
                _query("limit", "page size (1..500)"), _query("cursor", "from next_cursor")],
        errors=(400, 401),
        ok_schema={"type": "object", "properties": {
            "callbacks": {"type": "array", "items": CALLBACK},
            "next_cursor": {"type": "string", "nullable": True}}})},
    "/v1/callbacks/retry-dead": {"post": _op(
        "callbacks_retry_dead",
        "Deliver again every callback that went dead at or after `since` (default: all)",
        body={"type": "object", "properties": {"since": {"type": "number",
                                                         "description": "unix seconds"}}},
        errors=(400, 401),
        ok_schema={"type": "object", "properties": {"retried": {"type": "integer"}}})},
    "/v1/callbacks/{id}": {"get": _op(
        "callback", "One callback: data, attempts, last status code, last error, answer excerpt",
        params=[_path_param("id")], errors=(401, 404), ok_schema=CALLBACK)},
    "/v1/callbacks/{id}/retry": {"post": _op(
        "callback_retry", "Deliver a dead callback again (a fresh max_age_s window)",
        params=[_path_param("id")], errors=(401, 404, 409), ok_schema=CALLBACK)},
}


def _stated(paths: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Each operation with the scope it needs (x-scope, from wxd.admin.scopes) and its 403."""
    for ops in paths.values():
        for method, op in ops.items():
            scope = required_scope(op.pop("x-route"), method)
            if scope == PUBLIC:
                continue
            op["x-scope"] = scope
            op["description"] = ("Any valid key." if scope == ANY else
                                 f"Needs a key with the scope `{scope}` (or `admin`).")
            if scope != ANY:
                op["responses"]["403"] = {"description": "insufficient_scope", **_json(ERROR)}
    return paths


PATHS = _stated(PATHS)

DOCUMENT: dict[str, Any] = {
    "openapi": "3.0.3",
    "info": {"title": "wxd admin API", "version": __version__,
             "description": "Local admin API of wxd. Bearer token (the [admin] token or a scoped "
                            "API key) on everything but /healthz; each operation's x-scope "
                            "names the scope it needs. The public listener (the webhook's) also "
                            "serves GET /oauth/start and GET /oauth/callback for OAuth links "
                            "(HTML pages, no token)."},
    "paths": PATHS,
    "security": [{"bearer": []}],
    "components": {
        "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        "schemas": {
            "Error": {"type": "object", "required": ["error"], "properties": {"error": {
                "type": "object", "required": ["code", "message"],
                "properties": {"code": {"type": "string"}, "message": {"type": "string"}}}}},
            "Identity": {"type": "object", "properties": {
                "unionid": {"type": "string", "nullable": True},
                "mp_openid": {"type": "string", "nullable": True},
                "oa_openid": {"type": "string", "nullable": True},
                "subscribed": {"type": "boolean"},
                "linked": {"type": "boolean"},
                "linked_at": {"type": "number", "nullable": True},
                "link": {"type": "object", "nullable": True, "properties": {
                    "source": {"type": "string", "enum": ["unionid", "qrcode", "oauth"]},
                    "linked_at": {"type": "number", "nullable": True}}}}},
            "Link": {"type": "object", "properties": {
                "mp_openid": {"type": "string"}, "oa_openid": {"type": "string"},
                "source": {"type": "string", "enum": ["qrcode", "oauth"]},
                "linked_at": {"type": "number"}}},
            "LinkCode": {"type": "object", "required": ["id", "status"], "properties": {
                "id": {"type": "string"},
                "status": {"type": "string", "enum": ["pending", "linked", "expired"]},
                "expires_at": {"type": "number"},
                "oa_openid": {"type": "string"}, "linked_at": {"type": "number"},
                "replaced": {"type": "object", "description": "the OA openid of the "
                             "explicit link this one replaced",
                             "properties": {"oa_openid": {"type": "string"}}},
                "error": {"type": "string", "description": "why the latest attempt "
                          "linked nothing (link_conflict)"}}},
            "Push": {"type": "object", "properties": {
                "id": {"type": "string"},
                "status": {"type": "string", "enum": ["queued", "sending", "sent", "delivered",
                                                      "failed", "cancelled"]},
                "attempts": {"type": "integer"}, "msgid": {"type": "string", "nullable": True},
                "error": {"type": "string", "nullable": True},
                "errcode": {"type": "integer", "nullable": True},
                "client_msg_id": {"type": "string"},
                "last_answer": {
                    "type": "object", "nullable": True,
                    "description": "WeChat's JSON answer to the last attempt, unless it was a"
                                   " plain acceptance with a msgid (bounded: 16 keys, strings of"
                                   " 512 characters)"}}},
            "Callback": {"type": "object", "properties": {
                "id": {"type": "string", "description": "evt_…, the same on every attempt"},
                "type": {"type": "string", "enum": list(CALLBACK_TYPES)},
                "subject": {"type": "string"}, "seq": {"type": "integer"},
                "status": {"type": "string", "enum": ["pending", "done", "dead"]},
                "attempts": {"type": "integer"}, "created_at": {"type": "number"},
                "next_attempt_at": {"type": "number", "nullable": True},
                "last_attempt_at": {"type": "number", "nullable": True},
                "last_status": {"type": "integer", "nullable": True},
                "last_error": {"type": "string", "nullable": True},
                "last_answer": {"type": "string", "nullable": True},
                "finished_at": {"type": "number", "nullable": True},
                "data": {"type": "object"}}},
        },
    },
}


class OpenAPIHandler(JsonHandler):
    """The OpenAPI 3 document of this admin API."""

    route_name = "openapi"

    async def get(self) -> None:
        self.send_json(DOCUMENT)


def routes(common: dict[str, Any]) -> list[URLSpec]:
    return [tornado.web.url(r"/v1/openapi.json", OpenAPIHandler, common)]
