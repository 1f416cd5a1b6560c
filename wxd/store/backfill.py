"""The follower backfill's persisted state: the single `backfill` row (state, run, cursor, counters).

Run inside Database.write/read; imports wxd.errors and wxd.store.meta only. When to page is
wxd.backfill's business.
"""

from __future__ import annotations

import sqlite3
from dataclasses import asdict, dataclass, replace
from typing import Any

from wxd.errors import StorageError
from wxd.store import meta

STATES = ("idle", "running", "paused", "failed", "done")
PAUSE_KEY = "backfill.pause"  # why a paused run waits (a meta.Paused)

_COLUMNS = (
    "state", "run", "cursor", "pages_done", "followers_done", "total", "calls", "started_at",
    "updated_at", "finished_at", "paused_until", "last_error", "seen", "skipped",
    "restarts_from_head", "cursor_at", "complete",
)
_SELECT = (
    "SELECT state, run, cursor, pages_done, followers_done, total, calls, started_at,"
    " updated_at, finished_at, paused_until, last_error, seen, skipped, restarts_from_head,"
    " cursor_at, complete FROM backfill WHERE id = 1"
)
_UPSERT = (
    "INSERT INTO backfill (id, state, run, cursor, pages_done, followers_done, total, calls,"
    " started_at, updated_at, finished_at, paused_until, last_error, seen, skipped,"
    " restarts_from_head, cursor_at, complete)"
    " VALUES (1, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (id) DO UPDATE SET"
    " state = excluded.state, run = excluded.run, cursor = excluded.cursor,"
    " pages_done = excluded.pages_done, followers_done = excluded.followers_done,"
    " total = excluded.total, calls = excluded.calls, started_at = excluded.started_at,"
    " updated_at = excluded.updated_at, finished_at = excluded.finished_at,"
    " paused_until = excluded.paused_until, last_error = excluded.last_error,"
    " seen = excluded.seen, skipped = excluded.skipped,"
    " restarts_from_head = excluded.restarts_from_head, cursor_at = excluded.cursor_at,"
    " complete = excluded.complete"
)


class CursorConflict(StorageError):
    """The row no longer holds the run/cursor the caller expected; nothing was changed.

    Raised inside a write function so the whole savepoint (the page's follower rows included)
    rolls back: a page is counted once or not at all.
    """


@dataclass(frozen=True)
class BackfillState:
    """One snapshot of the `backfill` row. Times are unix seconds.

    `cursor` is the next_openid of the last fully stored page ("" or None: start of the list),
    saved at `cursor_at`. `run` numbers complete passes over the follower list; a resumed run
    keeps its number, so followers stored before a crash still count as seen by that run.
    `pages_done`, `followers_done` (openids of the stored pages, skipped ones included) and
    `skipped` (of these, the openids batchget refused, not stored) describe the current pass
    over the list: a restart from the head (a stale cursor, see wxd.backfill) zeroes them and
    counts one more in `restarts_from_head`. `seen` (distinct openids the run listed, across its
    restarts) and `calls` count the whole run. `complete` (set when the run is done): whether
    the listing was complete (seen ≈ total), i.e. whether unseen followers were marked
    unsubscribed.
    """

    state: str = "idle"
    run: int = 0
    cursor: str | None = None
    pages_done: int = 0
    followers_done: int = 0
    total: int | None = None
    calls: int = 0
    started_at: float | None = None
    updated_at: float | None = None
    finished_at: float | None = None
    paused_until: float | None = None
    last_error: str | None = None
    seen: int = 0
    skipped: int = 0
    restarts_from_head: int = 0
    cursor_at: float | None = None
    complete: bool | None = None

    def to_json(self) -> dict[str, Any]:
        """The row as a JSON-able dict (the cursor is an openid; it is shown, it is no secret)."""
        return asdict(self)


def load(conn: sqlite3.Connection) -> BackfillState:
    """The current row, or the idle default when no backfill ever ran."""
    row = conn.execute(_SELECT).fetchone()
    if row is None:
        return BackfillState()
    state = BackfillState(*tuple(row))
    return state if state.complete is None else replace(state, complete=bool(state.complete))


def _save(conn: sqlite3.Connection, state: BackfillState) -> BackfillState:
    conn.execute(_UPSERT, tuple(getattr(state, name) for name in _COLUMNS))
    return state


def begin_run(conn: sqlite3.Connection, now: float, *, from_start: bool = False) -> BackfillState:
    """Mark the backfill running and return the row.

    A run left running (crash), paused or failed is resumed from its cursor with its counters;
    otherwise (idle, done), or with `from_start` (the operator's restart from the head: the
    saved cursor is not trusted), a new run starts at the head of the list with zeroed counters.
    """
    current = load(conn)
    if current.run > 0 and current.state in ("running", "paused", "failed") and not from_start:
        state = replace(current, state="running", updated_at=now, paused_until=None,
                        last_error=None)
    else:
        state = BackfillState(state="running", run=current.run + 1, started_at=now,
                              updated_at=now)
    return _save(conn, state)


def _current(conn: sqlite3.Connection, run: int) -> BackfillState:
    state = load(conn)
    if state.run != run:
        raise CursorConflict(f"backfill run {run} is no longer current (row has run {state.run})")
    return state


def advance(conn: sqlite3.Connection, run: int, expected_cursor: str | None, cursor: str,
            followers: int, calls: int, total: int | None, now: float, *,
            seen: int | None = None, skipped: int = 0) -> BackfillState:
    """Count one fully stored page: move the cursor from `expected_cursor` to `cursor`, add
    `followers` (the page's openids), `seen` (those the run had not listed before; default
    all of them), `skipped` and `calls`. Run it in the SAME write as the page's last follower
    batch.

    Raises CursorConflict (rolling back the caller's savepoint) when the row is on another run
    or another cursor, so a page can never be counted twice.
    """
    state = _current(conn, run)
    if (state.cursor or "") != (expected_cursor or "") or state.state != "running":
        raise CursorConflict(
            f"backfill cursor moved (expected {expected_cursor!r}, row has {state.cursor!r}, "
            f"state {state.state})"
        )
    return _save(conn, replace(
        state, cursor=cursor, cursor_at=now, pages_done=state.pages_done + 1,
        followers_done=state.followers_done + followers,
        seen=state.seen + (followers if seen is None else seen),
        skipped=state.skipped + skipped, calls=state.calls + calls,
        total=total if total is not None else state.total, updated_at=now,
    ))


def restart_from_head(conn: sqlite3.Connection, run: int, calls: int, total: int | None,
                      now: float) -> BackfillState:
    """The saved cursor went stale: page run `run` again from the head of the list. The pass
    counters (cursor, pages_done, followers_done, skipped) start over; seen, calls (plus
    `calls`), started_at and the run number are kept, and restarts_from_head counts one more."""
    state = _current(conn, run)
    return _save(conn, replace(
        state, cursor=None, cursor_at=None, pages_done=0, followers_done=0, skipped=0,
        restarts_from_head=state.restarts_from_head + 1, calls=state.calls + calls,
        total=total if total is not None else state.total, updated_at=now,
    ))


def finish(conn: sqlite3.Connection, run: int, calls: int, total: int | None,
           now: float, *, complete: bool = True) -> BackfillState:
    """The run paged to the end of the list: state done, cursor cleared for the next run;
    `complete` says whether its listing was complete (see BackfillState)."""
    state = _current(conn, run)
    return _save(conn, replace(
        state, state="done", cursor=None, cursor_at=None, calls=state.calls + calls,
        total=total if total is not None else state.total, updated_at=now, finished_at=now,
        paused_until=None, last_error=None, complete=complete,
    ))


def halt(conn: sqlite3.Connection, run: int, state_name: str, calls: int, now: float, *,
         last_error: str | None = None, paused_until: float | None = None) -> BackfillState:
    """Leave the run in `state_name` ("running" on a clean stop, "paused" or "failed"), keeping
    its cursor and counters and adding the `calls` made since the last page."""
    if state_name not in STATES:
        raise ValueError(f"unknown backfill state {state_name!r}")
    state = _current(conn, run)
    return _save(conn, replace(
        state, state=state_name, calls=state.calls + calls, updated_at=now,
        last_error=last_error, paused_until=paused_until,
    ))


def status_document(state: BackfillState, now: float, *, active: bool, rate_per_s: float,
                    unsaved_calls: int = 0, page_progress: int = 0) -> dict[str, Any]:
    """The row as the progress document of GET /v1/backfill (JSON-able; times unix s).

    Row fields except the cursor: state (idle|running|paused|failed|done), run, pages_done,
    followers_done (fully stored pages of the current pass only), total (user/get's), calls,
    started_at, updated_at, finished_at, paused_until, last_error, seen, skipped,
    restarts_from_head, cursor_at, complete (see BackfillState); plus rate_per_s (followers/s),
    eta_s (None unless active with a rate and a total), percent, page_progress (followers
    fetched and not yet stored), active (a task is working on it now) and elapsed_s since
    started_at.
    """
    eta = None
    if active and state.total is not None and rate_per_s > 0:
        eta = round(max(state.total - state.followers_done, 0) / rate_per_s, 1)
    percent = 100.0 if state.state == "done" else None
    if state.total:
        percent = min(100.0, 100.0 * state.followers_done / state.total)
    end = state.finished_at if state.state == "done" and state.finished_at is not None else now
    document = state.to_json()
    del document["cursor"]
    document.update(
        calls=state.calls + unsaved_calls, rate_per_s=round(rate_per_s, 1), eta_s=eta,
        percent=percent, page_progress=page_progress, active=active,
        elapsed_s=round(end - state.started_at, 3) if state.started_at is not None else None,
    )
    return document


def load_pause(conn: sqlite3.Connection) -> meta.Paused | None:
    """Why the paused run waits (reason, errcode, since, ip), or None."""
    return meta.load_pause(conn, PAUSE_KEY)


def save_pause(conn: sqlite3.Connection, pause: meta.Paused | None) -> None:
    """Record why the run pauses (in the write that halts it); None when it runs again."""
    meta.save_pause(conn, PAUSE_KEY, pause)
