"""Tests for wxd.wechat.messages: official samples, hostile XML, dedupe keys, JSON round trip, rendering."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import xmltodict
from hypothesis import given, settings
from hypothesis import strategies as st

from wxd.errors import MessageError
from wxd.wechat.messages import (
    MAX_XML_BYTES,
    Message,
    OtherMessage,
    ScanEvent,
    SubscribeEvent,
    TemplateSendJobFinish,
    TextMessage,
    UnsubscribeEvent,
    message_from_json,
    message_to_json,
    parse_message,
    parse_xml,
    render_event_xml,
    render_text_reply,
)

EVENTS = Path(__file__).parent / "data" / "events"


def load(name: str) -> Message:
    return parse_message(parse_xml((EVENTS / name).read_bytes()))


HEADER: dict[str, str | int] = {
    "ToUserName": "gh_0123456789ab",
    "FromUserName": "oUSER",
    "CreateTime": 1700000000,
    "MsgType": "event",
}


def event(**fields: str | int) -> Message:
    return parse_message(parse_xml(render_event_xml({**HEADER, **fields})))


# --- official samples -----------------------------------------------------------------------------
# https://developers.weixin.qq.com/doc/offiaccount/Message_Management/Receiving_event_pushes.html
# https://developers.weixin.qq.com/doc/offiaccount/Message_Management/Template_Message_Interface.html


def test_subscribe() -> None:
    msg = load("subscribe.xml")
    assert type(msg) is SubscribeEvent
    assert (msg.to_user, msg.from_user, msg.create_time, msg.msg_type) == (
        "gh_xxx",
        "OPENID",
        123456789,
        "event",
    )
    assert (msg.event_key, msg.ticket, msg.scene) == ("", "", None)
    assert msg.event == "subscribe"
    assert msg.dedupe_key == "evt:OPENID:123456789:subscribe"


def test_subscribe_with_empty_event_key() -> None:
    msg = load("subscribe_empty_eventkey.xml")
    assert isinstance(msg, SubscribeEvent)
    assert msg.raw["EventKey"] == ""
    assert msg.scene is None
    assert msg.dedupe_key == "evt:OPENID:123456789:subscribe"


def test_subscribe_via_qr() -> None:
    msg = load("subscribe_qrscene.xml")
    assert isinstance(msg, SubscribeEvent)
    assert (msg.event_key, msg.ticket, msg.scene) == ("qrscene_123123", "TICKET", "123123")
    assert msg.dedupe_key == "evt:OPENID:123456789:subscribe:qrscene_123123"


@pytest.mark.parametrize(
    ("event_key", "scene"),
    [("qrscene_0", "0"), ("qrscene_abc_def", "abc_def"), ("qrscene_", ""), ("other", None)],
)
def test_subscribe_scene_prefix(event_key: str, scene: str | None) -> None:
    msg = event(Event="subscribe", EventKey=event_key)
    assert isinstance(msg, SubscribeEvent) and msg.scene == scene


def test_unsubscribe() -> None:
    msg = load("unsubscribe.xml")
    assert type(msg) is UnsubscribeEvent
    assert msg.from_user == "OPENID"
    assert msg.dedupe_key == "evt:OPENID:123456789:unsubscribe"


def test_scan() -> None:
    msg = load("scan.xml")
    assert type(msg) is ScanEvent
    assert (msg.event_key, msg.ticket) == ("SCENE_VALUE", "TICKET")
    assert msg.dedupe_key == "evt:OPENID:123456789:SCAN:SCENE_VALUE"


def test_template_send_job_finish() -> None:
    msg = load("templatesendjobfinish.xml")
    assert type(msg) is TemplateSendJobFinish
    assert (msg.msgid, msg.status) == ("200163836", "success")
    assert msg.dedupe_key == "tsjf:200163836"
    assert msg.to_user == "gh_7f083739789a" and msg.create_time == 1395658920


def test_template_send_job_finish_failed_status_verbatim() -> None:
    msg = load("templatesendjobfinish_failed.xml")
    assert isinstance(msg, TemplateSendJobFinish)
    assert msg.status == "failed: system failed"
    assert msg.msgid == "3487542469355618313"  # 64-bit, kept as text
    blocked = event(Event="TEMPLATESENDJOBFINISH", MsgID=1, Status="failed:user block")
    assert isinstance(blocked, TemplateSendJobFinish) and blocked.status == "failed:user block"


def test_template_send_job_finish_needs_capital_d_msgid() -> None:
    # MsgId (lower-case d) is the normal-message field; the report uses MsgID. Without MsgID
    # the report is identified by sender and time only (matched to a push by time).
    msg = event(Event="TEMPLATESENDJOBFINISH", MsgId=200163836, Status="success")
    assert type(msg) is TemplateSendJobFinish and msg.msgid is None
    assert msg.dedupe_key == "tsjf:oUSER:1700000000"


def test_template_send_job_finish_with_msgid_zero_or_missing() -> None:
    for fields in ({"MsgID": "0"}, {"MsgID": 0}, {"MsgID": ""}, {}):
        msg = event(Event="TEMPLATESENDJOBFINISH", Status="success", **fields)
        assert type(msg) is TemplateSendJobFinish and msg.msgid is None, fields
        assert msg.dedupe_key == "tsjf:oUSER:1700000000"
    later = parse_message({**HEADER, "CreateTime": "1700000001", "Event": "TEMPLATESENDJOBFINISH",
                           "MsgID": "0", "Status": "success"})
    assert later.dedupe_key == "tsjf:oUSER:1700000001"


def test_text_message() -> None:
    msg = load("text.xml")
    assert type(msg) is TextMessage
    assert msg.content == " this is a test "  # CDATA kept verbatim, whitespace included
    assert msg.msg_id == "1234567890123456"
    assert msg.dedupe_key == "msg:OPENID:1234567890123456"


def test_subscribe_msg_popup_event_list_normalised() -> None:
    fields = parse_xml((EVENTS / "subscribe_msg_popup_event.xml").read_bytes())
    items = json.loads(fields["SubscribeMsgPopupEvent"])
    assert items == [{"PopupScene": "2", "SubscribeStatusString": "accept", "TemplateId": "TEMPLATE_ID"}]
    msg = parse_message(fields)
    assert type(msg) is OtherMessage and msg.event == "subscribe_msg_popup_event"


def test_subscribe_msg_popup_event_several_items() -> None:
    body = (
        "<xml><SubscribeMsgChangeEvent>"
        "<List><TemplateId>A</TemplateId><SubscribeStatusString>reject</SubscribeStatusString></List>"
        "<List><TemplateId>B</TemplateId><SubscribeStatusString>reject</SubscribeStatusString></List>"
        "</SubscribeMsgChangeEvent></xml>"
    )
    items = json.loads(parse_xml(body)["SubscribeMsgChangeEvent"])
    assert [item["TemplateId"] for item in items] == ["A", "B"]


def test_unknown_event_and_type_are_other() -> None:
    for msg in (
        event(Event="LOCATION", Latitude="23.1"),
        event(Event="subscribe_msg_sent_event"),
        event(Event="Subscribe"),  # case-sensitive: not "subscribe"
        event(Event="scan", EventKey="1"),
        event(),  # no Event at all
        parse_message({**HEADER, "MsgType": "image", "MsgId": "7"}),
        parse_message({**HEADER, "MsgType": "text"}),  # text without Content/MsgId
        parse_message({**HEADER, "Event": "TEMPLATESENDJOBFINISH", "MsgID": "1"}),  # no Status
    ):
        assert type(msg) is OtherMessage, msg.raw


def test_other_message_dedupe_keys() -> None:
    assert event(Event="CLICK", EventKey="MENU_1").dedupe_key == "evt:oUSER:1700000000:CLICK:MENU_1"
    image = parse_message({**HEADER, "MsgType": "image", "MsgId": "42"})
    assert image.dedupe_key == "msg:oUSER:42"
    assert event().dedupe_key == "evt:oUSER:1700000000:event"


def test_msgid_dedupe_key_includes_the_sender() -> None:
    # MsgId collisions across users have been reported: the same MsgId from two senders is two
    # messages, from one sender a retry.
    first = parse_message({**HEADER, "MsgType": "text", "Content": "hi", "MsgId": "42"})
    other_user = parse_message({**HEADER, "FromUserName": "oOTHER", "MsgType": "text",
                                "Content": "hello", "MsgId": "42"})
    retry = parse_message({**HEADER, "MsgType": "text", "Content": "hi", "MsgId": "42"})
    assert first.dedupe_key == retry.dedupe_key != other_user.dedupe_key


def test_dedupe_key_distinguishes_retries_from_new_events() -> None:
    first = event(Event="SCAN", EventKey="1")
    retry = parse_message(parse_xml(render_event_xml({**HEADER, "Event": "SCAN", "EventKey": "1"})))
    other_scene = event(Event="SCAN", EventKey="2")
    later = parse_message({**HEADER, "CreateTime": "1700000001", "Event": "SCAN", "EventKey": "1"})
    assert first.dedupe_key == retry.dedupe_key
    assert len({first.dedupe_key, other_scene.dedupe_key, later.dedupe_key}) == 3


# --- parse_message validation ---------------------------------------------------------------------


@pytest.mark.parametrize("missing", ["ToUserName", "FromUserName", "CreateTime", "MsgType"])
def test_missing_required_field(missing: str) -> None:
    fields = {k: v for k, v in {**HEADER, "Event": "subscribe"}.items() if k != missing}
    with pytest.raises(MessageError):
        parse_message(fields)
    with pytest.raises(MessageError):
        parse_message(parse_xml(render_event_xml(fields)))


@pytest.mark.parametrize("bad", ["", "abc", "-1", "1.5", "１２", "1e3", None, True, -5, 1.0, ["1"]])
def test_bad_create_time(bad: object) -> None:
    with pytest.raises(MessageError):
        parse_message({**HEADER, "CreateTime": bad})


@pytest.mark.parametrize("field", ["ToUserName", "FromUserName", "MsgType"])
@pytest.mark.parametrize("bad", ["", 5, None, ["x"]])
def test_bad_header_types(field: str, bad: object) -> None:
    with pytest.raises(MessageError):
        parse_message({**HEADER, field: bad})


def test_create_time_accepts_int_and_digits() -> None:
    assert parse_message({**HEADER, "CreateTime": "1395658920"}).create_time == 1395658920
    assert parse_message({**HEADER, "CreateTime": 7}).create_time == 7


def test_message_is_frozen_and_hashable() -> None:
    msg = load("subscribe.xml")
    with pytest.raises(AttributeError):
        msg.from_user = "x"  # type: ignore[misc]
    with pytest.raises(TypeError):
        msg.raw["Event"] = "unsubscribe"  # type: ignore[index]
    assert hash(msg) == hash(load("subscribe.xml"))


def test_raw_is_a_copy() -> None:
    fields = dict(parse_xml((EVENTS / "scan.xml").read_bytes()))
    msg = parse_message(fields)
    fields["EventKey"] = "changed"
    assert msg.raw["EventKey"] == "SCENE_VALUE"


# --- JSON round trip ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name", sorted(p.name for p in EVENTS.glob("*.xml") if p.name != "safe_mode_envelope.xml")
)
def test_json_round_trip(name: str) -> None:
    msg = load(name)
    text = message_to_json(msg)
    back = message_from_json(text)
    assert back == msg
    assert type(back) is type(msg)
    assert back.dedupe_key == msg.dedupe_key
    assert isinstance(json.loads(text), dict)


def test_json_round_trip_keeps_unicode() -> None:
    msg = parse_message({**HEADER, "MsgType": "text", "Content": "你好 ]]>", "MsgId": "1"})
    text = message_to_json(msg)
    assert "你好" in text
    back = message_from_json(text)
    assert isinstance(back, TextMessage) and back.content == "你好 ]]>"


@pytest.mark.parametrize(
    "text", ["", "nope", "[]", '{"raw": {}}', '{"v": 1}', '{"v": 1, "raw": []}', "[" * 100000]
)
def test_message_from_json_rejects(text: str) -> None:
    with pytest.raises(MessageError):
        message_from_json(text)


def test_message_from_json_missing_fields() -> None:
    with pytest.raises(MessageError):
        message_from_json('{"v": 1, "raw": {"MsgType": "text"}}')


# --- parse_xml: hostile and malformed input -------------------------------------------------------

BILLION_LAUGHS = b"""<?xml version="1.0"?>
<!DOCTYPE lolz [
 <!ENTITY lol "lol">
 <!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
 <!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">
]>
<xml><Content>&lol3;</Content></xml>"""

XXE = b"""<?xml version="1.0"?>
<!DOCTYPE xml [<!ENTITY xxe SYSTEM "file:///etc/passwd">]>
<xml><Content>&xxe;</Content></xml>"""


@pytest.mark.parametrize(
    "body",
    [
        BILLION_LAUGHS,
        XXE,
        b'<!DOCTYPE xml SYSTEM "http://example.com/x.dtd"><xml><A>1</A></xml>',
        b"<!doctype xml><xml/>",
        b'<!DoCtYpE xml [<!EnTiTy a "b">]><xml><A>&a;</A></xml>',
        b'<xml><!ENTITY a "b"><A>1</A></xml>',
        # Hiding the DTD from the byte scan behind a fake CDATA start inside a comment:
        b'<!--<![CDATA[--><!DOCTYPE xml [<!ENTITY a "b">]><!--]]>--><xml><A>&a;</A></xml>',
        b'<!--<![CDATA[--><!DOCTYPE xml SYSTEM "http://example.com/x.dtd"><!--]]>--><xml/>',
        # Processing instructions beyond the XML declaration:
        b'<?xml version="1.0"?><?xml-stylesheet href="x"?><xml><A>1</A></xml>',
        b"<xml><?php system('id'); ?><A>1</A></xml>",
    ],
)
def test_dtd_entities_and_pis_rejected(body: bytes) -> None:
    with pytest.raises(MessageError):
        parse_xml(body)
    with pytest.raises(MessageError):
        parse_xml(body.decode())


def test_declaration_text_inside_cdata_is_just_text() -> None:
    fields = parse_xml(b"<xml><Content><![CDATA[<!DOCTYPE html><?php ?>]]></Content></xml>")
    assert fields == {"Content": "<!DOCTYPE html><?php ?>"}


def test_undefined_entity_is_malformed() -> None:
    with pytest.raises(MessageError):
        parse_xml(b"<xml><A>&nope;</A></xml>")


def test_predefined_entities_and_char_refs() -> None:
    assert parse_xml(b"<xml><A>a&amp;b&lt;&#x4E2D;</A></xml>") == {"A": "a&b<中"}


def test_xml_declaration_allowed_and_encoding_forced_to_utf8() -> None:
    body = '<?xml version="1.0" encoding="GBK"?><xml><A>中文</A></xml>'.encode()
    assert parse_xml(body) == {"A": "中文"}
    with pytest.raises(MessageError):
        parse_xml('<?xml version="1.0" encoding="GBK"?><xml><A>中文</A></xml>'.encode("gbk"))


@pytest.mark.parametrize(
    "body",
    [b"\xff\xfe<\x00x\x00m\x00l\x00/\x00>\x00", b"<xml><A>\xc3</A></xml>", "<xml>\ud800</xml>"],
)
def test_non_utf8_rejected(body: bytes | str) -> None:
    with pytest.raises(MessageError):
        parse_xml(body)


def test_oversized() -> None:
    filler = "a" * (MAX_XML_BYTES - 100)
    fits = f"<xml><A>{filler}</A></xml>".encode()
    assert len(fits) <= MAX_XML_BYTES
    assert parse_xml(fits)["A"] == filler
    with pytest.raises(MessageError):
        parse_xml(f"<xml><A>{filler}{'b' * 200}</A></xml>".encode())
    with pytest.raises(MessageError):
        parse_xml(b"<xml><A>12345</A></xml>", max_bytes=10)
    # The limit counts encoded bytes, not characters.
    with pytest.raises(MessageError):
        parse_xml("<xml><A>" + "中" * 10 + "</A></xml>", max_bytes=40)


@pytest.mark.parametrize(
    "body",
    [b"<root><A>1</A></root>", b"<XML><A>1</A></XML>", b"<x:xml xmlns:x='u'><A>1</A></x:xml>"],
)
def test_root_must_be_xml(body: bytes) -> None:
    with pytest.raises(MessageError):
        parse_xml(body)


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"   ",
        b"not xml",
        b"<xml>",
        b"<xml><A>1</B></xml>",
        b"<xml><A>1</A></xml><xml/>",
        b"<xml><A>1</A></xml>trailing",
        b"<xml><![CDATA[x</xml>",
        b"<xml>\x00</xml>",
        b'{"ToUserName": "gh"}',
    ],
)
def test_malformed(body: bytes) -> None:
    with pytest.raises(MessageError):
        parse_xml(body)


def test_deep_nesting_rejected() -> None:
    deep = b"<xml>" + b"<a>" * 200 + b"x" + b"</a>" * 200 + b"</xml>"
    with pytest.raises(MessageError):
        parse_xml(deep)
    very_deep = b"<xml>" + b"<a>" * 9000 + b"</a>" * 9000 + b"</xml>"
    with pytest.raises(MessageError):
        parse_xml(very_deep)


def test_empty_document_gives_no_fields() -> None:
    assert parse_xml(b"<xml/>") == {}
    assert parse_xml(b"<xml>\n  </xml>") == {}
    with pytest.raises(MessageError):
        parse_message(parse_xml(b"<xml/>"))


def test_flat_values() -> None:
    body = (
        b'<xml attr="ignored">\n  <A>1</A>\n  <B/>\n  <C><![CDATA[]]></C>\n'
        b"  <D>x</D><D>y</D>\n  <E><F>1</F></E>\n</xml>"
    )
    assert parse_xml(body) == {"A": "1", "B": "", "C": "", "D": '["x","y"]', "E": '{"F":"1"}'}


def test_safe_mode_envelope() -> None:
    fields = parse_xml((EVENTS / "safe_mode_envelope.xml").read_bytes())
    assert set(fields) == {"ToUserName", "Encrypt"}
    assert fields["Encrypt"].startswith("Q3stYC6h") and fields["Encrypt"].endswith("=")


# --- rendering ------------------------------------------------------------------------------------


def test_render_text_reply() -> None:
    xml = render_text_reply("oUSER", "gh_0123456789ab", "hello", 1700000000)
    assert xml == (
        "<xml><ToUserName><![CDATA[oUSER]]></ToUserName>"
        "<FromUserName><![CDATA[gh_0123456789ab]]></FromUserName>"
        "<CreateTime>1700000000</CreateTime><MsgType><![CDATA[text]]></MsgType>"
        "<Content><![CDATA[hello]]></Content></xml>"
    )


@pytest.mark.parametrize(
    "content", ["a]]>b", "]]>", "]]]]>", "x]]>y]]>z", "<b>&amp;</b>", "]", "]]", "", "多字节 ]]>\n"]
)
def test_render_text_reply_escapes_cdata_end(content: str) -> None:
    xml = render_text_reply("oUSER", "gh_x", content, 1)
    assert xml.count("<Content>") == 1
    # The reply must be well-formed for any parser (WeChat's is not ours), and round-trip.
    assert (xmltodict.parse(xml, strip_whitespace=False)["xml"]["Content"] or "") == content
    msg = parse_message(parse_xml(xml) | {"MsgId": "1"})
    assert isinstance(msg, TextMessage) and msg.content == content


def test_render_event_xml() -> None:
    xml = render_event_xml({"ToUserName": "gh_x", "CreateTime": 12, "MsgID": 3487542469355618313})
    assert xml == (
        "<xml><ToUserName><![CDATA[gh_x]]></ToUserName><CreateTime>12</CreateTime>"
        "<MsgID>3487542469355618313</MsgID></xml>"
    )


@pytest.mark.parametrize("name", ["", "1abc", "a b", "a>b", "x:y", "a/"])
def test_render_event_xml_rejects_bad_names(name: str) -> None:
    with pytest.raises(ValueError):
        render_event_xml({name: "v"})


def test_render_event_xml_rejects_bad_values() -> None:
    with pytest.raises(TypeError):
        render_event_xml({"A": True})
    with pytest.raises(TypeError):
        render_event_xml({"A": 1.5})  # type: ignore[dict-item]
    with pytest.raises(ValueError):
        render_event_xml({"A": "bell\x07"})


# --- properties -----------------------------------------------------------------------------------


@settings(max_examples=300)
@given(st.binary(max_size=2048))
def test_parse_arbitrary_bytes_only_raises_message_error(body: bytes) -> None:
    try:
        fields = parse_xml(body)
    except MessageError:
        return
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in fields.items())


# Text XML 1.0 can carry unchanged: no surrogates, no control characters except tab and newline
# ("\r" is normalised by every parser), no U+FFFE/U+FFFF.
xml_text = st.text(
    alphabet=st.characters(
        exclude_categories=["Cs", "Cc"],
        include_characters="\t\n",
        exclude_characters="\ufffe\uffff",
    ),
    max_size=50,
)


@given(st.text(alphabet="<>![]-?&;/=\"' abcxmlDOCTYPENTI\n", max_size=200))
def test_parse_xmlish_text_only_raises_message_error(body: str) -> None:
    try:
        parse_xml("<xml>" + body + "</xml>")
    except MessageError:
        pass


@given(
    st.dictionaries(
        st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,10}", fullmatch=True),
        st.one_of(xml_text, st.integers(min_value=0, max_value=2**63)),
        max_size=8,
    )
)
def test_render_then_parse_round_trip(fields: dict[str, str | int]) -> None:
    parsed = parse_xml(render_event_xml(fields))
    assert parsed == {k: str(v) for k, v in fields.items()}


@given(xml_text)
def test_text_reply_json_round_trip(content: str) -> None:
    fields = parse_xml(render_text_reply("oUSER", "gh_x", content, 1700000000)) | {"MsgId": "9"}
    msg = parse_message(fields)
    assert isinstance(msg, TextMessage) and msg.content == content
    assert message_from_json(message_to_json(msg)) == msg
