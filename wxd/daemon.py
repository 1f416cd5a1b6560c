"""Composition root: builds every component from Config, starts them in order, stops in reverse.

Layer L5: the only module that knows every concrete class. Components get only their own values.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import time
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import tornado.httpserver
import tornado.ioloop
import tornado.netutil
import tornado.web

from wxd import admin
from wxd.admin import ops
from wxd.config import Config, Listen
from wxd.db import Database
from wxd.metrics import Registry
from wxd.sdnotify import Notifier

log = logging.getLogger(__name__)


class Component(Protocol):
    async def start(self) -> None: ...
    async def stop(self) -> None: ...


class Listener:
    """One HTTP server on one address; `port` is the bound port (useful with port 0)."""

    def __init__(self, name: str, app: tornado.web.Application, listen: Listen,
                 max_body_size: int) -> None:
        self.name = name
        self._app = app
        self._listen = listen
        self._max_body_size = max_body_size
        self._server: tornado.httpserver.HTTPServer | None = None
        self._sockets: list[socket.socket] = []
        self.port = listen.port

    async def start(self) -> None:
        self._sockets = tornado.netutil.bind_sockets(self._listen.port, self._listen.host)
        self.port = self._sockets[0].getsockname()[1]
        self._server = tornado.httpserver.HTTPServer(
            self._app, max_body_size=self._max_body_size, idle_connection_timeout=60,
            body_timeout=30,
        )
        self._server.add_sockets(self._sockets)
        log.info("%s listening on %s:%d", self.name, self._listen.host, self.port)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.stop()  # stop accepting; open connections finish below
            await asyncio.wait_for(self._server.close_all_connections(), timeout=5)
            self._server = None


class Daemon:
    """Every wxd component in one process. `await start()`, then `await stop()` (idempotent)."""

    def __init__(self, config: Config, *, clock: Callable[[], float] = time.time,
                 environ: Mapping[str, str] | None = None) -> None:
        self.config = config
        self.clock = clock
        self.metrics = Registry()
        self.notifier = Notifier(environ or {})
        self.db: Database | None = None
        self.admin: Listener | None = None
        self.webhook: Listener | None = None
        self._started: list[Component] = []
        self._watchdog: tornado.ioloop.PeriodicCallback | None = None
        self.state = "new"

    async def start(self) -> None:
        """db → upstream client → tokens → recovery → workers → admin listener → webhook listener."""
        if self.state != "new":
            return
        self.state = "starting"
        cfg = self.config
        try:
            self.db = await Database.open(cfg.wxd.database, metrics=self.metrics)
            common = admin.common_kwargs(cfg.admin.token, self.metrics)
            self.admin = Listener(
                "admin", admin.make_app(common, self._admin_routes(common)), cfg.admin.listen,
                cfg.admin.max_body_bytes,
            )
            await self._start(self.admin)
            self.webhook = Listener(
                "webhook", self._webhook_app(), cfg.webhook.listen,
                max(cfg.webhook.max_body_bytes * 4, 1 << 20),
            )
            await self._start(self.webhook)
        except BaseException:
            await self.stop()
            raise
        self.state = "running"
        self.notifier.notify("READY=1")
        if self.notifier.watchdog_interval_s:
            self._watchdog = tornado.ioloop.PeriodicCallback(
                lambda: self.notifier.notify("WATCHDOG=1"),
                self.notifier.watchdog_interval_s * 1000,  # PeriodicCallback takes milliseconds
            )
            self._watchdog.start()

    def _admin_routes(self, common: dict[str, Any]) -> list[list[admin.Route]]:
        assert self.db is not None
        return [ops.routes(common, self.db, self.metrics)]

    def _webhook_app(self) -> tornado.web.Application:
        return tornado.web.Application([])

    async def _start(self, component: Component) -> None:
        await component.start()
        self._started.append(component)

    async def stop(self) -> None:
        """Reverse order: listeners stop accepting, workers drain, the database closes last."""
        if self.state in ("stopped", "stopping"):
            return
        self.state = "stopping"
        self.notifier.notify("STOPPING=1")
        if self._watchdog is not None:
            self._watchdog.stop()
        try:
            for component in reversed(self._started):
                try:
                    await component.stop()
                except Exception:
                    log.exception("error while stopping %s", type(component).__name__)
            self._started.clear()
        finally:
            if self.db is not None:
                await self.db.close()
            self.state = "stopped"
            log.info("wxd stopped")


async def run(config: Config, environ: Mapping[str, str]) -> int:
    """`wxd run`: start, wait for SIGTERM/SIGINT, stop within [wxd] shutdown_timeout_s. Exit code."""
    stop_requested = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop_requested.set)
    daemon = Daemon(config, environ=environ)
    await daemon.start()
    log.info("wxd running (admin %s, webhook %s)", config.admin.listen, config.webhook.listen)
    await stop_requested.wait()
    log.info("stop requested; draining for at most %.1f s", config.wxd.shutdown_timeout_s)
    try:
        await asyncio.wait_for(daemon.stop(), timeout=config.wxd.shutdown_timeout_s + 5)
    except asyncio.TimeoutError:
        log.error("stop did not finish within the bound")
        return 1
    return 0
