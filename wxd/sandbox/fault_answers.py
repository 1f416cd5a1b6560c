"""What scripted faults answer: the facts their conditions read, and the JSON they answer.

Pure and synchronous: stdlib and the sandbox's pure modules only; must not import tornado.
endpoints.py decides when a rule is drawn; this module only builds answers.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from wxd.sandbox.faults import (
    BATCHGET_PATH,
    EMPTY_PAGE_KINDS,
    JSCODE2SESSION_PATH,
    OAUTH_TOKEN_PATH,
    SEND_PATH,
    STABLE_TOKEN_PATH,
    TOKEN_PATHS,
    USER_GET_PATH,
    USER_INFO_PATH,
    CallFacts,
    FaultRule,
)
from wxd.sandbox.shapes import error_body, whitelist_errmsg
from wxd.sandbox.state import FakeWeChat


def call_facts(fake: FakeWeChat, path: str, query: Mapping[str, str], body: Any) -> CallFacts:
    """What conditional fault rules may ask about a call, read without changing any state: the
    app its appid or access_token names, the openids it names, user/get's cursor. `body` is
    the decoded request body (decode_body)."""
    app: str | None = None
    if path in TOKEN_PATHS or path in (JSCODE2SESSION_PATH, OAUTH_TOKEN_PATH):
        appid: Any = query.get("appid")
        if path == STABLE_TOKEN_PATH:
            appid = body.get("appid") if isinstance(body, dict) else None
        known = fake.app_for_appid(appid) if isinstance(appid, str) else None
        app = known[0] if known is not None else None
    else:
        checked = fake.tokens.check(query.get("access_token"))
        app = None if isinstance(checked, int) else checked.app
    openids: list[Any] = []
    if path == USER_INFO_PATH:
        openids.append(query.get("openid"))
    elif path == SEND_PATH and isinstance(body, dict):
        openids.append(body.get("touser"))
    elif path == BATCHGET_PATH and isinstance(body, dict) and isinstance(body.get("user_list"), list):
        openids.extend(item.get("openid") for item in body["user_list"] if isinstance(item, dict))
    cursor = query.get("next_openid", "") if path == USER_GET_PATH else ""
    return CallFacts(app, frozenset(o for o in openids if isinstance(o, str)), cursor)


def fault_body(fake: FakeWeChat, rule: FaultRule, remote_ip: str) -> dict[str, Any]:
    """The JSON a "call"-stage errcode or empty-page fault answers instead of the endpoint."""
    if rule.kind in EMPTY_PAGE_KINDS:
        # A stale cursor: the end-of-list answer before the list is complete (or one without
        # even next_openid). https://developers.weixin.qq.com/community/develop/doc/00004a44da0088b5c171180f66bc00
        page: dict[str, Any] = {"total": len(fake.follower_openids), "count": 0}
        if rule.kind == "empty":
            page["next_openid"] = ""
        return page
    code = int(rule.kind)
    detail = rule.errmsg
    if detail is None and code == 40164:
        detail = whitelist_errmsg(rule.ip_for_next(remote_ip))
    return error_body(fake, code, detail)


def duplicate_answer(fake: FakeWeChat, touser: str, msgid: int) -> tuple[dict[str, Any], str | None]:
    """The answer to a repeated openid + client_msg_id and the kind of the fault that chose it:
    by default 0 with the first msgid, else what a "dup:<mode>" fault says
    (faults.DUPLICATE_MODES). The caller delivers nothing again.
    https://developers.weixin.qq.com/doc/offiaccount/Message_Management/Template_Message_Interface.html
    https://developers.weixin.qq.com/community/personal/oCJUsw8Jav7Un46Mw2Z_nWanCfec/question"""
    rule = fake.draw_fault(SEND_PATH, lambda: CallFacts("oa", frozenset({touser})), "duplicate")
    if rule is None:
        return {"errcode": 0, "errmsg": "ok", "msgid": msgid}, None
    mode = rule.kind.removeprefix("dup:")
    if mode == "ok":
        return {"errcode": 0, "errmsg": "ok", "msgid": msgid}, rule.kind
    if mode == "ok_no_msgid":
        return {"errcode": 0, "errmsg": "ok"}, rule.kind
    code, _, key = mode.partition("_")
    body = error_body(fake, int(code), rule.errmsg)
    if key:  # "msg_id" (the mass-send API's key) or "msgid": the first message's id
        body[key] = msgid
    return body, rule.kind
