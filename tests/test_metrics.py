"""Registry: a series shared by several modules is one metric, declared alike everywhere."""

from __future__ import annotations

import pytest

from wxd.events import EventRouter
from wxd.metrics import Registry
from wxd.push_workers import PushWorkers
from wxd.pushes import PushService


def test_shared_series_are_one_metric_declared_alike() -> None:
    registry = Registry()
    none: object = None
    PushWorkers(none, none, metrics=registry)  # type: ignore[arg-type]
    EventRouter(none, none, metrics=registry)  # type: ignore[arg-type]
    PushService(none, none, mp_appid=None, metrics=registry)  # type: ignore[arg-type]
    counter = registry.counter("wxd_pushes_total", "", ("status",))  # "" = look it up
    assert counter is registry.counter(
        "wxd_pushes_total", "Push status transitions by new status.", ("status",))
    assert registry.render().count("# HELP wxd_pushes_total") == 1


def test_an_incompatible_declaration_is_refused() -> None:
    registry = Registry()
    registry.counter("wxd_x_total", "Things.", ("kind",))
    with pytest.raises(ValueError, match="labels"):
        registry.counter("wxd_x_total", "Things.", ("other",))
    with pytest.raises(ValueError, match="help"):
        registry.counter("wxd_x_total", "Other things.", ("kind",))
    with pytest.raises(ValueError, match="registered as counter"):
        registry.gauge("wxd_x_total", "Things.", ("kind",))
