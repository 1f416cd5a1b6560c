"""wxd.store.identity: the unionid join, identity lookups and counts, on a file DB (Database.write)."""

from __future__ import annotations

import pytest

from tests.helpers import SyncStore
from tests.helpers import info_entry as info
from wxd.store import followers, identity, ingest, mp_users
from wxd.store.identity import Identity


def test_subscribe_then_user_info_links_existing_mp_user(store: SyncStore) -> None:
    assert store.write(lambda c: mp_users.upsert(c, "mp1", "u1", "sk", 100.0)) is False
    store.write(lambda c: followers.record_subscribe(c, "oa1", 200, 201.0))
    assert store.identity(oa_openid="oa1") == Identity(
        unionid=None, mp_openid=None, oa_openid="oa1", subscribed=True, subscribed_at=200,
        unsubscribed_at=None, linked_at=None, mp_user_since=None,
    )
    newly = store.write(lambda c: ingest.apply_user_infos(
        c, [info("oa1", "u1", subscribe_time=200)], 202.0, 203.0))
    assert newly == ["u1"]
    ident = store.identity(mp_openid="mp1")
    assert ident is not None
    assert (ident.unionid, ident.oa_openid, ident.subscribed, ident.linked_at) == (
        "u1", "oa1", True, 203.0)
    assert ident.mp_user_since == 100.0 and ident.last_login_at == 100.0
    # Applying the same data again links nothing new and keeps linked_at.
    assert store.write(lambda c: ingest.apply_user_infos(c, [info("oa1", "u1")], 300, 301)) == []
    again = store.identity(unionid="u1")
    assert again is not None and again.linked_at == 203.0

def test_unsubscribe_keeps_link_and_refollow_restores(store: SyncStore) -> None:
    store.write(lambda c: mp_users.upsert(c, "mp1", "u1", "sk", 10))
    store.write(lambda c: followers.record_subscribe(c, "oa1", 20, 20))
    store.write(lambda c: ingest.apply_user_infos(c, [info("oa1", "u1")], 21, 21))
    store.write(lambda c: followers.record_unsubscribe(c, "oa1", 30, 30))
    ident = store.identity(mp_openid="mp1")
    assert ident is not None
    assert (ident.oa_openid, ident.subscribed, ident.unsubscribed_at, ident.linked_at) == (
        "oa1", False, 30, 21)
    store.write(lambda c: followers.record_subscribe(c, "oa1", 40, 40))
    ident = store.identity(unionid="u1")
    assert ident is not None and ident.subscribed and ident.subscribed_at == 40
    assert ident.linked_at == 21

def test_counts(store: SyncStore) -> None:
    assert store.read(identity.counts) == {
        "followers": 0, "subscribed": 0, "with_unionid": 0, "mp_users": 0,
        "mp_with_unionid": 0, "linked": 0,
    }
    store.write(lambda c: ingest.apply_user_infos(
        c, [info("a", "u1"), info("b", "u2"), info("c")], 10, 10))
    store.write(lambda c: followers.record_unsubscribe(c, "b", 20, 20))
    store.write(lambda c: mp_users.upsert(c, "m1", "u1", "k", 30))
    store.write(lambda c: mp_users.upsert(c, "m2", "u2", "k", 30))
    store.write(lambda c: mp_users.upsert(c, "m3", "u3", "k", 30))
    store.write(lambda c: mp_users.upsert(c, "m4", None, "k", 30))
    assert store.read(identity.counts) == {
        "followers": 3, "subscribed": 2, "with_unionid": 2, "mp_users": 4,
        "mp_with_unionid": 3, "linked": 2,
    }

def test_identity_from_each_key(store: SyncStore) -> None:
    store.write(lambda c: mp_users.upsert(c, "mp1", "u1", "secret-key", 5))
    store.write(lambda c: ingest.apply_user_infos(c, [info("oa1", "u1")], 6, 7))
    expected = Identity(
        unionid="u1", mp_openid="mp1", oa_openid="oa1", subscribed=True, subscribed_at=6,
        unsubscribed_at=None, linked_at=7, mp_user_since=5, last_login_at=5,
        link_source="unionid",
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
    store.write(lambda c: mp_users.upsert(c, "mp2", None, "k", 8))
    lone = store.identity(mp_openid="mp2")
    assert lone is not None and lone.oa_openid is None and not lone.subscribed
    assert not lone.linked and lone.linked_at is None
    with pytest.raises(ValueError):
        store.identity(unionid="u1", mp_openid="mp1")
    with pytest.raises(ValueError):
        store.identity()

def test_duplicate_unionid_prefers_subscribed_follower(store: SyncStore) -> None:
    store.write(lambda c: ingest.apply_user_infos(
        c, [info("old", "u1", subscribe_time=10), info("new", "u1", subscribe_time=20)], 30, 30))
    store.write(lambda c: followers.record_unsubscribe(c, "new", 40, 40))
    ident = store.identity(unionid="u1")
    assert ident is not None and ident.oa_openid == "old"
    store.write(lambda c: followers.record_unsubscribe(c, "old", 50, 50))
    ident = store.identity(unionid="u1")
    assert ident is not None and ident.oa_openid == "new"  # the most recent follow
