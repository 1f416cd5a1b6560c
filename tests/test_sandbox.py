"""Tests of the WeChat emulator (wxd.sandbox): shapes, error codes, quirks, faults, webhook side.

The webhook signer is pinned to known-answer vectors (WeChat's own examples, see test_crypto), so
the emulator is checked against WeChat itself, not only against wxd's own crypto.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import re
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from typing import Any, ClassVar

import pytest
import tornado.httpserver
import tornado.web
from tornado.httpclient import HTTPClientError
from tornado.testing import bind_unused_port, gen_test

from tests.helpers import eventually
from tests.sandbox_fixture import START, FakeClock, SandboxTestCase, sandbox  # noqa: F401
from wxd.sandbox import (
    DUPLICATE_MODES,
    LEGACY_TEMPLATE_ID,
    NOTICE_TEMPLATE_ID,
    ORDER_TEMPLATE_ID,
    TOKEN_REFUSALS,
    Credentials,
    FakeWeChat,
    Person,
    SandboxThread,
    WebhookSender,
    dispatch,
)
from wxd.sandbox.shapes import encode_json, strings_json, user_info, user_info_json
from wxd.sandbox.templates import DEFAULT_TEMPLATES, check_data
from wxd.wechat.crypto import MessageCrypto, decode_aes_key, sign
from wxd.wechat.messages import parse_xml

CC = "client_credential"
SEND = "/cgi-bin/message/template/send"
GOOD_ORDER = {
    "character_string1": {"value": "A20240101-001"},
    "thing2": {"value": "巧克力"},
    "amount3": {"value": "39.8元"},
    "time4": {"value": "2024年1月1日 12:00"},
    "phrase5": {"value": "配送中"},
}
RID_RE = re.compile(r" rid: [0-9a-f]{8}-[0-9a-f]{8}-[0-9a-f]{8}$")


# Population and credentials ------------------------------------------------------------------


def test_population_is_seeded_and_well_formed() -> None:
    one, same, other = FakeWeChat(300, seed=5), FakeWeChat(300, seed=5), FakeWeChat(300, seed=6)
    assert [p.oa_openid for p in one.people] == [p.oa_openid for p in same.people]
    assert [p.oa_openid for p in one.people] != [p.oa_openid for p in other.people]
    oa_prefixes = {p.oa_openid[:6] for p in one.people}
    mp_prefixes = {p.mp_openid[:6] for p in one.people}
    assert len(oa_prefixes) == 1 and len(mp_prefixes) == 1 and oa_prefixes != mp_prefixes
    for p in one.people:
        for ident in (p.oa_openid, p.mp_openid, p.unionid):
            assert ident is not None and re.fullmatch(r"o[A-Za-z0-9_-]{27}", ident)
        assert one.by_oa_openid(p.oa_openid) is p
        assert one.by_mp_openid(p.mp_openid) is p
        assert p.unionid is not None and one.by_unionid(p.unionid) is p
        assert (p.subscribe_time > 0) == p.follows
    followers = sum(p.follows for p in one.people)
    assert 120 < followers < 240  # follow_ratio 0.6
    assert one.follower_openids == sorted(p.oa_openid for p in one.people if p.follows)
    assert one.by_oa_openid(one.people[0].mp_openid) is None
    unbound = FakeWeChat(50, unionid_ratio=0.0)
    assert all(p.unionid is None for p in unbound.people)


def test_default_credentials_have_valid_formats() -> None:
    creds = Credentials()
    for appid in (creds.oa_appid, creds.mp_appid):
        assert re.fullmatch(r"wx[0-9a-f]{16}", appid)
    assert creds.oa_appid != creds.mp_appid
    assert len(decode_aes_key(creds.encoding_aes_key)) == 32
    assert re.fullmatch(r"[A-Za-z0-9]{3,32}", creds.webhook_token)
    assert re.fullmatch(r"gh_[0-9a-f]{12}", creds.oa_original_id)


# Tokens -----------------------------------------------------------------------------------------


class TokenTests(SandboxTestCase):
    fake_options: ClassVar[dict[str, Any]] = {"token_daily_quota": 3}

    def get_token(self, **query: str) -> dict[str, Any]:
        creds = self.fake.credentials
        params = {"grant_type": CC, "appid": creds.oa_appid, "secret": creds.oa_secret}
        params.update(query)
        return self.api_json("GET", "/cgi-bin/token", {k: v for k, v in params.items() if v})

    def user_get(self, token: str) -> dict[str, Any]:
        return self.api_json("GET", "/cgi-bin/user/get", {"access_token": token})

    def errcode(self, answer: dict[str, Any]) -> int:
        assert RID_RE.search(answer["errmsg"]), answer
        code = answer["errcode"]
        assert isinstance(code, int)
        return code

    def test_success_shape(self) -> None:
        answer = self.get_token()
        assert set(answer) == {"access_token", "expires_in"}
        assert answer["expires_in"] == 7200
        assert "errcode" not in self.user_get(answer["access_token"])

    def test_credential_errors(self) -> None:
        creds = self.fake.credentials
        assert self.errcode(self.get_token(appid="wx0000000000000000")) == 40013
        assert self.errcode(self.get_token(secret="0" * 32)) == 40125
        assert self.errcode(self.get_token(appid="")) == 41002
        assert self.errcode(self.get_token(secret="")) == 41004
        assert self.errcode(self.get_token(grant_type="password")) == 40002
        # The MP's credentials get an MP token, which the OA APIs refuse (isolation).
        # https://developers.weixin.qq.com/doc/offiaccount/Basic_Information/Get_access_token.html
        mp = self.get_token(appid=creds.mp_appid, secret=creds.mp_secret)["access_token"]
        assert self.errcode(self.user_get(mp)) == 48001

    def test_superseded_token_works_five_minutes_then_40001(self) -> None:
        first = self.get_token()["access_token"]
        self.clock.advance(1000)
        second = self.get_token()["access_token"]
        assert first != second
        self.clock.advance(299)
        assert "errcode" not in self.user_get(first)
        self.clock.advance(1)
        assert self.errcode(self.user_get(first)) == 40001
        assert "errcode" not in self.user_get(second)

    def test_expired_token_is_42001(self) -> None:
        token = self.get_token()["access_token"]
        self.clock.advance(7199)
        assert "errcode" not in self.user_get(token)
        self.clock.advance(1)
        assert self.errcode(self.user_get(token)) == 42001

    def test_token_check_codes(self) -> None:
        answer = self.api_json("GET", "/cgi-bin/user/get")
        assert self.errcode(answer) == 41001
        assert self.errcode(self.user_get("not a token!")) == 40014
        assert self.errcode(self.user_get("86_" + "A" * 120)) == 40001

    def test_daily_quota_45009_resets_next_day(self) -> None:
        for _ in range(3):
            assert "access_token" in self.get_token()
        assert self.errcode(self.get_token()) == 45009
        assert self.fake.tokens.classic_fetches_today("oa") == 3
        # Counters are per app: the MP still has its own quota.
        creds = self.fake.credentials
        assert "access_token" in self.get_token(appid=creds.mp_appid, secret=creds.mp_secret)
        self.clock.advance(86400)
        assert "access_token" in self.get_token()

    def stable(self, force: bool | None = None) -> dict[str, Any]:
        creds = self.fake.credentials
        body: dict[str, Any] = {"grant_type": CC, "appid": creds.oa_appid, "secret": creds.oa_secret}
        if force is not None:
            body["force_refresh"] = force
        return self.api_json("POST", "/cgi-bin/stable_token", body=body)

    def test_stable_token_same_while_valid_and_rotates_early(self) -> None:
        first = self.stable()
        assert first["expires_in"] == 7200
        self.clock.advance(100)
        again = self.stable()
        assert again == {"access_token": first["access_token"], "expires_in": 7100}
        self.clock.advance(7200 - 100 - 300)  # into the last 5 minutes: a new token
        rotated = self.stable()
        assert rotated["access_token"] != first["access_token"]
        assert rotated["expires_in"] == 7200
        assert "errcode" not in self.user_get(first["access_token"])  # old runs to its expiry
        self.clock.advance(300)
        assert self.errcode(self.user_get(first["access_token"])) == 42001
        assert "errcode" not in self.user_get(rotated["access_token"])

    def test_stable_and_classic_tokens_are_independent(self) -> None:
        stable = self.stable()["access_token"]
        classic = self.get_token()["access_token"]
        self.get_token()
        self.clock.advance(301)
        assert "errcode" not in self.user_get(stable)  # classic refreshes do not touch it
        assert self.errcode(self.user_get(classic)) == 40001
        self.stable(force=True)
        assert "errcode" not in self.user_get(self.get_token()["access_token"])

    def test_force_refresh_rules(self) -> None:
        first = self.stable()["access_token"]
        forced = self.stable(force=True)["access_token"]
        assert forced != first
        assert self.errcode(self.user_get(first)) == 40001  # killed at once
        self.clock.advance(10)
        # Within 30 s of the previous forced refresh nothing is refreshed.
        assert self.stable(force=True)["access_token"] == forced
        for _ in range(19):
            self.clock.advance(31)
            assert "access_token" in self.stable(force=True)
        self.clock.advance(31)
        assert self.errcode(self.stable(force=True)) == 45009
        response = self.call_api("POST", "/cgi-bin/stable_token", body="grant_type=client_credential")
        assert json.loads(response.body)["errcode"] == 47001


# user/get paging ---------------------------------------------------------------------------------


class _UserGetPaging(SandboxTestCase):
    """Walks user/get over HTTP for a population where everybody (or nobody) follows."""

    __test__ = False  # only the subclasses below run
    followers = 0

    def make_fake(self, clock: FakeClock) -> FakeWeChat:
        ratio = 1.0 if self.followers else 0.0
        return FakeWeChat(users=self.followers or 3, clock=clock, follow_ratio=ratio)

    def test_paging(self) -> None:
        token = self.token()
        seen: list[str] = []
        next_openid = ""
        pages = []
        while True:
            query = {"access_token": token}
            if next_openid:
                query["next_openid"] = next_openid
            page = self.api_json("GET", "/cgi-bin/user/get", query)
            pages.append(page)
            assert page["total"] == self.followers
            if page["count"] == 0:
                # After the last page (or for an empty account): no "data" key at all.
                assert page == {"total": self.followers, "count": 0, "next_openid": ""}
                break
            openids = page["data"]["openid"]
            assert set(page) == {"total", "count", "data", "next_openid"}
            assert page["count"] == len(openids) <= 10_000
            # The quirk: next_openid is the page's last openid, even on the last page.
            assert page["next_openid"] == openids[-1]
            seen.extend(openids)
            next_openid = page["next_openid"]
            assert len(pages) < 10
        assert seen == sorted(self.fake.follower_openids) and len(set(seen)) == self.followers
        expected_pages = -(-self.followers // 10_000) + 1
        assert len(pages) == expected_pages


def test_user_get_text_is_the_encoded_body() -> None:
    # user/get writes its page text itself: it must be exactly what encoding the page gives.
    fake = FakeWeChat(users=25_000, seed=2, follow_ratio=0.9)
    token = fake.tokens.issue_classic("oa")
    assert not isinstance(token, int)
    followers = fake.follower_openids
    for next_openid in ("", followers[9_999], followers[19_999], followers[-1]):
        query = {"access_token": token.token, "next_openid": next_openid}
        answer = dispatch(fake, "GET", "/cgi-bin/user/get", query, b"")
        start = followers.index(next_openid) + 1 if next_openid else 0
        page = followers[start : start + 10_000]
        expected: dict[str, Any] = {"total": len(followers), "count": len(page)}
        if page:
            expected.update(data={"openid": page}, next_openid=page[-1])
        else:
            expected["next_openid"] = ""
        assert answer.text == encode_json(expected)


@pytest.mark.parametrize("values", [
    [],
    [""],
    ["oAbc_-09", "o" * 28, ""],
    ['a"b', "c"],
    ["back\\slash"],
    ["tab\tnew\nline\x01\x1f", "plain"],
    ["\x7f", "é中", "\u2028", "\ud800"],  # DEL, non-ASCII, U+2028, a lone surrogate
])
def test_strings_json_matches_encode_json(values: list[str]) -> None:
    assert strings_json(values) == encode_json(values)


class UserGetEmpty(_UserGetPaging):
    __test__ = True
    followers = 0


class UserGetOne(_UserGetPaging):
    __test__ = True
    followers = 1


class UserGetFullPage(_UserGetPaging):
    __test__ = True
    followers = 10_000


class UserGetFullPagePlusOne(_UserGetPaging):
    __test__ = True
    followers = 10_001


# user/info and batchget -----------------------------------------------------------------------------


class UserInfoTests(SandboxTestCase):
    fake_options: ClassVar[dict[str, Any]] = {"unionid_ratio": 0.5}

    def info(self, openid: str, token: str | None = None) -> dict[str, Any]:
        token = token or self.token()
        return self.api_json("GET", "/cgi-bin/user/info", {"access_token": token, "openid": openid})

    def batch(self, openids: list[str], token: str | None = None) -> dict[str, Any]:
        body = {"user_list": [{"openid": o, "lang": "zh_CN"} for o in openids]}
        query = {"access_token": token or self.token()}
        return self.api_json("POST", "/cgi-bin/user/info/batchget", query, body)

    def test_follower_and_unfollowed_shapes(self) -> None:
        person = next(p for p in self.fake.people if p.follows and p.unionid)
        info = self.info(person.oa_openid)
        assert info["subscribe"] == 1 and info["openid"] == person.oa_openid
        assert info["unionid"] == person.unionid
        assert info["subscribe_time"] == person.subscribe_time
        for key in ("subscribe_scene", "qr_scene", "qr_scene_str", "tagid_list", "remark"):
            assert key in info
        self.fake.unfollow(person)
        gone = self.info(person.oa_openid)
        assert gone["subscribe"] == 0 and gone["openid"] == person.oa_openid
        assert "unionid" not in gone and "subscribe_time" not in gone
        self.clock.advance(60)
        self.fake.follow(person)
        back = self.info(person.oa_openid)
        assert back["unionid"] == person.unionid  # same openid and unionid on re-follow
        assert back["subscribe_time"] == int(START) + 60

    def test_no_unionid_when_unbound(self) -> None:
        person = next(p for p in self.fake.people if p.follows and p.unionid is None)
        assert "unionid" not in self.info(person.oa_openid)

    def test_info_errors(self) -> None:
        person = self.fake.people[0]
        assert self.info(person.mp_openid)["errcode"] == 40003
        assert self.info("oUnknownUnknownUnknownUnknown")["errcode"] == 40003
        assert self.info(person.oa_openid, self.token("mp"))["errcode"] == 48001

    def test_batchget(self) -> None:
        token = self.token()
        openids = [p.oa_openid for p in self.fake.people[:100]]
        answer = self.batch(openids, token)
        assert list(answer) == ["user_info_list"]
        assert [u["openid"] for u in answer["user_info_list"]] == openids
        for person, item in zip(self.fake.people, answer["user_info_list"], strict=False):
            assert item["subscribe"] == int(person.follows)
            assert ("unionid" in item) == (person.follows and person.unionid is not None)
        too_many = [p.oa_openid for p in self.fake.people[:101]]
        assert self.batch(too_many, token)["errcode"] == 40032
        assert self.batch([], token)["errcode"] == 40032
        assert self.batch([openids[0], self.fake.people[1].mp_openid], token)["errcode"] == 40003
        form = self.call_api(
            "POST", "/cgi-bin/user/info/batchget", {"access_token": token}, body="openid=x"
        )
        assert json.loads(form.body)["errcode"] == 47001

    def test_batchget_text_is_the_encoded_body(self) -> None:
        # batchget builds its JSON text itself: it must be exactly what encoding the body gives.
        query = {"access_token": self.token()}
        people = self.fake.people[:100]
        self.fake.unfollow(next(p for p in people if p.follows))
        self.fake.follow(next(p for p in people if not p.follows), qr_scene_str="qr1")
        body = json.dumps({"user_list": [{"openid": p.oa_openid} for p in people]}).encode()
        answer = dispatch(self.fake, "POST", "/cgi-bin/user/info/batchget", query, body)
        expected = {"user_info_list": [user_info(p) for p in people]}
        assert answer.text == encode_json(expected) and answer.body == expected
        response = self.call_api("POST", "/cgi-bin/user/info/batchget", query, body)
        assert response.body.decode("utf-8") == answer.text


def test_user_info_json_matches_encoded_user_info() -> None:
    fake = FakeWeChat(300, seed=3, unionid_ratio=0.5)
    fake.follow(next(p for p in fake.people if not p.follows), "ADD_SCENE_QR_CODE", 7, "s")
    odd = 'a"b\\c/\n\t\x01\x7fé中\u2028\ud800'  # escapes, non-ASCII, a lone surrogate
    strange = [
        Person(0, odd, "mp", odd, True, False, 2**40, odd, -1, odd),
        Person(1, None, "mp", odd, False, False, 0, "", 0, ""),
    ]
    for person in [*fake.people, *strange]:
        assert user_info_json(person) == encode_json(user_info(person))


# Template messages ---------------------------------------------------------------------------------


class TemplateSendTests(SandboxTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.oa = self.token()
        self.follower = next(p for p in self.fake.people if p.follows)
        self.stranger = next(p for p in self.fake.people if not p.follows)

    def send(self, **fields: Any) -> dict[str, Any]:
        body: dict[str, Any] = {"touser": self.follower.oa_openid, "template_id": ORDER_TEMPLATE_ID}
        body["data"] = GOOD_ORDER
        body.update(fields)
        body = {k: v for k, v in body.items() if v is not None}
        return self.api_json("POST", SEND, {"access_token": self.oa}, body)

    def test_success_shape_and_inbox(self) -> None:
        answer = self.send(url="https://example.com/o/1")
        assert set(answer) == {"errcode", "errmsg", "msgid"}
        assert answer["errcode"] == 0 and answer["errmsg"] == "ok"
        assert isinstance(answer["msgid"], int) and answer["msgid"] > 2**53
        second = self.send()
        assert second["msgid"] != answer["msgid"]
        inbox = self.fake.inbox(self.follower.oa_openid)
        assert [m["msgid"] for m in inbox] == [answer["msgid"], second["msgid"]]
        assert inbox[0]["data"] == GOOD_ORDER and inbox[0]["url"] == "https://example.com/o/1"
        assert inbox[0]["template_id"] == ORDER_TEMPLATE_ID

    def test_error_codes(self) -> None:
        creds = self.fake.credentials
        assert self.send(template_id=None)["errcode"] == 40036
        assert self.send(template_id="nope")["errcode"] == 40037
        assert self.send(touser=self.follower.mp_openid)["errcode"] == 40003
        assert self.send(touser="oUnknownUnknownUnknownUnknown")["errcode"] == 40003
        assert self.send(touser=self.stranger.oa_openid)["errcode"] == 43004
        mp_token = self.token("mp")
        body = {"touser": self.follower.oa_openid, "template_id": ORDER_TEMPLATE_ID}
        answer = self.api_json("POST", SEND, {"access_token": mp_token}, {**body, "data": GOOD_ORDER})
        assert answer["errcode"] == 48001
        bad_json = self.call_api("POST", SEND, {"access_token": self.oa}, body="{not json")
        assert json.loads(bad_json.body)["errcode"] == 47001
        page = {"appid": creds.mp_appid, "pagepath": "pages/index/index?id=1"}
        assert self.send(miniprogram=page)["errcode"] == 0
        in_data = self.send(data={**GOOD_ORDER, "miniprogram": page})
        assert in_data["errcode"] == 47003 and "miniprogram" in in_data["errmsg"]
        for broken in ("pages/index", {"appid": creds.mp_appid}, {**page, "appid": creds.oa_appid}):
            assert self.send(miniprogram=broken)["errcode"] == 47003, broken
        assert self.fake.inbox(self.stranger.oa_openid) == []
        assert len(self.fake.inbox(self.follower.oa_openid)) == 1

    def test_value_rule_errmsg_names_the_key(self) -> None:
        answer = self.send(data={**GOOD_ORDER, "thing2": {"value": "x" * 21}})
        assert answer["errcode"] == 47003
        assert answer["errmsg"].startswith("argument invalid! data.thing2.value invalid")
        assert RID_RE.search(answer["errmsg"])
        empty = self.send(data={**GOOD_ORDER, "phrase5": {"value": ""}})
        assert empty["errmsg"].startswith("argument invalid! data.phrase5.value is emtpy")
        missing = {k: v for k, v in GOOD_ORDER.items() if k != "time4"}
        assert "data.time4" in self.send(data=missing)["errmsg"]
        # Legacy templates: keys are not typed; first/remark may be absent or extra.
        legacy = {"keyword1": {"value": "测试"}, "keyword2": {"value": "通过"}}
        assert self.send(template_id=LEGACY_TEMPLATE_ID, data=legacy)["errcode"] == 0
        extra = {**GOOD_ORDER, "first": {"value": "不显示"}, "remark": {"value": "x"}}
        assert self.send(data=extra)["errcode"] == 0

    def test_client_msg_id_dedupe_for_ten_minutes(self) -> None:
        first = self.send(client_msg_id="push-1")
        self.clock.advance(599)
        again = self.send(client_msg_id="push-1")
        assert again == {"errcode": 0, "errmsg": "ok", "msgid": first["msgid"]}
        assert len(self.fake.inbox(self.follower.oa_openid)) == 1
        # The key is (openid, client_msg_id): another person gets their own message.
        other = next(p for p in self.fake.people if p.follows and p is not self.follower)
        assert self.send(touser=other.oa_openid, client_msg_id="push-1")["msgid"] != first["msgid"]
        # A retry still learns the msgid after the recipient unfollowed.
        self.fake.unfollow(self.follower)
        assert self.send(client_msg_id="push-1")["msgid"] == first["msgid"]
        self.fake.follow(self.follower)
        self.clock.advance(1)  # 600 s after the first send: the window is over
        later = self.send(client_msg_id="push-1")
        assert later["errcode"] == 0 and later["msgid"] != first["msgid"]
        assert len(self.fake.inbox(self.follower.oa_openid)) == 2

    def test_template_list_shape(self) -> None:
        answer = self.api_json(
            "GET", "/cgi-bin/template/get_all_private_template", {"access_token": self.oa}
        )
        items = answer["template_list"]
        assert [t["template_id"] for t in items] == [t.template_id for t in DEFAULT_TEMPLATES]
        for item in items:
            assert set(item) == {
                "template_id", "title", "primary_industry", "deputy_industry", "content", "example"
            }
        self.fake.add_template("tplNew", "新模板", "内容:{{thing1.DATA}}")
        answer = self.api_json(
            "GET", "/cgi-bin/template/get_all_private_template", {"access_token": self.oa}
        )
        assert answer["template_list"][-1]["content"] == "内容:{{thing1.DATA}}"
        assert self.send(template_id="tplNew", data={"thing1": {"value": "好"}})["errcode"] == 0


ORDER = next(t for t in DEFAULT_TEMPLATES if t.template_id == ORDER_TEMPLATE_ID)
NOTICE = next(t for t in DEFAULT_TEMPLATES if t.template_id == NOTICE_TEMPLATE_ID)


@pytest.mark.parametrize(
    ("key", "value", "ok"),
    [
        ("thing2", "一" * 20, True),
        ("thing2", "一" * 21, False),
        ("thing2", "Order #12, 巧克力!", True),
        ("character_string1", "A" * 32, True),
        ("character_string1", "A" * 33, False),
        ("character_string1", "订单123", False),
        ("character_string1", "SN-2024/01_x", True),
        ("phrase5", "配送中", True),
        ("phrase5", "已经配送完成", False),
        ("phrase5", "ok", False),
        ("phrase5", "配送 中", False),
        ("amount3", "39.8元", True),
        ("amount3", "¥100.00", True),
        ("amount3", "$1234567890.12", True),
        ("amount3", "12345678901234", False),
        ("amount3", "一百元", False),
        ("amount3", "1,000", False),
        ("time4", "15:01", True),
        ("time4", "2019年10月1日 15:01", True),
        ("time4", "2024-01-01 09:30~2024-01-01 10:30", True),
        ("time4", "25:00", False),
        ("time4", "tomorrow", False),
        ("time4", "", False),
    ],
)
def test_template_value_rules(key: str, value: str, ok: bool) -> None:
    data = {**GOOD_ORDER, key: {"value": value}}
    rejection = check_data(ORDER, data)
    if ok:
        assert rejection is None
    else:
        assert rejection is not None and rejection.errcode == 47003
        assert f"data.{key}.value" in rejection.errmsg


def test_template_data_shape_rules() -> None:
    assert check_data(NOTICE, {"thing1": {"value": "好"}, "time2": {"value": "09:30"}}) is None
    for broken in ({"thing1": "好", "time2": {"value": "09:30"}}, {"time2": {"value": "09:30"}},
                   {"thing1": {"value": 5}, "time2": {"value": "09:30"}}):
        rejection = check_data(NOTICE, broken)
        assert rejection is not None and "data.thing1" in rejection.errmsg


# Mini Program login ----------------------------------------------------------------------------------


class LoginTests(SandboxTestCase):
    fake_options: ClassVar[dict[str, Any]] = {"unionid_ratio": 0.5}

    def exchange(self, code: str, **query: str) -> dict[str, Any]:
        creds = self.fake.credentials
        params = {"appid": creds.mp_appid, "secret": creds.mp_secret, "js_code": code,
                  "grant_type": "authorization_code"}
        params.update(query)
        return self.api_json("GET", "/sns/jscode2session", params)

    def test_login_success_and_single_use(self) -> None:
        person = next(p for p in self.fake.people if p.unionid and not p.used_mp)
        code = self.fake.issue_login_code(person)
        answer = self.exchange(code)
        assert answer == {"session_key": person.session_key, "openid": person.mp_openid,
                          "unionid": person.unionid}
        assert len(base64.b64decode(answer["session_key"], validate=True)) == 16
        assert person.used_mp
        assert self.exchange(code)["errcode"] == 40163
        again = self.exchange(self.fake.issue_login_code(person))
        assert again["session_key"] != answer["session_key"]  # a new login, a new key

    def test_no_unionid_key_when_person_has_none(self) -> None:
        person = next(p for p in self.fake.people if p.unionid is None)
        answer = self.exchange(self.fake.issue_login_code(person))
        assert set(answer) == {"session_key", "openid"}

    def test_login_errors(self) -> None:
        creds = self.fake.credentials
        person = self.fake.people[0]
        code = self.fake.issue_login_code(person)
        assert self.exchange("0" * 32)["errcode"] == 40029
        assert self.exchange(code, appid="wx0000000000000000")["errcode"] == 40013
        assert self.exchange(code, appid=creds.oa_appid, secret=creds.oa_secret)["errcode"] == 40013
        assert self.exchange(code, secret="0" * 32)["errcode"] == 40125
        self.clock.advance(299)
        fresh = self.fake.issue_login_code(person)
        self.clock.advance(1)
        assert self.exchange(code)["errcode"] == 40029  # 5 minutes old
        assert "openid" in self.exchange(fresh)

    def test_resend_after_a_lost_answer_is_40163(self) -> None:
        # The code was exchanged but the answer never arrived: a resend finds it used (real
        # WeChat's single-use rule; the client must log in again).
        person = next(p for p in self.fake.people if not p.used_mp)
        code = self.fake.issue_login_code(person)
        self.fake.script_fault("/sns/jscode2session", "reset_after")
        creds = self.fake.credentials
        with pytest.raises(HTTPClientError) as lost:
            self.call_api("GET", "/sns/jscode2session", {
                "appid": creds.mp_appid, "secret": creds.mp_secret, "js_code": code,
                "grant_type": "authorization_code"})
        assert lost.value.code == 599 and person.used_mp
        resent = self.exchange(code)
        assert resent["errcode"] == 40163 and resent["errmsg"].startswith("code been used")
        assert "openid" in self.exchange(self.fake.issue_login_code(person))


# Misc endpoint behaviour: unknown paths, methods, the call log, faults ---------------------------------


class MiscTests(SandboxTestCase):
    def test_unknown_path_and_wrong_method(self) -> None:
        response = self.call_api("GET", "/cgi-bin/nothing/here")
        assert response.code == 404
        answer = json.loads(response.body)
        assert answer["errcode"] == 40066 and "/cgi-bin/nothing/here" in answer["errmsg"]
        assert self.api_json("GET", SEND)["errcode"] == 43002
        assert self.api_json("POST", "/cgi-bin/user/get", body={})["errcode"] == 43001

    def test_user_get_follows_state_changes(self) -> None:
        token = self.token()
        followers = list(self.fake.follower_openids)
        leaver = self.fake.by_oa_openid(followers[10])
        assert leaver is not None
        self.fake.unfollow(leaver)
        page = self.api_json("GET", "/cgi-bin/user/get", {"access_token": token})
        assert page["total"] == len(followers) - 1 and leaver.oa_openid not in page["data"]["openid"]
        # A cursor that has since unfollowed still marks a position in the list.
        after = self.api_json("GET", "/cgi-bin/user/get",
                              {"access_token": token, "next_openid": leaver.oa_openid})
        assert after["data"]["openid"] == followers[11:]
        unknown = self.api_json("GET", "/cgi-bin/user/get",
                                {"access_token": token, "next_openid": "oNotAnOpenidOfThisAccount00"})
        assert unknown["errcode"] == 40003
        self.fake.follow(leaver)
        assert self.fake.follower_openids == followers

    def test_call_log_limit_keeps_counts(self) -> None:
        fake = FakeWeChat(5, call_log_limit=10)
        for _ in range(25):
            dispatch(fake, "GET", "/cgi-bin/user/get", {}, b"")
        assert 10 <= len(fake.calls) < 20 and fake.count_calls("/cgi-bin/user/get") == 25
        assert fake.calls[-1].errcode == 41001

    def test_call_log_redacts_secrets(self) -> None:
        token = self.token()
        self.api_json("GET", "/cgi-bin/user/get", {"access_token": token})
        self.api_json("GET", "/cgi-bin/user/get", {"access_token": "86_" + "B" * 40})
        creds = self.fake.credentials
        self.api_json("POST", "/cgi-bin/stable_token", body={
            "grant_type": CC, "appid": creds.mp_appid, "secret": creds.mp_secret})
        assert self.fake.count_calls("/cgi-bin/user/get") == 2
        first, ok, bad, stable = self.fake.calls
        assert first.query["secret"] == "<redacted>" and first.query["appid"] == creds.oa_appid
        assert first.app == "oa" and first.errcode == 0
        assert ok.query == {"access_token": "<redacted>"} and ok.errcode == 0 and ok.app == "oa"
        assert bad.errcode == 40001 and bad.app is None
        assert stable.body["secret"] == "<redacted>" and stable.app == "mp"
        assert token not in repr(self.fake.calls) and creds.oa_secret not in repr(self.fake.calls)

    def test_call_log_keeps_bytes_and_decodes_bodies(self) -> None:
        token = self.token()
        creds = self.fake.credentials
        openid = self.fake.people[0].oa_openid
        batch = json.dumps({"user_list": [{"openid": openid}]}, ensure_ascii=False).encode()
        stable = {"grant_type": CC, "appid": creds.oa_appid, "secret": creds.oa_secret,
                  "force_refresh": False, "x": [1.5, None, "é\u2028"]}
        bodies: list[tuple[str, str, bytes | str, Any]] = [
            ("POST", "/cgi-bin/user/info/batchget", batch, {"user_list": [{"openid": openid}]}),
            ("POST", "/cgi-bin/stable_token", json.dumps(stable, ensure_ascii=False),
             {**stable, "secret": "<redacted>"}),
            ("POST", SEND, "openid=x&y=1", "openid=x&y=1"),  # not JSON: the text
            ("POST", SEND, b"\xff{", "\ufffd{"),  # not UTF-8: decoded with replacements
            ("POST", "/cgi-bin/user/get", b'"text"', "text"),  # wrong method: still logged
            ("GET", "/cgi-bin/user/get", b"", None),
        ]
        for method, path, body, _ in bodies:
            self.call_api(method, path, {"access_token": token}, body or None)
        calls = self.fake.calls[-len(bodies):]
        for call, (method, path, body, logged) in zip(calls, bodies, strict=True):
            assert (call.method, call.path) == (method, path)
            assert call.body == logged
            if path != "/cgi-bin/stable_token":
                raw = body.encode() if isinstance(body, str) else body
                assert call.raw_body == raw
        assert creds.oa_secret.encode() not in calls[1].raw_body
        # The control API shows each call with its decoded body, as it always did.
        response = self.call_api("GET", "/_sandbox/calls", {"limit": str(len(bodies))})
        shown = json.loads(response.body)["calls"]
        assert [list(c) for c in shown] == [[
            "method", "path", "query", "body", "status", "errcode", "at", "app", "fault"
        ]] * len(bodies)
        assert [c["body"] for c in shown] == [logged for *_, logged in bodies]
        assert [c["errcode"] for c in shown] == [c.errcode for c in calls]

    def test_scripted_faults(self) -> None:
        path = "/cgi-bin/user/get"
        token = self.token()
        self.fake.script_fault(path, "-1")
        self.fake.script_fault(path, "45011")
        self.fake.script_fault(path, "http500")
        self.fake.script_fault(path, "reset")
        self.fake.script_fault(path, "hang")
        assert self.api_json("GET", path, {"access_token": token})["errcode"] == -1
        assert self.api_json("GET", path, {"access_token": token})["errcode"] == 45011
        assert self.call_api("GET", path, {"access_token": token}).code == 500
        with pytest.raises(HTTPClientError) as reset:
            self.call_api("GET", path, {"access_token": token}, raise_error=True)
        assert reset.value.code == 599
        with pytest.raises(HTTPClientError) as hang:
            self.call_api("GET", path, {"access_token": token}, raise_error=True,
                          request_timeout=0.3)
        assert hang.value.code == 599
        assert "total" in self.api_json("GET", path, {"access_token": token})
        calls = [c for c in self.fake.calls if c.path == path]
        assert [c.fault for c in calls] == ["-1", "45011", "http500", "reset", "hang", None]
        assert [c.errcode for c in calls] == [-1, 45011, None, None, None, 0]
        assert [c.status for c in calls] == [200, 200, 500, 200, 200, 200]
        with pytest.raises(ValueError):
            self.fake.script_fault(path, "explode")

    def test_reset_after_processing_then_dedupe_on_retry(self) -> None:
        token = self.token()
        follower = next(p for p in self.fake.people if p.follows)
        body = {"touser": follower.oa_openid, "template_id": ORDER_TEMPLATE_ID,
                "client_msg_id": "job-42", "data": GOOD_ORDER}
        self.fake.script_fault(SEND, "reset_after")
        with pytest.raises(HTTPClientError) as lost:
            self.call_api("POST", SEND, {"access_token": token}, body)
        assert lost.value.code == 599
        inbox = self.fake.inbox(follower.oa_openid)
        assert len(inbox) == 1  # accepted although the answer was lost
        retry = self.api_json("POST", SEND, {"access_token": token}, body)
        assert retry["msgid"] == inbox[0]["msgid"]
        assert len(self.fake.inbox(follower.oa_openid)) == 1

    def test_delay_fault(self) -> None:
        token = self.token()
        self.fake.script_fault("/cgi-bin/user/get", "delay:0.2")
        started = time.monotonic()
        assert "total" in self.api_json("GET", "/cgi-bin/user/get", {"access_token": token})
        assert time.monotonic() - started >= 0.2

    @gen_test
    async def test_aclose_releases_hanging_requests(self) -> None:
        self.fake.script_fault("/cgi-bin/user/get", "hang")
        request = self.http_client.fetch(self.get_url("/cgi-bin/user/get"), raise_error=False,
                                          request_timeout=30)
        await eventually(lambda: self.fake.count_calls("/cgi-bin/user/get"), "the hanging call")
        started = time.monotonic()
        await self.sandbox_app.aclose()
        with pytest.raises(HTTPClientError) as dropped:
            await request
        assert dropped.value.code == 599 and time.monotonic() - started < 5


def _fault_sequence(seed: int, calls: int = 200) -> list[str | None]:
    fake = FakeWeChat(20, seed=seed, fault_rate=0.3, latency_s=(0.01, 0.05))
    answers = [dispatch(fake, "GET", "/cgi-bin/user/get", {}, b"") for _ in range(calls)]
    for answer in answers:
        assert 0.01 <= answer.delay_s <= 0.05
    return [c.fault for c in fake.calls]


def test_random_faults_are_seeded() -> None:
    first, again, other = _fault_sequence(3), _fault_sequence(3), _fault_sequence(4)
    assert first == again and first != other
    faulted = [f for f in first if f is not None]
    assert 30 < len(faulted) < 90  # 30 % of 200
    assert set(faulted) <= {"-1", "45009", "45011", "http500", "hang", "reset"}
    fixed = FakeWeChat(5, latency_s=0.25)
    assert dispatch(fixed, "GET", "/cgi-bin/user/get", {}, b"").delay_s == 0.25


# Fault switches: real-WeChat behaviours produced on demand (faults.py, switches.py) ----------------


BATCHGET = "/cgi-bin/user/info/batchget"
USER_GET = "/cgi-bin/user/get"
USER_INFO = "/cgi-bin/user/info"


class FaultSwitchTests(SandboxTestCase):
    """Each switch produces its behaviour, and stops producing it once cleared or expired."""

    def setUp(self) -> None:
        super().setUp()
        self.followers = [p for p in self.fake.people if p.follows]

    def token_answer(self, app: str = "oa") -> dict[str, Any]:
        creds = self.fake.credentials
        appid, secret = ((creds.oa_appid, creds.oa_secret) if app == "oa"
                         else (creds.mp_appid, creds.mp_secret))
        return self.api_json("GET", "/cgi-bin/token",
                             {"grant_type": CC, "appid": appid, "secret": secret})

    def stable_answer(self) -> dict[str, Any]:
        creds = self.fake.credentials
        return self.api_json("POST", "/cgi-bin/stable_token", body={
            "grant_type": CC, "appid": creds.oa_appid, "secret": creds.oa_secret})

    def control(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        response = self.call_api(method, "/_sandbox/" + path, body=body)
        return response.code, json.loads(response.body)

    def send(self, token: str, person: Person, **fields: Any) -> dict[str, Any]:
        body = {"touser": person.oa_openid, "template_id": ORDER_TEMPLATE_ID, "data": GOOD_ORDER,
                **fields}
        return self.api_json("POST", SEND, {"access_token": token}, body)

    # The mechanism: lifetimes, conditions, listing and clearing.

    def test_lifetimes_count_window_and_until_cleared(self) -> None:
        token = self.token()
        query = {"access_token": token}
        once = self.fake.script_fault(USER_GET, "-1")  # default: the next call only
        assert self.api_json("GET", USER_GET, query)["errcode"] == -1
        assert "total" in self.api_json("GET", USER_GET, query)
        assert once.fired == 1 and self.fake.faults.live() == []
        # A time window by the emulator's clock: every call in it, then recovery by itself.
        window = self.fake.script_fault(USER_GET, "45011", seconds=60)
        for _ in range(3):
            assert self.api_json("GET", USER_GET, query)["errcode"] == 45011
        self.clock.advance(59.9)
        assert self.api_json("GET", USER_GET, query)["errcode"] == 45011
        self.clock.advance(0.1)
        assert "total" in self.api_json("GET", USER_GET, query)
        assert window.fired == 4 and self.fake.faults.live() == []
        # At most `times` answers inside a window.
        self.fake.script_fault(USER_GET, "-1", 2, seconds=60)
        codes = [self.api_json("GET", USER_GET, query).get("errcode") for _ in range(3)]
        assert codes == [-1, -1, None]
        # times=None without a time limit: until cleared (by path, by id or all).
        forever = self.fake.script_fault(USER_GET, "-1", None)
        other = self.fake.script_fault(USER_INFO, "-1", None)
        self.clock.advance(10 * 86400)
        query = {"access_token": self.token()}
        assert self.api_json("GET", USER_GET, query)["errcode"] == -1
        assert self.fake.clear_faults(rule_id=forever.id) == 1
        assert "total" in self.api_json("GET", USER_GET, query)
        assert self.fake.faults.live() == [other]
        assert self.fake.clear_faults(USER_INFO) == 1 and self.fake.faults.live() == []
        # An absolute end time on the emulator's clock.
        self.fake.script_fault(USER_GET, "-1", until=self.clock() + 5)
        assert self.api_json("GET", USER_GET, query)["errcode"] == -1
        self.clock.advance(5)
        assert "total" in self.api_json("GET", USER_GET, query)

    def test_rule_arguments_are_checked(self) -> None:
        bad: list[dict[str, Any]] = [
            {"kind": "boom"}, {"times": 0}, {"times": True}, {"seconds": 0},
            {"seconds": 5, "until": START + 5}, {"app": "web"}, {"ips": ["1.2.3.999"]},
            {"allow": -1}, {"per": "week"}, {"kind": "empty"}, {"kind": "dup:ok"},
            {"kind": "dup:nope", "path": SEND}, {"kind": "report:msgid0", "path": "*"},
        ]
        for overrides in bad:
            args: dict[str, Any] = {"path": USER_INFO, "kind": "-1", **overrides}
            path, kind = args.pop("path"), args.pop("kind")
            with pytest.raises(ValueError):
                self.fake.script_fault(path, kind, **args)
        assert self.fake.faults.live() == []

    def test_control_routes_add_list_and_clear(self) -> None:
        code, rule = self.control("POST", "faults", {
            "path": "token", "kind": "89503", "seconds": 30, "app": "oa", "ip": "10.1.2.3"})
        assert code == 200 and rule["kind"] == "89503" and rule["until"] == START + 30
        assert rule["times"] is None and rule["app"] == "oa" and rule["ips"] == ["10.1.2.3"]
        assert self.token_answer()["errcode"] == 89503
        code, listed = self.control("GET", "faults")
        assert [r["id"] for r in listed["faults"]] == [rule["id"]]
        assert listed["faults"][0]["fired"] == 1
        self.clock.advance(30)  # the admin confirmed: the emulator recovers by itself
        assert "access_token" in self.token_answer()
        assert self.control("GET", "faults")[1] == {"faults": []}
        code, until_cleared = self.control("POST", "faults", {
            "path": USER_INFO, "kind": "45009", "times": None})
        assert code == 200 and until_cleared["times"] is None and until_cleared["until"] is None
        self.control("POST", "faults", {"path": USER_GET, "kind": "-1"})
        assert self.control("DELETE", f"faults?id={until_cleared['id']}")[1] == {"cleared": 1}
        assert self.control("DELETE", "faults")[1] == {"cleared": 1}
        for broken in ({"path": USER_GET, "kind": "-1", "tims": 2},
                       {"path": USER_GET, "kind": "-1", "seconds": "soon"},
                       {"path": USER_GET, "kind": "-1", "openids": "x"},
                       {"path": USER_GET, "kind": "dup:45066"}):
            code, answer = self.control("POST", "faults", broken)
            assert code == 400 and answer["error"], broken

    # 1. WeChat unreachable for us: token refusals, optionally on business calls too.

    def test_refuse_tokens_for_a_window_then_recover(self) -> None:
        token = self.token()
        for errcode in TOKEN_REFUSALS:
            self.fake.refuse_tokens(errcode, seconds=60)
            assert self.token_answer()["errcode"] == errcode
            assert self.stable_answer()["errcode"] == errcode
            assert RID_RE.search(self.stable_answer()["errmsg"])
            assert "total" in self.api_json("GET", USER_GET, {"access_token": token})
            self.clock.advance(60)
            token = self.token_answer()["access_token"]
            assert self.fake.faults.live() == []

    def test_whitelist_errmsg_names_the_callers_ip(self) -> None:
        self.fake.refuse_tokens(40164, times=1)
        answer = self.token_answer()
        assert answer["errmsg"].startswith(
            "invalid ip 127.0.0.1 ipv6 ::ffff:127.0.0.1, not in whitelist rid: ")
        # Behind NAT the address changes from call to call.
        self.fake.refuse_tokens(40164, times=3, ips=["1.2.3.4", "5.6.7.8"])
        shown = [self.token_answer()["errmsg"].split(",")[0] for _ in range(3)]
        assert shown == ["invalid ip 1.2.3.4 ipv6 ::ffff:1.2.3.4",
                         "invalid ip 5.6.7.8 ipv6 ::ffff:5.6.7.8",
                         "invalid ip 1.2.3.4 ipv6 ::ffff:1.2.3.4"]
        assert "access_token" in self.token_answer()
        self.fake.refuse_tokens(40164, times=1, ips=["2001:db8::1"], business=True)
        v6 = dispatch(self.fake, "GET", USER_GET, {}, b"")
        assert v6.body is not None
        assert v6.body["errmsg"].startswith("invalid ip 2001:db8::1 ipv6 2001:db8::1, not in")
        self.fake.refuse_tokens(61004, times=1, errmsg="access clientip is not registered")
        assert self.token_answer()["errmsg"].startswith("access clientip is not registered rid: ")

    def test_refusals_on_business_calls_and_per_app(self) -> None:
        oa = self.token()
        creds = self.fake.credentials
        self.fake.refuse_tokens(40164, business=True, seconds=300)
        assert self.api_json("GET", USER_GET, {"access_token": oa})["errcode"] == 40164
        assert self.send(oa, self.followers[0])["errcode"] == 40164
        code = self.fake.issue_login_code(self.fake.people[0])
        login = self.api_json("GET", "/sns/jscode2session", {
            "appid": creds.mp_appid, "secret": creds.mp_secret, "js_code": code})
        assert login["errcode"] == 40164
        assert self.fake.inbox(self.followers[0].oa_openid) == []
        self.clock.advance(300)
        assert "total" in self.api_json("GET", USER_GET, {"access_token": oa})
        # Only the MP's fetches (its whitelist is its own); the OA is untouched.
        self.fake.refuse_tokens(40243, app="mp")
        assert self.token_answer("mp")["errcode"] == 40243
        assert "access_token" in self.token_answer("oa")
        assert self.api_json("GET", USER_GET, {"access_token": oa}).get("errcode") is None
        self.fake.clear_faults()
        assert "access_token" in self.token_answer("mp")

    # 2. The backfill cursor goes stale.

    def test_stale_cursor_answers_40003_or_an_empty_page(self) -> None:
        token = self.token()
        openids = self.fake.follower_openids
        cursor, other = openids[50], openids[60]

        def page(next_openid: str = "") -> dict[str, Any]:
            query = {"access_token": token}
            if next_openid:
                query["next_openid"] = next_openid
            return self.api_json("GET", USER_GET, query)

        total = len(openids)
        rule = self.fake.stale_cursor(cursor)
        assert page(cursor)["errcode"] == 40003
        assert page(cursor)["errcode"] == 40003  # until cleared
        assert page(other)["data"]["openid"] == openids[61:]
        assert page()["count"] == total
        self.fake.clear_faults(rule_id=rule.id)
        assert page(cursor)["data"]["openid"] == openids[51:]
        self.fake.stale_cursor(cursor, "empty", times=1)
        assert page(cursor) == {"total": total, "count": 0, "next_openid": ""}
        assert page(cursor)["count"] == total - 51
        self.fake.stale_cursor("*", "empty_bare", seconds=10)
        assert page(cursor) == {"total": total, "count": 0}
        assert page(other) == {"total": total, "count": 0}
        assert page()["count"] == total  # "*" is any cursor, not the first page
        self.clock.advance(10)
        assert page(other)["count"] == total - 61

    # 3. batchget with one bad openid in the chunk.

    def test_poisoned_openid_fails_the_whole_chunk(self) -> None:
        token = self.token()
        people = self.fake.people[:100]
        bad = people[37].oa_openid

        def batch(chunk: list[Person]) -> dict[str, Any]:
            body = {"user_list": [{"openid": p.oa_openid, "lang": "zh_CN"} for p in chunk]}
            return self.api_json("POST", BATCHGET, {"access_token": token}, body)

        for errcode in (50005, 40003, 40032):
            rule = self.fake.poison_openid(bad, errcode)
            answer = batch(people)
            assert answer["errcode"] == errcode and RID_RE.search(answer["errmsg"])
            assert batch([people[37]])["errcode"] == errcode
            clean = batch(people[:37] + people[38:])
            assert len(clean["user_info_list"]) == 99
            assert rule.fired == 2
            self.fake.clear_faults()
            assert len(batch(people)["user_info_list"]) == 100
        code, _ = self.control("POST", "faults", {
            "path": BATCHGET, "kind": "50005", "openids": [bad], "times": 1})
        assert code == 200 and batch(people)["errcode"] == 50005
        assert len(batch(people)["user_info_list"]) == 100
        # The same condition works on user/info (openid) and template/send (touser).
        self.fake.poison_openid(bad, 40003, path=USER_INFO, times=1)
        query = {"access_token": token}
        assert self.api_json("GET", USER_INFO, {**query, "openid": bad})["errcode"] == 40003
        assert self.api_json("GET", USER_INFO, {**query, "openid": bad})["openid"] == bad

    # 4. A repeated client_msg_id within WeChat's 10-minute window.

    def test_every_duplicate_answer_and_a_single_delivery(self) -> None:
        token = self.token()
        follower = self.followers[0]
        expected_keys = {
            "ok": {"errcode", "errmsg", "msgid"}, "ok_no_msgid": {"errcode", "errmsg"},
            "45065": {"errcode", "errmsg"}, "45065_msg_id": {"errcode", "errmsg", "msg_id"},
            "45065_msgid": {"errcode", "errmsg", "msgid"}, "40241": {"errcode", "errmsg"},
            "45066": {"errcode", "errmsg"},
        }
        texts = {"45065": "clientmsgid exist", "40241": "The message is duplicate in 60 seconds",
                 "45066": "retry too fast"}
        assert set(expected_keys) == set(DUPLICATE_MODES)
        for number, mode in enumerate(DUPLICATE_MODES):
            client_msg_id = f"push-{number}"
            first = self.send(token, follower, client_msg_id=client_msg_id)["msgid"]
            rule = self.fake.answer_duplicates(mode, times=1)
            self.clock.advance(30)
            again = self.send(token, follower, client_msg_id=client_msg_id)
            assert set(again) == expected_keys[mode], (mode, again)
            code = mode.partition("_")[0]
            assert again["errcode"] == (0 if code == "ok" else int(code))
            assert again["errmsg"].startswith(texts.get(code, "ok"))
            assert again.get("msgid", again.get("msg_id", first)) == first
            assert rule.fired == 1
            # Used up: the next repeat gets the default answer; nothing is delivered twice.
            default = self.send(token, follower, client_msg_id=client_msg_id)
            assert default == {"errcode": 0, "errmsg": "ok", "msgid": first}
            assert self.fake.calls[-2].fault == f"dup:{mode}" and self.fake.calls[-1].fault is None
        assert len(self.fake.inbox(follower.oa_openid)) == len(DUPLICATE_MODES)

    def test_duplicate_rule_touches_only_duplicates(self) -> None:
        token = self.token()
        follower = self.followers[1]
        code, rule = self.control("POST", "faults", {
            "path": SEND, "kind": "dup:45065_msg_id", "times": None})
        assert code == 200
        first = self.send(token, follower, client_msg_id="a")
        assert first["errcode"] == 0
        assert self.send(token, follower, client_msg_id="b")["errcode"] == 0
        assert self.send(token, follower)["errcode"] == 0
        assert self.control("GET", "faults")[1]["faults"][0]["fired"] == 0
        for _ in range(2):
            again = self.send(token, follower, client_msg_id="a")
            assert again["errcode"] == 45065 and again["msg_id"] == first["msgid"]
        self.clock.advance(600)  # past WeChat's window: a new message, no duplicate answer
        later = self.send(token, follower, client_msg_id="a")
        assert later["errcode"] == 0 and later["msgid"] != first["msgid"]
        assert len(self.fake.inbox(follower.oa_openid)) == 4
        self.control("DELETE", f"faults?id={rule['id']}")
        assert self.send(token, follower, client_msg_id="a")["msgid"] == later["msgid"]

    # 5. Daily quotas (reset at Beijing midnight by the emulator's clock) and 43117.

    def test_daily_quota_resets_at_beijing_midnight(self) -> None:
        token = self.token()
        openid = self.followers[0].oa_openid
        query = {"access_token": token, "openid": openid}
        midnight = self.fake.next_beijing_midnight()
        assert (midnight + 8 * 3600) % 86400 == 0 and START < midnight <= START + 86400
        self.fake.daily_quota(USER_INFO, 3)
        for _ in range(3):
            assert self.api_json("GET", USER_INFO, query)["openid"] == openid
        assert self.api_json("GET", USER_INFO, query)["errcode"] == 45009
        self.clock.set(midnight - 1)
        assert self.api_json("GET", USER_INFO, query)["errcode"] == 45009
        self.clock.set(midnight)
        token = self.token()
        query["access_token"] = token
        for _ in range(3):
            assert self.api_json("GET", USER_INFO, query)["openid"] == openid
        assert self.api_json("GET", USER_INFO, query)["errcode"] == 45009
        self.fake.clear_faults()
        assert self.api_json("GET", USER_INFO, query)["openid"] == openid

    def test_template_send_quota_and_used_up_until_midnight(self) -> None:
        token = self.token()
        follower = self.followers[0]
        self.fake.daily_quota(SEND, 1)
        assert self.send(token, follower)["errcode"] == 0
        assert self.send(token, follower)["errcode"] == 45009
        assert len(self.fake.inbox(follower.oa_openid)) == 1
        self.fake.clear_faults()
        code, rule = self.control("POST", "faults", {
            "path": USER_INFO, "kind": "45009", "until": "beijing_midnight"})
        assert code == 200 and rule["until"] == self.fake.next_beijing_midnight()
        exhausted = self.fake.exhaust_daily_quota(SEND)
        query = {"access_token": token, "openid": follower.oa_openid}
        assert self.api_json("GET", USER_INFO, query)["errcode"] == 45009
        assert self.send(token, follower)["errcode"] == 45009
        self.clock.set(exhausted.until or 0.0)
        token = self.token()
        assert self.send(token, follower)["errcode"] == 0
        assert self.fake.faults.live() == []

    def test_43117_per_user_frequency_limit(self) -> None:
        token = self.token()
        busy, calm = self.followers[0], self.followers[1]
        self.fake.throttle_openid(busy.oa_openid, seconds=600)
        answer = self.send(token, busy)
        assert answer["errcode"] == 43117 and answer["errmsg"].startswith("Sending messages")
        assert self.send(token, calm)["errcode"] == 0
        self.clock.advance(600)
        assert self.send(token, busy)["errcode"] == 0
        # A counted limit: 2 sends per openid per hour window of the clock.
        self.clock.set(START - START % 3600 + 7200)
        token = self.token()
        self.fake.frequency_limit(2, 3600)
        assert [self.send(token, busy)["errcode"] for _ in range(3)] == [0, 0, 43117]
        assert [self.send(token, calm)["errcode"] for _ in range(3)] == [0, 0, 43117]
        self.clock.advance(3600)
        assert self.send(token, busy)["errcode"] == 0
        self.fake.clear_faults()
        assert [self.send(token, busy)["errcode"] for _ in range(3)] == [0, 0, 0]
        assert len(self.fake.inbox(busy.oa_openid)) == 1 + 2 + 1 + 3


def test_next_beijing_midnight() -> None:
    # 2023-11-14 22:13:20 UTC is 2023-11-15 06:13:20 in Beijing: the next midnight there is
    # 2023-11-15 16:00:00 UTC.
    fake = FakeWeChat(5, clock=FakeClock())
    assert fake.next_beijing_midnight() == 1_700_064_000
    assert FakeWeChat(5, clock=FakeClock(1_700_064_000)).next_beijing_midnight() == 1_700_150_400


# The WeChat side of the webhook: known-answer vectors (see test_crypto) -----------------------------


VECTOR4_CREDS = Credentials(
    oa_appid="wx1234567890abcdef",
    webhook_token="testtoken",
    encoding_aes_key="abcdefghijklmnopqrstuvwxyz0123456789ABCDEFG",
    oa_original_id="gh_0123456789ab",
)
VECTOR4_ENCRYPT = (
    "Q3stYC6hdFzMh9T8HCvyDPYd4batj7zR9qX1tTJwVo3rIGsIyiksc+v3Gxca8gMqrf6CKjLspeib04rpk/Tk+n5SKeiu"
    "Ogf9/3MzfMLXNvb8/4JtPLwVYsqmSXitdQrWQ1uLKFf1WaBaN2PFGwwoCiBJpEZsXmHFBIgCgB714pDpL48wrITJ/53j"
    "YuqSp8FAjd552PsFbBnmSP6xqKavwqsero0S+gHFsiKy2u50plWiC8Tumw2M/bASsVGhl82cydQjBsLgKKE79FUeASbK"
    "PXIGvgiq4U90rWLEWBlxuRej07+dFJPmb1SNHe2/L3xdegx6+o8sIVuUu24SanEMCeUcDvZEqo/y3+aW+GeNtmq/cKjx"
    "HmT2d6fnf8RFpJMBEoaEF8dBjOTuhUiCw2LjsWMHaJBifWnTHbvS75RU7Bs="
)


def test_verification_url_matches_vector_1() -> None:
    sender = WebhookSender("http://wxd.example/wechat", Credentials(webhook_token="AAAAA"))
    url = sender.verification_url("4375120948345356249", timestamp=1714036504, nonce="1514711492")
    query = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(url).query))
    assert query == {"signature": "f464b24fc39322e44b38aa78f5edd27bd1441696",
                     "echostr": "4375120948345356249", "timestamp": "1714036504",
                     "nonce": "1514711492"}


def test_post_signature_matches_vector_2() -> None:
    sender = WebhookSender("http://wxd.example/wechat?x=1", Credentials(webhook_token="AAAAA"))
    request = sender.build(sender.unsubscribe_fields("oX"), timestamp=1714037059,
                           nonce="486452656")
    assert request.query["signature"] == "899cf89e464efb63f54ddac96b0a0a235f53aa78"
    assert request.query["openid"] == "oX" and "encrypt_type" not in request.query
    assert request.url.startswith("http://wxd.example/wechat?x=1&signature=")
    assert request.body == request.xml.encode("utf-8")


def test_safe_mode_body_matches_vector_4() -> None:
    sender = WebhookSender("http://wxd.example/wechat", VECTOR4_CREDS, "safe",
                           random_prefix=lambda: b"0123456789abcdef")
    fields = sender.subscribe_fields("oABCD1234", create_time=1700000000)
    request = sender.build(fields, timestamp=1700000000, nonce="123456789")
    assert request.xml == (
        "<xml><ToUserName><![CDATA[gh_0123456789ab]]></ToUserName><FromUserName><![CDATA[oABCD1234]]>"
        "</FromUserName><CreateTime>1700000000</CreateTime><MsgType><![CDATA[event]]></MsgType>"
        "<Event><![CDATA[subscribe]]></Event><EventKey><![CDATA[]]></EventKey></xml>"
    )
    assert request.query["msg_signature"] == "196e68f4db1d73e10fe5a519d4fb557efec40e83"
    assert request.query["encrypt_type"] == "aes"
    assert request.query["signature"] == sign("testtoken", "1700000000", "123456789")
    assert request.body.decode() == (
        "<xml><ToUserName><![CDATA[gh_0123456789ab]]></ToUserName>"
        f"<Encrypt><![CDATA[{VECTOR4_ENCRYPT}]]></Encrypt></xml>"
    )


def test_compat_mode_and_an_independent_decrypter() -> None:
    wechatpy_crypto = pytest.importorskip("wechatpy.crypto")
    sender = WebhookSender("http://wxd.example/wechat", VECTOR4_CREDS, "compat")
    request = sender.build(sender.template_finished_fields("oABCD1234", 3487542469355618313,
                                                           "failed: system failed"))
    outer = parse_xml(request.body)
    assert outer["Event"] == "TEMPLATESENDJOBFINISH" and outer["MsgID"] == "3487542469355618313"
    assert "Encrypt" in outer
    # wechatpy's implementation (not wxd's) must accept the signature and decrypt the body.
    crypto = wechatpy_crypto.WeChatCrypto("testtoken", VECTOR4_CREDS.encoding_aes_key,
                                          VECTOR4_CREDS.oa_appid)
    inner = crypto.decrypt_message(request.body.decode(), request.query["msg_signature"],
                                   request.query["timestamp"], request.query["nonce"])
    assert inner == request.xml
    assert parse_xml(inner)["Status"] == "failed: system failed"


class _Receiver(tornado.web.RequestHandler):
    """A tiny integrator webhook: checks the signatures, decrypts, records, answers success."""

    def initialize(self, box: dict[str, Any]) -> None:
        self.box = box
        self.gone = asyncio.Event()

    def on_connection_close(self) -> None:
        self.gone.set()

    async def post(self) -> None:
        box = self.box
        box["attempts"] = box.get("attempts", 0) + 1
        box["bodies"] = [*box.get("bodies", []), self.request.body]
        if box["attempts"] <= box.get("stall", 0):
            # No answer until WeChat's side gives up (its timeout), like a slow integrator.
            await asyncio.wait_for(self.gone.wait(), 10)
            self.detach().close()
            return
        creds: Credentials = box["creds"]
        query = {k: self.get_query_argument(k) for k in self.request.query_arguments}
        assert query["signature"] == sign(creds.webhook_token, query["timestamp"], query["nonce"])
        outer = parse_xml(self.request.body)
        crypto = MessageCrypto(creds.webhook_token, creds.encoding_aes_key, creds.oa_appid)
        assert crypto.check_msg_signature(
            query["msg_signature"], query["timestamp"], query["nonce"], outer["Encrypt"]
        )
        assert set(outer) == {"ToUserName", "Encrypt"}  # safe mode: nothing in plaintext
        box.setdefault("events", []).append((query["openid"], parse_xml(crypto.decrypt(outer["Encrypt"]))))
        self.write("success")
        box["event"].set()


class WebhookTests(SandboxTestCase):
    def start_receiver(self, **box: Any) -> tuple[str, dict[str, Any]]:
        box.update(creds=self.fake.credentials, event=asyncio.Event())
        app = tornado.web.Application([(r"/wechat", _Receiver, {"box": box})])
        sock, port = bind_unused_port()
        server = tornado.httpserver.HTTPServer(app)
        server.add_sockets([sock])
        self.receiver = server
        return f"http://127.0.0.1:{port}/wechat", box

    def tearDown(self) -> None:
        self.receiver.stop()
        self.io_loop.run_sync(self.receiver.close_all_connections)
        super().tearDown()

    @gen_test
    async def test_delivery_report_in_safe_mode(self) -> None:
        url, box = self.start_receiver()
        self.fake.configure_webhook(
            url, mode="safe", report_delay_s=0.05,
            report_status=lambda p: "failed:user block" if p.index % 2 else "success",
        )
        follower = next(p for p in self.fake.people if p.follows and p.index % 2)
        token = (await self.http_client.fetch(self.get_url(
            "/cgi-bin/token?grant_type=client_credential&appid="
            f"{self.fake.credentials.oa_appid}&secret={self.fake.credentials.oa_secret}"))).body
        access_token = json.loads(token)["access_token"]
        body = json.dumps({"touser": follower.oa_openid, "template_id": ORDER_TEMPLATE_ID,
                           "data": GOOD_ORDER}, ensure_ascii=False)
        answer = await self.http_client.fetch(
            self.get_url(f"{SEND}?access_token={access_token}"), method="POST", body=body)
        msgid = json.loads(answer.body)["msgid"]
        await asyncio.wait_for(box["event"].wait(), 5)
        openid, event = box["events"][0]
        assert openid == follower.oa_openid
        assert event["Event"] == "TEMPLATESENDJOBFINISH"
        assert event["MsgID"] == str(msgid)
        assert event["Status"] == "failed:user block"
        assert event["ToUserName"] == self.fake.credentials.oa_original_id
        assert event["FromUserName"] == follower.oa_openid

    @gen_test
    async def test_sender_retries_when_no_answer(self) -> None:
        url, box = self.start_receiver(stall=2)
        sender = WebhookSender(url, self.fake.credentials, "safe", retries=True, timeout_s=0.2)
        try:
            delivery = await sender.subscribe(self.fake.people[0].oa_openid, scene="bind_ab12")
        finally:
            sender.close()
        assert (delivery.status, delivery.body, delivery.attempts) == (200, b"success", 3)
        assert len(set(box["bodies"])) == 1  # every retry carries the same body
        event = box["events"][0][1]
        assert event["EventKey"] == "qrscene_bind_ab12" and event["Ticket"]

    @gen_test
    async def test_sender_without_retries_gives_up(self) -> None:
        url, _box = self.start_receiver(stall=5)
        sender = WebhookSender(url, self.fake.credentials, "safe", timeout_s=0.2)
        try:
            delivery = await sender.scan(self.fake.people[0].oa_openid, "42")
        finally:
            sender.close()
        assert delivery.status is None and delivery.attempts == 1 and delivery.error

    @gen_test
    async def test_control_api(self) -> None:
        url, box = self.start_receiver()

        async def control(path: str, body: Any = None) -> Any:
            response = await self.http_client.fetch(
                self.get_url("/_sandbox/" + path), method="GET" if body is None else "POST",
                body=None if body is None else json.dumps(body), raise_error=False)
            return response.code, json.loads(response.body)

        code, creds = await control("credentials")
        assert code == 200 and creds["oa_appid"] == self.fake.credentials.oa_appid
        assert creds["api_base"] == self.get_url("")
        assert (await control("webhook", {"url": url, "mode": "safe"}))[0] == 200
        stranger = next(p for p in self.fake.people if not p.follows)
        code, followed = await control("follow", {"index": stranger.index, "qr_scene_str": "s1"})
        assert code == 200 and followed["person"]["follows"] and stranger.follows
        assert followed["webhook"]["status"] == 200
        assert box["events"][0][1]["EventKey"] == "qrscene_s1"
        assert stranger.subscribe_scene == "ADD_SCENE_QR_CODE" and stranger.qr_scene_str == "s1"
        code, login = await control("login_code", {"mp_openid": stranger.mp_openid})
        assert code == 200 and self.fake.exchange_login_code(login["code"]) is stranger
        code, _ = await control("faults", {"path": "/cgi-bin/token", "kind": "-1", "times": 2})
        assert code == 200 and self.fake.next_fault("/cgi-bin/token") == "-1"
        assert (await control("faults", {"path": "/x", "kind": "boom"}))[0] == 400
        code, person = await control(f"people?oa_openid={stranger.oa_openid}")
        assert person["index"] == stranger.index
        assert (await control("people/99999"))[0] == 404
        code, calls = await control("calls?path=/cgi-bin/token")
        assert calls["count"] == 0
        code, inbox = await control(f"inbox/{stranger.oa_openid}")
        assert inbox == {"messages": []}

    async def control(self, path: str, body: Any = None) -> tuple[int, Any]:
        response = await self.http_client.fetch(
            self.get_url("/_sandbox/" + path), method="GET" if body is None else "POST",
            body=None if body is None else json.dumps(body), raise_error=False)
        return response.code, json.loads(response.body)

    async def api(self, method: str, path: str, query: dict[str, str], body: Any = None) -> Any:
        response = await self.http_client.fetch(
            self.get_url(f"{path}?{urllib.parse.urlencode(query)}"), method=method,
            body=None if body is None else json.dumps(body, ensure_ascii=False))
        return json.loads(response.body)

    async def oa_token(self) -> str:
        creds = self.fake.credentials
        answer = await self.api("GET", "/cgi-bin/token", {
            "grant_type": CC, "appid": creds.oa_appid, "secret": creds.oa_secret})
        token: str = answer["access_token"]
        return token

    async def wait_for_events(self, box: dict[str, Any], count: int) -> None:
        await eventually(lambda: len(box.get("events", [])), f"{count} events at the webhook",
                         until=lambda n: n >= count)

    @gen_test
    async def test_mangled_delivery_reports(self) -> None:
        url, box = self.start_receiver()
        self.fake.configure_webhook(url, mode="safe")
        for mode in ("msgid0", "no_msgid", "lost"):
            self.fake.mangle_reports(mode, times=1)
        token = await self.oa_token()
        followers = [p for p in self.fake.people if p.follows][:4]
        msgids = []
        for number, person in enumerate(followers):
            answer = await self.api("POST", SEND, {"access_token": token}, {
                "touser": person.oa_openid, "template_id": ORDER_TEMPLATE_ID,
                "client_msg_id": f"job-{number}", "data": GOOD_ORDER})
            msgids.append(answer["msgid"])
        await self.wait_for_events(box, 3)
        await asyncio.sleep(0.05)
        events = dict(box["events"])
        assert len(box["events"]) == 3
        zero, bare, lost, normal = (p.oa_openid for p in followers)
        assert events[zero]["MsgID"] == "0" and events[zero]["Status"] == "success"
        assert "MsgID" not in events[bare] and events[bare]["Event"] == "TEMPLATESENDJOBFINISH"
        assert lost not in events  # the report never came
        assert events[normal]["MsgID"] == str(msgids[3])
        faults = [c.fault for c in self.fake.calls if c.path == SEND]
        assert faults == ["report:msgid0", "report:no_msgid", "report:lost", None]
        assert all(len(self.fake.inbox(p.oa_openid)) == 1 for p in followers)

    @gen_test
    async def test_control_events_reports_without_msgid_and_msgid_collisions(self) -> None:
        url, box = self.start_receiver()
        assert (await self.control("webhook", {"url": url, "mode": "safe"}))[0] == 200
        one, two = self.fake.people[:2]
        report = {"index": one.index, "event": "TEMPLATESENDJOBFINISH"}
        code, zero = await self.control("events", {**report, "msgid": 0,
                                                   "status": "failed:user block"})
        assert code == 200 and zero["webhook"]["status"] == 200
        assert (await self.control("events", {**report, "msgid": None}))[0] == 200
        assert (await self.control("events", report))[0] == 400
        assert (await self.control("events", {**report, "msgid": "7"}))[0] == 400
        text = {"event": "text", "content": "hi", "msg_id": "last"}
        assert (await self.control("events", {**text, "index": one.index}))[0] == 400
        del text["msg_id"]
        assert (await self.control("events", {**text, "index": one.index}))[0] == 200
        code, _ = await self.control("events", {**text, "index": two.index, "msg_id": "last"})
        assert code == 200
        await self.wait_for_events(box, 4)
        (_, first_report), (_, bare_report), (_, first), (_, second) = box["events"]
        assert first_report["MsgID"] == "0" and first_report["Status"] == "failed:user block"
        assert "MsgID" not in bare_report
        # Two different users, one MsgId: a collision a MsgId-only dedupe would get wrong.
        assert first["MsgId"] == second["MsgId"]
        assert (first["FromUserName"], second["FromUserName"]) == (one.oa_openid, two.oa_openid)

    @gen_test
    async def test_silent_unfollow_then_43004(self) -> None:
        url, box = self.start_receiver()
        self.fake.configure_webhook(url, mode="safe")
        person = next(p for p in self.fake.people if p.follows)
        code, answer = await self.control("unfollow", {"index": person.index, "notify": False})
        assert code == 200 and answer["webhook"] is None and not answer["person"]["follows"]
        token = await self.oa_token()
        sent = await self.api("POST", SEND, {"access_token": token}, {
            "touser": person.oa_openid, "template_id": ORDER_TEMPLATE_ID, "data": GOOD_ORDER})
        assert sent["errcode"] == 43004
        await asyncio.sleep(0.05)
        assert "events" not in box  # no unsubscribe event ever reached the webhook
        assert self.fake.inbox(person.oa_openid) == []


# Thread-hosted sandbox, the CLI runner, and the 100k listing figure ------------------------------------


def test_sandbox_thread_fixture(sandbox: SandboxThread) -> None:  # noqa: F811
    creds = sandbox.fake.credentials
    url = (f"{sandbox.base_url}/cgi-bin/token?grant_type=client_credential"
           f"&appid={creds.oa_appid}&secret={creds.oa_secret}")
    with urllib.request.urlopen(url, timeout=5) as response:
        assert json.load(response)["expires_in"] == 7200
    person = sandbox.fake.person(1)
    code = sandbox.call(lambda: sandbox.fake.issue_login_code(person))
    assert isinstance(code, str) and len(code) == 32

    async def sleepy() -> int:
        await asyncio.sleep(0.01)
        return 7

    assert sandbox.call(sleepy) == 7
    assert sandbox.fake.count_calls("/cgi-bin/token") == 1


def test_sandbox_thread_stops_cleanly() -> None:
    thread = SandboxThread(FakeWeChat(users=5)).start()
    port = thread.port
    thread.fake.script_fault("/cgi-bin/user/get", "hang")
    request = urllib.request.Request(f"{thread.base_url}/cgi-bin/user/get")
    started = time.monotonic()

    def hanging_request() -> None:
        try:
            urllib.request.urlopen(request, timeout=10).read()
        except Exception:  # the connection is dropped on stop
            pass

    client = threading.Thread(target=hanging_request)
    client.start()
    while not thread.fake.count_calls("/cgi-bin/user/get"):
        time.sleep(0.01)
    thread.stop()
    thread.stop()  # idempotent
    client.join(5)
    assert not client.is_alive() and time.monotonic() - started < 5
    with pytest.raises(RuntimeError):
        thread.call(lambda: None)
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/cgi-bin/token", timeout=1)


def test_runner_prints_config_and_exits_0_on_sigterm() -> None:
    script = (
        "import argparse, sys\n"
        "from wxd.sandbox import add_arguments, run\n"
        "p = argparse.ArgumentParser(); add_arguments(p)\n"
        "sys.exit(run(p.parse_args(sys.argv[1:])))\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", script, "--port", "0", "--users", "50", "--latency-ms", "1-2"],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert proc.stdout is not None
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("api_base = "):
                break
        text = "".join(lines)
        creds = Credentials()
        for value in (creds.oa_appid, creds.oa_secret, creds.mp_appid, creds.mp_secret,
                      creds.webhook_token, creds.encoding_aes_key, "[wechat]"):
            assert value in text
        base = lines[-1].split(" = ", 1)[1].strip()
        with urllib.request.urlopen(f"{base}/_sandbox/stats", timeout=5) as response:
            assert json.load(response)["people"] == 50
        proc.terminate()
        assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


class ListingSpeedTest(SandboxTestCase):
    users: ClassVar[int] = 100_000
    fake_options: ClassVar[dict[str, Any]] = {"follow_ratio": 1.0}

    @gen_test(timeout=120)
    async def test_list_100k_followers_over_http(self) -> None:
        # One keep-alive HTTP/1.1 connection, as a pooled client would use: the figure is the
        # sandbox's, not the cost of a new connection per request in tornado's simple client.
        reader, writer = await asyncio.open_connection("127.0.0.1", self.get_http_port())

        async def call(method: str, target: str, body: bytes = b"") -> Any:
            writer.write(f"{method} {target} HTTP/1.1\r\nHost: sandbox\r\n"
                         f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
            head = await reader.readuntil(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200 ")
            length = re.search(rb"(?i)\r\ncontent-length: *([0-9]+)", head)
            assert length is not None
            return json.loads(await reader.readexactly(int(length.group(1))))

        try:
            creds = self.fake.credentials
            token = (await call("GET", "/cgi-bin/token?grant_type=client_credential"
                                f"&appid={creds.oa_appid}&secret={creds.oa_secret}"))["access_token"]
            started = time.perf_counter()
            openids: list[str] = []
            next_openid = ""
            while True:
                page = await call(
                    "GET", f"/cgi-bin/user/get?access_token={token}&next_openid={next_openid}")
                if page["count"] == 0:
                    break
                openids.extend(page["data"]["openid"])
                next_openid = page["next_openid"]
            paged = time.perf_counter()
            unionids = 0
            for start in range(0, len(openids), 100):
                chunk = [{"openid": o} for o in openids[start : start + 100]]
                answer = await call("POST", f"/cgi-bin/user/info/batchget?access_token={token}",
                                    json.dumps({"user_list": chunk}).encode())
                unionids += sum("unionid" in u for u in answer["user_info_list"])
            done = time.perf_counter()
        finally:
            writer.close()
            await writer.wait_closed()
        assert len(openids) == 100_000 and unionids == 100_000
        print(f"\nsandbox listing of 100,000 followers over HTTP: user/get {paged - started:.2f} s "
              f"(10 pages), batchget {done - paged:.2f} s (1,000 calls), "
              f"total {done - started:.2f} s")


def test_access_log_never_shows_query_secrets(caplog: pytest.LogCaptureFixture) -> None:
    fake = FakeWeChat(users=5, seed=1)
    secret = fake.credentials.oa_secret
    with caplog.at_level(logging.DEBUG), SandboxThread(fake) as thread:
        url = (f"{thread.base_url}/cgi-bin/token?grant_type=client_credential"
               f"&appid={fake.credentials.oa_appid}&secret={secret}")
        with urllib.request.urlopen(url, timeout=5) as response:
            token = json.loads(response.read())["access_token"]
        with urllib.request.urlopen(f"{thread.base_url}/cgi-bin/user/get?access_token={token}",
                                    timeout=5) as response:
            response.read()
    text = "\n".join(record.getMessage() for record in caplog.records)
    assert "/cgi-bin/token" in text  # the request was logged ...
    assert secret not in text and token not in text  # ... without its query
