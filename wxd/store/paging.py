"""Keyset pagination shared by the store's lists: newest first by `seq`, an opaque cursor.

Run inside Database.read; imports only the standard library. Table and column names are the
callers' constants, never input; every value is a parameter.
"""

from __future__ import annotations

import base64
import binascii
import sqlite3
from collections.abc import Callable, Mapping
from typing import Any


def encode_cursor(seq: int) -> str:
    return base64.urlsafe_b64encode(f"s{seq}".encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> int:
    """The position an opaque list cursor stands for; ValueError when it is not one of ours."""
    try:
        text = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode("ascii")
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise ValueError("invalid cursor") from None
    # A position past SQLite's INTEGER range would raise OverflowError in the query.
    if not text.startswith("s") or not text[1:].isdigit() or len(text) > 20 \
            or int(text[1:]) >= 1 << 63:
        raise ValueError("invalid cursor")
    return int(text[1:])


def page(conn: sqlite3.Connection, table: str, equal: Mapping[str, Any], limit: int,
         cursor: str | None, row_json: Callable[[sqlite3.Row], dict[str, Any]]
         ) -> tuple[list[dict[str, Any]], str | None]:
    """Rows of `table` whose columns equal the non-None values of `equal`, newest first
    (`seq` descending), at most `limit`; returns (rows as row_json, next cursor or None).
    ValueError on a bad cursor."""
    where = [f"{column} = ?" for column, value in equal.items() if value is not None]
    params: list[Any] = [value for value in equal.values() if value is not None]
    if cursor is not None:
        where.append("seq < ?")
        params.append(decode_cursor(cursor))
    sql = f"SELECT * FROM {table}"  # noqa: S608 - a constant of the caller, values are parameters
    if where:
        sql += " WHERE " + " AND ".join(where)
    rows = conn.execute(sql + " ORDER BY seq DESC LIMIT ?", (*params, limit + 1)).fetchall()
    more = len(rows) > limit
    rows = rows[:limit]
    return [row_json(r) for r in rows], (encode_cursor(rows[-1]["seq"]) if more else None)
