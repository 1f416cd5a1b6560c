"""Parametric QR codes for the emulator: /cgi-bin/qrcode/create's rules, tickets and expiry.

Pure: stdlib only; must not import tornado. Time comes from the injected clock (unix seconds).
https://developers.weixin.qq.com/doc/offiaccount/Account_Management/Generating_a_Parametric_QR_Code.html
"""

from __future__ import annotations

import base64
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

ACTIONS = ("QR_SCENE", "QR_STR_SCENE", "QR_LIMIT_SCENE", "QR_LIMIT_STR_SCENE")
# Without expire_seconds a temporary code lives 60 s (older pages: 30 s); at most 30 days.
DEFAULT_EXPIRE_S = 60
MAX_EXPIRE_S = 2_592_000
# Permanent codes: scene_id 1..100000, at most 100,000 codes per account. Temporary scene_id:
# a 32-bit non-zero integer. scene_str: 1..64 characters.
PERMANENT_SCENE_MAX = 100_000
PERMANENT_COUNT_MAX = 100_000
TEMP_SCENE_MAX = 2**32 - 1
SCENE_STR_MAX = 64


@dataclass(slots=True)
class QrCode:
    """One created code. `scene` is the text events carry (an int scene in decimal);
    `expires_at` is None for a permanent code."""

    ticket: str
    action: str
    scene: str
    created_at: float
    expires_at: float | None
    url: str

    @property
    def permanent(self) -> bool:
        return self.expires_at is None

    @property
    def string_scene(self) -> bool:
        return self.action in ("QR_STR_SCENE", "QR_LIMIT_STR_SCENE")


class QrBook:
    """Every QR code the emulated OA created, by ticket."""

    def __init__(self, clock: Callable[[], float], rng: random.Random) -> None:
        self._clock = clock
        self._rng = rng
        self._codes: dict[str, QrCode] = {}
        self._permanent = 0

    def create(self, body: dict[str, Any]) -> QrCode | int:
        """Create a code from a qrcode/create body; an errcode when WeChat would refuse it:
        40053 for a bad action_name/action_info/scene, 47001 for a non-integer
        expire_seconds, 45009 past the permanent-code count (that errcode is unconfirmed).
        Quirks kept: action_info without the `scene` wrapper makes a code whose events carry
        scene 0; an expire_seconds above 30 days is cut to 30 days (unconfirmed)."""
        action = body.get("action_name")
        if action not in ACTIONS:
            return 40053
        info = body.get("action_info")
        if not isinstance(info, dict):
            return 40053
        scene_obj = info.get("scene")
        string_scene = action in ("QR_STR_SCENE", "QR_LIMIT_STR_SCENE")
        if not isinstance(scene_obj, dict):
            # Reported: {"action_info": {"scene_id": 123}} yields qrscene_0 / 0 events.
            scene = "0"
        elif string_scene:
            text = scene_obj.get("scene_str")
            if not isinstance(text, str) or not 0 < len(text) <= SCENE_STR_MAX:
                return 40053
            scene = text
        else:
            number = scene_obj.get("scene_id")
            limit = PERMANENT_SCENE_MAX if action == "QR_LIMIT_SCENE" else TEMP_SCENE_MAX
            if isinstance(number, bool) or not isinstance(number, int) or not 0 < number <= limit:
                return 40053
            scene = str(number)
        now = self._clock()
        expires_at: float | None = None
        if action in ("QR_SCENE", "QR_STR_SCENE"):
            seconds = body.get("expire_seconds", DEFAULT_EXPIRE_S)
            if isinstance(seconds, bool) or not isinstance(seconds, int):
                return 47001
            if seconds <= 0:
                seconds = DEFAULT_EXPIRE_S
            expires_at = now + min(seconds, MAX_EXPIRE_S)
        elif self._permanent >= PERMANENT_COUNT_MAX:
            return 45009
        else:
            self._permanent += 1
        # Real tickets are standard base64 (with +, / and = padding): clients must URL-encode.
        ticket = "gQ" + base64.b64encode(self._rng.randbytes(46)).decode("ascii")
        url = "http://weixin.qq.com/q/" + base64.urlsafe_b64encode(
            self._rng.randbytes(16)).decode("ascii").rstrip("=")
        code = QrCode(ticket, action, scene, now, expires_at, url)
        self._codes[ticket] = code
        return code

    def find(self, ticket: str) -> QrCode | None:
        """The code of a ticket, expired or not (None when never created)."""
        return self._codes.get(ticket)

    def valid(self, ticket: str) -> QrCode | None:
        """The code of a ticket while it is valid (what showqrcode serves; else 404)."""
        code = self._codes.get(ticket)
        if code is None or (code.expires_at is not None and self._clock() >= code.expires_at):
            return None
        return code

    def codes(self) -> list[QrCode]:
        return list(self._codes.values())


def answer(code: QrCode, now: float) -> dict[str, Any]:
    """qrcode/create's answer: ticket, expire_seconds (temporary codes only), url."""
    result: dict[str, Any] = {"ticket": code.ticket}
    if code.expires_at is not None:
        result["expire_seconds"] = round(code.expires_at - now)
    result["url"] = code.url
    return result


def image_jpeg() -> bytes:
    """The image showqrcode serves: a valid 8x8 grey baseline JPEG (the emulator draws no real
    QR code; the ticket's `url` is the content a real one encodes)."""
    one_code_table = bytes([1] + [0] * 15) + b"\x00"  # one Huffman code "0" for the symbol 0
    return b"".join([
        b"\xff\xd8",                                              # SOI
        b"\xff\xdb\x00\x43\x00" + b"\x01" * 64,                   # DQT: all ones
        b"\xff\xc0\x00\x0b\x08\x00\x08\x00\x08\x01\x01\x11\x00",  # SOF0: 8x8, one component
        b"\xff\xc4\x00\x14\x00" + one_code_table,                 # DHT: DC table 0
        b"\xff\xc4\x00\x14\x10" + one_code_table,                 # DHT: AC table 0
        b"\xff\xda\x00\x08\x01\x01\x00\x00\x3f\x00",              # SOS
        b"\x3f",                                                  # DC diff 0, EOB, 1-padding
        b"\xff\xd9",                                              # EOI
    ])
