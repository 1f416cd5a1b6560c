"""Shared test helpers: a fake clock, eventually() (polling with a deadline), config text factory,
free ports, daemon subprocess runner, log capture, and ad-hoc database reads (tests inspect
tables directly; wxd reads them only through wxd/store/)."""

from __future__ import annotations

import asyncio
import heapq
import inspect
import itertools
import logging
import os
import socket
import sqlite3
import subprocess
import sys
import time
import traceback
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, TypeVar, overload

from wxd.store import inbox
from wxd.store.db import Database
from wxd.store.identity import Identity, find_identity
from wxd.wechat.messages import Message

T = TypeVar("T")

ADMIN_TOKEN = "test-admin-token-0123456789"
WEBHOOK_TOKEN = "testtoken"
AES_KEY = "abcdefghijklmnopqrstuvwxyz0123456789ABCDEFG"
OA_APPID = "wx1234567890abcdef"
MP_APPID = "wxfedcba0987654321"
START = 1_700_000_000.0  # 2023-11-14 22:13:20 UTC


class _FakeTimer:
    def __init__(self) -> None:
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class FakeClock:
    """A wxd.clock.Clock whose time moves only when told: tests advance() instead of sleeping.

    Sleepers, call_later timers and wait() timeouts fire when advance()/set() reaches their
    instant (in time order), so "nothing happened for 30 s" takes no real time. Calling the
    clock returns now() (the sandbox takes a plain callable). With `autojump`, sleep(s) itself
    moves the time by s (and yields once) instead of waiting for advance(): code that paces
    itself (rate limits, backoff) then runs at full speed. Every sleep is recorded in `sleeps`.
    """

    def __init__(self, start: float = START, *, autojump: bool = False) -> None:
        self._now = start
        self.autojump = autojump
        self.sleeps: list[float] = []
        self._timers: list[tuple[float, int, _FakeTimer, Callable[[], object]]] = []
        self._order = itertools.count()

    def now(self) -> float:
        return self._now

    __call__ = now
    monotonic = now

    def set(self, at: float) -> None:
        """Move the time to `at` (forward or back), firing what falls due."""
        self._now = at
        while self._timers and self._timers[0][0] <= self._now:
            _, _, timer, fn = heapq.heappop(self._timers)
            if not timer.cancelled:
                timer.cancelled = True
                fn()

    def advance(self, seconds: float) -> None:
        self.set(self._now + seconds)

    def call_later(self, seconds: float, fn: Callable[[], object]) -> _FakeTimer:
        timer = _FakeTimer()
        if seconds <= 0:
            asyncio.get_running_loop().call_soon(lambda: timer.cancelled or fn())
        else:
            heapq.heappush(self._timers, (self._now + seconds, next(self._order), timer, fn))
        return timer

    def pending(self) -> list[float]:
        """The instants of the timers and sleepers not yet due (sorted)."""
        return sorted(at for at, _, timer, _ in self._timers if not timer.cancelled)

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        if self.autojump or seconds <= 0:
            self.advance(max(seconds, 0.0))
            await asyncio.sleep(0)
            return
        await self._until(seconds, None)

    async def wait(self, event: asyncio.Event, timeout: float | None) -> bool:
        if event.is_set():
            return True
        if timeout is not None and timeout <= 0:
            return False
        await self._until(timeout, event)
        return event.is_set()

    async def _until(self, seconds: float | None, event: asyncio.Event | None) -> None:
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()

        def fire() -> None:
            if not done.done():
                done.set_result(None)

        timer = self.call_later(seconds, fire) if seconds is not None else None
        waiter = asyncio.ensure_future(event.wait()) if event is not None else None
        if waiter is not None:
            waiter.add_done_callback(lambda _: fire())
        try:
            await done
        finally:
            if timer is not None:
                timer.cancel()
            if waiter is not None and not waiter.done():
                waiter.cancel()


@overload
async def eventually(probe: Callable[[], Awaitable[T]], what: str = "", *,
                     until: Callable[[T], object] = bool, timeout: float = 4.0,
                     interval: float = 0.01) -> T: ...


@overload
async def eventually(probe: Callable[[], T], what: str = "", *,
                     until: Callable[[T], object] = bool, timeout: float = 4.0,
                     interval: float = 0.01) -> T: ...


async def eventually(probe: Callable[[], Any], what: str = "", *,
                     until: Callable[[Any], object] = bool, timeout: float = 4.0,
                     interval: float = 0.01) -> Any:
    """Poll `probe()` (plain or async) until `until(value)` holds; return that value.

    For work that takes real time (HTTP, the database thread, other tasks): the deadline is
    real time, `timeout` seconds (under gen_test's default 5 s, so this message is the one
    seen). At the deadline: AssertionError naming `what` and the last value probed. Time that
    wxd reads from an injected clock is moved with FakeClock.advance(), never waited for.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if inspect.isawaitable(value):
            value = await value
        if until(value):
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for "
                                 f"{what or getattr(probe, '__qualname__', probe)}; "
                                 f"last value: {value!r}")
        await asyncio.sleep(interval)


class FakeTime:
    """`self.now` reads and moves `self.clock`, a FakeClock every component shares."""

    clock: FakeClock

    @property
    def now(self) -> float:
        return self.clock.now()

    @now.setter
    def now(self, value: float) -> None:
        self.clock.set(value)


def config_text(database: str, sections: Mapping[str, Mapping[str, object]] | None = None,
                mini_program: bool = True) -> str:
    """A valid wxd.conf for tests; `sections` overrides or adds keys (None value removes a key)."""
    base: dict[str, dict[str, object]] = {
        "wxd": {"database": database, "shutdown_timeout_s": 5, "log_level": "info"},
        "webhook": {"listen": "127.0.0.1:0", "path": "/wechat", "token": WEBHOOK_TOKEN,
                    "encoding_aes_key": AES_KEY},
        "admin": {"listen": "127.0.0.1:0", "token": ADMIN_TOKEN},
        "official_account": {"appid": OA_APPID, "secret": "oa-secret-value"},
        "wechat": {"api_base": "http://127.0.0.1:9"},
    }
    if mini_program:
        base["mini_program"] = {"appid": MP_APPID, "secret": "mp-secret-value"}
    for name, values in (sections or {}).items():
        section = base.setdefault(name, {})
        for key, value in values.items():
            if value is None:
                section.pop(key, None)
            else:
                section[key] = value
    lines: list[str] = []
    for name, values in base.items():
        lines.append(f"[{name}]")
        lines.extend(f"{key} = {value}" for key, value in values.items())
        lines.append("")
    return "\n".join(lines)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wxd_process(args: list[str], env: Mapping[str, str] | None = None) -> subprocess.Popen[str]:
    """Start `python -m wxd ARGS` with stderr captured (text)."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.Popen(
        [sys.executable, "-m", "wxd", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, env=full_env,
    )


def wait_for_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listening on port {port}")


def sandbox_config_text(database: str, creds: object, api_base: str, admin_port: int,
                        webhook_port: int, extra: Mapping[str, Mapping[str, object]] | None = None
                        ) -> str:
    """A wxd.conf pointing at a sandbox with the sandbox's credentials (a Credentials object)."""
    c = creds
    sections: dict[str, dict[str, object]] = {
        "webhook": {"listen": f"127.0.0.1:{webhook_port}", "token": c.webhook_token,  # type: ignore[attr-defined]
                    "encoding_aes_key": c.encoding_aes_key},  # type: ignore[attr-defined]
        "admin": {"listen": f"127.0.0.1:{admin_port}"},
        "official_account": {"appid": c.oa_appid, "secret": c.oa_secret},  # type: ignore[attr-defined]
        "mini_program": {"appid": c.mp_appid, "secret": c.mp_secret},  # type: ignore[attr-defined]
        "wechat": {"api_base": api_base},
        "backfill": {"rate_per_s": 0},
    }
    for name, values in (extra or {}).items():
        sections.setdefault(name, {}).update(values)
    return config_text(database, sections)


# Logs and exceptions --------------------------------------------------------------------------


class LogCapture(logging.Handler):
    """Every record of every logger (DEBUG and up) while active, formatted with tracebacks."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []
        self.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    @property
    def text(self) -> str:
        """The client side's log: tornado.access and wxd.sandbox are the emulated WeChat
        server in this process (its access log shows the URLs WeChat receives)."""
        return "\n".join(self.format(record) for record in self.records
                         if not record.name.startswith(("tornado.access", "wxd.sandbox")))

    def lines(self, logger: str, level: int = logging.WARNING) -> list[str]:
        return [r.getMessage() for r in self.records
                if r.name == logger and r.levelno >= level]


@contextmanager
def capture_logs() -> Iterator[LogCapture]:
    """The root logger at DEBUG into a LogCapture while inside."""
    handler = LogCapture()
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        yield handler
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)


def exception_text(exc: BaseException) -> str:
    """Everything an exception could show: str, repr, attributes and the formatted traceback."""
    return "\n".join([str(exc), repr(exc), repr(vars(exc)),
                      "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))])


# Database -------------------------------------------------------------------------------------


async def fetchone(db: Database, sql: str, params: Sequence[Any] = ()) -> sqlite3.Row | None:
    """The first row of an ad-hoc query, run on the database thread."""
    row: sqlite3.Row | None = await db.read(lambda conn: conn.execute(sql, params).fetchone())
    return row


async def fetchall(db: Database, sql: str, params: Sequence[Any] = ()) -> list[sqlite3.Row]:
    """Every row of an ad-hoc query, run on the database thread."""
    rows: list[sqlite3.Row] = await db.read(lambda conn: conn.execute(sql, params).fetchall())
    return rows


def count_rows(conn: sqlite3.Connection, table: str) -> int:
    return int(conn.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0])  # noqa: S608


def info_entry(openid: str, unionid: str = "", subscribe: int = 1, **extra: Any) -> dict[str, Any]:
    """A user/info (batchget) entry as WeChat answers it; "" for an absent unionid."""
    return {"openid": openid, "unionid": unionid, "subscribe": subscribe, **extra}


def store_message(conn: sqlite3.Connection, message: Message, now: float) -> bool:
    """inbox.store_prepared for one message: True if stored, False for a duplicate."""
    return inbox.store_prepared(conn, [inbox.prepare(message, now)])[0]


class SyncStore:
    """A file database driven synchronously from a test (one event loop per store)."""

    def __init__(self, path: str) -> None:
        self.loop = asyncio.new_event_loop()
        self.db = self.loop.run_until_complete(Database.open(path))

    def write(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        return self.loop.run_until_complete(self.db.write(fn))

    def read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        return self.loop.run_until_complete(self.db.read(fn))

    def identity(self, **key: str) -> Identity | None:
        return self.read(lambda conn: find_identity(conn, **key))

    def row(self, oa_openid: str) -> sqlite3.Row:
        """The follower row of `oa_openid` (it must exist)."""
        row = self.loop.run_until_complete(
            fetchone(self.db, "SELECT * FROM followers WHERE oa_openid = ?", (oa_openid,)))
        assert row is not None
        return row

    def close(self) -> None:
        self.loop.run_until_complete(self.db.close())
        self.loop.close()
