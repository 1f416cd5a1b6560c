"""wxd.store.db and its schema: PRAGMAs, migrations from every version, group commit durability,
lock file, backup."""

from __future__ import annotations

import asyncio
import os
import pathlib
import sqlite3
import subprocess
import sys
import tempfile
import threading
from typing import Any

import pytest
from tornado.testing import AsyncTestCase, gen_test

from tests.helpers import FakeClock, eventually, fetchall, fetchone
from tests.storage_faults import disk_full, outside_writer, read_only
from wxd.errors import LockedError, StorageError
from wxd.metrics import Registry
from wxd.store import db as dbmod
from wxd.store.db import Database, backup_file, migrate, storage_error
from wxd.store.schema import MIGRATIONS, REBUILT_ON_OPEN


def tables(conn: sqlite3.Connection) -> set[str]:
    return {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}


def test_migrate_from_empty_and_from_every_version(tmp_path: pathlib.Path) -> None:
    final: set[str] | None = None
    for start in range(len(MIGRATIONS) + 1):
        path = tmp_path / f"v{start}.db"
        conn = sqlite3.connect(path, isolation_level=None)
        migrate(conn, MIGRATIONS[:start])
        assert conn.execute("PRAGMA user_version").fetchone()[0] == start
        old = migrate(conn)
        assert old == start
        assert conn.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)
        assert migrate(conn) == len(MIGRATIONS)  # idempotent
        names = tables(conn)
        final = final or names
        assert names == final
        conn.close()


def test_indexes_rebuilt_on_open_are_the_migrations_own(tmp_path: pathlib.Path) -> None:
    conn = sqlite3.connect(tmp_path / "x.db", isolation_level=None)
    migrate(conn)

    def definition(name: str) -> str:
        row = conn.execute("SELECT sql FROM sqlite_master WHERE type = 'index' AND name = ?",
                           (name,)).fetchone()
        assert row is not None, name
        return " ".join(row[0].split())

    for name, create in REBUILT_ON_OPEN.items():
        migrated = definition(name)
        conn.execute(f"DROP INDEX {name}")
        conn.execute(create)
        assert definition(name).replace("IF NOT EXISTS ", "") == migrated
        conn.execute(create)  # a no-op when it exists


def test_failed_migration_rolls_back(tmp_path: pathlib.Path) -> None:
    conn = sqlite3.connect(tmp_path / "x.db", isolation_level=None)
    with pytest.raises(StorageError, match="migration 2 failed"):
        migrate(conn, ["CREATE TABLE a (x);", "CREATE TABLE b (y); CREATE TABLE a (z);"])
    assert conn.execute("PRAGMA user_version").fetchone()[0] == 1
    assert "b" not in tables(conn)


def test_newer_schema_is_refused(tmp_path: pathlib.Path) -> None:
    conn = sqlite3.connect(tmp_path / "x.db", isolation_level=None)
    conn.execute(f"PRAGMA user_version = {len(MIGRATIONS) + 1}")
    with pytest.raises(StorageError, match="newer"):
        migrate(conn)


def health(db: Database) -> tuple[str | None, float | None]:
    return db.write_error, db.write_failing_since


class DatabaseTest(AsyncTestCase):
    def setUp(self) -> None:
        super().setUp()
        tmp = tempfile.TemporaryDirectory()
        self.addCleanup(tmp.cleanup)
        self.dir = pathlib.Path(tmp.name)
        self.path = str(self.dir / "wxd.db")

    @gen_test
    async def test_pragmas_and_schema(self) -> None:
        db = await Database.open(self.path)
        try:
            mode = await fetchone(db, "PRAGMA journal_mode")
            sync = await fetchone(db, "PRAGMA synchronous")
            assert mode is not None and mode[0] == "wal"
            assert sync is not None and sync[0] == 2  # FULL
            version = await fetchone(db, "PRAGMA user_version")
            assert version is not None and version[0] == len(MIGRATIONS)
        finally:
            await db.close()

    @gen_test
    async def test_second_open_is_refused_by_the_lock(self) -> None:
        db = await Database.open(self.path)
        try:
            with pytest.raises(LockedError, match=f"pid {os.getpid()}"):
                await Database.open(self.path)
        finally:
            await db.close()
        db2 = await Database.open(self.path)  # released on close
        await db2.close()

    @gen_test
    async def test_group_commit_batches_concurrent_writes(self) -> None:
        db = await Database.open(self.path)
        try:
            def insert(i: int) -> dbmod.WriteFn:
                return lambda conn: conn.execute(
                    "INSERT INTO meta (key, value) VALUES (?, ?)", (f"k{i}", str(i))).lastrowid

            before = db.commits
            await asyncio.gather(*(db.write(insert(i)) for i in range(200)))
            assert db.commits - before < 20  # many writes share a commit
            row = await fetchone(db, "SELECT count(*) FROM meta")
            assert row is not None and row[0] == 200
        finally:
            await db.close()

    @gen_test
    async def test_no_caller_is_acknowledged_before_its_commit(self) -> None:
        db = await Database.open(self.path)
        try:
            seen: list[int] = []

            async def writer(i: int) -> None:
                await db.write(lambda conn: conn.execute(
                    "INSERT INTO meta (key, value) VALUES (?, ?)", (f"k{i}", "v")))
                # Acknowledged: an independent connection must already see the row.
                other = sqlite3.connect(self.path)
                try:
                    found = other.execute("SELECT 1 FROM meta WHERE key = ?", (f"k{i}",)).fetchone()
                finally:
                    other.close()
                assert found is not None
                seen.append(i)

            await asyncio.gather(*(writer(i) for i in range(50)))
            assert len(seen) == 50
        finally:
            await db.close()

    @gen_test
    async def test_failing_write_rolls_back_only_itself(self) -> None:
        db = await Database.open(self.path)
        try:
            def good(conn: sqlite3.Connection) -> None:
                conn.execute("INSERT INTO meta (key, value) VALUES ('good', '1')")

            def bad(conn: sqlite3.Connection) -> None:
                conn.execute("INSERT INTO meta (key, value) VALUES ('bad', '1')")
                raise ValueError("boom")

            results = await asyncio.gather(db.write(good), db.write(bad), db.write(good),
                                           return_exceptions=True)
            assert isinstance(results[1], ValueError)
            assert isinstance(results[2], sqlite3.IntegrityError)  # duplicate of the first
            keys = [r[0] for r in await fetchall(db, "SELECT key FROM meta")]
            assert keys == ["good"]
        finally:
            await db.close()

    @gen_test
    async def test_write_many_applies_waiting_items_in_one_call(self) -> None:
        db = await Database.open(self.path)
        calls: list[list[str]] = []

        def put(conn: sqlite3.Connection, keys: list[str]) -> list[int]:
            calls.append(list(keys))
            return [int(conn.execute("INSERT INTO meta (key, value) VALUES (?, 'v')",
                                     (key,)).lastrowid or 0) for key in keys]

        try:
            before = db.commits
            ids = await asyncio.gather(*(db.write_many(put, f"k{i}") for i in range(50)))
            assert db.commits - before == 1 and calls == [[f"k{i}" for i in range(50)]]
            assert ids == sorted(ids) and len(set(ids)) == 50  # each caller its own result
        finally:
            await db.close()

    @gen_test
    async def test_write_many_failure_is_each_callers_own(self) -> None:
        db = await Database.open(self.path)

        def put(conn: sqlite3.Connection, keys: list[str]) -> list[str]:
            for key in keys:
                if key == "bug":
                    raise KeyError(key)  # a programming error keeps its type
                conn.execute("INSERT INTO meta (key, value) VALUES (?, 'v')", (key,))
            return keys

        try:
            results = await asyncio.gather(
                db.write_many(put, "a"), db.write_many(put, "bug"), db.write_many(put, "b"),
                db.write_many(put, "a"), return_exceptions=True)
            assert results[0] == "a" and results[2] == "b"
            assert isinstance(results[1], KeyError)
            assert isinstance(results[3], sqlite3.IntegrityError)  # a duplicate of "a"
            keys = sorted(r[0] for r in await fetchall(db, "SELECT key FROM meta"))
            assert keys == ["a", "b"]
        finally:
            await db.close()

    @gen_test
    async def test_a_fault_of_the_database_is_a_storage_error(self) -> None:
        db = await Database.open(self.path)

        def full(conn: sqlite3.Connection) -> None:
            raise sqlite3.OperationalError("database or disk is full")

        def full_batch(conn: sqlite3.Connection, items: list[int]) -> list[None]:
            raise sqlite3.OperationalError("database or disk is full")

        try:
            with pytest.raises(StorageError, match="disk is full"):
                await db.write(full)
            with pytest.raises(StorageError, match="disk is full"):
                await db.write_many(full_batch, 1)
        finally:
            await db.close()

    @gen_test
    async def test_reads_raise_storage_faults_as_storage_error_and_keep_other_errors(
            self) -> None:
        metrics = Registry()
        db = await Database.open(self.path, metrics=metrics)
        errors = metrics.counter("wxd_storage_errors_total", "", ("op",))
        try:
            async with read_only(db):
                with pytest.raises(StorageError, match="readonly database") as info:
                    await db.read(lambda conn: conn.execute(
                        "INSERT INTO meta (key, value) VALUES ('r', '1')"))
                assert isinstance(info.value.__cause__, sqlite3.OperationalError)
                assert (await fetchone(db, "SELECT COUNT(*) FROM meta") or [None])[0] == 0
            assert errors.get(op="read") == 1
            # Programming errors are not outages: SQLITE_ERROR keeps its type.
            with pytest.raises(sqlite3.OperationalError, match="no such table"):
                await fetchall(db, "SELECT * FROM nope")
            with pytest.raises(sqlite3.OperationalError, match="syntax error"):
                await fetchone(db, "SELEC 1")
            with pytest.raises(sqlite3.IntegrityError):
                await db.read(lambda conn: conn.executemany(
                    "INSERT INTO meta (key, value) VALUES ('k', '1')", [(), ()]))
            assert errors.get(op="read") == 1
            assert db.write_error is None  # reads do not change the write health
        finally:
            await db.close()

    @gen_test
    async def test_write_health_is_set_by_a_storage_fault_until_a_commit_succeeds(
            self) -> None:
        clock = FakeClock(1000.0)
        metrics = Registry()
        db = await Database.open(self.path, metrics=metrics, clock=clock)
        up = metrics.gauge("wxd_storage_up", "")
        errors = metrics.counter("wxd_storage_errors_total", "", ("op",))

        def put(key: str) -> dbmod.WriteFn:
            return lambda conn: conn.execute("INSERT INTO meta (key, value) VALUES (?, 'v')",
                                             (key,))

        try:
            await db.write(put("before"))
            assert (db.write_error, up.get()) == (None, 1)
            with pytest.raises(sqlite3.IntegrityError):  # not a storage fault
                await db.write(put("before"))
            assert (db.write_error, up.get()) == (None, 1)
            async with read_only(db):
                with pytest.raises(StorageError, match="readonly database"):
                    await db.write(put("during"))
                clock.set(1005.0)
                with pytest.raises(StorageError):
                    await db.write_many(lambda conn, keys: [put(k)(conn) for k in keys], "x")
                assert db.write_error is not None and "readonly database" in db.write_error
                assert (db.write_failing_since, up.get(), errors.get(op="write")) == (1000.0, 0, 2)
            assert db.write_error is not None  # until a write succeeds
            await db.write(put("after"))
            assert health(db) == (None, None)
            assert up.get() == 1
            keys = sorted(r[0] for r in await fetchall(db, "SELECT key FROM meta"))
            assert keys == ["after", "before"]
        finally:
            await db.close()

    @gen_test
    async def test_disk_full_acknowledges_nothing_that_is_not_committed(self) -> None:
        db = await Database.open(self.path)

        def small(conn: sqlite3.Connection) -> None:
            conn.execute("INSERT INTO meta (key, value) VALUES ('small', 'v')")

        def large(conn: sqlite3.Connection) -> None:
            conn.execute("INSERT INTO meta (key, value) VALUES ('large', ?)", ("x" * 200_000,))

        try:
            async with disk_full(db):
                results = await asyncio.gather(db.write(small), db.write(large),
                                               return_exceptions=True)
                assert isinstance(results[1], StorageError)
                assert "database or disk is full" in str(results[1])
                assert db.write_error is not None
                # Whatever a caller was told is true in an independent connection: SQLite may
                # roll the whole transaction back on SQLITE_FULL (then the small write failed
                # too) or only the statement.
                other = sqlite3.connect(self.path)
                try:
                    stored = {r[0] for r in other.execute("SELECT key FROM meta")}
                finally:
                    other.close()
                assert stored == (set() if isinstance(results[0], StorageError) else {"small"})
            # Space again: writes resume on the same connection, no restart.
            await db.write(large)
            assert db.write_error is None
            row = await fetchone(db, "SELECT length(value) FROM meta WHERE key = 'large'")
            assert row is not None and row[0] == 200_000
        finally:
            await db.close()

    @gen_test
    async def test_an_outside_writer_holding_the_lock_fails_writes_until_it_lets_go(
            self) -> None:
        db = await Database.open(self.path)
        try:
            async with outside_writer(db):
                with pytest.raises(StorageError, match="database is locked"):
                    await db.write(lambda conn: conn.execute(
                        "INSERT INTO meta (key, value) VALUES ('k', 'v')"))
                assert db.write_error is not None
                assert (await fetchone(db, "SELECT COUNT(*) FROM meta") or [None])[0] == 0
            await db.write(lambda conn: conn.execute(
                "INSERT INTO meta (key, value) VALUES ('k', 'v')"))
            assert db.write_error is None
        finally:
            await db.close()

    @gen_test(timeout=15)
    async def test_a_backup_tool_checkpointing_behind_a_reader_fails_writes_with_busy(
            self) -> None:
        """A reader alone never blocks a WAL writer; a tool running a TRUNCATE checkpoint
        (as backup scripts do before copying the file) waits for that reader while holding
        the write lock, and the daemon's writes meet SQLITE_BUSY until it is done."""
        db = await Database.open(self.path)
        reader = sqlite3.connect(self.path, isolation_level=None)
        tool = sqlite3.connect(self.path, isolation_level=None, timeout=3.0,
                               check_same_thread=False)
        checkpoint: asyncio.Future[Any] | None = None
        try:
            await db.read(lambda conn: conn.execute("PRAGMA busy_timeout = 20").fetchall())
            reader.execute("BEGIN")
            reader.execute("SELECT COUNT(*) FROM meta").fetchall()
            await db.write(lambda conn: conn.execute(
                "INSERT INTO meta (key, value) VALUES ('with_reader', 'v')"))
            checkpoint = asyncio.get_running_loop().run_in_executor(
                None, lambda: tool.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall())
            async def probe() -> StorageError | None:
                try:
                    await db.write(lambda conn: conn.execute(
                        "INSERT OR REPLACE INTO meta (key, value) VALUES ('probe', 'v')"))
                except StorageError as exc:
                    return exc
                return None

            refused = await eventually(probe, "a write refused while the tool holds the lock",
                                       interval=0.02)
            assert refused is not None and "database is locked" in str(refused)
            assert db.write_error is not None
            reader.execute("COMMIT")
            await checkpoint
            await db.write(lambda conn: conn.execute(
                "INSERT INTO meta (key, value) VALUES ('after', 'v')"))
            assert db.write_error is None
            keys = {r[0] for r in await fetchall(db, "SELECT key FROM meta")} - {"probe"}
            assert keys == {"after", "with_reader"}
        finally:
            if reader.in_transaction:
                reader.execute("COMMIT")
            if checkpoint is not None:  # never close a connection another thread is using
                await asyncio.gather(checkpoint, return_exceptions=True)
            reader.close()
            tool.close()
            await db.close()

    @gen_test
    async def test_an_item_arriving_during_a_commit_lands_in_the_next_one(self) -> None:
        db = await Database.open(self.path)
        started, release = threading.Event(), threading.Event()
        committed_in: dict[str, int] = {}

        def blocker(conn: sqlite3.Connection) -> None:
            started.set()
            release.wait(10)

        def put(conn: sqlite3.Connection, keys: list[str]) -> list[str]:
            return keys

        async def note(name: str, write: Any) -> None:
            await write
            committed_in[name] = db.commits

        try:
            first = asyncio.ensure_future(note("blocker", db.write(blocker)))
            await eventually(started.is_set, "commit N running (blocked on the db thread)")
            others = [asyncio.ensure_future(note("other", db.write(lambda conn: None))),
                      asyncio.ensure_future(note("item", db.write_many(put, "x")))]
            await asyncio.sleep(0)  # their first step submits both writes
            release.set()
            await asyncio.gather(first, *others)
            assert committed_in["item"] == committed_in["other"] == committed_in["blocker"] + 1
        finally:
            release.set()
            await db.close()

    @gen_test
    async def test_writes_after_close_are_refused(self) -> None:
        db = await Database.open(self.path)
        await db.close()
        with pytest.raises(StorageError):
            await db.write(lambda conn: None)
        await db.close()  # idempotent

    @gen_test(timeout=30)
    async def test_backup_under_concurrent_writes_is_consistent(self) -> None:
        db = await Database.open(self.path)
        stop = asyncio.Event()

        async def churn() -> None:
            i = 0
            while not stop.is_set():
                # Each write moves one unit between two rows: the sum is invariant.
                def move(conn: sqlite3.Connection, i: int = i) -> None:
                    conn.execute("INSERT OR IGNORE INTO meta VALUES ('a', '1000')")
                    conn.execute("INSERT OR IGNORE INTO meta VALUES ('b', '0')")
                    conn.execute("UPDATE meta SET value = value - 1 WHERE key = 'a'")
                    conn.execute("UPDATE meta SET value = value + 1 WHERE key = 'b'")
                    conn.execute("INSERT INTO meta VALUES (?, 'x')", (f"row{i}",))
                await db.write(move)
                i += 1

        task = asyncio.create_task(churn())
        try:
            await eventually(lambda: db.commits, "the writes under way", until=lambda n: n >= 10)
            dests = [str(self.dir / f"backup{i}.db") for i in range(3)]
            for dest in dests:
                # The CLI's path: a separate connection, run in a thread as another process would.
                await asyncio.get_running_loop().run_in_executor(None, backup_file, self.path, dest)
                since = db.commits
                await eventually(lambda: db.commits, "more writes between two backups",
                                 until=lambda n: n > since)  # noqa: B023
        finally:
            stop.set()
            await task
            await db.close()
        for dest in dests:
            conn = sqlite3.connect(dest)
            assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
            total = conn.execute(
                "SELECT sum(CAST(value AS INTEGER)) FROM meta WHERE key IN ('a', 'b')").fetchone()
            assert total[0] in (None, 1000)
            conn.close()
        with pytest.raises(StorageError, match="exists"):
            backup_file(self.path, dests[0])


def test_storage_faults_are_told_from_programming_errors(tmp_path: pathlib.Path) -> None:
    path = str(tmp_path / "codes.db")
    conn = sqlite3.connect(path, isolation_level=None)
    other = sqlite3.connect(path, isolation_level=None, timeout=0.01)
    try:
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("CREATE TABLE t (k TEXT PRIMARY KEY)")
        caught: dict[str, sqlite3.Error] = {}

        def catch(name: str, connection: sqlite3.Connection, sql: str) -> None:
            with pytest.raises(sqlite3.Error) as info:
                connection.execute(sql)
            caught[name] = info.value

        conn.execute("INSERT INTO t VALUES ('a')")
        catch("constraint", conn, "INSERT INTO t VALUES ('a')")
        catch("no_table", conn, "SELECT * FROM nope")
        catch("syntax", conn, "SELEC 1")
        conn.execute("BEGIN IMMEDIATE")
        catch("busy", other, "BEGIN IMMEDIATE")
        conn.execute("ROLLBACK")
        conn.execute("PRAGMA query_only = ON")
        catch("read_only", conn, "INSERT INTO t VALUES ('b')")
    finally:
        conn.close()
        other.close()
    faults = {name for name, exc in caught.items()
              if isinstance(storage_error(exc), StorageError)}
    assert faults == {"busy", "read_only"}
    assert storage_error(caught["syntax"]) is caught["syntax"]
    # Raised without a result code (by the sqlite3 module, or a test): judged by its type.
    assert isinstance(storage_error(sqlite3.OperationalError("database or disk is full")),
                      StorageError)
    for error in (sqlite3.IntegrityError("UNIQUE constraint failed"),
                  sqlite3.ProgrammingError("closed")):
        assert storage_error(error) is error


def test_lock_is_released_when_the_holder_is_killed(tmp_path: pathlib.Path) -> None:
    path = str(tmp_path / "x.lock")
    code = ("import sys, time; from wxd.store.db import FileLock; FileLock(sys.argv[1]).acquire(); "
            "print('held', flush=True); time.sleep(60)")
    holder = subprocess.Popen([sys.executable, "-c", code, path], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        with pytest.raises(LockedError, match=f"pid {holder.pid}"):
            dbmod.FileLock(path).acquire()
    finally:
        holder.kill()
        holder.communicate()
    lock = dbmod.FileLock(path)
    lock.acquire()  # a SIGKILLed holder leaves no stale lock
    lock.release()
