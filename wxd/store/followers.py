"""OA follower rows as events tell them: subscribe, unsubscribe (and the profile purge), SCAN,
what a backfill run has listed, a template/send answered 43004, and the end-of-backfill sweep
of those no longer following.

Run inside Database.write/read; imports wxd.store.values only (bulk rows: ingest; links: identity).
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Collection

from wxd.store.values import nonblank_str


def _event_is_stale(conn: sqlite3.Connection, oa_openid: str, at: float) -> bool:
    row = conn.execute(
        "SELECT event_at FROM followers WHERE oa_openid = ?", (oa_openid,)
    ).fetchone()
    return row is not None and row["event_at"] is not None and at < row["event_at"]


def record_subscribe(conn: sqlite3.Connection, oa_openid: str, at: float, now: float, *,
                     scene: str | None = None, event_key: str | None = None,
                     ticket: str | None = None) -> bool:
    """Apply a subscribe event created at `at` (CreateTime); ignored if older than an applied
    event. True when applied.

    `scene` is the QR scene (EventKey without "qrscene_"); digits go to qr_scene, text to
    qr_scene_str, as user/info reports them. The unionid comes later, from user/info.
    """
    if _event_is_stale(conn, oa_openid, at):
        return False
    scene = nonblank_str(scene)
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
        (oa_openid, at, qr_scene, qr_scene_str, nonblank_str(event_key), nonblank_str(ticket),
         at, now),
    )
    return True


def record_unsubscribe(conn: sqlite3.Connection, oa_openid: str, at: float, now: float, *,
                       purge: bool = False) -> bool:
    """Apply an unsubscribe event created at `at`: subscribed = 0, unsubscribed_at = at.

    The unionid (hence the link) is kept. With `purge` (WeChat asks developers to delete an
    unfollowed user's data) the profile fields (scene, QR data, event_key, ticket) are cleared;
    oa_openid, unionid, the subscribed flag and the times stay. Ignored when older than an
    applied event. True when applied.
    """
    if _event_is_stale(conn, oa_openid, at):
        return False
    conn.execute(
        "INSERT INTO followers (oa_openid, subscribed, unsubscribed_at, event_at, updated_at)"
        " VALUES (?, 0, ?, ?, ?) ON CONFLICT (oa_openid) DO UPDATE SET subscribed = 0,"
        " unsubscribed_at = excluded.unsubscribed_at, event_at = excluded.event_at,"
        " updated_at = excluded.updated_at",
        (oa_openid, at, at, now),
    )
    if purge:
        _purge_profile(conn, oa_openid, now)
    return True


def _purge_profile(conn: sqlite3.Connection, oa_openid: str, now: float) -> None:
    """Clear a follower's profile fields, keeping what linking needs."""
    conn.execute(
        "UPDATE followers SET subscribe_scene = NULL, qr_scene = NULL, qr_scene_str = NULL,"
        " event_key = NULL, ticket = NULL, updated_at = ? WHERE oa_openid = ?",
        (now, oa_openid),
    )


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


def mark_not_following(conn: sqlite3.Connection, oa_openid: str, observed_at: float,
                       now: float) -> bool:
    """WeChat answered 43004 ("require subscribe") to a send issued at `observed_at`: the
    unsubscribe event was missed (or is late), so subscribed = 0, unsubscribed_at = observed_at.

    Events win as over user/info data (store.ingest): a subscribe or unsubscribe event from the
    observation's second or later is left alone (CreateTime has whole seconds), and a later
    subscribe event flips the row back. Only a known subscribed row changes; True if it did.
    """
    cur = conn.execute(
        "UPDATE followers SET subscribed = 0, unsubscribed_at = ?, updated_at = ?"
        " WHERE oa_openid = ? AND subscribed = 1 AND (event_at IS NULL OR event_at + 1 <= ?)",
        (observed_at, now, oa_openid, observed_at),
    )
    return cur.rowcount == 1


def mark_unseen_unsubscribed(conn: sqlite3.Connection, run: int, now: float, *,
                             since: float | None = None) -> int:
    """At the end of backfill `run`: followers still subscribed but not seen in it → unsubscribed.
    Only after a complete listing (wxd.backfill decides: seen ≈ total).

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


def count_unlisted(conn: sqlite3.Connection, openids: Collection[str], run: int) -> int:
    """How many of the distinct `openids` backfill `run` has not stored (or marked listed) yet:
    the followers a page adds to the run's `seen` once a restart from the head may list some
    again. Run it before the page's rows are written."""
    distinct = set(openids)
    listed = conn.execute(
        "SELECT COUNT(*) FROM followers WHERE synced_run = ?"
        " AND oa_openid IN (SELECT value FROM json_each(?))",
        (run, json.dumps(sorted(distinct), ensure_ascii=False)),
    ).fetchone()[0]
    return len(distinct) - int(listed)


def mark_listed(conn: sqlite3.Connection, openids: Collection[str], run: int) -> int:
    """Backfill `run` listed these openids (user/get) but could not describe them (batchget and
    user/info refused them): their existing rows count as seen by the run, so the end-of-run
    sweep does not judge them (nothing else changes; no row is created). Returns the rows."""
    cur = conn.execute(
        "UPDATE followers SET synced_run = ? WHERE oa_openid IN (SELECT value FROM json_each(?))"
        " AND synced_run IS NOT ?",
        (run, json.dumps(sorted(set(openids)), ensure_ascii=False), run),
    )
    return cur.rowcount
