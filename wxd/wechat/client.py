"""WeChatClient: every WeChat API call over an injected HTTP transport, its answer checked.

Imports wxd.errors, wxd.metrics and wxd.wechat.transport only; never wxd.tokens (tokens reach
it through the TokenSource protocol). It never logs a URL: query strings carry secrets.
"""

from __future__ import annotations

import json
import logging
import time
import urllib.parse
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from wxd.errors import TransportError, WeChatAPIError
from wxd.metrics import Registry
from wxd.wechat.errcodes import classify
from wxd.wechat.transport import FetchError, Response

log = logging.getLogger(__name__)

# Query parameters whose values must never appear in an error, a log line or a metric.
_SECRET_PARAMS = ("access_token", "secret", "appsecret", "js_code", "code")

TOKEN_PATH = "/cgi-bin/token"  # noqa: S105 - a path, not a password
STABLE_TOKEN_PATH = "/cgi-bin/stable_token"  # noqa: S105


class Transport(Protocol):
    """How WeChatClient sends a request; transport.KeepAliveClient satisfies it. Raises
    transport.FetchError when there is no HTTP answer; any status is returned."""

    async def fetch(self, method: str, url: str, *, headers: Mapping[str, str] | None = None,
                    body: bytes | None = None, connect_timeout_s: float = 10.0,
                    request_timeout_s: float = 30.0, replay_safe: bool | None = None
                    ) -> Response: ...


class TokenSource(Protocol):
    """Where WeChatClient.call gets an access_token; tokens.TokenManager satisfies it."""

    async def get(self) -> str:
        """A currently valid access_token (may wait for a shared refresh). Raises
        errors.TokenUnavailable when no token can be had: WeChat refused or did not answer
        the token fetch, which is no verdict on the call that needed the token."""
        ...

    async def invalidate(self, token: str) -> None:
        """`token` was rejected by WeChat: refresh only if it is still the current token."""
        ...


def _scrub(text: str, secrets: Sequence[str]) -> str:
    for secret in secrets:
        if secret:
            text = text.replace(secret, "<redacted>")
    return text


def _scrub_json(value: Any, secrets: Sequence[str]) -> Any:
    """`value` (decoded JSON) with every string, keys included, scrubbed of `secrets`."""
    if isinstance(value, str):
        return _scrub(value, secrets)
    if isinstance(value, dict):
        return {_scrub(str(k), secrets): _scrub_json(v, secrets) for k, v in value.items()}
    if isinstance(value, list):
        return [_scrub_json(item, secrets) for item in value]
    return value


class WeChatClient:
    """Calls api.weixin.qq.com (or `api_base`, e.g. the sandbox) and checks every JSON answer.

    The transport is injected and not closed here (its owner closes it). Timeouts are
    seconds. Errors: TransportError for network failures, timeouts, resets, non-JSON answers
    and any HTTP status other than 200; WeChatAPIError(kind=classify(errcode)) when the JSON
    carries a non-zero errcode, with the whole answer (scrubbed of the call's secrets) and
    whether the transport sent the request twice. Both carry the API path without its query
    string.
    """

    def __init__(self, http: Transport, api_base: str,
                 connect_timeout_s: float, request_timeout_s: float,
                 metrics: Registry | None = None) -> None:
        self._http = http
        self._base = api_base.rstrip("/")
        self._connect_timeout_s = connect_timeout_s
        self._request_timeout_s = request_timeout_s
        registry = metrics if metrics is not None else Registry()
        self._requests = registry.counter(
            "wxd_wechat_requests_total", "Upstream WeChat API requests by path and outcome "
            "(ok, token, transient, quota, unreachable, terminal, transport).", ("path", "outcome"))
        self._seconds = registry.histogram(
            "wxd_wechat_request_seconds", "Upstream WeChat API latency.", ("path",))

    async def call(self, method: str, path: str, *, params: Mapping[str, str] | None = None,
                   body: Mapping[str, Any] | None = None, token: TokenSource | None = None,
                   replay_safe: bool = True) -> dict[str, Any]:
        """One API call; returns the JSON object answered (errcode absent or 0).

        `body` is sent as UTF-8 JSON without \\u escapes (some WeChat APIs reject them, 40033).
        With `token`, the access_token is added to the query; on a token-class error the call
        invalidates the token it used (a refresh happens only if that token is still current)
        and is retried exactly once; a second failure surfaces. `replay_safe` lets the transport
        resend once after a stale keep-alive connection (see wxd.wechat.transport); every WeChat call wxd
        makes may be repeated except a forced stable_token refresh and /sns/jscode2session.
        """
        if token is None:
            return await self._once(method, path, params, body, None, replay_safe)
        used = await token.get()
        try:
            return await self._once(method, path, params, body, used, replay_safe)
        except WeChatAPIError as exc:
            if not exc.token_invalid:
                raise
            log.info("%s answered errcode %d; refreshing the token and retrying once",
                     path, exc.errcode)
            await token.invalidate(used)
        return await self._once(method, path, params, body, await token.get(), replay_safe)

    async def _once(self, method: str, path: str, params: Mapping[str, str] | None,
                    body: Mapping[str, Any] | None, access_token: str | None,
                    replay_safe: bool) -> dict[str, Any]:
        query = dict(params or {})
        if access_token is not None:
            query["access_token"] = access_token
        secrets = [query[name] for name in _SECRET_PARAMS if query.get(name)]
        if body is not None:
            secrets.extend(str(body[name]) for name in ("secret", "appsecret") if body.get(name))
        url = self._base + path + ("?" + urllib.parse.urlencode(query) if query else "")
        headers = {"Accept": "application/json"}
        payload: bytes | None = None
        if body is not None:
            payload = json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
            headers["Content-Type"] = "application/json; charset=utf-8"
        elif method == "POST":
            payload = b""
        started = time.perf_counter()
        response: Response | None = None
        reason = "no answer"
        try:
            response = await self._http.fetch(
                method, url, headers=headers, body=payload,
                connect_timeout_s=self._connect_timeout_s,
                request_timeout_s=self._request_timeout_s, replay_safe=replay_safe)
        except FetchError as exc:  # never carries the URL; scrubbed anyway (defence in depth)
            reason = exc.reason
        if response is None:
            # Raised outside the except block: nothing of the transport rides along as context.
            raise self._transport(method, path, reason, None, secrets, started)
        if response.code != 200:
            raise self._transport(method, path, f"HTTP {response.code}", response.code,
                                  secrets, started)
        self._observe(path, started)
        try:
            answer = json.loads(response.body)
        except (ValueError, UnicodeDecodeError):
            answer = None
        if not isinstance(answer, dict):
            self._count(path, "transport")
            raise TransportError(f"{method} {path}: the answer is not a JSON object", path,
                                 response.code)
        errcode = answer.get("errcode", 0)
        if errcode in (0, None):
            self._count(path, "ok")
            return answer
        if not isinstance(errcode, int):
            self._count(path, "transport")
            raise TransportError(f"{method} {path}: errcode is not an integer", path,
                                 response.code)
        kind = classify(errcode)
        self._count(path, kind)
        errmsg = _scrub(str(answer.get("errmsg", "")), secrets)
        raise WeChatAPIError(errcode, errmsg, path, kind, answer=_scrub_json(answer, secrets),
                             resent=response.resent)

    def _transport(self, method: str, path: str, reason: str, status: int | None,
                   secrets: Sequence[str], started: float) -> TransportError:
        self._observe(path, started)
        self._count(path, "transport")
        return TransportError(_scrub(f"{method} {path}: {reason}".rstrip(": "), secrets), path,
                              status)

    def _count(self, path: str, outcome: str) -> None:
        self._requests.inc(path=path, outcome=outcome)

    def _observe(self, path: str, started: float) -> None:
        self._seconds.observe(time.perf_counter() - started, path=path)

    async def fetch_token(self, appid: str, secret: str, mode: str, force: bool = False
                          ) -> tuple[str, float]:
        """(access_token, expires_in seconds) from WeChat, without caching.

        mode "stable": POST /cgi-bin/stable_token (normal mode returns the same token while it
        is valid, with the remaining lifetime; `force` = force_refresh, 20 a day, use only for a
        leaked token). mode "legacy": GET /cgi-bin/token, which issues a new token on every
        call and leaves the previous one working for 5 more minutes only.
        """
        if mode == "stable":
            answer = await self.call("POST", STABLE_TOKEN_PATH, body={
                "grant_type": "client_credential", "appid": appid, "secret": secret,
                "force_refresh": force,
            }, replay_safe=not force)
            path = STABLE_TOKEN_PATH
        elif mode == "legacy":
            answer = await self.call("GET", TOKEN_PATH, params={
                "grant_type": "client_credential", "appid": appid, "secret": secret,
            })
            path = TOKEN_PATH
        else:
            raise ValueError(f"token mode must be 'stable' or 'legacy', not {mode!r}")
        access_token = answer.get("access_token")
        expires_in = answer.get("expires_in")
        if (not isinstance(access_token, str) or not access_token
                or isinstance(expires_in, bool) or not isinstance(expires_in, (int, float))):
            raise TransportError(f"{path}: the answer has no access_token/expires_in", path, 200)
        return access_token, float(expires_in)
