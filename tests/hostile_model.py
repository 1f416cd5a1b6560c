"""The hostile-input campaign's data model: the target daemon and one attack (request).

Plain data; imports nothing from wxd.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

Headers = Mapping[str, str]


@dataclass(frozen=True)
class Target:
    """What the generator knows about the daemon under attack (its config and some real ids).

    The optional ids let admin attacks reach deeper checks (a known follower, a real template,
    a logged-in MP user, an existing push that is neither queued nor failed, a pending OAuth
    link).
    """

    webhook_token: str
    encoding_aes_key: str
    oa_appid: str
    admin_token: str
    oa_original_id: str = "gh_0123456789ab"
    webhook_path: str = "/wechat"
    webhook_max_body: int = 65536
    webhook_server_cap: int = 1 << 20  # the HTTPServer's max_body_size (daemon.py)
    admin_max_body: int = 8 * 1024 * 1024
    replay_window_s: float = 300.0
    unionid: str | None = None
    template_id: str | None = None
    template_keys: tuple[str, ...] = ()
    mp_openid: str | None = None
    push_id: str | None = None
    oauth_token: str | None = None  # a pending OAuth link's start token (never sent as is)
    oauth_state: str | None = None  # ... and its authorize state
    return_host: str | None = None  # a host of [linking] oauth_return_hosts


@dataclass(frozen=True)
class Attack:
    """One request. `expect`: the acceptable statuses; `codes`: acceptable admin error codes
    (empty = any snake_case code). Wave 1 is sent only after every wave-0 answer (replays)."""

    kind: str
    server: str  # "webhook" | "admin"
    method: str
    path: str  # with the query string
    body: bytes | None = None
    headers: Headers = field(default_factory=dict)
    expect: frozenset[int] = frozenset()
    codes: frozenset[str] = frozenset()
    wave: int = 0
    json_error: bool = True  # False only where tornado's HTTPServer answers before any handler


def expect(*items: Any) -> frozenset[Any]:
    return frozenset(items)
