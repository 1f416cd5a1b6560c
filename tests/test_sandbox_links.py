"""Linking without unionid in the emulator and the protocol layer: qrcode/create (four action
names, limits, expiry), showqrcode, scans, the authorize page, /sns/oauth2/access_token (single
use, errors, is_snapshotuser), custom/send windows; wxd.wechat's client calls and URL vectors."""

from __future__ import annotations

import json
import urllib.parse
from typing import Any, ClassVar

import pytest
from tornado.testing import gen_test

from tests.sandbox_fixture import ClientCase
from wxd.errors import WeChatAPIError
from wxd.sandbox import FakeWeChat
from wxd.sandbox.qrcodes import image_jpeg
from wxd.wechat.oa import OfficialAccountAPI, WebAuthAPI
from wxd.wechat.weburls import (
    AUTHORIZE_BASE,
    REAL_API_BASE,
    SHOWQRCODE_BASE,
    authorize_url,
    showqrcode_url,
    web_bases,
)

# The official sample ticket (Generating_a_Parametric_QR_Code) and its showqrcode URL.
SAMPLE_TICKET = ("gQH47joAAAAAAAAAASxodHRwOi8vd2VpeGluLnFxLmNvbS9xL2taZ2Z3TVRtNzJXV1Brb3ZhYmJJAA"
                 "IEZ23sUwMEmm3sUw==")


def test_showqrcode_url_encodes_the_ticket() -> None:
    assert showqrcode_url(SAMPLE_TICKET) == (
        "https://mp.weixin.qq.com/cgi-bin/showqrcode?ticket=gQH47joAAAAAAAAAASxodHRwOi8vd2VpeGl"
        "uLnFxLmNvbS9xL2taZ2Z3TVRtNzJXV1Brb3ZhYmJJAAIEZ23sUwMEmm3sUw%3D%3D")
    assert showqrcode_url("a+b/c=", "http://127.0.0.1:9/") == \
        "http://127.0.0.1:9/cgi-bin/showqrcode?ticket=a%2Bb%2Fc%3D"


def test_authorize_url_has_wechats_parameter_order_and_fragment() -> None:
    url = authorize_url("wx520c15f417810387", "https://h5.example.com/wx/oauth/cb?from=mp",
                        "bind7f3a9c21d4")
    assert url == (
        "https://open.weixin.qq.com/connect/oauth2/authorize?appid=wx520c15f417810387"
        "&redirect_uri=https%3A%2F%2Fh5.example.com%2Fwx%2Foauth%2Fcb%3Ffrom%3Dmp"
        "&response_type=code&scope=snsapi_base&state=bind7f3a9c21d4#wechat_redirect")
    for state in ("", "a" * 129, "bad state", "a-b", "ü"):
        with pytest.raises(ValueError):
            authorize_url("wx1", "https://x", state)
    assert authorize_url("wx1", "https://x", "a" * 128).endswith("a" * 128 + "#wechat_redirect")


def test_web_bases() -> None:
    assert web_bases(REAL_API_BASE + "/") == web_bases(REAL_API_BASE)
    assert (web_bases(REAL_API_BASE).mp, web_bases(REAL_API_BASE).open) == \
        (SHOWQRCODE_BASE, AUTHORIZE_BASE)
    local = web_bases("http://127.0.0.1:8090/")
    assert (local.mp, local.open) == ("http://127.0.0.1:8090", "http://127.0.0.1:8090")


def test_the_image_is_a_baseline_jpeg() -> None:
    data = image_jpeg()
    assert data[:2] == b"\xff\xd8" and data[-2:] == b"\xff\xd9" and b"\xff\xc0" in data


def test_a_population_without_unionid() -> None:
    fake = FakeWeChat(users=50, seed=1, unionid_ratio=0.0)
    assert all(p.unionid is None for p in fake.people)


class LinksSandboxCase(ClientCase):
    users = 20
    fake_options: ClassVar[dict[str, Any]] = {"follow_ratio": 0.5}

    def setUp(self) -> None:
        super().setUp()
        self.oa = OfficialAccountAPI(self.client, self.oa_source())
        self.web = WebAuthAPI(self.client, self.creds.oa_appid, self.creds.oa_secret)

    def follower(self) -> Any:
        return next(p for p in self.fake.people if p.follows)

    def stranger(self) -> Any:
        return next(p for p in self.fake.people if not p.follows)

    def control(self, path: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        response = self.fetch(path, method="POST", body=json.dumps(body))
        return response.code, json.loads(response.body)

    async def acontrol(self, path: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        response = await self.http_client.fetch(self.get_url(path), method="POST",
                                                body=json.dumps(body), raise_error=False)
        return response.code, json.loads(response.body)


class QrCodeTest(LinksSandboxCase):
    def create(self, body: dict[str, Any]) -> dict[str, Any]:
        token = self.token()
        response = self.call_api("POST", "/cgi-bin/qrcode/create", {"access_token": token}, body)
        assert response.code == 200
        value: dict[str, Any] = json.loads(response.body)
        return value

    def test_the_four_action_names_and_their_limits(self) -> None:
        temp = self.create({"expire_seconds": 604800, "action_name": "QR_SCENE",
                            "action_info": {"scene": {"scene_id": 123}}})
        assert set(temp) == {"ticket", "expire_seconds", "url"} and temp["expire_seconds"] == 604800
        text = self.create({"expire_seconds": 300, "action_name": "QR_STR_SCENE",
                            "action_info": {"scene": {"scene_str": "bind7f3a9c21d4"}}})
        assert text["expire_seconds"] == 300 and text["url"].startswith("http://weixin.qq.com/q/")
        permanent = self.create({"action_name": "QR_LIMIT_SCENE",
                                 "action_info": {"scene": {"scene_id": 100000}}})
        assert set(permanent) == {"ticket", "url"}
        named = self.create({"action_name": "QR_LIMIT_STR_SCENE",
                             "action_info": {"scene": {"scene_str": "x" * 64}}})
        assert set(named) == {"ticket", "url"}
        default = self.create({"action_name": "QR_STR_SCENE",
                               "action_info": {"scene": {"scene_str": "s"}}})
        assert default["expire_seconds"] == 60  # WeChat's default when omitted
        capped = self.create({"expire_seconds": 9_999_999, "action_name": "QR_SCENE",
                              "action_info": {"scene": {"scene_id": 1}}})
        assert capped["expire_seconds"] == 2_592_000
        for bad in ({"action_name": "QR_NOPE", "action_info": {"scene": {"scene_id": 1}}},
                    {"action_name": "QR_LIMIT_SCENE", "action_info": {"scene": {"scene_id": 100001}}},
                    {"action_name": "QR_SCENE", "action_info": {"scene": {"scene_id": 0}}},
                    {"action_name": "QR_STR_SCENE", "action_info": {"scene": {"scene_str": ""}}},
                    {"action_name": "QR_STR_SCENE", "action_info": {"scene": {"scene_str": "x" * 65}}},
                    {"action_name": "QR_SCENE"}):
            assert self.create(bad)["errcode"] == 40053, bad
        assert self.create({"action_name": "QR_SCENE", "expire_seconds": "60",
                            "action_info": {"scene": {"scene_id": 1}}})["errcode"] == 47001
        # The missing `scene` wrapper: accepted, but every event carries scene 0.
        wrapperless = self.create({"action_name": "QR_SCENE", "action_info": {"scene_id": 123}})
        code = self.fake.qrcodes.find(wrapperless["ticket"])
        assert code is not None and code.scene == "0"
        mp = self.call_api("POST", "/cgi-bin/qrcode/create", {"access_token": self.token("mp")},
                           {"action_name": "QR_SCENE", "action_info": {"scene": {"scene_id": 1}}})
        assert json.loads(mp.body)["errcode"] == 48001

    def test_showqrcode_serves_an_image_until_the_code_expires(self) -> None:
        answer = self.create({"expire_seconds": 60, "action_name": "QR_STR_SCENE",
                              "action_info": {"scene": {"scene_str": "abc"}}})
        url = showqrcode_url(answer["ticket"], "")
        response = self.fetch(url)
        assert response.code == 200 and response.body == image_jpeg()
        assert response.headers["Content-Type"] == "image/jpg"
        assert response.headers["Cache-Control"] == "max-age=604800"
        # The ticket has +, / or = often enough: unencoded it would not be found.
        assert self.fetch("/cgi-bin/showqrcode?ticket=nope").code == 404
        self.clock.advance(60)
        assert self.fetch(url).code == 404

    def test_scan_by_a_new_follower_a_follower_and_after_expiry(self) -> None:
        answer = self.create({"expire_seconds": 120, "action_name": "QR_STR_SCENE",
                              "action_info": {"scene": {"scene_str": "wxdlscene"}}})
        ticket = answer["ticket"]
        newcomer, follower = self.stranger(), self.follower()
        status, result = self.control("/_sandbox/scan", {"index": newcomer.index, "ticket": ticket})
        assert status == 200 and (result["event"], result["scene"]) == ("subscribe", "wxdlscene")
        assert result["webhook"] is None  # no webhook configured: the state changes only
        assert newcomer.follows and newcomer.subscribe_scene == "ADD_SCENE_QR_CODE"
        assert newcomer.qr_scene_str == "wxdlscene"
        status, result = self.control("/_sandbox/scan", {"index": follower.index, "ticket": ticket})
        assert (result["event"], result["scene"]) == ("SCAN", "wxdlscene")
        self.clock.advance(120)
        status, result = self.control("/_sandbox/scan", {"index": follower.index, "ticket": ticket})
        assert (status, result["event"]) == (200, None)  # an expired code: no event
        late = self.stranger()
        status, result = self.control("/_sandbox/scan", {"index": late.index, "ticket": ticket})
        assert (result["event"], result["scene"]) == ("subscribe", None)  # a plain follow
        assert late.follows and late.subscribe_scene == "ADD_SCENE_SEARCH"
        assert self.control("/_sandbox/scan", {"index": 0, "ticket": "nope"})[0] == 404
        listed = json.loads(self.fetch("/_sandbox/qrcodes").body)["qrcodes"]
        assert [c["scene"] for c in listed] == ["wxdlscene"]

    @gen_test
    async def test_oa_api_create_qrcode(self) -> None:
        answer = await self.oa.create_qrcode("wxdlabc", 600)
        assert answer["expire_seconds"] == 600
        call = next(c for c in self.fake.calls if c.path == "/cgi-bin/qrcode/create")
        assert call.body == {"expire_seconds": 600, "action_name": "QR_STR_SCENE",
                             "action_info": {"scene": {"scene_str": "wxdlabc"}}}
        with pytest.raises(ValueError):
            await self.oa.create_qrcode("x" * 65, 600)
        with pytest.raises(ValueError):
            await self.oa.create_qrcode("x", 2_592_001)


class CustomSendTest(LinksSandboxCase):
    def card(self, openid: str) -> dict[str, Any]:
        return {"touser": openid, "msgtype": "miniprogrampage",
                "miniprogrampage": {"title": "t", "appid": self.creds.mp_appid,
                                    "pagepath": "pages/index", "thumb_media_id": "MEDIA"}}

    @gen_test
    async def test_three_messages_within_a_minute_after_a_follow(self) -> None:
        person = self.stranger()
        self.fake.follow(person)
        for _ in range(3):
            await self.oa.send_custom(self.card(person.oa_openid))
        with pytest.raises(WeChatAPIError) as info:
            await self.oa.send_custom(self.card(person.oa_openid))
        assert info.value.errcode == 45047
        assert [m["msgtype"] for m in self.fake.kefu.messages(person.oa_openid)] == \
            ["miniprogrampage"] * 3
        call = next(c for c in self.fake.calls if c.path == "/cgi-bin/message/custom/send")
        assert call.body == self.card(person.oa_openid)

    @gen_test
    async def test_outside_the_window_and_bad_cards(self) -> None:
        follower = self.follower()  # followed long ago: no window open
        with pytest.raises(WeChatAPIError) as info:
            await self.oa.send_custom(self.card(follower.oa_openid))
        assert info.value.errcode == 45015
        person = self.stranger()
        self.fake.follow(person)
        bad_appid = self.card(person.oa_openid)
        bad_appid["miniprogrampage"]["appid"] = "wx0000000000000000"
        no_thumb = self.card(person.oa_openid)
        no_thumb["miniprogrampage"]["thumb_media_id"] = ""
        for body, errcode in ((bad_appid, 40013), (no_thumb, 40007),
                              ({"touser": "nobody", "msgtype": "text", "text": {"content": "x"}},
                               40003),
                              ({"touser": person.oa_openid, "msgtype": "what"}, 47001)):
            with pytest.raises(WeChatAPIError) as info:
                await self.oa.send_custom(body)
            assert info.value.errcode == errcode, body
        self.clock.advance(60)
        with pytest.raises(WeChatAPIError) as info:
            await self.oa.send_custom({"touser": person.oa_openid, "msgtype": "text",
                                       "text": {"content": "hi"}})
        assert info.value.errcode == 45015


class WebAuthTest(LinksSandboxCase):
    def authorize(self, person: Any, url: str, **flags: bool) -> tuple[int, dict[str, Any]]:
        return self.control("/_sandbox/oauth/authorize",
                            {"index": person.index, "url": url, **flags})

    async def aauthorize(self, person: Any, url: str, **flags: bool) -> str:
        status, answer = await self.acontrol("/_sandbox/oauth/authorize",
                                             {"index": person.index, "url": url, **flags})
        assert status == 200, answer
        location: str = answer["location"]
        return location

    def code_of(self, location: str) -> dict[str, str]:
        return dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(location).query))

    def good_url(self, state: str = "abc123") -> str:
        return authorize_url(self.creds.oa_appid, "https://h5.example.com/oauth/callback?x=1",
                             state, base="")

    @gen_test
    async def test_code_is_single_use_and_gives_the_oa_openid(self) -> None:
        person = self.stranger()  # web authorization works for non-followers too
        location = await self.aauthorize(person, self.good_url())
        assert location.startswith("https://h5.example.com/oauth/callback?x=1&code=")
        query = self.code_of(location)
        assert query["state"] == "abc123"
        result = await self.web.exchange_code(query["code"])
        assert (result["openid"], result["scope"]) == (person.oa_openid, "snsapi_base")
        assert "unionid" not in result and "is_snapshotuser" not in result
        with pytest.raises(WeChatAPIError) as info:
            await self.web.exchange_code(query["code"])
        assert info.value.errcode == 40163
        for code, errcode in (("unknown", 40029), ("", 41008)):
            with pytest.raises(WeChatAPIError) as info:
                await self.web.exchange_code(code)
            assert info.value.errcode == errcode
        call = next(c for c in self.fake.calls if c.path == "/sns/oauth2/access_token")
        assert call.query["secret"] == "<redacted>" and call.query["grant_type"] == \
            "authorization_code"

    @gen_test
    async def test_expiry_snapshot_decline_and_wrong_appid(self) -> None:
        person = self.follower()
        code = self.code_of(await self.aauthorize(person, self.good_url()))["code"]
        self.clock.advance(300)
        with pytest.raises(WeChatAPIError) as info:
            await self.web.exchange_code(code)
        assert info.value.errcode == 42003
        code = self.code_of(await self.aauthorize(person, self.good_url(), snapshot=True))["code"]
        result = await self.web.exchange_code(code)
        assert result["is_snapshotuser"] == 1 and result["openid"] != person.oa_openid
        declined = await self.aauthorize(person, self.good_url("s1"), decline=True)
        assert self.code_of(declined) == {"x": "1", "state": "s1"}
        mp_web = WebAuthAPI(self.client, self.creds.mp_appid, self.creds.mp_secret)
        code = self.code_of(await self.aauthorize(person, self.good_url()))["code"]
        with pytest.raises(WeChatAPIError) as info:
            await mp_web.exchange_code(code)  # a code belongs to the appid that asked for it
        assert info.value.errcode == 40029
        bad_secret = WebAuthAPI(self.client, self.creds.oa_appid, "0" * 32)
        with pytest.raises(WeChatAPIError) as info:
            await bad_secret.exchange_code(code)
        assert info.value.errcode == 40125
        assert "0" * 32 not in str(info.value)

    def test_the_authorize_page_checks_the_url(self) -> None:
        person = self.follower()
        appid = self.creds.oa_appid
        cb = urllib.parse.quote("https://h5.example.com/cb", safe="")
        base = "/connect/oauth2/authorize?"
        cases = [
            (f"{base}appid={appid}&redirect_uri={cb}&response_type=code&scope=snsapi_base"
             "&state=s", None),  # no #wechat_redirect
            (f"{base}redirect_uri={cb}&appid={appid}&response_type=code&scope=snsapi_base"
             "&state=s#wechat_redirect", None),  # out of order
            (f"{base}appid=&redirect_uri={cb}&response_type=code&scope=snsapi_base"
             "#wechat_redirect", 10012),
            (f"{base}appid={self.creds.mp_appid}&redirect_uri={cb}&response_type=code"
             "&scope=snsapi_base#wechat_redirect", 10005),
            (f"{base}appid={appid}&redirect_uri=&response_type=code&scope=snsapi_base"
             "#wechat_redirect", 10011),
            (f"{base}appid={appid}&redirect_uri={cb}&response_type=code&scope="
             "#wechat_redirect", 10010),
            (f"{base}appid={appid}&redirect_uri={cb}&response_type=code&scope=snsapi_login"
             "#wechat_redirect", 10005),
            (f"{base}appid={appid}&redirect_uri={cb}&response_type=code&scope=snsapi_base"
             f"&state={'a' * 129}#wechat_redirect", None),
        ]
        for url, errcode in cases:
            status, answer = self.authorize(person, url)
            assert status == 400 and answer["errcode"] == errcode, (url, answer)
        self.control("/_sandbox/oauth/domain", {"domain": "other.example.com"})
        status, answer = self.authorize(person, self.good_url())
        assert (status, answer["errcode"]) == (400, 10003)

    def test_a_browser_get_of_the_authorize_page(self) -> None:
        person = self.stranger()
        url = self.good_url().partition("#")[0]  # browsers never send the fragment
        response = self.fetch(url, follow_redirects=False,
                              headers={"X-Sandbox-Person": person.mp_openid})
        assert response.code == 302
        assert response.headers["Location"].startswith("https://h5.example.com/oauth/callback")
        assert self.fetch(url, follow_redirects=False).code == 400  # who is browsing?
