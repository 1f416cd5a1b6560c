"""Admin routes of the callback outbox: list, show, retry one, retry the dead since a time; thin
handlers over callbacks.Callbacks; no SQL here. Never shows the secret or a signature.
"""

from __future__ import annotations

import math
from typing import Any

import tornado.web
from tornado.routing import URLSpec

from wxd.admin.base import ApiError, JsonHandler
from wxd.callbacks import Callbacks

DEFAULT_LIMIT = 50


class _CallbackHandler(JsonHandler):
    def initialize(self, callbacks: Callbacks, **kwargs: Any) -> None:  # type: ignore[override]
        super().initialize(**kwargs)
        self.callbacks = callbacks


class CallbacksHandler(_CallbackHandler):
    """GET /v1/callbacks?status=pending|done|dead&type=&limit=&cursor= → {"callbacks",
    "next_cursor"}, newest first."""

    route_name = "callbacks"

    async def get(self) -> None:
        status = self.get_query_argument("status", None) or None
        kind = self.get_query_argument("type", None) or None
        cursor = self.get_query_argument("cursor", None) or None
        try:
            limit = int(self.get_query_argument("limit", str(DEFAULT_LIMIT)))
            found, next_cursor = await self.callbacks.list(status, kind, limit, cursor)
        except ValueError as exc:
            raise ApiError(400, "invalid_query", str(exc) if str(exc) else "bad query") from None
        self.send_json({"callbacks": found, "next_cursor": next_cursor})


class CallbackHandler(_CallbackHandler):
    """GET /v1/callbacks/{id}: the callback with its data, attempts, last status, last error and
    an excerpt of the receiver's last answer."""

    route_name = "callback"

    async def get(self, callback_id: str) -> None:
        found = await self.callbacks.get(callback_id)
        if found is None:
            raise ApiError(404, "not_found", f"no callback {callback_id}")
        self.send_json(found)


class CallbackRetryHandler(_CallbackHandler):
    """POST /v1/callbacks/{id}/retry: dead → pending, due now, with a fresh max_age_s window;
    409 invalid_state for a pending or done one. Answers the callback."""

    route_name = "callback_retry"

    async def post(self, callback_id: str) -> None:
        outcome, found = await self.callbacks.retry(callback_id)
        if outcome == "not_found" or found is None:
            raise ApiError(404, "not_found", f"no callback {callback_id}")
        if outcome == "invalid_state":
            raise ApiError(409, "invalid_state", f"callback {callback_id} is {found['status']};"
                           " only a dead callback can be retried",
                           callback_status=found["status"])
        self.send_json(found)


class RetryDeadHandler(_CallbackHandler):
    """POST /v1/callbacks/retry-dead {"since": unix seconds (default 0: all)} → {"retried": n}:
    every callback that went dead at or after `since` is pending again, due now."""

    route_name = "callbacks_retry_dead"

    async def post(self) -> None:
        body = self.json_body() if self.request.body.strip() else {}
        since = body.get("since", 0)
        if isinstance(since, bool) or not isinstance(since, int | float) \
                or not math.isfinite(since):
            raise ApiError(400, "invalid_body", '"since" must be unix seconds')
        self.send_json({"retried": await self.callbacks.retry_dead(float(since))})


def routes(common: dict[str, Any], callbacks: Callbacks) -> list[URLSpec]:
    kwargs = {**common, "callbacks": callbacks}
    return [
        tornado.web.url(r"/v1/callbacks", CallbacksHandler, kwargs),
        tornado.web.url(r"/v1/callbacks/retry-dead", RetryDeadHandler, kwargs),
        tornado.web.url(r"/v1/callbacks/([A-Za-z0-9_-]+)", CallbackHandler, kwargs),
        tornado.web.url(r"/v1/callbacks/([A-Za-z0-9_-]+)/retry", CallbackRetryHandler, kwargs),
    ]
