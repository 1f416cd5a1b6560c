"""Hostile webhook requests: each family builds requests with exactly one defect.

Part of the hostile-input generator (tests/hostile.py). Uses wxd.wechat.crypto, wxd.wechat.messages and
pycryptodome to sign and encrypt exactly as WeChat would, except for the chosen defect.
"""

from __future__ import annotations

import base64
import random
import re
import urllib.parse
from collections.abc import Callable, Mapping

from Crypto.Cipher import AES

from tests.hostile_model import Attack, Target, expect
from wxd.wechat.crypto import MessageCrypto, decode_aes_key, sign
from wxd.wechat.messages import render_event_xml


class WebhookGen:
    """Builds webhook requests whose one defect is chosen by the caller."""

    def __init__(self, t: Target, rng: random.Random, clock: Callable[[], float]) -> None:
        self.t, self.rng, self.clock = t, rng, clock
        self.crypto = MessageCrypto(t.webhook_token, t.encoding_aes_key, t.oa_appid)
        self.key = decode_aes_key(t.encoding_aes_key)
        self._n = 0

    def nonce(self) -> str:
        self._n += 1
        return f"{self.rng.randrange(10**8)}{self._n:06d}"

    def fields(self) -> dict[str, str | int]:
        """A well-formed message or event (stored if it ever got past the checks)."""
        r = self.rng
        fields: dict[str, str | int] = {
            "ToUserName": self.t.oa_original_id, "FromUserName": f"o{r.getrandbits(128):032x}"[:28],
            "CreateTime": int(self.clock()) - r.randrange(60), "MsgType": "event",
        }
        kind = r.choice(("subscribe", "unsubscribe", "SCAN", "TEMPLATESENDJOBFINISH", "text"))
        if kind == "text":
            fields.update(MsgType="text", Content="héllo 你好 ]]>", MsgId=r.getrandbits(62))
        elif kind == "TEMPLATESENDJOBFINISH":
            fields.update(Event=kind, MsgID=r.getrandbits(40), Status="success")
        else:
            fields.update(Event=kind, EventKey=f"qrscene_{r.randrange(999)}" if kind != "unsubscribe"
                          else "")
        return fields

    def xml(self) -> str:
        return render_event_xml(self.fields())

    def encrypt(self, inner: str | bytes) -> str:
        data = inner.encode("utf-8") if isinstance(inner, str) else inner
        return self.raw_encrypt(self.rng.randbytes(16) + len(data).to_bytes(4, "big") + data
                                + self.t.oa_appid.encode(), pad=None)

    def raw_encrypt(self, plain: bytes, pad: bytes | None) -> str:
        """AES-256-CBC with the right key and iv; `pad` None = correct 32-byte PKCS#7."""
        if pad is None:
            n = 32 - len(plain) % 32
            pad = bytes([n]) * n
        cipher = AES.new(self.key, AES.MODE_CBC, iv=self.key[:16])
        return base64.b64encode(cipher.encrypt(plain + pad)).decode("ascii")

    def query(self, ts: str | None = None, nonce: str | None = None, encrypt: str | None = None,
              **override: str | None) -> dict[str, str | None]:
        """A correctly signed query (msg_signature too when `encrypt` is given)."""
        ts = ts if ts is not None else str(int(self.clock()))
        nonce = nonce if nonce is not None else self.nonce()
        token = self.t.webhook_token
        q: dict[str, str | None] = {"signature": sign(token, ts, nonce), "timestamp": ts,
                                    "nonce": nonce, "openid": "oHostile"}
        if encrypt is not None:
            q.update(encrypt_type="aes", msg_signature=sign(token, ts, nonce, encrypt))
        q.update(override)
        return q

    def envelope(self, encrypt: str) -> bytes:
        return render_event_xml({"ToUserName": self.t.oa_original_id, "Encrypt": encrypt}).encode()

    def body(self, mode: str | None = None) -> tuple[dict[str, str | None], bytes]:
        """A valid (query, body) in plain or safe mode."""
        mode = mode or self.rng.choice(("plain", "safe"))
        xml = self.xml()
        if mode == "plain":
            return self.query(), xml.encode()
        encrypt = self.crypto.encrypt(xml, random_prefix=self.rng.randbytes(16))
        return self.query(encrypt=encrypt), self.envelope(encrypt)

    def attack(self, kind: str, query: Mapping[str, str | None], body: bytes | None,
               statuses: frozenset[int], method: str = "POST", wave: int = 0,
               path: str | None = None) -> Attack:
        parts = [f"{k}={v if k == '#raw' else urllib.parse.quote(v, safe='')}"
                 for k, v in query.items() if v is not None]
        qs = "&".join(p.removeprefix("#raw=") for p in parts)
        return Attack(f"webhook.{kind}", "webhook", method,
                      f"{path or self.t.webhook_path}?{qs}", body,
                      {"Content-Type": "text/xml"} if body is not None else {}, statuses, wave=wave)

    def signed(self, kind: str, body: bytes, status: int = 400) -> Attack:
        """A correctly signed plain-mode POST of `body`."""
        return self.attack(kind, self.query(), body, expect(status))

    def sealed(self, kind: str, inner: str | bytes, status: int = 400) -> Attack:
        """`inner` correctly encrypted, msg_signature right: only the inner document is bad."""
        encrypt = self.encrypt(inner)
        return self.attack(kind, self.query(encrypt=encrypt), self.envelope(encrypt), expect(status))


# --- webhook attack families ---------------------------------------------------------------------

def _bad_signature(w: WebhookGen) -> list[Attack]:
    q, body = w.body()
    good = q["signature"] or ""
    token = w.t.webhook_token
    variants: list[tuple[str, str | None]] = [
        ("missing", None), ("empty", ""), ("random", f"{w.rng.getrandbits(160):040x}"),
        ("upper", good.upper()), ("truncated", good[:-1]), ("extended", good + "0"),
        ("other_token", sign(token + "x", q["timestamp"] or "", q["nonce"] or "")),
        ("unsorted", sign(token + (q["timestamp"] or "") + (q["nonce"] or ""))),
        ("non_ascii", "é" * 40), ("spaces", f" {good} "),
    ]
    name, sig = w.rng.choice(variants)
    attacks = [w.attack(f"bad_signature.{name}", {**q, "signature": sig}, body, expect(403))]
    if w.rng.random() < 0.3:  # missing timestamp / nonce, or an undecodable signature
        missing = w.rng.choice(("timestamp", "nonce"))
        attacks.append(w.attack(f"missing_{missing}", {**q, missing: None}, body, expect(403)))
        attacks.append(w.attack("bad_signature.not_utf8", {**q, "signature": None,
                                                          "#raw": "signature=%ff%fe"}, body, expect(400)))
    return attacks


def _bad_msg_signature(w: WebhookGen) -> list[Attack]:
    xml = w.xml()
    encrypt = w.crypto.encrypt(xml, random_prefix=w.rng.randbytes(16))
    q = w.query(encrypt=encrypt)
    wrong = w.rng.choice((None, "", q["signature"], f"{w.rng.getrandbits(160):040x}",
                          sign(w.t.webhook_token, q["timestamp"] or "", q["nonce"] or "", encrypt + "A")))
    compat = render_event_xml({**w.fields(), "Encrypt": encrypt}).encode()
    return [w.attack("bad_msg_signature", {**q, "msg_signature": wrong},
                     w.rng.choice((w.envelope(encrypt), compat)), expect(403))]


def _bad_timestamp(w: WebhookGen) -> list[Attack]:
    now = int(w.clock())
    window = int(w.t.replay_window_s)
    offset = w.rng.choice((1, -1)) * w.rng.randrange(window + 120, 10**9)
    stale = str(max(0, now + offset))
    odd = w.rng.choice(("abc", "1.7e9", f"-{now}", f" {now}", f"{now} ", f"0x{now:x}", "", "9" * 13,
                        "１７００００００００", f"{now}.5", "+" + str(now), "0"))
    ts = w.rng.choice((stale, odd))
    _, body = w.body("plain")
    nonce = w.nonce()
    q = {"signature": sign(w.t.webhook_token, ts, nonce), "timestamp": ts, "nonce": nonce}
    return [w.attack("stale_timestamp" if ts == stale else "bad_timestamp", q, body, expect(403))]


def _replayed_nonce(w: WebhookGen) -> list[Attack]:
    """Wave 0: a signed request with a bad body. Wave 1: the same query with a VALID body,
    which a missing nonce memory would store (plain mode signs only the query)."""
    q = w.query()
    first = w.rng.choice((b"<xml><oops", b"", w.xml().encode()[:-3]))
    return [w.attack("replay.first", q, first, expect(400)),
            w.attack("replay.valid_body", q, w.xml().encode(), expect(403), wave=1)]


def _truncated(w: WebhookGen) -> list[Attack]:
    doc = w.xml().encode()
    cut = doc[: w.rng.randrange(len(doc))]
    if w.rng.random() < 0.5:
        return [w.signed("truncated", cut)]
    return [w.sealed("truncated_inner", cut)]


_MALFORMED = (
    b"<xml><A>1</B></xml>", b"<xml><A>1</A></xml><xml/>", b"<xml>", b"</xml>", b"<xml><![CDATA[x</xml>",
    b"<xml>\x00</xml>", b'{"ToUserName": "gh"}', b"not xml at all", b"   ", b"<XML><A>1</A></XML>",
    b"<root><ToUserName>x</ToUserName></root>", b"<xml><A a='1>x</A></xml>", b"<xml><A>&#0;</A></xml>",
    b"<xml><A>&nope;</A></xml>", b"<xml><<A>1</A></xml>", b"<?xml version='1.0'?>", b"<xml/>trailing",
    b"<xml>" + b"<a>" * 40 + b"x" + b"</a>" * 40 + b"</xml>",
    b"<xml>" + b"<a>" * 5000 + b"</a>" * 5000 + b"</xml>",
    b"\xef\xbb\xbf\xef\xbb\xbf<xml/>",
)


def _malformed(w: WebhookGen) -> list[Attack]:
    doc = w.rng.choice(_MALFORMED)
    mutate = w.rng.random()
    if mutate < 0.3:  # a valid document with a broken close tag inside
        xml = w.xml()
        doc = xml.replace("</FromUserName>", "</FromUser>", 1).encode()
    if w.rng.random() < 0.7:
        return [w.signed("malformed", doc)]
    return [w.sealed("malformed_inner", doc)]


def _dtd(w: WebhookGen) -> list[Attack]:
    """Each trick wraps a message that would be stored if the declaration were allowed."""
    inner = w.xml().removeprefix("<xml>").removesuffix("</xml>")
    tricks = (
        '<!DOCTYPE xml [<!ENTITY lol "lol"><!ENTITY l2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">'
        '<!ENTITY l3 "&l2;&l2;&l2;&l2;&l2;&l2;&l2;&l2;&l2;&l2;">]><xml>{inner}<X>&l3;</X></xml>',
        '<!DOCTYPE xml [<!ENTITY xxe SYSTEM "file:///etc/passwd">]><xml>{inner}<X>&xxe;</X></xml>',
        '<!DOCTYPE xml [<!ENTITY xxe SYSTEM "http://127.0.0.1:9/x">]><xml>{inner}<X>&xxe;</X></xml>',
        '<!DOCTYPE xml [<!ENTITY % p SYSTEM "file:///etc/hostname"> %p;]><xml>{inner}</xml>',
        '<!DOCTYPE xml SYSTEM "http://127.0.0.1:9/x.dtd"><xml>{inner}</xml>',
        '<!DOCTYPE xml><xml>{inner}</xml>',
        '<!--<![CDATA[--><!DOCTYPE xml [<!ENTITY a "b">]><!--]]>--><xml>{inner}<X>&a;</X></xml>',
        '<?xml version="1.0"?><?xml-stylesheet href="file:///etc/passwd"?><xml>{inner}</xml>',
        '<xml><?php system("id"); ?>{inner}</xml>',
        '<!DoCtYpE xml [<!EnTiTy a "b">]><xml>{inner}</xml>',
    )
    doc = w.rng.choice(tricks).replace("{inner}", inner)
    if w.rng.random() < 0.6:
        return [w.signed("dtd", doc.encode())]
    return [w.sealed("dtd_inner", doc)]


def _huge(w: WebhookGen) -> list[Attack]:
    fields = w.fields()
    if w.rng.random() < 0.05:  # beyond the HTTP server's own cap: tornado refuses it itself
        size = w.t.webhook_server_cap + w.rng.randrange(1, 1 << 20)
        statuses = expect(400, 413, 599)
    else:
        size = w.t.webhook_max_body + w.rng.randrange(1, 3 * w.t.webhook_max_body)
        statuses = expect(413)
    fields.update(MsgType="text", Content="", MsgId=w.rng.getrandbits(62))
    doc = render_event_xml(fields).encode()
    body = doc.replace(b"<Content><![CDATA[]]>", b"<Content><![CDATA[" + b"A" * (size - len(doc)) + b"]]>")
    # Valid message, valid signature: only the size is wrong.
    return [w.attack("huge", w.query(), body, statuses)]


def _encoding(w: WebhookGen) -> list[Attack]:
    fields = w.fields()
    fields.update(MsgType="text", Content="café 中文 ñ", MsgId=w.rng.getrandbits(62))
    xml = render_event_xml(fields)
    choices: list[tuple[str, bytes]] = [
        ("utf16le", b"\xff\xfe" + xml.encode("utf-16-le")),
        ("utf16be", b"\xfe\xff" + xml.encode("utf-16-be")),
        ("utf16_nobom", xml.encode("utf-16-le")), ("latin1", xml.replace("中文", "").encode("latin-1")),
        ("gbk", xml.encode("gbk", "replace")), ("utf32", xml.encode("utf-32")),
        ("overlong", xml.encode().replace(b"caf\xc3\xa9", b"caf\xc0\xa9")),
        ("surrogate", xml.encode().replace(b"caf\xc3\xa9", b"caf\xed\xa0\x80")),
        ("lone_continuation", xml.encode().replace(b"caf\xc3\xa9", b"caf\x80")),
        ("decl_utf16", ('<?xml version="1.0" encoding="UTF-16"?>' + xml).encode("utf-16")),
    ]
    name, body = w.rng.choice(choices)
    try:
        body.decode("utf-8")
    except UnicodeDecodeError:
        pass
    else:  # the generator must never produce a valid UTF-8 document here
        raise AssertionError(f"encoding attack {name} is valid UTF-8")
    if w.rng.random() < 0.7:
        return [w.signed(f"encoding.{name}", body)]
    return [w.sealed(f"encoding_inner.{name}", body)]


def _bad_base64(w: WebhookGen) -> list[Attack]:
    good = w.crypto.encrypt(w.xml(), random_prefix=w.rng.randbytes(16))
    encrypt = w.rng.choice((
        "!!!!", good[:-1], good + "A", good.replace("+", "-").replace("/", "_") + "-_",
        good[:40] + " " + good[40:], good[:40] + "\n" + good[40:], good.rstrip("="), "é" + good,
        "====", "A", good[:-4] + "A===", base64.b64encode(b"short").decode(),
    ))
    if encrypt == good:  # impossible by construction; keep the campaign honest
        encrypt = "!" + good
    q = w.query(encrypt=encrypt)
    return [w.attack("bad_base64", q, w.envelope(encrypt), expect(400))]


def _bad_padding(w: WebhookGen) -> list[Attack]:
    data = w.xml().encode()
    plain = w.rng.randbytes(16) + len(data).to_bytes(4, "big") + data + w.t.oa_appid.encode()
    fill = (-len(plain)) % 16 or 16
    kind = w.rng.choice(("zero", "too_big", "inconsistent", "truncated", "wrong_key"))
    if kind == "zero":
        pad = bytes(fill - 1) + b"\x00"
    elif kind == "too_big":
        pad = bytes(fill - 1) + bytes([w.rng.randrange(33, 256)])
    elif kind == "inconsistent":
        fill += 16 if fill < 2 else 0
        pad = bytes([fill]) * (fill - 2) + bytes([(fill + 1) % 256]) + bytes([fill])
    else:
        pad = None
    encrypt = w.raw_encrypt(plain, pad)
    if kind == "truncated":  # ciphertext not a multiple of the block size
        raw = base64.b64decode(encrypt)
        encrypt = base64.b64encode(raw[: -w.rng.randrange(1, 16)]).decode()
    elif kind == "wrong_key":
        other = MessageCrypto(w.t.webhook_token, "".join(w.rng.choice("abcdefXYZ0123456789")
                                                         for _ in range(43)), w.t.oa_appid)
        encrypt = other.encrypt(data.decode(), random_prefix=w.rng.randbytes(16))
    return [w.attack(f"bad_padding.{kind}", w.query(encrypt=encrypt), w.envelope(encrypt), expect(400))]


def _wrong_appid(w: WebhookGen) -> list[Attack]:
    appid = w.t.oa_appid
    data = w.xml().encode()
    other = w.rng.choice(("wx0000000000000000", appid + "x", appid[:-1], "", appid.upper(),
                          "wx" + appid[2:][::-1]))
    length = len(data)
    kind = "wrong_appid"
    if w.rng.random() < 0.3:  # a lying length field instead
        kind = "bad_length_field"
        other = appid
        length = w.rng.choice((len(data) + 1, len(data) + 10**6, len(data) - 1, 0))
    plain = w.rng.randbytes(16) + length.to_bytes(4, "big") + data + other.encode()
    encrypt = w.raw_encrypt(plain, None)
    return [w.attack(kind, w.query(encrypt=encrypt), w.envelope(encrypt), expect(400))]


def _wrong_types(w: WebhookGen) -> list[Attack]:
    fields = w.fields()
    name, value = w.rng.choice((
        ("CreateTime", "abc"), ("CreateTime", "-5"), ("CreateTime", "1.5"), ("CreateTime", ""),
        ("CreateTime", "1e9"), ("CreateTime", "９９"), ("CreateTime", "1" * 25),
        ("ToUserName", ""), ("FromUserName", ""), ("MsgType", ""),
    ))
    fields[name] = value
    xml = render_event_xml(fields)
    if w.rng.random() < 0.3:  # a nested or repeated CreateTime
        ct = str(int(w.clock()))
        twice = f"<CreateTime>{ct}</CreateTime>" * 2
        xml = re.sub(r"<CreateTime>[^<]*</CreateTime>",
                     w.rng.choice((f"<CreateTime><a>{ct}</a></CreateTime>", twice)),
                     render_event_xml(w.fields()))
    return [w.signed("wrong_type", xml.encode()) if w.rng.random() < 0.6
            else w.sealed("wrong_type_inner", xml)]


def _missing_fields(w: WebhookGen) -> list[Attack]:
    fields = w.fields()
    required = ["ToUserName", "FromUserName", "CreateTime", "MsgType"]
    for name in w.rng.sample(required, w.rng.randrange(1, 5)):
        del fields[name]
    xml = render_event_xml(fields) if fields else w.rng.choice(("<xml/>", "<xml></xml>", "<xml>\n</xml>"))
    return [w.signed("missing_field", xml.encode()) if w.rng.random() < 0.6
            else w.sealed("missing_field_inner", xml)]


def _method_and_mode(w: WebhookGen) -> list[Attack]:
    q, body = w.body("plain")
    r = w.rng.random()
    if r < 0.4:
        method = w.rng.choice(("PUT", "DELETE", "PATCH", "OPTIONS", "PROPFIND", "TRACE"))
        return [w.attack(f"method.{method}", q, body if method not in ("TRACE",) else None, expect(405),
                         method=method)]
    if r < 0.5:
        return [w.attack("method.HEAD", q, None, expect(405), method="HEAD")]
    if r < 0.6:
        path = w.rng.choice((w.t.webhook_path + "/", w.t.webhook_path.upper(), w.t.webhook_path + "x",
                             "/", "/wechat/../wechat", "/%2e%2e/etc/passwd"))
        return [w.attack("unknown_path", q, body, expect(404), path=path)]
    if r < 0.7:  # the GET verification with a bad signature
        return [w.attack("get_bad_signature", {**q, "signature": "0" * 40, "echostr": "1"}, None,
                         expect(403), method="GET")]
    if r < 0.85:  # a valid plain message with an unknown encrypt_type
        return [w.attack("bad_encrypt_type", {**q, "encrypt_type": w.rng.choice(("des", "AES2", "x"))},
                         body, expect(400))]
    # encrypt_type=aes but no Encrypt element (the signature covers an empty Encrypt)
    return [w.attack("aes_without_encrypt", w.query(encrypt=""), body, expect(400))]


WEBHOOK_FAMILIES: tuple[tuple[Callable[[WebhookGen], list[Attack]], int], ...] = (
    (_bad_signature, 10), (_bad_msg_signature, 6), (_bad_timestamp, 8), (_replayed_nonce, 5),
    (_truncated, 6), (_malformed, 6), (_dtd, 6), (_huge, 1), (_encoding, 5), (_bad_base64, 5),
    (_bad_padding, 6), (_wrong_appid, 5), (_wrong_types, 5), (_missing_fields, 4),
    (_method_and_mode, 4),
)
