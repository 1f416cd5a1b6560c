"""The OpenAPI document and the admin routes describe each other exactly (both directions)."""

from __future__ import annotations

import pathlib
import re
import tempfile

from tornado.testing import AsyncTestCase, gen_test

from tests.admin_routes import handlers
from tests.helpers import config_text
from wxd import config
from wxd.admin.openapi import DOCUMENT
from wxd.daemon import Daemon


class OpenAPITest(AsyncTestCase):
    @gen_test(timeout=20)
    async def test_every_route_is_described_and_every_description_routes(self) -> None:
        tmp = tempfile.TemporaryDirectory()
        self.addCleanup(tmp.cleanup)
        daemon = Daemon(config.load_text(config_text(str(pathlib.Path(tmp.name) / "x.db"))))
        await daemon.start()
        try:
            assert daemon.admin is not None
            routed: dict[str, set[str]] = {}
            for path, _, methods in handlers(daemon.admin.app):
                routed.setdefault(path, set()).update(methods)
            described = {re.sub(r"\{[^}]+\}", "{}", path): set(ops)
                         for path, ops in DOCUMENT["paths"].items()}
            assert routed == described
            for path, ops in DOCUMENT["paths"].items():
                for op in ops.values():
                    assert op["summary"] and op["responses"], path
        finally:
            await daemon.stop()
