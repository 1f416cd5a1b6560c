"""URLs a person's browser or the Mini Program opens (not API calls): the parametric QR code's
image and the OA web-authorization page.

Pure: stdlib only.
"""

from __future__ import annotations

import re
import urllib.parse
from dataclasses import dataclass

REAL_API_BASE = "https://api.weixin.qq.com"
# showqrcode lives on mp.weixin.qq.com, the authorize page on open.weixin.qq.com:
# https://developers.weixin.qq.com/doc/offiaccount/Account_Management/Generating_a_Parametric_QR_Code.html
# https://developers.weixin.qq.com/doc/offiaccount/OA_Web_Apps/Wechat_webpage_authorization.html
SHOWQRCODE_BASE = "https://mp.weixin.qq.com"
AUTHORIZE_BASE = "https://open.weixin.qq.com"
# `state` is echoed back by the authorize page: letters and digits only, at most 128 bytes.
STATE_RE = re.compile(r"[A-Za-z0-9]{1,128}")


@dataclass(frozen=True)
class WebBases:
    """Where the QR image (`mp`: /cgi-bin/showqrcode) and the authorize page (`open`:
    /connect/oauth2/authorize) are served."""

    mp: str
    open: str


def web_bases(api_base: str) -> WebBases:
    """WeChat's own hosts for the real API; for any other api_base (the sandbox, a test) that
    same base serves both pages, as the emulator does."""
    base = api_base.rstrip("/")
    if base == REAL_API_BASE:
        return WebBases(SHOWQRCODE_BASE, AUTHORIZE_BASE)
    return WebBases(base, base)


def showqrcode_url(ticket: str, base: str = SHOWQRCODE_BASE) -> str:
    """The image URL of a QR ticket. The ticket is base64 (+, / and = occur) and must be
    URL-encoded; the page needs no token and answers 404 for an expired ticket."""
    return f"{base.rstrip('/')}/cgi-bin/showqrcode?ticket={urllib.parse.quote(ticket, safe='')}"


def authorize_url(appid: str, redirect_uri: str, state: str, base: str = AUTHORIZE_BASE,
                  scope: str = "snsapi_base") -> str:
    """The OA web-authorization URL exactly as WeChat matches it: the parameters in the order
    appid, redirect_uri (fully URL-encoded), response_type=code, scope, state, then the
    mandatory #wechat_redirect fragment (also when reached through a 302). A wrongly ordered
    URL fails on WeChat's side. ValueError for a state outside [A-Za-z0-9]{1,128}.
    https://developers.weixin.qq.com/doc/offiaccount/OA_Web_Apps/Wechat_webpage_authorization.html
    """
    if not STATE_RE.fullmatch(state):
        raise ValueError("state must be 1..128 letters and digits")
    quote = urllib.parse.quote
    return (f"{base.rstrip('/')}/connect/oauth2/authorize?appid={quote(appid, safe='')}"
            f"&redirect_uri={quote(redirect_uri, safe='')}&response_type=code"
            f"&scope={quote(scope, safe='')}&state={state}#wechat_redirect")
