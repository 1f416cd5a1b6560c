"""wxd.store.meta: one TEXT value per key."""

from __future__ import annotations

import sqlite3

from wxd.store import meta


def test_get_set_delete(conn: sqlite3.Connection) -> None:
    assert meta.get(conn, "a") is None
    meta.set(conn, "a", "1")
    meta.set(conn, "b", "2")
    meta.set(conn, "a", "3")  # replaces
    assert (meta.get(conn, "a"), meta.get(conn, "b")) == ("3", "2")
    meta.delete(conn, "a")
    meta.delete(conn, "missing")  # a no-op
    assert (meta.get(conn, "a"), meta.get(conn, "b")) == (None, "2")
