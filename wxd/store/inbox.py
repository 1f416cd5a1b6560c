"""The webhook inbox: every accepted message once (deduplicated by WeChat's keys), with an
actionable message's event job queued in the same transaction.

A message no other callback type reports gets its message.received callback (store/callbacks.py)
in the same transaction when the webhook asks for it. Run inside Database.write/read; imports
wxd.store.callbacks, jobs and wxd.wechat.messages only.
"""

from __future__ import annotations

import functools
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass

from wxd.store import callbacks, jobs
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
_CHUNK = 500  # rows per INSERT: 7 parameters each, well under SQLite's variable limit


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
    callback: callbacks.NewCallback | None = None


def prepare(message: Message, received_at: float, *, relay: bool = False) -> Prepared:
    """The row of `message`; with `relay`, also its message.received callback when no other
    callback type reports the message."""
    callback = callbacks.received(message) if relay and callbacks.relayed(message) else None
    return Prepared(message.dedupe_key, message.msg_type, message.event, message.from_user,
                    message.create_time, message_to_json(message),
                    isinstance(message, ACTIONABLE), received_at, callback)


def store_prepared(conn: sqlite3.Connection, batch: Sequence[Prepared]) -> list[bool]:
    """Insert each message unless its dedupe key is known: one multi-row INSERT for the inbox
    rows and one for their event jobs (per _CHUNK rows). Returns, in order, True for each
    message stored and False for each duplicate (of a stored row, or of an earlier message of
    the same batch). The webhook's batch function for `Database.write_many`.

    A new actionable message gets its event job (due at once), and a new message prepared with
    a callback its message.received row, in the same transaction, so the row, its job and its
    callback are committed (or not) together. A duplicate (WeChat's retry, a replay, a resend
    after a restart) changes nothing.
    """
    results: list[bool] = []
    for start in range(0, len(batch), _CHUNK):
        results.extend(_store_chunk(conn, batch[start:start + _CHUNK]))
    return results


_INSERT = (
    "INSERT INTO inbox (dedupe_key, msg_type, event, from_user, create_time, message,"
    " received_at) VALUES {rows} ON CONFLICT (dedupe_key) DO NOTHING RETURNING dedupe_key, id"
)


@functools.lru_cache(maxsize=128)
def _insert_sql(count: int) -> str:
    """A `count`-row INSERT: only "?" placeholders are joined into the text, values are params."""
    return _INSERT.format(rows=",".join(["(?, ?, ?, ?, ?, ?, ?)"] * count))


def _store_chunk(conn: sqlite3.Connection, chunk: Sequence[Prepared]) -> list[bool]:
    if not chunk:
        return []
    params: list[object] = []
    for p in chunk:
        params += (p.dedupe_key, p.msg_type, p.event, p.from_user, p.create_time, p.message,
                   p.received_at)
    rows = conn.execute(_insert_sql(len(chunk)), params).fetchall()
    new_ids = {str(key): int(row_id) for key, row_id in rows}
    results: list[bool] = []
    event_jobs: list[tuple[str, float]] = []
    relays: list[callbacks.NewCallback] = []
    for p in chunk:
        row_id = new_ids.pop(p.dedupe_key, None)  # pop: a repeat within the chunk is a duplicate
        results.append(row_id is not None)
        if row_id is not None and p.actionable:
            event_jobs.append((f'{{"inbox_id": {row_id}}}', p.received_at))
        if row_id is not None and p.callback is not None:
            relays.append(p.callback)
    if event_jobs:
        jobs.enqueue(conn, EVENT_JOB, event_jobs)
    if relays:
        callbacks.emit(conn, relays, max(p.received_at for p in chunk), new_facts=True)
    return results


def load(conn: sqlite3.Connection, inbox_id: int) -> Message | None:
    """The stored message of an inbox row, None when the row does not exist.

    Raises MessageError if the stored text cannot be read back (it was written by
    store_prepared, so this means the row was edited by hand).
    """
    row = conn.execute("SELECT message FROM inbox WHERE id = ?", (inbox_id,)).fetchone()
    return message_from_json(row[0]) if row is not None else None


def prune(conn: sqlite3.Connection, before: float) -> int:
    """Delete inbox rows received before `before` whose event job (if any) is finished; returns
    how many.

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
