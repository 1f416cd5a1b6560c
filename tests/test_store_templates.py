"""wxd.store.templates: the cached template list and when it was fetched."""

from __future__ import annotations

import sqlite3

from wxd.store import meta, templates


def test_template_cache_rows_roundtrip(conn: sqlite3.Connection) -> None:
    assert templates.load(conn) == ({}, None)
    templates.save(conn, [("T1", "title", "{{a.DATA}}", ("a",))], 100.0)
    assert templates.load(conn) == (
        {"T1": {"title": "title", "content": "{{a.DATA}}", "keys": ("a",)}}, 100.0)
    templates.save(conn, [], 101.0)  # an OA with no templates is still "fetched"
    assert templates.load(conn) == ({}, 101.0)
    assert meta.get(conn, templates.FETCHED_AT_KEY) == "101.0"
