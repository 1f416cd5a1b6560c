"""pytest fixtures shared by the suite (plain pytest; tornado test cases need no plugin)."""

from __future__ import annotations

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
