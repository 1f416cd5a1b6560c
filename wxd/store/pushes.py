"""The durable push queue: push rows and their state machine, delivery reports, send outcomes,
the persisted sending pause. Run inside Database.write/read; imports wxd.store.meta and
wxd.store.followers (a 43004 marks the follower in the push outcome's transaction) only.

    queued ─lease─▶ sending ─▶ sent ─report─▶ delivered | failed
      ▲  │             │  └──▶ queued (retry later / quota / stop)   failed ─operator─▶ queued
      │  └─cancel─▶ cancelled     └──▶ failed (terminal, attempts spent, outcome unknown)
"""

from __future__ import annotations

import json
import secrets
import sqlite3
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from wxd.store import followers, meta, paging

STATUSES = ("queued", "sending", "sent", "delivered", "failed", "cancelled")
PAUSE_KEY = "pushes.pause"  # a meta.Paused
_LEGACY_PAUSE_KEY = "pushes.paused_until"  # before pauses had reasons: a 45009 pause's end
# WeChat drops a repeated openid + client_msg_id for 10 minutes, no guarantee after.
# https://developers.weixin.qq.com/doc/offiaccount/Message_Management/Template_Message_Interface.html
CLIENT_MSG_ID_WINDOW_S = 600.0
DELIVERY_SUCCESS = "success"
# A delivery report without a MsgID is matched by recipient and time: to the one push sent to
# that openid within this long before the report's CreateTime (see apply_delivery_report_by_time).
REPORT_MATCH_WINDOW_S = 3600.0
# The report's CreateTime is WeChat's clock, last_attempt_at ours: allow this much disagreement.
REPORT_CLOCK_SKEW_S = 60.0
# last_answer's bounds: the first keys of WeChat's answer, strings (and nested values, as JSON
# text) cut short. A template/send answer has three or four keys.
ANSWER_MAX_KEYS = 16
ANSWER_MAX_CHARS = 512
# One encoder for every row (json.dumps with options builds a new encoder per call). UTF-8 text
# without \u escapes, as wechatpy sends it: some WeChat APIs refuse \u escapes with 40033, and
# whether template/send does is unconfirmed.
# https://developers.weixin.qq.com/doc/offiaccount/Getting_Started/Global_Return_Code.html
_encode = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


def new_push_id() -> str:
    """A public push id: "p_" + 20 url-safe random characters (22 in all, client_msg_id-safe)."""
    return "p_" + secrets.token_urlsafe(15)


@dataclass(frozen=True)
class NewPush:
    """A validated push ready to insert. `body` is the template/send body without
    client_msg_id; `recipient` is the request's `to` as given (for display)."""

    id: str
    idempotency_key: str | None
    recipient: Mapping[str, str]
    oa_openid: str
    template_id: str
    body: Mapping[str, Any]


@dataclass(frozen=True)
class Leased:
    """A push leased for one attempt (already recorded as `sending`, attempts incremented)."""

    id: str
    oa_openid: str
    template_id: str
    client_msg_id: str
    body: str
    attempts: int
    resend: bool = False  # this client_msg_id was POSTed before (a retry, a recovery, ...)

    def wechat_body(self) -> dict[str, Any]:
        """The template/send body with this push's client_msg_id."""
        body: dict[str, Any] = json.loads(self.body)
        body["client_msg_id"] = self.client_msg_id
        return body


def row_json(row: sqlite3.Row) -> dict[str, Any]:
    """The admin API view of one push row (times are unix seconds)."""
    return {
        "id": row["id"],
        "status": row["status"],
        "attempts": row["attempts"],
        "msgid": row["msgid"],
        "error": row["error"],
        "errcode": row["errcode"],
        "error_code": row["error_code"],
        "to": json.loads(row["recipient"]),
        "oa_openid": row["oa_openid"],
        "template_id": row["template_id"],
        "idempotency_key": row["idempotency_key"],
        "client_msg_id": row["client_msg_id"],
        "last_answer": json.loads(row["last_answer"]) if row["last_answer"] else None,
        "created_at": row["created_at"],
        "updated_at": row["updated_at"],
        "last_attempt_at": row["last_attempt_at"],
        "next_attempt_at": row["next_attempt_at"] if row["status"] == "queued" else None,
        "sent_at": row["sent_at"],
        "finished_at": row["finished_at"],
    }


def get(conn: sqlite3.Connection, push_id: str) -> dict[str, Any] | None:
    row = conn.execute("SELECT * FROM pushes WHERE id = ?", (push_id,)).fetchone()
    return row_json(row) if row is not None else None


def by_idempotency_key(conn: sqlite3.Connection, key: str) -> dict[str, Any] | None:
    row = conn.execute("SELECT * FROM pushes WHERE idempotency_key = ?", (key,)).fetchone()
    return row_json(row) if row is not None else None


def insert(conn: sqlite3.Connection, push: NewPush, now: float) -> None:
    """Insert a queued push, due now. Callers check the idempotency key first (in the same
    transaction); a duplicate key still raises sqlite3.IntegrityError rather than doubling."""
    conn.execute(
        "INSERT INTO pushes (id, idempotency_key, recipient, oa_openid, template_id, body,"
        " client_msg_id, status, attempts, next_attempt_at, created_at, updated_at)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, 'queued', 0, ?, ?, ?)",
        (push.id, push.idempotency_key, _encode(push.recipient), push.oa_openid,
         push.template_id, _encode(push.body), push.id, now, now, now),
    )


def lease(conn: sqlite3.Connection, now: float, limit: int, lease_s: float) -> list[Leased]:
    """Take up to `limit` due queued pushes (oldest due first) and record the attempt: status
    sending, attempts + 1, last_attempt_at = now, one more POST of the client_msg_id (the
    first one's time kept). This write must commit BEFORE the POST. Leased.resend: the
    client_msg_id was POSTed before, so WeChat may answer as to a duplicate."""
    rows = conn.execute(
        "UPDATE pushes SET status = 'sending', attempts = attempts + 1, last_attempt_at = ?,"
        " client_msg_id_sends = client_msg_id_sends + 1,"
        " client_msg_id_at = COALESCE(client_msg_id_at, ?), leased_until = ?, updated_at = ?"
        " WHERE seq IN (SELECT seq FROM pushes WHERE status = 'queued' AND next_attempt_at <= ?"
        "   ORDER BY next_attempt_at, seq LIMIT ?)"
        " RETURNING id, oa_openid, template_id, client_msg_id, body, attempts,"
        " client_msg_id_sends > 1",
        (now, now, now + lease_s, now, now, limit),
    ).fetchall()
    return [Leased(r[0], r[1], r[2], r[3], r[4], r[5], bool(r[6])) for r in rows]


def next_due(conn: sqlite3.Connection) -> float | None:
    """When the earliest queued push becomes due (unix seconds), or None when none is queued."""
    row = conn.execute(
        "SELECT next_attempt_at FROM pushes WHERE status = 'queued'"
        " ORDER BY next_attempt_at LIMIT 1"
    ).fetchone()
    return float(row[0]) if row is not None else None


def next_wake(conn: sqlite3.Connection, now: float) -> float | None:
    """next_due, or the next end of a `sending` push's lease after `now` when sooner: then
    requeue_expired may take it again (its outcome may never be recorded)."""
    row = conn.execute(
        "SELECT MIN(leased_until) FROM pushes WHERE status = 'sending' AND leased_until > ?",
        (now,),
    ).fetchone()
    ends = [t for t in (next_due(conn), row[0] if row is not None else None) if t is not None]
    return float(min(ends)) if ends else None


def _apply_report(conn: sqlite3.Connection, push_id: str, status: str, now: float) -> str:
    if status == DELIVERY_SUCCESS:
        conn.execute(
            "UPDATE pushes SET status = 'delivered', finished_at = ?, updated_at = ? WHERE id = ?",
            (now, now, push_id),
        )
        return "delivered"
    # "failed:user block", "failed: system failed" (sic, with and without the space).
    conn.execute(
        "UPDATE pushes SET status = 'failed', error_code = 'delivery_failed', error = ?,"
        " finished_at = ?, updated_at = ? WHERE id = ?",
        (status, now, now, push_id),
    )
    return "failed"


def answer_text(answer: Mapping[str, Any] | None) -> str | None:
    """WeChat's answer as last_answer keeps it: at most ANSWER_MAX_KEYS keys, each string (and
    each nested value, as its JSON text) cut to ANSWER_MAX_CHARS; None stays None."""
    if answer is None:
        return None
    kept: dict[str, Any] = {}
    for key, value in list(answer.items())[:ANSWER_MAX_KEYS]:
        if isinstance(value, (dict, list)):
            value = _encode(value)
        if isinstance(value, str):
            value = value[:ANSWER_MAX_CHARS]
        kept[str(key)[:ANSWER_MAX_CHARS]] = value
    return _encode(kept)


def mark_sent(conn: sqlite3.Connection, push_id: str, msgid: str | None, now: float,
              answer: Mapping[str, Any] | None = None) -> str:
    """sending → sent with `msgid`: errcode 0, or WeChat's duplicate answer to a resend (then
    `msgid` may be None: unknown; `answer` is that answer, kept as last_answer, else cleared).
    A delivery report that arrived first is applied at once (without a msgid: the one stored
    for this openid since the first POST, if no other push could own it; it gives the push its
    msgid). Returns the new status ("sent", "delivered", "failed"), or "" when the push was no
    longer sending (nothing changed)."""
    row = conn.execute(
        "UPDATE pushes SET status = 'sent', msgid = ?, sent_at = ?, updated_at = ?,"
        " leased_until = NULL, errcode = NULL, error_code = NULL, error = NULL, last_answer = ?"
        " WHERE id = ? AND status = 'sending' RETURNING oa_openid",
        (msgid, now, now, answer_text(answer), push_id),
    ).fetchone()
    if row is None:
        return ""
    if msgid is None:
        return _adopt_early_report(conn, push_id, row[0], now)
    report = conn.execute(
        "SELECT status, oa_openid FROM delivery_reports WHERE msgid = ?", (msgid,)
    ).fetchone()
    if report is None or report["oa_openid"] != row[0]:
        return "sent"
    conn.execute("DELETE FROM delivery_reports WHERE msgid = ?", (msgid,))
    return _apply_report(conn, push_id, report["status"], now)


def _adopt_early_report(conn: sqlite3.Connection, push_id: str, oa_openid: str,
                        now: float) -> str:
    """mark_sent without a msgid: the first send's report often came while the push waited
    for its resend. The one unmatched report for this openid received since the first POST of
    the client_msg_id is this push's when _reported_push picks it for that report."""
    first = conn.execute("SELECT client_msg_id_at FROM pushes WHERE id = ?",
                         (push_id,)).fetchone()[0]
    reports = conn.execute(
        "SELECT msgid, status, received_at FROM delivery_reports WHERE oa_openid = ?"
        " AND received_at >= ? LIMIT 2",
        (oa_openid, (first if first is not None else now) - REPORT_CLOCK_SKEW_S),
    ).fetchall()
    if len(reports) != 1 or _reported_push(conn, oa_openid, reports[0]["received_at"],
                                           msgid_known=True) != push_id:
        return "sent"
    [report] = reports
    conn.execute("DELETE FROM delivery_reports WHERE msgid = ?", (report["msgid"],))
    conn.execute("UPDATE pushes SET msgid = ? WHERE id = ?", (report["msgid"], push_id))
    return _apply_report(conn, push_id, report["status"], now)


def mark_retry(conn: sqlite3.Connection, push_id: str, now: float, next_attempt_at: float,
               errcode: int | None, error_code: str, error: str,
               answer: Mapping[str, Any] | None = None) -> bool:
    """A transient failure: sending → queued, due at `next_attempt_at`, last error kept (and
    WeChat's `answer` as last_answer; None when there was none)."""
    cur = conn.execute(
        "UPDATE pushes SET status = 'queued', next_attempt_at = ?, leased_until = NULL,"
        " errcode = ?, error_code = ?, error = ?, last_answer = ?, updated_at = ?"
        " WHERE id = ? AND status = 'sending'",
        (next_attempt_at, errcode, error_code, error, answer_text(answer), now, push_id),
    )
    return cur.rowcount == 1


def mark_failed(conn: sqlite3.Connection, push_id: str, now: float, errcode: int | None,
                error_code: str, error: str, answer: Mapping[str, Any] | None = None) -> bool:
    """A terminal failure (or attempts spent): sending → failed with the reason (and WeChat's
    `answer` as last_answer; None when there was none)."""
    cur = conn.execute(
        "UPDATE pushes SET status = 'failed', leased_until = NULL, errcode = ?, error_code = ?,"
        " error = ?, last_answer = ?, finished_at = ?, updated_at = ?"
        " WHERE id = ? AND status = 'sending'",
        (errcode, error_code, error, answer_text(answer), now, now, push_id),
    )
    return cur.rowcount == 1


def mark_not_following(conn: sqlite3.Connection, push_id: str, oa_openid: str, now: float,
                       observed_at: float, error: str,
                       answer: Mapping[str, Any] | None = None) -> bool:
    """template/send answered 43004 to a send issued at `observed_at`: the push fails
    (rejected, errcode 43004) and, in the same transaction, the follower is marked unsubscribed
    (followers.mark_not_following: events win), so later pushes to the person are refused at
    enqueue instead of failing one by one. True if the push changed."""
    if not mark_failed(conn, push_id, now, 43004, "rejected", error, answer):
        return False
    followers.mark_not_following(conn, oa_openid, observed_at, now)
    return True


def release(conn: sqlite3.Connection, push_ids: Iterable[str], now: float, *,
            refund: bool) -> int:
    """sending → queued, due now. `refund` gives the attempt back (quota pause, or a leased
    push never POSTed); without it the attempt counts (the POST may have reached WeChat)."""
    change = "attempts - 1" if refund else "attempts"
    # A refund also gives back the lease's POST of the client_msg_id (none left: no first time).
    sends = ("MAX(client_msg_id_sends - 1, 0), client_msg_id_at = CASE WHEN"
             " client_msg_id_sends <= 1 THEN NULL ELSE client_msg_id_at END"
             if refund else "client_msg_id_sends")
    cur = conn.executemany(
        f"UPDATE pushes SET status = 'queued', attempts = MAX({change}, 0), next_attempt_at = ?,"  # noqa: S608
        f" client_msg_id_sends = {sends},"
        " leased_until = NULL, updated_at = ? WHERE id = ? AND status = 'sending'",
        [(now, now, push_id) for push_id in push_ids],
    )
    return cur.rowcount


def apply_delivery_report(conn: sqlite3.Connection, msgid: str | int, status: str,
                          oa_openid: str, now: float,
                          create_time: float | None = None) -> tuple[bool, str | None]:
    """Apply a TEMPLATESENDJOBFINISH (Status "success" → delivered, anything else → failed
    with the status text). Returns (a push matched, its new status "delivered" / "failed" when
    this report moved it: None for a repeat, which changes nothing, or an unmatched report).
    A report whose msgid no push has is this msgid's push when, by `create_time` (the
    report's CreateTime), _reported_push finds it among the pushes sent without a known msgid
    (WeChat's duplicate answer to a resend named none); it takes the msgid. Else it is kept
    in delivery_reports and applied by mark_sent: the report can arrive before the send's own
    answer is stored."""
    push_id, new_status = match_delivery_report(conn, msgid, status, oa_openid, now,
                                                create_time)
    return push_id is not None, new_status


def match_delivery_report(conn: sqlite3.Connection, msgid: str | int, status: str,
                          oa_openid: str, now: float, create_time: float | None = None
                          ) -> tuple[str | None, str | None]:
    """apply_delivery_report returning the id of the push matched (None when none did)."""
    key = str(msgid)
    row = conn.execute(
        "SELECT id, status, oa_openid FROM pushes WHERE msgid = ?", (key,)
    ).fetchone()
    if row is None and create_time is not None:
        adopted = _reported_push(conn, oa_openid, create_time, msgid_known=True)
        if adopted is not None:
            conn.execute("UPDATE pushes SET msgid = ? WHERE id = ?", (key, adopted))
            return adopted, _apply_report(conn, adopted, status, now)
    if row is None or row["oa_openid"] != oa_openid:
        conn.execute(
            "INSERT INTO delivery_reports (msgid, status, oa_openid, received_at)"
            " VALUES (?, ?, ?, ?) ON CONFLICT (msgid) DO UPDATE SET status = excluded.status,"
            " oa_openid = excluded.oa_openid, received_at = excluded.received_at",
            (key, status, oa_openid, now),
        )
        return None, None
    if row["status"] == "sent":
        return row["id"], _apply_report(conn, row["id"], status, now)
    return row["id"], None


def apply_delivery_report_by_time(conn: sqlite3.Connection, oa_openid: str, create_time: float,
                                  status: str, now: float,
                                  window_s: float = REPORT_MATCH_WINDOW_S,
                                  skew_s: float = REPORT_CLOCK_SKEW_S) -> tuple[bool, str | None]:
    """apply_delivery_report for a report whose MsgID is 0 or missing: the push it reports is
    the one push to `oa_openid` that is `sent` (no report yet; its msgid known or not) and
    was sent in [create_time - window_s, create_time + skew_s] (_reported_push).

    None or several such pushes → (False, None) and nothing changes: guessing would give a
    push another message's outcome. Such a report stays in the inbox only (delivery_reports
    is keyed by msgid and matched by mark_sent, which a report without one can never be), so
    one that arrives before its push's send answer is stored leaves that push `sent`.
    """
    push_id, new_status = match_delivery_report_by_time(conn, oa_openid, create_time, status,
                                                        now, window_s, skew_s)
    return push_id is not None, new_status


def match_delivery_report_by_time(conn: sqlite3.Connection, oa_openid: str, create_time: float,
                                  status: str, now: float,
                                  window_s: float = REPORT_MATCH_WINDOW_S,
                                  skew_s: float = REPORT_CLOCK_SKEW_S
                                  ) -> tuple[str | None, str | None]:
    """apply_delivery_report_by_time returning the id of the push matched (None when none did)."""
    push_id = _reported_push(conn, oa_openid, create_time, msgid_known=False,
                             window_s=window_s, skew_s=skew_s)
    if push_id is None:
        return None, None
    return push_id, _apply_report(conn, push_id, status, now)


def _reported_push(conn: sqlite3.Connection, oa_openid: str, at: float, *, msgid_known: bool,
                   window_s: float = REPORT_MATCH_WINDOW_S,
                   skew_s: float = REPORT_CLOCK_SKEW_S) -> str | None:
    """The one push to `oa_openid` a delivery report created at `at` can be, matched by
    recipient and time, or None when there is none or more than one (no guessing).

    Its send: some POST of its client_msg_id lies in [at - window_s, at + skew_s] (the first
    at client_msg_id_at, the last at last_attempt_at: a resend may come long after the POST
    WeChat accepted). `msgid_known` False (the report has no MsgID): the `sent` pushes are
    the candidates. True (the report's MsgID is no push's): the pushes WeChat may have
    accepted without wxd learning the msgid (no msgid, POSTed, not refused on their one POST)
    are the candidates, and the one must be `sent` (recorded from a duplicate answer).
    """
    if msgid_known:
        where = ("msgid IS NULL AND client_msg_id_sends > 0 AND status != 'cancelled'"
                 " AND NOT (status = 'failed' AND error_code = 'rejected'"
                 " AND client_msg_id_sends = 1)")
    else:
        where = "status = 'sent'"
    rows = conn.execute(
        f"SELECT id, status FROM pushes WHERE oa_openid = ? AND {where}"  # noqa: S608
        " AND COALESCE(client_msg_id_at, last_attempt_at) <= ? AND last_attempt_at >= ?"
        " ORDER BY last_attempt_at DESC LIMIT 2",
        (oa_openid, at + skew_s, at - window_s),
    ).fetchall()
    if len(rows) != 1 or rows[0]["status"] != "sent":
        return None
    return str(rows[0]["id"])


def prune_reports(conn: sqlite3.Connection, before: float) -> int:
    """Forget unmatched delivery reports received before `before` (reports of other senders)."""
    return conn.execute("DELETE FROM delivery_reports WHERE received_at < ?", (before,)).rowcount


def recover(conn: sqlite3.Connection, now: float, stale_sending: str) -> dict[str, int]:
    """At start every `sending` push is orphaned: back to queued at once (same client_msg_id).
    One whose last attempt is older than WeChat's dedupe window is resent anyway
    (`stale_sending` "resend": may duplicate) or failed with error_code outcome_unknown ("fail")."""
    ids = [str(row[0]) for row in conn.execute("SELECT id FROM pushes WHERE status = 'sending'")]
    return _requeue_sending(conn, ids, now, stale_sending, "wxd stopped during the send")


def requeue_expired(conn: sqlite3.Connection, now: float, stale_sending: str,
                    held: Collection[str] = ()) -> dict[str, int]:
    """recover() for the `sending` pushes whose lease has passed, in a running daemon: the
    outcome of their attempt was never recorded (its write failed, or the sender died). They
    are queued again, due now, keeping their client_msg_id, so WeChat drops the resend if the
    first POST got through (within its 10-minute window; past it `stale_sending` decides).
    `held` are pushes the caller still holds (queued for a sender, being sent, outcome on its
    way): they are left alone however long that takes."""
    ids = [str(row[0]) for row in conn.execute(
        "SELECT id FROM pushes WHERE status = 'sending' AND leased_until <= ?", (now,))
        if row[0] not in held]
    return _requeue_sending(conn, ids, now, stale_sending,
                            "the outcome of the send was never recorded")


def _requeue_sending(conn: sqlite3.Connection, ids: Sequence[str], now: float,
                     stale_sending: str, why: str) -> dict[str, int]:
    stale = failed = requeued = 0
    for push_id in ids:
        row = conn.execute(
            "SELECT last_attempt_at FROM pushes WHERE id = ? AND status = 'sending'", (push_id,)
        ).fetchone()
        if row is None:
            continue
        if row[0] is None or row[0] < now - CLIENT_MSG_ID_WINDOW_S:
            stale += 1
            if stale_sending == "fail":
                failed += conn.execute(
                    "UPDATE pushes SET status = 'failed', error_code = 'outcome_unknown',"
                    " error = ?, leased_until = NULL, finished_at = ?, updated_at = ?"
                    " WHERE id = ?", (f"{why} and WeChat's 10-minute client_msg_id window has"
                                      " passed; whether the message arrived is unknown",
                                      now, now, push_id),
                ).rowcount
                continue
        requeued += conn.execute(
            "UPDATE pushes SET status = 'queued', next_attempt_at = ?, leased_until = NULL,"
            " updated_at = ? WHERE id = ?", (now, now, push_id),
        ).rowcount
    return {"requeued": requeued, "stale": stale, "failed": failed}


def failed_unknown_at(conn: sqlite3.Connection, at: float) -> list[str]:
    """The pushes recover() or requeue_expired() called at `at` failed as outcome_unknown (for
    the callbacks written in the same transaction)."""
    return [str(row[0]) for row in conn.execute(
        "SELECT id FROM pushes WHERE status = 'failed' AND error_code = 'outcome_unknown'"
        " AND finished_at = ?", (at,))]


@dataclass(frozen=True)
class OperatorRetry:
    """What operator_retry did. `outcome` "ok" | "not_found" | "invalid_state"; `status` the
    push's status now (None when not found). For "ok": `client_msg_id_reused` (the retry keeps
    the client_msg_id, so WeChat drops it if an earlier send was accepted) and `warning` (set
    when an earlier send may have been accepted and the retry may deliver the message twice)."""

    outcome: str
    status: str | None
    client_msg_id_reused: bool = False
    warning: str | None = None


PAST_WINDOW_WARNING = (
    "an earlier send of this push may have been accepted by WeChat (its outcome is unknown) and"
    " WeChat's 10-minute client_msg_id window has passed since the first send with {old}: the"
    " retry uses the new client_msg_id {new} and may deliver the message twice")


def operator_retry(conn: sqlite3.Connection, push_id: str, now: float) -> OperatorRetry:
    """failed → queued with a fresh attempt budget.

    The client_msg_id is kept while that guards against a double delivery, and replaced by
    `<id>-r<n>` otherwise: kept when it was never POSTed, when its one POST was refused
    (error_code rejected: WeChat accepted nothing), and when an earlier send may have been
    accepted (outcome unknown) but the first POST with it is less than WeChat's 10-minute
    window old (WeChat then drops the retry; wxd records the duplicate answer as sent).
    Replaced when WeChat had accepted the push (msgid known: the retry is meant as a new
    message) and, with a warning, when the send may have been accepted and the window has
    passed (nothing can prevent a second message then).
    """
    row = conn.execute(
        "SELECT status, msgid, client_msg_id, client_msg_id_sends, client_msg_id_at,"
        " error_code FROM pushes WHERE id = ?", (push_id,)
    ).fetchone()
    if row is None:
        return OperatorRetry("not_found", None)
    if row["status"] != "failed":
        return OperatorRetry("invalid_state", row["status"])
    client_msg_id = row["client_msg_id"]
    sends = row["client_msg_id_sends"]
    maybe_accepted = row["msgid"] is None and sends > 0 and not (
        sends == 1 and row["error_code"] == "rejected")
    first_at = row["client_msg_id_at"]
    past_window = first_at is None or now - first_at >= CLIENT_MSG_ID_WINDOW_S
    warning = None
    if row["msgid"] is not None or (maybe_accepted and past_window):
        suffix = client_msg_id[len(push_id):].removeprefix("-r")  # "" or the retry number
        client_msg_id = f"{push_id}-r{int(suffix or 0) + 1}"
        if row["msgid"] is None:
            warning = PAST_WINDOW_WARNING.format(old=row["client_msg_id"], new=client_msg_id)
    reused = client_msg_id == row["client_msg_id"]
    conn.execute(
        "UPDATE pushes SET status = 'queued', attempts = 0, next_attempt_at = ?, msgid = NULL,"
        " errcode = NULL, error_code = NULL, error = NULL, sent_at = NULL, finished_at = NULL,"
        " client_msg_id = ?, client_msg_id_sends = CASE WHEN ? THEN client_msg_id_sends ELSE 0"
        " END, client_msg_id_at = CASE WHEN ? THEN client_msg_id_at END, updated_at = ?"
        " WHERE id = ?",
        (now, client_msg_id, reused, reused, now, push_id),
    )
    return OperatorRetry("ok", "queued", reused, warning)


def cancel(conn: sqlite3.Connection, push_id: str, now: float) -> tuple[str, str | None]:
    """queued (also a retry waiting) → cancelled. ("ok" | "not_found" | "invalid_state", the
    status now or None)."""
    row = conn.execute("SELECT status FROM pushes WHERE id = ?", (push_id,)).fetchone()
    if row is None:
        return "not_found", None
    if row["status"] != "queued":
        return "invalid_state", row["status"]
    conn.execute(
        "UPDATE pushes SET status = 'cancelled', finished_at = ?, updated_at = ? WHERE id = ?",
        (now, now, push_id),
    )
    return "ok", "cancelled"


def list_pushes(conn: sqlite3.Connection, status: str | None, limit: int,
                cursor: str | None = None) -> tuple[list[dict[str, Any]], str | None]:
    """Newest first; returns (pushes, next cursor or None). ValueError on a bad cursor."""
    return paging.page(conn, "pushes", {"status": status}, limit, cursor, row_json)


def load_pause(conn: sqlite3.Connection) -> meta.Paused | None:
    """The persisted sending pause, or None (a pause stored by an older wxd is a 45009 one)."""
    pause = meta.load_pause(conn, PAUSE_KEY)
    if pause is None:
        legacy = meta.get(conn, _LEGACY_PAUSE_KEY)
        if legacy is not None:
            until = float(legacy)
            pause = meta.Paused("quota", until, until, 45009)
    return pause


def save_pause(conn: sqlite3.Connection, pause: meta.Paused | None) -> None:
    """Persist the sending pause; None lifts it."""
    meta.delete(conn, _LEGACY_PAUSE_KEY)
    meta.save_pause(conn, PAUSE_KEY, pause)


def paused_until(conn: sqlite3.Connection) -> float | None:
    """When sending is tried again after the persisted pause (unix seconds), or None."""
    pause = load_pause(conn)
    return pause.until if pause is not None else None


def queue_depth(conn: sqlite3.Connection) -> tuple[int, float | None]:
    """(queued pushes, created_at of the oldest queued one or None)."""
    depth = conn.execute("SELECT COUNT(*) FROM pushes WHERE status = 'queued'").fetchone()[0]
    row = conn.execute(
        "SELECT created_at FROM pushes WHERE status = 'queued' ORDER BY seq LIMIT 1"
    ).fetchone()
    return int(depth), (float(row[0]) if row is not None else None)


def push_stats(conn: sqlite3.Connection) -> dict[str, Any]:
    """For /v1/stats: {"by_status": {status: count, ...}, "total", "paused_until", "paused"}:
    `paused` is the pause's meta.Paused.document() or None, `paused_until` when sending is
    tried again (for an "unreachable" pause: the next probe)."""
    counts = dict.fromkeys(STATUSES, 0)
    for status, count in conn.execute("SELECT status, COUNT(*) FROM pushes GROUP BY status"):
        counts[status] = count
    pause = load_pause(conn)
    return {"by_status": counts, "total": sum(counts.values()),
            "paused_until": pause.until if pause is not None else None,
            "paused": pause.document() if pause is not None else None}


# Send outcomes -------------------------------------------------------------------------------

Outcome = Callable[[sqlite3.Connection], str]  # records one send's result; returns the new status


def apply_outcomes(conn: sqlite3.Connection, outcomes: Sequence[Outcome]) -> list[str]:
    """The batch function of db.write_many for send outcomes: apply each in the caller's
    transaction, return the new statuses in order. A failing one raises: write_many then applies
    each outcome on its own, so only that push stays `sending` (until its lease passes: then
    requeue_expired queues it again)."""
    return [outcome(conn) for outcome in outcomes]


def noted(changed: bool | int, status: str) -> str:
    """The status a write moved a push to, or "" when it changed nothing (for metrics)."""
    return status if changed else ""
