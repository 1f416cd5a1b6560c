"""`GET /v1/stats`: counts across the daemon (followers, links, MP users, pushes, tokens, backfill).

The composition root passes one async provider that gathers the figures from each
component, so this handler knows no component.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import tornado.web
from tornado.routing import URLSpec

from wxd.admin.base import JsonHandler

StatsProvider = Callable[[], Awaitable[dict[str, Any]]]


class StatsHandler(JsonHandler):
    """Counts: followers, subscribed, linked, MP users, pushes by status, token fetches today."""

    route_name = "stats"

    def initialize(self, provider: StatsProvider, **kwargs: Any) -> None:  # type: ignore[override]
        super().initialize(**kwargs)
        self._provider = provider

    async def get(self) -> None:
        self.send_json(await self._provider())


def routes(common: dict[str, Any], provider: StatsProvider) -> list[URLSpec]:
    return [tornado.web.url(r"/v1/stats", StatsHandler, {**common, "provider": provider})]
