"""Admin routes of the push pipeline: enqueue (one or a batch), show, list, retry, cancel, and
the OA template cache: thin handlers over pushes.PushService; no SQL here.
"""

from __future__ import annotations

from typing import Any

import tornado.web
from tornado.routing import URLSpec

from wxd.admin.base import ApiError, JsonHandler
from wxd.errors import TokenUnavailable, TransportError, WeChatAPIError
from wxd.pushes import PushService
from wxd.wechat.templates import PushRejected

MAX_BATCH = 5000
DEFAULT_LIMIT = 50


def _rejected(exc: PushRejected) -> ApiError:
    extra = {"field": exc.field} if exc.field is not None else {}
    return ApiError(exc.status, exc.code, exc.message, **extra)


class _PushHandler(JsonHandler):
    def initialize(self, service: PushService, **kwargs: Any) -> None:  # type: ignore[override]
        super().initialize(**kwargs)
        self.service = service


class PushesHandler(_PushHandler):
    """POST /v1/pushes → 202 {"id", "status"} once committed (200 + the stored push for a
    known idempotency_key); GET /v1/pushes?status=&limit=&cursor= → {"pushes", "next_cursor"}."""

    route_name = "pushes"

    async def post(self) -> None:
        try:
            result = await self.service.enqueue(self.json_body())
        except PushRejected as exc:
            raise _rejected(exc) from None
        self.send_json(result.push, status=202 if result.created else 200)

    async def get(self) -> None:
        status = self.get_query_argument("status", None) or None
        cursor = self.get_query_argument("cursor", None) or None
        limit_text = self.get_query_argument("limit", str(DEFAULT_LIMIT))
        try:
            limit = int(limit_text)
            pushes, next_cursor = await self.service.list(status, limit, cursor)
        except ValueError as exc:
            raise ApiError(400, "invalid_query", str(exc) if str(exc) else "bad query") from None
        self.send_json({"pushes": pushes, "next_cursor": next_cursor})


class BatchHandler(_PushHandler):
    """POST /v1/pushes/batch {"pushes": [...]} → 202 {"results": [...]}, one per item in order:
    {"id", "status", "created", "http_status"} or {"error": {...}, "http_status"}. All accepted
    items are committed together (one group commit) before the answer."""

    route_name = "pushes_batch"

    async def post(self) -> None:
        items = self.json_body().get("pushes")
        if not isinstance(items, list) or not items:
            raise ApiError(400, "invalid_body", 'the body must be {"pushes": [push, ...]} '
                           "with at least one push")
        if len(items) > MAX_BATCH:
            raise ApiError(413, "batch_too_large", f"at most {MAX_BATCH} pushes per batch, "
                           f"got {len(items)}")
        results: list[dict[str, Any]] = []
        for result in await self.service.enqueue_batch(items):
            if isinstance(result, PushRejected):
                results.append({"error": result.to_json(), "http_status": result.status})
            else:
                results.append({**result.push, "created": result.created,
                                "http_status": 202 if result.created else 200})
        self.send_json({"results": results}, status=202)


class PushHandler(_PushHandler):
    """GET /v1/pushes/{id}: the push (status, attempts, msgid, error, errcode, to, ...)."""

    route_name = "push"

    async def get(self, push_id: str) -> None:
        push = await self.service.get(push_id)
        if push is None:
            raise ApiError(404, "not_found", f"no push {push_id}")
        self.send_json(push)


class PushActionHandler(_PushHandler):
    """POST /v1/pushes/{id}/retry (failed → queued), POST /v1/pushes/{id}/cancel (queued →
    cancelled); 409 invalid_state otherwise. Answers the push."""

    route_name = "push_action"

    async def post(self, push_id: str, action: str) -> None:
        if action == "retry":
            outcome, push = await self.service.retry(push_id)
            allowed = "failed"
        else:
            outcome, push = await self.service.cancel(push_id)
            allowed = "queued"
        if outcome == "not_found" or push is None:
            raise ApiError(404, "not_found", f"no push {push_id}")
        if outcome == "invalid_state":
            raise ApiError(409, "invalid_state", f"push {push_id} is {push['status']}; only a "
                           f"{allowed} push can be {'retried' if action == 'retry' else 'cancelled'}",
                           push_status=push["status"])
        self.send_json(push)


class TemplatesHandler(_PushHandler):
    """GET /v1/templates: the cached OA template list with each template's placeholder keys."""

    route_name = "templates"

    async def get(self) -> None:
        self.send_json(await self.service.templates())


class TemplatesRefreshHandler(_PushHandler):
    """POST /v1/templates/refresh: refetch get_all_private_template now (502 if WeChat fails)."""

    route_name = "templates_refresh"

    async def post(self) -> None:
        try:
            templates = await self.service.refresh_templates()
        except WeChatAPIError as exc:
            raise ApiError(502, "wechat_error", f"WeChat answered errcode {exc.errcode}: "
                           f"{exc.errmsg}", errcode=exc.errcode) from None
        except TransportError as exc:
            raise ApiError(502, "wechat_unreachable", str(exc)) from None
        except TokenUnavailable as exc:
            raise ApiError(502, "wechat_unreachable", str(exc), errcode=exc.errcode) from None
        self.send_json({"templates": templates})


def routes(common: dict[str, Any], service: PushService) -> list[URLSpec]:
    kwargs = {**common, "service": service}
    return [
        tornado.web.url(r"/v1/pushes", PushesHandler, kwargs),
        tornado.web.url(r"/v1/pushes/batch", BatchHandler, kwargs),
        tornado.web.url(r"/v1/pushes/([A-Za-z0-9_-]+)", PushHandler, kwargs),
        tornado.web.url(r"/v1/pushes/([A-Za-z0-9_-]+)/(retry|cancel)", PushActionHandler, kwargs),
        tornado.web.url(r"/v1/templates", TemplatesHandler, kwargs),
        tornado.web.url(r"/v1/templates/refresh", TemplatesRefreshHandler, kwargs),
    ]
