"""Follower and MP-user rows and the unionid join between them (the link).

Synchronous write/read functions run inside `Database.write`/`read`; imports the
stdlib and wxd.store.schema (data). A link is derived (same unionid on both sides); the `links` table
only records linked_at.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from operator import itemgetter
from typing import Any

from wxd.store.schema import REBUILT_ON_OPEN


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


def _clean(value: object) -> str | None:
    """A non-empty string or None (WeChat sends "" for absent unionids and scenes)."""
    if value is None:
        return None
    text = str(value).strip()
    return text or None


def _link(conn: sqlite3.Connection, unionid: str | None, now: float) -> bool:
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


def _event_is_stale(conn: sqlite3.Connection, oa_openid: str, at: float) -> bool:
    row = conn.execute(
        "SELECT event_at FROM followers WHERE oa_openid = ?", (oa_openid,)
    ).fetchone()
    return row is not None and row["event_at"] is not None and at < row["event_at"]


def record_subscribe(conn: sqlite3.Connection, oa_openid: str, at: float, now: float, *,
                     scene: str | None = None, event_key: str | None = None,
                     ticket: str | None = None) -> None:
    """Apply a subscribe event created at `at` (CreateTime); ignored if older than an applied event.

    `scene` is the QR scene (EventKey without "qrscene_"); digits go to qr_scene, text to
    qr_scene_str, as user/info reports them. The unionid comes later, from user/info.
    """
    if _event_is_stale(conn, oa_openid, at):
        return
    scene = _clean(scene)
    qr_scene = int(scene) if scene is not None and scene.isdigit() and len(scene) < 12 else None
    qr_scene_str = scene if scene is not None and qr_scene is None else None
    conn.execute(
        "INSERT INTO followers (oa_openid, subscribed, subscribed_at, qr_scene, qr_scene_str,"
        " event_key, ticket, event_at, updated_at) VALUES (?, 1, ?, ?, ?, ?, ?, ?, ?)"
        " ON CONFLICT (oa_openid) DO UPDATE SET subscribed = 1,"
        " subscribed_at = excluded.subscribed_at,"
        " qr_scene = excluded.qr_scene, qr_scene_str = excluded.qr_scene_str,"
        " event_key = excluded.event_key, ticket = excluded.ticket, event_at = excluded.event_at,"
        " updated_at = excluded.updated_at",
        (oa_openid, at, qr_scene, qr_scene_str, _clean(event_key), _clean(ticket), at, now),
    )


def record_unsubscribe(conn: sqlite3.Connection, oa_openid: str, at: float, now: float, *,
                       purge: bool = False) -> None:
    """Apply an unsubscribe event created at `at`: subscribed = 0, unsubscribed_at = at.

    The unionid (hence the link) is kept. With `purge` (WeChat asks developers to delete an
    unfollowed user's data) the profile fields (scene, QR data, event_key, ticket) are cleared;
    oa_openid, unionid, the subscribed flag and the times stay. Ignored when older than an
    applied event.
    """
    if _event_is_stale(conn, oa_openid, at):
        return
    conn.execute(
        "INSERT INTO followers (oa_openid, subscribed, unsubscribed_at, event_at, updated_at)"
        " VALUES (?, 0, ?, ?, ?) ON CONFLICT (oa_openid) DO UPDATE SET subscribed = 0,"
        " unsubscribed_at = excluded.unsubscribed_at, event_at = excluded.event_at,"
        " updated_at = excluded.updated_at",
        (oa_openid, at, at, now),
    )
    if purge:
        purge_profile(conn, oa_openid, now)


def purge_profile(conn: sqlite3.Connection, oa_openid: str, now: float) -> bool:
    """Clear a follower's profile fields, keeping what linking needs. True if the row exists."""
    cur = conn.execute(
        "UPDATE followers SET subscribe_scene = NULL, qr_scene = NULL, qr_scene_str = NULL,"
        " event_key = NULL, ticket = NULL, updated_at = ? WHERE oa_openid = ?",
        (now, oa_openid),
    )
    return cur.rowcount == 1


def _as_int(value: object) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value)
    return None


# One info travels as a JSON array [openid, unionid, subscribed, subscribe_time, subscribe_scene,
# qr_scene, qr_scene_str] (time and scene fields null unless subscribed) inside one JSON text
# per batch: a whole batch is one statement, so aiosqlite's thread takes the GIL once per batch
# instead of once per row (per-row GIL handoffs starved it while the event loop was busy).
# excluded.subscribed_at is the raw subscribe_time: without one, an existing row keeps its time.
_INSERT_INFOS = (
    "INSERT INTO followers (oa_openid, unionid, subscribed, subscribed_at, subscribe_scene,"
    " qr_scene, qr_scene_str, synced_run, synced_at, updated_at)"
    " SELECT json_extract(value, '$[0]'), json_extract(value, '$[1]'),"
    " json_extract(value, '$[2]'), json_extract(value, '$[3]'), json_extract(value, '$[4]'),"
    " json_extract(value, '$[5]'), json_extract(value, '$[6]'), ?1, ?2, ?3"
    " FROM json_each(?4) WHERE true"  # "WHERE true": SQLite's upsert-after-SELECT syntax rule
    " ON CONFLICT (oa_openid) DO UPDATE SET"
)
_NO_NEWER_EVENT = "(followers.event_at IS NULL OR followers.event_at + 1 <= excluded.synced_at)"
_UPDATE_INFO = (
    f" subscribed = CASE WHEN {_NO_NEWER_EVENT} THEN excluded.subscribed"
    "   ELSE followers.subscribed END,"
    f" subscribed_at = CASE WHEN {_NO_NEWER_EVENT} AND excluded.subscribed = 1"
    "   THEN COALESCE(excluded.subscribed_at, followers.subscribed_at, excluded.synced_at)"
    "   ELSE followers.subscribed_at END,"
    f" unsubscribed_at = CASE WHEN {_NO_NEWER_EVENT} AND excluded.subscribed = 0"
    "   AND followers.subscribed = 1 THEN excluded.synced_at ELSE followers.unsubscribed_at END,"
    " subscribe_scene = COALESCE(excluded.subscribe_scene, followers.subscribe_scene),"
    " qr_scene = COALESCE(excluded.qr_scene, followers.qr_scene),"
    " qr_scene_str = COALESCE(excluded.qr_scene_str, followers.qr_scene_str),"
    " synced_run = COALESCE(excluded.synced_run, followers.synced_run),"
    " synced_at = excluded.synced_at, updated_at = excluded.updated_at"
)
# An UPDATE that sets unionid rewrites the row's followers_unionid entry even when the value is
# the same: in a re-sync, a random index page written per row instead of a few per batch (figures:
# docs/internals.md). So _UPSERT_INFOS leaves alone the rows whose unionid changes (it
# then reports fewer changes than rows) and _UPSERT_INFOS_NEW_UNIONID updates just those.
_UPSERT_INFOS = (
    _INSERT_INFOS + _UPDATE_INFO
    + " WHERE excluded.unionid IS NULL OR excluded.unionid IS followers.unionid"
)
_UPSERT_INFOS_NEW_UNIONID = (
    _INSERT_INFOS + " unionid = excluded.unionid," + _UPDATE_INFO
    + " WHERE excluded.unionid IS NOT NULL AND excluded.unionid IS NOT followers.unionid"
)
# A new subscribed row without a subscribe_time was subscribed when observed (synced_at).
_OBSERVED_AS_SUBSCRIBED_AT = (
    "UPDATE followers SET subscribed_at = synced_at WHERE oa_openid IN"
    " (SELECT value FROM json_each(?)) AND subscribed = 1 AND subscribed_at IS NULL"
)
_ANY_MP_UNIONID = "SELECT EXISTS (SELECT 1 FROM mp_users WHERE unionid IS NOT NULL)"
_LINK_KNOWN_MP = (
    "INSERT INTO links (unionid, linked_at) SELECT m.unionid, ? FROM json_each(?) j, mp_users m"
    " WHERE m.unionid = j.value ON CONFLICT (unionid) DO NOTHING RETURNING unionid"
)
_Row = tuple[str, str | None, int, int | None, str | None, int | None, str | None]


def _text(value: object) -> str | None:
    """_clean with a fast path for the usual case (a str)."""
    if type(value) is str:
        return value.strip() or None
    return _clean(value)


def _int(value: object) -> int | None:
    """_as_int with a fast path for the usual case (an int)."""
    return value if type(value) is int else _as_int(value)


def info_rows(infos: Iterable[Mapping[str, Any]]) -> list[_Row]:
    """Clean user/info or batchget entries into rows for batch_rows, in their order: [openid,
    unionid, subscribed, subscribe_time, subscribe_scene, qr_scene, qr_scene_str] (time and
    scene fields None unless subscribed; "" and 0 times become None). Entries without an
    openid are dropped. Pure: the backfill runs it on each answer as it arrives."""
    rows: list[_Row] = []
    for info in infos:
        get = info.get
        openid = _text(get("openid"))
        if openid is None:
            continue
        if _int(get("subscribe")) != 1:
            rows.append((openid, _text(get("unionid")), 0, None, None, None, None))
        else:
            rows.append((openid, _text(get("unionid")), 1, _int(get("subscribe_time")) or None,
                         _text(get("subscribe_scene")), _int(get("qr_scene")),
                         _text(get("qr_scene_str"))))
    return rows


@dataclass(frozen=True)
class InfoBatch:
    """Rows (info_rows) prepared for apply_info_batch: sorted by openid (stable, so entries for
    one openid keep their order) and encoded as the batch's JSON text. Pure data: build it off
    the database thread (the backfill does, on the event loop) and keep it instead of the dicts
    (about a tenth of their memory)."""

    rows: tuple[_Row, ...]
    text: str                 # json of `rows`: the parameter of the set-based statements
    distinct: bool            # no openid repeats
    untimed: tuple[str, ...]  # openids subscribed without a subscribe_time
    unionids: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.rows)


def batch_rows(rows: list[_Row]) -> InfoBatch:
    """An InfoBatch of `rows` (sorted in place)."""
    rows.sort(key=itemgetter(0))  # fewer index page loads in key order; stable for repeats
    return InfoBatch(
        rows=tuple(rows), text=json.dumps(rows, ensure_ascii=False),
        distinct=len({row[0] for row in rows}) == len(rows),
        untimed=tuple(row[0] for row in rows if row[2] == 1 and row[3] is None),
        unionids=tuple(row[1] for row in rows if row[1] is not None),
    )


def prepare_infos(infos: Iterable[Mapping[str, Any]]) -> InfoBatch:
    """Clean and encode user/info or batchget entries (entries without an openid are dropped)."""
    return batch_rows(info_rows(infos))


def _upsert_rows(conn: sqlite3.Connection, text: str, count: int, untimed: Sequence[str],
                 run: int | None, observed_at: float, now: float) -> None:
    """Upsert `count` rows with distinct openids, given as JSON `text` (the second statement
    runs after all the first's)."""
    params = (run, observed_at, now, text)
    if conn.execute(_UPSERT_INFOS, params).rowcount < count:
        conn.execute(_UPSERT_INFOS_NEW_UNIONID, params)
    if untimed:
        conn.execute(_OBSERVED_AS_SUBSCRIBED_AT, (json.dumps(untimed, ensure_ascii=False),))


def apply_info_batch(conn: sqlite3.Connection, batch: InfoBatch, observed_at: float, now: float,
                     run: int | None = None) -> list[str]:
    """apply_user_infos for a prepared batch; returns the unionids newly linked."""
    if batch.distinct:
        _upsert_rows(conn, batch.text, len(batch.rows), batch.untimed, run, observed_at, now)
    else:  # an openid repeats: its entries apply one after the other
        for row in batch.rows:
            untimed = (row[0],) if row[2] == 1 and row[3] is None else ()
            _upsert_rows(conn, json.dumps([row], ensure_ascii=False), 1, untimed, run,
                         observed_at, now)
    # No MP user with a unionid (none yet, or an OA-only deployment): nothing can link.
    if not batch.unionids or not conn.execute(_ANY_MP_UNIONID).fetchone()[0]:
        return []
    linked = conn.execute(_LINK_KNOWN_MP, (now, json.dumps(batch.unionids))).fetchall()
    return [row[0] for row in linked]


def apply_user_infos(conn: sqlite3.Connection, infos: Sequence[Mapping[str, Any]],
                     observed_at: float, now: float, run: int | None = None) -> list[str]:
    """Store user/info or batchget entries observed at `observed_at`; return unionids newly linked.

    Never overwrites a known unionid with an empty one (WeChat drops unionid once a user
    unfollows). "Events win": `subscribed` is only changed when no event newer than
    `observed_at` was applied (CreateTime has whole seconds: an event is taken to happen at the
    end of its second, so a user/info answer from the same second never overrides it).
    `run` marks the rows seen by a backfill run.
    Entries without an openid (or error entries) are skipped; entries for one openid apply in
    order. Set-based (the backfill stores 1M rows with it): a few statements per batch, each
    over the whole batch, and one statement for the links.
    """
    return apply_info_batch(conn, prepare_infos(infos), observed_at, now, run)


def defer_unionid_index(conn: sqlite3.Connection, max_rows: int) -> bool:
    """Drop the followers_unionid index for a bulk load if the table holds fewer than `max_rows`
    rows; True if it is now absent. Building it once at the end (restore_unionid_index, or the next
    Database.open after a crash) costs a fraction of keeping it up to date row by row: each new
    follower is a random insert into it. Until then, lookups by unionid scan the table."""
    rows = conn.execute("SELECT COUNT(*) FROM (SELECT 1 FROM followers LIMIT ?)",
                        (max_rows,)).fetchone()[0]
    if rows >= max_rows:
        return False
    conn.execute("DROP INDEX IF EXISTS followers_unionid")
    return True


def restore_unionid_index(conn: sqlite3.Connection) -> None:
    """Build followers_unionid if defer_unionid_index dropped it (else a no-op)."""
    conn.execute(REBUILT_ON_OPEN["followers_unionid"])


def record_scan(conn: sqlite3.Connection, oa_openid: str, at: float, now: float,
                 event_key: str, ticket: str) -> bool:
    """Keep a SCAN event's EventKey/Ticket on the follower row; False if the row is unknown.

    Only the event_key/ticket columns change (SCAN says nothing about the subscription state or
    event_at), and not when a newer event was applied.
    """
    cur = conn.execute(
        "UPDATE followers SET event_key = ?, ticket = ?, updated_at = ?"
        " WHERE oa_openid = ? AND (event_at IS NULL OR event_at <= ?)",
        (event_key or None, ticket or None, now, oa_openid, at),
    )
    if cur.rowcount:
        return True
    return bool(conn.execute(
        "SELECT EXISTS (SELECT 1 FROM followers WHERE oa_openid = ?)", (oa_openid,)
    ).fetchone()[0])


def upsert_mp_user(conn: sqlite3.Connection, mp_openid: str, unionid: str | None,
                   session_key: str | None, now: float) -> bool:
    """Store an MP login (jscode2session answer); True if this made a new link.

    session_key is replaced (with session_at = now) when given; a known unionid is never erased.
    """
    unionid = _clean(unionid)
    conn.execute(
        "INSERT INTO mp_users (mp_openid, unionid, session_key, session_at, created_at, updated_at)"
        " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (mp_openid) DO UPDATE SET"
        " unionid = COALESCE(excluded.unionid, unionid),"
        " session_key = COALESCE(excluded.session_key, session_key),"
        " session_at = CASE WHEN excluded.session_key IS NULL THEN session_at"
        " ELSE excluded.session_at END, updated_at = excluded.updated_at",
        (mp_openid, unionid, session_key, now if session_key else None, now, now),
    )
    return _link(conn, unionid, now)


def set_mp_unionid(conn: sqlite3.Connection, mp_openid: str, unionid: str | None,
                   watermark_at: float | None, now: float) -> bool:
    """Record what decrypted encryptedData told: unionId and watermark.timestamp (seconds).

    True if this made a new link. A known unionid is never erased; the MP user is created when
    unknown (without a session_key).
    """
    unionid = _clean(unionid)
    watermark = int(watermark_at) if watermark_at is not None else None
    conn.execute(
        "INSERT INTO mp_users (mp_openid, unionid, watermark_at, created_at, updated_at)"
        " VALUES (?, ?, ?, ?, ?) ON CONFLICT (mp_openid) DO UPDATE SET"
        " unionid = COALESCE(excluded.unionid, unionid),"
        " watermark_at = COALESCE(excluded.watermark_at, watermark_at),"
        " updated_at = excluded.updated_at",
        (mp_openid, unionid, watermark, now, now),
    )
    return _link(conn, unionid, now)


def mark_unseen_unsubscribed(conn: sqlite3.Connection, run: int, now: float, *,
                             since: float | None = None) -> int:
    """At the end of backfill `run`: followers still subscribed but not seen in it → unsubscribed.

    Events win: followers with an event at or after `since` (the run's start; default: the
    earliest synced_at of the run) are left alone. Returns how many rows changed.
    """
    if since is None:
        since = conn.execute(
            "SELECT MIN(synced_at) FROM followers WHERE synced_run = ?", (run,)
        ).fetchone()[0]
    cur = conn.execute(
        "UPDATE followers SET subscribed = 0, unsubscribed_at = ?, updated_at = ?"
        " WHERE subscribed = 1 AND (synced_run IS NULL OR synced_run != ?)"
        " AND (event_at IS NULL OR ? IS NULL OR event_at < ?)",
        (now, now, run, since, since),
    )
    return cur.rowcount


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


def session_key(conn: sqlite3.Connection, mp_openid: str) -> str | None:
    """The stored session_key of an MP user (server-side only), or None if never logged in."""
    row = conn.execute("SELECT session_key FROM mp_users WHERE mp_openid = ?",
                       (mp_openid,)).fetchone()
    return row["session_key"] if row is not None else None


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
