"""MP users (Mini Program logins): session_key, unionid and the encryptedData watermark.

Run inside Database.write/read; imports wxd.store.identity and values only. The session_key is
read back only by session_key(), never into an Identity.
"""

from __future__ import annotations

import sqlite3

from wxd.store.identity import link
from wxd.store.values import nonblank_str


def upsert(conn: sqlite3.Connection, mp_openid: str, unionid: str | None,
           session_key: str | None, now: float) -> bool:
    """Store an MP login (jscode2session answer); True if this made a new link.

    session_key is replaced (with session_at = now) when given; a known unionid is never erased.
    """
    unionid = nonblank_str(unionid)
    conn.execute(
        "INSERT INTO mp_users (mp_openid, unionid, session_key, session_at, created_at, updated_at)"
        " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (mp_openid) DO UPDATE SET"
        " unionid = COALESCE(excluded.unionid, unionid),"
        " session_key = COALESCE(excluded.session_key, session_key),"
        " session_at = CASE WHEN excluded.session_key IS NULL THEN session_at"
        " ELSE excluded.session_at END, updated_at = excluded.updated_at",
        (mp_openid, unionid, session_key, now if session_key else None, now, now),
    )
    return link(conn, unionid, now)


def set_unionid(conn: sqlite3.Connection, mp_openid: str, unionid: str | None,
                watermark_at: float | None, now: float) -> bool:
    """Record what decrypted encryptedData told: unionId and watermark.timestamp (seconds).

    True if this made a new link. A known unionid is never erased; the MP user is created when
    unknown (without a session_key).
    """
    unionid = nonblank_str(unionid)
    watermark = int(watermark_at) if watermark_at is not None else None
    conn.execute(
        "INSERT INTO mp_users (mp_openid, unionid, watermark_at, created_at, updated_at)"
        " VALUES (?, ?, ?, ?, ?) ON CONFLICT (mp_openid) DO UPDATE SET"
        " unionid = COALESCE(excluded.unionid, unionid),"
        " watermark_at = COALESCE(excluded.watermark_at, watermark_at),"
        " updated_at = excluded.updated_at",
        (mp_openid, unionid, watermark, now, now),
    )
    return link(conn, unionid, now)


def session_key(conn: sqlite3.Connection, mp_openid: str) -> str | None:
    """The stored session_key of an MP user (server-side only), or None if never logged in."""
    row = conn.execute("SELECT session_key FROM mp_users WHERE mp_openid = ?",
                       (mp_openid,)).fetchone()
    return row["session_key"] if row is not None else None


def ensure(conn: sqlite3.Connection, mp_openid: str, now: float) -> None:
    """Create the MP user row (no session, no unionid) when it does not exist yet: an explicit
    link names an MP openid the backend may have logged in without wxd."""
    conn.execute(
        "INSERT INTO mp_users (mp_openid, created_at, updated_at) VALUES (?, ?, ?)"
        " ON CONFLICT (mp_openid) DO NOTHING",
        (mp_openid, now, now),
    )
