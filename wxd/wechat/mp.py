"""MiniProgramAPI: the Mini Program endpoints wxd uses (code2session needs no token).

Imports wxd.wechat.client only.
"""

from __future__ import annotations

from typing import Any

from wxd.wechat.client import WeChatClient


class MiniProgramAPI:
    """The Mini Program endpoints wxd uses. code2session takes the MP appid/secret, no token."""

    def __init__(self, client: WeChatClient, appid: str, secret: str) -> None:
        self._client = client
        self._appid = appid
        self._secret = secret

    def __repr__(self) -> str:
        return f"MiniProgramAPI(appid={self._appid!r})"

    async def code2session(self, code: str) -> dict[str, Any]:
        """/sns/jscode2session: openid, session_key and (when bound) unionid.

        The code is single use and lives 5 minutes (40029 invalid, 40163 already used), so the
        call is not replay-safe: if WeChat exchanged the code and the answer was lost, a resend
        would answer 40163 and a successful login would look like a bad code. A reset on a
        reused keep-alive connection therefore surfaces as a TransportError (the client asks
        wx.login for a new code).
        https://developers.weixin.qq.com/miniprogram/dev/OpenApiDoc/user-login/code2Session.html
        The answer holds the session_key: never log it or return it to a client.
        """
        return await self._client.call("GET", "/sns/jscode2session", params={
            "appid": self._appid, "secret": self._secret, "js_code": code,
            "grant_type": "authorization_code",
        }, replay_safe=False)
