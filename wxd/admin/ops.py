"""Operational admin routes: /healthz (no auth) and /metrics (Prometheus text format)."""

from __future__ import annotations

import logging
from typing import Any

import tornado.web
from tornado.routing import URLSpec

from wxd.admin.base import JsonHandler
from wxd.errors import StorageError
from wxd.metrics import Registry
from wxd.store.db import Database

log = logging.getLogger(__name__)


class HealthHandler(JsonHandler):
    """`{"status": "ok"}`; 503 `{"status": "unavailable"}` when the database does not answer
    at all; 503 `{"status": "storage_unavailable", "error", "since"}` from a write failed by a
    storage fault (disk full, I/O, busy, read-only) until a write succeeds again."""

    auth_required = False
    route_name = "healthz"

    def initialize(self, db: Database, **kwargs: Any) -> None:  # type: ignore[override]
        super().initialize(**kwargs)
        self._db = db

    async def get(self) -> None:
        if not await self._db.healthy():
            self.send_json({"status": "unavailable"}, status=503)
            return
        error = self._db.write_error
        if error is not None:
            self.send_json({"status": "storage_unavailable", "error": error,
                            "since": self._db.write_failing_since}, status=503)
        else:
            self.send_json({"status": "ok"})


class MetricsHandler(JsonHandler):
    """Prometheus text exposition of the registry, after running its collectors."""

    route_name = "metrics"

    def initialize(self, registry: Registry, **kwargs: Any) -> None:  # type: ignore[override]
        super().initialize(**kwargs)
        self._registry = registry

    async def get(self) -> None:
        try:
            await self._registry.collect()
        except StorageError as exc:
            # Still answer: wxd_storage_up and the counters are what an alert needs now.
            log.warning("/metrics: a collector could not read the database: %s", exc)
        self.set_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
        self.finish(self._registry.render())


def routes(common: dict[str, Any], db: Database, registry: Registry) -> list[URLSpec]:
    return [
        tornado.web.url(r"/healthz", HealthHandler, {**common, "db": db}),
        tornado.web.url(r"/metrics", MetricsHandler, {**common, "registry": registry}),
    ]
