"""wxd.store.tokens: the stored token per app and the fetch count per app and UTC day."""

from __future__ import annotations

import sqlite3

import pytest

from wxd.errors import TokenBudgetError
from wxd.store import tokens

DAY = 1_700_000_000.0  # 2023-11-14 22:13:20 UTC


def test_budget_day_is_the_utc_date() -> None:
    assert tokens.utc_day(DAY) == "2023-11-14"
    midnight = 1_700_006_400.0  # 2023-11-15 00:00:00 UTC
    assert (tokens.utc_day(midnight - 1), tokens.utc_day(midnight)) == ("2023-11-14", "2023-11-15")


def test_save_and_load(conn: sqlite3.Connection) -> None:
    assert tokens.load(conn, "oa") is None
    tokens.save(conn, "oa", "wxA", "TOKEN-1", 7300.0, 100.0)
    tokens.save(conn, "oa", "wxA", "TOKEN-2", 7400.0, 200.0)  # replaces
    tokens.save(conn, "mp", "wxB", "TOKEN-3", 7500.0, 300.0)
    stored = tokens.load(conn, "oa")
    assert stored == tokens.StoredToken("wxA", "TOKEN-2", 7400.0, 200.0)
    assert "TOKEN-2" not in repr(stored)
    assert tokens.load(conn, "mp") == tokens.StoredToken("wxB", "TOKEN-3", 7500.0, 300.0)


def test_count_fetch_stops_at_the_budget(conn: sqlite3.Connection) -> None:
    assert [tokens.count_fetch(conn, "oa", "2023-11-14", 2) for _ in range(2)] == [1, 2]
    with pytest.raises(TokenBudgetError, match="daily budget of 2"):
        tokens.count_fetch(conn, "oa", "2023-11-14", 2)
    assert tokens.count_fetch(conn, "mp", "2023-11-14", 2) == 1
    assert tokens.count_fetch(conn, "oa", "2023-11-15", 2) == 1
    assert tokens.fetch_counts(conn, "2023-11-14") == {"oa": 2, "mp": 1}
    assert tokens.fetch_counts(conn, "2023-11-13") == {}
