"""Linking without unionid end to end: the whole daemon (in-process) against the sandbox, over
real HTTP on loopback. QR link codes (both scan orders, expiry, reuse, unknown and forged
scenes, conflicts with unionid links, re-binding, removal, a restart, WeChat's retries, the
passive reply in plain and safe mode, the Mini Program card), OAuth links (the whole browser
flow and every refusal), and pushes addressed by mp_openid through each link source."""

from __future__ import annotations

import asyncio
import json
import pathlib
import re
import tempfile
import urllib.parse
from typing import Any, ClassVar

from tornado.httpclient import AsyncHTTPClient, HTTPResponse
from tornado.testing import AsyncTestCase, gen_test
from wechatpy.crypto import WeChatCrypto

from tests.helpers import (
    ADMIN_TOKEN,
    START,
    FakeClock,
    LogCapture,
    capture_logs,
    eventually,
    free_port,
    sandbox_config_text,
)
from wxd import config
from wxd.daemon import Daemon
from wxd.sandbox import ORDER_TEMPLATE_ID, FakeWeChat, Person, SandboxServer
from wxd.store import jobs as job_store
from wxd.wechat.messages import parse_xml

RETURN_URL = "https://shop.example.com/linked?from=mp"


class LinksCase(AsyncTestCase):
    """wxd (Daemon, FakeClock) + sandbox on the same loop; the webhook configured in `mode`."""

    unionid_ratio = 0.0
    mode = "plain"
    linking: ClassVar[dict[str, object]] = {}
    public_url = True

    def setUp(self) -> None:
        super().setUp()
        self.clock = FakeClock(START)
        self.tmp = tempfile.TemporaryDirectory()
        self.db_path = str(pathlib.Path(self.tmp.name) / "wxd.db")
        self.fake = FakeWeChat(users=60, seed=17, clock=self.clock, follow_ratio=0.5,
                               mp_ratio=0.0, unionid_ratio=self.unionid_ratio)
        self._logs = capture_logs()
        self.capture: LogCapture = self._logs.__enter__()
        self.http = AsyncHTTPClient(force_instance=True)
        self.admin_port, self.webhook_port = free_port(), free_port()
        self.pages: list[bytes] = []
        self.io_loop.run_sync(self._start)

    async def _start(self) -> None:
        self.sandbox = SandboxServer(self.fake)
        await self.sandbox.start()
        await self.start_daemon()

    async def start_daemon(self) -> None:
        webhook: dict[str, object] = {}
        if self.public_url:
            webhook["public_url"] = f"http://127.0.0.1:{self.webhook_port}"
        extra: dict[str, dict[str, object]] = {
            "webhook": webhook,
            "linking": {"oauth_return_hosts": "shop.example.com", **self.linking},
            "events": {"backoff_base_s": 0.01},
        }
        text = sandbox_config_text(self.db_path, self.fake.credentials, self.sandbox.base_url,
                                   self.admin_port, self.webhook_port, extra)
        self.daemon = Daemon(config.load_text(text), clock=self.clock)
        await self.daemon.start()
        self.webhook_url = f"http://127.0.0.1:{self.webhook_port}/wechat"
        self.fake.configure_webhook(self.webhook_url, mode=self.mode)

    async def _stop(self) -> None:
        await self.daemon.stop()
        await self.sandbox.stop()

    def tearDown(self) -> None:
        try:
            self.io_loop.run_sync(self._stop)
            self.http.close()
        finally:
            self._logs.__exit__(None, None, None)
            self.tmp.cleanup()
        super().tearDown()
        self.assert_no_secrets()

    def assert_no_secrets(self) -> None:
        creds = self.fake.credentials
        for secret in (creds.oa_secret, creds.mp_secret):
            assert secret not in self.capture.text
            assert all(secret.encode() not in page for page in self.pages)

    # HTTP ---------------------------------------------------------------------------------

    async def admin(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        response = await self.http.fetch(
            f"http://127.0.0.1:{self.admin_port}{path}", method=method, raise_error=False,
            headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
            body=json.dumps(body) if body is not None else (b"" if method == "POST" else None))
        return response.code, json.loads(response.body)

    async def ok(self, method: str, path: str, body: Any = None, status: int = 200) -> Any:
        code, answer = await self.admin(method, path, body)
        assert code == status, (code, answer)
        return answer

    async def control(self, path: str, body: dict[str, Any]) -> tuple[int, Any]:
        response = await self.http.fetch(self.sandbox.base_url + path, method="POST",
                                         body=json.dumps(body), raise_error=False)
        return response.code, json.loads(response.body)

    async def get(self, url: str, **headers: str) -> HTTPResponse:
        response = await self.http.fetch(url, follow_redirects=False, raise_error=False,
                                         headers=headers)
        self.pages.append(response.body or b"")
        return response

    # Steps --------------------------------------------------------------------------------

    async def settled(self) -> None:
        db = self.daemon.db
        assert db is not None
        await eventually(lambda: db.read(job_store.counts), "the jobs to settle",
                         until=lambda counts: counts["queued"] == counts["leased"] == 0)

    async def backfilled(self) -> None:
        await self.ok("POST", "/v1/backfill", status=202)
        await eventually(lambda: self.ok("GET", "/v1/backfill"), "the backfill",
                         until=lambda status: status["state"] == "done")

    async def qrcode(self, person: Person, **body: Any) -> dict[str, Any]:
        code: dict[str, Any] = await self.ok("POST", "/v1/links/qrcodes",
                                             {"mp_openid": person.mp_openid, **body}, 201)
        return code

    async def scan(self, person: Person, ticket: str, duplicates: int = 0) -> dict[str, Any]:
        status, result = await self.control("/_sandbox/scan", {
            "index": person.index, "ticket": ticket, "duplicates": duplicates})
        assert status == 200, result
        await self.settled()
        return result  # type: ignore[no-any-return]

    async def event(self, person: Person, event: str, scene: str) -> dict[str, Any]:
        status, result = await self.control("/_sandbox/events", {
            "index": person.index, "event": event, "scene": scene})
        assert status == 200, result
        await self.settled()
        return result["webhook"]  # type: ignore[no-any-return]

    async def code_status(self, code: dict[str, Any]) -> dict[str, Any]:
        kind = "qrcodes" if code["id"].startswith("lq_") else "oauth"
        answer: dict[str, Any] = await self.ok("GET", f"/v1/links/{kind}/{code['id']}")
        return answer

    async def user(self, person: Person) -> dict[str, Any]:
        answer: dict[str, Any] = await self.ok("GET", f"/v1/users?mp_openid={person.mp_openid}")
        return answer

    async def push(self, person: Person) -> tuple[int, Any]:
        keys = self.fake.templates[ORDER_TEMPLATE_ID].keys
        samples = {"thing": "礼盒", "character_string": "A1", "amount": "1.5元",
                   "time": "2026年11月29日 12:00", "phrase": "配送中"}
        data = {k: samples.get(k.rstrip("0123456789"), "ok") for k in keys}
        return await self.admin("POST", "/v1/pushes", {
            "to": {"mp_openid": person.mp_openid}, "template_id": ORDER_TEMPLATE_ID,
            "data": data})

    async def delivered(self, person: Person, push_id: str) -> None:
        push = await eventually(lambda: self.ok("GET", f"/v1/pushes/{push_id}"), "the send",
                                until=lambda p: p["status"] in ("sent", "delivered", "failed"))
        assert push["status"] in ("sent", "delivered"), push
        assert [m["template_id"] for m in self.fake.inbox(person.oa_openid)] == [ORDER_TEMPLATE_ID]

    def stranger(self, n: int = 0) -> Person:
        return [p for p in self.fake.people if not p.follows][n]

    def follower(self, n: int = 0) -> Person:
        return [p for p in self.fake.people if p.follows][n]

    def links_metric(self, kind: str, outcome: str) -> float:
        return self.daemon.metrics.counter("wxd_link_codes_total", "", ("kind", "outcome")).get(
            kind=kind, outcome=outcome)


class QrCodeTest(LinksCase):
    @gen_test(timeout=30)
    async def test_scan_as_a_new_follower_links_and_a_push_by_mp_openid_arrives(self) -> None:
        person = self.stranger()
        code = await self.qrcode(person)
        assert set(code) == {"id", "scene", "ticket", "url", "image_url", "expires_at", "status"}
        assert code["status"] == "pending" and code["expires_at"] == START + 600
        assert re.fullmatch(r"wxdl[A-Za-z0-9]{28}", code["scene"])
        assert code["image_url"] == (f"{self.sandbox.base_url}/cgi-bin/showqrcode?ticket="
                                     + urllib.parse.quote(code["ticket"], safe=""))
        image = await self.get(code["image_url"])
        assert image.code == 200 and image.headers["Content-Type"] == "image/jpg"
        assert (await self.code_status(code))["status"] == "pending"
        # Not linked yet: a push by mp_openid is refused (the MP user has no OA side).
        assert (await self.push(person))[0] == 422

        result = await self.scan(person, code["ticket"])
        assert (result["event"], result["scene"]) == ("subscribe", code["scene"])
        assert result["webhook"]["status"] == 200 and result["webhook"]["body"] == "success"
        status = await self.code_status(code)
        assert status == {"id": code["id"], "status": "linked", "expires_at": START + 600,
                          "oa_openid": person.oa_openid, "linked_at": START}
        identity = await self.user(person)
        assert (identity["oa_openid"], identity["subscribed"], identity["unionid"]) == \
            (person.oa_openid, True, None)
        assert identity["link"] == {"source": "qrcode", "linked_at": START}
        by_oa = await self.ok("GET", f"/v1/users?oa_openid={person.oa_openid}")
        assert by_oa["mp_openid"] == person.mp_openid and by_oa["qr_scene_str"] == code["scene"]
        status_code, push = await self.push(person)
        assert status_code == 202, push
        await self.delivered(person, push["id"])
        stats = await self.ok("GET", "/v1/stats")
        assert stats["linked"] == 1 and stats["links"] == {"unionid": 0, "qrcode": 1, "oauth": 0}
        assert stats["unionid_missing"] is True
        assert f"linked MP user {person.mp_openid} to OA openid {person.oa_openid}" in \
            self.capture.text

    @gen_test(timeout=30)
    async def test_scan_while_already_following(self) -> None:
        person = self.follower()
        await self.backfilled()
        code = await self.qrcode(person)
        result = await self.scan(person, code["ticket"])
        assert (result["event"], result["scene"]) == ("SCAN", code["scene"])
        assert (await self.code_status(code))["oa_openid"] == person.oa_openid
        identity = await self.user(person)
        assert identity["subscribed"] is True and identity["link"]["source"] == "qrcode"

    @gen_test(timeout=30)
    async def test_expired_codes_link_nothing_but_the_follow_is_recorded(self) -> None:
        follower, newcomer = self.follower(), self.stranger()
        first = await self.qrcode(follower, expires_in=60)
        second = await self.qrcode(newcomer, expires_in=60)
        self.clock.advance(60)
        assert (await self.code_status(first))["status"] == "expired"
        result = await self.scan(follower, first["ticket"])
        assert result["event"] is None  # WeChat sends nothing with the scene any more
        result = await self.scan(newcomer, second["ticket"])
        assert (result["event"], result["scene"]) == ("subscribe", None)
        for code, person in ((first, follower), (second, newcomer)):
            assert (await self.code_status(code))["status"] == "expired"
            assert (await self.user(person))["oa_openid"] is None
        follow = await self.ok("GET", f"/v1/users?oa_openid={newcomer.oa_openid}")
        assert follow["subscribed"] is True and follow["mp_openid"] is None
        # The scene arrives late (the person sat on the follow page): judged by CreateTime.
        third = await self.qrcode(self.stranger(1), expires_in=60)
        self.clock.advance(61)
        webhook = await self.event(self.follower(1), "SCAN", third["scene"])
        assert webhook["body"] == "success"
        assert (await self.code_status(third))["status"] == "expired"
        assert "is expired; nothing linked" in self.capture.text

    @gen_test(timeout=30)
    async def test_a_code_is_single_use(self) -> None:
        owner, first, second = self.stranger(0), self.follower(0), self.follower(1)
        code = await self.qrcode(owner)
        await self.scan(first, code["ticket"])
        await self.scan(second, code["ticket"])  # someone else scans the same code
        await self.scan(first, code["ticket"])  # the linked person again: no change
        status = await self.code_status(code)
        assert (status["status"], status["oa_openid"]) == ("linked", first.oa_openid)
        assert (await self.user(owner))["oa_openid"] == first.oa_openid
        assert (await self.ok("GET", f"/v1/users?oa_openid={second.oa_openid}"))["mp_openid"] \
            is None
        assert self.links_metric("qrcode", "used") == 1
        assert self.links_metric("qrcode", "linked") == 1

    @gen_test(timeout=30)
    async def test_unknown_and_forged_scenes_link_nothing(self) -> None:
        person, owner = self.follower(), self.stranger()
        code = await self.qrcode(owner)
        forged = [
            "wxdl" + "A" * 28,                     # well-formed, never issued
            code["scene"][:-1],                    # one character short
            code["scene"] + "x",                   # one character long
            code["scene"].lower(),                 # case changed
            code["id"],                            # the code's public id
            "wxdl' OR '1'='1' --" + "a" * 10,      # SQL text
            "qrscene_" + code["scene"],            # a double prefix
            "x" * 64, "", "0",
        ]
        for scene in forged:
            for event in ("SCAN", "subscribe"):
                webhook = await self.event(person, event, scene)
                assert (webhook["status"], webhook["body"]) == (200, "success"), scene
        assert (await self.code_status(code))["status"] == "pending"
        assert (await self.user(owner))["oa_openid"] is None
        follow = await self.ok("GET", f"/v1/users?oa_openid={person.oa_openid}")
        assert follow["mp_openid"] is None and follow["subscribed"] is True
        assert "names an unknown QR link scene; nothing linked" in self.capture.text
        assert self.links_metric("qrcode", "linked") == 0

    @gen_test(timeout=30)
    async def test_rebinding_replaces_the_older_explicit_link_and_removal(self) -> None:
        owner, first, second = self.stranger(0), self.follower(0), self.follower(1)
        await self.scan(first, (await self.qrcode(owner))["ticket"])
        again = await self.qrcode(owner)
        await self.scan(second, again["ticket"])
        status = await self.code_status(again)
        assert status["oa_openid"] == second.oa_openid
        assert status["replaced"] == {"oa_openid": first.oa_openid}
        assert (await self.user(owner))["oa_openid"] == second.oa_openid
        assert f"replacing the earlier qrcode link {owner.mp_openid} -> {first.oa_openid}" in \
            self.capture.text
        # The OA side too: `second` scanning another MP user's code moves `second` there.
        other = self.stranger(1)
        await self.scan(second, (await self.qrcode(other))["ticket"])
        assert (await self.user(other))["oa_openid"] == second.oa_openid
        assert (await self.user(owner))["oa_openid"] is None
        # Removal.
        removed = await self.ok("DELETE", f"/v1/links?mp_openid={other.mp_openid}")
        assert removed == {"removed": {"mp_openid": other.mp_openid,
                                       "oa_openid": second.oa_openid, "source": "qrcode",
                                       "linked_at": START}}
        assert (await self.user(other))["link"] is None
        code, error = await self.admin("DELETE", f"/v1/links?mp_openid={other.mp_openid}")
        assert (code, error["error"]["code"]) == (404, "link_not_found")
        for bad in ("", "a b", "x" * 200):
            code, error = await self.admin("DELETE", "/v1/links?mp_openid="
                                           + urllib.parse.quote(bad))
            assert code == 400, bad
        assert (await self.push(other))[0] == 422

    @gen_test(timeout=30)
    async def test_a_restart_between_creation_and_scan(self) -> None:
        person = self.stranger()
        code = await self.qrcode(person)
        await self.daemon.stop()
        self.clock.advance(30)
        await self.start_daemon()
        await self.scan(person, code["ticket"])
        assert (await self.code_status(code))["status"] == "linked"
        assert (await self.user(person))["link"]["source"] == "qrcode"

    @gen_test(timeout=30)
    async def test_wechats_retries_of_the_scan_are_processed_once(self) -> None:
        person = self.stranger()
        code = await self.qrcode(person)
        result = await self.scan(person, code["ticket"], duplicates=3)
        answers = [result["webhook"], *result["repeats"]]
        assert [(a["status"], a["body"]) for a in answers] == [(200, "success")] * 4
        assert self.links_metric("qrcode", "linked") == 1
        assert self.links_metric("qrcode", "repeat") == 3
        assert self.daemon.db is not None
        counts = await self.daemon.db.read(job_store.counts)
        assert counts == {"queued": 0, "leased": 0, "done": 1, "failed": 0}
        assert (await self.code_status(code))["status"] == "linked"

    @gen_test(timeout=30)
    async def test_validation(self) -> None:
        for body, field in (({}, "mp_openid"), ({"mp_openid": "a b"}, "mp_openid"),
                            ({"mp_openid": 5}, "mp_openid"),
                            ({"mp_openid": "oX", "expires_in": 59}, "expires_in"),
                            ({"mp_openid": "oX", "expires_in": 2_592_001}, "expires_in"),
                            ({"mp_openid": "oX", "expires_in": "600"}, "expires_in"),
                            ({"mp_openid": "oX", "expires_in": True}, "expires_in")):
            code, error = await self.admin("POST", "/v1/links/qrcodes", body)
            assert code == 400 and error["error"]["field"] == field, body
        code, error = await self.admin("GET", "/v1/links/qrcodes/lq_nope")
        assert (code, error["error"]["code"]) == (404, "link_code_not_found")
        self.fake.script_fault("/cgi-bin/qrcode/create", "48001")
        code, error = await self.admin("POST", "/v1/links/qrcodes", {"mp_openid": "oX"})
        assert (code, error["error"]["code"], error["error"]["errcode"]) == \
            (502, "upstream_error", 48001)
        # The longest code lifetime WeChat allows is sent as it is.
        longest = await self.ok("POST", "/v1/links/qrcodes",
                                {"mp_openid": "oX", "expires_in": 2_592_000}, 201)
        assert longest["expires_at"] == START + 2_592_000


class UnionidConflictTest(LinksCase):
    """An account bound to Open Platform: unionid links exist and are never overridden."""

    unionid_ratio = 1.0

    async def login(self, person: Person) -> dict[str, Any]:
        answer: dict[str, Any] = await self.ok(
            "POST", "/v1/mp/login", {"code": self.fake.issue_login_code(person)})
        return answer

    @gen_test(timeout=30)
    async def test_an_explicit_link_never_overrides_a_unionid_link(self) -> None:
        await self.backfilled()
        linked, other = self.follower(0), self.follower(1)
        assert (await self.login(linked))["oa_openid"] == linked.oa_openid
        code = await self.qrcode(linked)
        await self.scan(other, code["ticket"])
        status = await self.code_status(code)
        assert (status["status"], status["error"]) == ("pending", "link_conflict")
        identity = await self.user(linked)
        assert (identity["oa_openid"], identity["link"]["source"]) == \
            (linked.oa_openid, "unionid")
        assert "link_conflict" in self.capture.text
        # The unionid link cannot be removed; a push by mp_openid goes through it.
        code_status, error = await self.admin("DELETE", f"/v1/links?mp_openid={linked.mp_openid}")
        assert (code_status, error["error"]["code"]) == (409, "link_derived")
        status_code, push = await self.push(linked)
        assert status_code == 202
        await self.delivered(linked, push["id"])
        # The same person scanning their own code agrees with unionid: linked, source unionid.
        own = await self.qrcode(linked)
        await self.scan(linked, own["ticket"])
        assert (await self.code_status(own))["status"] == "linked"
        assert (await self.user(linked))["link"]["source"] == "unionid"


class PassiveReplyTest(LinksCase):
    mode = "plain"
    linking: ClassVar[dict[str, object]] = {"qrcode_reply": "绑定成功 & <欢迎>"}

    def reply_xml(self, body: str) -> dict[str, str]:
        return parse_xml(body.encode())

    @gen_test(timeout=30)
    async def test_plain_reply_after_the_link_and_for_each_retry(self) -> None:
        person = self.stranger()
        code = await self.qrcode(person)
        result = await self.scan(person, code["ticket"], duplicates=1)
        for answer in (result["webhook"], *result["repeats"]):
            fields = self.reply_xml(answer["body"])
            assert (fields["ToUserName"], fields["FromUserName"], fields["MsgType"],
                    fields["Content"]) == (person.oa_openid, self.fake.credentials.oa_original_id,
                                           "text", "绑定成功 & <欢迎>")
        # Anything else is answered `success`.
        webhook = await self.event(self.follower(), "SCAN", "wxdl" + "B" * 28)
        assert webhook["body"] == "success"


class SafeModeReplyTest(PassiveReplyTest):
    mode = "safe"

    def reply_xml(self, body: str) -> dict[str, str]:
        creds = self.fake.credentials
        envelope = parse_xml(body.encode())
        assert set(envelope) == {"Encrypt", "MsgSignature", "TimeStamp", "Nonce"}
        crypto = WeChatCrypto(creds.webhook_token, creds.encoding_aes_key, creds.oa_appid)
        plain = crypto.decrypt_message(body, envelope["MsgSignature"], envelope["TimeStamp"],
                                       envelope["Nonce"])
        return parse_xml(plain.encode())


class CardTest(LinksCase):
    linking: ClassVar[dict[str, object]] = {
        "qrcode_card_thumb_media_id": "THUMB_MEDIA",
        "qrcode_card_pagepath": "pages/bound/index?from=qr", "qrcode_card_title": "已绑定"}

    @gen_test(timeout=30)
    async def test_the_mini_program_card_is_sent_once_after_the_link(self) -> None:
        person = self.follower()
        code = await self.qrcode(person)
        result = await self.scan(person, code["ticket"], duplicates=2)
        assert result["webhook"]["body"] == "success"  # the card never delays the answer
        messages = self.fake.kefu.messages(person.oa_openid)
        assert len(messages) == 1
        assert messages[0]["miniprogrampage"] == {
            "title": "已绑定", "appid": self.fake.credentials.mp_appid,
            "pagepath": "pages/bound/index?from=qr", "thumb_media_id": "THUMB_MEDIA"}
        assert self.daemon.db is not None
        assert (await self.daemon.db.read(job_store.counts))["done"] == 2  # event + card

    @gen_test(timeout=30)
    async def test_a_refused_card_fails_its_job_only(self) -> None:
        person = self.follower()
        self.fake.script_fault("/cgi-bin/message/custom/send", "45015")
        await self.scan(person, (await self.qrcode(person))["ticket"])
        assert self.daemon.db is not None
        counts = await self.daemon.db.read(job_store.counts)
        assert (counts["done"], counts["failed"]) == (1, 1)
        assert (await self.user(person))["link"]["source"] == "qrcode"


class OAuthCase(LinksCase):
    async def start_link(self, person: Person, **body: Any) -> dict[str, Any]:
        created: dict[str, Any] = await self.ok("POST", "/v1/links/oauth",
                                                {"mp_openid": person.mp_openid, **body}, 201)
        return created

    async def authorize(self, person: Person, location: str, **flags: bool) -> str:
        status, answer = await self.control("/_sandbox/oauth/authorize",
                                            {"index": person.index, "url": location, **flags})
        assert status == 200, answer
        callback: str = answer["location"]
        return callback

    async def through(self, person: Person, created: dict[str, Any], **flags: bool) -> str:
        """Open the start URL and pass WeChat's authorize page: the callback URL."""
        start = await self.get(created["url"])
        assert start.code == 302, start.body
        return await self.authorize(person, start.headers["Location"], **flags)

    def exchanges(self) -> int:
        return self.fake.count_calls("/sns/oauth2/access_token")


class OAuthTest(OAuthCase):
    @gen_test(timeout=30)
    async def test_the_whole_flow_through_real_http(self) -> None:
        person = self.stranger()  # web authorization gives the OA openid of a non-follower
        created = await self.start_link(person, return_url=RETURN_URL)
        public = f"http://127.0.0.1:{self.webhook_port}"
        assert set(created) == {"id", "url", "expires_at"}
        assert re.fullmatch(re.escape(public) + r"/oauth/start\?t=[A-Za-z0-9]{32}", created["url"])
        assert (await self.code_status(created))["status"] == "pending"
        start = await self.get(created["url"])
        assert start.code == 302
        location = start.headers["Location"]
        prefix = (f"{self.sandbox.base_url}/connect/oauth2/authorize?appid="
                  f"{self.fake.credentials.oa_appid}&redirect_uri="
                  f"{urllib.parse.quote(public + '/oauth/callback', safe='')}"
                  "&response_type=code&scope=snsapi_base&state=")
        assert location.startswith(prefix) and location.endswith("#wechat_redirect")
        state = location[len(prefix):-len("#wechat_redirect")]
        assert re.fullmatch(r"[A-Za-z0-9]{1,128}", state)
        assert state not in created["url"]
        callback = await self.authorize(person, location)
        assert callback.startswith(public + "/oauth/callback?code=")
        done = await self.get(callback)
        assert (done.code, done.headers["Location"]) == (302, RETURN_URL)
        assert done.headers["Referrer-Policy"] == "no-referrer"
        assert done.headers["Cache-Control"] == "no-store"
        status = await self.code_status(created)
        assert (status["status"], status["oa_openid"]) == ("linked", person.oa_openid)
        identity = await self.user(person)
        assert (identity["oa_openid"], identity["subscribed"], identity["link"]["source"]) == \
            (person.oa_openid, False, "oauth")
        # Not following: a template message cannot reach the person yet (43004)...
        assert (await self.push(person))[0] == 422
        # ...until they follow; then a push by mp_openid is delivered.
        self.fake.follow(person)
        status_code, _ = await self.control("/_sandbox/events",
                                            {"index": person.index, "event": "subscribe"})
        assert status_code == 200
        await self.settled()
        status_code, push = await self.push(person)
        assert status_code == 202, push
        await self.delivered(person, push["id"])
        assert (await self.ok("GET", "/v1/stats"))["links"]["oauth"] == 1
        code = urllib.parse.parse_qs(urllib.parse.urlsplit(callback).query)["code"][0]
        assert code not in self.capture.text and state not in self.capture.text

    @gen_test(timeout=30)
    async def test_the_browser_path_and_the_plain_linked_page(self) -> None:
        person = self.follower()
        created = await self.start_link(person)
        start = await self.get(created["url"])
        # The person's browser inside WeChat follows the 302 to the authorize page.
        page = await self.get(start.headers["Location"].partition("#")[0],
                              **{"X-Sandbox-Person": person.oa_openid})
        assert page.code == 302
        done = await self.get(page.headers["Location"])
        assert done.code == 200 and b"linked" in done.body
        assert done.headers["Content-Type"] == "text/html; charset=utf-8"
        assert (await self.user(person))["link"]["source"] == "oauth"

    @gen_test(timeout=30)
    async def test_a_repeated_callback_is_answered_without_a_second_exchange(self) -> None:
        person = self.stranger()
        created = await self.start_link(person, return_url=RETURN_URL)
        callback = await self.through(person, created)
        first, second = await asyncio.gather(self.get(callback), self.get(callback))
        assert [first.code, second.code] == [302, 302]
        third = await self.get(callback)
        assert (third.code, third.headers["Location"]) == (302, RETURN_URL)
        assert self.exchanges() == 1
        # After a restart (memory gone) the stored digest answers it.
        await self.daemon.stop()
        await self.start_daemon()
        again = await self.get(callback)
        assert (again.code, again.headers["Location"]) == (302, RETURN_URL)
        assert self.exchanges() == 1
        assert self.links_metric("oauth", "linked") == 0  # the new daemon's counters
        # A new authorization of the used link: the state is the same, the code another.
        later = await self.authorize(person, (await self.get_location(created)))
        assert (await self.get(later)).code == 410

    async def get_location(self, created: dict[str, Any]) -> str:
        """The authorize URL of a link whose start URL is used up: rebuilt from the state."""
        assert self.daemon.db is not None
        row = await self.daemon.db.read(lambda c: c.execute(
            "SELECT state FROM link_codes WHERE id = ?", (created["id"],)).fetchone())
        public = f"http://127.0.0.1:{self.webhook_port}"
        return (f"{self.sandbox.base_url}/connect/oauth2/authorize?appid="
                f"{self.fake.credentials.oa_appid}&redirect_uri="
                f"{urllib.parse.quote(public + '/oauth/callback', safe='')}"
                f"&response_type=code&scope=snsapi_base&state={row[0]}#wechat_redirect")

    @gen_test(timeout=30)
    async def test_every_refusal_links_nothing(self) -> None:
        person = self.stranger()
        created = await self.start_link(person)
        callback = await self.through(person, created)
        query = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(callback).query))
        base = callback.partition("?")[0]
        state, code = query["state"], query["code"]

        def url(**params: str) -> str:
            return base + "?" + urllib.parse.urlencode(params)

        refusals = {
            url(code=code, state="x" * 129): 400,           # too long a state
            url(code=code, state=state + "!"): 400,          # not [A-Za-z0-9]
            url(code=code, state=state[:-1] + "Z" if state[-1] != "Z" else state[:-1] + "Y"): 400,
            url(code=code): 400,                             # no state
            url(state=state): 400,                           # no code: the person declined
            url(state=state, code=""): 400,
            url(state=state, code="x" * 300): 400,            # oversized code
            url(state=state, code="bad code"): 400,
            url(state=state, code="0" * 32): 400,             # a code WeChat refuses (40029)
            base + f"?state={state}&state={state}&code={code}": 400,  # repeated parameter
            base + "?state=%ff%fe&code=" + code: 400,         # not UTF-8
            f"http://127.0.0.1:{self.webhook_port}/oauth/start?t=nope!": 400,
            f"http://127.0.0.1:{self.webhook_port}/oauth/start?t=" + "A" * 32: 400,
            f"http://127.0.0.1:{self.webhook_port}/oauth/start": 400,
        }
        for target, expected in refusals.items():
            page = await self.get(target)
            assert page.code == expected, (target, page.code, page.body)
            assert code.encode() not in page.body and state.encode() not in page.body
        assert (await self.code_status(created))["status"] == "pending"
        assert (await self.user(person))["link"] is None
        # The real code still works afterwards (a refused request changed nothing).
        assert (await self.get(callback)).code == 200
        assert (await self.code_status(created))["status"] == "linked"
        # Other methods are refused.
        response = await self.http.fetch(callback, method="POST", body=b"", raise_error=False)
        assert response.code == 405

    @gen_test(timeout=30)
    async def test_declined_snapshot_expired_and_wechat_errors(self) -> None:
        person = self.stranger()
        created = await self.start_link(person)
        declined = await self.through(person, created, decline=True)
        assert "code=" not in declined
        assert (await self.get(declined)).code == 400
        snapshot = await self.through(person, created, snapshot=True)
        page = await self.get(snapshot)
        assert page.code == 403 and "使用完整服务".encode() in page.body
        self.fake.script_fault("/sns/oauth2/access_token", "-1")
        assert (await self.get(await self.through(person, created))).code == 400
        self.fake.script_fault("/sns/oauth2/access_token", "40125")
        page = await self.get(await self.through(person, created))
        assert page.code == 502 and b"40125" in page.body
        stale = await self.through(person, created)
        self.clock.advance(300)  # WeChat's codes live 5 minutes
        assert (await self.get(stale)).code == 400
        assert (await self.user(person))["link"] is None
        assert (await self.code_status(created))["status"] == "pending"
        late = await self.through(person, created)
        self.clock.advance(300)  # the link itself (600 s) has expired now
        assert (await self.get(late)).code == 410
        assert (await self.get(created["url"])).code == 410
        assert (await self.code_status(created))["status"] == "expired"
        assert (await self.user(person))["link"] is None

    @gen_test(timeout=30)
    async def test_return_urls_outside_the_allow_list_are_refused(self) -> None:
        person = self.stranger()
        for bad in ("https://evil.example.com/", "https://shop.example.com.evil.com/",
                    "https://evil.com@shop.example.com/", "https://shop.example.com@evil.com/",
                    "//shop.example.com/", "javascript:alert(1)", "http://shop.example.com/",
                    "https://shop.example.com\\@evil.com/", "https:/shop.example.com/",
                    "https://shop.example.com:99999/", "https://SHOP.example.com\t/",
                    "https://shop.example.com/" + "a" * 3000, 5, ["https://shop.example.com/"]):
            code, error = await self.admin("POST", "/v1/links/oauth",
                                           {"mp_openid": person.mp_openid, "return_url": bad})
            assert (code, error["error"]["code"]) == (400, "return_url_not_allowed"), bad
        assert self.daemon.db is not None
        rows = await self.daemon.db.read(
            lambda c: c.execute("SELECT COUNT(*) FROM link_codes").fetchone()[0])
        assert rows == 0
        await self.ok("POST", "/v1/links/oauth", {"mp_openid": person.mp_openid,
                                                  "return_url": "https://SHOP.example.com/x"}, 201)


class OAuthConflictTest(OAuthCase):
    unionid_ratio = 1.0

    @gen_test(timeout=30)
    async def test_a_unionid_link_is_kept(self) -> None:
        person, other = self.follower(0), self.follower(1)
        await self.backfilled()
        await self.ok("POST", "/v1/mp/login", {"code": self.fake.issue_login_code(person)})
        created = await self.start_link(person)
        page = await self.get(await self.through(other, created))
        assert page.code == 409
        assert (await self.user(person))["link"]["source"] == "unionid"
        assert (await self.code_status(created))["error"] == "link_conflict"


class NoPublicUrlTest(LinksCase):
    public_url = False

    @gen_test(timeout=30)
    async def test_oauth_links_need_public_url(self) -> None:
        code, error = await self.admin("POST", "/v1/links/oauth", {"mp_openid": "oX"})
        assert (code, error["error"]["code"]) == (409, "oauth_not_configured")
        assert (await self.get(f"http://127.0.0.1:{self.webhook_port}/oauth/start?t=x")).code \
            == 404
        code, error = await self.admin("GET", "/v1/links/oauth/lo_x")
        assert code == 404
