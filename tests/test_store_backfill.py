"""wxd.store.backfill: the run's counters across pages, restarts from the head and the finish."""

from __future__ import annotations

import pathlib
import sqlite3

from tests.helpers import SyncStore
from wxd.store import backfill
from wxd.store.db import migrate
from wxd.store.schema import MIGRATIONS


def test_counters_across_a_restart_from_the_head(store: SyncStore) -> None:
    row = store.write(lambda c: backfill.begin_run(c, 100))
    assert (row.state, row.run, row.seen, row.restarts_from_head) == ("running", 1, 0, 0)
    row = store.write(lambda c: backfill.advance(c, 1, None, "o1", 10_000, 101, 25_000, 110,
                                                 skipped=2))
    assert (row.cursor, row.cursor_at, row.seen, row.skipped) == ("o1", 110, 10_000, 2)
    row = store.write(lambda c: backfill.restart_from_head(c, 1, 3, 25_010, 120))
    assert (row.cursor, row.cursor_at, row.pages_done, row.followers_done, row.skipped) == (
        None, None, 0, 0, 0)
    assert (row.seen, row.calls, row.restarts_from_head, row.total) == (10_000, 104, 1, 25_010)
    assert (row.run, row.started_at) == (1, 100)
    row = store.write(lambda c: backfill.advance(c, 1, "", "o2", 10_000, 100, None, 130, seen=4))
    assert (row.pages_done, row.followers_done, row.seen) == (1, 10_000, 10_004)
    row = store.write(lambda c: backfill.finish(c, 1, 1, None, 140, complete=False))
    assert (row.state, row.complete, row.cursor_at) == ("done", False, None)
    assert store.read(backfill.load) == row
    document = backfill.status_document(row, 150, active=False, rate_per_s=0)
    assert (document["seen"], document["skipped"], document["restarts_from_head"],
            document["complete"]) == (10_004, 0, 1, False)
    assert "cursor" not in document


def test_from_start_replaces_a_halted_run(store: SyncStore) -> None:
    store.write(lambda c: backfill.begin_run(c, 100))
    store.write(lambda c: backfill.advance(c, 1, None, "o1", 10, 2, 30, 110))
    store.write(lambda c: backfill.halt(c, 1, "failed", 1, 120, last_error="x"))
    assert store.write(lambda c: backfill.begin_run(c, 130)).cursor == "o1"  # resumed
    store.write(lambda c: backfill.halt(c, 1, "failed", 0, 140, last_error="x"))
    row = store.write(lambda c: backfill.begin_run(c, 150, from_start=True))
    assert (row.run, row.cursor, row.seen, row.followers_done, row.started_at) == (
        2, None, 0, 0, 150)


def test_migration_keeps_a_run_in_progress(tmp_path: pathlib.Path) -> None:
    conn = sqlite3.connect(tmp_path / "v1.db", isolation_level=None)
    migrate(conn, MIGRATIONS[:1])
    conn.execute("INSERT INTO backfill (id, state, run, cursor, pages_done, followers_done,"
                 " calls, updated_at) VALUES (1, 'paused', 3, 'o9', 2, 20000, 203, 55.0)")
    migrate(conn)
    state = backfill.load(conn)
    assert (state.run, state.cursor, state.seen, state.cursor_at) == (3, "o9", 20_000, 55.0)
    assert (state.skipped, state.restarts_from_head, state.complete) == (0, 0, None)
    conn.close()

