"""wxd.store.links and the identity read of explicit links: bind/unbind rules, link codes,
and how a unionid link wins, on a file DB (Database.write)."""

from __future__ import annotations

from typing import cast

import pytest

from tests.helpers import SyncStore
from tests.helpers import info_entry as info
from wxd.linking import Linking, LinkingError, UserInfoAPI
from wxd.store import followers, identity, ingest, links, mp_users
from wxd.store.identity import ExplicitLink


def code(code_id: str = "lq_1", mp_openid: str = "mp1", expires_at: float = 1000.0,
         kind: str = "qrcode", token: str | None = None) -> links.LinkCode:
    return links.LinkCode(id=code_id, kind=kind, mp_openid=mp_openid,
                          token=token or f"wxdl{code_id:0>28}", created_at=0.0,
                          expires_at=expires_at)


def test_bind_links_an_mp_user_without_unionid_to_a_follower(store: SyncStore) -> None:
    store.write(lambda c: followers.record_subscribe(c, "oa1", 10, 10))
    bound = store.write(lambda c: links.bind(c, "mp1", "oa1", "qrcode", 20.0, "lq_1"))
    assert bound.outcome == "linked" and bound.replaced == ()
    assert bound.link == ExplicitLink("mp1", "oa1", "qrcode", 20.0, "lq_1")
    for key in ({"mp_openid": "mp1"}, {"oa_openid": "oa1"}):
        ident = store.identity(**key)
        assert ident is not None, key
        assert (ident.mp_openid, ident.oa_openid, ident.subscribed, ident.link_source,
                ident.linked_at) == ("mp1", "oa1", True, "qrcode", 20.0)
        assert ident.to_json()["link"] == {"source": "qrcode", "linked_at": 20.0}
    # The MP user row was created (the backend may have logged the user in without wxd).
    assert store.read(lambda c: c.execute("SELECT COUNT(*) FROM mp_users").fetchone()[0]) == 1
    assert store.read(identity.counts)["linked"] == 1
    assert store.read(identity.links_by_source) == {"unionid": 0, "qrcode": 1, "oauth": 0}
    # Again: unchanged, nothing rewritten.
    again = store.write(lambda c: links.bind(c, "mp1", "oa1", "oauth", 30.0))
    assert again.outcome == "unchanged" and again.link is not None and again.link.linked_at == 20.0


def test_oauth_link_of_a_non_follower_and_unfollow_keep_the_link(store: SyncStore) -> None:
    store.write(lambda c: links.bind(c, "mp1", "oaX", "oauth", 5.0))
    ident = store.identity(mp_openid="mp1")
    assert ident is not None and ident.oa_openid == "oaX" and not ident.subscribed
    assert ident.link_source == "oauth" and ident.linked
    store.write(lambda c: followers.record_subscribe(c, "oaX", 10, 10))
    store.write(lambda c: followers.record_unsubscribe(c, "oaX", 20, 20))
    ident = store.identity(oa_openid="oaX")
    assert ident is not None and ident.mp_openid == "mp1" and ident.subscribed is False
    assert ident.link_source == "oauth"


def test_a_new_explicit_link_replaces_older_ones_of_either_side(store: SyncStore) -> None:
    store.write(lambda c: links.bind(c, "mp1", "oaA", "qrcode", 1.0))
    store.write(lambda c: links.bind(c, "mp2", "oaB", "qrcode", 2.0))
    bound = store.write(lambda c: links.bind(c, "mp1", "oaB", "oauth", 3.0))
    assert bound.outcome == "linked"
    assert {(old.mp_openid, old.oa_openid) for old in bound.replaced} == {("mp1", "oaA"),
                                                                         ("mp2", "oaB")}
    ident = store.identity(mp_openid="mp1")
    assert ident is not None and (ident.oa_openid, ident.link_source) == ("oaB", "oauth")
    lone = store.identity(mp_openid="mp2")
    assert lone is not None and lone.oa_openid is None and lone.link_source is None
    assert store.identity(oa_openid="oaA") is None  # no follower row, no link any more


def test_a_unionid_link_is_never_overridden(store: SyncStore) -> None:
    store.write(lambda c: ingest.apply_user_infos(c, [info("oa1", "u1"), info("oa2", "u2")], 1, 1))
    store.write(lambda c: mp_users.upsert(c, "mp1", "u1", "k", 2))
    # mp1 is unionid-linked to oa1: another OA openid is refused, oa1 itself is "unionid".
    refused = store.write(lambda c: links.bind(c, "mp1", "oa9", "qrcode", 3.0))
    assert refused.outcome == "conflict" and "through unionid" in (refused.conflict or "")
    assert store.write(lambda c: links.bind(c, "mp1", "oa1", "qrcode", 3.0)).outcome == "unionid"
    # oa2 carries u2: an MP user with another unionid is refused; one linked elsewhere too.
    store.write(lambda c: mp_users.upsert(c, "mp3", "u3", "k", 4))
    assert store.write(lambda c: links.bind(c, "mp3", "oa2", "oauth", 5.0)).outcome == "conflict"
    store.write(lambda c: mp_users.upsert(c, "mp2", "u2", "k", 4))
    assert store.write(lambda c: links.bind(c, "mp4", "oa2", "oauth", 5.0)).outcome == "conflict"
    assert store.read(lambda c: c.execute("SELECT COUNT(*) FROM explicit_links").fetchone()[0]) == 0
    ident = store.identity(mp_openid="mp1")
    assert ident is not None and (ident.oa_openid, ident.link_source) == ("oa1", "unionid")


def test_a_unionid_learned_later_wins_over_an_explicit_link(store: SyncStore) -> None:
    store.write(lambda c: links.bind(c, "mp1", "oaA", "qrcode", 1.0))
    # The MP user's unionid turns up and joins it to another follower: that link wins, and the
    # explicit link (which now disagrees) is ignored from either side.
    store.write(lambda c: ingest.apply_user_infos(c, [info("oaB", "u1")], 2, 2))
    store.write(lambda c: mp_users.upsert(c, "mp1", "u1", "k", 3))
    ident = store.identity(mp_openid="mp1")
    assert ident is not None and (ident.oa_openid, ident.link_source) == ("oaB", "unionid")
    assert store.identity(oa_openid="oaA") is None
    assert store.read(identity.links_by_source) == {"unionid": 1, "qrcode": 0, "oauth": 0}


def test_unbind_removes_only_explicit_links(store: SyncStore) -> None:
    store.write(lambda c: links.bind(c, "mp1", "oa1", "qrcode", 1.0))
    removed = store.write(lambda c: links.unbind(c, "mp1"))
    assert removed == ExplicitLink("mp1", "oa1", "qrcode", 1.0, None)
    assert store.write(lambda c: links.unbind(c, "mp1")) is None
    ident = store.identity(mp_openid="mp1")
    assert ident is not None and ident.oa_openid is None and not ident.linked


def test_redeem_is_single_use_and_judged_at_the_scan_time(store: SyncStore) -> None:
    store.write(lambda c: links.create_code(c, code()))
    assert store.write(lambda c: links.redeem(c, "lq_nope", "oa1", 1, 1)) is None
    expired = store.write(lambda c: links.redeem(c, "lq_1", "oa1", 1000.0, 1001))
    assert expired is not None and expired.outcome == "expired"
    # Scanned before the expiry, processed after it (a restart): it still links.
    done = store.write(lambda c: links.redeem(c, "lq_1", "oa1", 999.0, 2000.0))
    assert done is not None and done.outcome == "linked" and done.code.status(3000) == "linked"
    assert (done.code.oa_openid, done.code.linked_at) == ("oa1", 2000.0)
    repeat = store.write(lambda c: links.redeem(c, "lq_1", "oa1", 5, 5))
    used = store.write(lambda c: links.redeem(c, "lq_1", "oa2", 5, 5))
    assert (repeat and repeat.outcome, used and used.outcome) == ("repeat", "used")
    ident = store.identity(oa_openid="oa1")
    assert ident is not None and ident.mp_openid == "mp1"
    assert store.identity(oa_openid="oa2") is None


def test_redeem_conflict_leaves_the_code_pending_with_the_reason(store: SyncStore) -> None:
    store.write(lambda c: ingest.apply_user_infos(c, [info("oa1", "u1")], 1, 1))
    store.write(lambda c: mp_users.upsert(c, "mp1", "u1", "k", 2))
    store.write(lambda c: links.create_code(c, code()))
    result = store.write(lambda c: links.redeem(c, "lq_1", "oa2", 3, 3))
    assert result is not None and result.outcome == "conflict"
    assert result.code.status(3) == "pending"
    assert result.code.to_json(3) == {"id": "lq_1", "status": "pending", "expires_at": 1000.0,
                                      "error": "link_conflict"}


def test_redeem_records_the_replaced_link(store: SyncStore) -> None:
    store.write(lambda c: links.bind(c, "mp1", "oaOld", "oauth", 1.0))
    store.write(lambda c: links.create_code(c, code()))
    result = store.write(lambda c: links.redeem(c, "lq_1", "oaNew", 2, 2))
    assert result is not None and result.outcome == "linked"
    assert result.code.to_json(2) == {"id": "lq_1", "status": "linked", "expires_at": 1000.0,
                                      "oa_openid": "oaNew", "linked_at": 2,
                                      "replaced": {"oa_openid": "oaOld"}}


def test_codes_by_token_and_state_and_pruning(store: SyncStore) -> None:
    store.write(lambda c: links.create_code(c, code()))
    oauth = links.LinkCode(id="lo_1", kind="oauth", mp_openid="mp2", token="T" * 32,
                           state="S" * 32, created_at=0.0, expires_at=50.0,
                           return_url="https://shop.example.com/")
    store.write(lambda c: links.create_code(c, oauth))
    assert store.read(lambda c: links.code_by_token(c, "oauth", "T" * 32)) == oauth
    assert store.read(lambda c: links.code_by_token(c, "qrcode", "T" * 32)) is None
    assert store.read(lambda c: links.code_by_state(c, "S" * 32)) == oauth
    assert store.read(lambda c: links.code_by_state(c, "nope")) is None
    with pytest.raises(Exception, match="UNIQUE"):
        store.write(lambda c: links.create_code(c, code("lq_2", token="T" * 32)))
    assert store.write(lambda c: links.prune_codes(c, 100.0)) == 1  # the OAuth one expired at 50
    assert store.read(lambda c: links.code(c, "lq_1")) is not None


def test_bind_refuses_an_unknown_source(store: SyncStore) -> None:
    with pytest.raises(ValueError):
        store.write(lambda c: links.bind(c, "mp1", "oa1", "unionid", 1.0))


def test_unlink_removes_explicit_links_even_shadowed_ones_never_unionid_links(
        store: SyncStore) -> None:
    linking = Linking(store.db, None, cast(UserInfoAPI, None), mp_appid=None)

    def unlink(mp_openid: str) -> ExplicitLink:
        return store.loop.run_until_complete(linking.unlink(mp_openid))

    store.write(lambda c: links.bind(c, "mp1", "oaA", "qrcode", 1.0))
    store.write(lambda c: ingest.apply_user_infos(c, [info("oaB", "u1")], 2, 2))
    store.write(lambda c: mp_users.upsert(c, "mp1", "u1", "k", 3))  # unionid now wins
    assert unlink("mp1") == ExplicitLink("mp1", "oaA", "qrcode", 1.0, None)
    with pytest.raises(LinkingError) as info_:
        unlink("mp1")  # only the unionid link is left
    assert info_.value.code == "link_derived"
    with pytest.raises(LinkingError) as info_:
        unlink("nobody")
    assert info_.value.code == "link_not_found"
    ident = store.identity(mp_openid="mp1")
    assert ident is not None and (ident.oa_openid, ident.link_source) == ("oaB", "unionid")
