"""wxd.wechat.templates: placeholders, request parsing, data forms, misplaced keys, value rules.

https://developers.weixin.qq.com/doc/offiaccount/Message_Management/Template_Message_Interface.html
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from wxd.sandbox.templates import DEFAULT_TEMPLATES, Template, check_data
from wxd.wechat.templates import (
    PushRejected,
    check_against_template,
    check_keys,
    key_type,
    normalize_data,
    parse_request,
    placeholders,
    value_problem,
)

MP_APPID = "wxfedcba0987654321"


def request(**overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"to": {"oa_openid": "oA1"}, "template_id": "T1",
                            "data": {"thing1": "hello"}}
    body.update(overrides)
    return {k: v for k, v in body.items() if v is not None}


def rejected(raw: Any, mp_appid: str | None = MP_APPID) -> PushRejected:
    with pytest.raises(PushRejected) as info:
        parse_request(raw, mp_appid)
    return info.value


def test_placeholders_in_order_without_duplicates() -> None:
    content = "{{first.DATA}}\n金额:{{ amount2.DATA }}\n{{first.DATA}}{{thing3.DATA}}{{x.VALUE}}"
    assert placeholders(content) == ("first", "amount2", "thing3")
    assert placeholders("no placeholders") == ()


def test_key_types() -> None:
    assert key_type("thing3") == "thing"
    assert key_type("character_string12") == "character_string"
    assert key_type("phone_number1") == "phone_number"
    assert key_type("short_thing4") is None  # limit unpublished: not checked
    assert key_type("keyword1") is None
    assert key_type("thing") is None  # no number: a legacy name


def test_both_data_forms_normalise_to_plain_values() -> None:
    assert normalize_data({"a": "1", "b": {"value": "2"}, "c": {"value": "3", "color": "#f00"}}) \
        == {"a": "1", "b": "2", "c": "3"}


@pytest.mark.parametrize(("data", "code"), [
    (None, "missing_field"),
    (["a"], "invalid_data"),
    ({"a": 1}, "invalid_data"),
    ({"a": {"val": "x"}}, "invalid_data"),
    ({"a": {"value": 5}}, "invalid_data"),
    ({"a": {"value": "x", "size": 3}}, "invalid_data"),
])
def test_bad_data_is_refused(data: Any, code: str) -> None:
    assert rejected(request(data=data) if data is not None else {
        "to": {"oa_openid": "o"}, "template_id": "T"}).code == code


@pytest.mark.parametrize("key", ["miniprogram", "pagepath", "appid", "url"])
def test_misplaced_keys_in_data_say_where_they_belong(key: str) -> None:
    structured = {"appid": MP_APPID, "pagepath": "pages/index"} if key == "miniprogram" else "x"
    data = {"thing1": "hi", key: structured}
    parsed: PushRejected
    if key == "miniprogram":
        parsed = rejected(request(data=data))  # structured: refused while parsing
    else:
        with pytest.raises(PushRejected) as info:
            check_against_template(parse_request(request(data=data), MP_APPID), ("thing1",))
        parsed = info.value
    assert parsed.code == "misplaced_field"
    assert parsed.field == f"data.{key}"
    assert "top-level" in parsed.message or "top level" in parsed.message


def test_misplaced_key_allowed_when_the_template_declares_it() -> None:
    push = parse_request(request(data={"url": "x"}), MP_APPID)
    check_against_template(push, ("url",))


def test_misplaced_key_refused_when_template_unknown() -> None:
    push = parse_request(request(data={"thing1": "a", "url": "https://x"}), MP_APPID)
    with pytest.raises(PushRejected) as info:
        check_against_template(push, None)
    assert info.value.code == "misplaced_field"


@pytest.mark.parametrize(("raw", "code", "field"), [
    ("not an object", "invalid_body", None),
    ({"template_id": "T", "data": {}}, "missing_field", "to"),
    ({"to": "oA", "template_id": "T", "data": {}}, "invalid_field", "to"),
    ({"to": {}, "template_id": "T", "data": {}}, "missing_field", "to"),
    ({"to": {"oa_openid": "a", "unionid": "b"}, "template_id": "T", "data": {}},
     "invalid_field", "to"),
    ({"to": {"openid": "a"}, "template_id": "T", "data": {}}, "invalid_field", "to.openid"),
    ({"to": {"oa_openid": ""}, "template_id": "T", "data": {}}, "invalid_field", "to.oa_openid"),
    ({"to": {"oa_openid": "a"}, "data": {}}, "missing_field", "template_id"),
    ({"to": {"oa_openid": "a"}, "template_id": 5, "data": {}}, "invalid_field", "template_id"),
    (request(url=7), "invalid_field", "url"),
    (request(miniprogram="pages/x"), "invalid_field", "miniprogram"),
    (request(miniprogram={"appid": MP_APPID}), "missing_field", "miniprogram.pagepath"),
    (request(miniprogram={"pagepath": "p", "path": "x"}), "invalid_field", "miniprogram.path"),
    (request(idempotency_key="k" * 129), "invalid_field", "idempotency_key"),
    (request(data={"phrase1": "hello"}), "value_invalid", "data.phrase1"),
])
def test_request_shape_refusals(raw: Any, code: str, field: str | None) -> None:
    exc = rejected(raw)
    assert (exc.code, exc.field) == (code, field)
    assert exc.message


def test_parse_full_request_and_wechat_body() -> None:
    push = parse_request(request(
        to={"unionid": "u1"}, data={"thing1": {"value": "hello"}}, url="https://example.com",
        miniprogram={"pagepath": "pages/a?b=1"}, idempotency_key="order-1"), MP_APPID)
    assert push.to == {"unionid": "u1"}
    assert push.idempotency_key == "order-1"
    body = push.wechat_body("oA9")
    assert body == {"touser": "oA9", "template_id": "T1", "data": {"thing1": {"value": "hello"}},
                    "url": "https://example.com",
                    "miniprogram": {"appid": MP_APPID, "pagepath": "pages/a?b=1"}}


def test_miniprogram_appid_default_and_not_configured() -> None:
    explicit = parse_request(request(miniprogram={"appid": "wx0000000000000000",
                                                  "pagepath": "p"}), None)
    assert explicit.miniprogram == {"appid": "wx0000000000000000", "pagepath": "p"}
    exc = rejected(request(miniprogram={"pagepath": "p"}), None)
    assert exc.code == "mini_program_not_configured"


def test_template_keys_must_match() -> None:
    check_keys("T", ("thing1", "time2"), {"thing1": "a", "time2": "12:00"})
    check_keys("T", ("first", "keyword1", "remark"), {"keyword1": "a"})  # first/remark optional
    with pytest.raises(PushRejected) as info:
        check_keys("T", ("thing1", "time2"), {"thing1": "a", "thing9": "b"})
    assert info.value.code == "template_mismatch"
    assert "time2" in info.value.message and "thing9" in info.value.message


@pytest.mark.parametrize(("key", "value"), [
    ("thing1", "二十个字以内的内容没问题"), ("thing1", "x" * 20),
    ("character_string2", "A-2024/01_x"), ("character_string2", "9" * 32),
    ("time3", "15:01"), ("time3", "2019年10月1日 15:01"), ("time3", "2024-01-01 09:30"),
    ("time3", "2024-01-01 09:30 ~ 2024-01-02 18:00"), ("time3", "2024年1月1日"),
    ("amount4", "39.8元"), ("amount4", "¥1,234.50"), ("amount4", "$100"),
    ("phone_number5", "+86-0766-66888866"), ("car_number6", "粤A12345"),
    ("phrase7", "配送中"), ("const8", "已发货"), ("const8", ""), ("keyword1", ""),
    ("keyword1", "x" * 300),
    ("short_thing9", "anything at all, unpublished limit"),
])
def test_values_accepted(key: str, value: str) -> None:
    assert value_problem(key, value) is None


@pytest.mark.parametrize(("key", "value"), [
    ("thing1", "x" * 21), ("thing1", ""),
    ("character_string2", "订单123"), ("character_string2", "9" * 33),
    ("time3", "tomorrow"), ("time3", "25:00"), ("time3", "12:61"),
    ("amount4", "1234567890123元"), ("amount4", "about 5"),
    ("phone_number5", "call me"), ("phone_number5", "1" * 18),
    ("car_number6", "粤A-12345"), ("car_number6", "粤A1234567"),
    ("phrase7", "delivered"), ("phrase7", "配送中配送中"),
    ("const8", "x" * 21),
])
def test_values_refused_name_the_rule(key: str, value: str) -> None:
    problem = value_problem(key, value)
    assert problem is not None
    with pytest.raises(PushRejected) as info:
        parse_request(request(data={key: value}), MP_APPID)
    assert info.value.code == "value_invalid"
    assert info.value.field == f"data.{key}"
    assert key in info.value.message


def test_empty_const_value_is_queued_but_other_empty_typed_values_are_not() -> None:
    # WeChat accepts an approved string or "" for a const key; every other typed key refuses
    # an empty value (47003 "is emtpy").
    push = parse_request(request(data={"thing1": "a", "const2": ""}), MP_APPID)
    check_against_template(push, ("thing1", "const2"))
    assert rejected(request(data={"thing1": "", "const2": ""})).field == "data.thing1"


_TYPED = st.sampled_from(["thing1", "character_string2", "phrase3", "phone_number4",
                          "car_number5", "amount6", "time7", "const8"])


@given(_TYPED, st.text(max_size=40))
def test_wxd_accepts_nothing_the_sandbox_would_refuse_for_length(key: str, value: str) -> None:
    """Whatever wxd lets through for a typed key must pass the emulator's length/emptiness
    rules: a value WeChat refuses (47003) is refused before it is queued."""
    if value_problem(key, value) is not None:
        return
    template = Template("T", "t", "{{%s.DATA}}" % key)  # noqa: UP031 - braces would need escaping
    rejection = check_data(template, {key: {"value": value}})
    if rejection is not None:
        # The emulator's content regexes may be stricter than the published rules for time
        # and amount formats; lengths and emptiness must agree.
        assert key.startswith(("time", "amount", "phone_number", "car_number")), (key, value)


def test_default_sandbox_templates_parse() -> None:
    for template in DEFAULT_TEMPLATES:
        assert placeholders(template.content) == template.keys


def test_the_emulator_takes_an_empty_const_value_and_refuses_other_empty_typed_ones() -> None:
    template = Template("T", "t", "{{thing1.DATA}} {{const2.DATA}}")
    assert check_data(template, {"thing1": {"value": "a"}, "const2": {"value": ""}}) is None
    refused = check_data(template, {"thing1": {"value": ""}, "const2": {"value": ""}})
    assert refused is not None and refused.errcode == 47003
