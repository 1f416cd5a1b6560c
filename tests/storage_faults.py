"""Storage faults made with SQLite's own mechanisms on a running Database (no mount, no chmod:
tests run as root, which file modes do not stop).

- read_only: PRAGMA query_only on the daemon's connection. Every write fails with
  SQLITE_READONLY ("attempt to write a readonly database"), the code SQLite gives for a
  database file or filesystem made read-only under it.
- outside_writer: another connection (a backup or maintenance tool, a sqlite3 shell) holds the
  write lock; the daemon's busy timeout is shortened so its writes fail with SQLITE_BUSY
  ("database is locked") in milliseconds instead of 5 s.
- disk_full: PRAGMA max_page_count = the current size. A write that needs a new page (a large
  row, or enough small ones) fails with SQLITE_FULL ("database or disk is full"), as on a full
  filesystem; a small write that fits in a page with room left still succeeds.
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import AsyncIterator

from wxd.store.db import Database


async def _pragma(db: Database, sql: str) -> None:
    await db.read(lambda conn: conn.execute(sql).fetchall())


@contextlib.asynccontextmanager
async def read_only(db: Database) -> AsyncIterator[None]:
    await _pragma(db, "PRAGMA query_only = ON")
    try:
        yield
    finally:
        await _pragma(db, "PRAGMA query_only = OFF")


@contextlib.asynccontextmanager
async def outside_writer(db: Database, busy_timeout_ms: int = 20) -> AsyncIterator[None]:
    other = sqlite3.connect(db.path, isolation_level=None)
    await _pragma(db, f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
    other.execute("BEGIN IMMEDIATE")
    try:
        yield
    finally:
        other.execute("ROLLBACK")
        other.close()
        await _pragma(db, "PRAGMA busy_timeout = 5000")


@contextlib.asynccontextmanager
async def disk_full(db: Database) -> AsyncIterator[None]:
    def fill(conn: sqlite3.Connection) -> int:
        before = int(conn.execute("PRAGMA max_page_count").fetchone()[0])
        pages = int(conn.execute("PRAGMA page_count").fetchone()[0])
        conn.execute(f"PRAGMA max_page_count = {pages}").fetchall()
        return before

    before = await db.read(fill)
    try:
        yield
    finally:
        await _pragma(db, f"PRAGMA max_page_count = {before}")


FAULTS = {"read_only": read_only, "outside_writer": outside_writer}
