"""The durable job queue (table `jobs`): enqueue, lease, finish/fail/retry, recovery, counts, prune.

Run inside Database.write/read; stdlib only. A payload is opaque text, handed back uninterpreted.
"""

from __future__ import annotations

import functools
import json
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass

JOB_STATES = ("queued", "leased", "done", "failed")
_ERROR_MAX = 500
_CHUNK = 500  # rows per INSERT: 4 parameters each, well under SQLite's variable limit


@dataclass(frozen=True)
class Job:
    """A leased job. `attempts` counts leases so far, this one included; times are unix s."""

    id: int
    kind: str
    payload: str
    attempts: int
    created_at: float
    last_error: str | None = None

    def payload_json(self) -> dict[str, object]:
        """The payload as a JSON object ({} when it is not one)."""
        try:
            value = json.loads(self.payload)
        except ValueError:
            return {}
        return value if isinstance(value, dict) else {}


_INSERT = "INSERT INTO jobs (kind, payload, state, not_before, created_at) VALUES {rows}"


@functools.lru_cache(maxsize=128)
def _insert_sql(count: int) -> str:
    """A `count`-row INSERT: only "?" placeholders are joined into the text, values are params."""
    return _INSERT.format(rows=",".join(["(?, ?, 'queued', ?, ?)"] * count))


def enqueue(conn: sqlite3.Connection, kind: str, entries: Sequence[tuple[str, float]]) -> None:
    """Queue one job of `kind` per (payload, created_at) entry, due at its created_at (unix s),
    in multi-row INSERTs (per _CHUNK rows)."""
    for start in range(0, len(entries), _CHUNK):
        chunk = entries[start:start + _CHUNK]
        params: list[object] = []
        for payload, created_at in chunk:
            params += (kind, payload, created_at, created_at)
        conn.execute(_insert_sql(len(chunk)), params)


def lease(conn: sqlite3.Connection, now: float, limit: int, lease_s: float) -> list[Job]:
    """Lease up to `limit` due jobs (oldest due first) until now + lease_s; attempts += 1.

    Due means queued with not_before <= now, or leased with an expired lease (its worker died or
    hung; the work is idempotent, so running it again is safe). Runs inside `db.write`.
    """
    rows = conn.execute(
        "SELECT id FROM jobs WHERE state = 'queued' AND not_before <= ?"
        " UNION ALL SELECT id FROM jobs WHERE state = 'leased' AND leased_until <= ?"
        " ORDER BY id LIMIT ?",
        (now, now, limit),
    ).fetchall()
    jobs: list[Job] = []
    for (job_id,) in rows:
        row = conn.execute(
            "UPDATE jobs SET state = 'leased', leased_until = ?, attempts = attempts + 1"
            " WHERE id = ? RETURNING id, kind, payload, attempts, created_at, last_error",
            (now + lease_s, job_id),
        ).fetchone()
        jobs.append(Job(int(row[0]), str(row[1]), str(row[2]), int(row[3]), float(row[4]),
                        row[5]))
    return jobs


def finish(conn: sqlite3.Connection, job_id: int, now: float) -> None:
    """Mark a job done (kept for inspection until pruned)."""
    conn.execute(
        "UPDATE jobs SET state = 'done', leased_until = NULL, finished_at = ? WHERE id = ?",
        (now, job_id),
    )


def fail(conn: sqlite3.Connection, job_id: int, error: str, now: float) -> None:
    """Mark a job failed for good (terminal error or attempts exhausted), keeping the reason."""
    conn.execute(
        "UPDATE jobs SET state = 'failed', leased_until = NULL, last_error = ?, finished_at = ?"
        " WHERE id = ?",
        (error[:_ERROR_MAX], now, job_id),
    )


def retry(conn: sqlite3.Connection, job_id: int, error: str, not_before: float, *,
          refund: bool = False) -> None:
    """Put a leased job back in the queue, due at `not_before`, with the error text kept.
    `refund` gives the lease's attempt back (a pause: the job itself did not fail)."""
    conn.execute(
        "UPDATE jobs SET state = 'queued', leased_until = NULL, last_error = ?, not_before = ?,"
        " attempts = CASE WHEN ? THEN MAX(attempts - 1, 0) ELSE attempts END WHERE id = ?",
        (error[:_ERROR_MAX], not_before, refund, job_id),
    )


def hasten(conn: sqlite3.Connection, job_ids: Sequence[int], now: float) -> int:
    """Make these jobs due now if they are still queued for later; how many were."""
    changed = 0
    for start in range(0, len(job_ids), _CHUNK):
        chunk = list(job_ids[start:start + _CHUNK])
        marks = ",".join("?" * len(chunk))
        changed += conn.execute(
            f"UPDATE jobs SET not_before = ? WHERE state = 'queued' AND not_before > ?"  # noqa: S608
            f" AND id IN ({marks})", (now, now, *chunk)).rowcount
    return changed


def recover(conn: sqlite3.Connection, now: float) -> int:
    """At start: every leased job is orphaned (wxd is the only writer) → queued, due now."""
    cur = conn.execute(
        "UPDATE jobs SET state = 'queued', leased_until = NULL, not_before = MIN(not_before, ?)"
        " WHERE state = 'leased'",
        (now,),
    )
    return cur.rowcount


def next_due(conn: sqlite3.Connection) -> float | None:
    """When the earliest queued job becomes due (unix s), None when nothing is queued."""
    row = conn.execute("SELECT MIN(not_before) FROM jobs WHERE state = 'queued'").fetchone()
    return float(row[0]) if row is not None and row[0] is not None else None


def next_wake(conn: sqlite3.Connection) -> float | None:
    """next_due, or the earliest end of a lease when sooner: lease takes a leased job again
    then (e.g. its outcome could not be written). None when nothing is queued or leased."""
    row = conn.execute("SELECT MIN(leased_until) FROM jobs WHERE state = 'leased'").fetchone()
    ends = [t for t in (next_due(conn), row[0] if row is not None else None) if t is not None]
    return float(min(ends)) if ends else None


def counts(conn: sqlite3.Connection) -> dict[str, int]:
    """Number of jobs per state: queued, leased, done, failed (every state present)."""
    result = dict.fromkeys(JOB_STATES, 0)
    for state, count in conn.execute("SELECT state, COUNT(*) FROM jobs GROUP BY state"):
        result[str(state)] = int(count)
    return result


def prune(conn: sqlite3.Connection, before: float) -> int:
    """Delete done jobs finished before `before`; failed ones are kept for the operator."""
    cur = conn.execute(
        "DELETE FROM jobs WHERE state = 'done' AND finished_at < ?", (before,)
    )
    return cur.rowcount
