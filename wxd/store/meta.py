"""The `meta` table: one TEXT value per key, for the other store modules.

Run inside Database.write/read; stdlib only. Callers own their keys and how values are encoded,
except for the one shared record below (Paused).
"""

from __future__ import annotations

import json
import sqlite3
from dataclasses import asdict, dataclass
from typing import Any


def get(conn: sqlite3.Connection, key: str) -> str | None:
    """The value stored under `key`, or None when there is none."""
    row = conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
    return str(row[0]) if row is not None else None


def set(conn: sqlite3.Connection, key: str, value: str) -> None:
    """Store `value` under `key`, replacing any previous value."""
    conn.execute(
        "INSERT INTO meta (key, value) VALUES (?, ?)"
        " ON CONFLICT (key) DO UPDATE SET value = excluded.value", (key, value),
    )


def delete(conn: sqlite3.Connection, key: str) -> None:
    """Forget `key` (a no-op when it is not stored)."""
    conn.execute("DELETE FROM meta WHERE key = ?", (key,))


# One shared encoding: why and until when some kind of work is paused (pushes, the backfill).

@dataclass(frozen=True)
class Paused:
    """A persisted pause: `reason` ("quota", "token_budget" or "unreachable"), since when and
    until when (unix s; for "unreachable" the next probe: it ends earlier once WeChat answers
    again), the errcode (None: no WeChat answer) and the address WeChat reported (40164)."""

    reason: str
    since: float
    until: float
    errcode: int | None = None
    ip: str | None = None

    def document(self) -> dict[str, Any]:
        """The JSON of GET /v1/stats and /v1/backfill: reason, errcode, since, and `until` when
        the end is known (not for "unreachable"), `ip` when WeChat reported one."""
        document: dict[str, Any] = {"reason": self.reason, "errcode": self.errcode,
                                    "since": self.since}
        if self.reason != "unreachable":
            document["until"] = self.until
        if self.ip is not None:
            document["ip"] = self.ip
        return document


def load_pause(conn: sqlite3.Connection, key: str) -> Paused | None:
    """The Paused stored under `key`, or None (also for a value this version cannot read)."""
    value = get(conn, key)
    if value is None:
        return None
    try:
        fields = json.loads(value)
        return Paused(str(fields["reason"]), float(fields["since"]), float(fields["until"]),
                      _int_or_none(fields.get("errcode")), _str_or_none(fields.get("ip")))
    except (ValueError, TypeError, KeyError):
        return None


def save_pause(conn: sqlite3.Connection, key: str, pause: Paused | None) -> None:
    """Store `pause` under `key` as JSON; None forgets it."""
    if pause is None:
        delete(conn, key)
        return
    set(conn, key, json.dumps(asdict(pause), separators=(",", ":")))


def _int_or_none(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _str_or_none(value: object) -> str | None:
    return value if isinstance(value, str) else None
