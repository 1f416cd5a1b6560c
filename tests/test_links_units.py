"""Pure pieces of linking without unionid: the public base URL, the return_url allow-list,
the customer-service card's window, the scene format, and the config keys."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any, cast

import pytest

from tests.helpers import START, FakeClock, config_text
from wxd import config
from wxd.errors import ConfigError, StorageError
from wxd.oauth_links import public_base, return_url_allowed
from wxd.qrlinks import CARD_WINDOW_S, CardSettings, QrLinks, is_our_scene
from wxd.store.db import Database
from wxd.webhook import Rejected, Webhook
from wxd.wechat.messages import parse_message, parse_xml

HOSTS = ("shop.example.com", "h5.example.com:8443", "localhost")


@pytest.mark.parametrize(("public_url", "path", "base"), [
    ("https://wx.example.com", "/wechat", "https://wx.example.com"),
    ("https://wx.example.com/", "/wechat", "https://wx.example.com"),
    ("https://wx.example.com/wechat", "/wechat", "https://wx.example.com"),
    ("https://wx.example.com/wechat/", "/wechat", "https://wx.example.com"),
    ("https://wx.example.com/api", "/wechat", "https://wx.example.com/api"),
    ("https://wx.example.com/api/wechat", "/wechat", "https://wx.example.com/api/wechat"),
    ("http://127.0.0.1:8080", "/wechat", "http://127.0.0.1:8080"),
])
def test_public_base(public_url: str, path: str, base: str) -> None:
    assert public_base(public_url, path) == base


@pytest.mark.parametrize("url", [
    "https://shop.example.com/", "https://shop.example.com/a/b?c=d#e", "https://SHOP.example.com",
    "https://h5.example.com:8443/x", "http://localhost/cb", "https://localhost:3000/",
])
def test_allowed_return_urls(url: str) -> None:
    assert return_url_allowed(url, HOSTS)


@pytest.mark.parametrize("url", [
    "https://evil.example.com/", "https://shop.example.com.evil.com/", "https://evil.com#.shop.example.com",
    "https://evil.com@shop.example.com/", "https://shop.example.com@evil.com/",
    "https://user:pw@shop.example.com/", "//shop.example.com/", "shop.example.com/",
    "javascript:alert(1)", "data:text/html,x", "http://shop.example.com/",
    "https://shop.example.com\\@evil.com/", "https:\\\\evil.com", "https:/shop.example.com/",
    "https://h5.example.com/", "https://h5.example.com:9000/", "https://shop.example.com:99999/",
    "https://shop.example.com\t/", "https://shop.example.com /", "https://shop.example.com/\n",
    "https://shop.example.com/\x00", "https://shöp.example.com/", "https://shop.example.com/é",
    "https://[::1]/", "", "https://", "https://shop.example.com/" + "a" * 2100,
])
def test_refused_return_urls(url: str) -> None:
    assert not return_url_allowed(url, HOSTS)


def test_no_hosts_no_return_url() -> None:
    assert not return_url_allowed("https://shop.example.com/", ())


def test_scene_format() -> None:
    assert is_our_scene("wxdl" + "aZ09" * 7)
    for scene in (None, "", "wxdl", "wxdl" + "a" * 27, "wxdl" + "a" * 29, "wxdl" + "-" * 28,
                  "WXDL" + "a" * 28, "campaign_7"):
        assert not is_our_scene(scene)


class RecordingAPI:
    def __init__(self) -> None:
        self.sent: list[Mapping[str, Any]] = []

    async def create_qrcode(self, scene_str: str, expire_seconds: int) -> dict[str, Any]:
        raise AssertionError("not used")

    async def send_custom(self, body: Mapping[str, Any]) -> None:
        self.sent.append(body)


def test_the_card_is_sent_only_within_wechats_window() -> None:
    clock = FakeClock(START)
    api = RecordingAPI()
    card = CardSettings("MEDIA", "pages/a", "t", "wx68dbf73d03d3a510")
    links = QrLinks(cast(Database, None), api, card=card, clock=clock)
    payload = {"code_id": "lq_1", "oa_openid": "oA", "at": START}
    assert asyncio.run(links.send_card(payload)) == "card_sent"
    assert api.sent == [{"touser": "oA", "msgtype": "miniprogrampage", "miniprogrampage": {
        "title": "t", "appid": "wx68dbf73d03d3a510", "pagepath": "pages/a",
        "thumb_media_id": "MEDIA"}}]
    clock.advance(CARD_WINDOW_S + 1)
    assert asyncio.run(links.send_card(payload)) == "card_window_closed"
    assert len(api.sent) == 1
    without = QrLinks(cast(Database, None), api, clock=clock)
    assert asyncio.run(without.send_card(payload)) == "card_disabled"


def load(sections: dict[str, dict[str, object]], mini_program: bool = True) -> config.Config:
    return config.load_text(config_text("/tmp/x.db", sections, mini_program))


def test_linking_config() -> None:
    cfg = load({"webhook": {"public_url": "https://wx.example.com"},
                "linking": {"oauth_return_hosts": "Shop.Example.com, h5.example.com:8443",
                            "qrcode_reply": "已绑定"}})
    assert cfg.webhook.public_url == "https://wx.example.com"
    assert cfg.linking.oauth_return_hosts == ("shop.example.com", "h5.example.com:8443")
    assert cfg.linking.qrcode_reply == "已绑定" and cfg.linking.qrcode_card_title == "绑定成功"
    assert load({}).webhook.public_url == "" and load({}).linking.oauth_return_hosts == ()
    cases: tuple[tuple[dict[str, dict[str, object]], str], ...] = (
        ({"webhook": {"public_url": "wx.example.com"}}, "[webhook] public_url"),
        ({"webhook": {"public_url": "ftp://wx.example.com"}}, "[webhook] public_url"),
        ({"webhook": {"public_url": "https://wx.example.com/?a=1"}}, "[webhook] public_url"),
        ({"webhook": {"public_url": "https://u@wx.example.com"}}, "[webhook] public_url"),
        ({"linking": {"oauth_return_hosts": "https://shop.example.com"}},
         "[linking] oauth_return_hosts"),
        ({"linking": {"qrcode_card_thumb_media_id": "M"}}, "[linking] qrcode_card_pagepath"),
    )
    for sections, expected in cases:
        with pytest.raises(ConfigError) as info:
            load(sections)
        assert any(p.startswith(expected) for p in info.value.problems), info.value.problems
    with pytest.raises(ConfigError) as info:
        load({"linking": {"qrcode_card_thumb_media_id": "M", "qrcode_card_pagepath": "p"}},
             mini_program=False)
    assert any("[mini_program]" in p for p in info.value.problems)


class Replier:
    def __init__(self, answer: str | None = None, fail: bool = False) -> None:
        self.answer, self.fail, self.seen = answer, fail, 0

    async def reply_to(self, message: Any) -> str | None:
        self.seen += 1
        if self.fail:
            raise StorageError("disk full")
        return self.answer


def test_the_webhook_rings_after_the_reply_and_maps_storage_faults(tmp_path: Any) -> None:
    message = parse_message({"ToUserName": "gh_1", "FromUserName": "oA", "CreateTime": "5",
                             "MsgType": "event", "Event": "SCAN", "EventKey": "x"})

    async def run() -> None:
        db = await Database.open(str(tmp_path / "w.db"))
        try:
            rings: list[int] = []
            replier = Replier("hi")
            hook = Webhook("tok", None, db, clock=FakeClock(START), replier=replier,
                           on_stored=lambda: rings.append(replier.seen))
            assert await hook.store(message) is True
            assert rings == []  # not before the reply is chosen
            body = await hook.answer(message, False, "n")
            fields = parse_xml(body)
            assert (fields["ToUserName"], fields["FromUserName"], fields["Content"]) == \
                ("oA", "gh_1", "hi")
            hook.ring()
            assert rings == [1]
            quiet = Webhook("tok", None, db, replier=Replier(None))
            assert await quiet.answer(message, False, "n") == b"success"
            broken = Webhook("tok", None, db, replier=Replier(fail=True))
            with pytest.raises(Rejected) as info:
                await broken.answer(message, False, "n")
            assert info.value.status_code == 503
            plain = Webhook("tok", None, db, on_stored=lambda: rings.append(-1))
            assert await plain.store(message) is False and rings == [1]  # a duplicate
            assert await plain.answer(message, False, "n") == b"success"
        finally:
            await db.close()

    asyncio.run(run())
