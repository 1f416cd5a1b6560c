"""wxd.store.ingest: user/info and batchget rows (unionid kept, events win, re-syncs), on a file DB."""

from __future__ import annotations

from tests.helpers import SyncStore
from tests.helpers import info_entry as info
from wxd.store import followers, identity, ingest, mp_users


def test_events_win_over_older_observations(store: SyncStore) -> None:
    store.write(lambda c: ingest.apply_user_infos(c, [info("oa1", "u1")], 100, 100))
    store.write(lambda c: followers.record_unsubscribe(c, "oa1", 200, 201))
    # A batchget page fetched before the unsubscribe event still says subscribe=1.
    store.write(lambda c: ingest.apply_user_infos(c, [info("oa1", "u1")], 150, 300))
    assert store.row("oa1")["subscribed"] == 0
    # A later observation does change it (the user followed again, event lost).
    store.write(lambda c: ingest.apply_user_infos(
        c, [info("oa1", "u1", subscribe_time=350)], 400, 400))
    row = store.row("oa1")
    assert row["subscribed"] == 1 and row["subscribed_at"] == 350
    # The reverse: a subscribe event newer than a subscribe=0 observation wins.
    store.write(lambda c: followers.record_subscribe(c, "oa2", 500, 501))
    store.write(lambda c: ingest.apply_user_infos(c, [info("oa2", subscribe=0)], 490, 502))
    assert store.row("oa2")["subscribed"] == 1

def test_unionid_is_never_erased(store: SyncStore) -> None:
    store.write(lambda c: ingest.apply_user_infos(c, [info("oa1", "u1")], 10, 10))
    # Unfollowed users come back from user/info without unionid.
    store.write(lambda c: ingest.apply_user_infos(c, [{"openid": "oa1", "subscribe": 0}], 20, 20))
    row = store.row("oa1")
    assert row["unionid"] == "u1" and row["subscribed"] == 0 and row["unsubscribed_at"] == 20

def test_skips_entries_without_openid(store: SyncStore) -> None:
    assert store.write(lambda c: ingest.apply_user_infos(
        c, [{"errcode": 40003}, {"openid": ""}, info("ok", "u")], 1, 1)) == []
    assert store.read(identity.counts)["followers"] == 1

def test_missing_subscribe_time(store: SyncStore) -> None:
    """Without a subscribe_time a new follower is taken as subscribed when observed; a known
    one keeps its time; a non-follower gets none."""
    store.write(lambda c: ingest.apply_user_infos(
        c, [info("known", "u1", subscribe_time=100)], 150, 150))
    store.write(lambda c: ingest.apply_user_infos(
        c, [info("known", "u1"), info("new", "u2"), info("gone", "u3", subscribe=0)], 200, 201))
    assert store.row("known")["subscribed_at"] == 100
    assert store.row("new")["subscribed_at"] == 200
    assert store.row("gone")["subscribed_at"] is None and store.row("gone")["subscribed"] == 0

def test_resync_updates_each_kind_of_row(store: SyncStore) -> None:
    """A second observation of known rows: unionid kept, gained or changed; events win or not."""
    store.write(lambda c: ingest.apply_user_infos(c, [
        info(oa, u, subscribe_time=90) for oa, u in
        (("same", "u1"), ("changes", "u3"), ("drops", "u4"), ("older", "u6"))], 100, 100, run=1))
    store.write(lambda c: followers.record_subscribe(c, "gains", 150, 151, scene="7"))
    store.write(lambda c: followers.record_unsubscribe(c, "older", 199, 199))
    store.write(lambda c: followers.record_unsubscribe(c, "newer", 200, 200))
    store.write(lambda c: mp_users.upsert(c, "m1", "u1", "k", 120))
    store.write(lambda c: mp_users.upsert(c, "m2", "u2", "k", 121))
    newly = store.write(lambda c: ingest.apply_user_infos(c, [
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

def test_entries_of_one_openid_apply_in_order(store: SyncStore) -> None:
    store.write(lambda c: ingest.apply_user_infos(c, [info("x", "u0", subscribe_time=5)], 10, 10))
    store.write(lambda c: ingest.apply_user_infos(c, [
        info("x", "u1", subscribe_time=5), info("x", subscribe=0), info("y"), info("y", "u5"),
    ], 20, 21))
    x, y = store.row("x"), store.row("y")
    assert (x["unionid"], x["subscribed"], x["subscribed_at"], x["unsubscribed_at"]) == (
        "u1", 0, 5, 20)
    assert (y["unionid"], y["subscribed"], y["subscribed_at"], y["unsubscribed_at"]) == (
        "u5", 1, 20, None)
