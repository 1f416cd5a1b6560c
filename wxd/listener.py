"""One HTTP listener of the daemon: binds its address or takes a socket systemd passed, and stops
without dropping a request it has begun.

Top level beside daemon.py (it holds tornado's HTTPServer); imports wxd.config only.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from typing import Any

import tornado.httpserver
import tornado.netutil
import tornado.web
from tornado import httputil, iostream

from wxd.config import Listen

log = logging.getLogger(__name__)


class _Watched(httputil.HTTPMessageDelegate):
    """A request's delegate that tells the server when its headers arrive."""

    def __init__(self, inner: httputil.HTTPMessageDelegate, server: DrainingServer,
                 conn: object) -> None:
        self._inner = inner
        self._server = server
        self._conn = conn

    def headers_received(self, start_line: httputil.RequestStartLine | httputil.ResponseStartLine,
                         headers: httputil.HTTPHeaders) -> Any:
        self._server.set_state(self._conn, "busy")
        return self._inner.headers_received(start_line, headers)

    def data_received(self, chunk: bytes) -> Any:
        return self._inner.data_received(chunk)

    def finish(self) -> None:
        self._inner.finish()

    def on_connection_close(self) -> None:
        self._inner.on_connection_close()


class DrainingServer(tornado.httpserver.HTTPServer):
    """HTTPServer that knows which connections are in a request, so that drain() can let every
    begun request be answered and close each connection only between requests.

    A connection is "fresh" (accepted, no request yet), "busy" (headers received, response not
    finished) or "idle" (kept alive between requests). Tornado starts the next request of a
    connection only once the previous response is finished: that is where busy ends.
    """

    def initialize(self, *args: Any, **kwargs: Any) -> None:
        super().initialize(*args, **kwargs)
        self._states: dict[object, str] = {}
        self._draining = False
        self._changed = asyncio.Event()

    def set_state(self, conn: object, state: str) -> None:
        self._states[conn] = state
        self._changed.set()

    def start_request(self, server_conn: object, request_conn: httputil.HTTPConnection
                      ) -> httputil.HTTPMessageDelegate:
        served = server_conn in self._states  # else its first request is yet to come
        self.set_state(server_conn, "idle" if served else "fresh")
        delegate = super().start_request(server_conn, request_conn)
        if self._draining and served:
            _close(server_conn)  # its last response is out; no further request on it
        return _Watched(delegate, self, server_conn)

    def on_close(self, server_conn: object) -> None:
        self._states.pop(server_conn, None)
        self._changed.set()
        super().on_close(server_conn)

    async def drain(self, timeout_s: float) -> int:
        """After stop(): close idle connections now; let busy ones finish their response and
        fresh ones (accepted before the stop) send their request and have it answered, all
        within timeout_s. Returns how many connections were still open at the deadline (then
        closed by close_all_connections).

        A fresh connection is waited for, not closed: it holds a request the client has sent
        or is sending (closing it with data unread would even answer with a reset), and no
        other process can answer it. Only one that stays silent costs the whole bound.
        """
        self._draining = True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while True:
            for conn, state in list(self._states.items()):
                if state == "idle":
                    _close(conn)
            # A connection accepted a moment ago may not have reached start_request yet: it is
            # in tornado's own set (HTTPServer._connections) only, and as fresh as it gets.
            waiting = [conn for conn in self._connections
                       if self._states.get(conn, "fresh") != "idle"]
            now = loop.time()
            if not waiting or now >= deadline:
                return len(waiting)
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), timeout=deadline - now)
            except asyncio.TimeoutError:
                pass


def _close(server_conn: object) -> None:
    stream = getattr(server_conn, "stream", None)
    if isinstance(stream, iostream.IOStream):
        stream.close()


class Listener:
    """One HTTP server on one address; `port` is the bound port (useful with port 0).

    With `sock` (a listening socket passed by systemd, see wxd.sdlisten) nothing is bound: the
    socket belongs to the service manager, which keeps it, and the connections queued in its
    backlog, open while the daemon restarts. stop() stops accepting (closing only this
    process's copy of the socket), answers every request already begun (drain_timeout_s at
    most), then closes the connections.
    """

    def __init__(self, name: str, app: tornado.web.Application, listen: Listen,
                 max_body_size: int, sock: socket.socket | None = None,
                 drain_timeout_s: float = 5.0) -> None:
        self.name = name
        self._app = app
        self._listen = listen
        self._max_body_size = max_body_size
        self._passed = sock
        self._drain_timeout_s = drain_timeout_s
        self._server: DrainingServer | None = None
        self._sockets: list[socket.socket] = []
        self.port = listen.port

    @property
    def app(self) -> tornado.web.Application:
        """The application this listener serves."""
        return self._app

    @property
    def activated(self) -> bool:
        """True when the socket was passed by the service manager (socket activation)."""
        return self._passed is not None

    async def start(self) -> None:
        if self._server is not None:
            return
        if self._passed is not None:
            self._sockets = [self._passed]
        else:
            self._sockets = tornado.netutil.bind_sockets(self._listen.port, self._listen.host)
        self.port = self._sockets[0].getsockname()[1]
        self._server = DrainingServer(
            self._app, max_body_size=self._max_body_size, idle_connection_timeout=60,
            body_timeout=30,
        )
        self._server.add_sockets(self._sockets)
        if self._passed is not None:
            log.info("%s listening on %s (socket passed by the service manager)", self.name,
                     _address(self._passed))
        else:
            log.info("%s listening on %s:%d", self.name, self._listen.host, self.port)

    async def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.stop()  # stop accepting; a passed socket stays open in the service manager
        still_open = await server.drain(self._drain_timeout_s)
        if still_open:
            log.warning("%s: %d connection(s) still open after %.1f s; closing them",
                        self.name, still_open, self._drain_timeout_s)
        await asyncio.wait_for(server.close_all_connections(), timeout=5)


def _address(sock: socket.socket) -> str:
    try:
        host, port = sock.getsockname()[:2]
    except (OSError, ValueError):
        return "?"
    return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
