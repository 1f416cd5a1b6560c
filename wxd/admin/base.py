"""Shared plumbing of the admin API: bearer auth and scopes, JSON bodies, JSON errors, metrics.

Imports tornado.web and no service module; handlers get collaborators through
`initialize()` (tornado URL-spec kwargs); nothing here reads config or the environment.
"""

from __future__ import annotations

import hmac
import json
import logging
from types import TracebackType
from typing import Any, Protocol

import tornado.web

from wxd.admin.scopes import ADMIN, allows, required_scope
from wxd.errors import StorageError
from wxd.metrics import Registry

log = logging.getLogger(__name__)


class ApiError(tornado.web.HTTPError):
    """An API failure with a stable snake_case `code` and a human message, rendered as JSON."""

    def __init__(self, status: int, code: str, message: str, **extra: Any) -> None:
        super().__init__(status, log_message=f"{code}: {message}")
        self.code = code
        self.message = message
        self.extra = extra


STATUS_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "body_too_large",
    415: "unsupported_media_type",
    422: "invalid",
    429: "too_many_requests",
    500: "internal_error",
    503: "unavailable",
}


STORAGE_UNAVAILABLE = "the database is not available; retry later"


class KeyCheck(Protocol):
    """What the handlers ask about a bearer token that is not the admin token
    (wxd.apikeys.ApiKeys satisfies it)."""

    def scopes_of(self, token: str) -> frozenset[str] | None:
        """The token's scopes, or None when it is not a valid key."""
        ...


ADMIN_SCOPES = frozenset({ADMIN})


class JsonHandler(tornado.web.RequestHandler):
    """Base for every admin route: JSON in and out, errors as {"error": {"code", "message"}}.

    A StorageError escaping any handler (disk full, I/O error, database busy or read-only)
    answers 503 `storage_unavailable` and is logged as one line without a traceback: nothing
    was stored, and the same request succeeds once the database takes writes again.
    """

    auth_required = True
    route_name = "unknown"

    def initialize(self, admin_token: str, metrics: Registry,
                   max_body_bytes: int | None = None, keys: KeyCheck | None = None,
                   **_: Any) -> None:
        self._admin_token = admin_token.encode()
        self._metrics = metrics
        self._max_body_bytes = max_body_bytes
        self._keys = keys

    def set_default_headers(self) -> None:
        self.set_header("Content-Type", "application/json; charset=UTF-8")
        self.set_header("Cache-Control", "no-store")

    def check_xsrf_cookie(self) -> None:
        """Bearer-token API: no cookies, no XSRF."""

    def prepare(self) -> None:
        # The HTTP server's own cap is looser, so that an oversized body gets a JSON 413 here.
        if self._max_body_bytes is not None and len(self.request.body) > self._max_body_bytes:
            raise ApiError(413, "body_too_large",
                           f"the request body is larger than {self._max_body_bytes} bytes")
        if not self.auth_required:
            return
        header = self.request.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        scopes = self._scopes(token.strip()) if scheme.lower() == "bearer" else None
        if scopes is None:
            raise ApiError(401, "unauthorized", "missing or wrong bearer token")
        needed = required_scope(self.route_name, self.request.method or "")
        if not allows(scopes, needed):
            raise ApiError(403, "insufficient_scope",
                           f"this key lacks the scope {needed!r} that this route needs",
                           scope=needed)

    def _scopes(self, token: str) -> frozenset[str] | None:
        # Constant-time comparison with the admin token; keys compare digests (wxd.apikeys).
        if hmac.compare_digest(token.encode(), self._admin_token):
            return ADMIN_SCOPES
        return self._keys.scopes_of(token) if self._keys is not None else None

    def json_body(self) -> dict[str, Any]:
        """The request body as a JSON object, or a 400 `invalid_json` / `invalid_body`."""
        try:
            value = json.loads(self.request.body or b"null")
        except (ValueError, UnicodeDecodeError, RecursionError):  # deep nesting: RecursionError
            raise ApiError(400, "invalid_json", "the request body is not valid JSON") from None
        if not isinstance(value, dict):
            raise ApiError(400, "invalid_body", "the request body must be a JSON object")
        return value

    def send_json(self, value: Any, status: int = 200) -> None:
        self.set_status(status)
        self.finish(json.dumps(value, ensure_ascii=False, separators=(",", ":")))

    def log_exception(self, typ: type[BaseException] | None, value: BaseException | None,
                      tb: TracebackType | None) -> None:
        if isinstance(value, StorageError):
            # The message is SQLite's (no SQL, no parameters); the path carries no secret.
            log.error("%s %s (%s): storage unavailable: %s", self.request.method,
                      self.request.path, self.route_name, value)
            return
        super().log_exception(typ, value, tb)

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        exc = kwargs.get("exc_info", (None, None, None))[1]
        if isinstance(exc, StorageError):
            self.set_status(503)  # tornado chose 500 for an exception that is not HTTPError
            error: dict[str, Any] = {"code": "storage_unavailable", "message": STORAGE_UNAVAILABLE}
        elif isinstance(exc, ApiError):
            error = {"code": exc.code, "message": exc.message, **exc.extra}
        else:
            code = STATUS_CODES.get(status_code, "error")
            reason = self._reason if status_code != 500 else "internal error; see the daemon log"
            error = {"code": code, "message": reason}
        self.finish(json.dumps({"error": error}, ensure_ascii=False))

    def on_finish(self) -> None:
        self._metrics.counter(
            "wxd_admin_requests_total", "Admin API requests by route and status.",
            ("route", "status"),
        ).inc(route=self.route_name, status=str(self.get_status()))


class NotFoundHandler(JsonHandler):
    """Every unknown admin path: 404 JSON (after auth, so it reveals no routes)."""

    route_name = "not_found"

    def prepare(self) -> None:
        super().prepare()
        raise ApiError(404, "not_found", f"no such route: {self.request.method} {self.request.path}")
