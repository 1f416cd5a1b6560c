"""Each app's persisted access_token and its upstream token fetches per budget day (the UTC date).

Run inside Database.write/read; imports wxd.errors only. When to fetch is wxd.tokens' business.
"""

from __future__ import annotations

import datetime
import sqlite3
from dataclasses import dataclass, field

from wxd.errors import TokenBudgetError


def utc_day(now: float) -> str:
    """The budget day of unix time `now`: its UTC date, "YYYY-MM-DD"."""
    return datetime.datetime.fromtimestamp(now, datetime.timezone.utc).strftime("%Y-%m-%d")


@dataclass(frozen=True)
class StoredToken:
    """One app's stored token; times are unix seconds. The token is kept out of repr."""

    appid: str
    access_token: str = field(repr=False)
    expires_at: float
    fetched_at: float


def load(conn: sqlite3.Connection, app: str) -> StoredToken | None:
    """The stored token of `app` ("oa" or "mp"), None when none was ever stored."""
    row = conn.execute(
        "SELECT appid, access_token, expires_at, fetched_at FROM tokens WHERE app = ?", (app,)
    ).fetchone()
    if row is None:
        return None
    return StoredToken(str(row[0]), str(row[1]), float(row[2]), float(row[3]))


def save(conn: sqlite3.Connection, app: str, appid: str, token: str, expires_at: float,
         fetched_at: float) -> None:
    """Store `app`'s token, replacing the previous one."""
    conn.execute(
        "INSERT INTO tokens (app, appid, access_token, expires_at, fetched_at) "
        "VALUES (?, ?, ?, ?, ?) ON CONFLICT (app) DO UPDATE SET appid = excluded.appid, "
        "access_token = excluded.access_token, expires_at = excluded.expires_at, "
        "fetched_at = excluded.fetched_at",
        (app, appid, token, expires_at, fetched_at),
    )


def count_fetch(conn: sqlite3.Connection, app: str, day: str, budget: int) -> int:
    """Count one upstream fetch for `app` on `day` (utc_day); returns the day's count so far.

    Raises TokenBudgetError, counting nothing, when `budget` fetches were already counted.
    """
    row = conn.execute("SELECT count FROM token_fetches WHERE app = ? AND day = ?",
                       (app, day)).fetchone()
    count = int(row[0]) if row else 0
    if count >= budget:
        raise TokenBudgetError(
            f"{app}: the daily budget of {budget} upstream token fetches is spent "
            f"({day} UTC); no fetch before 00:00 UTC ([wechat] token_daily_budget)"
        )
    conn.execute(
        "INSERT INTO token_fetches (app, day, count) VALUES (?, ?, 1) "
        "ON CONFLICT (app, day) DO UPDATE SET count = count + 1", (app, day),
    )
    return count + 1


def fetch_counts(conn: sqlite3.Connection, day: str) -> dict[str, int]:
    """Upstream token fetches per app on `day` (utc_day), e.g. for /v1/stats."""
    rows = conn.execute("SELECT app, count FROM token_fetches WHERE day = ?", (day,)).fetchall()
    return {str(row[0]): int(row[1]) for row in rows}
