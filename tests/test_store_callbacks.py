"""The callback outbox's SQL (wxd/store/callbacks.py) on a real SQLite file: per-subject
sequence numbers, ids written once, the attempt records, dead and the operator's retries."""

from __future__ import annotations

import json
import sqlite3

import pytest

from tests.helpers import info_entry, store_message
from wxd.store import callbacks as cb
from wxd.store import inbox, ingest, links, mp_users
from wxd.wechat.messages import parse_message

NOW = 1_700_000_000.0
ALL = cb.Outbox(frozenset(cb.TYPES))


def new(subject: str, kind: str = "push.sent", data: str = "{}",
        follower: bool = False) -> cb.NewCallback:
    return cb.NewCallback(cb.new_id(), kind, subject, data, follower=follower)


def rows(conn: sqlite3.Connection) -> list[sqlite3.Row]:
    return conn.execute("SELECT * FROM callbacks ORDER BY seq").fetchall()


def test_each_subject_counts_on_its_own_and_never_goes_back(conn: sqlite3.Connection) -> None:
    assert cb.emit(conn, [new("a"), new("b"), new("a")], NOW) == 3
    assert cb.emit(conn, [new("a")], NOW + 1) == 1
    assert [(r["subject"], r["subject_seq"]) for r in rows(conn)] == [
        ("a", 1), ("b", 1), ("a", 2), ("a", 3)]
    # Delivered callbacks are pruned; the sequence of their subject carries on.
    conn.execute("UPDATE callbacks SET status = 'done', finished_at = ?", (NOW,))
    assert cb.prune(conn, NOW + 1, NOW + 1) == 4
    cb.emit(conn, [new("a")], NOW + 2)
    assert [(r["subject"], r["subject_seq"]) for r in rows(conn)] == [("a", 4)]


def test_an_id_is_written_once_and_takes_no_number(conn: sqlite3.Connection) -> None:
    first = new("a")
    assert cb.emit(conn, [first], NOW) == 1
    assert cb.emit(conn, [first], NOW + 1) == 0
    assert cb.emit(conn, [new("a")], NOW + 2) == 1
    assert [r["subject_seq"] for r in rows(conn)] == [1, 2]


def test_the_subject_is_the_unionid_of_a_known_follower(conn: sqlite3.Connection) -> None:
    ingest.apply_user_infos(conn, [info_entry("oA", "uA"), info_entry("oB")], NOW, NOW)
    cb.emit(conn, [new("oA", follower=True), new("oB", follower=True), new("oC", follower=True),
                   new("oA"), new("uA", follower=True)], NOW)
    assert [(r["subject"], r["subject_seq"]) for r in rows(conn)] == [
        ("uA", 1), ("oB", 1), ("oC", 1), ("oA", 1), ("uA", 2)]


def test_body_is_the_same_bytes_on_every_attempt(conn: sqlite3.Connection) -> None:
    cb.emit(conn, [cb.NewCallback("evt_x", "push.sent", "p_1", '{"id":"p_1","k":"值"}')], NOW)
    first = cb.lease(conn, NOW, 10, 60)[0]
    cb.release(conn, [first.id], NOW, refund=False)
    second = cb.lease(conn, NOW, 10, 60)[0]
    assert first.body() == second.body()
    assert second.attempts == 2
    assert json.loads(first.body()) == {"id": "evt_x", "type": "push.sent",
                                        "created_at": int(NOW), "subject": "p_1", "seq": 1,
                                        "data": {"id": "p_1", "k": "值"}}


def test_a_lease_is_an_attempt_until_its_end(conn: sqlite3.Connection) -> None:
    cb.emit(conn, [new("a"), new("b")], NOW)
    leased = cb.lease(conn, NOW, 1, 60)
    assert len(leased) == 1 and leased[0].attempts == 1
    assert cb.next_due(conn) == NOW  # the other one
    assert len(cb.lease(conn, NOW, 10, 60)) == 1
    assert cb.lease(conn, NOW + 59, 10, 60) == []
    assert cb.next_due(conn) == NOW + 60
    # A lease that ran out (its outcome was never written) is taken again, as another attempt.
    again = cb.lease(conn, NOW + 60, 10, 60)
    assert sorted(item.attempts for item in again) == [2, 2]
    # At start every lease is a previous process's: due now.
    assert cb.recover(conn, NOW + 61) == 2
    assert len(cb.lease(conn, NOW + 61, 10, 60)) == 2


def test_outcomes_in_one_statement(conn: sqlite3.Connection) -> None:
    cb.emit(conn, [new("a"), new("b"), new("c")], NOW)
    a, b, c = cb.lease(conn, NOW, 10, 60)
    outcomes = [cb.Outcome(a.id, a.attempts, "done", NOW + 1, http_status=204, answer="ok"),
                cb.Outcome(b.id, b.attempts, "pending", NOW + 1, due=NOW + 5, http_status=500,
                           error="HTTP 500", answer="x" * 999),
                cb.Outcome(c.id, c.attempts, "dead", NOW + 1, error="connect failed")]
    assert cb.record(conn, outcomes) == ["done", "pending", "dead"]
    assert cb.counts(conn) == {"pending": 1, "done": 1, "dead": 1}
    shown = cb.get(conn, b.id)
    assert shown is not None
    assert (shown["last_status"], shown["last_error"], shown["next_attempt_at"]) == (
        500, "HTTP 500", NOW + 5)
    assert len(shown["last_answer"]) == cb.ANSWER_EXCERPT_CHARS
    # Recorded twice (a late duplicate of the write): nothing changes.
    assert cb.record(conn, outcomes) == ["", "", ""]


def test_a_late_failure_does_not_undo_a_newer_attempt(conn: sqlite3.Connection) -> None:
    cb.emit(conn, [new("a")], NOW)
    old = cb.lease(conn, NOW, 1, 10)[0]
    newer = cb.lease(conn, NOW + 10, 1, 10)[0]  # the first lease ran out
    assert cb.record(conn, [cb.Outcome(old.id, old.attempts, "dead", NOW + 11)]) == [""]
    # A success counts whichever attempt it answers.
    assert cb.record(conn, [cb.Outcome(old.id, old.attempts, "done", NOW + 12)]) == ["done"]
    assert cb.record(conn, [cb.Outcome(newer.id, newer.attempts, "pending", NOW + 13,
                                       due=NOW + 20)]) == [""]


def test_operator_retries_revive_dead_callbacks_with_a_fresh_window(
        conn: sqlite3.Connection) -> None:
    cb.emit(conn, [new("a"), new("b"), new("c")], NOW)
    a, b, c = cb.lease(conn, NOW, 10, 60)
    cb.record(conn, [cb.Outcome(a.id, 1, "dead", NOW + 100), cb.Outcome(b.id, 1, "dead", NOW + 200),
                     cb.Outcome(c.id, 1, "done", NOW + 1)])
    assert cb.operator_retry(conn, c.id, NOW + 300) == ("invalid_state", "done")
    assert cb.operator_retry(conn, "evt_nope", NOW + 300) == ("not_found", None)
    assert cb.operator_retry(conn, a.id, NOW + 300) == ("ok", "pending")
    shown = cb.get(conn, a.id)
    assert shown is not None
    assert (shown["status"], shown["attempts"], shown["retry_since"], shown["finished_at"]) == (
        "pending", 0, NOW + 300, None)
    assert cb.retry_dead(conn, NOW + 201, NOW + 300) == 0
    assert cb.retry_dead(conn, NOW + 150, NOW + 300) == 1
    assert cb.counts(conn) == {"pending": 2, "done": 1, "dead": 0}


def test_list_filters_and_pages_newest_first(conn: sqlite3.Connection) -> None:
    cb.emit(conn, [new(f"s{i}", "push.sent" if i % 2 else "push.failed") for i in range(5)], NOW)
    page, cursor = cb.list_callbacks(conn, "pending", "push.sent", 1)
    assert [c["subject"] for c in page] == ["s3"] and cursor is not None
    page, cursor = cb.list_callbacks(conn, None, "push.sent", 5, cursor)
    assert [c["subject"] for c in page] == ["s1"] and cursor is None
    assert cb.list_callbacks(conn, "dead", None, 5) == ([], None)
    with pytest.raises(ValueError):
        cb.list_callbacks(conn, None, None, 5, "garbage")


def test_the_outbox_writes_only_the_types_it_wants(conn: sqlite3.Connection) -> None:
    cb.OFF.emit(conn, [new("a")], NOW)
    only = cb.Outbox(frozenset({"push.failed"}))
    only.emit(conn, [new("a", "push.sent"), new("a", "push.failed")], NOW)
    assert [r["type"] for r in rows(conn)] == ["push.failed"]
    rung: list[int] = []
    ringing = cb.Outbox(frozenset({"push.sent"}), notify=lambda: rung.append(1))
    ringing.emit(conn, [new("a", "push.failed")], NOW)
    assert rung == []
    ringing.emit(conn, [new("a", "push.sent")], NOW)
    assert rung == [1]


def test_link_and_follower_callbacks_read_the_rows_of_their_transaction(
        conn: sqlite3.Connection) -> None:
    ingest.apply_user_infos(conn, [info_entry("oA", "uA", qr_scene_str="promo")], NOW, NOW)
    assert mp_users.upsert(conn, "mA", "uA", "key", NOW + 1)
    assert ALL.linked(conn, ["uA"], "unionid", NOW + 1) == 1
    assert ALL.linked(conn, ["uA"], "unionid", NOW + 2) == 0  # the same link: one callback
    assert ALL.follower(conn, "follower.subscribed", "oA", "evt:oA:1:subscribe", NOW) == 1
    assert ALL.follower(conn, "follower.subscribed", "oA", "evt:oA:1:subscribe", NOW) == 0
    linked, subscribed = (json.loads(r["data"]) for r in rows(conn))
    assert linked == {"mp_openid": "mA", "oa_openid": "oA", "unionid": "uA",
                      "source": "unionid", "linked_at": NOW + 1}
    assert subscribed["scene"] == "promo" and subscribed["unionid"] == "uA"
    assert [r["subject"] for r in rows(conn)] == ["uA", "uA"]


def test_the_inbox_relays_what_no_other_type_reports(conn: sqlite3.Connection) -> None:
    def message(**fields: str) -> inbox.Prepared:
        base = {"ToUserName": "gh_1", "FromUserName": "oA", "CreateTime": "1700000000"}
        return inbox.prepare(parse_message({**base, **fields}), NOW, relay=True)

    text = message(MsgType="text", Content="hi", MsgId="42")
    scan = message(MsgType="event", Event="scancode_push", EventKey="k",
                   ScanCodeInfo='{"ScanResult":"1","ScanType":"qrcode"}')
    follow = message(MsgType="event", Event="subscribe", EventKey="")
    report = message(MsgType="event", Event="TEMPLATESENDJOBFINISH", MsgID="7", Status="success")
    assert inbox.store_prepared(conn, [text, scan, follow, report, text]) == [
        True, True, True, True, False]
    relayed = rows(conn)
    assert [r["type"] for r in relayed] == ["message.received"] * 2
    data = json.loads(relayed[1]["data"])
    assert data["fields"]["ScanCodeInfo"] == {"ScanResult": "1", "ScanType": "qrcode"}
    assert (data["msg_type"], data["event"], data["oa_openid"]) == ("event", "scancode_push", "oA")
    # Without relay (callbacks off, or not wanted) nothing but the inbox row is written.
    store_message(conn, parse_message({"ToUserName": "gh_1", "FromUserName": "oA",
                                       "CreateTime": "1", "MsgType": "image", "MsgId": "43",
                                       "MediaId": "m"}), NOW)
    assert len(rows(conn)) == 2


def test_an_oversized_data_object_is_cut(conn: sqlite3.Connection) -> None:
    text = cb.encode_data({"oa_openid": "oA", "fields": {"Content": "x" * cb.MAX_DATA_BYTES}})
    assert json.loads(text) == {"oa_openid": "oA", "truncated": True}


def test_explicit_links_write_their_callbacks_in_bind_and_unbind(conn: sqlite3.Connection) -> None:
    ingest.apply_user_infos(conn, [info_entry("oA", "uA"), info_entry("oB")], NOW, NOW)
    assert links.bind(conn, "mX", "oB", "qrcode", NOW, outbox=ALL).outcome == "linked"
    assert links.bind(conn, "mX", "oB", "qrcode", NOW + 1, outbox=ALL).outcome == "unchanged"
    # The same MP user linked to another follower: the older link is replaced.
    assert links.bind(conn, "mX", "oA", "oauth", NOW + 2, outbox=ALL).outcome == "linked"
    assert links.unbind(conn, "mX", NOW + 3, outbox=ALL) is not None
    assert links.unbind(conn, "mX", NOW + 4, outbox=ALL) is None
    got = [(r["type"], r["subject"], json.loads(r["data"])) for r in rows(conn)]
    assert [(kind, subject, data["oa_openid"], data["source"], data.get("reason"))
            for kind, subject, data in got] == [
        ("user.linked", "oB", "oB", "qrcode", None),
        ("user.unlinked", "oB", "oB", "qrcode", "replaced"),
        ("user.linked", "uA", "oA", "oauth", None),
        ("user.unlinked", "uA", "oA", "oauth", "removed")]
    assert got[3][2]["unlinked_at"] == NOW + 3 and got[2][2]["unionid"] == "uA"
    # Off (the default outbox) nothing is written; with one, unbind needs its time.
    links.bind(conn, "mY", "oB", "qrcode", NOW)
    assert len(rows(conn)) == 4
    with pytest.raises(ValueError):
        links.unbind(conn, "mY", outbox=ALL)
