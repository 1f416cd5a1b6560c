"""Who is whom across the OA and the MP: the unionid join (links), explicit links as lookups
see them, Identity lookups and counts.

Run inside Database.write/read; stdlib only. A link has a source: "unionid" (derived: one
unionid on both sides; the `links` table only records when it was first seen) or "qrcode" /
"oauth" (an explicit_links row, written only by links.bind/unbind). A unionid-derived link
always wins: an explicit link that disagrees with one (link_conflict) is ignored.
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

    Times are unix seconds (None when unknown). `subscribed` is False when there is no follower
    row (an OA web authorization gives the OA openid of a person who never followed).
    `link_source` is "unionid", "qrcode" or "oauth" when both sides are linked; `linked_at` is
    when that link was made (for unionid: the first time both sides carried it). Never holds
    the session_key.
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
    link_source: str | None = None

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
            "link": ({"source": self.link_source, "linked_at": self.linked_at}
                     if self.linked and self.link_source is not None else None),
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


@dataclass(frozen=True)
class ExplicitLink:
    """An explicit_links row: `source` "qrcode" | "oauth", `code_id` the link code that made it
    (None for a link made otherwise), linked_at unix seconds."""

    mp_openid: str
    oa_openid: str
    source: str
    linked_at: float
    code_id: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"mp_openid": self.mp_openid, "oa_openid": self.oa_openid, "source": self.source,
                "linked_at": self.linked_at}


def explicit_link(conn: sqlite3.Connection, *, mp_openid: str | None = None,
                  oa_openid: str | None = None) -> ExplicitLink | None:
    """The explicit_links row of an MP openid (or else of an OA openid), effective or not."""
    if mp_openid is not None:
        row = conn.execute("SELECT * FROM explicit_links WHERE mp_openid = ?",
                           (mp_openid,)).fetchone()
    else:
        row = conn.execute("SELECT * FROM explicit_links WHERE oa_openid = ?",
                           (oa_openid,)).fetchone()
    if row is None:
        return None
    return ExplicitLink(row["mp_openid"], row["oa_openid"], row["source"], row["linked_at"],
                        row["code_id"])


def derived_oa_openid(conn: sqlite3.Connection, mp_openid: str) -> str | None:
    """The OA openid an MP user is linked to through unionid, if any."""
    row = conn.execute(
        "SELECT f.oa_openid FROM mp_users m JOIN followers f ON f.unionid = m.unionid"
        " WHERE m.mp_openid = ? ORDER BY f.subscribed DESC, COALESCE(f.subscribed_at, 0) DESC,"
        " f.updated_at DESC LIMIT 1",
        (mp_openid,),
    ).fetchone()
    return str(row[0]) if row is not None else None


def derived_mp_openid(conn: sqlite3.Connection, oa_openid: str) -> str | None:
    """The MP openid a follower is linked to through unionid, if any."""
    row = conn.execute(
        "SELECT m.mp_openid FROM followers f JOIN mp_users m ON m.unionid = f.unionid"
        " WHERE f.oa_openid = ? ORDER BY m.updated_at DESC LIMIT 1",
        (oa_openid,),
    ).fetchone()
    return str(row[0]) if row is not None else None


def link_conflict(conn: sqlite3.Connection, mp_openid: str, oa_openid: str) -> str | None:
    """Why unionid facts contradict linking these two openids (a sentence), None when they do
    not: either side already linked through unionid to someone else, or both sides carry
    unionids that differ (two different people). Checked when an explicit link is made and
    whenever one is read, so a unionid learned later wins."""
    other_oa = derived_oa_openid(conn, mp_openid)
    if other_oa is not None and other_oa != oa_openid:
        return "the MP user is linked through unionid to another OA follower"
    other_mp = derived_mp_openid(conn, oa_openid)
    if other_mp is not None and other_mp != mp_openid:
        return "the OA follower is linked through unionid to another MP user"
    row = conn.execute(
        "SELECT (SELECT unionid FROM mp_users WHERE mp_openid = ?),"
        " (SELECT unionid FROM followers WHERE oa_openid = ?)",
        (mp_openid, oa_openid),
    ).fetchone()
    if row[0] and row[1] and row[0] != row[1]:
        return "the MP user and the OA follower carry different unionids"
    return None


def find_identity(conn: sqlite3.Connection, *, unionid: str | None = None,
                  mp_openid: str | None = None, oa_openid: str | None = None) -> Identity | None:
    """The identity reached from exactly one key, or None when that key is unknown.

    The unionid join first; when it leaves one side empty, an effective explicit link of the
    known side fills it (the OA side may then have no follower row: subscribed False).
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
        if mp is not None and mp["unionid"]:
            follower = _follower(conn, unionid=mp["unionid"])
    else:
        follower = _follower(conn, oa_openid=oa_openid)
        if follower is not None and follower["unionid"]:
            mp = _mp_user(conn, unionid=follower["unionid"])
    source: str | None = None
    linked_at: float | None = None
    mp_side = mp["mp_openid"] if mp is not None else mp_openid
    oa_side = follower["oa_openid"] if follower is not None else oa_openid
    union = (follower["unionid"] if follower is not None else None) or (
        mp["unionid"] if mp is not None else None
    )
    if follower is not None and mp is not None:
        source = "unionid"
        row = conn.execute("SELECT linked_at FROM links WHERE unionid = ?", (union,)).fetchone()
        linked_at = row["linked_at"] if row is not None else None
    elif mp_side is not None or oa_side is not None:
        explicit = (explicit_link(conn, mp_openid=mp_side) if mp_side is not None
                    else explicit_link(conn, oa_openid=oa_side))
        if explicit is not None and link_conflict(conn, explicit.mp_openid,
                                                  explicit.oa_openid) is None:
            source, linked_at = explicit.source, explicit.linked_at
            mp_side, oa_side = explicit.mp_openid, explicit.oa_openid
            if mp is None:
                mp = _mp_user(conn, mp_openid=mp_side)
            if follower is None:
                follower = _follower(conn, oa_openid=oa_side)
            union = union or (follower["unionid"] if follower is not None else None) or (
                mp["unionid"] if mp is not None else None)
    if source is None:
        if follower is None and mp is None:
            return None
        mp_side = mp["mp_openid"] if mp is not None else None
        oa_side = follower["oa_openid"] if follower is not None else None
    return Identity(
        unionid=union,
        mp_openid=mp_side,
        oa_openid=oa_side,
        subscribed=bool(follower["subscribed"]) if follower is not None else False,
        subscribed_at=follower["subscribed_at"] if follower is not None else None,
        unsubscribed_at=follower["unsubscribed_at"] if follower is not None else None,
        linked_at=linked_at,
        mp_user_since=mp["created_at"] if mp is not None else None,
        last_login_at=mp["session_at"] if mp is not None else None,
        subscribe_scene=follower["subscribe_scene"] if follower is not None else None,
        qr_scene=follower["qr_scene"] if follower is not None else None,
        qr_scene_str=follower["qr_scene_str"] if follower is not None else None,
        link_source=source,
    )


def counts(conn: sqlite3.Connection) -> dict[str, int]:
    """followers, subscribed, with_unionid, mp_users, mp_with_unionid, linked (MP users linked
    to an OA openid by any source; links_by_source splits it)."""
    f = conn.execute(
        "SELECT COUNT(*), COALESCE(SUM(subscribed), 0), COUNT(unionid) FROM followers"
    ).fetchone()
    m = conn.execute("SELECT COUNT(*), COUNT(unionid) FROM mp_users").fetchone()
    return {
        "followers": int(f[0]),
        "subscribed": int(f[1]),
        "with_unionid": int(f[2]),
        "mp_users": int(m[0]),
        "mp_with_unionid": int(m[1]),
        "linked": sum(links_by_source(conn).values()),
    }


def links_by_source(conn: sqlite3.Connection) -> dict[str, int]:
    """Links by source: unionid (the unionid join), qrcode and oauth (explicit links whose MP
    user has no unionid link; one that disagrees with a unionid link elsewhere still counts)."""
    result = {"unionid": int(conn.execute(
        "SELECT COUNT(DISTINCT f.unionid) FROM followers f JOIN mp_users m ON m.unionid = f.unionid"
    ).fetchone()[0]), "qrcode": 0, "oauth": 0}
    for source, count in conn.execute(
        "SELECT e.source, COUNT(*) FROM explicit_links e WHERE NOT EXISTS (SELECT 1 FROM"
        " mp_users m JOIN followers f ON f.unionid = m.unionid WHERE m.mp_openid = e.mp_openid)"
        " GROUP BY e.source"
    ):
        result[str(source)] = int(count)
    return result
