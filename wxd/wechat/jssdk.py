"""The JS-SDK `wx.config` signature over a jsapi_ticket (pure; standard library only).

https://developers.weixin.qq.com/doc/offiaccount/OA_Web_Apps/JS-SDK.html (附录1-JS-SDK使用权限签名算法)
"""

from __future__ import annotations

import hashlib
import secrets
import string

NONCE_ALPHABET = string.ascii_letters + string.digits
NONCE_LENGTH = 16


def page_url(url: str) -> str:
    """The URL as it is signed: everything before the first '#' (the query is kept as is)."""
    return url.split("#", 1)[0]


def signature(ticket: str, noncestr: str, timestamp: int, url: str) -> str:
    """sha1 hex of "jsapi_ticket=…&noncestr=…&timestamp=…&url=…": the fields sorted by name,
    raw values (no URL escaping), `url` without its #fragment."""
    text = f"jsapi_ticket={ticket}&noncestr={noncestr}&timestamp={timestamp}&url={page_url(url)}"
    return hashlib.sha1(text.encode("utf-8")).hexdigest()  # noqa: S324 - WeChat's algorithm


def new_nonce() -> str:
    """A random nonceStr: 16 letters and digits."""
    return "".join(secrets.choice(NONCE_ALPHABET) for _ in range(NONCE_LENGTH))
