"""FollowerBackfill against the sandbox over real HTTP, with a real SQLite file and a fake clock."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import re
import sqlite3
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from typing import Any
from unittest import mock

import tornado.httpclient
import tornado.httpserver
import tornado.netutil
from tornado.testing import AsyncTestCase, gen_test

from tests.helpers import eventually, fetchall
from tests.sandbox_fixture import FakeClock, WeChatStack
from wxd import admin
from wxd.admin import backfill as backfill_admin
from wxd.backfill import DEFER_INDEX_MAX_ROWS, FollowerBackfill, FollowerSource
from wxd.metrics import Registry
from wxd.retry import next_beijing_midnight
from wxd.sandbox import FakeWeChat
from wxd.sandbox.population import Person
from wxd.store import backfill as backfill_store
from wxd.store import followers, ingest, mp_users
from wxd.store.db import Database
from wxd.store.identity import find_identity
from wxd.wechat.oa import OfficialAccountAPI

USER_GET = "/cgi-bin/user/get"
BATCHGET = "/cgi-bin/user/info/batchget"
ADMIN_TOKEN = "backfill-test-admin-token"


class HeldBatchgets:
    """The backfill's FollowerSource (user_get passed through) whose batchget calls numbered n
    (1, 2, ... in call order) with `hold(n)` wait, before reaching WeChat, until release() or
    until cancelled; `held` counts the calls waiting. Holding calls fixes where a run is (which
    chunks are answered) without depending on how fast anything runs."""

    def __init__(self, api: FollowerSource, hold: Callable[[int], bool]) -> None:
        self._api, self._hold = api, hold
        self._released = asyncio.Event()
        self.calls = 0
        self.held = 0

    async def user_get(self, next_openid: str = "") -> dict[str, Any]:
        return await self._api.user_get(next_openid)

    async def user_info(self, openid: str) -> dict[str, Any]:
        return await self._api.user_info(openid)

    async def batchget(self, openids: Sequence[str]) -> list[dict[str, Any]]:
        self.calls += 1
        if self._hold(self.calls) and not self._released.is_set():
            self.held += 1
            try:
                await self._released.wait()
            finally:
                self.held -= 1
        return await self._api.batchget(openids)

    def release(self) -> None:
        self._released.set()


class BackfillTestCase(AsyncTestCase):
    """Each test gets a sandbox on a loopback port, a SQLite file, an OA API client."""

    def setUp(self) -> None:
        super().setUp()
        self._tmp = tempfile.TemporaryDirectory()
        self.db_path = f"{self._tmp.name}/wxd.db"
        self.clock = FakeClock(autojump=True)  # rate-limit and backoff sleeps move it at once
        self.sleeps = self.clock.sleeps
        self.stack: WeChatStack | None = None
        self.db: Database | None = None
        self.http = tornado.httpclient.AsyncHTTPClient(force_instance=True)
        self.instances: list[FollowerBackfill] = []

    def tearDown(self) -> None:
        async def close() -> None:
            for instance in self.instances:
                await instance.stop()
            if self.stack is not None:
                await self.stack.close()

        self.io_loop.run_sync(close)
        self.http.close()
        self._tmp.cleanup()
        super().tearDown()

    async def setup_sandbox(self, followers_count: int, **options: Any) -> FakeWeChat:
        """The sandbox with `followers_count` followers, the OA API (a FetchedToken: the
        backfill only sees the protocol) and the database."""
        options.setdefault("follow_ratio", 1.0)
        self.fake = FakeWeChat(users=followers_count, seed=options.pop("seed", 3),
                               clock=self.clock, **options)
        self.stack = await WeChatStack(self.fake, self.db_path).start()
        self.api = OfficialAccountAPI(self.stack.client, self.stack.token_source())
        self.db = self.stack.db
        return self.fake

    def backfill(self, api: FollowerSource | None = None, **options: Any) -> FollowerBackfill:
        assert self.db is not None
        options.setdefault("rate_per_s", 0)
        instance = FollowerBackfill(self.db, api or self.api, clock=self.clock, **options)
        self.instances.append(instance)
        return instance

    async def run_to_end(self, instance: FollowerBackfill) -> dict[str, Any]:
        await instance.begin()
        return await instance.join()

    async def query(self, sql: str, params: tuple[Any, ...] = ()) -> list[sqlite3.Row]:
        assert self.db is not None
        return await fetchall(self.db, sql, params)

    async def scalar(self, sql: str, params: tuple[Any, ...] = ()) -> Any:
        return (await self.query(sql, params))[0][0]

    def calls(self, path: str) -> list[Any]:
        return [call for call in self.fake.calls if call.path == path]

    def batchget_openids(self) -> Counter[str]:
        """How often each openid was answered by a successful batchget."""
        seen: Counter[str] = Counter()
        for call in self.calls(BATCHGET):
            if call.fault is None and call.errcode == 0:
                seen.update(item["openid"] for item in call.body["user_list"])
        return seen

    async def assert_all_stored(self, expected: int) -> None:
        assert await self.scalar("SELECT COUNT(*) FROM followers") == expected
        assert await self.scalar("SELECT COUNT(*) FROM followers WHERE subscribed = 1") == expected
        rows = await self.query("SELECT oa_openid, unionid, subscribe_scene FROM followers")
        for row in rows:
            person = self.fake.by_oa_openid(row["oa_openid"])
            assert person is not None and person.follows
            assert row["unionid"] == person.unionid
            assert row["subscribe_scene"] == person.subscribe_scene


class TestSizes(BackfillTestCase):
    """0, 1, 10,000 (one full page), 10,001 and 25,000 followers: counts exact, paging exact."""

    @gen_test(timeout=30)
    async def test_empty_account(self) -> None:
        await self.setup_sandbox(0)
        status = await self.run_to_end(self.backfill())
        assert status["state"] == "done"
        assert (status["pages_done"], status["followers_done"], status["total"]) == (0, 0, 0)
        assert len(self.calls(USER_GET)) == 1  # count 0, no data: stop at once
        assert self.calls(BATCHGET) == []
        assert status["calls"] == 1
        assert status["percent"] == 100.0

    @gen_test(timeout=30)
    async def test_one_follower(self) -> None:
        await self.setup_sandbox(1)
        status = await self.run_to_end(self.backfill())
        assert (status["state"], status["pages_done"], status["followers_done"]) == ("done", 1, 1)
        assert status["total"] == 1
        assert len(self.calls(USER_GET)) == 2  # the page (next_openid set), then the empty one
        await self.assert_all_stored(1)

    @gen_test(timeout=30)
    async def test_exactly_one_full_page(self) -> None:
        await self.setup_sandbox(10_000)
        status = await self.run_to_end(self.backfill(concurrency=8))
        assert (status["pages_done"], status["followers_done"]) == (1, 10_000)
        assert [c.query.get("next_openid", "") for c in self.calls(USER_GET)] == [
            "", self.fake.follower_openids[-1]]
        assert len(self.calls(BATCHGET)) == 100
        assert all(len(c.body["user_list"]) <= 100 for c in self.calls(BATCHGET))
        assert status["calls"] == 102
        await self.assert_all_stored(10_000)

    @gen_test(timeout=30)
    async def test_one_more_than_a_page(self) -> None:
        await self.setup_sandbox(10_001)
        status = await self.run_to_end(self.backfill(concurrency=8))
        assert (status["pages_done"], status["followers_done"]) == (2, 10_001)
        assert len(self.calls(USER_GET)) == 3
        assert len(self.calls(BATCHGET)) == 101
        assert set(self.batchget_openids().values()) == {1}
        await self.assert_all_stored(10_001)

    @gen_test(timeout=60)
    async def test_25000_with_links(self) -> None:
        fake = await self.setup_sandbox(25_000)
        assert self.db is not None
        linked = [fake.person(i) for i in (0, 4_321, 24_999)]

        def mp_logins(conn: sqlite3.Connection) -> None:
            for person in linked:
                mp_users.upsert(conn, person.mp_openid, person.unionid, None,
                                         self.clock())

        await self.db.write(mp_logins)
        registry = Registry()
        status = await self.run_to_end(self.backfill(concurrency=8, metrics=registry))
        assert (status["state"], status["pages_done"], status["followers_done"]) == (
            "done", 3, 25_000)
        assert status["total"] == 25_000
        assert status["calls"] == 4 + 250  # 4 user/get, 250 batchget (token fetches excluded)
        await self.assert_all_stored(25_000)
        assert await self.scalar("SELECT COUNT(DISTINCT unionid) FROM followers") == 25_000
        for person in linked:
            identity = await self.db.read(functools.partial(
                find_identity, unionid=person.unionid))
            assert identity is not None and identity.linked
            assert (identity.mp_openid, identity.oa_openid) == (person.mp_openid,
                                                                person.oa_openid)
            assert identity.subscribed and identity.linked_at is not None
        assert await self.scalar("SELECT COUNT(*) FROM links") == 3
        text = registry.render()
        assert "wxd_backfill_followers_total 25000" in text
        assert "wxd_backfill_pages_total 3" in text
        assert 'wxd_backfill_state{state="done"} 1' in text
        assert 'wxd_backfill_state{state="running"} 0' in text
        assert 'wxd_backfill_calls_total{endpoint="batchget",outcome="ok"} 250' in text


class TestResume(BackfillTestCase):
    """A stop or a crash mid-run loses and repeats no page; a new process resumes the cursor."""

    @gen_test(timeout=60)
    async def test_stop_at_page_boundary_then_resume_in_a_new_instance(self) -> None:
        await self.setup_sandbox(20_500)
        # Page 1's first chunks wait until the stop is asked for: page 1 is being fetched.
        gate = HeldBatchgets(self.api, hold=lambda n: True)
        first = self.backfill(api=gate, concurrency=4)
        await first.begin()
        await eventually(lambda: gate.held, "every worker in page 1", until=lambda n: n == 4)
        stopping = asyncio.ensure_future(first.stop())
        await eventually(lambda: first.state, "the stop asked for",
                         until=lambda state: state == "stopping")
        gate.release()
        await stopping
        assert self.db is not None
        row = await self.db.read(backfill_store.load)
        assert row.state == "running" and row.pages_done == 1  # page 1 finished, then halted
        assert row.cursor == self.fake.follower_openids[row.pages_done * 10_000 - 1]
        assert row.followers_done == row.pages_done * 10_000
        stored_before = await self.scalar("SELECT COUNT(*) FROM followers")
        assert stored_before >= row.followers_done
        user_get_before = len(self.calls(USER_GET))

        second = self.backfill()
        await second.start()  # crash recovery: a run left running resumes by itself
        status = await second.join()
        assert (status["state"], status["pages_done"], status["followers_done"]) == (
            "done", 3, 20_500)
        assert status["run"] == 1
        resumed = [c.query.get("next_openid", "") for c in self.calls(USER_GET)[user_get_before:]]
        assert resumed[0] == row.cursor
        assert "" not in resumed  # never restarted from the head of the list
        seen = self.batchget_openids()
        assert len(seen) == 20_500 and set(seen.values()) == {1}  # no page lost or repeated
        await self.assert_all_stored(20_500)

    @gen_test(timeout=60)
    async def test_next_page_runs_while_a_slow_chunk_finishes_the_page(self) -> None:
        await self.setup_sandbox(20_000)
        gate = HeldBatchgets(self.api, hold=lambda n: n == 1)  # page 1's first chunk waits
        instance = self.backfill(api=gate, concurrency=4)
        await instance.begin()
        # The other workers go on to page 2 instead of idling until the slow chunk is in.
        await eventually(instance.status, "page 2 fetched meanwhile",
                         until=lambda status: status["page_progress"] >= 15_000, timeout=20)
        assert instance.status()["pages_done"] == 0
        gate.release()
        status = await instance.join()
        assert (status["state"], status["pages_done"], status["followers_done"]) == (
            "done", 2, 20_000)
        assert set(self.batchget_openids().values()) == {1}
        await self.assert_all_stored(20_000)

    @gen_test(timeout=60)
    async def test_crash_mid_page_redoes_only_that_page(self) -> None:
        await self.setup_sandbox(20_500)
        # Page 1 (chunks 1-100) and 30 chunks of page 2 are answered; the rest never are.
        gate = HeldBatchgets(self.api, hold=lambda n: n > 130)
        first = self.backfill(api=gate, concurrency=4)
        await first.begin()
        await eventually(lambda: gate.held, "every worker held in page 2",
                         until=lambda n: n == 4, timeout=20)
        await eventually(first.status, "page 1 stored",
                         until=lambda status: status["pages_done"] >= 1, timeout=20)
        assert 0 < first.status()["page_progress"] < 10_000
        task = first._task
        assert task is not None
        task.cancel()  # what a kill -9 leaves: no halt() write, the row still says running
        await asyncio.gather(task, return_exceptions=True)
        assert self.db is not None
        await self.db.write(lambda conn: None)  # writes already queued have landed
        row = await self.db.read(backfill_store.load)
        assert row.state == "running"
        done_pages = row.pages_done
        assert done_pages == 1  # page 2 never completed
        assert row.followers_done == done_pages * 10_000

        second = self.backfill()
        await second.start()
        status = await second.join()
        assert (status["pages_done"], status["followers_done"]) == (3, 20_500)
        seen = self.batchget_openids()
        assert len(seen) == 20_500
        followers_list = self.fake.follower_openids
        counted = followers_list[: done_pages * 10_000]
        assert all(seen[openid] == 1 for openid in counted)  # counted pages never repeated
        interrupted = followers_list[done_pages * 10_000:(done_pages + 1) * 10_000]
        assert max(seen[openid] for openid in interrupted) == 2  # only that page was redone
        await self.assert_all_stored(20_500)


class TestDeferredIndex(BackfillTestCase):
    """A first sync into an empty table builds followers_unionid once, at its end or halt."""

    async def index_exists(self) -> bool:
        return bool(await self.scalar(
            "SELECT COUNT(*) FROM sqlite_master WHERE name = 'followers_unionid'"))

    async def lookup_plan(self) -> str:
        rows = await self.query(
            "EXPLAIN QUERY PLAN SELECT * FROM followers WHERE unionid = 'x'")
        return " ".join(row["detail"] for row in rows)

    @contextlib.contextmanager
    def index_at_each_page(self, instance: FollowerBackfill) -> Iterator[list[tuple[bool, bool]]]:
        """(index present, status says deferred) as each page's write stores its followers."""
        seen: list[tuple[bool, bool]] = []
        real = ingest.apply_info_batch

        def spying(conn: sqlite3.Connection, batch: ingest.InfoBatch, *args: Any,
                   **kwargs: Any) -> list[str]:
            exists = conn.execute("SELECT COUNT(*) FROM sqlite_master"
                                  " WHERE name = 'followers_unionid'").fetchone()[0]
            seen.append((bool(exists), instance.status()["unionid_index_deferred"]))
            return real(conn, batch, *args, **kwargs)

        with mock.patch.object(ingest, "apply_info_batch", spying):
            yield seen

    @gen_test(timeout=60)
    async def test_first_sync_builds_the_index_at_its_end_and_lookups_stay_right(self) -> None:
        fake = await self.setup_sandbox(25_000)
        assert self.db is not None
        instance = self.backfill()
        with self.index_at_each_page(instance) as seen:
            status = await self.run_to_end(instance)
        assert status["state"] == "done" and status["followers_done"] == 25_000
        assert seen == [(False, True)] * 3
        assert not status["unionid_index_deferred"]
        assert await self.index_exists()
        assert "followers_unionid" in await self.lookup_plan()
        person = fake.person(12_345)
        identity = await self.db.read(functools.partial(find_identity,
                                                        unionid=person.unionid))
        assert identity is not None and identity.oa_openid == person.oa_openid
        await self.assert_all_stored(25_000)

    @gen_test(timeout=60)
    async def test_kept_when_followers_are_stored_or_when_disabled(self) -> None:
        await self.setup_sandbox(25_000)
        assert self.db is not None

        def only_some_followers(conn: sqlite3.Connection) -> None:
            conn.execute("DELETE FROM followers")
            ingest.apply_user_infos(conn, [{"openid": f"known-{i}", "subscribe": 0}
                                              for i in range(DEFER_INDEX_MAX_ROWS)], 1.0, 1.0)

        # Disabled, into an empty table; then enabled, with exactly the limit already stored.
        for instance in (self.backfill(defer_index=False), self.backfill()):
            with self.index_at_each_page(instance) as seen:
                status = await self.run_to_end(instance)
            assert status["state"] == "done" and status["followers_done"] == 25_000
            assert seen == [(True, False)] * 3
            await self.db.write(only_some_followers)

    @gen_test(timeout=60)
    async def test_kept_for_an_account_of_one_page(self) -> None:
        await self.setup_sandbox(10_000)
        instance = self.backfill()
        with self.index_at_each_page(instance) as seen:
            status = await self.run_to_end(instance)
        assert status["state"] == "done" and status["followers_done"] == 10_000
        assert seen == [(True, False)]

    @gen_test(timeout=60)
    async def test_a_halted_first_sync_rebuilds_it_and_a_crash_is_repaired_on_open(self) -> None:
        fake = await self.setup_sandbox(25_000)
        assert self.db is not None
        fake.script_fault(BATCHGET, "delay:0", times=150)  # pages 1 and half of 2 answer...
        fake.script_fault(BATCHGET, "48001")              # ...then a terminal error
        status = await self.run_to_end(self.backfill(concurrency=1))
        assert status["state"] == "failed" and status["pages_done"] == 1
        assert await self.index_exists() and not status["unionid_index_deferred"]

        await self.db.write(lambda conn: ingest.defer_unionid_index(conn, 10**9))
        assert not await self.index_exists()
        assert self.stack is not None
        # A crash mid-sync leaves it dropped; the next open builds it.
        self.db = await self.stack.reopen_db()
        assert await self.index_exists()
        assert "followers_unionid" in await self.lookup_plan()


class TestFaults(BackfillTestCase):
    @gen_test(timeout=60)
    async def test_ten_percent_faults_complete_exactly(self) -> None:
        await self.setup_sandbox(12_000, seed=11, fault_rate=0.1,
                                 fault_kinds=("-1", "http500", "45011"))
        status = await self.run_to_end(self.backfill(concurrency=4))
        assert status["state"] == "done", status["last_error"]
        assert (status["pages_done"], status["followers_done"]) == (2, 12_000)
        faults = Counter(c.fault for c in self.fake.calls if c.fault is not None)
        assert faults["-1"] > 0 and faults["http500"] > 0 and faults["45011"] > 0
        batch_faults = sum(1 for c in self.calls(BATCHGET) if c.fault is not None)
        assert len(self.calls(BATCHGET)) == 120 + batch_faults
        assert status["calls"] == len(self.calls(BATCHGET)) + len(self.calls(USER_GET))
        assert any(delay >= 1.0 for delay in self.sleeps)  # 45011 waits for the next minute
        await self.assert_all_stored(12_000)

    @gen_test(timeout=30)
    async def test_daily_quota_pauses_then_resumes(self) -> None:
        fake = await self.setup_sandbox(15_000)
        fake.script_fault(BATCHGET, "45009")
        instance = self.backfill()
        status = await self.run_to_end(instance)
        assert status["state"] == "paused"
        assert "45009" in status["last_error"]
        midnight = next_beijing_midnight(self.clock())
        assert status["paused_until"] == midnight + 60
        assert status["followers_done"] == 0 and status["pages_done"] == 0
        assert status["next_run_at"] == status["paused_until"]
        started, again = await instance.begin_run()
        assert not started and again["state"] == "paused"  # not before paused_until
        self.clock.set(status["paused_until"] + 1)
        status = await self.run_to_end(instance)
        assert (status["state"], status["followers_done"], status["run"]) == ("done", 15_000, 1)
        assert status["last_error"] is None and status["paused_until"] is None
        await self.assert_all_stored(15_000)

    @gen_test(timeout=30)
    async def test_force_resumes_a_paused_run(self) -> None:
        fake = await self.setup_sandbox(500)
        fake.script_fault(USER_GET, "45009")
        instance = self.backfill()
        assert (await self.run_to_end(instance))["state"] == "paused"
        started, _ = await instance.begin_run(force=True)
        assert started
        assert (await instance.join())["followers_done"] == 500

    @gen_test(timeout=30)
    async def test_retries_are_bounded_then_failed_then_resumable(self) -> None:
        fake = await self.setup_sandbox(12_000)
        fake.script_fault(BATCHGET, "-1", times=10_000)
        instance = self.backfill(max_attempts=3)
        status = await self.run_to_end(instance)
        assert status["state"] == "failed"
        assert "errcode -1" in status["last_error"]
        assert status["followers_done"] == 0
        assert sum(1 for c in self.calls(BATCHGET) if c.fault == "-1") <= 3 * 4 + 4
        fake.clear_faults()
        status = await self.run_to_end(instance)
        assert (status["state"], status["followers_done"]) == ("done", 12_000)

    @gen_test(timeout=30)
    async def test_terminal_error_fails_at_once_and_resume_keeps_the_cursor(self) -> None:
        fake = await self.setup_sandbox(12_000)
        fake.script_fault(BATCHGET, "delay:0", times=100)  # page 1 answers normally...
        fake.script_fault(BATCHGET, "48001")  # ...then a terminal error in page 2
        instance = self.backfill(concurrency=1)
        await instance.begin()
        status = await instance.join()
        assert status["state"] == "failed" and "48001" in status["last_error"]
        assert sum(1 for c in self.calls(BATCHGET) if c.fault == "48001") == 1
        assert status["pages_done"] == 1
        status = await self.run_to_end(instance)
        assert (status["state"], status["pages_done"], status["followers_done"]) == (
            "done", 2, 12_000)
        assert set(self.batchget_openids().values()) == {1}

    @gen_test(timeout=60)
    async def test_failed_page_write_counts_no_later_page(self) -> None:
        # Page 2's write fails slowly, so pages 3 and 4 are fetched and queued behind it: their
        # writes must fail the cursor check, not count a page whose followers are missing.
        await self.setup_sandbox(35_000)
        real = ingest.apply_info_batch
        seen: list[int] = []

        def flaky(conn: sqlite3.Connection, batch: ingest.InfoBatch, *args: Any,
                  **kwargs: Any) -> list[str]:
            seen.append(len(batch))
            if len(seen) == 2:
                time.sleep(0.5)
                raise sqlite3.OperationalError("disk I/O error (injected)")
            return real(conn, batch, *args, **kwargs)

        instance = self.backfill(concurrency=4)
        with mock.patch.object(ingest, "apply_info_batch", flaky):
            status = await self.run_to_end(instance)
        assert status["state"] == "failed" and "injected" in status["last_error"]
        assert len(seen) >= 3  # a later page was queued behind the failing one
        assert (status["pages_done"], status["followers_done"]) == (1, 10_000)
        assert await self.scalar("SELECT COUNT(*) FROM followers") == 10_000
        status = await self.run_to_end(instance)
        assert (status["state"], status["pages_done"], status["followers_done"]) == (
            "done", 4, 35_000)
        assert await self.scalar("SELECT COUNT(*) FROM followers") == 35_000


class TestEvents(BackfillTestCase):
    @gen_test(timeout=60)
    async def test_events_win_and_unseen_followers_are_unsubscribed(self) -> None:
        fake = await self.setup_sandbox(13_000, follow_ratio=0.9)
        assert self.db is not None
        listed = fake.follower_openids
        never = [p for p in fake.people if not p.follows]
        # Stale data from an earlier life: a follower row for someone who no longer follows.
        gone = never[0]
        await self.db.write(lambda conn: followers.record_subscribe(
            conn, gone.oa_openid, self.clock() - 86400, self.clock() - 86400))
        # The race: events created after WeChat answered the backfill's user/get or batchget
        # (so newer than what the backfill observes) but stored before the backfill's batch.
        later = self.clock() + 100
        quitter = fake.by_oa_openid(listed[-1])  # WeChat still lists and describes them
        assert quitter is not None
        # A new follower whose follow came after user/get listed its position in the list.
        newcomer: Person = never[1]

        def events(conn: sqlite3.Connection) -> None:
            followers.record_unsubscribe(conn, quitter.oa_openid, later, later)
            followers.record_subscribe(conn, newcomer.oa_openid, later, later)

        await self.db.write(events)
        instance = self.backfill(concurrency=2)
        await instance.begin()
        status = await instance.join()
        assert status["state"] == "done"
        rows = {row["oa_openid"]: row for row in await self.query("SELECT * FROM followers")}
        assert rows[quitter.oa_openid]["subscribed"] == 0  # the newer event won
        assert rows[quitter.oa_openid]["unionid"] == quitter.unionid
        assert rows[newcomer.oa_openid]["subscribed"] == 1  # not unseen: its event is newer
        assert rows[gone.oa_openid]["subscribed"] == 0  # not in the list at the end
        subscribed = sum(row["subscribed"] for row in rows.values())
        assert subscribed == len(listed) - 1 + 1

    @gen_test(timeout=60)
    async def test_second_run_unsubscribes_who_left(self) -> None:
        fake = await self.setup_sandbox(3_000)
        instance = self.backfill()
        assert (await self.run_to_end(instance))["run"] == 1
        leavers = [fake.person(i) for i in (5, 50, 500)]
        for person in leavers:
            fake.unfollow(person)
        self.clock.advance(3600)
        status = await self.run_to_end(instance)
        assert (status["run"], status["followers_done"], status["total"]) == (2, 2_997, 2_997)
        for person in leavers:
            row = (await self.query("SELECT subscribed, unsubscribed_at, unionid FROM followers"
                                    " WHERE oa_openid = ?", (person.oa_openid,)))[0]
            assert row["subscribed"] == 0 and row["unsubscribed_at"] == self.clock()
            assert row["unionid"] == person.unionid
        assert await self.scalar("SELECT SUM(subscribed) FROM followers") == 2_997


class TestRateLimit(BackfillTestCase):
    @gen_test(timeout=30)
    async def test_calls_per_second_respected(self) -> None:
        await self.setup_sandbox(3_000)
        start = self.clock()
        status = await self.run_to_end(self.backfill(rate_per_s=20, concurrency=4))
        calls = status["calls"]
        assert calls == 2 + 30
        elapsed = self.clock() - start
        # Burst of `concurrency` calls, then one every 1/20 s.
        assert (calls - 4) / 20 - 1e-4 <= elapsed <= calls / 20 + 1e-4
        at = sorted(c.at for c in self.fake.calls if c.path in (USER_GET, BATCHGET))
        for i in range(len(at) - 20 - 4):
            assert at[i + 20 + 4] - at[i] >= 1.0 - 1e-4  # no 1 s window holds more than 24

    @gen_test(timeout=30)
    async def test_unlimited_rate_never_sleeps(self) -> None:
        await self.setup_sandbox(2_000)
        status = await self.run_to_end(self.backfill(rate_per_s=0))
        assert status["state"] == "done" and self.sleeps == []


class TestAdmin(BackfillTestCase):
    async def admin_server(self, instance: FollowerBackfill) -> str:
        common = admin.common_kwargs(ADMIN_TOKEN, None)
        app = admin.make_app(common, [backfill_admin.routes(common, instance)])
        sockets = tornado.netutil.bind_sockets(0, "127.0.0.1")
        server = tornado.httpserver.HTTPServer(app)
        server.add_sockets(sockets)
        self.admin_http = server
        return f"http://127.0.0.1:{sockets[0].getsockname()[1]}"

    async def request(self, base: str, method: str, body: Any = None,
                      token: str = ADMIN_TOKEN) -> tuple[int, dict[str, Any]]:
        payload = None if method == "GET" else json.dumps(body or {}).encode()
        response = await self.http.fetch(
            base + "/v1/backfill", method=method, body=payload, raise_error=False,
            headers={"Authorization": f"Bearer {token}"})
        return response.code, json.loads(response.body)

    @gen_test(timeout=30)
    async def test_post_starts_get_reports(self) -> None:
        fake = await self.setup_sandbox(5_000)
        fake.latency_s = 0.002
        instance = self.backfill()
        base = await self.admin_server(instance)
        try:
            code, body = await self.request(base, "GET")
            assert code == 200 and body["state"] == "idle" and body["run"] == 0
            code, body = await self.request(base, "POST")
            assert code == 202 and body["state"] == "running" and body["active"]
            code, again = await self.request(base, "POST")
            assert code == 200 and again["run"] == body["run"]  # idempotent: the running one
            await instance.join()
            code, body = await self.request(base, "GET")
            assert code == 200
            for key in ("state", "run", "pages_done", "followers_done", "total", "calls",
                        "rate_per_s", "eta_s", "started_at", "updated_at", "finished_at",
                        "paused_until", "last_error", "percent", "elapsed_s"):
                assert key in body
            assert (body["state"], body["followers_done"], body["percent"]) == (
                "done", 5_000, 100.0)
            assert "cursor" not in body
            code, body = await self.request(base, "GET", token="wrong")
            assert code == 401
            code, body = await self.request(base, "POST", body={"force": "yes"})
            assert code == 400 and body["error"]["code"] == "invalid_field"
        finally:
            self.admin_http.stop()
            await self.admin_http.close_all_connections()

    @gen_test(timeout=30)
    async def test_post_while_paused_is_409_unless_forced(self) -> None:
        fake = await self.setup_sandbox(300)
        fake.script_fault(USER_GET, "45009")
        instance = self.backfill()
        base = await self.admin_server(instance)
        try:
            code, body = await self.request(base, "POST")
            assert code == 202
            await instance.join()
            code, body = await self.request(base, "POST")
            assert code == 409 and body["error"]["code"] == "backfill_paused"
            assert body["error"]["backfill"]["state"] == "paused"
            code, body = await self.request(base, "POST", body={"force": True})
            assert code == 202
            assert (await instance.join())["followers_done"] == 300
        finally:
            self.admin_http.stop()
            await self.admin_http.close_all_connections()


    @gen_test(timeout=30)
    async def test_post_from_start_begins_a_new_run(self) -> None:
        fake = await self.setup_sandbox(5_000)
        fake.latency_s = 0.002
        fake.script_fault(USER_GET, "48001", 1)
        instance = self.backfill()
        base = await self.admin_server(instance)
        try:
            code, body = await self.request(base, "POST")
            assert code == 202
            assert (await instance.join())["state"] == "failed"
            code, body = await self.request(base, "POST", body={"from_start": "yes"})
            assert code == 400 and body["error"]["field"] == "from_start"
            code, body = await self.request(base, "POST", body={"from_start": True})
            assert code == 202 and body["run"] == 2 and body["active"]
            code, body = await self.request(base, "POST", body={"from_start": True})
            assert code == 409 and body["error"]["code"] == "backfill_running"
            assert body["error"]["backfill"]["run"] == 2
            status = await instance.join()
            assert (status["run"], status["state"], status["followers_done"]) == (2, "done", 5_000)
            assert (status["complete"], status["restarts_from_head"], status["skipped"]) == (
                True, 0, 0)
        finally:
            self.admin_http.stop()
            await self.admin_http.close_all_connections()


class TestTimers(BackfillTestCase):
    @gen_test(timeout=30)
    async def test_periodic_resync(self) -> None:
        await self.setup_sandbox(300)
        instance = self.backfill(resync_interval_s=0.05)
        await instance.start()  # never ran: with re-sync on, the first run starts at once
        await eventually(lambda: instance.status()["state"] == "done", "the first run")
        status = instance.status()
        assert status["run"] == 1 and status["next_run_at"] == status["finished_at"] + 0.05
        self.clock.advance(0.06)
        await eventually(lambda: instance.status()["run"] == 2
                         and instance.status()["state"] == "done", "the re-sync")
        await instance.stop()
        assert self.clock.pending() == []  # stopped: no timer armed, no more runs
        self.clock.advance(1)
        assert instance.status()["run"] == 2

    @gen_test(timeout=30)
    async def test_no_resync_by_default(self) -> None:
        await self.setup_sandbox(100)
        instance = self.backfill()
        await instance.start()
        assert instance.status()["state"] == "idle" and instance.status()["next_run_at"] is None
        assert (await self.run_to_end(instance))["next_run_at"] is None

    @gen_test(timeout=30)
    async def test_start_resumes_a_pause_that_has_expired(self) -> None:
        fake = await self.setup_sandbox(400)
        fake.script_fault(USER_GET, "45009")
        first = self.backfill()
        paused = await self.run_to_end(first)
        assert paused["state"] == "paused"
        await first.stop()
        self.clock.set(paused["paused_until"] + 5)  # the process restarts the next day
        second = self.backfill()
        await second.start()
        await eventually(lambda: second.status()["state"] == "done", "the resumed run")
        assert second.status()["followers_done"] == 400 and second.status()["run"] == 1

    @gen_test(timeout=30)
    async def test_start_keeps_a_failed_run_failed(self) -> None:
        fake = await self.setup_sandbox(400)
        fake.script_fault(USER_GET, "40003")
        first = self.backfill()
        assert (await self.run_to_end(first))["state"] == "failed"
        await first.stop()
        second = self.backfill()
        await second.start()
        assert self.clock.pending() == []  # nothing will resume it
        assert second.status()["state"] == "failed" and not second.running


USER_INFO = "/cgi-bin/user/info"


class TestStaleCursor(BackfillTestCase):
    """A saved cursor WeChat refuses (40003) or answers empty before the list is complete: the run
    restarts from the head (bounded, said once, counted), and only a complete listing sweeps."""

    async def first_sync(self, count: int) -> FollowerBackfill:
        await self.setup_sandbox(count)
        instance = self.backfill()
        status = await self.run_to_end(instance)
        assert (status["state"], status["followers_done"]) == ("done", count)
        self.first_status = status
        return instance

    async def subscribed(self) -> int:
        return int(await self.scalar("SELECT COALESCE(SUM(subscribed), 0) FROM followers"))

    @gen_test(timeout=60)
    async def test_a_cursor_refused_the_next_day_restarts_from_the_head(self) -> None:
        fake = await self.setup_sandbox(20_500)
        cursor = fake.follower_openids[9_999]  # saved after page 1
        # Day 1 ends with the quota spent in page 2; day 2 WeChat refuses the saved cursor, and
        # the second pass meets the quota at the same place; day 3 completes the list.
        fake.script_fault(BATCHGET, "45009", 2, openids=[fake.follower_openids[10_000]])
        first = self.backfill(concurrency=1)
        status = await self.run_to_end(first)
        assert (status["state"], status["pages_done"]) == ("paused", 1)
        paused = status
        fake.stale_cursor(cursor, "40003", times=1)
        await first.stop()

        self.clock.set(status["paused_until"] + 1)  # the next day, in a new process
        second = self.backfill(concurrency=1)
        await second.start()  # loads the row (a paused run resumes by begin or its timer)
        with self.assertLogs("wxd.backfill", "WARNING") as logs:
            status = await self.run_to_end(second)
        assert status["state"] == "paused", status["last_error"]  # not failed: 40003 restarted
        assert paused["seen"] == 10_000
        saved_at = paused["cursor_at"]
        restarts = [line for line in logs.output if "restarting from the head" in line]
        assert len(restarts) == 1 and "restart 1 of 2" in restarts[0]
        assert "errcode 40003" in restarts[0] and "after 10000 of 20500" in restarts[0]
        age = re.search(r"cursor age (\d+) s", restarts[0])
        assert age is not None and abs(int(age.group(1)) - (self.clock() - saved_at)) < 5
        assert cursor not in "".join(logs.output)  # openids are personal data
        assert (status["state"], status["restarts_from_head"]) == ("paused", 1)
        assert (status["pages_done"], status["followers_done"], status["seen"]) == (
            1, 10_000, 10_000)  # page 1 again: nothing new seen

        await second.stop()
        self.clock.set(status["paused_until"] + 1)
        third = self.backfill(concurrency=1)
        await third.start()
        status = await self.run_to_end(third)
        assert (status["state"], status["run"], status["complete"]) == ("done", 1, True)
        assert (status["pages_done"], status["followers_done"], status["seen"]) == (
            3, 20_500, 20_500)  # the restart's pass, not 30,500
        assert status["restarts_from_head"] == 1 and status["skipped"] == 0
        heads = [c for c in self.calls(USER_GET) if not c.query.get("next_openid")
                 and c.errcode == 0]  # (the token expired overnight: one 42001 answer)
        assert len(heads) == 2
        await self.assert_all_stored(20_500)

    @gen_test(timeout=60)
    async def test_an_early_empty_page_restarts_and_unsubscribes_nobody(self) -> None:
        instance = await self.first_sync(12_000)
        cursor = self.fake.follower_openids[9_999]
        for kind in ("empty", "empty_bare"):
            self.fake.stale_cursor(cursor, kind, times=1)
            self.clock.advance(3600)
            status = await self.run_to_end(instance)
            assert await self.subscribed() == 12_000, kind  # nobody unseen was swept
            assert (status["state"], status["followers_done"]) == ("done", 12_000)
            assert (status["complete"], status["restarts_from_head"], status["seen"]) == (
                True, 1, 12_000)
        assert instance.status()["run"] == 3
        assert (self.first_status["complete"], self.first_status["seen"]) == (True, 12_000)

    @gen_test(timeout=60)
    async def test_restarts_are_bounded(self) -> None:
        instance = await self.first_sync(12_000)
        head_calls = len(self.calls(USER_GET))
        rule = self.fake.stale_cursor("*", "40003")  # every saved cursor, never the head
        status = await self.run_to_end(instance)
        assert (status["state"], status["restarts_from_head"]) == ("failed", 2)
        assert "40003" in status["last_error"]
        asked = [c.query.get("next_openid", "") for c in self.calls(USER_GET)[head_calls:]]
        assert asked.count("") == 3 and len(asked) == 6  # the head, then its cursor: 3 times
        self.fake.clear_faults(rule_id=rule.id)

        self.fake.stale_cursor("*", "empty")
        status = await self.run_to_end(instance)
        # The run resumed its restarts budget spent: the cursor's empty page ends it, unswept.
        assert (status["state"], status["complete"], status["run"]) == ("done", False, 2)
        assert status["seen"] == 10_000 and await self.subscribed() == 12_000
        self.fake.clear_faults()

        # The head itself refusing the call fails the run as before; nothing to restart from.
        self.fake.script_fault(USER_GET, "40003", 1)
        status = await self.run_to_end(instance)
        assert (status["state"], status["restarts_from_head"], status["run"]) == (
            "failed", 0, 3)

    @gen_test(timeout=60)
    async def test_from_start_begins_a_new_run_at_the_head(self) -> None:
        fake = await self.setup_sandbox(12_000)
        cursor = fake.follower_openids[9_999]
        fake.stale_cursor(cursor, "40003", times=1)
        instance = self.backfill(max_restarts_from_head=0)
        status = await self.run_to_end(instance)
        assert (status["state"], status["run"], status["pages_done"]) == ("failed", 1, 1)
        started, status = await instance.begin_run(from_start=True)
        assert started and status["run"] == 2
        status = await instance.join()
        assert (status["state"], status["complete"], status["followers_done"]) == (
            "done", True, 12_000)
        assert [c.query.get("next_openid", "") for c in self.calls(USER_GET)] == [
            "", cursor, "", cursor, fake.follower_openids[-1]]
        await self.assert_all_stored(12_000)


class TestRefusedOpenids(BackfillTestCase):
    """batchget refusing a whole chunk for some openids in it (50005, 40003, 40032): the chunk is
    bisected, a lone openid asks user/info, the openids refused alone are skipped and counted."""

    def chunk_calls(self, openid: str) -> int:
        return sum(1 for c in self.fake.calls
                   if (c.path == BATCHGET and any(i["openid"] == openid
                                                  for i in c.body["user_list"]))
                   or (c.path == USER_INFO and c.query.get("openid") == openid))

    @gen_test(timeout=60)
    async def test_refused_openids_are_bisected_skipped_and_counted(self) -> None:
        fake = await self.setup_sandbox(12_000)
        assert self.db is not None
        listed = fake.follower_openids
        bad = [listed[37], listed[10_050]]
        kept = listed[38]
        for path in (BATCHGET, USER_INFO):  # WeChat refuses them on both endpoints
            fake.poison_openid(bad, 40003, path=path)
        # A row from an earlier sync: refused now, it is not judged by the sweep either.
        await self.db.write(lambda conn: followers.record_subscribe(
            conn, bad[0], self.clock() - 86400, self.clock() - 86400))
        await self.db.write(lambda conn: followers.record_subscribe(
            conn, "oNoLongerListed", self.clock() - 86400, self.clock() - 86400))
        registry = Registry()
        instance = self.backfill(concurrency=4, metrics=registry)
        with self.assertLogs("wxd.backfill", "DEBUG") as logs:
            status = await self.run_to_end(instance)
        assert (status["state"], status["followers_done"]) == ("done", 12_000), status["last_error"]
        assert (status["complete"], status["seen"], status["skipped"]) == (True, 12_000, 2)
        # Stored: every listed openid but the refused ones; bad[0]'s earlier row is marked as
        # listed by the run (so it is not swept), bad[1] has no row.
        assert await self.scalar("SELECT COUNT(*) FROM followers WHERE synced_run = 1") == 11_999
        rows = {r["oa_openid"]: r for r in await self.query("SELECT * FROM followers")}
        assert bad[1] not in rows and rows[bad[0]]["subscribed"] == 1
        person = fake.by_oa_openid(kept)
        assert person is not None and rows[kept]["unionid"] == person.unionid
        assert rows["oNoLongerListed"]["subscribed"] == 0  # the sweep still ran
        assert sum(r["subscribed"] for r in rows.values()) == 11_999
        for openid in bad:  # bisection: at most ~2·log2(100) calls per bad openid
            assert self.chunk_calls(openid) <= 1 + 2 * 7
        info = [r.getMessage() for r in logs.records if r.levelno >= logging.INFO]
        assert sum("refused to describe 1 of 100" in line for line in info) == 2
        assert not any(openid in line for openid in bad for line in info)
        assert any(bad[0] in r.getMessage() for r in logs.records if r.levelno == logging.DEBUG)
        assert "wxd_backfill_skipped_total 2" in registry.render()

    @gen_test(timeout=60)
    async def test_a_lone_refused_openid_is_described_by_user_info(self) -> None:
        fake = await self.setup_sandbox(10_001)
        lone = fake.follower_openids[-1]  # page 2 is a chunk of one openid
        middle = fake.follower_openids[5_555]
        for errcode, openid in ((50005, lone), (40032, middle)):
            fake.poison_openid(openid, errcode)  # batchget only: user/info answers
        status = await self.run_to_end(self.backfill())
        assert (status["state"], status["followers_done"]) == ("done", 10_001), status["last_error"]
        assert status["skipped"] == 0
        await self.assert_all_stored(10_001)
        asked_alone = [c.query["openid"] for c in self.calls(USER_INFO)]
        assert lone in asked_alone and middle in asked_alone and len(asked_alone) <= 4
        assert self.chunk_calls(lone) == 2 and self.chunk_calls(middle) <= 1 + 2 * 7

    @gen_test(timeout=60)
    async def test_many_refused_openids_in_a_chunk_stay_bounded(self) -> None:
        fake = await self.setup_sandbox(300)
        bad = fake.follower_openids[100:200:2]  # half of chunk 2
        for path in (BATCHGET, USER_INFO):
            fake.poison_openid(bad, 40003, path=path)
        status = await self.run_to_end(self.backfill(concurrency=1))
        assert (status["state"], status["followers_done"]) == ("done", 300), status["last_error"]
        assert status["skipped"] == 50
        chunk2 = len(self.calls(BATCHGET)) + len(self.calls(USER_INFO)) - 2
        assert chunk2 <= 1 + 50 + 100  # the bisection's budget, then one by one
        assert await self.scalar("SELECT COUNT(*) FROM followers") == 250

    @gen_test(timeout=60)
    async def test_skipped_survives_a_restart_of_the_process(self) -> None:
        fake = await self.setup_sandbox(12_000)
        listed = fake.follower_openids
        for path in (BATCHGET, USER_INFO):
            fake.poison_openid([listed[1], listed[11_000]], 40003, path=path)
        fake.script_fault(BATCHGET, "45009", 1, openids=[listed[10_000]])  # page 2's first chunk
        first = self.backfill(concurrency=1)
        status = await self.run_to_end(first)
        assert (status["state"], status["pages_done"]) == ("paused", 1), status["last_error"]
        assert status["skipped"] == 1
        await first.stop()
        self.clock.set(status["paused_until"] + 1)
        second = self.backfill()
        await second.start()
        assert second.status()["skipped"] == 1
        status = await self.run_to_end(second)
        assert (status["state"], status["skipped"], status["followers_done"]) == (
            "done", 2, 12_000)
