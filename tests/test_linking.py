"""Linking through the admin API over real HTTP, against the sandbox on a second port.

Every order of events (follow→login, login→follow, backfill→login, decrypt-supplied unionid,
unfollow/re-follow) ends with the identity read back through GET /v1/users. Every test also
checks that no session_key, secret or access_token reached a response body or a log record.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import tempfile
from typing import Any

import tornado.httpclient
import tornado.web
from Crypto.Cipher import AES
from Crypto.Util.Padding import pad
from tornado.testing import AsyncHTTPTestCase, gen_test

from tests.helpers import ADMIN_TOKEN, FakeClock, FakeTime, fetchone
from tests.sandbox_fixture import WeChatStack
from wxd.admin import common_kwargs, make_app
from wxd.admin.users import routes
from wxd.errors import WeChatAPIError
from wxd.linking import Linking, LinkingError
from wxd.metrics import Registry
from wxd.sandbox import Credentials, FakeWeChat, Person
from wxd.store import followers, ingest, mp_users
from wxd.store.identity import Identity, find_identity
from wxd.wechat.mp import MiniProgramAPI
from wxd.wechat.oa import OfficialAccountAPI

# Official MP encryptedData vector:
# https://developers.weixin.qq.com/miniprogram/dev/framework/open-ability/signature.html
VECTOR_APPID = "wx4f4bc4dec97d474b"
VECTOR_SESSION_KEY = "tiihtNczf5v6AKRyjwEUhQ=="
VECTOR_IV = "r7BXXKkLb8qrSNn05n0qiA=="
VECTOR_DATA = (
    "CiyLU1Aw2KjvrjMdj8YKliAjtP4gsMZMQmRzooG2xrDcvSnxIMXFufNstNGTyaGS9uT5geRa0W4oTOb1WT7fJlAC+oNPdbB"
    "+3hVbJSRgv+4lGOETKUQz6OYStslQ142dNCuabNPGBzlooOmB231qMM85d2/fV6ChevvXvQP8Hkue1poOFtnEtpyxVLW1zA"
    "o6/1Xx1COxFvrc2d7UL/lmHInNlxuacJXwu0fjpXfz/YqYzBIBzD6WUfTIF9GRHpOn/Hz7saL8xz+W//FRAUid1OksQaQx4"
    "CMs8LOddcQhULW4ucetDf96JcR3g0gfRK4PC7E/r7Z6xNrXd2UIeorGj5Ef7b1pJAYB6Y5anaHqZ9J6nKEBvB4DnNLIVWSg"
    "ARns/8wR2SiRS7MNACwTyrGvt9ts8p12PKFdlqYTopNHR1Vf7XjfhQlVsAJdNiKdYmYVoKlaRv85IfVunYzO0IKXsyl7JCU"
    "jCpoG20f0a04COwfneQAGGwd5oa+T8yO5hzuyDb/XcxxmK01EpqOyuxINew=="
)
VECTOR_OPENID = "oGZUI0egBJY1zhBYw2KhdUfwVJJE"
VECTOR_UNIONID = "ocMvos6NjeKLIBqg5Mr9QjxrP1FA"
START = 1_700_000_000.0


def encrypt_mp_data(session_key: str, data: dict[str, Any]) -> tuple[str, str]:
    """What the WeChat client does: AES-128-CBC/PKCS#7 with the session_key → (data, iv)."""
    iv = os.urandom(16)
    cipher = AES.new(base64.b64decode(session_key), AES.MODE_CBC, iv=iv)
    plain = pad(json.dumps(data).encode(), 16)
    return base64.b64encode(cipher.encrypt(plain)).decode(), base64.b64encode(iv).decode()


class Capture(logging.Handler):
    """Every log record of every logger, formatted with its traceback."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        line = self.format(record)
        # The emulator's own access log is WeChat's side of the wire (it sees the secrets wxd
        # sends to WeChat); in production that line is written by WeChat, not by wxd.
        if record.name == "tornado.access" and any(
                f" {path}" in line for path in ("/sns/", "/cgi-bin/")):
            return
        self.lines.append(line)


class LinkingCase(FakeTime, AsyncHTTPTestCase):
    """Admin app (users routes) + sandbox on a second port + a real SQLite file."""

    mini_program = True
    unionid_ratio = 1.0

    def get_app(self) -> tornado.web.Application:
        self.clock = FakeClock(START)
        self.tmp = tempfile.TemporaryDirectory()
        self.capture = Capture()
        root = logging.getLogger()
        self.old_level = root.level
        root.addHandler(self.capture)
        root.setLevel(logging.DEBUG)
        self.creds = Credentials(mp_appid=VECTOR_APPID)
        self.fake = FakeWeChat(users=40, seed=7, credentials=self.creds, clock=self.clock,
                               follow_ratio=0.5, mp_ratio=0.0, unionid_ratio=self.unionid_ratio)
        self.bodies: list[str] = []
        self.registry = Registry()
        self.io_loop.run_sync(self._start)
        common = common_kwargs(ADMIN_TOKEN, self.registry)
        return make_app(common, [routes(common, self.linking)])

    async def _start(self) -> None:
        self.stack = await WeChatStack(self.fake, os.path.join(self.tmp.name, "wxd.db")).start()
        self.db, client = self.stack.db, self.stack.client
        self.tokens = self.stack.token_source()
        mp_api = (MiniProgramAPI(client, self.creds.mp_appid, self.creds.mp_secret)
                  if self.mini_program else None)
        self.linking = Linking(self.db, mp_api, OfficialAccountAPI(client, self.tokens),
                               mp_appid=self.creds.mp_appid if self.mini_program else None,
                               clock=self.clock, metrics=self.registry)

    async def _stop(self) -> None:
        await self.stack.close()

    def tearDown(self) -> None:
        try:
            self.io_loop.run_sync(self._stop)
            super().tearDown()
        finally:
            root = logging.getLogger()
            root.removeHandler(self.capture)
            root.setLevel(self.old_level)
            self.tmp.cleanup()
        self.assert_no_secrets()

    def assert_no_secrets(self) -> None:
        secrets = [self.creds.oa_secret, self.creds.mp_secret, VECTOR_SESSION_KEY,
                   *self.tokens.issued]
        secrets += [p.session_key for p in self.fake.people if p.session_key]
        for secret in secrets:
            for body in self.bodies:
                assert secret not in body, "a secret reached a response body"
            for line in self.capture.lines:
                assert secret not in line, f"a secret reached the log: {line}"

    # HTTP helpers -----------------------------------------------------------------------------

    async def call(self, method: str, path: str, body: Any = None,
                   auth: bool = True) -> tuple[int, Any]:
        headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"} if auth else {}
        response = await self.http_client.fetch(
            self.get_url(path), method=method, headers=headers, raise_error=False,
            body=None if body is None else json.dumps(body),
        )
        text = response.body.decode()
        self.bodies.append(text)
        return response.code, json.loads(text)

    async def login(self, person: Person) -> dict[str, Any]:
        status, answer = await self.call("POST", "/v1/mp/login",
                                          {"code": self.fake.issue_login_code(person)})
        self.assertEqual(status, 200, answer)
        return answer  # type: ignore[no-any-return]

    async def user(self, **key: str) -> dict[str, Any]:
        ((name, value),) = key.items()
        status, answer = await self.call("GET", f"/v1/users?{name}={value}")
        self.assertEqual(status, 200, answer)
        return answer  # type: ignore[no-any-return]

    # What the event jobs do (events.py): store the event, then user/info for the unionid.
    async def subscribe(self, person: Person) -> None:
        self.fake.follow(person)
        now = self.now
        await self.db.write(lambda c: followers.record_subscribe(c, person.oa_openid, now, now))
        await self.linking.refresh_follower(person.oa_openid)

    async def unsubscribe(self, person: Person) -> None:
        self.fake.unfollow(person)
        now = self.now
        await self.db.write(lambda c: followers.record_unsubscribe(c, person.oa_openid, now, now))

    async def stored(self, oa_openid: str) -> Identity | None:
        return await self.db.read(
            lambda conn: find_identity(conn, oa_openid=oa_openid))

    def follower(self) -> Person:
        return next(p for p in self.fake.people if p.follows and p.unionid
                    and p.session_key is None and p.index % 2 == 0)

    def stranger(self) -> Person:
        return next(p for p in self.fake.people if not p.follows and p.session_key is None)


class OrdersTest(LinkingCase):
    @gen_test
    async def test_follow_then_login(self) -> None:
        person = self.stranger()
        await self.subscribe(person)
        self.now += 60
        answer = await self.login(person)
        self.assertEqual(answer, {"mp_openid": person.mp_openid, "unionid": person.unionid,
                                  "oa_openid": person.oa_openid, "subscribed": True})
        ident = await self.user(mp_openid=person.mp_openid)
        self.assertEqual(ident["oa_openid"], person.oa_openid)
        self.assertEqual(ident["linked_at"], START + 60)
        self.assertEqual(ident["subscribed_at"], START)
        self.assertEqual(ident["mp_user_since"], START + 60)
        self.assertEqual(await self.user(oa_openid=person.oa_openid), ident)
        self.assertEqual(await self.user(unionid=str(person.unionid)), ident)
        logins = self.registry.counter("wxd_mp_logins_total", "", ("result",))
        self.assertEqual(logins.get(result="ok"), 1)
        self.assertEqual(self.registry.counter("wxd_links_total", "").get(), 1)
        self.assertFalse(self.linking.unionid_missing)

    @gen_test
    async def test_login_then_follow(self) -> None:
        person = self.stranger()
        answer = await self.login(person)
        self.assertEqual(answer, {"mp_openid": person.mp_openid, "unionid": person.unionid,
                                  "oa_openid": None, "subscribed": False})
        ident = await self.user(unionid=str(person.unionid))
        self.assertIsNone(ident["oa_openid"])
        self.assertIsNone(ident["linked_at"])
        self.now += 30
        await self.subscribe(person)  # the subscribe event's user/info brings the unionid
        ident = await self.user(mp_openid=person.mp_openid)
        self.assertEqual((ident["oa_openid"], ident["subscribed"], ident["linked_at"]),
                         (person.oa_openid, True, START + 30))
        self.assertEqual(self.fake.count_calls("/cgi-bin/user/info"), 1)

    @gen_test
    async def test_backfilled_follower_then_login(self) -> None:
        person = self.follower()
        oa_api = OfficialAccountAPI(self.stack.client, self.tokens)
        infos = await oa_api.batchget([p.oa_openid for p in self.fake.people if p.follows][:100])
        now = self.now
        newly = await self.db.write(lambda c: ingest.apply_user_infos(c, infos, now, now, run=1))
        self.assertEqual(newly, [])
        before = await self.user(oa_openid=person.oa_openid)
        self.assertEqual((before["unionid"], before["mp_openid"]), (person.unionid, None))
        self.now += 5
        answer = await self.login(person)
        self.assertEqual((answer["oa_openid"], answer["subscribed"]), (person.oa_openid, True))
        ident = await self.user(unionid=str(person.unionid))
        self.assertEqual(ident["mp_openid"], person.mp_openid)
        self.assertEqual(ident["subscribed_at"], person.subscribe_time)
        self.assertEqual(ident["subscribe_scene"], person.subscribe_scene)
        self.assertEqual(ident["linked_at"], START + 5)

    @gen_test
    async def test_unionid_learned_through_decrypt(self) -> None:
        person = self.stranger()
        await self.subscribe(person)
        unionid = person.unionid
        person.unionid = None  # the MP side returns no unionid (an unbound era)
        try:
            answer = await self.login(person)
        finally:
            person.unionid = unionid
        self.assertEqual((answer["unionid"], answer["oa_openid"]), (None, None))
        assert person.session_key is not None
        data, iv = encrypt_mp_data(person.session_key, {
            "openId": person.mp_openid, "unionId": unionid, "nickName": "微信用户",
            "watermark": {"timestamp": 1_700_000_123, "appid": self.creds.mp_appid}})
        self.now += 10
        status, body = await self.call("POST", "/v1/mp/decrypt", {
            "mp_openid": person.mp_openid, "encrypted_data": data, "iv": iv})
        self.assertEqual(status, 200, body)
        self.assertEqual(body["data"]["unionId"], unionid)
        self.assertEqual(body["data"]["nickName"], "微信用户")
        ident = await self.user(mp_openid=person.mp_openid)
        self.assertEqual((ident["unionid"], ident["oa_openid"], ident["linked_at"]),
                         (unionid, person.oa_openid, START + 10))
        row = await fetchone(self.db, "SELECT watermark_at FROM mp_users WHERE mp_openid = ?",
                                     (person.mp_openid,))
        assert row is not None
        self.assertEqual(row["watermark_at"], 1_700_000_123)

    @gen_test
    async def test_unfollow_keeps_link_and_refollow_restores_it(self) -> None:
        person = self.stranger()
        await self.subscribe(person)
        await self.login(person)
        self.now += 100
        await self.unsubscribe(person)
        # A later user/info (e.g. a resync) says subscribe=0 and has no unionid any more.
        self.now += 1
        await self.linking.refresh_follower(person.oa_openid)
        ident = await self.user(mp_openid=person.mp_openid)
        self.assertEqual((ident["oa_openid"], ident["unionid"], ident["subscribed"]),
                         (person.oa_openid, person.unionid, False))
        self.assertEqual(ident["unsubscribed_at"], START + 100)
        self.assertEqual(ident["linked_at"], START)
        status, answer = await self.call("POST", "/v1/mp/login",
                                         {"code": self.fake.issue_login_code(person)})
        self.assertEqual((status, answer["oa_openid"], answer["subscribed"]),
                         (200, person.oa_openid, False))
        self.now += 100
        await self.subscribe(person)
        ident = await self.user(unionid=str(person.unionid))
        self.assertEqual((ident["oa_openid"], ident["subscribed"], ident["subscribed_at"]),
                         (person.oa_openid, True, START + 201))
        self.assertEqual(ident["linked_at"], START)
        self.assertEqual(self.registry.counter("wxd_links_total", "").get(), 1)


    @gen_test
    async def test_a_burst_of_refreshes_shares_batchget_calls(self) -> None:
        people = [p for p in self.fake.people if p.follows and p.unionid][:250]
        await asyncio.gather(*(self.linking.refresh_follower(p.oa_openid) for p in people))
        batchgets = self.fake.count_calls("/cgi-bin/user/info/batchget")
        user_infos = self.fake.count_calls("/cgi-bin/user/info")
        # 250 refreshes: at most 4 calls start before the burst has queued, then 100 per call.
        self.assertLessEqual(batchgets + user_infos, 8)
        for person in people:
            stored = await self.stored(person.oa_openid)
            assert stored is not None and stored.unionid == person.unionid

    @gen_test
    async def test_an_openid_wechat_refuses_fails_only_its_own_refresh(self) -> None:
        people = [p for p in self.fake.people if p.follows and p.unionid][:20]
        openids = [p.oa_openid for p in people]
        openids.insert(7, "oUnknownToWeChat000000000000")  # batchget answers 40003 for all
        results = await asyncio.gather(*(self.linking.refresh_follower(o) for o in openids),
                                       return_exceptions=True)
        failed = [o for o, r in zip(openids, results, strict=True) if isinstance(r, Exception)]
        self.assertEqual(failed, ["oUnknownToWeChat000000000000"])
        error = results[7]
        assert isinstance(error, WeChatAPIError)
        self.assertEqual(error.errcode, 40003)
        # Split in halves (coalesce.split_refused), not asked one by one: a few user/info calls.
        self.assertLessEqual(self.fake.count_calls("/cgi-bin/user/info"), 4)
        self.assertLessEqual(self.fake.count_calls("/cgi-bin/user/info/batchget"), 1 + 2 * 5)
        for person in people:
            stored = await self.stored(person.oa_openid)
            assert stored is not None and stored.unionid == person.unionid


class DecryptTest(LinkingCase):
    async def store_vector_session(self) -> None:
        await self.db.write(lambda c: mp_users.upsert(
            c, VECTOR_OPENID, None, VECTOR_SESSION_KEY, START))

    @gen_test
    async def test_official_vector(self) -> None:
        await self.store_vector_session()
        status, body = await self.call("POST", "/v1/mp/decrypt", {
            "mp_openid": VECTOR_OPENID, "encrypted_data": VECTOR_DATA, "iv": VECTOR_IV})
        self.assertEqual(status, 200, body)
        self.assertEqual(body["data"]["openId"], VECTOR_OPENID)
        self.assertEqual(body["data"]["unionId"], VECTOR_UNIONID)
        self.assertEqual(body["data"]["watermark"],
                         {"timestamp": 1477314187, "appid": VECTOR_APPID})
        ident = await self.user(mp_openid=VECTOR_OPENID)
        self.assertEqual(ident["unionid"], VECTOR_UNIONID)

    @gen_test
    async def test_wrong_watermark_appid_is_refused(self) -> None:
        await self.store_vector_session()
        data, iv = encrypt_mp_data(VECTOR_SESSION_KEY, {
            "openId": VECTOR_OPENID, "unionId": "oSomeoneElse",
            "watermark": {"timestamp": 1, "appid": "wx0000000000000000"}})
        status, body = await self.call("POST", "/v1/mp/decrypt", {
            "mp_openid": VECTOR_OPENID, "encrypted_data": data, "iv": iv})
        self.assertEqual((status, body["error"]["code"]), (422, "watermark_mismatch"))
        ident = await self.user(mp_openid=VECTOR_OPENID)
        self.assertIsNone(ident["unionid"])

    @gen_test
    async def test_other_users_data_is_refused(self) -> None:
        await self.store_vector_session()
        data, iv = encrypt_mp_data(VECTOR_SESSION_KEY, {
            "openId": "oSomebodyElse", "unionId": "oTheirUnion",
            "watermark": {"timestamp": 1, "appid": VECTOR_APPID}})
        status, body = await self.call("POST", "/v1/mp/decrypt", {
            "mp_openid": VECTOR_OPENID, "encrypted_data": data, "iv": iv})
        self.assertEqual((status, body["error"]["code"]), (422, "openid_mismatch"))

    @gen_test
    async def test_tampered_ciphertext_means_session_key_expired(self) -> None:
        await self.store_vector_session()
        raw = bytearray(base64.b64decode(VECTOR_DATA))
        raw[40] ^= 0x55
        tampered = base64.b64encode(bytes(raw)).decode()
        for encrypted, iv in ((tampered, VECTOR_IV), (VECTOR_DATA, base64.b64encode(
                b"\0" * 16).decode()), ("not base64!", VECTOR_IV), (VECTOR_DATA[:-8], VECTOR_IV)):
            status, body = await self.call("POST", "/v1/mp/decrypt", {
                "mp_openid": VECTOR_OPENID, "encrypted_data": encrypted, "iv": iv})
            self.assertEqual((status, body["error"]["code"]), (409, "session_key_expired"))
        # A session_key that is not the one the data was made with (wx.login ran again).
        await self.db.write(lambda c: mp_users.upsert(
            c, VECTOR_OPENID, None, base64.b64encode(b"k" * 16).decode(), START))
        status, body = await self.call("POST", "/v1/mp/decrypt", {
            "mp_openid": VECTOR_OPENID, "encrypted_data": VECTOR_DATA, "iv": VECTOR_IV})
        self.assertEqual((status, body["error"]["code"]), (409, "session_key_expired"))

    @gen_test
    async def test_not_logged_in(self) -> None:
        status, body = await self.call("POST", "/v1/mp/decrypt", {
            "mp_openid": VECTOR_OPENID, "encrypted_data": VECTOR_DATA, "iv": VECTOR_IV})
        self.assertEqual((status, body["error"]["code"]), (409, "not_logged_in"))

    @gen_test
    async def test_validation(self) -> None:
        cases: list[tuple[dict[str, Any], str]] = [
            ({"encrypted_data": "x", "iv": "y"}, "missing_field"),
            ({"mp_openid": "", "encrypted_data": "x", "iv": "y"}, "missing_field"),
            ({"mp_openid": 5, "encrypted_data": "x", "iv": "y"}, "invalid_field"),
            ({"mp_openid": "m", "encrypted_data": "x", "iv": "y" * 65}, "invalid_field"),
            ({"mp_openid": "m", "iv": "y"}, "missing_field"),
        ]
        for body, code in cases:
            status, answer = await self.call("POST", "/v1/mp/decrypt", body)
            self.assertEqual((status, answer["error"]["code"]), (400, code), body)


class LoginErrorsTest(LinkingCase):
    @gen_test
    async def test_used_and_unknown_codes(self) -> None:
        person = self.stranger()
        code = self.fake.issue_login_code(person)
        status, _ = await self.call("POST", "/v1/mp/login", {"code": code})
        self.assertEqual(status, 200)
        for again in (code, "0000garbage"):
            status, body = await self.call("POST", "/v1/mp/login", {"code": again})
            self.assertEqual((status, body["error"]["code"]), (400, "invalid_code"))
        logins = self.registry.counter("wxd_mp_logins_total", "", ("result",))
        self.assertEqual((logins.get(result="ok"), logins.get(result="invalid_code")), (1, 2))

    @gen_test
    async def test_upstream_refusals_map_to_stable_codes(self) -> None:
        person = self.stranger()
        for fault, status, code in (("45011", 429, "rate_limited"),
                                    ("40226", 403, "user_blocked"),
                                    ("-1", 503, "upstream_unavailable"),
                                    ("http500", 502, "upstream_unavailable"),
                                    ("40013", 502, "upstream_error")):
            self.fake.script_fault("/sns/jscode2session", fault)
            got, body = await self.call("POST", "/v1/mp/login",
                                        {"code": self.fake.issue_login_code(person)})
            self.assertEqual((got, body["error"]["code"]), (status, code), fault)
        answer = await self.login(person)  # no fault left: the next code works
        self.assertEqual(answer["mp_openid"], person.mp_openid)

    @gen_test
    async def test_validation_and_auth(self) -> None:
        for body, code in (({}, "missing_field"), ({"code": 12}, "invalid_field"),
                           ({"code": "x" * 300}, "invalid_field")):
            status, answer = await self.call("POST", "/v1/mp/login", body)
            self.assertEqual((status, answer["error"]["code"]), (400, code), body)
        status, answer = await self.call("POST", "/v1/mp/login", {"code": "c"}, auth=False)
        self.assertEqual(status, 401)
        self.assertEqual(self.fake.count_calls("/sns/jscode2session"), 0)

    @gen_test
    async def test_users_lookup_errors(self) -> None:
        for query, status, code in (("", 400, "missing_field"),
                                    ("?unionid=a&mp_openid=b", 400, "invalid_field"),
                                    ("?unionid=", 400, "invalid_field"),
                                    ("?oa_openid=nobody", 404, "user_not_found"),
                                    ("?mp_openid=nobody", 404, "user_not_found"),
                                    ("?unionid=nobody", 404, "user_not_found")):
            got, answer = await self.call("GET", f"/v1/users{query}")
            self.assertEqual((got, answer["error"]["code"]), (status, code), query)


class NoMiniProgramTest(LinkingCase):
    """No [mini_program] section, and an OA not bound to an Open Platform account."""

    mini_program = False
    unionid_ratio = 0.0

    @gen_test
    async def test_mini_program_routes_say_not_configured(self) -> None:
        status, body = await self.call("POST", "/v1/mp/login", {"code": "abc"})
        self.assertEqual((status, body["error"]["code"]), (409, "mini_program_not_configured"))
        status, body = await self.call("POST", "/v1/mp/decrypt", {
            "mp_openid": "m", "encrypted_data": VECTOR_DATA, "iv": VECTOR_IV})
        self.assertEqual((status, body["error"]["code"]), (409, "mini_program_not_configured"))
        with self.assertRaises(LinkingError):
            await self.linking.login("abc")

    @gen_test
    async def test_missing_unionid_is_reported_once(self) -> None:
        self.assertFalse(await self.linking.check_unionid())
        await self.registry.collect()
        self.assertIn("wxd_unionid_missing 0", self.registry.render())
        people = [p for p in self.fake.people if p.follows][:3]
        for person in people:
            await self.linking.refresh_follower(person.oa_openid)
        self.assertTrue(self.linking.unionid_missing)
        warnings = [line for line in self.capture.lines
                    if "no unionid" in line and "WARNING" in line]
        self.assertEqual(len(warnings), 1)
        await self.registry.collect()
        self.assertIn("wxd_unionid_missing 1", self.registry.render())
        counts = await self.linking.counts()
        self.assertEqual((counts["followers"], counts["with_unionid"], counts["unionid_missing"]),
                         (3, 0, True))
