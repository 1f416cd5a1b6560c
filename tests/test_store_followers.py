"""wxd.store.followers: subscribe/unsubscribe/purge events and the end-of-run sweep, on a file DB."""

from __future__ import annotations

from tests.helpers import SyncStore
from tests.helpers import info_entry as info
from wxd.store import followers, ingest


def test_out_of_order_events_keep_the_newest(store: SyncStore) -> None:
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

def test_purge_clears_profile_only(store: SyncStore) -> None:
    store.write(lambda c: followers.record_subscribe(c, "oa1", 20, 20, scene="abc",
                                                     event_key="qrscene_abc", ticket="TK"))
    store.write(lambda c: ingest.apply_user_infos(
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

def test_mark_unseen_unsubscribed(store: SyncStore) -> None:
    store.write(lambda c: ingest.apply_user_infos(c, [info("a"), info("b"), info("c")], 10, 10,
                                                     run=1))
    store.write(lambda c: ingest.apply_user_infos(c, [info("a")], 100, 100, run=2))
    # "d" subscribed (event) while run 2 was going: it must not be marked.
    store.write(lambda c: followers.record_subscribe(c, "d", 105, 105))
    store.write(lambda c: ingest.apply_user_infos(c, [info("b")], 110, 110, run=2))
    assert store.write(lambda c: followers.mark_unseen_unsubscribed(c, 2, 120)) == 1
    assert [store.row(x)["subscribed"] for x in "abcd"] == [1, 1, 0, 1]
    assert store.row("c")["unsubscribed_at"] == 120
    # An explicit run start protects events after it, and only those.
    store.write(lambda c: followers.record_subscribe(c, "e", 90, 90))
    assert store.write(lambda c: followers.mark_unseen_unsubscribed(c, 2, 130, since=95)) == 1
    assert store.row("e")["subscribed"] == 0 and store.row("d")["subscribed"] == 1


def test_count_unlisted_and_mark_listed(store: SyncStore) -> None:
    store.write(lambda c: ingest.apply_user_infos(c, [info("a"), info("b")], 10, 10, run=1))
    store.write(lambda c: ingest.apply_user_infos(c, [info("c")], 10, 10, run=2))
    # Run 2 lists a, c (stored by it), x (no row): a and x are new to run 2; repeats count once.
    assert store.read(lambda c: followers.count_unlisted(c, ["a", "c", "x", "a"], 2)) == 2
    # Listed but not described: a's row counts as seen by run 2, nothing else changes; no row
    # is made for x.
    assert store.write(lambda c: followers.mark_listed(c, ["a", "x", "c"], 2)) == 1
    assert store.read(lambda c: followers.count_unlisted(c, ["a", "c", "x"], 2)) == 1
    assert (store.row("a")["synced_run"], store.row("a")["synced_at"]) == (2, 10)
    assert store.write(lambda c: followers.mark_unseen_unsubscribed(c, 2, 120)) == 1
    assert [store.row(x)["subscribed"] for x in "abc"] == [1, 0, 1]


def test_a_43004_marks_not_following_unless_an_event_is_as_new(store: SyncStore) -> None:
    store.write(lambda c: ingest.apply_user_infos(
        c, [info(o, "u" + o) for o in ("oa1", "oa2", "oa3")], 10, 10))
    store.write(lambda c: followers.record_subscribe(c, "oa2", 100, 100))  # same second
    store.write(lambda c: followers.record_subscribe(c, "oa3", 99, 99))  # the second before
    marked = store.write(lambda c: [followers.mark_not_following(c, o, 100.4, 101)
                                    for o in ("oa1", "oa2", "oa3", "oa_unknown")])
    assert marked == [True, False, True, False]
    row = store.row("oa1")
    assert (row["subscribed"], row["unsubscribed_at"], row["unionid"]) == (0, 100.4, "uoa1")
    assert store.row("oa2")["subscribed"] == 1 and store.row("oa3")["subscribed"] == 0
    assert not store.write(lambda c: followers.mark_not_following(c, "oa1", 200, 200))
    assert store.row("oa1")["unsubscribed_at"] == 100.4  # already unsubscribed: unchanged
    # A later subscribe event flips it back.
    store.write(lambda c: followers.record_subscribe(c, "oa1", 300, 300))
    assert store.row("oa1")["subscribed"] == 1
