"""The emulated WeChat API: request in, Answer out, with WeChat's shapes and error codes.

Pure and synchronous: stdlib and the sandbox's pure modules only; must not import tornado.
The tornado layer (app.py) only applies an Answer's delay and transport fault.

Scripted faults (faults.py) are applied here: "call"-stage rules in dispatch() before the
endpoint runs (errcodes, with 40164's errmsg naming the caller's address; user/get's empty
pages; transport faults), "duplicate"-stage rules where template/send detects a repeated
client_msg_id, and "report"-stage rules where it builds the TEMPLATESENDJOBFINISH.
"""

from __future__ import annotations

import base64
import bisect
import hashlib
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import cached_property
from json.encoder import encode_basestring
from typing import Any

from wxd.sandbox import qrcodes
from wxd.sandbox.fault_answers import call_facts, duplicate_answer, fault_body
from wxd.sandbox.faults import SEND_PATH, CallFacts
from wxd.sandbox.shapes import encode_json, error_body, strings_json, user_info, user_info_json
from wxd.sandbox.state import Call, FakeWeChat, decode_body
from wxd.sandbox.templates import check_data, check_miniprogram
from wxd.sandbox.token_book import TokenGrant, TokenRecord

USER_GET_PAGE = 10_000
TICKET_LIFETIME_S = 7200
BATCHGET_MAX = 100

_REDACTED = "<redacted>"
_SECRET_KEYS = frozenset({"access_token", "secret", "appsecret"})
_UNPARSED: Any = object()


@dataclass(frozen=True)
class Report:
    """A TEMPLATESENDJOBFINISH to push after an accepted message. `event_msgid` is the MsgID
    the event carries: the message's `msgid`, unless a "report:" fault made it 0 or None (no
    MsgID element)."""

    oa_openid: str
    msgid: int
    status: str
    event_msgid: int | None


@dataclass(frozen=True)
class Answer:
    """What to answer one API call with.

    `text` is the JSON answer as the HTTP layer sends it, None when no JSON is answered.
    `fault` is a transport fault for the tornado layer: "hang"/"reset" (nothing was processed),
    "hang_after"/"reset_after" (processed, answer lost), "http500". `delay_s` comes first.
    """

    status: int = 200
    text: str | None = None
    fault: str | None = None
    delay_s: float = 0.0
    report: Report | None = None

    @cached_property
    def body(self) -> dict[str, Any] | None:
        """`text` decoded (on first use: the HTTP layer needs only the text)."""
        return None if self.text is None else json.loads(self.text)


@dataclass(frozen=True)
class _Encoded:
    """A success answer without errcode that its endpoint encoded itself, exactly as
    encode_json would have encoded the body it stands for."""

    text: str


class _Reject(Exception):
    """Internal: ends an endpoint with an errcode (and an optional errmsg detail)."""

    def __init__(self, errcode: int, detail: str | None = None) -> None:
        super().__init__(errcode)
        self.errcode = errcode
        self.detail = detail


@dataclass
class _Ctx:
    fake: FakeWeChat
    query: dict[str, str]
    body: bytes
    app: str | None = None
    report: Report | None = None
    fault: str | None = None  # the kind of a "duplicate"/"report" fault that fired
    parsed: Any = _UNPARSED

    def parse(self) -> Any:
        """decode_body(body), decoded once."""
        if self.parsed is _UNPARSED:
            self.parsed = decode_body(self.body)
        return self.parsed

    def json_body(self) -> dict[str, Any]:
        """The body as a JSON object; WeChat answers 47001 to anything else (e.g. a form)."""
        value = self.parse()
        if not isinstance(value, dict):
            raise _Reject(47001)
        return value

    def require_token(self, app: str) -> TokenRecord:
        checked = self.fake.tokens.check(self.query.get("access_token"))
        if isinstance(checked, int):
            raise _Reject(checked)
        self.app = checked.app
        # Tokens are isolated per app: an MP token on an OA API is 48001.
        # https://developers.weixin.qq.com/doc/offiaccount/Basic_Information/Get_access_token.html
        if checked.app != app:
            raise _Reject(48001)
        return checked

    def require_app(self, appid: str | None, secret: str | None) -> str:
        if not appid:
            raise _Reject(41002)
        known = self.fake.app_for_appid(appid)
        if known is None:
            raise _Reject(40013)
        app, expected_secret = known
        self.app = app
        if not secret:
            raise _Reject(41004)
        if secret != expected_secret:
            raise _Reject(40125)
        return app


def _grant(result: TokenGrant | int) -> dict[str, Any]:
    if isinstance(result, int):
        raise _Reject(result)
    return {"access_token": result.token, "expires_in": result.expires_in}


def _token(ctx: _Ctx) -> dict[str, Any]:
    if ctx.query.get("grant_type") != "client_credential":
        raise _Reject(40002)
    app = ctx.require_app(ctx.query.get("appid"), ctx.query.get("secret"))
    return _grant(ctx.fake.tokens.issue_classic(app))


def _stable_token(ctx: _Ctx) -> dict[str, Any]:
    body = ctx.json_body()
    if body.get("grant_type") != "client_credential":
        raise _Reject(40002)
    appid, secret = body.get("appid"), body.get("secret")
    app = ctx.require_app(
        appid if isinstance(appid, str) else None, secret if isinstance(secret, str) else None
    )
    force = body.get("force_refresh", False)
    if not isinstance(force, bool):
        raise _Reject(47001)
    return _grant(ctx.fake.tokens.issue_stable(app, force))


def _user_get(ctx: _Ctx) -> dict[str, Any] | _Encoded:
    ctx.require_token("oa")
    fake = ctx.fake
    followers = fake.follower_openids
    next_openid = ctx.query.get("next_openid", "")
    start = 0
    if next_openid:
        # An openid this OA never issued is rejected (reported as 40003, unconfirmed); a known
        # openid that has since unfollowed still works as a position in the sorted list.
        if fake.by_oa_openid(next_openid) is None:
            raise _Reject(40003)
        start = bisect.bisect_right(followers, next_openid)
    page = followers[start : start + USER_GET_PAGE]
    if not page:
        # The call after the last page (and an empty account): count 0, no "data" key at all.
        return {"total": len(followers), "count": 0, "next_openid": ""}
    # Quirk: every non-empty page, the last one included, carries next_openid = its last openid.
    # Written directly (10,000 openids a page), as encode_json would write this dict:
    # {"total": ..., "count": ..., "data": {"openid": page}, "next_openid": page[-1]}.
    return _Encoded(
        f'{{"total":{len(followers)},"count":{len(page)},"data":{{"openid":{strings_json(page)}}},'
        f'"next_openid":{encode_basestring(page[-1])}}}'
    )


def _user_info(ctx: _Ctx) -> dict[str, Any]:
    ctx.require_token("oa")
    person = ctx.fake.by_oa_openid(ctx.query.get("openid", ""))
    if person is None:  # unknown, or another app's (MP) openid
        raise _Reject(40003)
    return user_info(person)


def _batchget(ctx: _Ctx) -> _Encoded:
    ctx.require_token("oa")
    user_list = ctx.json_body().get("user_list")
    if not isinstance(user_list, list):
        raise _Reject(47001)
    # WeChat's limit is 100 entries; the sandbox answers 40032 "invalid openid list size" to an
    # empty or longer list (WeChat's global code for that; the batchget doc names none):
    # https://developers.weixin.qq.com/doc/offiaccount/Getting_Started/Global_Return_Code.html
    if not user_list or len(user_list) > BATCHGET_MAX:
        raise _Reject(40032)
    by_oa_openid = ctx.fake.by_oa_openid
    people = []
    for item in user_list:
        openid = item.get("openid") if isinstance(item, dict) else None
        if not isinstance(openid, str):
            raise _Reject(47001)
        person = by_oa_openid(openid)
        if person is None:
            raise _Reject(40003)
        people.append(person)
    return _Encoded('{"user_info_list":[' + ",".join(map(user_info_json, people)) + "]}")


def _template_send(ctx: _Ctx) -> dict[str, Any]:
    ctx.require_token("oa")
    fake = ctx.fake
    body = ctx.json_body()
    touser = body.get("touser")
    if not isinstance(touser, str) or not touser:
        raise _Reject(40003)
    client_msg_id = body.get("client_msg_id")
    if client_msg_id is not None and not isinstance(client_msg_id, str):
        raise _Reject(47001)
    if client_msg_id:
        # Same openid + client_msg_id within 10 minutes: WeChat sends only one message. The
        # exact answer is unconfirmed: by default the sandbox answers success with the first
        # msgid, and a "dup:<mode>" fault picks any other reported answer. It comes before any
        # other check, so a retry after an unfollow still learns the msgid.
        msgid = fake.deduped_msgid(touser, client_msg_id)
        if msgid is not None:
            answer, ctx.fault = duplicate_answer(fake, touser, msgid)
            return answer
    template_id = body.get("template_id")
    if not isinstance(template_id, str) or not template_id:
        raise _Reject(40036)  # e.g. the field misspelled as "temlate_id" (community reports)
    template = fake.templates.get(template_id)
    if template is None:
        raise _Reject(40037)
    person = fake.by_oa_openid(touser)
    if person is None:  # unknown, or an MP openid
        raise _Reject(40003)
    if not person.follows:
        raise _Reject(43004)
    miniprogram = body.get("miniprogram")
    if miniprogram is not None:
        rejection = check_miniprogram(miniprogram, fake.credentials.mp_appid)
        if rejection is not None:
            raise _Reject(rejection.errcode, rejection.errmsg)
    data = body.get("data")
    if not isinstance(data, dict):
        raise _Reject(47003, "argument invalid! data invalid")
    rejection = check_data(template, data)
    if rejection is not None:
        raise _Reject(rejection.errcode, rejection.errmsg)
    url = body.get("url")
    msgid = fake.accept_message(
        person,
        template_id,
        data,
        url if isinstance(url, str) else None,
        miniprogram,
        client_msg_id or None,
    )
    if fake.webhook is not None:
        ctx.report = _report(ctx, person.oa_openid, msgid, fake.report_status_for(person))
    return {"errcode": 0, "errmsg": "ok", "msgid": msgid}


def _report(ctx: _Ctx, openid: str, msgid: int, status: str) -> Report | None:
    """The TEMPLATESENDJOBFINISH for an accepted message; a "report:" fault can make its MsgID
    0 or absent, or lose it (MsgID 0 was reported with client_msg_id set:
    https://developers.weixin.qq.com/community/personal/oCJUswwJ54BzNN0XkUvQKH5XOkCk/question)."""
    rule = ctx.fake.draw_fault(SEND_PATH, lambda: CallFacts("oa", frozenset({openid})), "report")
    if rule is None:
        return Report(openid, msgid, status, msgid)
    ctx.fault = rule.kind
    if rule.kind == "report:lost":
        return None
    return Report(openid, msgid, status, 0 if rule.kind == "report:msgid0" else None)


def _templates(ctx: _Ctx) -> dict[str, Any]:
    ctx.require_token("oa")
    return {"template_list": [t.as_json() for t in ctx.fake.templates.values()]}


def _getticket(ctx: _Ctx) -> dict[str, Any]:
    # https://developers.weixin.qq.com/doc/offiaccount/OA_Web_Apps/JS-SDK.html (附录1): a
    # ticket lives 7200 s. The emulator's ticket is a digest of the access_token it was asked
    # with: the same token gets the same ticket, a new token a new one.
    record = ctx.require_token("oa")
    kind = ctx.query.get("type")
    if kind not in ("jsapi", "wx_card"):
        raise _Reject(40097, "invalid args")
    digest = hashlib.sha512(f"{kind}:{record.token}".encode()).digest()
    ticket = base64.urlsafe_b64encode(digest).decode("ascii").rstrip("=")
    return {"errcode": 0, "errmsg": "ok", "ticket": ticket, "expires_in": TICKET_LIFETIME_S}


def _jscode2session(ctx: _Ctx) -> dict[str, Any]:
    query = ctx.query
    grant_type = query.get("grant_type")
    if grant_type is not None and grant_type != "authorization_code":
        raise _Reject(40002)
    app = ctx.require_app(query.get("appid"), query.get("secret"))
    if app != "mp":  # an OA appid cannot log a Mini Program user in
        raise _Reject(40013)
    result = ctx.fake.exchange_login_code(query.get("js_code", ""))
    if isinstance(result, int):
        raise _Reject(result)
    answer: dict[str, Any] = {"session_key": result.session_key, "openid": result.mp_openid}
    if result.unionid is not None:
        answer["unionid"] = result.unionid
    return answer


def _qrcode_create(ctx: _Ctx) -> dict[str, Any]:
    ctx.require_token("oa")
    code = ctx.fake.qrcodes.create(ctx.json_body())
    if isinstance(code, int):
        raise _Reject(code)
    return qrcodes.answer(code, ctx.fake.clock())


def _custom_send(ctx: _Ctx) -> dict[str, Any]:
    """custom/send: text or miniprogrampage, within the person's window (kefu.py)."""
    ctx.require_token("oa")
    fake = ctx.fake
    body = ctx.json_body()
    touser = body.get("touser")
    person = fake.by_oa_openid(touser) if isinstance(touser, str) else None
    if person is None:
        raise _Reject(40003)
    msgtype = body.get("msgtype")
    content = body.get(msgtype) if isinstance(msgtype, str) else None
    if not isinstance(content, dict):
        raise _Reject(47001)
    if msgtype == "text":
        if not isinstance(content.get("content"), str) or not content["content"]:
            raise _Reject(47001)
    elif msgtype == "miniprogrampage":
        # The card's appid must be a Mini Program linked to the OA (here: the emulated MP).
        if content.get("appid") != fake.credentials.mp_appid:
            raise _Reject(40013)
        for name in ("title", "pagepath"):
            if not isinstance(content.get(name), str) or not content[name]:
                raise _Reject(47001)
        if not isinstance(content.get("thumb_media_id"), str) or not content["thumb_media_id"]:
            raise _Reject(40007)
    elif msgtype not in ("image", "voice", "video", "music", "news", "mpnews", "msgmenu"):
        raise _Reject(47001)
    if not person.follows:
        raise _Reject(45015)
    errcode = fake.kefu.send(person.oa_openid, {"msgtype": msgtype, msgtype: content})
    if errcode:
        raise _Reject(errcode)
    return {"errcode": 0, "errmsg": "ok"}


def _oauth_access_token(ctx: _Ctx) -> dict[str, Any]:
    query = ctx.query
    if query.get("grant_type") != "authorization_code":
        raise _Reject(40002)
    appid = query.get("appid")
    ctx.require_app(appid, query.get("secret"))
    result = ctx.fake.webauth.exchange(appid or "", query.get("code", ""))
    if isinstance(result, int):
        raise _Reject(result)
    return result


_Endpoint = Callable[[_Ctx], dict[str, Any] | _Encoded]

ROUTES: Mapping[str, tuple[str, _Endpoint]] = {
    "/cgi-bin/token": ("GET", _token),
    "/cgi-bin/stable_token": ("POST", _stable_token),
    "/cgi-bin/user/get": ("GET", _user_get),
    "/cgi-bin/user/info": ("GET", _user_info),
    "/cgi-bin/user/info/batchget": ("POST", _batchget),
    "/cgi-bin/message/template/send": ("POST", _template_send),
    "/cgi-bin/template/get_all_private_template": ("GET", _templates),
    "/sns/jscode2session": ("GET", _jscode2session),
    "/cgi-bin/qrcode/create": ("POST", _qrcode_create),
    "/cgi-bin/message/custom/send": ("POST", _custom_send),
    "/sns/oauth2/access_token": ("GET", _oauth_access_token),
    "/cgi-bin/ticket/getticket": ("GET", _getticket),
}


def _redact(query: Mapping[str, str]) -> dict[str, str]:
    return {k: (_REDACTED if k in _SECRET_KEYS else v) for k, v in query.items()}


def _logged_body(ctx: _Ctx) -> bytes:
    """The body as the call log keeps it: as received, unless it is a JSON object with a
    secret; that is re-encoded with the secret redacted (as ASCII JSON, which decodes back to
    an equal value: even a lone surrogate survives)."""
    value = ctx.parse()
    if isinstance(value, dict) and "secret" in value:
        return json.dumps({**value, "secret": _REDACTED}).encode("ascii")
    return ctx.body


def _encode(answer: dict[str, Any] | _Encoded | None) -> tuple[str | None, int | None]:
    """An answer's JSON text and errcode (0 for a success without one); None for both when
    no JSON is answered."""
    if answer is None:
        return None, None
    if isinstance(answer, _Encoded):
        return answer.text, 0
    errcode = answer.get("errcode", 0)
    return encode_json(answer), errcode if isinstance(errcode, int) else None


def dispatch(
    fake: FakeWeChat,
    method: str,
    path: str,
    query: Mapping[str, str],
    body: bytes,
    remote_ip: str = "127.0.0.1",
) -> Answer:
    """Answer one API call and record it in fake.calls.

    Unknown paths answer HTTP 404 with errcode 40066 naming the path. A wrong method answers
    43001/43002 like WeChat. Otherwise the fault drawn for the path (scripted first, then
    fault_rate) replaces or follows the real processing. `remote_ip` is the caller's address
    as WeChat would see it (40164's errmsg names it).
    """
    route = ROUTES.get(path)
    ctx = _Ctx(fake, dict(query), body)
    status, fault, delay = 200, None, 0.0
    answer_body: dict[str, Any] | _Encoded | None
    if route is None:
        status = 404
        answer_body = error_body(fake, 40066, f"sandbox: no such endpoint {path} (invalid url)")
    elif route[0] != method:
        answer_body = error_body(fake, 43001 if route[0] == "GET" else 43002)
    else:
        delay = fake.next_latency()
        rule = fake.draw_fault(path, lambda: call_facts(fake, path, ctx.query, ctx.parse()))
        fault = rule.kind if rule is not None else None
        if fault is not None and fault.startswith("delay:"):
            delay += float(fault.removeprefix("delay:"))
            fault = None
        if fault in ("hang", "reset", "http500"):
            answer_body = None
            status = 500 if fault == "http500" else 200
        elif rule is not None and fault is not None and fault not in ("hang_after", "reset_after"):
            answer_body = fault_body(fake, rule, remote_ip)
        else:
            try:
                answer_body = route[1](ctx)
            except _Reject as reject:
                answer_body = error_body(fake, reject.errcode, reject.detail)
    text, errcode = _encode(answer_body)
    fake.record(
        Call(
            method=method,
            path=path,
            query=_redact(query),
            raw_body=_logged_body(ctx),
            status=status,
            errcode=None if fault in ("hang_after", "reset_after") else errcode,
            at=fake.clock(),
            app=ctx.app,
            fault=fault or ctx.fault,
        )
    )
    # For "hang_after"/"reset_after" the call was processed (a report may still go out), but the
    # tornado layer never delivers the answer.
    return Answer(status, text, fault, delay, ctx.report)
