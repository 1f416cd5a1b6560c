"""Who is whom across the OA and the MP: the unionid join (links), Identity lookups and counts.

Run inside Database.write/read; stdlib only. A link is derived (one unionid on both sides); the
`links` table only records when it was first seen (linked_at).
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Identity:
    """One person as wxd knows them: MP side, OA side, or both (linked through unionid).

    Times are unix seconds (None when unknown). `subscribed` is False when there is no follower.
    `linked_at` is the first time both sides carried the unionid. Never holds the session_key.
    """

    unionid: str | None
    mp_openid: str | None
    oa_openid: str | None
    subscribed: bool
    subscribed_at: float | None
    unsubscribed_at: float | None
    linked_at: float | None
    mp_user_since: float | None
    last_login_at: float | None = None
    subscribe_scene: str | None = None
    qr_scene: int | None = None
    qr_scene_str: str | None = None

    @property
    def linked(self) -> bool:
        return self.mp_openid is not None and self.oa_openid is not None

    def to_json(self) -> dict[str, Any]:
        return {
            "unionid": self.unionid,
            "mp_openid": self.mp_openid,
            "oa_openid": self.oa_openid,
            "subscribed": self.subscribed,
            "subscribed_at": self.subscribed_at,
            "unsubscribed_at": self.unsubscribed_at,
            "linked": self.linked,
            "linked_at": self.linked_at,
            "mp_user_since": self.mp_user_since,
            "last_login_at": self.last_login_at,
            "subscribe_scene": self.subscribe_scene,
            "qr_scene": self.qr_scene,
            "qr_scene_str": self.qr_scene_str,
        }


# Links ------------------------------------------------------------------------------------------


def link(conn: sqlite3.Connection, unionid: str | None, now: float) -> bool:
    """Record linked_at the first time `unionid` is on both sides; True only that first time."""
    if not unionid:
        return False
    both = conn.execute(
        "SELECT EXISTS (SELECT 1 FROM followers WHERE unionid = ?)"
        " AND EXISTS (SELECT 1 FROM mp_users WHERE unionid = ?)",
        (unionid, unionid),
    ).fetchone()[0]
    if not both:
        return False
    cur = conn.execute(
        "INSERT INTO links (unionid, linked_at) VALUES (?, ?) ON CONFLICT (unionid) DO NOTHING",
        (unionid, now),
    )
    return cur.rowcount == 1


_ANY_MP_UNIONID = "SELECT EXISTS (SELECT 1 FROM mp_users WHERE unionid IS NOT NULL)"
_LINK_KNOWN_MP = (
    "INSERT INTO links (unionid, linked_at) SELECT m.unionid, ? FROM json_each(?) j, mp_users m"
    " WHERE m.unionid = j.value ON CONFLICT (unionid) DO NOTHING RETURNING unionid"
)


def link_followers(conn: sqlite3.Connection, unionids: Sequence[str], now: float) -> list[str]:
    """link() for the unionids just stored on followers, in one statement; returns those newly
    linked (an MP user carries it and it was never linked before)."""
    # No MP user with a unionid (none yet, or an OA-only deployment): nothing can link.
    if not unionids or not conn.execute(_ANY_MP_UNIONID).fetchone()[0]:
        return []
    linked = conn.execute(_LINK_KNOWN_MP, (now, json.dumps(unionids))).fetchall()
    return [row[0] for row in linked]


def unionid_missing(conn: sqlite3.Connection) -> bool:
    """True when synced followers exist and none carries a unionid: the OA is probably not
    bound to an Open Platform account, so no MP user can ever be linked."""
    # The indexed NOT EXISTS first: it settles the common (bound) case at once.
    return bool(conn.execute(
        "SELECT NOT EXISTS (SELECT 1 FROM followers WHERE unionid IS NOT NULL)"
        " AND EXISTS (SELECT 1 FROM followers WHERE subscribed = 1"
        " AND synced_at IS NOT NULL AND unionid IS NULL)"
    ).fetchone()[0])


# Reads ------------------------------------------------------------------------------------------


def _follower(conn: sqlite3.Connection, *, unionid: str | None = None,
              oa_openid: str | None = None) -> sqlite3.Row | None:
    row: sqlite3.Row | None
    if oa_openid is not None:
        row = conn.execute("SELECT * FROM followers WHERE oa_openid = ?", (oa_openid,)).fetchone()
    else:
        # Several followers with one unionid cannot happen in WeChat; prefer the subscribed/latest.
        row = conn.execute(
            "SELECT * FROM followers WHERE unionid = ? ORDER BY subscribed DESC,"
            " COALESCE(subscribed_at, 0) DESC, updated_at DESC LIMIT 1",
            (unionid,),
        ).fetchone()
    return row


def _mp_user(conn: sqlite3.Connection, *, unionid: str | None = None,
             mp_openid: str | None = None) -> sqlite3.Row | None:
    row: sqlite3.Row | None
    if mp_openid is not None:
        row = conn.execute("SELECT * FROM mp_users WHERE mp_openid = ?", (mp_openid,)).fetchone()
    else:
        row = conn.execute(
            "SELECT * FROM mp_users WHERE unionid = ? ORDER BY updated_at DESC LIMIT 1", (unionid,)
        ).fetchone()
    return row


def find_identity(conn: sqlite3.Connection, *, unionid: str | None = None,
                  mp_openid: str | None = None, oa_openid: str | None = None) -> Identity | None:
    """The identity reached from exactly one key, or None when that key is unknown.

    Raises ValueError unless exactly one key is given.
    """
    if sum(key is not None for key in (unionid, mp_openid, oa_openid)) != 1:
        raise ValueError("find_identity takes exactly one of unionid, mp_openid, oa_openid")
    follower: sqlite3.Row | None = None
    mp: sqlite3.Row | None = None
    if unionid is not None:
        follower = _follower(conn, unionid=unionid)
        mp = _mp_user(conn, unionid=unionid)
    elif mp_openid is not None:
        mp = _mp_user(conn, mp_openid=mp_openid)
        if mp is None:
            return None
        if mp["unionid"]:
            follower = _follower(conn, unionid=mp["unionid"])
    else:
        follower = _follower(conn, oa_openid=oa_openid)
        if follower is None:
            return None
        if follower["unionid"]:
            mp = _mp_user(conn, unionid=follower["unionid"])
    if follower is None and mp is None:
        return None
    union = (follower["unionid"] if follower is not None else None) or (
        mp["unionid"] if mp is not None else None
    )
    linked_at: float | None = None
    if follower is not None and mp is not None and union:
        row = conn.execute("SELECT linked_at FROM links WHERE unionid = ?", (union,)).fetchone()
        linked_at = row["linked_at"] if row is not None else None
    return Identity(
        unionid=union,
        mp_openid=mp["mp_openid"] if mp is not None else None,
        oa_openid=follower["oa_openid"] if follower is not None else None,
        subscribed=bool(follower["subscribed"]) if follower is not None else False,
        subscribed_at=follower["subscribed_at"] if follower is not None else None,
        unsubscribed_at=follower["unsubscribed_at"] if follower is not None else None,
        linked_at=linked_at,
        mp_user_since=mp["created_at"] if mp is not None else None,
        last_login_at=mp["session_at"] if mp is not None else None,
        subscribe_scene=follower["subscribe_scene"] if follower is not None else None,
        qr_scene=follower["qr_scene"] if follower is not None else None,
        qr_scene_str=follower["qr_scene_str"] if follower is not None else None,
    )


def counts(conn: sqlite3.Connection) -> dict[str, int]:
    """followers, subscribed, with_unionid, mp_users, mp_with_unionid, linked (the unionid join)."""
    f = conn.execute(
        "SELECT COUNT(*), COALESCE(SUM(subscribed), 0), COUNT(unionid) FROM followers"
    ).fetchone()
    m = conn.execute("SELECT COUNT(*), COUNT(unionid) FROM mp_users").fetchone()
    linked = conn.execute(
        "SELECT COUNT(DISTINCT f.unionid) FROM followers f JOIN mp_users m ON m.unionid = f.unionid"
    ).fetchone()[0]
    return {
        "followers": int(f[0]),
        "subscribed": int(f[1]),
        "with_unionid": int(f[2]),
        "mp_users": int(m[0]),
        "mp_with_unionid": int(m[1]),
        "linked": int(linked),
    }
