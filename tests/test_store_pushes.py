"""wxd.store.pushes: the push state machine, one contract suite on :memory: and on a file DB."""

from __future__ import annotations

import pathlib
import sqlite3
from collections.abc import Iterator

import pytest

from wxd.store import meta, paging
from wxd.store import pushes as push_store
from wxd.store.db import migrate
from wxd.store.meta import Paused
from wxd.store.schema import MIGRATIONS

NOW = 1_700_000_000.0


@pytest.fixture(params=["memory", "file"])
def conn(request: pytest.FixtureRequest, tmp_path: pathlib.Path) -> Iterator[sqlite3.Connection]:
    path = ":memory:" if request.param == "memory" else str(tmp_path / "q.db")
    connection = sqlite3.connect(path, isolation_level=None)
    connection.row_factory = sqlite3.Row
    migrate(connection)
    yield connection
    connection.close()


def add(conn: sqlite3.Connection, n: int = 1, *, key: str | None = None, now: float = NOW,
        openid: str = "oA") -> list[str]:
    ids = []
    for _ in range(n):
        push_id = push_store.new_push_id()
        push_store.insert(conn, push_store.NewPush(
            push_id, key, {"unionid": "u1"}, openid, "T1",
            {"touser": openid, "template_id": "T1", "data": {"k": {"value": "中文"}}}), now)
        ids.append(push_id)
    return ids


def report(conn: sqlite3.Connection, msgid: str | int, status: str, oa_openid: str,
           now: float) -> bool:
    """Apply a delivery report; True if it matched a push."""
    return push_store.apply_delivery_report(conn, msgid, status, oa_openid, now)[0]


def retry(conn: sqlite3.Connection, push_id: str, now: float) -> tuple[str, str | None]:
    """An operator retry: (outcome, status now)."""
    retried = push_store.operator_retry(conn, push_id, now)
    return retried.outcome, retried.status


def status(conn: sqlite3.Connection, push_id: str) -> str:
    push = push_store.get(conn, push_id)
    assert push is not None
    return str(push["status"])


def test_push_ids_fit_client_msg_id() -> None:
    ids = {push_store.new_push_id() for _ in range(1000)}
    assert len(ids) == 1000
    for push_id in ids:
        assert len(push_id) == 22 and push_id.startswith("p_")
        assert all(c.isalnum() or c in "-_" for c in push_id)


def test_insert_and_get(conn: sqlite3.Connection) -> None:
    [push_id] = add(conn, key="order-1")
    push = push_store.get(conn, push_id)
    assert push is not None
    assert push["status"] == "queued" and push["attempts"] == 0
    assert push["to"] == {"unionid": "u1"} and push["oa_openid"] == "oA"
    assert push["next_attempt_at"] == NOW and push["client_msg_id"] == push_id
    assert push_store.by_idempotency_key(conn, "order-1") == push
    assert push_store.get(conn, "p_missing") is None
    with pytest.raises(sqlite3.IntegrityError):
        add(conn, key="order-1")


def test_lease_records_the_attempt_and_body_carries_client_msg_id(conn: sqlite3.Connection) -> None:
    ids = add(conn, 3)
    leased = push_store.lease(conn, NOW + 1, 2, 60)
    assert len(leased) == 2
    for item in leased:
        assert item.attempts == 1
        body = item.wechat_body()
        assert body["client_msg_id"] == item.id and body["data"]["k"]["value"] == "中文"
        push = push_store.get(conn, item.id)
        assert push is not None
        assert push["status"] == "sending" and push["last_attempt_at"] == NOW + 1
    rest = push_store.lease(conn, NOW + 1, 10, 60)
    assert [r.id for r in rest] == [i for i in ids if i not in {x.id for x in leased}]
    assert push_store.lease(conn, NOW + 1, 10, 60) == []


def test_lease_only_due(conn: sqlite3.Connection) -> None:
    [push_id] = add(conn)
    assert len(push_store.lease(conn, NOW, 1, 60)) == 1
    assert push_store.mark_retry(conn, push_id, NOW, NOW + 30, -1, "wechat_error", "system error")
    push = push_store.get(conn, push_id)
    assert push is not None
    assert push["status"] == "queued" and push["attempts"] == 1 and push["errcode"] == -1
    assert push["next_attempt_at"] == NOW + 30
    assert push_store.next_due(conn) == NOW + 30
    assert push_store.lease(conn, NOW + 29, 5, 60) == []
    [again] = push_store.lease(conn, NOW + 30, 5, 60)
    assert again.attempts == 2


def test_sent_then_report(conn: sqlite3.Connection) -> None:
    a, b = add(conn, 2)
    push_store.lease(conn, NOW, 2, 60)
    assert push_store.mark_sent(conn, a, "1001", NOW + 1) == "sent"
    assert push_store.mark_sent(conn, b, "1002", NOW + 1) == "sent"
    assert push_store.mark_sent(conn, b, "1002", NOW + 1) == ""  # no longer sending
    assert report(conn, 1001, "success", "oA", NOW + 2)
    assert report(conn, "1002", "failed:user block", "oA", NOW + 2)
    assert status(conn, a) == "delivered"
    failed = push_store.get(conn, b)
    assert failed is not None
    assert failed["status"] == "failed" and failed["error"] == "failed:user block"
    assert failed["error_code"] == "delivery_failed" and failed["msgid"] == "1002"
    # A repeated report matches and changes nothing.
    assert report(conn, "1001", "failed: system failed", "oA", NOW + 3)
    assert status(conn, a) == "delivered"


def test_report_before_send_answer_is_applied_at_mark_sent(conn: sqlite3.Connection) -> None:
    [push_id] = add(conn)
    push_store.lease(conn, NOW, 1, 60)
    assert not report(conn, "2001", "success", "oA", NOW + 1)
    assert push_store.mark_sent(conn, push_id, "2001", NOW + 2) == "delivered"
    assert status(conn, push_id) == "delivered"
    assert conn.execute("SELECT COUNT(*) FROM delivery_reports").fetchone()[0] == 0


def test_early_report_for_another_openid_does_not_apply(conn: sqlite3.Connection) -> None:
    [push_id] = add(conn)
    push_store.lease(conn, NOW, 1, 60)
    assert not report(conn, "3001", "success", "oSomeoneElse", NOW)
    assert push_store.mark_sent(conn, push_id, "3001", NOW) == "sent"


def sent_at(conn: sqlite3.Connection, at: float, msgid: str, openid: str = "oA") -> str:
    """A push to `openid` whose send (POST) started at `at` and was accepted with `msgid`."""
    [push_id] = add(conn, now=at, openid=openid)
    push_store.lease(conn, at, 1, 60)
    assert push_store.mark_sent(conn, push_id, msgid, at + 1) == "sent"
    return push_id


def test_report_without_msgid_matches_the_one_push_sent_before_it(
        conn: sqlite3.Connection) -> None:
    old = sent_at(conn, NOW - 7200, "5000")  # beyond the window: never a candidate
    other = sent_at(conn, NOW - 30, "5001", openid="oB")  # another recipient
    mine = sent_at(conn, NOW - 20, "5002")
    later = NOW + 600
    assert push_store.apply_delivery_report_by_time(conn, "oA", NOW, "success", later) == \
        (True, "delivered")
    assert (status(conn, mine), status(conn, old), status(conn, other)) == \
        ("delivered", "sent", "sent")
    # The same report again (a WeChat retry that escaped the inbox dedupe): no candidate left.
    assert push_store.apply_delivery_report_by_time(conn, "oA", NOW, "success", later) == \
        (False, None)
    failed = sent_at(conn, NOW + 100, "5003", openid="oB")
    # Two sent pushes to oB (5001, 5003) could be the one reported: neither changes ...
    assert push_store.apply_delivery_report_by_time(
        conn, "oB", NOW + 90, "failed:user block", later) == (False, None)
    assert (status(conn, other), status(conn, failed)) == ("sent", "sent")
    # ... until 5001's own report came. Then 5003 matches although the report's CreateTime is
    # 10 s before our send time: WeChat's clock may be a little behind ours.
    assert push_store.apply_delivery_report(conn, "5001", "success", "oB", later)[0]
    assert push_store.apply_delivery_report_by_time(
        conn, "oB", NOW + 90, "failed:user block", later) == (True, "failed")
    assert status(conn, failed) == "failed"
    assert conn.execute("SELECT COUNT(*) FROM delivery_reports").fetchone()[0] == 0


def test_report_without_msgid_is_not_guessed(conn: sqlite3.Connection) -> None:
    first = sent_at(conn, NOW - 50, "6001")
    second = sent_at(conn, NOW - 10, "6002")
    # Two sent pushes could be the one reported: neither is changed.
    assert push_store.apply_delivery_report_by_time(conn, "oA", NOW, "success", NOW) == \
        (False, None)
    # Too old: the only sent push is more than an hour before the report.
    lonely = sent_at(conn, NOW, "6003", openid="oC")
    assert push_store.apply_delivery_report_by_time(
        conn, "oC", NOW + push_store.REPORT_MATCH_WINDOW_S + 1, "success", NOW) == (False, None)
    # A report from before the send (beyond the clock skew) is not this push's.
    assert push_store.apply_delivery_report_by_time(
        conn, "oC", NOW - push_store.REPORT_CLOCK_SKEW_S - 1, "success", NOW) == (False, None)
    assert {status(conn, p) for p in (first, second, lonely)} == {"sent"}
    assert conn.execute("SELECT COUNT(*) FROM delivery_reports").fetchone()[0] == 0


def test_unmatched_reports_are_pruned(conn: sqlite3.Connection) -> None:
    report(conn, "1", "success", "o", NOW)
    report(conn, "2", "success", "o", NOW + 100)
    assert push_store.prune_reports(conn, NOW + 50) == 1


def test_failed_and_release(conn: sqlite3.Connection) -> None:
    a, b, c = add(conn, 3)
    push_store.lease(conn, NOW, 3, 60)
    assert push_store.mark_failed(conn, a, NOW, 43004, "rejected", "require subscribe")
    assert not push_store.mark_failed(conn, a, NOW, 43004, "rejected", "again")
    assert push_store.release(conn, [b], NOW, refund=True) == 1
    assert push_store.release(conn, [c], NOW, refund=False) == 1
    pa, pb, pc = (push_store.get(conn, x) for x in (a, b, c))
    assert pa is not None and pb is not None and pc is not None
    assert (pa["status"], pa["errcode"], pa["error"]) == ("failed", 43004, "require subscribe")
    assert (pb["status"], pb["attempts"]) == ("queued", 0)
    assert (pc["status"], pc["attempts"]) == ("queued", 1)


@pytest.mark.parametrize("policy", ["resend", "fail"])
def test_recover(conn: sqlite3.Connection, policy: str) -> None:
    fresh, stale, queued = add(conn, 3)
    conn.execute("UPDATE pushes SET status='sending', attempts=1, last_attempt_at=? WHERE id=?",
                 (NOW - 60, fresh))
    conn.execute("UPDATE pushes SET status='sending', attempts=1, last_attempt_at=? WHERE id=?",
                 (NOW - 601, stale))
    counts = push_store.recover(conn, NOW, policy)
    assert counts["stale"] == 1
    assert status(conn, fresh) == "queued" and status(conn, queued) == "queued"
    pushed = push_store.get(conn, fresh)
    assert pushed is not None and pushed["client_msg_id"] == fresh and pushed["attempts"] == 1
    if policy == "resend":
        assert counts == {"requeued": 2, "stale": 1, "failed": 0}
        assert status(conn, stale) == "queued"
    else:
        assert counts == {"requeued": 1, "stale": 1, "failed": 1}
        held = push_store.get(conn, stale)
        assert held is not None
        assert (held["status"], held["error_code"]) == ("failed", "outcome_unknown")


def test_expired_leases_are_taken_again_unless_held(conn: sqlite3.Connection) -> None:
    held, lost, fresh = add(conn, 3)
    push_store.lease(conn, NOW, 2, 60)  # held and lost: sending until NOW + 60
    assert push_store.requeue_expired(conn, NOW + 59, "resend", held={held}) == \
        {"requeued": 0, "stale": 0, "failed": 0}  # no lease has passed yet
    assert push_store.next_wake(conn, NOW + 59) == NOW  # `fresh` is due
    assert [p.id for p in push_store.lease(conn, NOW + 59, 10, 60)] == [fresh]
    assert push_store.next_wake(conn, NOW + 59) == NOW + 60  # then the first leases end
    # The outcome of `lost` was never recorded (its write failed); `held` is still being sent.
    assert push_store.requeue_expired(conn, NOW + 61, "resend", held={held}) == \
        {"requeued": 1, "stale": 0, "failed": 0}
    leased = push_store.lease(conn, NOW + 61, 10, 60)
    assert [(p.id, p.attempts, p.client_msg_id) for p in leased] == [(lost, 2, lost)]
    assert status(conn, held) == "sending"
    # Past WeChat's 10-minute window the stale_sending policy decides, as at start.
    later = NOW + 61 + push_store.CLIENT_MSG_ID_WINDOW_S + 60
    assert push_store.requeue_expired(conn, later, "fail", held={fresh}) == \
        {"requeued": 0, "stale": 2, "failed": 2}
    for push_id in (held, lost):
        push = push_store.get(conn, push_id)
        assert push is not None
        assert (push["status"], push["error_code"]) == ("failed", "outcome_unknown")
        assert "never recorded" in push["error"]
    assert status(conn, fresh) == "sending"  # its lease has passed too, but it is held
    assert push_store.next_wake(conn, later) is None  # a lease end already past: no wake-up
    assert push_store.requeue_expired(conn, later + 1, "resend") == \
        {"requeued": 1, "stale": 1, "failed": 0}
    assert status(conn, fresh) == "queued"


def test_operator_retry_and_cancel(conn: sqlite3.Connection) -> None:
    a, b, c = add(conn, 3)
    assert retry(conn, a, NOW) == ("invalid_state", "queued")
    assert push_store.cancel(conn, a, NOW) == ("ok", "cancelled")
    assert push_store.cancel(conn, a, NOW) == ("invalid_state", "cancelled")
    assert push_store.cancel(conn, "p_nope", NOW) == ("not_found", None)
    assert push_store.lease(conn, NOW, 5, 60) and status(conn, a) == "cancelled"
    push_store.mark_failed(conn, b, NOW, 47003, "rejected", "argument invalid!")
    assert push_store.cancel(conn, b, NOW) == ("invalid_state", "failed")
    assert retry(conn, b, NOW + 5) == ("ok", "queued")
    retried = push_store.get(conn, b)
    assert retried is not None
    assert (retried["attempts"], retried["errcode"], retried["client_msg_id"]) == (0, None, b)
    # Accepted by WeChat, then delivery failed: a retry needs a new client_msg_id.
    push_store.mark_sent(conn, c, "77", NOW)
    report(conn, "77", "failed: system failed", "oA", NOW)
    assert retry(conn, c, NOW) == ("ok", "queued")
    leased = {item.id: item for item in push_store.lease(conn, NOW + 10, 5, 60)}
    assert leased[c].wechat_body()["client_msg_id"] == f"{c}-r1"
    redo = push_store.get(conn, c)
    assert redo is not None and redo["client_msg_id"] == f"{c}-r1" and redo["msgid"] is None
    assert len(redo["client_msg_id"]) <= 32


def test_list_newest_first_with_cursor(conn: sqlite3.Connection) -> None:
    ids = add(conn, 7)
    push_store.cancel(conn, ids[0], NOW)
    page, cursor = push_store.list_pushes(conn, None, 3)
    assert [p["id"] for p in page] == ids[::-1][:3] and cursor
    page2, cursor2 = push_store.list_pushes(conn, None, 3, cursor)
    assert [p["id"] for p in page2] == ids[::-1][3:6] and cursor2
    page3, cursor3 = push_store.list_pushes(conn, None, 3, cursor2)
    assert [p["id"] for p in page3] == [ids[0]] and cursor3 is None
    cancelled, _ = push_store.list_pushes(conn, "cancelled", 10)
    assert [p["id"] for p in cancelled] == [ids[0]]
    for bad in ("", "zzz", "eDE", "!!", "cy0x"):
        with pytest.raises(ValueError):
            paging.decode_cursor(bad)


def test_pause_and_stats(conn: sqlite3.Connection) -> None:
    assert push_store.paused_until(conn) is None and push_store.load_pause(conn) is None
    push_store.save_pause(conn, Paused("quota", NOW, NOW + 3600.5, 45009))
    assert push_store.paused_until(conn) == NOW + 3600.5
    ids = add(conn, 3)
    push_store.cancel(conn, ids[0], NOW)
    conn.execute("UPDATE pushes SET created_at = ? WHERE id = ?", (NOW - 50, ids[1]))
    stats = push_store.push_stats(conn)
    assert stats["by_status"] == {"queued": 2, "sending": 0, "sent": 0, "delivered": 0,
                                  "failed": 0, "cancelled": 1}
    assert stats["total"] == 3 and stats["paused_until"] == NOW + 3600.5
    assert stats["paused"] == {"reason": "quota", "errcode": 45009, "since": NOW,
                               "until": NOW + 3600.5}
    assert push_store.queue_depth(conn) == (2, NOW - 50)
    push_store.save_pause(conn, None)
    assert push_store.paused_until(conn) is None
    assert push_store.push_stats(conn)["paused"] is None


def test_unreachable_pause_and_a_pause_stored_by_an_older_wxd(conn: sqlite3.Connection) -> None:
    push_store.save_pause(conn, Paused("unreachable", NOW, NOW + 5, 40164, "1.2.3.4"))
    assert push_store.load_pause(conn) == Paused("unreachable", NOW, NOW + 5, 40164, "1.2.3.4")
    # No "until" for WeChat unreachable: it ends when WeChat answers (paused_until: next probe).
    assert push_store.push_stats(conn)["paused"] == {
        "reason": "unreachable", "errcode": 40164, "since": NOW, "ip": "1.2.3.4"}
    assert push_store.push_stats(conn)["paused_until"] == NOW + 5
    push_store.save_pause(conn, None)
    meta.set(conn, "pushes.paused_until", repr(NOW + 60))  # before pauses had reasons
    assert push_store.load_pause(conn) == Paused("quota", NOW + 60, NOW + 60, 45009)
    push_store.save_pause(conn, None)
    assert push_store.load_pause(conn) is None
    meta.set(conn, "pushes.pause", "{not json")
    assert push_store.load_pause(conn) is None


def sends_of(conn: sqlite3.Connection, push_id: str) -> tuple[int, float | None]:
    row = conn.execute("SELECT client_msg_id_sends, client_msg_id_at FROM pushes WHERE id = ?",
                       (push_id,)).fetchone()
    return row[0], row[1]


def test_a_lease_says_whether_the_client_msg_id_was_posted_before(
        conn: sqlite3.Connection) -> None:
    [push_id] = add(conn)
    [item] = push_store.lease(conn, NOW, 1, 60)
    assert not item.resend and sends_of(conn, push_id) == (1, NOW)
    push_store.release(conn, [push_id], NOW, refund=True)  # never POSTed: given back
    assert sends_of(conn, push_id) == (0, None)
    [item] = push_store.lease(conn, NOW + 1, 1, 60)
    assert not item.resend and sends_of(conn, push_id) == (1, NOW + 1)
    push_store.mark_retry(conn, push_id, NOW + 1, NOW + 2, -1, "wechat_error", "system error")
    [item] = push_store.lease(conn, NOW + 2, 1, 60)
    assert item.resend and sends_of(conn, push_id) == (2, NOW + 1)
    push_store.recover(conn, NOW + 3, "resend")  # a crash mid-send: the next lease resends
    [item] = push_store.lease(conn, NOW + 3, 1, 60)
    assert item.resend and item.attempts == 3


def test_sent_without_msgid_keeps_the_answer(conn: sqlite3.Connection) -> None:
    a, b = add(conn, 2)
    push_store.lease(conn, NOW, 2, 60)
    assert not report(conn, "4001", "success", "oA", NOW)  # someone's report, kept
    answer = {"errcode": 0, "errmsg": "ok"}
    assert push_store.mark_sent(conn, a, None, NOW + 1, answer) == "sent"
    sent = push_store.get(conn, a)
    assert sent is not None
    assert (sent["status"], sent["msgid"], sent["last_answer"]) == ("sent", None, answer)
    assert conn.execute("SELECT COUNT(*) FROM delivery_reports").fetchone()[0] == 1
    assert push_store.mark_sent(conn, b, "4002", NOW + 1) == "sent"
    plain = push_store.get(conn, b)
    assert plain is not None and plain["last_answer"] is None


def test_last_answer_is_bounded(conn: sqlite3.Connection) -> None:
    [push_id] = add(conn)
    push_store.lease(conn, NOW, 1, 60)
    answer: dict[str, object] = {"errcode": 45065, "errmsg": "x" * 5000,
                                 "nested": {"deep": ["y" * 2000]}}
    answer.update({f"k{i}": i for i in range(40)})
    assert push_store.mark_failed(conn, push_id, NOW, 45065, "rejected", "clientmsgid exist",
                                  answer)
    push = push_store.get(conn, push_id)
    assert push is not None
    kept = push["last_answer"]
    assert len(kept) == push_store.ANSWER_MAX_KEYS and kept["errcode"] == 45065
    assert kept["errmsg"] == "x" * push_store.ANSWER_MAX_CHARS
    assert kept["nested"].startswith('{"deep":["yyy') and len(kept["nested"]) == 512
    text = conn.execute("SELECT last_answer FROM pushes").fetchone()[0]
    assert len(text) < 2 * push_store.ANSWER_MAX_KEYS * push_store.ANSWER_MAX_CHARS


def test_a_43004_fails_the_push_and_unsubscribes_in_one_write(conn: sqlite3.Connection) -> None:
    conn.execute("INSERT INTO followers (oa_openid, subscribed, updated_at) VALUES ('oA', 1, 0)")
    a, b = add(conn, 2)
    push_store.lease(conn, NOW, 2, 60)
    assert push_store.mark_not_following(conn, a, "oA", NOW + 1, NOW, "require subscribe",
                                         {"errcode": 43004, "errmsg": "require subscribe"})
    push = push_store.get(conn, a)
    assert push is not None
    assert (push["status"], push["errcode"], push["error_code"]) == ("failed", 43004, "rejected")
    row = conn.execute("SELECT subscribed, unsubscribed_at FROM followers").fetchone()
    assert (row[0], row[1]) == (0, NOW)
    push_store.mark_failed(conn, b, NOW, -1, "attempts_exhausted", "system error")
    assert not push_store.mark_not_following(conn, b, "oA", NOW + 2, NOW + 2, "late")


def failed_after(conn: sqlite3.Connection, push_id: str, at: float, sends: int,
                 error_code: str) -> None:
    """`push_id` POSTed `sends` times (the first at `at`), then failed with `error_code`."""
    for n in range(sends):
        push_store.lease(conn, at + n, 1, 60)
        if n < sends - 1:
            push_store.mark_retry(conn, push_id, at + n, at + n + 1, -1, "wechat_error", "busy")
    push_store.mark_failed(conn, push_id, at + sends, None, error_code, "the last error")


def test_operator_retry_keeps_the_client_msg_id_only_while_it_guards(
        conn: sqlite3.Connection) -> None:
    [refused] = add(conn)  # each push is added when due alone: failed_after leases it
    failed_after(conn, refused, NOW, 1, "rejected")
    # Refused by WeChat: nothing accepted under the id. Kept, even past the window.
    kept = push_store.operator_retry(conn, refused, NOW + 700)
    assert (kept.outcome, kept.client_msg_id_reused, kept.warning) == ("ok", True, None)
    [unknown] = add(conn)
    failed_after(conn, unknown, NOW, 3, "attempts_exhausted")
    # Maybe accepted, 599 s after the first send: kept, WeChat drops the retry if so.
    kept = push_store.operator_retry(conn, unknown, NOW + 599)
    assert (kept.client_msg_id_reused, kept.warning) == (True, None)
    item = next(i for i in push_store.lease(conn, NOW + 600, 5, 60) if i.id == unknown)
    assert item.resend and item.client_msg_id == unknown
    [late] = add(conn)
    failed_after(conn, late, NOW, 2, "outcome_unknown")
    # Maybe accepted and the window has passed: a new id, and a warning.
    fresh = push_store.operator_retry(conn, late, NOW + 600)
    assert (fresh.client_msg_id_reused, fresh.status) == (False, "queued")
    assert fresh.warning is not None and f"{late}-r1" in fresh.warning
    assert sends_of(conn, late) == (0, None)
    item = next(i for i in push_store.lease(conn, NOW + 601, 5, 60) if i.id == late)
    assert not item.resend and item.client_msg_id == f"{late}-r1"
    push_store.mark_failed(conn, late, NOW + 601, None, "outcome_unknown", "again")
    again = push_store.operator_retry(conn, late, NOW + 1300)
    assert again.warning is not None
    row = push_store.get(conn, late)
    assert row is not None and row["client_msg_id"] == f"{late}-r2"
    # Accepted (msgid known), delivery failed: the retry is a new message, no warning.
    [accepted] = add(conn)
    push_store.lease(conn, NOW, 5, 60)
    push_store.mark_sent(conn, accepted, "5001", NOW)
    report(conn, "5001", "failed:user block", "oA", NOW)
    new = push_store.operator_retry(conn, accepted, NOW + 1)
    assert (new.client_msg_id_reused, new.warning) == (False, None)


def test_operator_retry_of_an_id_with_r_inside(conn: sqlite3.Connection) -> None:
    """A push id is random url-safe text: it may itself contain "-r" (and digits after it)."""
    for push_id in ("p_ab-rcdefghijklmnopqr", "p_ab-r12defghijklmnop"):
        push_store.insert(conn, push_store.NewPush(push_id, None, {"oa_openid": "oA"}, "oA",
                                                   "T1", {"touser": "oA"}), NOW)
        push_store.lease(conn, NOW, 5, 60)
        push_store.mark_sent(conn, push_id, push_id[-4:], NOW)
        report(conn, push_id[-4:], "failed: system failed", "oA", NOW)
        push_store.operator_retry(conn, push_id, NOW + 1)
        row = push_store.get(conn, push_id)
        assert row is not None and row["client_msg_id"] == f"{push_id}-r1"


def test_migration_3_counts_the_sends_of_rows_attempted_before() -> None:
    connection = sqlite3.connect(":memory:", isolation_level=None)
    connection.row_factory = sqlite3.Row
    migrate(connection, MIGRATIONS[:1])
    ids = add(connection, 4)
    connection.execute("UPDATE pushes SET attempts = 2, last_attempt_at = ? WHERE id = ?",
                       (NOW + 5, ids[0]))
    connection.execute("UPDATE pushes SET last_attempt_at = ? WHERE id = ?", (NOW + 5, ids[1]))
    connection.execute("UPDATE pushes SET last_attempt_at = ?, client_msg_id = ? WHERE id = ?",
                       (NOW + 5, ids[2] + "-r1", ids[2]))
    migrate(connection)
    assert [sends_of(connection, i) for i in ids] == [(2, NOW), (1, NOW), (0, None), (0, None)]
    connection.close()


def resent_without_msgid(conn: sqlite3.Connection, at: float, openid: str = "oA") -> str:
    """A push whose first POST (at `at`) lost its answer and whose resend WeChat answered as a
    duplicate without the first msgid: `sent`, msgid unknown."""
    [push_id] = add(conn, now=at, openid=openid)
    push_store.lease(conn, at, 1, 60)
    push_store.mark_retry(conn, push_id, at, at + 5, None, "transport_error", "timed out")
    [item] = push_store.lease(conn, at + 5, 1, 60)
    assert item.resend
    assert push_store.mark_sent(conn, push_id, None, at + 6) == "sent"
    return push_id


def test_reports_of_pushes_sent_without_msgid_match_by_recipient_and_time(
        conn: sqlite3.Connection) -> None:
    known = sent_at(conn, NOW - 40, "7000")
    mine = resent_without_msgid(conn, NOW - 30)
    # A report whose MsgID no push has: not 7000's (it would say 7000), so it is mine's.
    assert push_store.apply_delivery_report(conn, "7001", "success", "oA", NOW, NOW - 29) == \
        (True, "delivered")
    row = push_store.get(conn, mine)
    assert row is not None and (row["status"], row["msgid"]) == ("delivered", "7001")
    assert status(conn, known) == "sent"
    # Without the report's CreateTime, or created before the first POST (beyond the clock
    # skew), it is kept for mark_sent.
    other = resent_without_msgid(conn, NOW, openid="oB")
    assert push_store.apply_delivery_report(conn, "7002", "success", "oB", NOW) == (False, None)
    assert push_store.apply_delivery_report(
        conn, "7003", "success", "oB", NOW, NOW - push_store.REPORT_CLOCK_SKEW_S - 1) == \
        (False, None)
    assert status(conn, other) == "sent"
    # MsgID 0: a push sent without a known msgid is a candidate too.
    assert push_store.apply_delivery_report_by_time(conn, "oB", NOW + 10, "success", NOW) == \
        (True, "delivered")


def test_a_report_is_not_guessed_between_pushes_without_msgid(conn: sqlite3.Connection) -> None:
    a = resent_without_msgid(conn, NOW - 30)
    [refused] = add(conn, now=NOW - 20)  # refused on its one POST: WeChat has no message
    push_store.lease(conn, NOW - 20, 1, 60)
    push_store.mark_failed(conn, refused, NOW - 20, 47003, "rejected", "argument invalid")
    assert push_store.apply_delivery_report(conn, "8001", "success", "oA", NOW, NOW) == \
        (True, "delivered")
    assert status(conn, a) == "delivered"
    b = resent_without_msgid(conn, NOW + 10)
    [waiting] = add(conn, now=NOW + 10)  # its answer was lost too: it may own the report
    push_store.lease(conn, NOW + 10, 1, 60)
    assert push_store.apply_delivery_report(conn, "8002", "success", "oA", NOW, NOW + 12) == \
        (False, None)
    assert status(conn, b) == "sent" and status(conn, waiting) == "sending"


def test_a_report_that_came_first_is_taken_by_the_duplicate_answer(
        conn: sqlite3.Connection) -> None:
    [push_id] = add(conn)
    push_store.lease(conn, NOW, 1, 60)
    push_store.mark_retry(conn, push_id, NOW, NOW + 5, None, "transport_error", "timed out")
    # The first POST's report arrives while the push waits for its resend.
    assert push_store.apply_delivery_report(conn, "9001", "failed:user block", "oA", NOW + 2,
                                            NOW + 1) == (False, None)
    push_store.lease(conn, NOW + 5, 1, 60)
    assert push_store.mark_sent(conn, push_id, None, NOW + 6, {"errcode": 45065}) == "failed"
    row = push_store.get(conn, push_id)
    assert row is not None and (row["msgid"], row["error"]) == ("9001", "failed:user block")
    assert conn.execute("SELECT COUNT(*) FROM delivery_reports").fetchone()[0] == 0
    # Two unmatched reports for the openid: neither is taken.
    [other] = add(conn, now=NOW + 10)
    push_store.lease(conn, NOW + 10, 1, 60)
    push_store.mark_retry(conn, other, NOW + 10, NOW + 15, None, "transport_error", "lost")
    for msgid in ("9002", "9003"):
        push_store.apply_delivery_report(conn, msgid, "success", "oA", NOW + 12, NOW + 11)
    push_store.lease(conn, NOW + 15, 1, 60)
    assert push_store.mark_sent(conn, other, None, NOW + 16) == "sent"
