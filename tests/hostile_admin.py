"""Hostile admin-API requests: bad auth, malformed JSON, wrong types, bad values, odd routes.

Part of the hostile-input generator (tests/hostile.py). Every request here must be answered
4xx with a JSON error body (or, for a batch of bad pushes, 202 with an error per item).
"""

from __future__ import annotations

import base64
import json
import random
from collections.abc import Callable
from typing import Any

from tests.hostile_model import Attack, Target, expect

PUSH_CODES = expect("missing_field", "invalid_field", "invalid_data", "misplaced_field",
                    "value_invalid", "template_mismatch", "template_unknown", "recipient_unknown",
                    "recipient_not_following", "invalid_body", "mini_program_not_configured")
SAMPLES = {"thing": "ok", "time": "2026年11月29日 12:00", "character_string": "A1", "amount": "1.5元",
           "phrase": "配送中", "phone_number": "0755-1234", "car_number": "粤A12345", "const": "ok"}
# (scheme and token) pairs that must all be refused; "{t}" is the real token.
BAD_AUTH = ("", "Bearer", "Bearer ", "Bearer wrong-token-wrong-token", "Basic {t}", "Token {t}",
            "Bearer {t}x", "Bearer {t_short}", "Bearer {t_upper}", "{t}", "Bearer: {t}",
            "Bearer {t} {t}", "Bearer " + "A" * 5000, "Bearer \t")
UNKNOWN_PATHS = ("/", "/v1", "/v1/", "/v2/pushes", "/v1/nope", "/v1/stats/", "/V1/stats", "/v1//stats",
                 "/admin", "/v1/pushes/", "/v1/tokens/OA", "/v1/tokens/oa/x", "/v1/users/1",
                 "/v1/pushes/..%2f..%2fetc%2fpasswd", "/v1/pushes/%2e%2e", "/v1/pushes/../../etc/passwd",
                 "/v1/pushes/a%00b", "/v1/pushes/x/delete", "/v1/stats%00", "/..",
                 "/%2e%2e/%2e%2e/etc/passwd",
                 "/v1/pushes/x/retry/again", "/metrics/", "/healthz/x", "/v1/backfill/run")


class AdminGen:
    """Builds admin requests; valid bodies are derived from the target's real ids when known."""

    def __init__(self, t: Target, rng: random.Random) -> None:
        self.t, self.rng = t, rng
        self._huge_body: bytes | None = None
        self._big_batch: bytes | None = None

    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.t.admin_token}"}

    def push(self) -> dict[str, Any]:
        """A push that would be queued (when the target knows a follower and a template)."""
        keys = self.t.template_keys or ("thing1", "time2")
        data = {k: SAMPLES.get(k.rstrip("0123456789"), "ok") for k in keys}
        push: dict[str, Any] = {"to": {"unionid": self.t.unionid or "oUnknownUnion"},
                                "template_id": self.t.template_id or "tpl", "data": data}
        if self.rng.random() < 0.3:
            push["url"] = "https://example.com/o/1"
        if self.rng.random() < 0.3:
            push["miniprogram"] = {"pagepath": "pages/index"}
        return push

    def push_id(self) -> str:
        return self.t.push_id or "p_nonexistent"

    def valid_posts(self) -> list[tuple[str, dict[str, Any] | None]]:
        """Every POST route with a body it would accept (None = empty body)."""
        pid = self.push_id()
        return [
            ("/v1/mp/login", {"code": f"code{self.rng.getrandbits(40)}"}),
            ("/v1/mp/decrypt", {"mp_openid": self.t.mp_openid or "oMP", "encrypted_data": "AAAA",
                                "iv": "AAAAAAAAAAAAAAAAAAAAAA=="}),
            ("/v1/pushes", self.push()), ("/v1/pushes/batch", {"pushes": [self.push()]}),
            (f"/v1/pushes/{pid}/retry", None), (f"/v1/pushes/{pid}/cancel", None),
            ("/v1/templates/refresh", None), ("/v1/backfill", None), ("/v1/backfill", {"force": True}),
        ]

    def gets(self) -> list[str]:
        return ["/metrics", "/v1/openapi.json", "/v1/stats", "/v1/tokens/oa", "/v1/tokens/mp",
                f"/v1/users?unionid={self.t.unionid or 'u'}", "/v1/pushes", f"/v1/pushes/{self.push_id()}",
                "/v1/templates", "/v1/backfill"]

    def attack(self, kind: str, method: str, path: str, body: bytes | dict[str, Any] | list[Any] | None,
               statuses: frozenset[int], codes: frozenset[str] = frozenset(),
               headers: dict[str, str] | None = None) -> Attack:
        if body is not None and not isinstance(body, bytes):
            body = json.dumps(body, ensure_ascii=False).encode()
        if body is None and method == "POST":
            body = b""
        hdrs = self.auth() if headers is None else headers
        if body is not None:
            hdrs = {**hdrs, "Content-Type": "application/json"}
        return Attack(f"admin.{kind}", "admin", method, path, body, hdrs, statuses, codes)

    def big_batch(self) -> bytes:
        """One push too many for a batch (shared, like huge_body)."""
        if self._big_batch is None:
            items = [{"to": {"unionid": "u"}, "template_id": "t", "data": {}}] * 5001
            self._big_batch = json.dumps({"pushes": items}).encode()
        return self._big_batch

    def huge_body(self) -> bytes:
        if self._huge_body is None:  # one shared buffer: the campaign holds it once
            size = self.t.admin_max_body + 1024
            self._huge_body = b'{"code": "' + b"x" * (size - 13) + b'"}'
        return self._huge_body


def _bad_auth(a: AdminGen) -> list[Attack]:
    token = a.t.admin_token
    header = a.rng.choice(BAD_AUTH).format(t=token, t_short=token[:-1], t_upper=token.upper())
    if header.strip() == f"Bearer {token}":  # e.g. a token without letters: upper() changed nothing
        header = "Bearer " + token[::-1] + "!"
    headers = {"Authorization": header} if header else {}
    r = a.rng.random()
    if r < 0.55:
        path, body = a.rng.choice(a.valid_posts())
        return [a.attack("no_auth.post", "POST", path, body, expect(401), expect("unauthorized"), headers)]
    if r < 0.9:
        return [a.attack("no_auth.get", "GET", a.rng.choice(a.gets()), None, expect(401),
                         expect("unauthorized"), headers)]
    return [a.attack("no_auth.unknown_route", a.rng.choice(("GET", "POST")), a.rng.choice(UNKNOWN_PATHS),
                     None, expect(401), expect("unauthorized"), headers)]


# Not here: UTF-16/32 with a BOM (b"\xff\xfe{\x00}\x00"): json.loads detects the encoding, so
# that is a valid {} (and an empty POST /v1/backfill body starts a run).
_BAD_JSON = (b"{", b"{'code': 'x'}", b"[1,", b"\xff\xfe{\x00", b"nul", b'{"a":1}}', b'{"a":1,}',
             b'{"a" 1}', b"\x00", b'{"code": "\xff"}', b"[" * 100_000, b'{"a":' * 50_000,
             b"[]", b"1", b'"code"', b"null", b"true", b"1e999", b'"\\ud800"', b"{}" * 2, b"\xef\xbb\xbf[]")


def _malformed_json(a: AdminGen) -> list[Attack]:
    path = a.rng.choice(("/v1/mp/login", "/v1/mp/decrypt", "/v1/pushes", "/v1/pushes/batch",
                         "/v1/backfill"))
    body = a.rng.choice(_BAD_JSON + (() if path == "/v1/backfill" else (b"", b"  ")))
    return [a.attack("malformed_json", "POST", path, body, expect(400),
                     expect("invalid_json", "invalid_body", "invalid_field", "missing_field"))]


_WRONG: tuple[Any, ...] = (1, 1.5, True, False, [], {}, [1, "a"], {"a": 1}, "", None, -1, 2**70)


def _wrong_types(a: AdminGen) -> list[Attack]:
    """One field of a valid body replaced by a value of the wrong type (or empty/absent)."""
    r = a.rng
    route = r.choice(("login", "decrypt", "push", "push", "push", "batch", "backfill"))
    long = "x" * r.choice((300, 3000, 70_000))
    if route == "login":
        body: Any = {"code": r.choice((*_WRONG, long))}
        if r.random() < 0.2:
            body = {"kode": "abc"}
        return [a.attack("wrong_type.login", "POST", "/v1/mp/login", body, expect(400),
                         expect("missing_field", "invalid_field"))]
    if route == "decrypt":
        [(_, base)] = [p for p in a.valid_posts() if p[0] == "/v1/mp/decrypt"]
        assert base is not None
        name = r.choice(("mp_openid", "encrypted_data", "iv"))
        body = {**base, name: r.choice((*_WRONG, long if name != "encrypted_data" else "x" * 70_000))}
        return [a.attack(f"wrong_type.decrypt.{name}", "POST", "/v1/mp/decrypt", body, expect(400),
                         expect("missing_field", "invalid_field"))]
    if route == "backfill":
        value: Any = r.choice(("yes", "true", 1, 0, None, [], {}, 1.0))
        return [a.attack("wrong_type.backfill", "POST", "/v1/backfill", {"force": value}, expect(400),
                         expect("invalid_field"))]
    push = _broken_push(a)
    if route == "push":
        return [a.attack("wrong_type.push", "POST", "/v1/pushes", push, expect(400, 422), PUSH_CODES)]
    pushes: Any = r.choice(([push] * r.randrange(1, 20), None, "x", {}, [], 1, {"pushes": []}))
    if isinstance(pushes, list) and pushes:
        return [Attack("admin.batch_all_bad", "admin", "POST", "/v1/pushes/batch",
                       json.dumps({"pushes": pushes}).encode(), a.auth(), expect(202))]
    return [a.attack("wrong_type.batch", "POST", "/v1/pushes/batch", {"pushes": pushes}, expect(400),
                     expect("invalid_body"))]


def _broken_push(a: AdminGen) -> dict[str, Any]:
    r = a.rng
    push = a.push()
    field = r.choice(("to", "to.unionid", "template_id", "data", "data.value", "url", "miniprogram",
                      "miniprogram.pagepath", "miniprogram.appid", "idempotency_key", "misplaced"))
    if field == "to":
        push["to"] = r.choice(("x", [], 1, None, {}, {"nope": "x"}, {"unionid": "u", "oa_openid": "o"},
                               {"unionid": None, "mp_openid": None}))
    elif field == "to.unionid":
        kind = r.choice(("unionid", "mp_openid", "oa_openid"))
        push["to"] = {kind: r.choice((1, [], {}, "", " ", "x" * 200))}
    elif field == "template_id":
        push["template_id"] = r.choice((1, None, "", [], {}, "x" * 200, " "))
    elif field == "data":
        push["data"] = r.choice((None, [], "x", 1, {"k": 1}, {"k": {"value": 1}}, {"k": {"val": "x"}},
                                 {"k": {"value": "x", "extra": 1}}, {"k": None}, {"k": ["v"]}))
    elif field == "data.value":
        key = next(iter(push["data"]))
        push["data"][key] = r.choice((1, None, [], {"value": None}, {"value": ["x"]}, True))
    elif field in ("url", "idempotency_key"):
        push[field] = r.choice((1, [], {}, "", " ", True, "x" * 3000))
    elif field == "miniprogram":
        push["miniprogram"] = r.choice(("x", [], 1, {}, {"path": "p"}, True))
    elif field == "miniprogram.pagepath":
        push["miniprogram"] = {"pagepath": r.choice((1, "", None, [], "x" * 2000))}
    elif field == "miniprogram.appid":
        push["miniprogram"] = {"pagepath": "p", "appid": r.choice((1, "", [], {}, "x" * 100))}
    else:
        push["data"] = {**push["data"], r.choice(("url", "miniprogram", "pagepath", "appid")): {"a": 1}}
    return push


def _bad_values(a: AdminGen) -> list[Attack]:
    """Well-typed requests that name things that do not exist or break WeChat's value rules."""
    r = a.rng
    push = a.push()
    choice = r.randrange(9)
    if choice == 0:
        push["to"] = {r.choice(("unionid", "mp_openid", "oa_openid")): f"oNobody{r.getrandbits(48)}"}
    elif choice == 1:
        push["template_id"] = f"no-such-template-{r.getrandbits(32)}"
    elif choice == 2:
        push["data"] = {**push["data"], "extra9": "x"} if r.random() < 0.5 else {}
    elif choice == 3:
        key = r.choice(list(push["data"]))
        push["data"][key] = "" if r.random() < 0.5 else "x" * 300
    if choice <= 3:
        if not (a.t.template_keys and a.t.unionid) and choice in (2, 3):
            push["to"] = {"unionid": "oNobody"}  # without real ids, fail on the recipient instead
        return [a.attack("bad_value.push", "POST", "/v1/pushes", push, expect(400, 422), PUSH_CODES)]
    pid = a.t.push_id
    if choice == 4 and pid:  # a push that is sent/delivered: neither retry nor cancel applies
        return [a.attack("bad_value.push_state", "POST", f"/v1/pushes/{pid}/{r.choice(('retry', 'cancel'))}",
                         None, expect(409), expect("invalid_state"))]
    if choice <= 5:
        missing = f"p{r.getrandbits(64):x}" if r.random() < 0.7 else "x" * 3000
        path = r.choice((f"/v1/pushes/{missing}", f"/v1/pushes/{missing}/retry",
                         f"/v1/pushes/{missing}/cancel"))
        return [a.attack("bad_value.unknown_push", "GET" if path.count("/") == 3 else "POST", path, None,
                         expect(404), expect("not_found"))]
    if choice == 6:
        key = r.choice(("unionid", "mp_openid", "oa_openid"))
        return [a.attack("bad_value.unknown_user", "GET", f"/v1/users?{key}=nobody{r.getrandbits(40)}",
                         None, expect(404), expect("user_not_found"))]
    if choice == 7:
        mp = a.t.mp_openid if a.t.mp_openid and r.random() < 0.7 else "oNotLoggedIn"
        iv = r.choice(("AAAAAAAAAAAAAAAAAAAAAA==", "!!", "AAAA"))
        data = r.choice(("AAAAAAAAAAAAAAAAAAAAAA==", "!!", base64.b64encode(r.randbytes(48)).decode()))
        return [a.attack("bad_value.decrypt", "POST", "/v1/mp/decrypt",
                         {"mp_openid": mp, "encrypted_data": data, "iv": iv}, expect(409, 422),
                         expect("not_logged_in", "session_key_expired", "watermark_mismatch"))]
    return [a.attack("bad_value.login_code", "POST", "/v1/mp/login", {"code": f"bogus{r.getrandbits(40)}"},
                     expect(400), expect("invalid_code"))]


def _bad_query(a: AdminGen) -> list[Attack]:
    r = a.rng
    cursor = base64.urlsafe_b64encode(r.choice((b"s" + b"9" * 30, b"x1", b"s-1", b"s", b"s1.5"))).decode()
    path = r.choice((
        "/v1/users", "/v1/users?unionid=", "/v1/users?unionid=a&mp_openid=b",
        "/v1/users?unionid=" + "u" * 300,
        "/v1/users?unionid=%ff%fe", "/v1/users?nope=1",
        "/v1/pushes?limit=abc", "/v1/pushes?limit=0", "/v1/pushes?limit=-1", "/v1/pushes?limit=100000",
        "/v1/pushes?limit=1e3", "/v1/pushes?limit=" + "9" * 5000, "/v1/pushes?status=bogus",
        "/v1/pushes?status=QUEUED", "/v1/pushes?cursor=!!!", "/v1/pushes?cursor=" + cursor,
        "/v1/pushes?status=%ff",
    ))
    return [a.attack("bad_query", "GET", path, None, expect(400),
                     expect("missing_field", "invalid_field", "invalid_query", "bad_request"))]


def _unknown_route(a: AdminGen) -> list[Attack]:
    path = a.rng.choice(UNKNOWN_PATHS)
    return [a.attack("unknown_route", a.rng.choice(("GET", "POST")), path, b"{}" if a.rng.random() < 0.5
                     else None, expect(404), expect("not_found"))]


def _wrong_method(a: AdminGen) -> list[Attack]:
    r = a.rng
    post_only = [p for p, _ in a.valid_posts() if p not in ("/v1/backfill", "/v1/pushes")]
    get_only = [g for g in a.gets() if not g.startswith(("/v1/pushes", "/v1/backfill"))] + ["/healthz"]
    choice = r.random()
    if choice < 0.4:
        method = r.choice(("DELETE", "PUT", "PATCH", "OPTIONS", "PROPFIND"))
        path = r.choice(post_only + get_only)
    elif choice < 0.6:
        method, path = "GET", r.choice(post_only)
    elif choice < 0.9:
        method, path = "POST", r.choice(get_only)
    else:
        method, path = "HEAD", r.choice(post_only + get_only)
    body = b"{}" if method in ("PUT", "PATCH", "POST") else None
    return [a.attack(f"wrong_method.{method}", method, path, body, expect(405), expect("method_not_allowed"))]


def _huge(a: AdminGen) -> list[Attack]:
    if a.rng.random() < 0.3:
        # Over [admin] max_body_bytes: a JSON 413 from JsonHandler.prepare.
        return [a.attack("huge.over_limit", "POST", "/v1/mp/login", a.huge_body(),
                         expect(413), expect("body_too_large"))]
    if a.rng.random() < 0.5:  # one push too many in a batch
        return [a.attack("huge.batch", "POST", "/v1/pushes/batch", a.big_batch(), expect(413),
                         expect("batch_too_large"))]
    size = a.rng.randrange(100_000, 400_000)
    body = {"code": "x" * size} if a.rng.random() < 0.5 else {**a.push(), "to": {"unionid": "u" * size}}
    return [a.attack("huge.field", "POST", "/v1/mp/login" if "code" in body else "/v1/pushes", body,
                     expect(400), expect("invalid_field", "missing_field"))]


ADMIN_FAMILIES: tuple[tuple[Callable[[AdminGen], list[Attack]], int], ...] = (
    (_bad_auth, 12), (_malformed_json, 6), (_wrong_types, 14), (_bad_values, 6), (_bad_query, 4),
    (_unknown_route, 4), (_wrong_method, 4), (_huge, 1),
)
