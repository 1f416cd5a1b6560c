"""OA template definitions and WeChat's template/send payload rules.

https://developers.weixin.qq.com/doc/offiaccount/Message_Management/Template_Message_Interface.html

Pure: stdlib only; must not import tornado or any other part of wxd.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

_PLACEHOLDER_RE = re.compile(r"\{\{\s*(\w+)\.DATA\s*\}\}")
# Category-library keys are "<type><n>" (thing3, character_string12); other keys (keyword1,
# first, remark) belong to legacy templates, which WeChat does not type-check.
_TYPED_KEY_RE = re.compile(
    r"(short_thing|thing|character_string|time|amount|phone_number|car_number|const|phrase)(\d+)"
)

_CJK = "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
_PHRASE_RE = re.compile(f"[{_CJK}]{{1,5}}")
# character_string: digits, letters and symbols only, no Chinese -> printable ASCII.
_ASCII_PRINTABLE_RE = re.compile(r"[\x20-\x7e]+")
_AMOUNT_RE = re.compile(r"[¥￥$€£]?(?P<int>\d+)(?:\.(?P<frac>\d+))?元?")
_PHONE_RE = re.compile(r"[0-9+\-() ]{1,17}")
_CAR_RE = re.compile(f"[{_CJK}A-Za-z0-9][A-Za-z0-9]{{0,6}}[{_CJK}A-Za-z0-9]?")
_DATE = r"(?:\d{4}年\d{1,2}月\d{1,2}日|\d{4}-\d{1,2}-\d{1,2}|\d{4}/\d{1,2}/\d{1,2}|\d{1,2}月\d{1,2}日)"
_TIME = r"(?:[01]?\d|2[0-3]):[0-5]\d(?::[0-5]\d)?"
_TIME_POINT_RE = re.compile(f"(?:{_DATE}\\s*{_TIME}|{_DATE}|{_TIME})")

# Per-type limits of category-template values (see the module docstring's page). short_thing's
# limit is undocumented (unconfirmed); the sandbox applies thing's.
_LENGTH_LIMITS: Mapping[str, int] = {
    "thing": 20,
    "short_thing": 20,
    "character_string": 32,
    "const": 20,
    "phone_number": 17,
    "car_number": 8,
    "phrase": 5,
}


@dataclass(frozen=True)
class Template:
    """One template of the OA's "my templates" list (get_all_private_template item)."""

    template_id: str
    title: str
    content: str
    primary_industry: str = "IT科技"
    deputy_industry: str = "互联网|电子商务"
    example: str = ""
    keys: tuple[str, ...] = field(init=False)

    def __post_init__(self) -> None:
        keys = tuple(dict.fromkeys(_PLACEHOLDER_RE.findall(self.content)))
        object.__setattr__(self, "keys", keys)

    def as_json(self) -> dict[str, str]:
        """The item shape of get_all_private_template."""
        return {
            "template_id": self.template_id,
            "title": self.title,
            "primary_industry": self.primary_industry,
            "deputy_industry": self.deputy_industry,
            "content": self.content,
            "example": self.example,
        }


# Default templates. Ids are 43 characters like WeChat's; tests and `wxd demo` use the names.
ORDER_TEMPLATE_ID = "sbxOrderStatus0123456789abcdefghijklmnopqrs"
NOTICE_TEMPLATE_ID = "sbxNotice0123456789abcdefghijklmnopqrstuvwx"
LEGACY_TEMPLATE_ID = "sbxLegacy0123456789abcdefghijklmnopqrstuvwx"

DEFAULT_TEMPLATES: tuple[Template, ...] = (
    Template(
        ORDER_TEMPLATE_ID,
        "订单状态通知",
        "订单号:{{character_string1.DATA}}\n商品名称:{{thing2.DATA}}\n订单金额:{{amount3.DATA}}\n"
        "下单时间:{{time4.DATA}}\n订单状态:{{phrase5.DATA}}",
        example="订单号:A20240101001\n商品名称:巧克力\n订单金额:39.8元\n"
        "下单时间:2024年1月1日 12:00\n订单状态:配送中",
    ),
    Template(
        NOTICE_TEMPLATE_ID,
        "服务通知",
        "通知内容:{{thing1.DATA}}\n通知时间:{{time2.DATA}}",
        example="通知内容:您的预约已确认\n通知时间:2024-01-01 09:30",
    ),
    Template(
        LEGACY_TEMPLATE_ID,
        "历史模板",
        "{{first.DATA}}\n项目:{{keyword1.DATA}}\n结果:{{keyword2.DATA}}\n{{remark.DATA}}",
        primary_industry="IT科技",
        deputy_industry="IT软件与服务",
        example="您好\n项目:测试\n结果:通过\n谢谢",
    ),
)


@dataclass(frozen=True)
class Rejection:
    """Why template/send refuses a payload: the errcode and WeChat's errmsg text (no rid)."""

    errcode: int
    errmsg: str


def _value_ok(kind: str, value: str) -> bool:
    limit = _LENGTH_LIMITS.get(kind)
    if limit is not None and len(value) > limit:
        return False
    if kind == "character_string":
        return bool(_ASCII_PRINTABLE_RE.fullmatch(value))
    if kind == "phrase":
        return bool(_PHRASE_RE.fullmatch(value))
    if kind == "phone_number":
        return bool(_PHONE_RE.fullmatch(value))
    if kind == "car_number":
        return bool(_CAR_RE.fullmatch(value))
    if kind == "amount":
        match = _AMOUNT_RE.fullmatch(value)
        if match is None:
            return False
        digits = len(match["int"]) + len(match["frac"] or "")
        return digits <= 12
    if kind == "time":
        # 24-hour time, optionally with a date; ranges are joined by "~".
        return all(_TIME_POINT_RE.fullmatch(part.strip()) for part in value.split("~"))
    return True


def check_data(template: Template, data: Mapping[str, Any]) -> Rejection | None:
    """Apply the category-template value rules to a template/send `data` object; None when acceptable.

    Every typed key of the template must be present with a non-empty string value (47003
    "... is emtpy", WeChat's spelling) obeying its type, except a `const` key, which takes an
    approved string or the empty string. Legacy keys may be absent or empty.
    Keys not in the template are ignored (first/remark are harmless since 2023), except
    `miniprogram`, which belongs at the top level (47003).
    """
    if "miniprogram" in data:
        return Rejection(47003, "argument invalid! data.miniprogram is not a data field")
    for key in template.keys:
        typed = _TYPED_KEY_RE.fullmatch(key)
        entry = data.get(key)
        if entry is None and typed is None:
            continue
        if not isinstance(entry, dict):
            return Rejection(47003, f"argument invalid! data.{key}.value is emtpy")
        value = entry.get("value")
        if not isinstance(value, str):
            return Rejection(47003, f"argument invalid! data.{key}.value invalid")
        if typed is None:
            continue
        if value == "":
            if typed.group(1) == "const":
                continue
            return Rejection(47003, f"argument invalid! data.{key}.value is emtpy")
        if not _value_ok(typed.group(1), value):
            return Rejection(47003, f"argument invalid! data.{key}.value invalid")
    return None


def check_miniprogram(miniprogram: Any, mp_appid: str) -> Rejection | None:
    """The top-level `miniprogram` must be {"appid": <the linked MP appid>, "pagepath": str}."""
    if not isinstance(miniprogram, dict):
        return Rejection(47003, "argument invalid! miniprogram invalid")
    if miniprogram.get("appid") != mp_appid:
        return Rejection(47003, "argument invalid! miniprogram.appid invalid")
    pagepath = miniprogram.get("pagepath")
    if not isinstance(pagepath, str) or not pagepath:
        return Rejection(47003, "argument invalid! miniprogram.pagepath invalid")
    return None
