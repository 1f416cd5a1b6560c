"""A small synchronous client for the admin API, used by the CLI commands and `wxd demo`.

Standard library only (urllib). Raises ConnectFailed when the daemon cannot be reached
and ApiCallFailed when it answers with an error; both map to CLI exit codes.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

from wxd.config import Config


class ConnectFailed(Exception):
    """The admin API could not be reached (daemon not running, wrong address)."""


class ApiCallFailed(Exception):
    """The admin API answered with an error status; carries the JSON error code and message."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message


class AdminClient:
    """`request(method, path, body)` → parsed JSON; the bearer token is sent on every call."""

    def __init__(self, base_url: str, token: str, timeout_s: float = 10.0) -> None:
        self.base_url = base_url.rstrip("/")
        self._token = token
        self.timeout_s = timeout_s

    def __repr__(self) -> str:
        return f"AdminClient({self.base_url!r})"

    @classmethod
    def from_config(cls, cfg: Config) -> AdminClient:
        listen = cfg.admin.listen
        host = listen.host
        if host in ("0.0.0.0", "::"):
            host = "127.0.0.1"
        netloc = f"[{host}]" if ":" in host else host
        return cls(f"http://{netloc}:{listen.port}", cfg.admin.token)

    def request(self, method: str, path: str, body: Any = None,
                query: dict[str, Any] | None = None) -> Any:
        url = self.base_url + path
        if query:
            url += "?" + urllib.parse.urlencode({k: v for k, v in query.items() if v is not None})
        data = json.dumps(body, ensure_ascii=False).encode() if body is not None else None
        if not url.startswith(("http://", "https://")):
            raise ConnectFailed(f"admin URL must be http(s): {self.base_url}")
        request = urllib.request.Request(url, data=data, method=method)  # noqa: S310 - checked above
        request.add_header("Authorization", f"Bearer {self._token}")
        if data is not None:
            request.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:  # noqa: S310
                return json.loads(response.read() or b"null")
        except urllib.error.HTTPError as exc:
            with exc:
                raw = exc.read()
            try:
                error = json.loads(raw)["error"]
                code, message = str(error["code"]), str(error["message"])
            except (ValueError, KeyError, TypeError):
                code, message = "http_error", raw.decode("utf-8", "replace")[:200]
            raise ApiCallFailed(exc.code, code, message) from None
        except (TimeoutError, urllib.error.URLError, ConnectionError) as exc:
            reason = getattr(exc, "reason", exc)
            raise ConnectFailed(f"cannot reach the wxd admin API at {self.base_url}: {reason}") from None

    def get(self, path: str, **query: Any) -> Any:
        return self.request("GET", path, query=query or None)

    def post(self, path: str, body: Any = None) -> Any:
        return self.request("POST", path, body if body is not None else {})

    def delete(self, path: str, **query: Any) -> Any:
        return self.request("DELETE", path, query=query or None)
