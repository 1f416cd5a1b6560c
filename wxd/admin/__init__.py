"""The local admin API (JSON over HTTP, bearer token).

Each feature module exposes `routes(common, ...) -> list[URLSpec]`; the composition root
(daemon.py) decides which groups exist and passes them to `make_app`.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import tornado.web
from tornado.routing import URLSpec

from wxd.admin.base import KeyCheck, NotFoundHandler
from wxd.metrics import Registry

Route = URLSpec


def common_kwargs(admin_token: str, metrics: Registry | None,
                  max_body_bytes: int | None = None, keys: KeyCheck | None = None
                  ) -> dict[str, Any]:
    """The initialize() kwargs every admin handler takes (without a Registry, a private one);
    `keys` checks scoped API keys."""
    return {"admin_token": admin_token,
            "metrics": metrics if metrics is not None else Registry(),
            "max_body_bytes": max_body_bytes, "keys": keys}


def make_app(common: dict[str, Any], groups: Iterable[list[Route]]) -> tornado.web.Application:
    """A tornado Application serving every route group; unknown paths answer 404 JSON."""
    routes: list[Route] = [route for group in groups for route in group]
    return tornado.web.Application(
        routes,
        default_handler_class=NotFoundHandler,
        default_handler_args=common,
        compress_response=False,
        xheaders=False,
    )
