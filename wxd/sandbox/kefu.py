"""Customer-service messages for the emulator: WeChat's send windows and what each person got.

Pure: stdlib only; must not import tornado. Windows (OA): after a follow, a scan of a
parametric QR code or a menu click, 3 messages within 1 minute; after a message from the
user, 5 within 48 hours. A new action replaces the window; windows do not add up.
https://developers.weixin.qq.com/doc/offiaccount/Customer_Service/Customer_Service_Messages.html
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

WINDOWS: dict[str, tuple[int, float]] = {
    "follow": (3, 60.0),
    "scan": (3, 60.0),
    "click": (3, 60.0),
    "message": (5, 48 * 3600.0),
}


@dataclass(slots=True)
class _Window:
    opened_at: float
    allowed: int
    seconds: float
    used: int = 0


class KefuBook:
    """Send windows and delivered customer-service messages, by OA openid."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._windows: dict[str, _Window] = {}
        self._messages: dict[str, list[dict[str, Any]]] = {}

    def open(self, oa_openid: str, trigger: str) -> None:
        """The user did `trigger` (follow, scan, click, message): a new window."""
        allowed, seconds = WINDOWS[trigger]
        self._windows[oa_openid] = _Window(self._clock(), allowed, seconds)

    def send(self, oa_openid: str, message: dict[str, Any]) -> int:
        """0 and the message kept; 45015 outside the window (or none), 45047 past its count."""
        window = self._windows.get(oa_openid)
        now = self._clock()
        if window is None or now - window.opened_at >= window.seconds:
            return 45015
        if window.used >= window.allowed:
            return 45047
        window.used += 1
        self._messages.setdefault(oa_openid, []).append({**message, "at": now})
        return 0

    def messages(self, oa_openid: str) -> list[dict[str, Any]]:
        """Customer-service messages delivered to this person, oldest first (a copy)."""
        return list(self._messages.get(oa_openid, ()))
