"""The cached list of the OA's message templates and when it was fetched.

Run inside Database.write/read; imports wxd.store.meta only.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Sequence
from typing import Any

from wxd.store import meta

FETCHED_AT_KEY = "pushes.templates_fetched_at"  # meta: when the template list was fetched


def save(conn: sqlite3.Connection, templates: Sequence[tuple[str, str, str, Sequence[str]]],
         now: float) -> None:
    """Replace the cached list with (template_id, title, content, keys) items fetched at `now`.

    An empty list is stored as fetched too (an OA with no templates).
    """
    conn.execute("DELETE FROM templates")
    conn.executemany(
        "INSERT INTO templates (template_id, title, content, keys, fetched_at)"
        " VALUES (?, ?, ?, ?, ?)",
        [(tid, title, content, json.dumps(list(keys)), now)
         for tid, title, content, keys in templates],
    )
    meta.set(conn, FETCHED_AT_KEY, repr(now))


def load(conn: sqlite3.Connection) -> tuple[dict[str, dict[str, Any]], float | None]:
    """The cached templates by id ({"title", "content", "keys"}) and when they were fetched
    (None when the list was never fetched)."""
    rows = conn.execute("SELECT * FROM templates").fetchall()
    cached = {
        r["template_id"]: {"title": r["title"], "content": r["content"],
                           "keys": tuple(json.loads(r["keys"]))}
        for r in rows
    }
    fetched_at = meta.get(conn, FETCHED_AT_KEY)
    return cached, (float(fetched_at) if fetched_at is not None else None)
