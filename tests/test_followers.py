"""The followers/mp_users/links storage contract on a real SQLite file (through Database.write)."""

from __future__ import annotations

import asyncio
import pathlib
import sqlite3
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import pytest

from wxd.store import followers
from wxd.store.db import Database

T = TypeVar("T")


class Store:
    """A file database driven synchronously from a test (one event loop per Store)."""

    def __init__(self, path: str) -> None:
        self.loop = asyncio.new_event_loop()
        self.db = self.loop.run_until_complete(Database.open(path))

    def write(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        return self.loop.run_until_complete(self.db.write(fn))

    def read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        return self.loop.run_until_complete(self.db.read(fn))

    def identity(self, **key: str) -> followers.Identity | None:
        return self.read(lambda conn: followers.find_identity(conn, **key))

    def row(self, oa_openid: str) -> sqlite3.Row:
        row = self.loop.run_until_complete(
            self.db.fetchone("SELECT * FROM followers WHERE oa_openid = ?", (oa_openid,))
        )
        assert row is not None
        return row

    def close(self) -> None:
        self.loop.run_until_complete(self.db.close())
        self.loop.close()


@pytest.fixture
def store(tmp_path: pathlib.Path) -> Iterator[Store]:
    s = Store(str(tmp_path / "wxd.db"))
    try:
        yield s
    finally:
        s.close()


def info(openid: str, unionid: str = "", subscribe: int = 1, **extra: Any) -> dict[str, Any]:
    return {"openid": openid, "unionid": unionid, "subscribe": subscribe, **extra}


def test_subscribe_then_user_info_links_existing_mp_user(store: Store) -> None:
    assert store.write(lambda c: followers.upsert_mp_user(c, "mp1", "u1", "sk", 100.0)) is False
    store.write(lambda c: followers.record_subscribe(c, "oa1", 200, 201.0))
    assert store.identity(oa_openid="oa1") == followers.Identity(
        unionid=None, mp_openid=None, oa_openid="oa1", subscribed=True, subscribed_at=200,
        unsubscribed_at=None, linked_at=None, mp_user_since=None,
    )
    newly = store.write(lambda c: followers.apply_user_infos(
        c, [info("oa1", "u1", subscribe_time=200)], 202.0, 203.0))
    assert newly == ["u1"]
    ident = store.identity(mp_openid="mp1")
    assert ident is not None
    assert (ident.unionid, ident.oa_openid, ident.subscribed, ident.linked_at) == (
        "u1", "oa1", True, 203.0)
    assert ident.mp_user_since == 100.0 and ident.last_login_at == 100.0
    # Applying the same data again links nothing new and keeps linked_at.
    assert store.write(lambda c: followers.apply_user_infos(c, [info("oa1", "u1")], 300, 301)) == []
    again = store.identity(unionid="u1")
    assert again is not None and again.linked_at == 203.0


def test_follower_first_links_on_login(store: Store) -> None:
    store.write(lambda c: followers.apply_user_infos(c, [info("oa1", "u1")], 50, 51))
    assert store.write(lambda c: followers.upsert_mp_user(c, "mp1", "u1", "sk", 60.0)) is True
    assert store.write(lambda c: followers.upsert_mp_user(c, "mp1", "u1", "sk2", 70.0)) is False
    ident = store.identity(oa_openid="oa1")
    assert ident is not None and ident.mp_openid == "mp1" and ident.linked_at == 60.0
    assert ident.last_login_at == 70.0 and ident.mp_user_since == 60.0
    assert store.read(lambda c: followers.session_key(c, "mp1")) == "sk2"
    assert "sk2" not in repr(ident.to_json())


def test_unionid_is_never_erased(store: Store) -> None:
    store.write(lambda c: followers.apply_user_infos(c, [info("oa1", "u1")], 10, 10))
    # Unfollowed users come back from user/info without unionid.
    store.write(lambda c: followers.apply_user_infos(c, [{"openid": "oa1", "subscribe": 0}], 20, 20))
    row = store.row("oa1")
    assert row["unionid"] == "u1" and row["subscribed"] == 0 and row["unsubscribed_at"] == 20
    store.write(lambda c: followers.upsert_mp_user(c, "mp1", "u9", "sk", 30))
    store.write(lambda c: followers.upsert_mp_user(c, "mp1", None, "sk3", 40))
    store.write(lambda c: followers.set_mp_unionid(c, "mp1", "", 41, 42))
    ident = store.identity(mp_openid="mp1")
    assert ident is not None and ident.unionid == "u9"


def test_events_win_over_older_observations(store: Store) -> None:
    store.write(lambda c: followers.apply_user_infos(c, [info("oa1", "u1")], 100, 100))
    store.write(lambda c: followers.record_unsubscribe(c, "oa1", 200, 201))
    # A batchget page fetched before the unsubscribe event still says subscribe=1.
    store.write(lambda c: followers.apply_user_infos(c, [info("oa1", "u1")], 150, 300))
    assert store.row("oa1")["subscribed"] == 0
    # A later observation does change it (the user followed again, event lost).
    store.write(lambda c: followers.apply_user_infos(
        c, [info("oa1", "u1", subscribe_time=350)], 400, 400))
    row = store.row("oa1")
    assert row["subscribed"] == 1 and row["subscribed_at"] == 350
    # The reverse: a subscribe event newer than a subscribe=0 observation wins.
    store.write(lambda c: followers.record_subscribe(c, "oa2", 500, 501))
    store.write(lambda c: followers.apply_user_infos(c, [info("oa2", subscribe=0)], 490, 502))
    assert store.row("oa2")["subscribed"] == 1


def test_out_of_order_events_keep_the_newest(store: Store) -> None:
    store.write(lambda c: followers.record_unsubscribe(c, "oa1", 300, 301))
    store.write(lambda c: followers.record_subscribe(c, "oa1", 200, 302, scene="7"))
    row = store.row("oa1")
    assert row["subscribed"] == 0 and row["qr_scene"] is None
    store.write(lambda c: followers.record_subscribe(c, "oa1", 400, 401, scene="7",
                                                     event_key="qrscene_7", ticket="T"))
    row = store.row("oa1")
    assert (row["subscribed"], row["subscribed_at"], row["unsubscribed_at"]) == (1, 400, 300)
    assert (row["qr_scene"], row["qr_scene_str"], row["event_key"], row["ticket"]) == (
        7, None, "qrscene_7", "T")
    store.write(lambda c: followers.record_subscribe(c, "oa2", 1, 2, scene="promo"))
    assert store.row("oa2")["qr_scene_str"] == "promo"


def test_unsubscribe_keeps_link_and_refollow_restores(store: Store) -> None:
    store.write(lambda c: followers.upsert_mp_user(c, "mp1", "u1", "sk", 10))
    store.write(lambda c: followers.record_subscribe(c, "oa1", 20, 20))
    store.write(lambda c: followers.apply_user_infos(c, [info("oa1", "u1")], 21, 21))
    store.write(lambda c: followers.record_unsubscribe(c, "oa1", 30, 30))
    ident = store.identity(mp_openid="mp1")
    assert ident is not None
    assert (ident.oa_openid, ident.subscribed, ident.unsubscribed_at, ident.linked_at) == (
        "oa1", False, 30, 21)
    store.write(lambda c: followers.record_subscribe(c, "oa1", 40, 40))
    ident = store.identity(unionid="u1")
    assert ident is not None and ident.subscribed and ident.subscribed_at == 40
    assert ident.linked_at == 21


def test_purge_clears_profile_only(store: Store) -> None:
    store.write(lambda c: followers.record_subscribe(c, "oa1", 20, 20, scene="abc",
                                                     event_key="qrscene_abc", ticket="TK"))
    store.write(lambda c: followers.apply_user_infos(
        c, [info("oa1", "u1", subscribe_scene="ADD_SCENE_QR_CODE", qr_scene=0,
                 qr_scene_str="abc")], 21, 21))
    assert store.row("oa1")["subscribe_scene"] == "ADD_SCENE_QR_CODE"
    store.write(lambda c: followers.record_unsubscribe(c, "oa1", 30, 31, purge=True))
    row = store.row("oa1")
    for field in ("subscribe_scene", "qr_scene", "qr_scene_str", "event_key", "ticket"):
        assert row[field] is None, field
    assert (row["oa_openid"], row["unionid"], row["subscribed"]) == ("oa1", "u1", 0)
    assert (row["subscribed_at"], row["unsubscribed_at"]) == (20, 30)
    # Without purge the profile stays.
    store.write(lambda c: followers.record_subscribe(c, "oa2", 20, 20, ticket="TK2"))
    store.write(lambda c: followers.record_unsubscribe(c, "oa2", 30, 31))
    assert store.row("oa2")["ticket"] == "TK2"


def test_mark_unseen_unsubscribed(store: Store) -> None:
    store.write(lambda c: followers.apply_user_infos(c, [info("a"), info("b"), info("c")], 10, 10,
                                                     run=1))
    store.write(lambda c: followers.apply_user_infos(c, [info("a")], 100, 100, run=2))
    # "d" subscribed (event) while run 2 was going: it must not be marked.
    store.write(lambda c: followers.record_subscribe(c, "d", 105, 105))
    store.write(lambda c: followers.apply_user_infos(c, [info("b")], 110, 110, run=2))
    assert store.write(lambda c: followers.mark_unseen_unsubscribed(c, 2, 120)) == 1
    assert [store.row(x)["subscribed"] for x in "abcd"] == [1, 1, 0, 1]
    assert store.row("c")["unsubscribed_at"] == 120
    # An explicit run start protects events after it, and only those.
    store.write(lambda c: followers.record_subscribe(c, "e", 90, 90))
    assert store.write(lambda c: followers.mark_unseen_unsubscribed(c, 2, 130, since=95)) == 1
    assert store.row("e")["subscribed"] == 0 and store.row("d")["subscribed"] == 1


def test_counts(store: Store) -> None:
    assert store.read(followers.counts) == {
        "followers": 0, "subscribed": 0, "with_unionid": 0, "mp_users": 0,
        "mp_with_unionid": 0, "linked": 0,
    }
    store.write(lambda c: followers.apply_user_infos(
        c, [info("a", "u1"), info("b", "u2"), info("c")], 10, 10))
    store.write(lambda c: followers.record_unsubscribe(c, "b", 20, 20))
    store.write(lambda c: followers.upsert_mp_user(c, "m1", "u1", "k", 30))
    store.write(lambda c: followers.upsert_mp_user(c, "m2", "u2", "k", 30))
    store.write(lambda c: followers.upsert_mp_user(c, "m3", "u3", "k", 30))
    store.write(lambda c: followers.upsert_mp_user(c, "m4", None, "k", 30))
    assert store.read(followers.counts) == {
        "followers": 3, "subscribed": 2, "with_unionid": 2, "mp_users": 4,
        "mp_with_unionid": 3, "linked": 2,
    }


def test_identity_from_each_key(store: Store) -> None:
    store.write(lambda c: followers.upsert_mp_user(c, "mp1", "u1", "secret-key", 5))
    store.write(lambda c: followers.apply_user_infos(c, [info("oa1", "u1")], 6, 7))
    expected = followers.Identity(
        unionid="u1", mp_openid="mp1", oa_openid="oa1", subscribed=True, subscribed_at=6,
        unsubscribed_at=None, linked_at=7, mp_user_since=5, last_login_at=5,
    )
    for key in ({"unionid": "u1"}, {"mp_openid": "mp1"}, {"oa_openid": "oa1"}):
        assert store.identity(**key) == expected, key
    assert expected.to_json()["linked"] is True
    assert "secret-key" not in repr(expected.to_json())
    assert set(expected.to_json()) >= {"unionid", "mp_openid", "oa_openid", "subscribed",
                                       "subscribed_at", "unsubscribed_at", "linked_at",
                                       "mp_user_since"}
    for key in ({"unionid": "nope"}, {"mp_openid": "nope"}, {"oa_openid": "nope"}):
        assert store.identity(**key) is None
    # One side only.
    store.write(lambda c: followers.upsert_mp_user(c, "mp2", None, "k", 8))
    lone = store.identity(mp_openid="mp2")
    assert lone is not None and lone.oa_openid is None and not lone.subscribed
    assert not lone.linked and lone.linked_at is None
    with pytest.raises(ValueError):
        store.identity(unionid="u1", mp_openid="mp1")
    with pytest.raises(ValueError):
        store.identity()


def test_duplicate_unionid_prefers_subscribed_follower(store: Store) -> None:
    store.write(lambda c: followers.apply_user_infos(
        c, [info("old", "u1", subscribe_time=10), info("new", "u1", subscribe_time=20)], 30, 30))
    store.write(lambda c: followers.record_unsubscribe(c, "new", 40, 40))
    ident = store.identity(unionid="u1")
    assert ident is not None and ident.oa_openid == "old"
    store.write(lambda c: followers.record_unsubscribe(c, "old", 50, 50))
    ident = store.identity(unionid="u1")
    assert ident is not None and ident.oa_openid == "new"  # the most recent follow


def test_set_mp_unionid_links_and_records_watermark(store: Store) -> None:
    store.write(lambda c: followers.record_subscribe(c, "oa1", 1, 1))
    store.write(lambda c: followers.apply_user_infos(c, [info("oa1", "u1")], 2, 2))
    store.write(lambda c: followers.upsert_mp_user(c, "mp1", None, "k", 3))
    assert store.identity(mp_openid="mp1") is not None
    assert store.write(lambda c: followers.set_mp_unionid(c, "mp1", "u1", 1700000000, 4)) is True
    ident = store.identity(mp_openid="mp1")
    assert ident is not None and ident.oa_openid == "oa1" and ident.linked_at == 4
    row = store.read(lambda c: c.execute("SELECT * FROM mp_users").fetchone())
    assert row["watermark_at"] == 1700000000 and row["session_key"] == "k"


def test_skips_entries_without_openid(store: Store) -> None:
    assert store.write(lambda c: followers.apply_user_infos(
        c, [{"errcode": 40003}, {"openid": ""}, info("ok", "u")], 1, 1)) == []
    assert store.read(followers.counts)["followers"] == 1


def test_missing_subscribe_time(store: Store) -> None:
    """Without a subscribe_time a new follower is taken as subscribed when observed; a known
    one keeps its time; a non-follower gets none."""
    store.write(lambda c: followers.apply_user_infos(
        c, [info("known", "u1", subscribe_time=100)], 150, 150))
    store.write(lambda c: followers.apply_user_infos(
        c, [info("known", "u1"), info("new", "u2"), info("gone", "u3", subscribe=0)], 200, 201))
    assert store.row("known")["subscribed_at"] == 100
    assert store.row("new")["subscribed_at"] == 200
    assert store.row("gone")["subscribed_at"] is None and store.row("gone")["subscribed"] == 0


def test_resync_updates_each_kind_of_row(store: Store) -> None:
    """A second observation of known rows: unionid kept, gained or changed; events win or not."""
    store.write(lambda c: followers.apply_user_infos(c, [
        info(oa, u, subscribe_time=90) for oa, u in
        (("same", "u1"), ("changes", "u3"), ("drops", "u4"), ("older", "u6"))], 100, 100, run=1))
    store.write(lambda c: followers.record_subscribe(c, "gains", 150, 151, scene="7"))
    store.write(lambda c: followers.record_unsubscribe(c, "older", 199, 199))
    store.write(lambda c: followers.record_unsubscribe(c, "newer", 200, 200))
    store.write(lambda c: followers.upsert_mp_user(c, "m1", "u1", "k", 120))
    store.write(lambda c: followers.upsert_mp_user(c, "m2", "u2", "k", 121))
    newly = store.write(lambda c: followers.apply_user_infos(c, [
        info("same", "u1", subscribe_time=90),
        info("gains", "u2", subscribe_time=150, subscribe_scene="ADD_SCENE_QR_CODE", qr_scene=7),
        info("changes", "u3b", subscribe_time=90),
        info("drops", subscribe=0),
        info("older", "u6", subscribe_time=195),   # the unsubscribe event (199) is older
        info("newer", "u7", subscribe_time=200),   # the event's second (200) is not over
        info("fresh", "u8", subscribe_time=180),
    ], 200, 201, run=2))
    assert newly == ["u2"]
    expected = {  # unionid, subscribed, subscribed_at, unsubscribed_at
        "same": ("u1", 1, 90, None), "gains": ("u2", 1, 150, None),
        "changes": ("u3b", 1, 90, None), "drops": ("u4", 0, 90, 200),
        "older": ("u6", 1, 195, 199), "newer": ("u7", 0, None, 200),
        "fresh": ("u8", 1, 180, None),
    }
    for oa, values in expected.items():
        row = store.row(oa)
        assert (row["unionid"], row["subscribed"], row["subscribed_at"],
                row["unsubscribed_at"]) == values, oa
        assert (row["synced_run"], row["synced_at"], row["updated_at"]) == (2, 200, 201), oa
    assert (store.row("gains")["subscribe_scene"], store.row("gains")["qr_scene"]) == (
        "ADD_SCENE_QR_CODE", 7)


def test_entries_of_one_openid_apply_in_order(store: Store) -> None:
    store.write(lambda c: followers.apply_user_infos(c, [info("x", "u0", subscribe_time=5)], 10, 10))
    store.write(lambda c: followers.apply_user_infos(c, [
        info("x", "u1", subscribe_time=5), info("x", subscribe=0), info("y"), info("y", "u5"),
    ], 20, 21))
    x, y = store.row("x"), store.row("y")
    assert (x["unionid"], x["subscribed"], x["subscribed_at"], x["unsubscribed_at"]) == (
        "u1", 0, 5, 20)
    assert (y["unionid"], y["subscribed"], y["subscribed_at"], y["unsubscribed_at"]) == (
        "u5", 1, 20, None)
