"""The admin API's scoped keys: name, hash of the key, scopes, created and last used.

Run inside Database.write/read; imports nothing from wxd. Only a hash of a key is ever stored;
what a key may do and how it is checked is wxd.apikeys' business.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class StoredKey:
    """One key's row; times are unix seconds, `last_used_at` None for a key never used."""

    name: str
    key_hash: str = field(repr=False)  # hex SHA-256 of the key's text
    scopes: tuple[str, ...]
    created_at: float
    last_used_at: float | None = None


def _row(row: Any) -> StoredKey:
    scopes = json.loads(str(row[2]))
    return StoredKey(str(row[0]), str(row[1]), tuple(str(s) for s in scopes), float(row[3]),
                     None if row[4] is None else float(row[4]))


def load_all(conn: sqlite3.Connection) -> list[StoredKey]:
    """Every key, by name."""
    rows = conn.execute("SELECT name, key_hash, scopes, created_at, last_used_at FROM api_keys "
                        "ORDER BY name").fetchall()
    return [_row(row) for row in rows]


def insert(conn: sqlite3.Connection, key: StoredKey) -> bool:
    """Store a new key; False (nothing stored) when a key of that name exists."""
    cursor = conn.execute(
        "INSERT INTO api_keys (name, key_hash, scopes, created_at, last_used_at) "
        "VALUES (?, ?, ?, ?, NULL) ON CONFLICT (name) DO NOTHING",
        (key.name, key.key_hash, json.dumps(list(key.scopes)), key.created_at))
    return cursor.rowcount == 1


def delete(conn: sqlite3.Connection, name: str) -> bool:
    """Remove the key `name`; False when there is none."""
    return conn.execute("DELETE FROM api_keys WHERE name = ?", (name,)).rowcount == 1


def touch(conn: sqlite3.Connection, used: Mapping[str, float]) -> None:
    """Record last-use times (name → unix seconds); a time never moves back, a gone key is
    skipped."""
    conn.executemany(
        "UPDATE api_keys SET last_used_at = ? WHERE name = ? "
        "AND (last_used_at IS NULL OR last_used_at < ?)",
        [(at, name, at) for name, at in used.items()])
