"""The webhook over real HTTP on loopback with a real SQLite file: vectors, modes, refusals."""

from __future__ import annotations

import asyncio
import base64
import logging
import os
import tempfile
import threading
import urllib.parse
from typing import Any
from unittest import mock

import pytest
from Crypto.Cipher import AES
from hypothesis import given, settings
from hypothesis import strategies as st
from tornado.httpclient import HTTPResponse
from tornado.httpserver import HTTPServer
from tornado.testing import AsyncHTTPTestCase, bind_unused_port, gen_test
from wechatpy.crypto import WeChatCrypto

from tests.helpers import (
    AES_KEY,
    OA_APPID,
    WEBHOOK_TOKEN,
    FakeClock,
    FakeTime,
    count_rows,
    eventually,
    fetchall,
    fetchone,
)
from tests.storage_faults import disk_full
from wxd.metrics import Registry
from wxd.sandbox import Credentials, SignedRequest, WebhookSender
from wxd.store import inbox
from wxd.store.db import Database
from wxd.webhook import Webhook, make_app
from wxd.wechat.crypto import MessageCrypto, sign
from wxd.wechat.messages import flat_fields, parse_message, parse_xml, render_event_xml, render_text_reply

NOW = 1_700_000_000
CREDS = Credentials(webhook_token=WEBHOOK_TOKEN, encoding_aes_key=AES_KEY, oa_appid=OA_APPID,
                    oa_original_id="gh_0123456789ab")
VECTOR4_ENCRYPT = (
    "Q3stYC6hdFzMh9T8HCvyDPYd4batj7zR9qX1tTJwVo3rIGsIyiksc+v3Gxca8gMqrf6CKjLspeib04rpk/Tk+n5SKe"
    "iuOgf9/3MzfMLXNvb8/4JtPLwVYsqmSXitdQrWQ1uLKFf1WaBaN2PFGwwoCiBJpEZsXmHFBIgCgB714pDpL48wrITJ"
    "/53jYuqSp8FAjd552PsFbBnmSP6xqKavwqsero0S+gHFsiKy2u50plWiC8Tumw2M/bASsVGhl82cydQjBsLgKKE79F"
    "UeASbKPXIGvgiq4U90rWLEWBlxuRej07+dFJPmb1SNHe2/L3xdegx6+o8sIVuUu24SanEMCeUcDvZEqo/y3+aW+GeN"
    "tmq/cKjxHmT2d6fnf8RFpJMBEoaEF8dBjOTuhUiCw2LjsWMHaJBifWnTHbvS75RU7Bs="
)


def subscribe_xml(openid: str = "oUser1", create_time: int = NOW, **extra: str | int) -> str:
    return render_event_xml({"ToUserName": "gh_0123456789ab", "FromUserName": openid,
                             "CreateTime": create_time, "MsgType": "event",
                             "Event": "subscribe", "EventKey": "", **extra})


class WebhookCase(FakeTime, AsyncHTTPTestCase):
    """A Webhook with crypto (so plain, compatible and safe requests all work) on a temp db."""

    def setUp(self) -> None:
        self.tmp = tempfile.TemporaryDirectory()
        self.path = os.path.join(self.tmp.name, "wxd.db")
        self.clock = FakeClock(float(NOW))
        self.metrics = Registry()
        self.rings = 0
        self.servers: list[HTTPServer] = []
        super().setUp()

    def get_app(self) -> Any:
        self.db = self.io_loop.run_sync(lambda: Database.open(self.path))
        self.webhook = self.make_webhook(self.db)
        return make_app("/wechat", self.webhook)

    def make_webhook(self, db: Database, crypto: bool = True) -> Webhook:
        return Webhook(
            WEBHOOK_TOKEN, MessageCrypto(WEBHOOK_TOKEN, AES_KEY, OA_APPID) if crypto else None,
            db, replay_window_s=300, max_body_bytes=65536, clock=self.clock,
            metrics=self.metrics, on_stored=self.ring,
        )

    def ring(self) -> None:
        self.rings += 1

    def tearDown(self) -> None:
        for server in self.servers:
            server.stop()
        self.io_loop.run_sync(self.db.close)
        super().tearDown()
        self.tmp.cleanup()

    def sender(self, mode: str, seed: int = 0, **kwargs: Any) -> WebhookSender:
        return WebhookSender(self.get_url("/wechat"), CREDS, mode, clock=self.clock,
                             seed=seed, http_client=self.http_client, **kwargs)

    async def post(self, query: dict[str, str], body: bytes | str,
                   url: str | None = None) -> HTTPResponse:
        target = (url or self.get_url("/wechat")) + "?" + urllib.parse.urlencode(query)
        data = body.encode() if isinstance(body, str) else body
        return await self.http_client.fetch(target, method="POST", body=data, raise_error=False)

    def signed_query(self, timestamp: int | None = None, nonce: str = "123456789",
                     token: str = WEBHOOK_TOKEN) -> dict[str, str]:
        ts = str(NOW if timestamp is None else timestamp)
        return {"signature": sign(token, ts, nonce), "timestamp": ts, "nonce": nonce,
                "openid": "oUser1"}

    def safe_query(self, encrypt: str, nonce: str = "123456789") -> dict[str, str]:
        query = self.signed_query(nonce=nonce)
        query.update(encrypt_type="aes",
                     msg_signature=sign(WEBHOOK_TOKEN, str(NOW), nonce, encrypt))
        return query

    @staticmethod
    def envelope(encrypt: str) -> str:
        return render_event_xml({"ToUserName": "gh_0123456789ab", "Encrypt": encrypt})

    async def counts(self, db: Database | None = None) -> tuple[int, int]:
        def run(conn: Any) -> tuple[int, int]:
            return count_rows(conn, "inbox"), count_rows(conn, "jobs")
        return await (db or self.db).read(run)

    def result(self, name: str) -> float:
        return self.webhook.requests.get(result=name)


class VectorTest(WebhookCase):
    """The official signature examples and the self-generated OA vector of test_crypto.

    https://developers.weixin.qq.com/miniprogram/dev/framework/server-ability/message-push.html
    """

    @gen_test
    async def test_vector1_get_echoes_echostr(self) -> None:
        self.webhook.token, self.now = "AAAAA", 1714036504.0
        query = {"signature": "f464b24fc39322e44b38aa78f5edd27bd1441696",
                 "timestamp": "1714036504", "nonce": "1514711492", "echostr": "4375120948345356249"}
        url = self.get_url("/wechat?" + urllib.parse.urlencode(query))
        response = await self.http_client.fetch(url)
        assert response.body == b"4375120948345356249"
        assert response.headers["Content-Type"].startswith("text/plain")
        query["signature"] = "f464b24fc39322e44b38aa78f5edd27bd1441697"
        url = self.get_url("/wechat?" + urllib.parse.urlencode(query))
        refused = await self.http_client.fetch(url, raise_error=False)
        assert refused.code == 403 and b"4375120948345356249" not in refused.body

    @gen_test
    async def test_vector2_post_signature(self) -> None:
        self.webhook.token, self.now = "AAAAA", 1714037059.0
        query = {"signature": "899cf89e464efb63f54ddac96b0a0a235f53aa78",
                 "timestamp": "1714037059", "nonce": "486452656", "openid": "oUser1"}
        response = await self.post(query, subscribe_xml(create_time=1714037059))
        assert (response.code, response.body) == (200, b"success")
        query["nonce"] = "486452657"
        assert (await self.post(query, subscribe_xml(create_time=1714037060))).code == 403
        assert await self.counts() == (1, 1)

    @gen_test
    async def test_vector4_safe_mode_exact_request(self) -> None:
        query = {"signature": sign(WEBHOOK_TOKEN, "1700000000", "123456789"),
                 "timestamp": "1700000000", "nonce": "123456789", "encrypt_type": "aes",
                 "msg_signature": "196e68f4db1d73e10fe5a519d4fb557efec40e83", "openid": "oABCD1234"}
        with open("tests/data/events/safe_mode_envelope.xml", "rb") as handle:
            body = handle.read()
        assert VECTOR4_ENCRYPT.encode() in body
        response = await self.post(query, body)
        assert (response.code, response.body) == (200, b"success")
        row = await fetchone(self.db, "SELECT dedupe_key, from_user, event FROM inbox")
        assert row is not None
        assert tuple(row) == ("evt:oABCD1234:1700000000:subscribe", "oABCD1234", "subscribe")
        assert await self.counts() == (1, 1)
        assert self.result("accepted") == 1 and self.rings == 1


class ModesTest(WebhookCase):
    """Events fired by the sandbox's WebhookSender in plain, compatible and safe mode."""

    @gen_test
    async def test_every_event_in_every_mode(self) -> None:
        for number, mode in enumerate(("plain", "compat", "safe")):
            sender = self.sender(mode, seed=number)
            user = f"o{mode}"
            self.now += 1
            deliveries = [
                await sender.verify(),
                await sender.subscribe(user, scene="bind_ab12"),
                await sender.scan(user, "42"),
                await sender.template_finished(user, 3487542469355618313 + number, "success"),
                await sender.text(user, "hello"),
                await sender.unsubscribe(user),
            ]
            assert deliveries[0].body == b"4375120948345356249"
            assert all(d.status == 200 and d.attempts == 1 for d in deliveries)
            assert all(d.body == b"success" for d in deliveries[1:]), mode
        rows = await fetchall(self.db, "SELECT from_user, msg_type, event FROM inbox ORDER BY id")
        assert [tuple(r) for r in rows] == [
            (f"o{mode}", msg_type, event) for mode in ("plain", "compat", "safe")
            for msg_type, event in (("event", "subscribe"), ("event", "SCAN"),
                                    ("event", "TEMPLATESENDJOBFINISH"), ("text", None),
                                    ("event", "unsubscribe"))
        ]
        assert await self.counts() == (15, 12)  # the text messages need no job
        assert self.webhook.events.get(type="SCAN") == 3
        assert self.result("accepted") == 15 and self.result("echo") == 3

    @gen_test
    async def test_compat_mode_uses_the_encrypted_copy(self) -> None:
        crypto = MessageCrypto(WEBHOOK_TOKEN, AES_KEY, OA_APPID)
        encrypt = crypto.encrypt(subscribe_xml("oInner"))
        body = subscribe_xml("oOuter").replace("</xml>", f"<Encrypt><![CDATA[{encrypt}]]></Encrypt></xml>")
        response = await self.post(self.safe_query(encrypt), body)
        assert response.body == b"success"
        rows = await fetchall(self.db, "SELECT from_user FROM inbox")
        assert [r[0] for r in rows] == ["oInner"]

    @gen_test
    async def test_unknown_types_are_stored_and_answered(self) -> None:
        for n, fields in enumerate((
            {"MsgType": "hologram", "Shape": "cube"},
            {"MsgType": "event", "Event": "NEW_FANCY_EVENT", "Extra": "x"},
            {"MsgType": "event", "Event": "TEMPLATESENDJOBFINISH"},  # no MsgID: stored only
            {"MsgType": "event", "Event": "weird event!"},
        )):
            xml = render_event_xml({"ToUserName": "gh_0123456789ab", "FromUserName": "oUser1",
                                    "CreateTime": NOW + n, **fields})
            response = await self.post(self.signed_query(nonce=f"9{n}"), xml)
            assert (response.code, response.body) == (200, b"success")
        assert await self.counts() == (4, 0)
        assert self.webhook.events.get(type="hologram") == 1
        assert self.webhook.events.get(type="other") == 1


class RefusalTest(WebhookCase):
    """Forged, stale, replayed and hostile requests: a 4xx, and nothing stored."""

    async def refused(self, status: int, result: str, query: dict[str, str],
                      body: bytes | str) -> None:
        before = self.result(result)
        response = await self.post(query, body)
        assert response.code == status, (result, response.code, response.body)
        assert b"success" not in response.body
        assert self.result(result) == before + 1, result
        assert await self.counts() == (0, 0), result
        assert self.rings == 0

    @gen_test
    async def test_forged_signatures_never_reach_storage(self) -> None:
        xml = subscribe_xml()
        query = self.signed_query()
        forged = {**query, "signature": "0" * 40}
        await self.refused(403, "bad_signature", forged, xml)
        await self.refused(403, "bad_signature", {**query, "signature": ""}, xml)
        await self.refused(403, "bad_signature", {k: v for k, v in query.items()
                                                  if k != "signature"}, xml)
        await self.refused(403, "bad_signature", self.signed_query(token="other"), xml)
        await self.refused(403, "bad_signature", {**query, "signature": "é" * 40}, xml)
        # A valid URL signature does not vouch for the Encrypt: msg_signature must match.
        encrypt = MessageCrypto(WEBHOOK_TOKEN, AES_KEY, OA_APPID).encrypt(xml)
        bad = {**self.safe_query(encrypt, nonce="5"), "msg_signature": "1" * 40}
        await self.refused(403, "bad_msg_signature", bad, self.envelope(encrypt))
        # ...and `signature` in place of msg_signature (a classic mistake) is not accepted.
        wrong = {**self.safe_query(encrypt, nonce="6")}
        wrong["msg_signature"] = wrong["signature"]
        await self.refused(403, "bad_msg_signature", wrong, self.envelope(encrypt))

    @gen_test
    async def test_stale_or_future_timestamp(self) -> None:
        await self.refused(403, "stale_timestamp", self.signed_query(NOW - 301), subscribe_xml())
        await self.refused(403, "stale_timestamp", self.signed_query(NOW + 301), subscribe_xml())
        query = self.signed_query()
        query.update(timestamp="17e8", signature=sign(WEBHOOK_TOKEN, "17e8", "123456789"))
        await self.refused(403, "bad_timestamp", query, subscribe_xml())
        self.now = NOW + 300.0  # the edge of the window is still inside
        assert (await self.post(self.signed_query(NOW), subscribe_xml())).code == 200

    @gen_test
    async def test_replayed_nonce_with_other_content_is_refused(self) -> None:
        query = self.signed_query(nonce="777")
        assert (await self.post(query, subscribe_xml("oVictim"))).body == b"success"
        # Plain mode's signature does not cover the body: the captured query with a forged
        # body is exactly what the nonce memory stops.
        response = await self.post(query, subscribe_xml("oAttacker"))
        assert response.code == 403
        assert self.result("replayed_nonce") == 1
        rows = await fetchall(self.db, "SELECT from_user FROM inbox")
        assert [r[0] for r in rows] == ["oVictim"]
        # Once the timestamp leaves the window, the window itself refuses the query.
        self.now += 301
        assert (await self.post(query, subscribe_xml("oLater"))).code == 403
        assert self.result("stale_timestamp") == 1
        # Expired entries are dropped as new requests arrive: the memory stays bounded.
        fresh = self.signed_query(timestamp=int(self.now), nonce="778")
        assert (await self.post(fresh, subscribe_xml("oLater"))).body == b"success"
        assert len(self.webhook.nonces) == 1

    @gen_test
    async def test_hostile_bodies(self) -> None:
        crypto = MessageCrypto(WEBHOOK_TOKEN, AES_KEY, OA_APPID)
        key = base64.b64decode(AES_KEY + "=")

        def raw_encrypt(plain: bytes) -> str:
            cipher = AES.new(key, AES.MODE_CBC, iv=key[:16])
            return base64.b64encode(cipher.encrypt(plain)).decode()

        def layout(xml: bytes, appid: bytes = OA_APPID.encode()) -> bytes:
            return b"0123456789abcdef" + len(xml).to_bytes(4, "big") + xml + appid

        good = layout(subscribe_xml().encode())
        pad = 32 - len(good) % 32
        xxe = ('<?xml version="1.0"?><!DOCTYPE xml [<!ENTITY x SYSTEM "file:///etc/passwd">]>'
               + subscribe_xml(Content="&x;"))
        laughs = ('<!DOCTYPE xml [<!ENTITY a "aaaaaaaaaa"><!ENTITY b "&a;&a;&a;&a;&a;&a;">]>'
                  '<xml><ToUserName>&b;</ToUserName></xml>')
        encrypted_cases = {
            "bad base64": "not*base64!",
            "bad length": base64.b64encode(b"x" * 17).decode(),
            "bad padding (zero)": raw_encrypt(good + bytes(pad - 1) + b"\x00"),
            "bad padding (33)": raw_encrypt(good + b"\x21" * 32 + bytes(pad - 1) + b"\x21"),
            "bad padding (mixed)": raw_encrypt(good + b"\x01" * (pad - 1) + bytes([pad])),
            "wrong appid": MessageCrypto(WEBHOOK_TOKEN, AES_KEY, "wx0000000000000000")
            .encrypt(subscribe_xml()),
            "length past the end": raw_encrypt(
                b"0123456789abcdef" + (999).to_bytes(4, "big") + b"<xml/>" + b"\x06" * 6),
        }
        for n, encrypt in enumerate(encrypted_cases.values()):
            await self.refused(400, "decrypt_error", self.safe_query(encrypt, nonce=f"1{n}"),
                               self.envelope(encrypt))
        inner_cases = [xxe, laughs, subscribe_xml()[:-10], "<notxml/>",
                       render_event_xml({"ToUserName": "gh", "CreateTime": NOW, "MsgType": "event"}),
                       subscribe_xml().replace(f"<CreateTime>{NOW}", "<CreateTime>soon")]
        for n, inner in enumerate(inner_cases):
            encrypt = crypto.encrypt(inner)
            await self.refused(400, "bad_message", self.safe_query(encrypt, nonce=f"2{n}"),
                               self.envelope(encrypt))
        plain_cases: list[bytes | str] = [
            xxe, laughs, subscribe_xml()[:-10], b"\xff\xfe<xml/>", "",
            '<?xml-stylesheet href="x"?>' + subscribe_xml(),
            subscribe_xml().replace("<FromUserName><![CDATA[oUser1]]></FromUserName>", ""),
            subscribe_xml().replace("<MsgType><![CDATA[event]]>", "<MsgType><![CDATA[]]>"),
            subscribe_xml().replace(f"<CreateTime>{NOW}", "<CreateTime>-5"),
            "<xml>" + "<a>" * 40 + "</a>" * 40 + "</xml>",
        ]
        for n, body in enumerate(plain_cases):
            await self.refused(400, "bad_message", self.signed_query(nonce=f"3{n}"), body)
        await self.refused(400, "bad_message", self.safe_query("", nonce="41"),
                           "<xml><ToUserName>gh</ToUserName></xml>")
        query = {**self.signed_query(nonce="42"), "encrypt_type": "rsa"}
        await self.refused(400, "bad_encrypt_type", query, subscribe_xml())

    @gen_test
    async def test_oversized_body_is_413(self) -> None:
        body = subscribe_xml(Content="x" * 70_000)
        await self.refused(413, "too_large", self.signed_query(), body)
        # Refused on size before the signature is even looked at.
        await self.refused(413, "too_large", {}, body)

    @gen_test
    async def test_encrypted_request_without_a_key(self) -> None:
        server_socket, port = bind_unused_port()
        server = HTTPServer(make_app("/wechat", self.make_webhook(self.db, crypto=False)))
        server.add_sockets([server_socket])
        self.servers.append(server)
        encrypt = MessageCrypto(WEBHOOK_TOKEN, AES_KEY, OA_APPID).encrypt(subscribe_xml())
        url = f"http://127.0.0.1:{port}/wechat"
        response = await self.post(self.safe_query(encrypt), self.envelope(encrypt), url)
        assert response.code == 400 and self.result("not_configured") == 1
        plain = await self.post(self.signed_query(nonce="2"), subscribe_xml(), url)
        assert plain.body == b"success"

    @gen_test
    async def test_required_encryption_refuses_plaintext(self) -> None:
        self.webhook.require_encryption = True
        await self.refused(400, "not_encrypted", self.signed_query(), subscribe_xml())
        encrypt = MessageCrypto(WEBHOOK_TOKEN, AES_KEY, OA_APPID).encrypt(subscribe_xml())
        response = await self.post(self.safe_query(encrypt, nonce="2"), self.envelope(encrypt))
        assert response.body == b"success"

    @gen_test
    async def test_one_log_line_without_the_body(self) -> None:
        marker = "BODY-MARKER-4711"
        with self.assertLogs("wxd.webhook", level="DEBUG") as logs:
            await self.refused(400, "bad_message", self.signed_query(),
                               subscribe_xml(Content=marker)[:-3])
        warnings = [r for r in logs.records if r.levelno >= logging.WARNING]
        assert len(warnings) == 1
        text = "\n".join(logs.output)
        assert marker not in text and "signature" not in text.replace("bad_signature", "")
        assert "400 bad_message" in warnings[0].getMessage()

    @gen_test
    async def test_other_methods_and_storage_failure(self) -> None:
        put = await self.http_client.fetch(self.get_url("/wechat"), method="PUT", body=b"x",
                                           raise_error=False)
        assert put.code == 405
        await self.db.close()
        response = await self.post(self.signed_query(), subscribe_xml())
        assert response.code == 503 and response.body != b"success"
        assert self.result("storage_error") == 1
        self.db = await Database.open(self.path)  # for tearDown


class DiskFullTest(WebhookCase):
    """A full disk (SQLite's own SQLITE_FULL, tests/storage_faults.py): the event gets 503 and
    is not stored, nothing else of its commit is acknowledged, and WeChat's retry is stored
    once there is room again, on the same connection."""

    @gen_test
    async def test_a_message_that_does_not_fit_is_refused_and_its_retry_stored(self) -> None:
        sender = self.sender("safe")
        # Large enough to need new pages (a text message may carry up to 2,048 characters of
        # Content; the XML is encrypted and base64-encoded in safe mode).
        big = sender.build(sender.text_fields("oUser1", "大" * 2048, msg_id=1))
        small = sender.build(sender.subscribe_fields("oUser2"))
        async with disk_full(self.db):
            refused, other = await asyncio.gather(sender.send(big), sender.send(small))
            assert refused.status == 503 and refused.body != b"success"
            assert self.result("storage_error") >= 1
            stored = await self.counts()
            # Whatever was answered `success` is stored; SQLite may have rolled the whole
            # commit back (then the small one got 503 too).
            assert stored == ((1, 1) if other.status == 200 else (0, 0)), (other, stored)
            assert other.status in (200, 503)
        retry = await sender.send(big)
        assert retry.status == 200 and retry.body == b"success"
        again = await sender.send(small)
        assert again.status == 200
        assert await self.counts() == (2, 1)  # the text message has no job


class BatchingTest(WebhookCase):
    """The webhook stores through the database's one batched write (no flusher of its own)."""

    def message(self, openid: str) -> Any:
        return parse_message(parse_xml(subscribe_xml(openid).encode()))

    @gen_test
    async def test_a_message_arriving_during_a_commit_lands_in_the_very_next_one(self) -> None:
        started, release = threading.Event(), threading.Event()
        committed_in: dict[str, int] = {}

        async def note(name: str, write: Any) -> None:
            await write
            committed_in[name] = self.db.commits

        def blocked(conn: Any) -> None:
            started.set()
            release.wait(10)

        # Commit N holds a first message and is slow; a second message and another writer's
        # write arrive while it runs. Both must be in commit N + 1.
        first = [asyncio.ensure_future(note("first", self.webhook.store(self.message("oA")))),
                 asyncio.ensure_future(note("blocked", self.db.write(blocked)))]
        await eventually(started.is_set, "commit N running (blocked on the db thread)")
        others = [asyncio.ensure_future(note("worker", self.db.write(lambda c: None))),
                  asyncio.ensure_future(note("second", self.webhook.store(self.message("oB"))))]
        await asyncio.sleep(0)  # their first step submits both writes
        release.set()
        await asyncio.gather(*first, *others)
        assert committed_in["first"] == committed_in["blocked"]
        assert committed_in["second"] == committed_in["worker"] == committed_in["first"] + 1
        assert await self.counts() == (2, 2)

    @gen_test
    async def test_concurrent_messages_share_one_insert(self) -> None:
        calls: list[int] = []
        real = inbox.store_prepared

        def counting(conn: Any, batch: Any) -> list[bool]:
            calls.append(len(batch))
            return real(conn, batch)

        with mock.patch.object(inbox, "store_prepared", counting):
            stored = await asyncio.gather(*(self.webhook.store(self.message(f"o{i}"))
                                            for i in range(20)))
        assert all(stored) and sum(calls) == 20 and len(calls) <= 2
        assert await self.counts() == (20, 20)

    def test_a_programming_error_is_a_500_with_its_traceback(self) -> None:
        def broken(conn: Any, batch: Any) -> list[bool]:
            raise TypeError("a bug in the store")

        records: list[logging.LogRecord] = []

        class Keep(logging.Handler):
            def emit(self, record: logging.LogRecord) -> None:
                records.append(record)

        handler = Keep()
        logger = logging.getLogger("tornado.application")
        logger.addHandler(handler)
        try:
            with mock.patch.object(inbox, "store_prepared", broken):
                response = self.fetch("/wechat?" + urllib.parse.urlencode(self.signed_query()),
                                      method="POST", body=subscribe_xml())
        finally:
            logger.removeHandler(handler)
        assert response.code == 500 and self.result("storage_error") == 0
        errors = [r for r in records if r.exc_info and r.exc_info[0] is TypeError]
        assert errors, [r.getMessage() for r in records]


class RetryTest(WebhookCase):
    """WeChat's retries (same URL, same body) are answered `success` and stored once."""

    @gen_test
    async def test_identical_resend_is_a_duplicate(self) -> None:
        sender = self.sender("safe")
        request = sender.build(sender.subscribe_fields("oUser1"))
        for _ in range(3):
            delivery = await sender.send(request)
            assert (delivery.status, delivery.body) == (200, b"success")
        assert await self.counts() == (1, 1)
        assert (self.result("accepted"), self.result("duplicate")) == (1, 2)
        assert self.rings == 1
        # A fresh delivery of the same event (new nonce/timestamp) is also a duplicate.
        self.now += 2
        assert (await sender.send(sender.build(sender.subscribe_fields(
            "oUser1", create_time=NOW)))).body == b"success"
        assert await self.counts() == (1, 1)

    @gen_test
    async def test_wechat_retry_after_a_slow_answer(self) -> None:
        hook = self.webhook
        original = hook.store
        calls: list[bool] = []

        first_answered = asyncio.Event()

        async def slow_store(message: Any) -> bool:
            stored = await original(message)
            calls.append(stored)
            if len(calls) == 1:
                await asyncio.sleep(0.6)  # WeChat gives up waiting and sends again
                first_answered.set()
            return stored

        hook.store = slow_store  # type: ignore[method-assign]
        sender = self.sender("safe", retries=True, timeout_s=0.3)
        delivery = await sender.subscribe("oUser1")
        assert (delivery.status, delivery.body, delivery.attempts) == (200, b"success", 2)
        assert calls == [True, False]
        await asyncio.wait_for(first_answered.wait(), 5)  # the abandoned request finishes
        assert await self.counts() == (1, 1)

    @gen_test
    async def test_resend_after_a_restart(self) -> None:
        sender = self.sender("safe")
        request = sender.build(sender.subscribe_fields("oUser1", scene="7"))
        assert (await sender.send(request)).body == b"success"
        await self.db.close()
        # A new process: new database connection, new webhook, empty nonce memory.
        self.db = await Database.open(self.path)
        url = await self.restart(self.db)
        resent = SignedRequest(url + request.url[request.url.index("?"):], request.query,
                               request.body, request.xml)
        delivery = await sender.send(resent)
        assert (delivery.status, delivery.body) == (200, b"success")
        assert await self.counts() == (1, 1)
        assert self.result("duplicate") == 1

    async def restart(self, db: Database) -> str:
        server_socket, port = bind_unused_port()
        server = HTTPServer(make_app("/wechat", self.make_webhook(db)))
        server.add_sockets([server_socket])
        self.servers.append(server)
        return f"http://127.0.0.1:{port}/wechat"


def test_wechatpy_encrypted_event_is_accepted_and_reply_decrypts() -> None:
    """Interop both ways with wechatpy's implementation of the scheme."""
    theirs = WeChatCrypto(WEBHOOK_TOKEN, AES_KEY, OA_APPID)
    ours = MessageCrypto(WEBHOOK_TOKEN, AES_KEY, OA_APPID)
    reply = render_text_reply("oUser1", "gh_0123456789ab", "欢迎 & <welcome>", NOW)
    envelope = ours.encrypt_reply(reply, str(NOW), "42")
    assert theirs.decrypt_message(envelope, _field(envelope, "MsgSignature"), str(NOW), "42") \
        == reply


def _field(xml: str, name: str) -> str:
    start = xml.index(f"<{name}><![CDATA[") + len(name) + 11
    return xml[start:xml.index("]]>", start)]


class WechatpyInteropTest(WebhookCase):
    @gen_test
    async def test_event_encrypted_by_wechatpy(self) -> None:
        theirs = WeChatCrypto(WEBHOOK_TOKEN, AES_KEY, OA_APPID)
        wrapped = theirs.encrypt_message(subscribe_xml("oFromWechatpy"), "555", str(NOW))
        encrypt = _field(wrapped, "Encrypt")
        query = self.signed_query(nonce="555")
        query.update(encrypt_type="aes", msg_signature=_field(wrapped, "MsgSignature"))
        response = await self.post(query, self.envelope(encrypt))
        assert (response.code, response.body) == (200, b"success")
        rows = await fetchall(self.db, "SELECT from_user FROM inbox")
        assert [r[0] for r in rows] == ["oFromWechatpy"]


_CLEAN = st.text(alphabet="ab Z09_.:-+/=@é欢😀\n\t]>", max_size=8)
_TOKEN = st.text(alphabet="AZaz09_.:@+/=-", max_size=8)
_NASTY = ["]]", "]]>", "<", "&", "&amp;", "\r", "\r\n", "\x00", "\x1f", "\ufffe", "<![CDATA[",
          " ", "é"]
_MUTATIONS = ["none"] * 8 + [
    "nasty-cdata", "nasty-plain", "duplicate", "bad-name", "self-closing", "nested",
    "two-cdata", "crlf", "prefix", "root", "suffix"]


@st.composite
def flat_documents(draw: st.DrawFn) -> bytes:
    """Flat WeChat-like documents, half of them with one near-miss the fast path must refuse
    (or get exactly right)."""
    names = draw(st.lists(st.sampled_from(["ToUserName", "A", "a.b-c", "_x", "B", "C", "D"]),
                          unique=True, max_size=5))
    values = [(draw(st.booleans()), draw(_CLEAN), draw(_TOKEN)) for _ in names]
    children = [f"<{n}><![CDATA[{clean}]]></{n}>" if cdata else f"<{n}>{token}</{n}>"
                for n, (cdata, clean, token) in zip(names, values, strict=True)]
    seps = [draw(st.sampled_from(["", " ", "\n", "\t", "  \n  "])) for _ in children]
    prefix = suffix = ""
    root = "xml"
    mutation = draw(st.sampled_from(_MUTATIONS))
    at = draw(st.integers(0, max(0, len(children) - 1)))
    nasty = draw(st.sampled_from(_NASTY))
    if mutation == "nasty-cdata":
        children.append(f"<Z><![CDATA[{draw(_CLEAN)}{nasty}{draw(_CLEAN)}]]></Z>")
    elif mutation == "nasty-plain":
        children.append(f"<Z>{draw(_TOKEN)}{nasty}</Z>")
    elif mutation == "duplicate" and children:
        children.append(children[at])
    elif mutation == "bad-name":
        children.append(draw(st.sampled_from(["<9a>x</9a>", "<x:y>x</x:y>", "<é>x</é>"])))
    elif mutation == "self-closing":
        children.append("<Z/>")
    elif mutation == "nested":
        children.append(f"<Z><In>{draw(_TOKEN)}</In></Z>")
    elif mutation == "two-cdata":
        children.append(f"<Z><![CDATA[{draw(_CLEAN)}]]><![CDATA[x]]></Z>")
    elif mutation == "crlf":
        seps.append("\r\n")
    elif mutation == "prefix":
        prefix = draw(st.sampled_from([" ", '<?xml version="1.0"?>', "\ufeff", "\n"]))
    elif mutation == "root":
        root = "XML"
    elif mutation == "suffix":
        suffix = draw(st.sampled_from(["</xml>", "junk", " \r\n", "<!-- c -->"]))
    seps += [""] * (len(children) - len(seps))
    body = "".join(child + sep for child, sep in zip(children, seps, strict=False))
    return f"{prefix}<{root}>{body}</{root}>{suffix}".encode("utf-8", "surrogatepass")


@settings(max_examples=300, deadline=None)
@given(flat_documents())
def test_flat_fast_path_agrees_with_parse_xml(doc: bytes) -> None:
    fast = flat_fields(doc, 65536)
    if fast is not None:
        assert parse_xml(doc, 65536, fast=False) == fast


@pytest.mark.parametrize("nasty", _NASTY)
def test_flat_fast_path_near_misses(nasty: str) -> None:
    for child in (f"<A><![CDATA[x{nasty}y]]></A>", f"<A>x{nasty}y</A>"):
        doc = f"<xml><B>1</B>{child}</xml>".encode("utf-8", "surrogatepass")
        fast = flat_fields(doc, 65536)
        if fast is not None:
            assert parse_xml(doc, 65536, fast=False) == fast


def test_flat_fast_path_takes_wechat_documents() -> None:
    crypto = MessageCrypto(WEBHOOK_TOKEN, AES_KEY, OA_APPID)
    docs: list[str] = [
            subscribe_xml(), subscribe_xml(Ticket="gQ==", EventKey="qrscene_x y]"),
            render_event_xml({"ToUserName": "gh", "FromUserName": "o", "CreateTime": 1,
                              "MsgType": "text", "Content": "多行\n文本 ]] > & <", "MsgId": 7}),
            WebhookCase.envelope(crypto.encrypt(subscribe_xml())),
            "<xml>\n  <ToUserName><![CDATA[gh_x]]></ToUserName>\n  <CreateTime>1</CreateTime>\n</xml>\n"]
    for doc in docs:
        data = doc.encode()
        fast = flat_fields(data, 65536)
        assert fast is not None and fast == parse_xml(data, 65536, fast=False)
    assert flat_fields(subscribe_xml().encode(), 100) is None  # over the limit: parse_xml says so
