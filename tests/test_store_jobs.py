"""wxd.store.jobs: the durable job queue's states (queued, leased, done, failed), on a file DB."""

from __future__ import annotations

import sqlite3

from wxd.store import jobs

T0 = 1_700_000_000.0


def enqueue(conn: sqlite3.Connection, kind: str, payload: str, now: float) -> int:
    """Queue one job due at `now`; returns its id."""
    jobs.enqueue(conn, kind, [(payload, now)])
    return int(conn.execute("SELECT MAX(id) FROM jobs").fetchone()[0])


def test_lease_finish_and_counts(conn: sqlite3.Connection) -> None:
    first = enqueue(conn, "event", "{}", T0)
    second = enqueue(conn, "event", "{}", T0)
    later = enqueue(conn, "event", "{}", T0 + 60)  # due a minute later
    leased = jobs.lease(conn, T0, 10, lease_s=30)
    assert [j.id for j in leased] == [first, second]
    assert all(j.attempts == 1 for j in leased)
    assert jobs.lease(conn, T0 + 1, 10, lease_s=30) == []  # leased ones are not due
    assert jobs.counts(conn) == {"queued": 1, "leased": 2, "done": 0, "failed": 0}
    jobs.finish(conn, first, T0 + 2)
    jobs.fail(conn, second, "WeChatAPIError: 40003", T0 + 2)
    assert jobs.counts(conn) == {"queued": 1, "leased": 0, "done": 1, "failed": 1}
    assert jobs.next_due(conn) == T0 + 60
    assert [j.id for j in jobs.lease(conn, T0 + 60, 10, 30)] == [later]
    assert jobs.next_due(conn) is None


def test_next_wake_is_the_next_due_job_or_the_next_lease_end(conn: sqlite3.Connection) -> None:
    assert jobs.next_wake(conn) is None
    enqueue(conn, "event", "{}", T0 + 100)
    assert jobs.next_wake(conn) == T0 + 100
    enqueue(conn, "event", "{}", T0)
    jobs.lease(conn, T0, 1, lease_s=30)  # its outcome may never be written
    assert jobs.next_wake(conn) == T0 + 30
    assert jobs.next_due(conn) == T0 + 100  # next_due is about queued jobs only


def test_lease_respects_limit_and_expired_leases_come_back(conn: sqlite3.Connection) -> None:
    ids = [enqueue(conn, "event", f'{{"n": {n}}}', T0) for n in range(3)]
    assert [j.id for j in jobs.lease(conn, T0, 1, 30)] == ids[:1]
    # The lease of the first expires (its worker hung); it is due again, attempts counts it.
    again = jobs.lease(conn, T0 + 31, 10, 30)
    assert [j.id for j in again] == ids
    assert [j.attempts for j in again] == [2, 1, 1]
    assert again[1].payload_json() == {"n": 1}


def test_retry_keeps_error_and_waits(conn: sqlite3.Connection) -> None:
    job_id = enqueue(conn, "event", "{}", T0)
    (job,) = jobs.lease(conn, T0, 1, 30)
    jobs.retry(conn, job.id, "TransportError: timeout", T0 + 10)
    assert jobs.lease(conn, T0 + 9, 1, 30) == []
    (again,) = jobs.lease(conn, T0 + 10, 1, 30)
    assert (again.id, again.attempts, again.last_error) == (job_id, 2, "TransportError: timeout")


def test_a_paused_job_gets_its_attempt_back_and_can_be_hastened(conn: sqlite3.Connection) -> None:
    waiting = enqueue(conn, "event", "{}", T0)
    other = enqueue(conn, "event", "{}", T0)
    first, second = jobs.lease(conn, T0, 2, 30)
    jobs.retry(conn, first.id, "TokenUnavailable: oa: 40164", T0 + 300, refund=True)
    jobs.retry(conn, second.id, "TransportError: timeout", T0 + 300)
    assert jobs.hasten(conn, [waiting], T0 + 5) == 1  # WeChat answers again
    assert jobs.hasten(conn, [waiting], T0 + 6) == 0  # already due
    (again,) = jobs.lease(conn, T0 + 5, 10, 30)
    assert (again.id, again.attempts, again.last_error) == (
        waiting, 1, "TokenUnavailable: oa: 40164")  # the pause used no attempt
    jobs.retry(conn, again.id, "quota", T0 + 9, refund=True)
    assert jobs.hasten(conn, list(range(1, 1200)), T0 + 7) == 2  # ids in chunks; both wait
    assert [(j.id, j.attempts) for j in jobs.lease(conn, T0 + 7, 10, 30)] == [
        (waiting, 1), (other, 2)]


def test_recover_requeues_every_lease_due_now(conn: sqlite3.Connection) -> None:
    a = enqueue(conn, "event", "{}", T0)
    b = enqueue(conn, "event", "{}", T0)
    jobs.lease(conn, T0, 10, lease_s=3600)
    assert jobs.recover(conn, T0 + 5) == 2
    assert jobs.counts(conn)["queued"] == 2
    assert [j.id for j in jobs.lease(conn, T0 + 5, 10, 30)] == [a, b]


def test_enqueue_many_keeps_their_order_and_times_across_statements(
        conn: sqlite3.Connection) -> None:
    entries = [(f'{{"n": {n}}}', T0 + n % 3) for n in range(1201)]  # more than one INSERT takes
    jobs.enqueue(conn, "event", entries)
    assert jobs.counts(conn)["queued"] == 1201
    assert len(jobs.lease(conn, T0, 2000, 30)) == 401  # due at their own time
    leased = jobs.lease(conn, T0 + 2, 2000, 30)
    assert [(j.payload, j.created_at) for j in leased] == [e for e in entries if e[1] > T0]
    assert {j.kind for j in leased} == {"event"}
