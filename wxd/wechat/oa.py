"""OfficialAccountAPI: the Official Account endpoints wxd uses, always with the OA's token;
WebAuthAPI: the OA web-authorization code exchange (the OA's appid and secret, no token).

Imports wxd.errors and wxd.wechat.client only.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from wxd.errors import NoMsgidError, TransportError
from wxd.wechat.client import TokenSource, WeChatClient

# openids per /cgi-bin/user/info/batchget call:
# https://developers.weixin.qq.com/doc/offiaccount/User_Management/Get_users_basic_information_UnionID.html
BATCHGET_MAX = 100
# https://developers.weixin.qq.com/doc/offiaccount/Message_Management/Template_Message_Interface.html
SEND_PATH = "/cgi-bin/message/template/send"
# A temporary parametric QR code lives at most 30 days; without expire_seconds WeChat uses 60 s
# (older pages: 30 s), so wxd always sends it. scene_str is 1..64 characters.
# https://developers.weixin.qq.com/doc/offiaccount/Account_Management/Generating_a_Parametric_QR_Code.html
QRCODE_MAX_EXPIRE_S = 2_592_000
SCENE_STR_MAX = 64
TICKET_PATH = "/cgi-bin/ticket/getticket"


class OfficialAccountAPI:
    """The Official Account endpoints wxd uses, always with the OA's TokenSource."""

    def __init__(self, client: WeChatClient, token: TokenSource) -> None:
        self._client = client
        self._token = token

    async def user_get(self, next_openid: str = "") -> dict[str, Any]:
        """One raw page of /cgi-bin/user/get: total, count, data? {openid: [...]}, next_openid.

        Quirk: the last full page still carries a next_openid; the call after it answers
        count 0 without `data`. Callers stop on count == 0, no data or an empty next_openid.
        """
        params = {"next_openid": next_openid} if next_openid else None
        return await self._client.call("GET", "/cgi-bin/user/get", params=params,
                                       token=self._token)

    async def user_info(self, openid: str) -> dict[str, Any]:
        """/cgi-bin/user/info for one OA openid (unionid only while the user follows)."""
        return await self._client.call("GET", "/cgi-bin/user/info",
                                       params={"openid": openid, "lang": "zh_CN"},
                                       token=self._token)

    async def batchget(self, openids: Sequence[str]) -> list[dict[str, Any]]:
        """/cgi-bin/user/info/batchget: 1..100 OA openids → their user_info_list entries."""
        if not 0 < len(openids) <= BATCHGET_MAX:
            raise ValueError(f"batchget takes 1..{BATCHGET_MAX} openids, got {len(openids)}")
        answer = await self._client.call(
            "POST", "/cgi-bin/user/info/batchget",
            body={"user_list": [{"openid": openid, "lang": "zh_CN"} for openid in openids]},
            token=self._token,
        )
        infos = answer.get("user_info_list")
        if not isinstance(infos, list):
            return []
        return [info for info in infos if isinstance(info, dict)]

    async def send_template(self, body: Mapping[str, Any]) -> str:
        """/cgi-bin/message/template/send; returns the msgid as a string (it is an int64).

        errcode 0 means accepted, not delivered: TEMPLATESENDJOBFINISH reports delivery.
        errcode 0 without a msgid raises NoMsgidError (a TransportError carrying the answer):
        retried on a first send, one of the duplicate answers on a resend of the same
        client_msg_id (wxd.retry.duplicate_send decides; this method does not know which).
        """
        answer = await self._client.call("POST", SEND_PATH, body=body, token=self._token)
        msgid = answer.get("msgid")
        if isinstance(msgid, bool) or not isinstance(msgid, (int, str)) or msgid == "":
            raise NoMsgidError(f"{SEND_PATH}: the answer has no msgid", SEND_PATH, answer)
        return str(msgid)

    async def jsapi_ticket(self) -> tuple[str, float]:
        """(jsapi_ticket, expires_in seconds) from /cgi-bin/ticket/getticket?type=jsapi.

        Its quota is small and unpublished: hold the ticket centrally, like the access_token.
        https://developers.weixin.qq.com/doc/offiaccount/OA_Web_Apps/JS-SDK.html (附录1)
        """
        answer = await self._client.call("GET", TICKET_PATH, params={"type": "jsapi"},
                                         token=self._token)
        ticket = answer.get("ticket")
        expires_in = answer.get("expires_in")
        if (not isinstance(ticket, str) or not ticket
                or isinstance(expires_in, bool) or not isinstance(expires_in, (int, float))):
            raise TransportError(f"{TICKET_PATH}: the answer has no ticket/expires_in",
                                 TICKET_PATH, 200)
        return ticket, float(expires_in)

    async def templates(self) -> list[dict[str, Any]]:
        """/cgi-bin/template/get_all_private_template: the OA's template_list."""
        answer = await self._client.call("GET", "/cgi-bin/template/get_all_private_template",
                                         token=self._token)
        items = answer.get("template_list")
        if not isinstance(items, list):
            return []
        return [item for item in items if isinstance(item, dict)]

    async def create_qrcode(self, scene_str: str, expire_seconds: int) -> dict[str, Any]:
        """/cgi-bin/qrcode/create for a temporary string-scene code (QR_STR_SCENE): the answer's
        ticket (exchange it for the image at showqrcode), url (the QR's content) and
        expire_seconds. The `scene` wrapper is mandatory (without it events carry scene 0).
        One report has expire_seconds 0 in the answer while the code honoured the request:
        callers compute the expiry from their own request.
        https://developers.weixin.qq.com/doc/service/api/qrcode/qrcodes/api_createqrcode.md
        """
        if not 0 < len(scene_str) <= SCENE_STR_MAX:
            raise ValueError(f"scene_str must be 1..{SCENE_STR_MAX} characters")
        if not 0 < expire_seconds <= QRCODE_MAX_EXPIRE_S:
            raise ValueError(f"expire_seconds must be 1..{QRCODE_MAX_EXPIRE_S}")
        answer = await self._client.call("POST", "/cgi-bin/qrcode/create", body={
            "expire_seconds": expire_seconds, "action_name": "QR_STR_SCENE",
            "action_info": {"scene": {"scene_str": scene_str}},
        }, token=self._token)
        ticket = answer.get("ticket")
        if not isinstance(ticket, str) or not ticket:
            raise TransportError("/cgi-bin/qrcode/create: the answer has no ticket",
                                 "/cgi-bin/qrcode/create", 200)
        return answer

    async def send_custom(self, body: Mapping[str, Any]) -> None:
        """/cgi-bin/message/custom/send (a customer-service message). WeChat allows a few
        right after a user's follow, scan, menu click or message (3 within a minute after a
        follow or scan), 45015 outside the window, 45047 past the count. Not replay-safe: a
        resend after a lost answer could deliver the message twice (no dedupe key exists).
        https://developers.weixin.qq.com/doc/offiaccount/Message_Management/Service_Center_messages.html
        https://developers.weixin.qq.com/doc/service/api/customer/message/api_sendcustommessage
        """
        await self._client.call("POST", "/cgi-bin/message/custom/send", body=body,
                                token=self._token, replay_safe=False)


class WebAuthAPI:
    """OA web authorization (网页授权): exchanging the `code` the authorize page gave the
    browser. Uses the OA's appid and secret, no access_token."""

    def __init__(self, client: WeChatClient, appid: str, secret: str) -> None:
        self._client = client
        self.appid = appid
        self._secret = secret

    def __repr__(self) -> str:
        return f"WebAuthAPI(appid={self.appid!r})"

    async def exchange_code(self, code: str) -> dict[str, Any]:
        """/sns/oauth2/access_token: openid, scope, and is_snapshotuser=1 for a snapshot-page
        (virtual) user; snsapi_base returns no unionid. The code is single use and lives 5
        minutes (40029 invalid, 40163 used, 42003 expired); never resent after a lost answer
        (replay_safe=False): a second exchange of one code only gets 40163. The answer holds a
        user access_token and refresh_token: never log or return them.
        https://developers.weixin.qq.com/doc/service/api/webdev/access/api_snsaccesstoken
        """
        return await self._client.call("GET", "/sns/oauth2/access_token", params={
            "appid": self.appid, "secret": self._secret, "code": code,
            "grant_type": "authorization_code",
        }, replay_safe=False)
