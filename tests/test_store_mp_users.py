"""wxd.store.mp_users: MP logins, session_key and the unionid from encryptedData, on a file DB."""

from __future__ import annotations

from tests.helpers import SyncStore
from tests.helpers import info_entry as info
from wxd.store import followers, ingest, mp_users


def test_follower_first_links_on_login(store: SyncStore) -> None:
    store.write(lambda c: ingest.apply_user_infos(c, [info("oa1", "u1")], 50, 51))
    assert store.write(lambda c: mp_users.upsert(c, "mp1", "u1", "sk", 60.0)) is True
    assert store.write(lambda c: mp_users.upsert(c, "mp1", "u1", "sk2", 70.0)) is False
    ident = store.identity(oa_openid="oa1")
    assert ident is not None and ident.mp_openid == "mp1" and ident.linked_at == 60.0
    assert ident.last_login_at == 70.0 and ident.mp_user_since == 60.0
    assert store.read(lambda c: mp_users.session_key(c, "mp1")) == "sk2"
    assert "sk2" not in repr(ident.to_json())

def test_set_mp_unionid_links_and_records_watermark(store: SyncStore) -> None:
    store.write(lambda c: followers.record_subscribe(c, "oa1", 1, 1))
    store.write(lambda c: ingest.apply_user_infos(c, [info("oa1", "u1")], 2, 2))
    store.write(lambda c: mp_users.upsert(c, "mp1", None, "k", 3))
    assert store.identity(mp_openid="mp1") is not None
    assert store.write(lambda c: mp_users.set_unionid(c, "mp1", "u1", 1700000000, 4)) is True
    ident = store.identity(mp_openid="mp1")
    assert ident is not None and ident.oa_openid == "oa1" and ident.linked_at == 4
    row = store.read(lambda c: c.execute("SELECT * FROM mp_users").fetchone())
    assert row["watermark_at"] == 1700000000 and row["session_key"] == "k"

def test_mp_unionid_is_never_erased(store: SyncStore) -> None:
    store.write(lambda c: mp_users.upsert(c, "mp1", "u9", "sk", 30))
    store.write(lambda c: mp_users.upsert(c, "mp1", None, "sk3", 40))
    store.write(lambda c: mp_users.set_unionid(c, "mp1", "", 41, 42))
    ident = store.identity(mp_openid="mp1")
    assert ident is not None and ident.unionid == "u9"
