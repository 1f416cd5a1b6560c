"""inbox.py: dedupe by WeChat's keys, message + job in one transaction, the job queue's states."""

from __future__ import annotations

import json
import pathlib
import sqlite3
from collections.abc import Iterator

import pytest

from wxd.store import inbox
from wxd.store.db import migrate
from wxd.wechat.messages import Message, TemplateSendJobFinish, parse_message

T0 = 1_700_000_000.0


def event(openid: str = "oUser1", event: str = "subscribe", create_time: int = 1_700_000_000,
          **extra: str) -> Message:
    fields = {"ToUserName": "gh_0123456789ab", "FromUserName": openid,
              "CreateTime": str(create_time), "MsgType": "event", "Event": event, **extra}
    return parse_message(fields)


def text(msg_id: str, content: str = "hi") -> Message:
    return parse_message({"ToUserName": "gh_0123456789ab", "FromUserName": "oUser1",
                          "CreateTime": "1700000000", "MsgType": "text", "Content": content,
                          "MsgId": msg_id})


@pytest.fixture
def conn(tmp_path: pathlib.Path) -> Iterator[sqlite3.Connection]:
    connection = sqlite3.connect(tmp_path / "inbox.db", isolation_level=None)
    migrate(connection)
    yield connection
    connection.close()


def count(conn: sqlite3.Connection, table: str) -> int:
    return int(conn.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0])  # noqa: S608


def test_new_event_is_stored_with_one_job(conn: sqlite3.Connection) -> None:
    msg = event()
    assert inbox.store_message(conn, msg, T0) is True
    row = conn.execute("SELECT dedupe_key, msg_type, event, from_user, create_time, received_at"
                       " FROM inbox").fetchone()
    assert tuple(row) == (msg.dedupe_key, "event", "subscribe", "oUser1", 1_700_000_000, T0)
    jobs = conn.execute("SELECT kind, payload, state, not_before FROM jobs").fetchall()
    inbox_id = conn.execute("SELECT id FROM inbox").fetchone()[0]
    assert [tuple(j) for j in jobs] == [("event", json.dumps({"inbox_id": inbox_id}), "queued", T0)]


def test_duplicate_changes_nothing(conn: sqlite3.Connection) -> None:
    assert inbox.store_message(conn, event(), T0)
    assert inbox.store_message(conn, event(), T0 + 5) is False
    assert (count(conn, "inbox"), count(conn, "jobs")) == (1, 1)
    # A different CreateTime, EventKey or Event is a different delivery.
    assert inbox.store_message(conn, event(create_time=1_700_000_001), T0)
    assert inbox.store_message(conn, event(EventKey="qrscene_7", Ticket="t"), T0)
    assert inbox.store_message(conn, event(event="unsubscribe"), T0)
    assert (count(conn, "inbox"), count(conn, "jobs")) == (4, 4)


def test_messages_dedupe_by_msgid_and_reports_by_msgid(conn: sqlite3.Connection) -> None:
    assert inbox.store_message(conn, text("42"), T0)
    assert not inbox.store_message(conn, text("42", content="changed"), T0)
    report = event(event="TEMPLATESENDJOBFINISH", MsgID="3487542469355618313", Status="success")
    assert isinstance(report, TemplateSendJobFinish)
    assert inbox.store_message(conn, report, T0)
    later = event(event="TEMPLATESENDJOBFINISH", create_time=1_700_000_009,
                  MsgID="3487542469355618313", Status="success")
    assert not inbox.store_message(conn, later, T0)
    assert count(conn, "inbox") == 2


def test_only_actionable_messages_get_a_job(conn: sqlite3.Connection) -> None:
    assert inbox.store_message(conn, text("1"), T0)
    assert inbox.store_message(conn, event(event="CLICK", EventKey="menu"), T0)
    assert inbox.store_message(conn, parse_message({
        "ToUserName": "gh", "FromUserName": "o", "CreateTime": "1", "MsgType": "hologram"}), T0)
    assert count(conn, "inbox") == 3
    assert count(conn, "jobs") == 0
    for name in ("subscribe", "unsubscribe"):
        assert inbox.store_message(conn, event(event=name, openid=f"o-{name}"), T0)
    assert inbox.store_message(conn, event(event="SCAN", EventKey="7", Ticket="t"), T0)
    assert count(conn, "jobs") == 3


def test_load_message_round_trip(conn: sqlite3.Connection) -> None:
    msg = event(EventKey="qrscene_bind_ab12", Ticket="gQabc")
    inbox.store_message(conn, msg, T0)
    inbox_id = conn.execute("SELECT id FROM inbox").fetchone()[0]
    loaded = inbox.load_message(conn, inbox_id)
    assert loaded == msg and type(loaded) is type(msg)
    assert inbox.load_message(conn, inbox_id + 1) is None


def test_lease_finish_and_counts(conn: sqlite3.Connection) -> None:
    first = inbox.enqueue_job(conn, "event", "{}", T0)
    second = inbox.enqueue_job(conn, "event", "{}", T0)
    later = inbox.enqueue_job(conn, "event", "{}", T0, not_before=T0 + 60)
    jobs = inbox.lease_jobs(conn, T0, 10, lease_s=30)
    assert [j.id for j in jobs] == [first, second]
    assert all(j.attempts == 1 for j in jobs)
    assert inbox.lease_jobs(conn, T0 + 1, 10, lease_s=30) == []  # leased ones are not due
    assert inbox.job_counts(conn) == {"queued": 1, "leased": 2, "done": 0, "failed": 0}
    inbox.finish_job(conn, first, T0 + 2)
    inbox.fail_job(conn, second, "WeChatAPIError: 40003", T0 + 2)
    assert inbox.job_counts(conn) == {"queued": 1, "leased": 0, "done": 1, "failed": 1}
    assert inbox.next_due(conn) == T0 + 60
    assert [j.id for j in inbox.lease_jobs(conn, T0 + 60, 10, 30)] == [later]
    assert inbox.next_due(conn) is None


def test_lease_respects_limit_and_expired_leases_come_back(conn: sqlite3.Connection) -> None:
    ids = [inbox.enqueue_job(conn, "event", f'{{"n": {n}}}', T0) for n in range(3)]
    assert [j.id for j in inbox.lease_jobs(conn, T0, 1, 30)] == ids[:1]
    # The lease of the first expires (its worker hung); it is due again, attempts counts it.
    again = inbox.lease_jobs(conn, T0 + 31, 10, 30)
    assert [j.id for j in again] == ids
    assert [j.attempts for j in again] == [2, 1, 1]
    assert again[1].payload_json() == {"n": 1}


def test_retry_keeps_error_and_waits(conn: sqlite3.Connection) -> None:
    job_id = inbox.enqueue_job(conn, "event", "{}", T0)
    (job,) = inbox.lease_jobs(conn, T0, 1, 30)
    inbox.retry_job(conn, job.id, "TransportError: timeout", T0 + 10)
    assert inbox.lease_jobs(conn, T0 + 9, 1, 30) == []
    (again,) = inbox.lease_jobs(conn, T0 + 10, 1, 30)
    assert (again.id, again.attempts, again.last_error) == (job_id, 2, "TransportError: timeout")


def test_recover_requeues_every_lease_due_now(conn: sqlite3.Connection) -> None:
    a = inbox.enqueue_job(conn, "event", "{}", T0)
    b = inbox.enqueue_job(conn, "event", "{}", T0)
    inbox.lease_jobs(conn, T0, 10, lease_s=3600)
    assert inbox.recover_jobs(conn, T0 + 5) == 2
    assert inbox.job_counts(conn)["queued"] == 2
    assert [j.id for j in inbox.lease_jobs(conn, T0 + 5, 10, 30)] == [a, b]


def test_prune_keeps_pending_work(conn: sqlite3.Connection) -> None:
    inbox.store_message(conn, event(openid="done"), T0)
    inbox.store_message(conn, event(openid="pending"), T0)
    inbox.store_message(conn, text("9"), T0)
    (job, _) = inbox.lease_jobs(conn, T0, 2, 30)
    inbox.finish_job(conn, job.id, T0)
    inbox.recover_jobs(conn, T0)
    assert inbox.prune_jobs(conn, T0 + 1) == 1
    assert inbox.prune_inbox(conn, T0 + 1) == 2  # "done" and the text message
    assert [r[0] for r in conn.execute("SELECT from_user FROM inbox")] == ["pending"]
    assert inbox.inbox_count(conn) == 1
