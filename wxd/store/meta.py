"""The `meta` table: one TEXT value per key, for the other store modules.

Run inside Database.write/read; stdlib only. Callers own their keys and how values are encoded.
"""

from __future__ import annotations

import sqlite3


def get(conn: sqlite3.Connection, key: str) -> str | None:
    """The value stored under `key`, or None when there is none."""
    row = conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
    return str(row[0]) if row is not None else None


def set(conn: sqlite3.Connection, key: str, value: str) -> None:
    """Store `value` under `key`, replacing any previous value."""
    conn.execute(
        "INSERT INTO meta (key, value) VALUES (?, ?)"
        " ON CONFLICT (key) DO UPDATE SET value = excluded.value", (key, value),
    )


def delete(conn: sqlite3.Connection, key: str) -> None:
    """Forget `key` (a no-op when it is not stored)."""
    conn.execute("DELETE FROM meta WHERE key = ?", (key,))
