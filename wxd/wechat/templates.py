"""Template-message rules: placeholders, push-request parsing, data normalisation, value rules.

Pure: imports only the standard library and wxd.errors; never tornado or aiosqlite.
Everything here runs before a push is queued, so WeChat never sees what it would refuse.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from wxd.errors import WxdError

# https://developers.weixin.qq.com/doc/offiaccount/Message_Management/Template_Message_Interface.html
# Placeholders are {{key.DATA}}; `{{ }}` is reserved syntax.
PLACEHOLDER_RE = re.compile(r"\{\{\s*(\w+)\.DATA\s*\}\}")
# Category-library keys are "<type><n>" (thing3, character_string12). Longest names first,
# so that short_thing4 is not read as thing4.
TYPED_KEY_RE = re.compile(
    r"(short_thing|character_string|phone_number|car_number|thing|time|amount|const|phrase)(\d+)"
)
# Keys of legacy templates that WeChat stopped displaying on 2023-05-04; a push may omit them.
# https://developers.weixin.qq.com/community/develop/doc/000a2ae286cdc0f41a8face4c51801
OPTIONAL_LEGACY_KEYS = frozenset({"first", "remark"})
RECIPIENT_FIELDS = ("unionid", "mp_openid", "oa_openid")
MAX_IDEMPOTENCY_KEY = 128
MAX_TEMPLATE_ID = 128

_CJK = "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
_PHRASE_RE = re.compile(f"[{_CJK}]+")
_ASCII_PRINTABLE_RE = re.compile(r"[\x20-\x7e]+")
_AMOUNT_RE = re.compile(r"[¥￥$€£]?(?P<digits>[0-9][0-9,]*(?:\.[0-9]+)?)元?")
_CAR_RE = re.compile(f"[{_CJK}A-Za-z0-9][A-Za-z0-9]*[{_CJK}A-Za-z0-9]?")
# time: 24-hour time, optionally with a date, ranges joined by "~". The exact accepted
# date formats are not published, so only the alphabet and the clock fields are checked.
_TIME_ALPHABET_RE = re.compile(r"[0-9年月日时分秒:\-/.~ 至]+")
_CLOCK_RE = re.compile(r"(\d{1,2}):(\d{2})(?::(\d{2}))?")

# (limit in characters, rule description) per type; None = no length limit published. The limits
# are WeChat's table for category templates as community copies and staff answers give it.
_RULES: Mapping[str, tuple[int | None, str]] = {
    "thing": (20, "at most 20 characters"),
    "character_string": (32, "at most 32 characters: digits, letters and symbols, no Chinese"),
    "time": (None, "a 24-hour time, optionally with a date; ranges joined by '~'"),
    "amount": (None, "one optional currency symbol and at most 12 digits, may end with 元"),
    "phone_number": (17, "at most 17 characters: digits and symbols"),
    "car_number": (8, "at most 8 characters: first and last may be Chinese, the rest letters or digits"),
    "const": (20, "at most 20 characters (a value approved for the template, or empty)"),
    "phrase": (5, "at most 5 characters, Chinese only"),
}

# Where a key found inside `data` really belongs (top-level fields of template/send; putting them
# in `data` is a mistake community answers report often).
# https://developers.weixin.qq.com/doc/offiaccount/Message_Management/Template_Message_Interface.html
MISPLACED: Mapping[str, str] = {
    "miniprogram": "miniprogram belongs at the top level of the push "
                   '({"miniprogram": {"pagepath": ...}}), not inside data',
    "pagepath": "pagepath belongs inside the top-level miniprogram object "
                '({"miniprogram": {"pagepath": ...}}), not inside data',
    "appid": "appid belongs inside the top-level miniprogram object "
             "(it defaults to the configured Mini Program appid), not inside data",
    "url": "url belongs at the top level of the push, not inside data",
}


class PushRejected(WxdError):
    """A push request wxd refuses before queueing: a stable snake_case `code`, a human message,
    the offending `field` (dotted path) when there is one, and the HTTP status for the admin API."""

    def __init__(self, code: str, message: str, field: str | None = None, status: int = 400) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.field = field
        self.status = status

    def to_json(self) -> dict[str, Any]:
        error: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.field is not None:
            error["field"] = self.field
        return error


@dataclass(frozen=True)
class PushRequest:
    """A parsed, shape-checked push request. `data` is normalised to {key: value}; `to` holds
    exactly one of unionid / mp_openid / oa_openid; `miniprogram` already carries its appid."""

    to_kind: str
    to_value: str
    template_id: str
    data: dict[str, str]
    url: str | None
    miniprogram: dict[str, str] | None
    idempotency_key: str | None

    @property
    def to(self) -> dict[str, str]:
        return {self.to_kind: self.to_value}

    def wechat_body(self, oa_openid: str) -> dict[str, Any]:
        """The template/send body without client_msg_id (added per attempt). miniprogram is
        top level; data values are wrapped as {"value": v}."""
        body: dict[str, Any] = {
            "touser": oa_openid,
            "template_id": self.template_id,
            "data": {key: {"value": value} for key, value in self.data.items()},
        }
        if self.url is not None:
            body["url"] = self.url
        if self.miniprogram is not None:
            body["miniprogram"] = dict(self.miniprogram)
        return body


def placeholders(content: str) -> tuple[str, ...]:
    """The `{{key.DATA}}` keys of a template's content, in order, without duplicates."""
    return tuple(dict.fromkeys(PLACEHOLDER_RE.findall(content)))


@functools.lru_cache(maxsize=4096)
def key_type(key: str) -> str | None:
    """The value type of a category-template key (thing3 -> "thing"); None for legacy
    keys (keyword1, first) and for short_thing, whose limit is unpublished."""
    match = TYPED_KEY_RE.fullmatch(key)
    if match is None or match.group(1) == "short_thing":
        return None
    return match.group(1)


def _optional(raw: Mapping[str, Any], name: str, limit: int, where: str = "") -> str | None:
    path = f"{where}{name}"
    value = raw.get(name)
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        raise PushRejected("invalid_field", f"{path} must be a non-empty string", path)
    if len(value) > limit:
        raise PushRejected("invalid_field", f"{path} is longer than {limit} characters", path)
    return value


def _required(raw: Mapping[str, Any], name: str, limit: int, where: str = "") -> str:
    value = _optional(raw, name, limit, where)
    if value is None:
        raise PushRejected("missing_field", f"{where}{name} is required", f"{where}{name}")
    return value


def _parse_to(raw: Mapping[str, Any]) -> tuple[str, str]:
    to = raw.get("to")
    if to is None:
        raise PushRejected("missing_field", "to is required: {\"unionid\"|\"mp_openid\"|"
                           "\"oa_openid\": ...}", "to")
    if not isinstance(to, dict):
        raise PushRejected("invalid_field", "to must be an object with one of "
                           "unionid, mp_openid or oa_openid", "to")
    if len(to) == 1:  # the usual shape, checked without building lists
        ((name, value),) = to.items()
        if name in RECIPIENT_FIELDS and isinstance(value, str) and value.strip() \
                and len(value) <= 128:
            return name, value
    given = [name for name in RECIPIENT_FIELDS if to.get(name) is not None]
    unknown = sorted(set(to) - set(RECIPIENT_FIELDS))
    if unknown:
        raise PushRejected("invalid_field", f"to has unknown field {unknown[0]}; use one of "
                           "unionid, mp_openid or oa_openid", f"to.{unknown[0]}")
    if not given:
        raise PushRejected("missing_field", "to needs one of unionid, mp_openid or oa_openid", "to")
    if len(given) > 1:
        raise PushRejected("invalid_field", "to must name exactly one of unionid, mp_openid or "
                           f"oa_openid, got {', '.join(given)}", "to")
    return given[0], _required(to, given[0], 128, "to.")


def _plain_value(entry: Any) -> bool:
    return isinstance(entry, str) or (
        isinstance(entry, dict) and isinstance(entry.get("value"), str)
        and set(entry) <= {"value", "color"}
    )


def normalize_data(data: Any, template_keys: Iterable[str] | None = None) -> dict[str, str]:
    """Accept `{"k": {"value": "v"}}` and the shorthand `{"k": "v"}`; return {k: v}.

    A `miniprogram`, `pagepath`, `appid` or `url` key is refused with `misplaced_field` naming
    where it belongs, unless the template declares that placeholder. With `template_keys` None
    (template not known yet) only such keys holding something other than a plain value are
    refused here; check_against_template decides the rest. A legacy `color` next to `value` is
    accepted and dropped (ignored by WeChat since 2023-05-04).
    """
    if data is None:
        raise PushRejected("missing_field", "data is required", "data")
    if not isinstance(data, dict):
        raise PushRejected("invalid_data", "data must be an object: {\"key\": \"value\"} or "
                           "{\"key\": {\"value\": \"value\"}}", "data")
    declared = set(template_keys) if template_keys is not None else None
    for key, entry in data.items():
        if key not in MISPLACED:
            continue
        if (declared is not None and key not in declared) or (
            declared is None and not _plain_value(entry)
        ):
            raise PushRejected("misplaced_field", MISPLACED[key], f"data.{key}")
    values: dict[str, str] = {}
    for key, entry in data.items():
        path = f"data.{key}"
        if not isinstance(key, str) or not key:
            raise PushRejected("invalid_data", "data keys must be non-empty strings", "data")
        if isinstance(entry, str):
            values[key] = entry
            continue
        if not isinstance(entry, dict) or "value" not in entry:
            raise PushRejected("invalid_data", f"{path} must be a string or {{\"value\": string}}",
                               path)
        extra = sorted(set(entry) - {"value", "color"})
        if extra:
            raise PushRejected("invalid_data", f"{path} has unknown field {extra[0]}; "
                               "only value is used", f"{path}.{extra[0]}")
        if not isinstance(entry["value"], str):
            raise PushRejected("invalid_data", f"{path}.value must be a string", f"{path}.value")
        values[key] = entry["value"]
    return values


def value_problem(key: str, value: str) -> str | None:
    """The category-template value rule `value` breaks for the type named by `key`, or None when
    it is fine (or the type is unknown: legacy keys are not type-checked by WeChat).

    Every typed value must be non-empty (47003 "is emtpy") except a `const` one: a const key
    takes one of the strings approved for the template *or the empty string*.
    https://developers.weixin.qq.com/doc/offiaccount/Message_Management/Template_Message_Interface.html
    """
    kind = key_type(key)
    if kind is None:
        return None
    limit, rule = _RULES[kind]
    if value == "":
        return None if kind == "const" else f"must not be empty ({kind}: {rule})"
    if limit is not None and len(value) > limit:
        return f"{kind} values are {rule}; got {len(value)} characters"
    ok = True
    if kind == "character_string":
        ok = bool(_ASCII_PRINTABLE_RE.fullmatch(value))
    elif kind == "phrase":
        ok = bool(_PHRASE_RE.fullmatch(value))
    elif kind == "phone_number":
        ok = bool(_ASCII_PRINTABLE_RE.fullmatch(value)) and not any(c.isalpha() for c in value)
    elif kind == "car_number":
        ok = bool(_CAR_RE.fullmatch(value))
    elif kind == "amount":
        match = _AMOUNT_RE.fullmatch(value)
        ok = match is not None and sum(c.isdigit() for c in match["digits"]) <= 12
    elif kind == "time":
        ok = _time_ok(value)
    return None if ok else f"{kind} values are {rule}"


def _time_ok(value: str) -> bool:
    if not _TIME_ALPHABET_RE.fullmatch(value) or not any(c.isdigit() for c in value):
        return False
    for match in _CLOCK_RE.finditer(value):
        hour, minute, second = match.group(1), match.group(2), match.group(3)
        if int(hour) > 23 or int(minute) > 59 or (second is not None and int(second) > 59):
            return False
    return True


def check_values(values: Mapping[str, str]) -> None:
    """Raise `value_invalid` (naming the key and rule) for the first value breaking a value rule."""
    for key, value in values.items():
        problem = value_problem(key, value)
        if problem is not None:
            raise PushRejected("value_invalid", f"data.{key} {problem}", f"data.{key}", 422)


def check_keys(template_id: str, template_keys: Iterable[str], values: Mapping[str, str]) -> None:
    """Raise `template_mismatch` unless the data keys are the template's placeholders
    (first/remark of legacy templates may be omitted: WeChat no longer shows them)."""
    expected = list(template_keys)
    missing = [k for k in expected if k not in values and k not in OPTIONAL_LEGACY_KEYS]
    extra = [k for k in values if k not in expected]
    if not missing and not extra:
        return
    parts = []
    if missing:
        parts.append(f"missing {', '.join(missing)}")
    if extra:
        parts.append(f"not in the template {', '.join(extra)}")
    raise PushRejected(
        "template_mismatch",
        f"data keys do not match template {template_id} (placeholders: "
        f"{', '.join(expected) or 'none'}): {'; '.join(parts)}",
        "data", 422,
    )


def _parse_miniprogram(raw: Any, mp_appid: str | None) -> dict[str, str] | None:
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise PushRejected("invalid_field", "miniprogram must be an object "
                           "{\"appid\"?, \"pagepath\"}", "miniprogram")
    unknown = sorted(set(raw) - {"appid", "pagepath"})
    if unknown:
        raise PushRejected("invalid_field", f"miniprogram has unknown field {unknown[0]}; "
                           "it takes appid and pagepath", f"miniprogram.{unknown[0]}")
    pagepath = _required(raw, "pagepath", 1024, "miniprogram.")
    appid = _optional(raw, "appid", 64, "miniprogram.")
    if appid is None:
        if not mp_appid:
            raise PushRejected(
                "mini_program_not_configured",
                "miniprogram.appid is missing and no [mini_program] appid is configured",
                "miniprogram.appid", 422,
            )
        appid = mp_appid
    return {"appid": appid, "pagepath": pagepath}


def parse_request(raw: Any, mp_appid: str | None) -> PushRequest:
    """Shape-check one push request (the POST /v1/pushes body) without any template knowledge.

    Raises PushRejected: missing_field, invalid_field, invalid_data, misplaced_field,
    value_invalid, mini_program_not_configured. Template keys are checked later (check_keys),
    once the template is known; misplaced keys are re-checked then against its placeholders.
    """
    if not isinstance(raw, dict):
        raise PushRejected("invalid_body", "a push must be a JSON object")
    to_kind, to_value = _parse_to(raw)
    template_id = _required(raw, "template_id", MAX_TEMPLATE_ID)
    values = normalize_data(raw.get("data"))
    check_values(values)
    url = _optional(raw, "url", 2048)
    miniprogram = _parse_miniprogram(raw.get("miniprogram"), mp_appid)
    key = _optional(raw, "idempotency_key", MAX_IDEMPOTENCY_KEY)
    return PushRequest(to_kind, to_value, template_id, values, url, miniprogram, key)


def check_against_template(request: PushRequest, template_keys: Iterable[str] | None) -> None:
    """Misplaced-key and key-set checks for a parsed request. `template_keys` None means the
    template list could not be fetched: only keys that can never be placeholders are refused."""
    keys = tuple(template_keys) if template_keys is not None else ()
    declared = set(keys)
    for key in request.data:
        if key in MISPLACED and key not in declared:
            raise PushRejected("misplaced_field", MISPLACED[key], f"data.{key}")
    if template_keys is not None:
        check_keys(request.template_id, keys, request.data)
