"""Bulk follower ingest: user/info and batchget answers into `followers` rows, set-based (1M rows
per backfill), the links they make, and the deferred unionid index.

Run inside Database.write (info_rows and batch_rows are pure); imports wxd.store.identity,
schema and values only.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from operator import itemgetter
from typing import Any

from wxd.store.identity import link_followers
from wxd.store.schema import REBUILT_ON_OPEN
from wxd.store.values import int_or_none, nonblank_str

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
_Row = tuple[str, str | None, int, int | None, str | None, int | None, str | None]


def info_rows(infos: Iterable[Mapping[str, Any]]) -> list[_Row]:
    """Clean user/info or batchget entries into rows for batch_rows, in their order: [openid,
    unionid, subscribed, subscribe_time, subscribe_scene, qr_scene, qr_scene_str] (time and
    scene fields None unless subscribed; "" and 0 times become None). Entries without an
    openid are dropped. Pure: the backfill runs it on each answer as it arrives."""
    rows: list[_Row] = []
    for info in infos:
        get = info.get
        openid = nonblank_str(get("openid"))
        if openid is None:
            continue
        if int_or_none(get("subscribe")) != 1:
            rows.append((openid, nonblank_str(get("unionid")), 0, None, None, None, None))
        else:
            rows.append((openid, nonblank_str(get("unionid")), 1,
                         int_or_none(get("subscribe_time")) or None,
                         nonblank_str(get("subscribe_scene")), int_or_none(get("qr_scene")),
                         nonblank_str(get("qr_scene_str"))))
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
    return link_followers(conn, batch.unionids, now)


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
    return apply_info_batch(conn, batch_rows(info_rows(infos)), observed_at, now, run)


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
