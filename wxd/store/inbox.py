"""The webhook inbox (every accepted message, deduplicated) and the durable job queue fed by it.

Synchronous functions run inside `Database.write`/`read`; imports only the stdlib and
wxd.wechat.messages. Storage never interprets a job's payload beyond handing it back.
"""

from __future__ import annotations

import functools
import json
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass

from wxd.wechat.messages import (
    Message,
    ScanEvent,
    SubscribeEvent,
    TemplateSendJobFinish,
    UnsubscribeEvent,
    message_from_json,
    message_to_json,
)

# The job kind for "act on the inbox message"; payload {"inbox_id": N}.
EVENT_JOB = "event"
# Messages that have follow-up work (events.py). Everything else is stored in the inbox only:
# answering `success` is all WeChat needs, and no job row is written for it.
ACTIONABLE: tuple[type[Message], ...] = (
    SubscribeEvent,
    UnsubscribeEvent,
    ScanEvent,
    TemplateSendJobFinish,
)
JOB_STATES = ("queued", "leased", "done", "failed")
_ERROR_MAX = 500
_CHUNK = 500  # rows per INSERT: 7 parameters each, well under SQLite's variable limit


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


@dataclass(frozen=True)
class Prepared:
    """An inbox row ready to insert (built outside the write transaction: JSON encoding is
    CPU work that need not hold up the database thread)."""

    dedupe_key: str
    msg_type: str
    event: str | None
    from_user: str
    create_time: int
    message: str
    actionable: bool
    received_at: float


def prepare(message: Message, received_at: float) -> Prepared:
    return Prepared(message.dedupe_key, message.msg_type, message.event, message.from_user,
                    message.create_time, message_to_json(message),
                    isinstance(message, ACTIONABLE), received_at)


def store_message(conn: sqlite3.Connection, message: Message, now: float) -> bool:
    """Insert `message` into the inbox unless its dedupe key is known; False for a duplicate.

    A new actionable message also gets its event job in the same transaction, so the row and its
    job are committed (or not) together. A duplicate (WeChat's retry, a replay, a resend after a
    restart) changes nothing. Runs inside `db.write`.
    """
    return store_prepared(conn, [prepare(message, now)])[0]


def store_prepared(conn: sqlite3.Connection, batch: Sequence[Prepared]) -> list[bool]:
    """store_message for many messages at once: one multi-row INSERT for the inbox rows and one
    for their jobs (per _CHUNK rows). Returns, in order, True for each message stored and False
    for each duplicate (of a stored row, or of an earlier message of the same batch)."""
    results: list[bool] = []
    for start in range(0, len(batch), _CHUNK):
        results.extend(_store_chunk(conn, batch[start:start + _CHUNK]))
    return results


_INBOX_INSERT = (
    "INSERT INTO inbox (dedupe_key, msg_type, event, from_user, create_time, message,"
    " received_at) VALUES {rows} ON CONFLICT (dedupe_key) DO NOTHING RETURNING dedupe_key, id"
)
_JOBS_INSERT = "INSERT INTO jobs (kind, payload, state, not_before, created_at) VALUES {rows}"


@functools.lru_cache(maxsize=256)
def _sql(template: str, row: str, count: int) -> str:
    """A multi-row INSERT: only "?" placeholders are joined into the text, values are params."""
    return template.format(rows=",".join([row] * count))


def _store_chunk(conn: sqlite3.Connection, chunk: Sequence[Prepared]) -> list[bool]:
    if not chunk:
        return []
    params: list[object] = []
    for p in chunk:
        params += (p.dedupe_key, p.msg_type, p.event, p.from_user, p.create_time, p.message,
                   p.received_at)
    # Only "?" placeholders are joined into the SQL text; every value is a parameter.
    rows = conn.execute(_sql(_INBOX_INSERT, "(?, ?, ?, ?, ?, ?, ?)", len(chunk)),
                        params).fetchall()
    new_ids = {str(key): int(row_id) for key, row_id in rows}
    results: list[bool] = []
    jobs: list[object] = []
    for p in chunk:
        row_id = new_ids.pop(p.dedupe_key, None)  # pop: a repeat within the chunk is a duplicate
        results.append(row_id is not None)
        if row_id is not None and p.actionable:
            jobs += (EVENT_JOB, f'{{"inbox_id": {row_id}}}', p.received_at, p.received_at)
    if jobs:
        conn.execute(_sql(_JOBS_INSERT, "(?, ?, 'queued', ?, ?)", len(jobs) // 4), jobs)
    return results


def load_message(conn: sqlite3.Connection, inbox_id: int) -> Message | None:
    """The stored message of an inbox row, None when the row does not exist.

    Raises MessageError if the stored text cannot be read back (it was written by store_message,
    so this means the row was edited by hand).
    """
    row = conn.execute("SELECT message FROM inbox WHERE id = ?", (inbox_id,)).fetchone()
    return message_from_json(row[0]) if row is not None else None


def inbox_count(conn: sqlite3.Connection) -> int:
    return int(conn.execute("SELECT COUNT(*) FROM inbox").fetchone()[0])


def prune_inbox(conn: sqlite3.Connection, before: float) -> int:
    """Delete inbox rows received before `before` whose job (if any) is finished; returns count.

    Keep `before` far older than the replay window and WeChat's retry horizon (minutes): a
    pruned dedupe key can no longer catch a duplicate.
    """
    cur = conn.execute(
        "DELETE FROM inbox WHERE received_at < ? AND id NOT IN (SELECT CAST(json_extract("
        "payload, '$.inbox_id') AS INTEGER) FROM jobs WHERE kind = ? AND state IN"
        " ('queued', 'leased'))",
        (before, EVENT_JOB),
    )
    return cur.rowcount


# Jobs ------------------------------------------------------------------------------------------


def enqueue_job(conn: sqlite3.Connection, kind: str, payload: str, now: float,
                not_before: float | None = None) -> int:
    """Queue a job (payload is opaque text, usually JSON) due at `not_before` (default now)."""
    cur = conn.execute(
        "INSERT INTO jobs (kind, payload, state, not_before, created_at)"
        " VALUES (?, ?, 'queued', ?, ?)",
        (kind, payload, now if not_before is None else not_before, now),
    )
    return int(cur.lastrowid or 0)


def lease_jobs(conn: sqlite3.Connection, now: float, limit: int, lease_s: float) -> list[Job]:
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


def finish_job(conn: sqlite3.Connection, job_id: int, now: float | None = None) -> None:
    """Mark a job done (kept for inspection until pruned)."""
    conn.execute(
        "UPDATE jobs SET state = 'done', leased_until = NULL, finished_at = ? WHERE id = ?",
        (now, job_id),
    )


def fail_job(conn: sqlite3.Connection, job_id: int, error: str, now: float | None = None) -> None:
    """Mark a job failed for good (terminal error or attempts exhausted), keeping the reason."""
    conn.execute(
        "UPDATE jobs SET state = 'failed', leased_until = NULL, last_error = ?, finished_at = ?"
        " WHERE id = ?",
        (error[:_ERROR_MAX], now, job_id),
    )


def retry_job(conn: sqlite3.Connection, job_id: int, error: str, not_before: float) -> None:
    """Put a leased job back in the queue, due at `not_before`, with the error text kept."""
    conn.execute(
        "UPDATE jobs SET state = 'queued', leased_until = NULL, last_error = ?, not_before = ?"
        " WHERE id = ?",
        (error[:_ERROR_MAX], not_before, job_id),
    )


def recover_jobs(conn: sqlite3.Connection, now: float) -> int:
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


def job_counts(conn: sqlite3.Connection) -> dict[str, int]:
    """Number of jobs per state: queued, leased, done, failed (every state present)."""
    counts = dict.fromkeys(JOB_STATES, 0)
    for state, count in conn.execute("SELECT state, COUNT(*) FROM jobs GROUP BY state"):
        counts[str(state)] = int(count)
    return counts


def prune_jobs(conn: sqlite3.Connection, before: float) -> int:
    """Delete done jobs finished before `before`; failed ones are kept for the operator."""
    cur = conn.execute(
        "DELETE FROM jobs WHERE state = 'done' AND finished_at < ?", (before,)
    )
    return cur.rowcount
