"""pytest fixtures shared by the suite (plain pytest; tornado test cases need no plugin)."""

from __future__ import annotations

import os
import pathlib
import sqlite3
from collections.abc import Iterator

import pytest

from tests.helpers import SyncStore, config_text
from wxd.store.db import migrate


@pytest.fixture
def config_file(tmp_path: pathlib.Path) -> pathlib.Path:
    """A valid config file whose database lives in tmp_path."""
    path = tmp_path / "wxd.conf"
    path.write_text(config_text(str(tmp_path / "wxd.db")))
    return path


@pytest.fixture
def conn(tmp_path: pathlib.Path) -> Iterator[sqlite3.Connection]:
    """A migrated file database on a plain sqlite3 connection (autocommit, sqlite3.Row rows),
    for the store functions that run inside Database.write/read."""
    connection = sqlite3.connect(tmp_path / "store.db", isolation_level=None)
    connection.row_factory = sqlite3.Row
    migrate(connection)
    yield connection
    connection.close()


@pytest.fixture
def store(tmp_path: pathlib.Path) -> Iterator[SyncStore]:
    """A file database (Database.open) driven synchronously: the store contract suites."""
    s = SyncStore(str(tmp_path / "wxd.db"))
    try:
        yield s
    finally:
        s.close()


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
