"""Owns wxd's single aiosqlite connection: lock file, PRAGMAs, migrations, group commit, backup.

Imports wxd.clock, wxd.errors, wxd.metrics, wxd.store.schema and aiosqlite only. Every write in wxd goes
through `Database.write` or `Database.write_many`: durability and batching are decided here and
nowhere else.
"""

from __future__ import annotations

import asyncio
import fcntl
import functools
import logging
import os
import sqlite3
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import aiosqlite

from wxd.clock import SYSTEM_CLOCK, Clock
from wxd.errors import LockedError, StorageError
from wxd.metrics import Registry
from wxd.store.schema import MIGRATIONS, REBUILT_ON_OPEN

log = logging.getLogger(__name__)
T = TypeVar("T")
ItemT = TypeVar("ItemT")
ResultT = TypeVar("ResultT")
# SQLite's page cache (default 2 MB). The follower table's two indexes outgrow it on a large
# account; 32 MB cuts the backfill's B-tree page reads and is only filled as pages are touched
# (figures: docs/internals.md, "Measured").
CACHE_KB = 32 * 1024
WriteFn = Callable[[sqlite3.Connection], Any]
BatchFn = Callable[[sqlite3.Connection, list[Any]], Sequence[Any]]
Outcome = tuple[bool, Any]


# SQLite's primary result codes for a fault of the database itself rather than of the SQL:
# BUSY, LOCKED, NOMEM, READONLY, IOERR, CORRUPT, FULL, CANTOPEN, PROTOCOL, NOLFS, NOTADB.
# https://www.sqlite.org/rescode.html
_FAULT_CODES = frozenset({5, 6, 7, 8, 10, 11, 13, 14, 15, 22, 26})


def is_storage_fault(exc: sqlite3.Error) -> bool:
    """True for a fault of the database itself (disk full, I/O error, busy, read-only file,
    corruption); False for an IntegrityError or a programming error (SQLITE_ERROR: a syntax
    error, a missing table). An error without a result code (raised by the sqlite3 module
    itself, or by a test) is judged by its type."""
    code = getattr(exc, "sqlite_errorcode", None)
    if isinstance(code, int):
        return code & 0xFF in _FAULT_CODES
    return isinstance(exc, (sqlite3.OperationalError, sqlite3.InternalError)) or \
        type(exc) is sqlite3.DatabaseError


def storage_error(exc: sqlite3.Error) -> StorageError | sqlite3.Error:
    """The error a caller sees for `exc` raised by SQLite: StorageError for a storage fault
    (is_storage_fault), which callers answer with "try again later"; anything else stays what
    it is, so it is never mistaken for an outage."""
    if is_storage_fault(exc):
        error = StorageError(f"database error: {exc}")
        error.__cause__ = exc
        return error
    return exc


class _Single:
    """One `write(fn)` waiting for a commit."""

    __slots__ = ("fn", "future")

    def __init__(self, fn: WriteFn, future: asyncio.Future[Any]) -> None:
        self.fn = fn
        self.future = future


class _Group:
    """The `write_many(batch_fn, item)` calls with one batch_fn waiting for the same commit."""

    __slots__ = ("batch_fn", "futures", "items")

    def __init__(self, batch_fn: BatchFn) -> None:
        self.batch_fn = batch_fn
        self.items: list[Any] = []
        self.futures: list[asyncio.Future[Any]] = []


class FileLock:
    """An exclusive flock on `<database>.lock` holding our pid; released on close or process exit."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._fd: int | None = None

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.read(fd, 32).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            raise LockedError(
                f"database is in use by another wxd process (pid {holder}); lock file {self.path}"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def _in_savepoint(conn: sqlite3.Connection, fn: Callable[[], T]) -> Outcome:
    """(True, fn()) with fn's changes kept, or (False, exc) with them rolled back."""
    conn.execute("SAVEPOINT w")
    try:
        result = fn()
    except Exception as exc:
        if not conn.in_transaction:
            # SQLite rolled the whole transaction back (it may, on SQLITE_FULL, IOERR, BUSY or
            # NOMEM): every write of the batch is lost, so the batch fails with this error.
            raise
        conn.execute("ROLLBACK TO w")
        conn.execute("RELEASE w")
        return False, storage_error(exc) if isinstance(exc, sqlite3.Error) else exc
    conn.execute("RELEASE w")
    return True, result


def _apply_group(conn: sqlite3.Connection, group: _Group) -> list[Outcome]:
    """One batch_fn call for all the group's items; if it raises, each item alone, so every
    caller gets its own result or its own exception."""
    items = group.items

    def run_all() -> list[Any]:
        results = list(group.batch_fn(conn, items))
        if len(results) != len(items):
            raise RuntimeError(f"{getattr(group.batch_fn, '__name__', 'batch_fn')} returned "
                               f"{len(results)} results for {len(items)} items")
        return results

    ok, value = _in_savepoint(conn, run_all)
    if ok:
        return [(True, result) for result in value]
    if len(items) == 1:
        return [(False, value)]
    return [_in_savepoint(conn, functools.partial(_apply_one, conn, group.batch_fn, item))
            for item in items]


def _apply_one(conn: sqlite3.Connection, batch_fn: BatchFn, item: Any) -> Any:
    return batch_fn(conn, [item])[0]


def _apply_batch(conn: sqlite3.Connection, batch: Sequence[_Single | _Group]
                 ) -> list[list[Outcome]]:
    """Run every waiting write in one IMMEDIATE transaction, each write (a single fn, or a
    group's one batch_fn call) inside its own SAVEPOINT. Runs on the database thread."""
    outcomes: list[list[Outcome]] = []
    conn.execute("BEGIN IMMEDIATE")
    try:
        for entry in batch:
            if isinstance(entry, _Group):
                outcomes.append(_apply_group(conn, entry))
            else:
                outcomes.append([_in_savepoint(conn, functools.partial(entry.fn, conn))])
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    return outcomes


def migrate(conn: sqlite3.Connection, migrations: Sequence[str] = MIGRATIONS) -> int:
    """Bring the schema to len(migrations); each step is one transaction. Returns the old version."""
    version = int(conn.execute("PRAGMA user_version").fetchone()[0])
    if version > len(migrations):
        raise StorageError(
            f"database schema version {version} is newer than this wxd ({len(migrations)}); "
            "upgrade wxd or restore a backup"
        )
    for number in range(version + 1, len(migrations) + 1):
        # executescript runs the whole step; an error leaves the transaction open, so roll back.
        try:
            conn.executescript(
                f"BEGIN IMMEDIATE;\n{migrations[number - 1]}\nPRAGMA user_version = {number};\nCOMMIT;"
            )
        except sqlite3.Error as exc:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise StorageError(f"migration {number} failed: {exc}") from exc
        log.info("database migrated to schema version %d", number)
    return version


def _connect_sync(path: str) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    conn.row_factory = sqlite3.Row
    conn.execute("PRAGMA busy_timeout = 5000")
    return conn


def backup_file(source: str, dest: str) -> None:
    """Consistent online copy of `source` into `dest` with SQLite's backup API (one step).

    Safe while the daemon writes: the copy is one read transaction of the WAL database.
    """
    if os.path.exists(dest):
        raise StorageError(f"backup destination {dest} already exists")
    if not os.path.exists(source):
        raise StorageError(f"database {source} does not exist")
    src = _connect_sync(source)
    try:
        target = sqlite3.connect(dest)
        try:
            src.backup(target, pages=0)
            ok = target.execute("PRAGMA integrity_check").fetchone()[0]
            if ok != "ok":
                raise StorageError(f"backup failed its integrity check: {ok}")
        finally:
            target.close()
    finally:
        src.close()


class Database:
    """The single connection. Open with `await Database.open(path)`; close with `await close()`.

    Storage health: `write_error` holds the last storage fault of a write (a failed commit, or
    a write that raised StorageError) and is cleared by the next commit whose writes all
    succeeded; `wxd_storage_up` mirrors it and `wxd_storage_errors_total` counts every fault.
    """

    def __init__(self, conn: aiosqlite.Connection, path: str, lock: FileLock | None,
                 metrics: Registry, clock: Clock = SYSTEM_CLOCK) -> None:
        self._conn = conn
        self._clock = clock
        self.path = path
        self._lock = lock
        self._pending: list[_Single | _Group] = []
        self._groups: dict[BatchFn, _Group] = {}  # the groups in _pending, by batch_fn
        self._committer: asyncio.Task[None] | None = None
        self._closed = False
        self.commits = 0
        self.write_error: str | None = None
        self.write_failing_since: float | None = None
        self._storage_up = metrics.gauge(
            "wxd_storage_up", "1 while database writes succeed; 0 from a write failed by a "
            "storage fault (disk full, I/O, busy, read-only, corrupt) until the next good commit.")
        self._storage_up.set(1)
        self._storage_errors = metrics.counter(
            "wxd_storage_errors_total", "Storage faults met, by operation (read, write).",
            ("op",))
        self._commit_seconds = metrics.histogram(
            "wxd_db_commit_seconds", "Group-commit latency (BEGIN..COMMIT).")
        self._batch_size = metrics.histogram(
            "wxd_db_commit_batch_size", "Writes per group commit.",
            buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500, 1000))

    @classmethod
    async def open(cls, path: str, *, lock: bool = True,
                   metrics: Registry | None = None,
                   clock: Clock = SYSTEM_CLOCK) -> Database:
        """Lock, connect, set PRAGMAs (WAL, synchronous=FULL, busy timeout) and migrate.
        `clock` dates write_failing_since."""
        file_lock: FileLock | None = None
        if lock and path != ":memory:":
            directory = os.path.dirname(os.path.abspath(path))
            if not os.path.isdir(directory):
                raise StorageError(f"database directory {directory} does not exist")
            file_lock = FileLock(path + ".lock")
            file_lock.acquire()
        try:
            conn = await aiosqlite.connect(path, isolation_level=None)
        except sqlite3.Error as exc:
            if file_lock:
                file_lock.release()
            raise StorageError(f"cannot open database {path}: {exc}") from exc
        conn.row_factory = sqlite3.Row
        db = cls(conn, path, file_lock, metrics if metrics is not None else Registry(), clock)
        try:
            await db.read(cls._setup)
        except BaseException:
            await db.close()
            raise
        return db

    @staticmethod
    def _setup(conn: sqlite3.Connection) -> None:
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if mode not in ("wal", "memory"):
            raise StorageError(f"cannot enable WAL (journal_mode is {mode})")
        conn.execute("PRAGMA synchronous = FULL")
        conn.execute(f"PRAGMA cache_size = -{CACHE_KB}")
        conn.execute("PRAGMA busy_timeout = 5000")
        conn.execute("PRAGMA foreign_keys = ON")
        migrate(conn)
        for create in REBUILT_ON_OPEN.values():
            conn.execute(create)

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        # aiosqlite has no public "run this callable on the connection thread"; _execute is that
        # primitive (it is what its own execute/backup use). All use of it is in this method.
        if self._closed:
            raise StorageError("database is closed")
        conn: sqlite3.Connection = self._conn._conn
        result: T = await self._conn._execute(fn, conn, *args)  # type: ignore[no-untyped-call]
        return result

    async def _read(self, fn: Callable[..., T], *args: Any) -> T:
        try:
            return await self._run(fn, *args)
        except sqlite3.Error as exc:
            error = storage_error(exc)
            if error is exc:
                raise
            self._storage_errors.inc(op="read")
        raise error  # outside the except block: the cause is set, no second context

    async def read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run `fn(conn)` on the database thread, outside any write transaction. A storage
        fault is raised as StorageError (like a write's); other errors keep their type."""
        return await self._read(fn)

    async def write(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run `fn(conn)` in the next group commit; return its result once the commit is durable.

        Writes that arrive while a commit is in flight are committed together in the very next
        transaction. If `fn` raises, only its own changes are rolled back and the error is
        re-raised here (a fault of the database itself as StorageError); the other writes of
        the batch still commit.
        """
        future = self._future()
        self._pending.append(_Single(fn, future))
        self._kick()
        result: T = await future
        return result

    async def write_many(self, batch_fn: Callable[[sqlite3.Connection, list[ItemT]], Sequence[ResultT]],
                         item: ItemT) -> ResultT:
        """Apply `item` with `batch_fn` in the next group commit; return its own result.

        The one batching mechanism for hot writes: every item passed with the same batch_fn
        that is waiting when a commit starts is applied by ONE call `batch_fn(conn, items)`
        inside one savepoint, which must return one result per item, in order. An item that
        arrives while a commit is in flight lands in the very next one. If the call raises,
        each item is applied again on its own, so each caller gets its own result or exception.
        """
        future = self._future()
        group = self._groups.get(batch_fn)
        if group is None:
            group = self._groups[batch_fn] = _Group(batch_fn)
            self._pending.append(group)
        group.items.append(item)
        group.futures.append(future)
        self._kick()
        result: ResultT = await future
        return result

    def _future(self) -> asyncio.Future[Any]:
        if self._closed:
            raise StorageError("database is closed")
        return asyncio.get_running_loop().create_future()

    def _kick(self) -> None:
        if self._committer is None or self._committer.done():
            self._committer = asyncio.create_task(self._commit_loop(), name="wxd-db-commit")

    async def _commit_loop(self) -> None:
        while self._pending:
            batch, self._pending, self._groups = self._pending, [], {}
            futures = [f for entry in batch
                       for f in (entry.futures if isinstance(entry, _Group) else [entry.future])]
            started = time.perf_counter()
            try:
                outcomes = await self._run(_apply_batch, batch)
            except Exception as exc:
                log.error("group commit of %d writes failed: %s", len(futures), exc)
                error = StorageError(f"commit failed: {exc}")
                self._write_failed(str(error))
                for future in futures:
                    if not future.done():
                        future.set_exception(error)
                continue
            self.commits += 1
            self._commit_seconds.observe(time.perf_counter() - started)
            self._batch_size.observe(len(futures))
            results = [outcome for group in outcomes for outcome in group]
            faults = [value for ok, value in results
                      if not ok and isinstance(value, StorageError)]
            if faults:
                self._write_failed(str(faults[0]))
            else:
                self._write_ok()
            for future, (ok, value) in zip(futures, results, strict=True):
                if future.done():  # the caller was cancelled; its data is committed anyway
                    continue
                if ok:
                    future.set_result(value)
                else:
                    future.set_exception(value)

    def _write_failed(self, error: str) -> None:
        self._storage_errors.inc(op="write")
        if self.write_error is None:
            self.write_failing_since = self._clock.now()
            log.error("database writes are failing (%s); wxd keeps retrying", error)
        self.write_error = error
        self._storage_up.set(0)

    def _write_ok(self) -> None:
        if self.write_error is not None:
            log.warning("database writes succeed again (failing since %.0f: %s)",
                        self.write_failing_since or 0.0, self.write_error)
        self.write_error = None
        self.write_failing_since = None
        self._storage_up.set(1)

    async def healthy(self) -> bool:
        """True when a trivial query answers; used by /healthz."""
        try:
            row = await asyncio.wait_for(
                self.read(lambda conn: conn.execute("SELECT 1").fetchone()), timeout=2.0)
        except (asyncio.TimeoutError, sqlite3.Error, StorageError, ValueError):
            return False
        return row is not None

    async def backup(self, dest: str) -> None:
        """Online backup from the daemon's own connection (same guarantees as backup_file)."""
        if os.path.exists(dest):
            raise StorageError(f"backup destination {dest} already exists")

        def run(conn: sqlite3.Connection) -> None:
            target = sqlite3.connect(dest)
            try:
                conn.backup(target, pages=0)
            finally:
                target.close()

        await self._read(run)

    async def close(self) -> None:
        """Commit what is pending, close the connection (joins aiosqlite's thread), drop the lock."""
        if self._closed:
            return
        if self._committer is not None:
            await asyncio.shield(self._committer)
        self._closed = True
        try:
            await self._conn.close()
        finally:
            if self._lock:
                self._lock.release()
