"""OfficialAccountAPI: the Official Account endpoints wxd uses, always with the OA's token.

Imports wxd.errors and wxd.wechat.client only.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from wxd.errors import NoMsgidError
from wxd.wechat.client import TokenSource, WeChatClient

# openids per /cgi-bin/user/info/batchget call:
# https://developers.weixin.qq.com/doc/offiaccount/User_Management/Get_users_basic_information_UnionID.html
BATCHGET_MAX = 100
# https://developers.weixin.qq.com/doc/offiaccount/Message_Management/Template_Message_Interface.html
SEND_PATH = "/cgi-bin/message/template/send"


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

    async def templates(self) -> list[dict[str, Any]]:
        """/cgi-bin/template/get_all_private_template: the OA's template_list."""
        answer = await self._client.call("GET", "/cgi-bin/template/get_all_private_template",
                                         token=self._token)
        items = answer.get("template_list")
        if not isinstance(items, list):
            return []
        return [item for item in items if isinstance(item, dict)]
