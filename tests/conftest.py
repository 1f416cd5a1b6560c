"""pytest fixtures shared by the suite (plain pytest; tornado test cases need no plugin)."""

from __future__ import annotations

import os
import pathlib

import pytest

from tests.helpers import config_text


@pytest.fixture
def config_file(tmp_path: pathlib.Path) -> pathlib.Path:
    """A valid config file whose database lives in tmp_path."""
    path = tmp_path / "wxd.conf"
    path.write_text(config_text(str(tmp_path / "wxd.db")))
    return path


# The `sandbox` fixture (a SandboxThread on a free loopback port) for every test module.
from tests.sandbox_fixture import sandbox  # noqa: E402, F401


def slow_selected(config: pytest.Config) -> bool:
    """Slow (full-form proof) tests run only with `-m slow` or WXD_SLOW_TESTS=1."""
    markexpr = config.getoption("-m") or ""
    return os.environ.get("WXD_SLOW_TESTS") == "1" or (
        "slow" in markexpr and "not slow" not in markexpr)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if slow_selected(config):
        return
    skip = pytest.mark.skip(reason="full-form proof test: select with -m slow or WXD_SLOW_TESTS=1")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
