"""WeChat's answer shapes shared by the emulated endpoints: errmsg texts, user/info, JSON text.

Pure: stdlib and the sandbox's pure modules only; must not import tornado.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Mapping
from json.encoder import encode_basestring
from typing import Any

from wxd.sandbox.population import Person
from wxd.sandbox.state import FakeWeChat

# errmsg texts as WeChat words them. A " rid: ..." suffix is appended, as current WeChat errors
# carry one; clients must match on errcode only.
# https://developers.weixin.qq.com/doc/offiaccount/Getting_Started/Global_Return_Code.html
ERRMSG: Mapping[int, str] = {
    -1: "system error",
    40001: "invalid credential, access_token is invalid or not latest",
    40002: "invalid grant_type",
    40003: "invalid openid",
    40007: "invalid media_id",
    40013: "invalid appid",
    40014: "invalid access_token",
    40029: "invalid code",
    40032: "invalid openid list size",
    40036: "invalid template_id size",
    40037: "invalid template_id",
    40053: "invalid action info, please check document",
    40066: "invalid url",
    40125: "invalid appsecret",
    40163: "code been used",
    40241: "The message is duplicate in 60 seconds",
    40243: "appsecret is frozen",  # wording unconfirmed
    41001: "access_token missing",
    41002: "appid missing",
    41004: "appsecret missing",
    41008: "missing code",
    42001: "access_token expired",
    42003: "code expired",
    43001: "require GET method",
    43002: "require POST method",
    43004: "require subscribe",
    43117: "Sending messages to this openid too frequently, please try later",
    45009: "reach max api daily quota limit",
    45011: "api minute-quota reach limit mustslower retry next minute",
    45015: "response out of time limit or subscription is canceled",
    45047: "out of response count limit",
    45065: "clientmsgid exist",
    45066: "retry too fast",
    47001: "data format error",
    47003: "argument invalid!",
    48001: "api unauthorized",
    # Wording of the following unconfirmed (the meanings are WeChat's).
    50005: "user is not a follower",
    61004: "access clientip is not registered, not in ip-white-list",
    89501: "this ip is waiting for the admin's confirmation",
    89503: "this ip needs the admin's confirmation",
    89506: "this ip was refused twice by the admin in 24 hours",
    89507: "this ip was refused by the admin within the last hour",
}


def encode_json(value: Any) -> str:
    """JSON text as the emulator answers: compact, non-ASCII characters as they are."""
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


# What encode_json escapes in a string: control characters, the quotation mark, the backslash.
_ESCAPED_ASCII = bytes(range(0x20)) + b'"\\'


def strings_json(values: list[str]) -> str:
    """encode_json(values) for a list of strings. A list of plain ASCII strings (nothing to
    escape: a user/get page of 10,000 openids) is joined without the generic encoder."""
    joined = "".join(values)
    if values and joined.isascii():
        raw = joined.encode("ascii")
        if len(raw.translate(None, _ESCAPED_ASCII)) == len(raw):
            return '["' + '","'.join(values) + '"]'
    return encode_json(values)


def whitelist_errmsg(ip: str) -> str:
    """40164's errmsg for a caller at `ip`, as WeChat words it: an IPv4 address appears twice,
    the second time in its IPv6-mapped form ("invalid ip 1.2.3.4 ipv6 ::ffff:1.2.3.4, not in
    whitelist"). https://developers.weixin.qq.com/doc/offiaccount/Basic_Information/Get_access_token.html"""
    address = ipaddress.ip_address(ip)
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    mapped = f"::ffff:{address}" if address.version == 4 else str(address)
    return f"invalid ip {address} ipv6 {mapped}, not in whitelist"


def error_body(fake: FakeWeChat, errcode: int, detail: str | None = None) -> dict[str, Any]:
    """WeChat's error JSON: {"errcode": N, "errmsg": "<text> rid: <id>"}."""
    text = detail or ERRMSG.get(errcode, "sandbox scripted error")
    return {"errcode": errcode, "errmsg": f"{text} rid: {fake.next_rid()}"}


def user_info(person: Person) -> dict[str, Any]:
    """The user/info shape. Non-followers get subscribe=0 and no unionid; nickname,
    avatar, sex and region are blank since 2021/2023 but the keys remain.
    user_info_json writes the same shape as text: change both together.
    https://developers.weixin.qq.com/doc/offiaccount/User_Management/Get_users_basic_information_UnionID.html"""
    base: dict[str, Any] = {
        "subscribe": 1 if person.follows else 0,
        "openid": person.oa_openid,
        "nickname": "",
        "sex": 0,
        "language": "zh_CN",
        "city": "",
        "province": "",
        "country": "",
        "headimgurl": "",
    }
    if not person.follows:
        base["tagid_list"] = []
        return base
    base["subscribe_time"] = person.subscribe_time
    if person.unionid is not None:
        base["unionid"] = person.unionid
    base.update(
        remark="",
        groupid=0,
        tagid_list=[],
        subscribe_scene=person.subscribe_scene,
        qr_scene=person.qr_scene,
        qr_scene_str=person.qr_scene_str,
    )
    return base


def user_info_json(person: Person) -> str:
    """encode_json(user_info(person)), character for character, without the dict and the
    generic encoder (batchget answers 100 of these a call). Person fields must hold their
    annotated types."""
    quote = encode_basestring  # json's own string encoder for ensure_ascii=False
    head = (
        f'{{"subscribe":{1 if person.follows else 0},"openid":{quote(person.oa_openid)},'
        '"nickname":"","sex":0,"language":"zh_CN","city":"","province":"","country":"",'
        '"headimgurl":""'
    )
    if not person.follows:
        return head + ',"tagid_list":[]}'
    unionid = "" if person.unionid is None else f',"unionid":{quote(person.unionid)}'
    return (
        f'{head},"subscribe_time":{person.subscribe_time}{unionid},"remark":"","groupid":0,'
        f'"tagid_list":[],"subscribe_scene":{quote(person.subscribe_scene)},'
        f'"qr_scene":{person.qr_scene},"qr_scene_str":{quote(person.qr_scene_str)}}}'
    )
