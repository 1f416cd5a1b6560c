"""Hostile requests at linking without unionid: the public /oauth/start and /oauth/callback
pages (state tampering, bad tokens and codes, repeated and oversized values, other methods)
and the admin /v1/links routes (bad bodies, open redirects, unknown ids).

Part of the hostile-input generator (tests/hostile.py). Every request here must be refused
(4xx) and link nothing. With a real pending link in the Target (oauth_token, oauth_state), the
tampered values sit one character away from valid ones; the valid pair itself is never sent.
"""

from __future__ import annotations

import random
import string
import urllib.parse
from collections.abc import Callable
from typing import Any

from tests.hostile_admin import AdminGen
from tests.hostile_model import Attack, Target, expect

ALNUM = string.ascii_letters + string.digits
BODY_CODES = expect("missing_field", "invalid_field", "invalid_json", "invalid_body",
                    "return_url_not_allowed")
OPEN_REDIRECTS = (
    "https://evil.example.com/", "https://{h}.evil.com/", "https://evil.com@{h}/",
    "https://{h}@evil.com/", "//{h}/", "javascript:alert(1)//{h}", "http://{h}/",
    "https://{h}\\@evil.com/", "https:/{h}/", "https://{h}:99999/", "https://{h}\t/",
    "https://{h}/" + "a" * 3000, "https://ｅvil.com/", "data:text/html,<script>", "https://{h}%2F@evil.com/",
    "https://evil.com#{h}", "https://evil.com?{h}", "ftp://{h}/", "https://{h}\r\nX: y/",
    "https://[::1]/", "https://{h}/\x00",
)


class OAuthGen:
    """Builds the requests; tampered values derive from the target's real ones when known."""

    def __init__(self, t: Target, rng: random.Random) -> None:
        self.t, self.rng = t, rng
        self.admin = AdminGen(t, rng)

    def token(self) -> str:
        return self.t.oauth_token or "T" * 32

    def state(self) -> str:
        return self.t.oauth_state or "S" * 32

    def code(self) -> str:
        return f"0{self.rng.getrandbits(124):031x}"

    def tamper(self, value: str) -> str:
        """A value one defect away from `value` (never `value` itself)."""
        r = self.rng
        choice = r.randrange(12)
        i = r.randrange(len(value))
        if choice == 0:
            other = r.choice([c for c in ALNUM if c != value[i]])
            result = value[:i] + other + value[i + 1:]  # one character changed
        elif choice == 1:
            result = value[:-1]  # one character short
        elif choice == 2:
            result = value + r.choice(ALNUM)  # one character long
        elif choice == 3:
            result = value.swapcase() if value.swapcase() != value else value + "x"
        elif choice == 4:
            result = value + r.choice(("!", "'", '"', "<", "%00", "%0a", " ", "-", "_", "é"))
        elif choice == 5:
            result = "a" * r.choice((129, 300, 2000, 16_000))  # oversized
        elif choice == 6:
            result = value[::-1] if value[::-1] != value else value + "y"
        elif choice == 7:
            result = ""
        elif choice == 8:
            result = value + "' OR '1'='1"
        elif choice == 9:
            result = "%ff%fe" + value  # not UTF-8 once decoded
        elif choice == 10:
            result = value.upper() + "Z" if value.upper() == value else value.upper()
        else:
            result = "../" + value
        assert result != value
        return result

    def page(self, kind: str, path: str, statuses: frozenset[int] = expect(400),
             method: str = "GET", body: bytes | None = None) -> Attack:
        return Attack(f"oauth.{kind}", "webhook", method, path, body, {}, statuses,
                      json_error=False)


def _quote(value: str) -> str:
    # Percent sequences in tampered values stay as they are (they test the decoding).
    return urllib.parse.quote(value, safe="%")


def _state_tampering(g: OAuthGen) -> list[Attack]:
    """A callback whose state is wrong: tampered, missing, repeated or misnamed."""
    r = g.rng
    code = g.code() if r.random() < 0.8 else r.choice(("", "x" * 300, "a b", "é"))
    state = g.tamper(g.state())
    form = r.randrange(6)
    if form == 0:
        query = f"code={_quote(code)}"
    elif form == 1:
        query = f"state={_quote(g.state())}&state={_quote(state)}&code={_quote(code)}"
    elif form == 2:
        query = f"code={_quote(code)}&State={_quote(g.state())}"
    else:
        query = f"code={_quote(code)}&state={_quote(state)}"
    return [g.page("state_tampering", f"/oauth/callback?{query}")]


def _bad_code(g: OAuthGen) -> list[Attack]:
    """The real state with a code WeChat never issued, or none: declined, oversized, odd."""
    r = g.rng
    code = r.choice((g.code(), "", "x" * 257, "x" * 5000, "a b", "<script>", "%ff", "é",
                     g.code() + "!", "0" * 32))
    query = f"state={_quote(g.state())}" + ("" if r.random() < 0.15 else f"&code={_quote(code)}")
    if r.random() < 0.1:
        query += f"&code={_quote(g.code())}"  # a repeated parameter
    return [g.page("bad_code", f"/oauth/callback?{query}")]


def _bad_start(g: OAuthGen) -> list[Attack]:
    r = g.rng
    form = r.randrange(4)
    if form == 0:
        path = "/oauth/start"
    elif form == 1:
        path = f"/oauth/start?t={_quote(g.token())}&t={_quote(g.tamper(g.token()))}"
    elif form == 2:
        path = f"/oauth/start?token={_quote(g.token())}"
    else:
        path = f"/oauth/start?t={_quote(g.tamper(g.token()))}"
    return [g.page("bad_start", path)]


def _oversized(g: OAuthGen) -> list[Attack]:
    """Values far past any limit; past tornado's header limit the connection may just close."""
    r = g.rng
    size = r.choice((600, 10_000, 40_000, 70_000))
    name = r.choice(("state", "code", "t"))
    path = r.choice(("/oauth/callback", "/oauth/start"))
    statuses = expect(400) if size < 60_000 else expect(400, 414, 431, 599)
    return [g.page("oversized", f"{path}?{name}={'A' * size}&state={g.state()[:5]}", statuses)]


def _other_methods(g: OAuthGen) -> list[Attack]:
    r = g.rng
    method = r.choice(("POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD"))
    path = r.choice((f"/oauth/start?t={_quote(g.tamper(g.token()))}",
                     "/oauth/callback?code=x&state=y",
                     f"/oauth/callback?code={g.code()}&state={_quote(g.tamper(g.state()))}"))
    body = b"" if method in ("POST", "PUT", "PATCH") else None
    return [g.page("method", path, expect(405), method, body)]


def _unknown_pages(g: OAuthGen) -> list[Attack]:
    path = g.rng.choice(("/oauth", "/oauth/", "/oauth/start/", "/oauth/callback/x", "/oauth/../wechat",
                         "/oauth/%2e%2e/wechat", "/OAUTH/start", "/oauth/start%00"))
    return [g.page("unknown_page", path, expect(400, 404))]


def _link_bodies(g: OAuthGen) -> list[Attack]:
    """Bad bodies for POST /v1/links/qrcodes and /v1/links/oauth."""
    r = g.rng
    path = r.choice(("/v1/links/qrcodes", "/v1/links/oauth"))
    mp_openid = g.t.mp_openid or "oMP"
    field = r.choice(("mp_openid", "expires_in", "return_url", "body"))
    body: Any
    if field == "mp_openid":
        body = {"mp_openid": r.choice((None, "", 1, [], {}, "a b", "x" * 200, "o/../x", "é", True))}
        if body["mp_openid"] is None:
            body = {}
    elif field == "expires_in":
        body = {"mp_openid": mp_openid,
                "expires_in": r.choice((0, 59, -1, 2_592_001 if path.endswith("qrcodes") else 86_401,
                                        "600", 1.5, True, None, [], 2**70))}
    elif field == "return_url" and path.endswith("oauth"):
        body = {"mp_openid": mp_openid, "return_url": r.choice((1, [], {}, True, "", "x"))}
    else:
        body = r.choice((b"{", b"[]", b"null", b"1", b"\xff", b"[" * 1000))
    return [g.admin.attack("link_bad_body", "POST", path, body, expect(400), BODY_CODES)]


def _open_redirect(g: OAuthGen) -> list[Attack]:
    host = g.t.return_host or "shop.example.com"
    url = g.rng.choice(OPEN_REDIRECTS).format(h=host)
    body = {"mp_openid": g.t.mp_openid or "oMP", "return_url": url}
    return [g.admin.attack("link_open_redirect", "POST", "/v1/links/oauth", body, expect(400),
                           expect("return_url_not_allowed"))]


def _unknown_links(g: OAuthGen) -> list[Attack]:
    r = g.rng
    choice = r.randrange(4)
    if choice == 0:
        path = r.choice(("/v1/links/qrcodes/", "/v1/links/oauth/")) + r.choice(
            (f"lq_{r.getrandbits(64):x}", f"lo_{r.getrandbits(64):x}", "x"))
        return [g.admin.attack("link_unknown_code", "GET", path, None, expect(404),
                               expect("link_code_not_found"))]
    if choice == 1:
        path = r.choice(("/v1/links/qrcodes/", "/v1/links/oauth/")) + r.choice(
            ("x" * 65, "a%20b", "..%2f..", "a/b", "%00"))
        return [g.admin.attack("link_bad_code_id", "GET", path, None, expect(404),
                               expect("not_found"))]
    if choice == 2:
        return [g.admin.attack("link_unknown", "DELETE",
                               f"/v1/links?mp_openid=oNobody{r.getrandbits(40)}", None,
                               expect(404), expect("link_not_found"))]
    query = r.choice(("", "?mp_openid=", "?mp_openid=a%20b", "?mp_openid=" + "x" * 300,
                      "?mp_openid=%ff", "?oa_openid=o1"))
    return [g.admin.attack("link_bad_delete", "DELETE", f"/v1/links{query}", None, expect(400),
                           expect("missing_field", "invalid_field", "bad_request"))]


OAUTH_FAMILIES: tuple[tuple[Callable[[OAuthGen], list[Attack]], int], ...] = (
    (_state_tampering, 10), (_bad_code, 6), (_bad_start, 6), (_oversized, 2), (_other_methods, 3),
    (_unknown_pages, 2), (_link_bodies, 6), (_open_redirect, 5), (_unknown_links, 4),
)
