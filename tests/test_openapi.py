"""The OpenAPI document and the admin routes describe each other exactly (both directions)."""

from __future__ import annotations

import pathlib
import re
import tempfile

from tornado.routing import URLSpec
from tornado.testing import AsyncTestCase, gen_test

from tests.helpers import config_text
from wxd import config
from wxd.admin.openapi import DOCUMENT
from wxd.daemon import Daemon

METHODS = ("get", "post", "put", "patch", "delete")


def templates(spec: URLSpec) -> list[str]:
    """The route's paths with each capture group as {}; a group of literal alternatives such as
    (retry|cancel) expands into one path per alternative."""
    paths = [spec.regex.pattern.rstrip("$")]
    while any("(" in path for path in paths):
        expanded = []
        for path in paths:
            match = re.search(r"\(([^)]*)\)", path)
            if match is None:
                expanded.append(path)
                continue
            group = match.group(1)
            options = group.split("|") if re.fullmatch(r"[a-z_]+(\|[a-z_]+)+", group) else ["{}"]
            expanded.extend(path[:match.start()] + option + path[match.end():] for option in options)
        paths = expanded
    return [path.replace("\\", "") for path in paths]


class OpenAPITest(AsyncTestCase):
    @gen_test(timeout=20)
    async def test_every_route_is_described_and_every_description_routes(self) -> None:
        tmp = tempfile.TemporaryDirectory()
        self.addCleanup(tmp.cleanup)
        daemon = Daemon(config.load_text(config_text(str(pathlib.Path(tmp.name) / "x.db"))))
        await daemon.start()
        try:
            assert daemon.admin is not None
            app = daemon.admin.app
            rules = [rule for rule in app.wildcard_router.rules if isinstance(rule, URLSpec)]
            routed: dict[str, set[str]] = {}
            for rule in rules:
                handler = rule.target
                methods = {m for m in METHODS
                           if getattr(handler, m) is not getattr(handler.__mro__[-2], m, None)
                           and m in vars_of(handler)}
                for path in templates(rule):
                    routed.setdefault(path, set()).update(methods)
            described = {re.sub(r"\{[^}]+\}", "{}", path): set(ops)
                         for path, ops in DOCUMENT["paths"].items()}
            assert routed == described
            for path, ops in DOCUMENT["paths"].items():
                for op in ops.values():
                    assert op["summary"] and op["responses"], path
        finally:
            await daemon.stop()


def vars_of(cls: type) -> set[str]:
    """Method names defined by the handler class or its wxd base classes (not RequestHandler)."""
    names: set[str] = set()
    for klass in cls.__mro__:
        if klass.__module__.startswith("wxd."):
            names.update(vars(klass))
    return names
