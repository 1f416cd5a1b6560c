"""OA web authorization for the emulator: the authorize page's checks and redirect, single-use
codes, and /sns/oauth2/access_token's answers and errors.

Pure: stdlib and the sandbox's population only; must not import tornado.
https://developers.weixin.qq.com/doc/offiaccount/OA_Web_Apps/Wechat_webpage_authorization.html
https://developers.weixin.qq.com/doc/service/api/webdev/access/api_snsaccesstoken
"""

from __future__ import annotations

import random
import re
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from wxd.sandbox.population import Credentials, Person, openid_prefix

AUTHORIZE_PATH = "/connect/oauth2/authorize"
# The code is single use and expires after 5 minutes unused.
CODE_LIFETIME_S = 300
SCOPES = ("snsapi_base", "snsapi_userinfo")
# WeChat matches the authorize URL strictly, parameters in this order (forcePopup optional,
# after them); a wrongly ordered URL fails.
_ORDER = ("appid", "redirect_uri", "response_type", "scope", "state")
_STATE_RE = re.compile(r"[A-Za-z0-9]{0,128}")


@dataclass(frozen=True)
class Refused:
    """The authorize page showed an error instead of redirecting. `errcode` is WeChat's
    page code where one is documented (10003 redirect_uri domain, 10005 scope not allowed,
    10010 scope empty, 10011 redirect_uri empty, 10012 appid empty), else None."""

    errcode: int | None
    message: str


@dataclass(slots=True)
class _Code:
    openid: str
    appid: str
    scope: str
    issued_at: float
    snapshot: bool
    unionid: str | None
    used: bool = False


class WebAuthBook:
    """Issued authorization codes. `oauth_domain` is the OA's configured web-authorization
    domain (None: any redirect_uri host is accepted)."""

    def __init__(self, clock: Callable[[], float], rng: random.Random,
                 credentials: Credentials) -> None:
        self._clock = clock
        self._rng = rng
        self._credentials = credentials
        self._codes: dict[str, _Code] = {}
        self.oauth_domain: str | None = None

    def authorize(self, person: Person, url: str, *, fragment_seen: bool = True,
                  snapshot: bool = False, decline: bool = False) -> str | Refused:
        """What the authorize page does when `person` opens `url` inside WeChat: the
        redirect location (redirect_uri?code=CODE&state=STATE; without code when the person
        declines), or Refused. `fragment_seen` False for a browser's GET (browsers never send
        the #wechat_redirect fragment). `snapshot`: the person is on the snapshot page, so the
        code yields a virtual openid with is_snapshotuser=1 (WeChat does this for
        snsapi_userinfo used non-compliantly; the switch lets a client's refusal be tested
        with snsapi_base too)."""
        address, _, fragment = url.partition("#")
        if fragment_seen and fragment != "wechat_redirect":
            return Refused(None, "the URL must end with #wechat_redirect")
        parts = urllib.parse.urlsplit(address)
        if parts.path != AUTHORIZE_PATH:
            return Refused(None, f"not the authorize page {AUTHORIZE_PATH}")
        pairs = urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
        names = [name for name, _ in pairs]
        known = [name for name in names if name != "forcePopup"]
        if known != list(_ORDER[:len(known)]) or len(known) < 4 or len(set(names)) != len(names):
            return Refused(None, "parameters must be appid, redirect_uri, response_type, scope, "
                           "state, in this order")
        query = dict(pairs)
        appid = query["appid"]
        if not appid:
            return Refused(10012, "appid is empty")
        if appid != self._credentials.oa_appid:
            # A Mini Program appid cannot use web authorization (community: 10005).
            return Refused(10005, "this appid has no web-authorization permission")
        redirect = query["redirect_uri"]
        if not redirect:
            return Refused(10011, "redirect_uri is empty")
        target = urllib.parse.urlsplit(redirect)
        if target.scheme not in ("http", "https") or not target.hostname:
            return Refused(10003, "redirect_uri is not an absolute URL")
        if self.oauth_domain is not None and target.hostname != self.oauth_domain:
            return Refused(10003, "redirect_uri's domain is not the configured domain")
        if query["response_type"] != "code":
            return Refused(None, "response_type must be code")
        scope = query["scope"]
        if not scope:
            return Refused(10010, "scope is empty")
        if scope not in SCOPES:
            return Refused(10005, "scope not allowed")
        state = query.get("state", "")
        if not _STATE_RE.fullmatch(state):
            # Reported: a 235-character state was refused; the page's code is unconfirmed.
            return Refused(None, "state must be at most 128 letters and digits")
        separator = "&" if "?" in redirect else "?"
        if decline:
            return redirect + separator + urllib.parse.urlencode({"state": state})
        openid = person.oa_openid
        if snapshot:
            prefix = openid_prefix(self._credentials.oa_appid)
            openid = prefix + f"{self._rng.getrandbits(128):032x}"[:22]
        code = f"0{self._rng.getrandbits(124):031x}"
        self._codes[code] = _Code(openid, appid, scope, self._clock(), snapshot,
                                  person.unionid if not snapshot else None)
        return redirect + separator + urllib.parse.urlencode({"code": code, "state": state})

    def exchange(self, appid: str, code: str) -> dict[str, Any] | int:
        """/sns/oauth2/access_token's state change for a checked appid/secret: 41008 missing
        code, 40029 unknown (or issued for another appid), 40163 used, 42003 expired; else the
        answer (openid, scope, is_snapshotuser=1 for a snapshot user; unionid only with
        snsapi_userinfo)."""
        if not code:
            return 41008
        entry = self._codes.get(code)
        if entry is None or entry.appid != appid:
            return 40029
        if entry.used:
            return 40163
        if self._clock() - entry.issued_at >= CODE_LIFETIME_S:
            return 42003
        entry.used = True
        answer: dict[str, Any] = {
            "access_token": f"{self._rng.getrandbits(256):064x}",
            "expires_in": 7200,
            "refresh_token": f"{self._rng.getrandbits(256):064x}",
            "openid": entry.openid,
            "scope": entry.scope,
        }
        if entry.snapshot:
            answer["is_snapshotuser"] = 1
        if entry.scope == "snsapi_userinfo" and entry.unionid:
            answer["unionid"] = entry.unionid
        return answer
