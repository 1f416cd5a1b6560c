"""Operational admin routes: /healthz (no auth) and /metrics (Prometheus text format)."""

from __future__ import annotations

from typing import Any

import tornado.web
from tornado.routing import URLSpec

from wxd.admin.base import JsonHandler
from wxd.metrics import Registry
from wxd.store.db import Database


class HealthHandler(JsonHandler):
    """`{"status": "ok"}`, or 503 `{"status": "unavailable"}` when the database does not answer."""

    auth_required = False
    route_name = "healthz"

    def initialize(self, db: Database, **kwargs: Any) -> None:  # type: ignore[override]
        super().initialize(**kwargs)
        self._db = db

    async def get(self) -> None:
        if await self._db.healthy():
            self.send_json({"status": "ok"})
        else:
            self.send_json({"status": "unavailable"}, status=503)


class MetricsHandler(JsonHandler):
    """Prometheus text exposition of the registry, after running its collectors."""

    route_name = "metrics"

    def initialize(self, registry: Registry, **kwargs: Any) -> None:  # type: ignore[override]
        super().initialize(**kwargs)
        self._registry = registry

    async def get(self) -> None:
        await self._registry.collect()
        self.set_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
        self.finish(self._registry.render())


def routes(common: dict[str, Any], db: Database, registry: Registry) -> list[URLSpec]:
    return [
        tornado.web.url(r"/healthz", HealthHandler, {**common, "db": db}),
        tornado.web.url(r"/metrics", MetricsHandler, {**common, "registry": registry}),
    ]
