"""The callback outbox: each fact the backend hears of, written in the transaction of the fact
itself (so a crash can repeat a callback but never lose one), and its delivery state.

Run inside Database.write/read; imports wxd.config (the type table), wxd.store.identity, pushes
and wxd.wechat.messages only.
Set-based: an emit, a lease and a batch of outcomes are a few statements whatever their size
(per-row statements would hand the GIL back and forth once per row while the event loop is busy).

    pending ─lease─▶ (leased: attempt recorded) ─2xx─▶ done
       ▲                 ├──failure──▶ pending (due after backoff)
       │                 └──failure after max_age_s──▶ dead ─operator retry─┘
"""

from __future__ import annotations

import base64
import functools
import hashlib
import json
import secrets
import sqlite3
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from wxd.config import CALLBACK_TYPES, CALLBACK_TYPES_NOT_YET
from wxd.store import paging
from wxd.store.identity import ExplicitLink, find_identity
from wxd.store.pushes import get as get_push
from wxd.wechat.messages import (
    Message,
    SubscribeEvent,
    TemplateSendJobFinish,
    UnsubscribeEvent,
)

# Every callback type (the table is config's: [callbacks] events is checked against it). Those
# in NOT_YET belong to features this wxd does not have yet: accepted there, never written.
TYPES = CALLBACK_TYPES
NOT_YET = CALLBACK_TYPES_NOT_YET
STATUSES = ("pending", "done", "dead")
ANSWER_EXCERPT_CHARS = 200   # what is kept of a receiver's answer body
ERROR_CHARS = 300
# A `data` object larger than this is replaced by a stub naming what was left out; the webhook
# bounds its bodies far below it, so only a misconfigured [webhook] max_body_bytes reaches it.
MAX_DATA_BYTES = 256 * 1024
# Messages another type reports: follows and unfollows (follower.*), delivery reports (push.*).
# Every other message the webhook stores is relayed as message.received.
_REPORTED_OTHERWISE: tuple[type[Message], ...] = (SubscribeEvent, UnsubscribeEvent,
                                                  TemplateSendJobFinish)
# Elements with children of their own: parse_xml keeps them as JSON text; the callback carries
# them as JSON values. Every other field is the text WeChat sent (media ids included).
# https://developers.weixin.qq.com/doc/offiaccount/Message_Management/Receiving_event_pushes.html
# https://developers.weixin.qq.com/doc/offiaccount/Custom_Menus/Custom_Menu_Push_Events.html
_NESTED = frozenset({"ScanCodeInfo", "SendPicsInfo", "SendLocationInfo", "PicList",
                     "SubscribeMsgPopupEvent", "SubscribeMsgChangeEvent",
                     "SubscribeMsgSentEvent", "CopyrightCheckResult", "ArticleUrlResult"})
_encode = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


def new_id() -> str:
    """A public callback id: "evt_" + 20 url-safe random characters."""
    return "evt_" + secrets.token_urlsafe(15)


def derived_id(kind: str, fact_key: str) -> str:
    """The id of the `kind` callback of a fact with a stable key (an inbox dedupe key): the
    same fact applied twice (an event job run again after a crash) writes one callback."""
    digest = hashlib.sha256(f"{kind}\n{fact_key}".encode()).digest()[:15]
    return "evt_" + base64.urlsafe_b64encode(digest).decode()


@dataclass(frozen=True)
class NewCallback:
    """A callback to write. `data` is the JSON object text of the body's data. With
    `follower`, `subject` is an OA openid, and the subject written is its follower's unionid
    when one is known (the person, across the OA and the MP)."""

    id: str
    type: str
    subject: str
    data: str
    follower: bool = False


def encode_data(data: Mapping[str, Any]) -> str:
    """The JSON text of a callback's data, bounded by MAX_DATA_BYTES."""
    text = _encode(data)
    if len(text) * 4 <= MAX_DATA_BYTES or len(text.encode()) <= MAX_DATA_BYTES:
        return text
    kept = {k: v for k, v in data.items() if not isinstance(v, dict | list)}
    kept["truncated"] = True
    return _encode(kept)


# Writing --------------------------------------------------------------------------------------

_CHUNK = 500  # rows per INSERT: 9 parameters each, well under SQLite's variable limit
_EXISTING = "SELECT id FROM callbacks WHERE id IN (SELECT value FROM json_each(?))"
# For each key (a follower's openid, or a fixed subject): the follower's unionid if any, and the
# last sequence number of the key and of that unionid as subjects. One statement.
_SUBJECTS = (
    "SELECT j.value, f.unionid, own.seq, via.seq FROM json_each(?) j"
    " LEFT JOIN followers f ON f.oa_openid = j.value"
    " LEFT JOIN callback_subjects own ON own.subject = j.value"
    " LEFT JOIN callback_subjects via ON via.subject = f.unionid"
)
_INSERT = (
    "INSERT INTO callbacks (id, type, subject, subject_seq, data, next_attempt_at, retry_since,"
    " created_at, updated_at) VALUES {rows} ON CONFLICT (id) DO NOTHING"
)


@functools.lru_cache(maxsize=64)
def _insert_sql(count: int) -> str:
    """A `count`-row INSERT: only "?" placeholders are joined into the text, values are params."""
    return _INSERT.format(rows=",".join(["(?, ?, ?, ?, ?, ?, ?, ?, ?)"] * count))


def emit(conn: sqlite3.Connection, callbacks: Sequence[NewCallback], now: float, *,
         new_facts: bool = False) -> int:
    """Write callbacks, due now, each with the next sequence number of its subject (in the
    given order; the trigger callbacks_count_subject records it); one whose id exists already
    is skipped (and takes no number). Returns how many were written. Two or three statements
    per call whatever its size: each statement is a GIL hand-off between the database thread
    and a busy event loop. `new_facts`: the facts were first recorded in this transaction (the
    inbox rows of the webhook's batch), so no id can exist yet and that lookup is skipped (the
    INSERT still ignores one that would)."""
    written = 0
    for start in range(0, len(callbacks), _CHUNK):
        written += _emit_chunk(conn, callbacks[start:start + _CHUNK], now, new_facts)
    return written


def _emit_chunk(conn: sqlite3.Connection, chunk: Sequence[NewCallback], now: float,
                new_facts: bool) -> int:
    if not chunk:
        return 0
    seen: set[str] = set() if new_facts else {
        row[0] for row in conn.execute(_EXISTING, (_encode([c.id for c in chunk]),))}
    fresh: list[NewCallback] = []
    for item in chunk:
        if item.id not in seen:
            seen.add(item.id)
            fresh.append(item)
    if not fresh:
        return 0
    found = {key: (unionid, own, via) for key, unionid, own, via in conn.execute(
        _SUBJECTS, (_encode(list({c.subject for c in fresh})),)).fetchall()}
    last: dict[str, int] = {}
    params: list[object] = []
    for item in fresh:
        unionid, own, via = found.get(item.subject, (None, None, None))
        subject, seq = (unionid, via) if item.follower and unionid else (item.subject, own)
        seq = last[subject] = last.get(subject, seq or 0) + 1
        params += (item.id, item.type, subject, seq, item.data, now, now, now, now)
    conn.execute(_insert_sql(len(fresh)), params)
    return len(fresh)


def relayed(message: Message) -> bool:
    """True for a message no other callback type reports (sent as message.received)."""
    return not isinstance(message, _REPORTED_OTHERWISE)


def message_data(message: Message) -> dict[str, Any]:
    """message.received's data: who, what, when, and every field as WeChat sent it."""
    fields: dict[str, Any] = {}
    for name, value in message.raw.items():
        if name in _NESTED and isinstance(value, str):
            try:
                fields[name] = json.loads(value)
                continue
            except ValueError:
                pass
        fields[name] = value
    return {"oa_openid": message.from_user, "msg_type": message.msg_type,
            "event": message.event, "create_time": message.create_time, "fields": fields}


def received(message: Message) -> NewCallback:
    """The message.received callback of a message the webhook stores (id from its dedupe key)."""
    return NewCallback(derived_id("message.received", message.dedupe_key), "message.received",
                       message.from_user, encode_data(message_data(message)),
                       follower=True)


def _follower_data(kind: str, row: sqlite3.Row) -> dict[str, Any]:
    scene = row["qr_scene_str"] if row["qr_scene_str"] is not None else (
        str(row["qr_scene"]) if row["qr_scene"] is not None else None)
    data: dict[str, Any] = {"oa_openid": row["oa_openid"], "unionid": row["unionid"]}
    if kind == "follower.subscribed":
        data.update(scene=scene, ticket=row["ticket"], subscribed_at=row["subscribed_at"])
    else:
        data.update(subscribed_at=row["subscribed_at"], unsubscribed_at=row["unsubscribed_at"])
    return data


@dataclass(frozen=True)
class Outbox:
    """What the services write facts through: the types configured (none: callbacks off, and
    nothing is written) and `notify`, rung after a write (from the database thread: it must be
    thread-safe) so that delivery starts without waiting for its next look."""

    types: frozenset[str] = frozenset()
    notify: Callable[[], None] | None = field(default=None, compare=False, repr=False)

    def wants(self, kind: str) -> bool:
        return kind in self.types

    def emit(self, conn: sqlite3.Connection, callbacks: Sequence[NewCallback],
             now: float) -> int:
        """emit() of the wanted ones; rings `notify` when any was written."""
        wanted = [c for c in callbacks if c.type in self.types]
        written = emit(conn, wanted, now) if wanted else 0
        if written and self.notify is not None:
            self.notify()
        return written

    def follower(self, conn: sqlite3.Connection, kind: str, oa_openid: str, fact_key: str,
                 now: float) -> int:
        """follower.subscribed / follower.unsubscribed of the event `fact_key` (its inbox
        dedupe key) just applied to the follower row: oa_openid, unionid (when known yet),
        scene, ticket, subscribed_at / unsubscribed_at."""
        if kind not in self.types:
            return 0
        row = conn.execute("SELECT * FROM followers WHERE oa_openid = ?", (oa_openid,)).fetchone()
        if row is None:
            return 0
        return self.emit(conn, [NewCallback(derived_id(kind, fact_key), kind,
                                            row["unionid"] or oa_openid,
                                            encode_data(_follower_data(kind, row)))], now)

    def linked(self, conn: sqlite3.Connection, unionids: Iterable[str], source: str,
               now: float) -> int:
        """user.linked for each unionid just linked: mp_openid, oa_openid, unionid, source,
        linked_at (the subject is the unionid)."""
        if "user.linked" not in self.types:
            return 0
        found: list[NewCallback] = []
        for unionid in unionids:
            person = find_identity(conn, unionid=unionid)
            if person is None or not person.linked:
                continue
            data = {"mp_openid": person.mp_openid, "oa_openid": person.oa_openid,
                    "unionid": unionid, "source": source, "linked_at": person.linked_at}
            key = f"{source}:{unionid}:{person.linked_at!r}"
            found.append(NewCallback(derived_id("user.linked", key),
                                     "user.linked", unionid, encode_data(data)))
        return self.emit(conn, found, now)

    def explicit(self, conn: sqlite3.Connection, kind: str, link: ExplicitLink, now: float,
                 reason: str | None = None) -> int:
        """user.linked / user.unlinked for an explicit (qrcode / oauth) link made, replaced or
        removed in this transaction: mp_openid, oa_openid, unionid (when either side has one),
        source, linked_at, and for user.unlinked unlinked_at and `reason` ("replaced" by a newer
        link of either openid, or "removed" by DELETE /v1/links)."""
        if kind not in self.types:
            return 0
        unionid = _unionid_of(conn, link.mp_openid, link.oa_openid)
        data: dict[str, Any] = {"mp_openid": link.mp_openid, "oa_openid": link.oa_openid,
                                "unionid": unionid, "source": link.source,
                                "linked_at": link.linked_at}
        if kind == "user.unlinked":
            data.update(unlinked_at=now, reason=reason)
        key = f"{link.source}:{link.mp_openid}:{link.oa_openid}:{link.linked_at!r}"
        return self.emit(conn, [NewCallback(derived_id(kind, key), kind,
                                            unionid or link.oa_openid, encode_data(data))], now)

    def push(self, conn: sqlite3.Connection, push_id: str, kinds: Iterable[str],
             now: float) -> int:
        """push.sent / push.delivered / push.failed for transitions of one push made in this
        transaction; data is the push as GET /v1/pushes/{id} shows it at the commit (the
        subject is the push id)."""
        wanted = [kind for kind in kinds if kind in self.types]
        if not wanted:
            return 0
        push = get_push(conn, push_id)
        if push is None:
            return 0
        data = encode_data(push)
        return self.emit(conn, [NewCallback(new_id(), kind, push_id, data) for kind in wanted],
                         now)


OFF = Outbox()


def _unionid_of(conn: sqlite3.Connection, mp_openid: str, oa_openid: str) -> str | None:
    row = conn.execute(
        "SELECT COALESCE((SELECT unionid FROM followers WHERE oa_openid = ?),"
        " (SELECT unionid FROM mp_users WHERE mp_openid = ?))", (oa_openid, mp_openid),
    ).fetchone()
    return row[0] if row is not None else None


# Delivery -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Leased:
    """A callback leased for one attempt (attempts already incremented and committed)."""

    id: str
    type: str
    subject: str
    subject_seq: int
    data: str
    created_at: float
    attempts: int
    retry_since: float

    def body(self) -> bytes:
        """The request body, the same bytes on every attempt."""
        return (f'{{"id":{_encode(self.id)},"type":{_encode(self.type)},'
                f'"created_at":{int(self.created_at)},"subject":{_encode(self.subject)},'
                f'"seq":{self.subject_seq},"data":{self.data}}}').encode()


def lease(conn: sqlite3.Connection, now: float, limit: int, lease_s: float) -> list[Leased]:
    """Take up to `limit` due pending callbacks (earliest due first) and record the attempt:
    attempts + 1, leased until now + lease_s (not due again before then). Through the due
    index (the planner would rather sort the whole backlog by the status index)."""
    rows = conn.execute(
        "UPDATE callbacks SET attempts = attempts + 1, last_attempt_at = ?1, leased_until = ?2,"
        " next_attempt_at = ?2, updated_at = ?1 WHERE seq IN (SELECT seq FROM callbacks"
        "   INDEXED BY callbacks_due WHERE status = 'pending' AND next_attempt_at <= ?1"
        "   ORDER BY next_attempt_at LIMIT ?3)"
        " RETURNING id, type, subject, subject_seq, data, created_at, attempts, retry_since",
        (now, now + lease_s, limit),
    ).fetchall()
    return [Leased(*row) for row in rows]


@dataclass(frozen=True)
class Outcome:
    """One attempt's result: `status` "done", "pending" (retry at `due`) or "dead".
    `http_status` is the receiver's status code (None when none came); `answer` an excerpt."""

    id: str
    attempts: int
    status: str
    at: float
    due: float | None = None
    http_status: int | None = None
    error: str | None = None
    answer: str | None = None

    @functools.cached_property
    def text(self) -> str:
        """The JSON of this outcome for record() (encode it off the database thread)."""
        return _encode([self.id, self.attempts, self.status, self.at, self.due,
                        self.http_status, (self.error or "")[:ERROR_CHARS] or None,
                        (self.answer or "")[:ANSWER_EXCERPT_CHARS] or None])


# A success counts whichever attempt it answers; a failure only for the attempt that still holds
# the lease (a lease that expired and was taken again belongs to the newer attempt).
_RECORD = (
    "UPDATE callbacks SET status = o.status, leased_until = NULL,"
    " next_attempt_at = COALESCE(o.due, callbacks.next_attempt_at), last_status = o.code,"
    " last_error = o.error, last_answer = o.answer, updated_at = o.at,"
    " finished_at = CASE WHEN o.status = 'pending' THEN NULL ELSE o.at END"
    " FROM (SELECT json_extract(value, '$[0]') AS id, json_extract(value, '$[1]') AS attempts,"
    "   json_extract(value, '$[2]') AS status, json_extract(value, '$[3]') AS at,"
    "   json_extract(value, '$[4]') AS due, json_extract(value, '$[5]') AS code,"
    "   json_extract(value, '$[6]') AS error, json_extract(value, '$[7]') AS answer"
    "   FROM json_each(?)) AS o"
    # "+status": look the rows up by id (the UNIQUE index), never walk the pending backlog.
    " WHERE callbacks.id = o.id AND +callbacks.status = 'pending'"
    " AND (o.status = 'done' OR (callbacks.attempts = o.attempts"
    "   AND callbacks.leased_until IS NOT NULL)) RETURNING callbacks.id"
)


def record(conn: sqlite3.Connection, outcomes: Sequence[Outcome]) -> list[str]:
    """The batch function of db.write_many for attempt outcomes: one statement for all of them.
    Returns, in order, the status each outcome set, or "" when it changed nothing (the row was
    done already, or a newer attempt holds it)."""
    changed = {row[0] for row in conn.execute(
        _RECORD, ("[" + ",".join(o.text for o in outcomes) + "]",)).fetchall()}
    return [o.status if o.id in changed else "" for o in outcomes]


def release(conn: sqlite3.Connection, ids: Sequence[str], now: float, *, refund: bool) -> int:
    """Leased (not answered) → due now; `refund` gives the attempt back (never POSTed)."""
    if not ids:
        return 0
    change = "MAX(attempts - 1, 0)" if refund else "attempts"
    return conn.execute(
        f"UPDATE callbacks SET attempts = {change}, leased_until = NULL, next_attempt_at = ?,"  # noqa: S608
        " updated_at = ? WHERE status = 'pending' AND leased_until IS NOT NULL"
        " AND id IN (SELECT value FROM json_each(?))", (now, now, _encode(list(ids))),
    ).rowcount


def recover(conn: sqlite3.Connection, now: float) -> int:
    """At start every lease is a previous process's: due again now (the attempt counted)."""
    return conn.execute(
        "UPDATE callbacks SET leased_until = NULL, next_attempt_at = ?, updated_at = ?"
        " WHERE status = 'pending' AND leased_until IS NOT NULL", (now, now),
    ).rowcount


def next_due(conn: sqlite3.Connection) -> float | None:
    """When the earliest pending callback becomes due (a lease end included), or None."""
    row = conn.execute(
        "SELECT next_attempt_at FROM callbacks INDEXED BY callbacks_due"
        " WHERE status = 'pending' ORDER BY next_attempt_at LIMIT 1"
    ).fetchone()
    return float(row[0]) if row is not None else None


def prune(conn: sqlite3.Connection, done_before: float, dead_before: float) -> int:
    """Delete done callbacks finished before `done_before` and dead ones before `dead_before`."""
    return conn.execute(
        "DELETE FROM callbacks WHERE (status = 'done' AND finished_at < ?)"
        " OR (status = 'dead' AND finished_at < ?)", (done_before, dead_before),
    ).rowcount


# Operator -------------------------------------------------------------------------------------


def row_json(row: sqlite3.Row, *, full: bool = False) -> dict[str, Any]:
    """The admin API view of one callback (times are unix seconds); `full` adds the data, the
    answer excerpt and when the max_age_s window started. Never a secret or a signature."""
    view: dict[str, Any] = {
        "id": row["id"],
        "type": row["type"],
        "subject": row["subject"],
        "seq": row["subject_seq"],
        "status": row["status"],
        "attempts": row["attempts"],
        "created_at": row["created_at"],
        "next_attempt_at": row["next_attempt_at"] if row["status"] == "pending" else None,
        "last_attempt_at": row["last_attempt_at"],
        "last_status": row["last_status"],
        "last_error": row["last_error"],
        "finished_at": row["finished_at"],
    }
    if full:
        view["retry_since"] = row["retry_since"]
        view["last_answer"] = row["last_answer"]
        view["data"] = json.loads(row["data"])
    return view


def get(conn: sqlite3.Connection, callback_id: str) -> dict[str, Any] | None:
    row = conn.execute("SELECT * FROM callbacks WHERE id = ?", (callback_id,)).fetchone()
    return row_json(row, full=True) if row is not None else None


def list_callbacks(conn: sqlite3.Connection, status: str | None, kind: str | None, limit: int,
                   cursor: str | None = None) -> tuple[list[dict[str, Any]], str | None]:
    """Newest first, optionally of one status and one type; returns (callbacks, next cursor or
    None). ValueError on a bad cursor."""
    return paging.page(conn, "callbacks", {"status": status, "type": kind}, limit, cursor,
                       row_json)


def operator_retry(conn: sqlite3.Connection, callback_id: str,
                   now: float) -> tuple[str, str | None]:
    """dead → pending, due now, with a fresh max_age_s window and backoff. Returns ("ok" |
    "not_found" | "invalid_state", the status now)."""
    row = conn.execute("SELECT status FROM callbacks WHERE id = ?", (callback_id,)).fetchone()
    if row is None:
        return "not_found", None
    if row["status"] != "dead":
        return "invalid_state", row["status"]
    _revive(conn, "id = ?", (callback_id,), now)
    return "ok", "pending"


def retry_dead(conn: sqlite3.Connection, since: float, now: float) -> int:
    """operator_retry for every callback that went dead at or after `since`; returns how many."""
    return _revive(conn, "status = 'dead' AND finished_at >= ?", (since,), now)


def _revive(conn: sqlite3.Connection, where: str, params: tuple[Any, ...], now: float) -> int:
    return conn.execute(
        "UPDATE callbacks SET status = 'pending', attempts = 0, next_attempt_at = ?,"  # noqa: S608
        " retry_since = ?, leased_until = NULL, finished_at = NULL, updated_at = ?"
        f" WHERE {where}", (now, now, now, *params),
    ).rowcount


def counts(conn: sqlite3.Connection) -> dict[str, int]:
    """Callbacks by status (every status present)."""
    found = dict.fromkeys(STATUSES, 0)
    for status, count in conn.execute("SELECT status, COUNT(*) FROM callbacks GROUP BY status"):
        found[status] = int(count)
    return found


def oldest_pending(conn: sqlite3.Connection) -> float | None:
    """created_at of the first pending callback written (the oldest but for operator retries
    of older dead ones), or None; an index lookup, not a scan of the backlog."""
    row = conn.execute(
        "SELECT created_at FROM callbacks WHERE status = 'pending' ORDER BY seq LIMIT 1"
    ).fetchone()
    return float(row[0]) if row is not None else None
