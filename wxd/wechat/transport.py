"""KeepAliveClient: HTTP/1.1 requests over a bounded pool of persistent connections.

Imports tornado (TCPClient, HTTP1Connection), wxd.metrics and the standard library.
tornado's own AsyncHTTPClient (simple_httpclient) opens and closes a TCP (and TLS) connection
for every request; for the backfill's 10,000 batchgets and the push workers' sends that
handshake is the largest cost after the answer itself. This client keeps connections open.

Contract:
- At most `max_connections` connections exist at once (busy + idle); a caller beyond that
  waits for one, and the wait counts against its request timeout.
- An idle connection is reused most-recent-first; one idle longer than `idle_timeout_s`, one
  the server closed (noticed while idle) or one whose answer said `Connection: close` is not.
- A request that fails on a *reused* connection before any byte of an answer arrived (most
  often the server closed the idle connection as we wrote, and nothing was processed) is sent
  once more on a new connection when it is `replay_safe` (default: GET and HEAD only). As in
  Go's net/http, "nothing was processed" cannot be proven, so only callers whose request may
  be repeated say so (wechat/client.py: every call but a forced stable_token refresh and
  jscode2session, whose code is single-use). The answer to a resent request says so
  (Response.resent).
- Errors: FetchError (no URL, no query string: they carry secrets) for connect failures,
  timeouts, resets, malformed or oversized answers. Any HTTP status is returned, not raised,
  and none is followed: a 3xx is an answer like any other (no redirects).
- With `truncate_body` an answer body longer than `max_body_bytes` is not an error: reading
  stops there, the answer comes back cut (Response.truncated) and the connection is closed.
"""

from __future__ import annotations

import asyncio
import collections
import ssl
import time
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from tornado import httputil, iostream
from tornado.http1connection import HTTP1Connection, HTTP1ConnectionParameters
from tornado.tcpclient import TCPClient

from wxd.metrics import Counter, Registry

USER_AGENT = "wxd"
MAX_HEADER_BYTES = 64 * 1024


class FetchError(Exception):
    """No usable HTTP answer. `reason` never contains the URL's query string."""

    def __init__(self, reason: str, *, timed_out: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.timed_out = timed_out


@dataclass(frozen=True)
class Response:
    """One HTTP answer: status code, headers (decompressed body: no Content-Encoding), body.
    `resent`: the request was sent a second time after a stale connection (the first copy
    may have been processed: a non-idempotent call may see its own duplicate's answer)."""

    code: int
    reason: str
    headers: httputil.HTTPHeaders
    body: bytes
    resent: bool = False
    truncated: bool = False


@dataclass
class PoolStats:
    """Connections opened, requests on a reused connection, requests sent again after a stale
    connection; `counter` (labelled by event) is what /metrics shows of them."""

    counter: Counter = field(repr=False)
    opened: int = 0
    reused: int = 0
    retried_stale: int = 0

    def count(self, name: str) -> None:
        setattr(self, name, getattr(self, name) + 1)
        self.counter.inc(event=name)


@dataclass
class _Origin:
    scheme: str
    host: str
    port: int
    host_header: str
    idle: collections.deque[tuple[iostream.IOStream, float]] = field(
        default_factory=collections.deque)


class _Collector(httputil.HTTPMessageDelegate):
    """Receives one answer from HTTP1Connection."""

    def __init__(self, max_body_bytes: int, truncate: bool = False) -> None:
        self.start_line: httputil.ResponseStartLine | None = None
        self.headers: httputil.HTTPHeaders | None = None
        self.chunks: list[bytes] = []
        self.size = 0
        self.max_body_bytes = max_body_bytes
        self.truncate = truncate
        self.truncated = False
        self.finished = False

    def headers_received(self, start_line: httputil.RequestStartLine | httputil.ResponseStartLine,
                         headers: httputil.HTTPHeaders) -> None:
        assert isinstance(start_line, httputil.ResponseStartLine)
        self.start_line, self.headers = start_line, headers

    def data_received(self, chunk: bytes) -> None:
        room = self.max_body_bytes - self.size
        self.size += len(chunk)
        if self.size > self.max_body_bytes:
            if self.truncate:  # keep what fits; HTTP1Connection stops reading on this error
                self.chunks.append(chunk[:room])
                self.truncated = True
            raise httputil.HTTPInputError(f"answer body larger than {self.max_body_bytes} bytes")
        self.chunks.append(chunk)

    def finish(self) -> None:
        self.finished = True

    def on_connection_close(self) -> None:
        pass


class KeepAliveClient:
    """`await fetch(method, url, ...)` → Response; `close()` drops every connection.

    `ssl_context` verifies https origins (default: the system's trust store, hostname checked);
    `idle_timeout_s` <= 0 turns keep-alive off (a connection per request, as tornado's client);
    `clock` (monotonic seconds) ages idle connections; `truncate_body` cuts answer bodies at
    `max_body_bytes` instead of failing them. Not thread-safe: one event loop.
    """

    def __init__(self, max_connections: int = 64, *, idle_timeout_s: float = 30.0,
                 max_body_bytes: int = 64 * 1024 * 1024, ssl_context: ssl.SSLContext | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 metrics: Registry | None = None, truncate_body: bool = False) -> None:
        if max_connections < 1:
            raise ValueError("max_connections must be >= 1")
        self._slots = asyncio.Semaphore(max_connections)
        self._idle_timeout_s = idle_timeout_s
        self._max_body_bytes = max_body_bytes
        self._truncate = truncate_body
        self._ssl_context = ssl_context
        self._clock = clock
        self._tcp = TCPClient()
        self._origins: dict[tuple[str, str, int], _Origin] = {}
        # Truncating, any Content-Length is read up to the limit (the collector stops there).
        self._params = HTTP1ConnectionParameters(
            no_keep_alive=False, max_header_size=MAX_HEADER_BYTES,
            max_body_size=1 << 62 if truncate_body else max_body_bytes, decompress=True)
        self._closed = False
        registry = metrics if metrics is not None else Registry()
        self.stats = PoolStats(counter=registry.counter(
            "wxd_upstream_connections_total",
            "Upstream HTTP connections: opened, reused for a request, and retried_stale "
            "(resent after a reused one closed unanswered).", ("event",)))

    def close(self) -> None:
        """Close idle connections; busy ones close when their request ends. Idempotent."""
        self._closed = True
        for origin in self._origins.values():
            while origin.idle:
                origin.idle.pop()[0].close()
        self._tcp.close()

    def idle_connections(self) -> int:
        return sum(len(origin.idle) for origin in self._origins.values())

    async def fetch(self, method: str, url: str, *, headers: Mapping[str, str] | None = None,
                    body: bytes | None = None, connect_timeout_s: float = 10.0,
                    request_timeout_s: float = 30.0, replay_safe: bool | None = None
                    ) -> Response:
        """One request. `request_timeout_s` bounds the whole call (slot wait, connect, answer);
        `connect_timeout_s` bounds opening a connection; `replay_safe` (None: GET/HEAD) allows
        the one resend after a stale reused connection."""
        if replay_safe is None:
            replay_safe = method in ("GET", "HEAD")
        if self._closed:
            raise FetchError("the HTTP client is closed")
        origin, target = self._origin(url)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + request_timeout_s
        await _acquire(self._slots, request_timeout_s)
        try:
            stream, reused = await self._checkout(origin, min(connect_timeout_s,
                                                              deadline - loop.time()))
            resent = False
            while True:  # at most twice: the resend goes on a new connection (reused False)
                try:
                    response = await self._exchange(stream, origin, method, target, headers,
                                                    body, deadline)
                except _Stale:
                    if not (reused and replay_safe):
                        raise FetchError("connection closed before an answer") from None
                else:
                    return replace(response, resent=True) if resent else response
                self.stats.count("retried_stale")
                resent = True
                stream, reused = await self._connect(origin, min(connect_timeout_s,
                                                                 deadline - loop.time()))
        finally:
            self._slots.release()

    def _origin(self, url: str) -> tuple[_Origin, str]:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise FetchError(f"not an http(s) URL: {parts.scheme}://{parts.hostname or ''}")
        default = 443 if parts.scheme == "https" else 80
        try:
            port = parts.port or default
        except ValueError:
            raise FetchError("invalid port in URL") from None
        key = (parts.scheme, parts.hostname, port)
        origin = self._origins.get(key)
        if origin is None:
            host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
            host_header = host if port == default else f"{host}:{port}"
            origin = self._origins[key] = _Origin(parts.scheme, parts.hostname, port, host_header)
        target = (parts.path or "/") + ("?" + parts.query if parts.query else "")
        return origin, target

    async def _checkout(self, origin: _Origin, timeout_s: float
                        ) -> tuple[iostream.IOStream, bool]:
        """The freshest live idle connection (True) or a new one (False)."""
        now = self._clock()
        while origin.idle:
            stream, since = origin.idle.pop()
            stream.set_close_callback(None)
            if stream.closed() or now - since > self._idle_timeout_s:
                stream.close()
                continue
            self.stats.count("reused")
            return stream, True
        return await self._connect(origin, timeout_s)

    async def _connect(self, origin: _Origin, timeout_s: float
                       ) -> tuple[iostream.IOStream, bool]:
        if timeout_s <= 0:
            raise FetchError("timed out before connecting", timed_out=True)
        ssl_options: ssl.SSLContext | None = None
        if origin.scheme == "https":
            ssl_options = self._ssl_context or ssl.create_default_context()
            self._ssl_context = ssl_options
        try:
            stream = await self._tcp.connect(origin.host, origin.port, ssl_options=ssl_options,
                                             timeout=timeout_s, max_buffer_size=self._max_body_bytes
                                             + MAX_HEADER_BYTES)
        except TimeoutError:
            raise FetchError("connect timed out", timed_out=True) from None
        except (OSError, iostream.StreamClosedError) as exc:
            raise FetchError(f"connect failed: {_describe(exc)}") from None
        stream.set_nodelay(True)
        self.stats.count("opened")
        return stream, False

    async def _exchange(self, stream: iostream.IOStream, origin: _Origin, method: str,
                        target: str, headers: Mapping[str, str] | None, body: bytes | None,
                        deadline: float) -> Response:
        """Write the request, read the answer, and park or close the connection. Raises _Stale
        when the connection died before any answer byte arrived."""
        loop = asyncio.get_running_loop()
        remaining = deadline - loop.time()
        if remaining <= 0:
            stream.close()
            raise FetchError("request timed out", timed_out=True)
        expired = False

        def expire() -> None:
            nonlocal expired
            expired = True
            stream.close()

        timer = loop.call_later(remaining, expire)
        collector = _Collector(self._max_body_bytes, self._truncate)
        connection = HTTP1Connection(stream, True, self._params)
        request_headers = httputil.HTTPHeaders({"Host": origin.host_header,
                                                "User-Agent": USER_AGENT,
                                                "Accept-Encoding": "gzip"})
        for name, value in (headers or {}).items():
            request_headers[name] = value
        if body is not None or method in ("POST", "PUT", "PATCH"):
            request_headers["Content-Length"] = str(len(body or b""))
        try:
            connection.write_headers(httputil.RequestStartLine(method, target, "HTTP/1.1"),
                                     request_headers, chunk=body or None)
            connection.finish()
            open_after = await connection.read_response(collector)
        except (iostream.StreamClosedError, OSError) as exc:
            stream.close()
            if expired:
                raise FetchError("request timed out", timed_out=True) from None
            if collector.start_line is None:
                raise _Stale from None
            raise FetchError(f"connection lost: {_describe(exc)}") from None
        except httputil.HTTPInputError as exc:
            stream.close()
            raise FetchError(f"malformed answer: {exc}") from None
        except httputil.HTTPOutputError as exc:  # pragma: no cover - our own framing
            stream.close()
            raise FetchError(f"cannot send: {exc}") from None
        except BaseException:
            stream.close()  # cancelled mid-exchange: the connection's state is unknown
            raise
        finally:
            timer.cancel()
        if collector.truncated and collector.start_line is not None and not expired:
            stream.close()  # the rest of the answer is never read
            assert collector.headers is not None
            return Response(collector.start_line.code, collector.start_line.reason,
                            collector.headers, b"".join(collector.chunks), truncated=True)
        if expired or not collector.finished or collector.start_line is None:
            # HTTP1Connection reports a malformed or oversized answer by returning, not raising.
            stream.close()
            if expired:
                raise FetchError("request timed out", timed_out=True)
            if collector.start_line is None:
                raise FetchError("malformed answer")
            raise FetchError(f"answer incomplete, malformed or over {self._max_body_bytes} bytes")
        assert collector.headers is not None
        self._park(stream, origin, open_after, collector.start_line, collector.headers)
        return Response(collector.start_line.code, collector.start_line.reason, collector.headers,
                        b"".join(collector.chunks))

    def _park(self, stream: iostream.IOStream, origin: _Origin, open_after: bool,
              start_line: httputil.ResponseStartLine, headers: httputil.HTTPHeaders) -> None:
        connection = headers.get("Connection", "").lower()
        keep = (open_after and not stream.closed() and not self._closed
                and self._idle_timeout_s > 0
                and (connection == "keep-alive" if start_line.version == "HTTP/1.0"
                     else connection != "close"))
        if not keep:
            stream.close()
            return
        entry = (stream, self._clock())
        origin.idle.append(entry)

        def dropped() -> None:  # the server closed it while idle
            if entry in origin.idle:
                origin.idle.remove(entry)

        # With a close callback and no read pending, tornado watches the socket for EOF.
        stream.set_close_callback(dropped)


class _Stale(Exception):
    """The connection closed before any answer byte: the request was not processed."""


async def _acquire(slots: asyncio.Semaphore, timeout_s: float) -> None:
    """slots.acquire() within `timeout_s`, else FetchError. Not asyncio.wait_for: before 3.12 it
    loses a cancellation that lands just as the slot is granted (the caller would carry on)."""
    if not slots.locked():
        await slots.acquire()  # free: returns without suspending
        return
    acquire = asyncio.ensure_future(slots.acquire())
    try:
        done, _ = await asyncio.wait({acquire}, timeout=timeout_s)
    except BaseException:
        _give_up(slots, acquire)
        raise
    if not done:
        _give_up(slots, acquire)
        raise FetchError("timed out waiting for a free connection", timed_out=True)


def _give_up(slots: asyncio.Semaphore, acquire: asyncio.Future[Any]) -> None:
    """Withdraw a pending acquire, or give back the slot it was granted."""
    if not acquire.done():
        acquire.cancel()  # Semaphore passes a slot granted meanwhile on to the next waiter
    elif not acquire.cancelled() and acquire.exception() is None:
        slots.release()


def _describe(exc: BaseException) -> str:
    if isinstance(exc, iostream.StreamClosedError) and exc.real_error is not None:
        exc = exc.real_error
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
