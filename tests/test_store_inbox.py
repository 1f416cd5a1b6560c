"""wxd.store.inbox: dedupe by WeChat's keys, message + event job in one transaction, pruning."""

from __future__ import annotations

import json
import sqlite3

from tests.helpers import count_rows, store_message
from wxd.store import inbox, jobs
from wxd.wechat.messages import Message, TemplateSendJobFinish, parse_message

T0 = 1_700_000_000.0


def event(openid: str = "oUser1", event: str = "subscribe", create_time: int = 1_700_000_000,
          **extra: str) -> Message:
    fields = {"ToUserName": "gh_0123456789ab", "FromUserName": openid,
              "CreateTime": str(create_time), "MsgType": "event", "Event": event, **extra}
    return parse_message(fields)


def text(msg_id: str, content: str = "hi", openid: str = "oUser1") -> Message:
    return parse_message({"ToUserName": "gh_0123456789ab", "FromUserName": openid,
                          "CreateTime": "1700000000", "MsgType": "text", "Content": content,
                          "MsgId": msg_id})


def test_new_event_is_stored_with_one_job(conn: sqlite3.Connection) -> None:
    msg = event()
    assert store_message(conn, msg, T0) is True
    row = conn.execute("SELECT dedupe_key, msg_type, event, from_user, create_time, received_at"
                       " FROM inbox").fetchone()
    assert tuple(row) == (msg.dedupe_key, "event", "subscribe", "oUser1", 1_700_000_000, T0)
    queued = conn.execute("SELECT kind, payload, state, not_before FROM jobs").fetchall()
    inbox_id = conn.execute("SELECT id FROM inbox").fetchone()[0]
    assert [tuple(j) for j in queued] == [("event", json.dumps({"inbox_id": inbox_id}), "queued", T0)]


def test_duplicate_changes_nothing(conn: sqlite3.Connection) -> None:
    assert store_message(conn, event(), T0)
    assert store_message(conn, event(), T0 + 5) is False
    assert (count_rows(conn, "inbox"), count_rows(conn, "jobs")) == (1, 1)
    # A different CreateTime, EventKey or Event is a different delivery.
    assert store_message(conn, event(create_time=1_700_000_001), T0)
    assert store_message(conn, event(EventKey="qrscene_7", Ticket="t"), T0)
    assert store_message(conn, event(event="unsubscribe"), T0)
    assert (count_rows(conn, "inbox"), count_rows(conn, "jobs")) == (4, 4)


def test_messages_dedupe_by_msgid_and_reports_by_msgid(conn: sqlite3.Connection) -> None:
    assert store_message(conn, text("42"), T0)
    assert not store_message(conn, text("42", content="changed"), T0)
    report = event(event="TEMPLATESENDJOBFINISH", MsgID="3487542469355618313", Status="success")
    assert isinstance(report, TemplateSendJobFinish)
    assert store_message(conn, report, T0)
    later = event(event="TEMPLATESENDJOBFINISH", create_time=1_700_000_009,
                  MsgID="3487542469355618313", Status="success")
    assert not store_message(conn, later, T0)
    assert count_rows(conn, "inbox") == 2


def test_same_msgid_from_two_users_is_two_messages(conn: sqlite3.Connection) -> None:
    # MsgId collisions across users have been reported: the sender is part of the key.
    assert store_message(conn, text("42", openid="oUser1"), T0)
    assert store_message(conn, text("42", "other", openid="oUser2"), T0)
    assert not store_message(conn, text("42", openid="oUser1"), T0 + 5)  # a retry
    assert not store_message(conn, text("42", "other", openid="oUser2"), T0 + 5)
    assert inbox.store_prepared(conn, [inbox.prepare(text("43", openid="oUser1"), T0),
                                       inbox.prepare(text("43", openid="oUser2"), T0),
                                       inbox.prepare(text("43", openid="oUser1"), T0)]) == \
        [True, True, False]
    rows = conn.execute("SELECT from_user FROM inbox ORDER BY id").fetchall()
    assert [r[0] for r in rows] == ["oUser1", "oUser2", "oUser1", "oUser2"]


def test_only_actionable_messages_get_a_job(conn: sqlite3.Connection) -> None:
    assert store_message(conn, text("1"), T0)
    assert store_message(conn, event(event="CLICK", EventKey="menu"), T0)
    assert store_message(conn, parse_message({
        "ToUserName": "gh", "FromUserName": "o", "CreateTime": "1", "MsgType": "hologram"}), T0)
    assert count_rows(conn, "inbox") == 3
    assert count_rows(conn, "jobs") == 0
    for name in ("subscribe", "unsubscribe"):
        assert store_message(conn, event(event=name, openid=f"o-{name}"), T0)
    assert store_message(conn, event(event="SCAN", EventKey="7", Ticket="t"), T0)
    assert count_rows(conn, "jobs") == 3


def test_load_message_round_trip(conn: sqlite3.Connection) -> None:
    msg = event(EventKey="qrscene_bind_ab12", Ticket="gQabc")
    store_message(conn, msg, T0)
    inbox_id = conn.execute("SELECT id FROM inbox").fetchone()[0]
    loaded = inbox.load(conn, inbox_id)
    assert loaded == msg and type(loaded) is type(msg)
    assert inbox.load(conn, inbox_id + 1) is None


def test_prune_keeps_pending_work(conn: sqlite3.Connection) -> None:
    store_message(conn, event(openid="done"), T0)
    store_message(conn, event(openid="pending"), T0)
    store_message(conn, text("9"), T0)
    (job, _) = jobs.lease(conn, T0, 2, 30)
    jobs.finish(conn, job.id, T0)
    jobs.recover(conn, T0)
    assert jobs.prune(conn, T0 + 1) == 1
    assert inbox.prune(conn, T0 + 1) == 2  # "done" and the text message
    assert [r[0] for r in conn.execute("SELECT from_user FROM inbox")] == ["pending"]
    assert count_rows(conn, "inbox") == 1


def test_batch_reports_each_message_and_repeats_within_it(conn: sqlite3.Connection) -> None:
    batch = [inbox.prepare(event(openid=f"o{n}"), T0 + n % 2) for n in range(1200)]  # > 1 INSERT
    batch += [inbox.prepare(text("7"), T0), inbox.prepare(event(openid="o3"), T0), batch[0]]
    assert inbox.store_prepared(conn, batch) == [True] * 1201 + [False, False]
    assert inbox.store_prepared(conn, [batch[5], inbox.prepare(text("8"), T0)]) == [False, True]
    assert (count_rows(conn, "inbox"), count_rows(conn, "jobs")) == (1202, 1200)
    queued = jobs.lease(conn, T0 + 1, 2000, 30)
    rows = conn.execute("SELECT id, received_at FROM inbox WHERE msg_type = 'event' ORDER BY id")
    assert [(j.payload_json(), j.created_at) for j in queued] == [
        ({"inbox_id": row_id}, received_at) for row_id, received_at in rows]
