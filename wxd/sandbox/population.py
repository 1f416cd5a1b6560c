"""The emulator's credentials and its seeded population of simulated WeChat users.

Pure: stdlib only; must not import tornado or any other part of wxd.
"""

from __future__ import annotations

import base64
import gc
import hashlib
import random
from dataclasses import dataclass

# Subscribe scenes as user/info reports them. Weighted towards search and QR.
# https://developers.weixin.qq.com/doc/offiaccount/User_Management/Get_users_basic_information_UnionID.html
SUBSCRIBE_SCENES: tuple[str, ...] = (
    "ADD_SCENE_SEARCH",
    "ADD_SCENE_QR_CODE",
    "ADD_SCENE_PROFILE_CARD",
    "ADD_SCENE_PROFILE_LINK",
    "ADD_SCENE_PROFILE_ITEM",
    "ADD_SCENE_PAID",
    "ADD_SCENE_WECHAT_ADVERTISEMENT",
    "ADD_SCENE_REPRINT",
    "ADD_SCENE_LIVESTREAM",
    "ADD_SCENE_CHANNELS",
    "ADD_SCENE_ACCOUNT_MIGRATION",
    "ADD_SCENE_OTHERS",
)
_SCENE_WEIGHTS = (30, 25, 8, 6, 4, 4, 6, 4, 3, 3, 2, 5)

# Subscribe times are drawn before this fixed instant (2023-11-14), not before clock(), so a
# population depends on the seed only.
POPULATION_EPOCH = 1_700_000_000
_THREE_YEARS_S = 3 * 365 * 86400

_B64 = base64.urlsafe_b64encode


@dataclass(frozen=True)
class Credentials:
    """The OA and MP identities the emulator accepts. Deterministic defaults in valid formats.

    appids are "wx" + 16 hex, secrets 32 hex, the EncodingAESKey 43 alphanumerics (decodes to
    32 bytes), the webhook token 3-32 alphanumerics, the original id "gh_" + 12 hex.
    """

    # Public, made-up values: the sandbox's secrets protect nothing.
    oa_appid: str = "wx9f7b0fb584879b3b"
    oa_secret: str = "6dff1eac9d0c11a0c7182ca55dea7774"  # noqa: S105
    mp_appid: str = "wx68dbf73d03d3a510"
    mp_secret: str = "70744b8acad4bf15bad0e2fcd1ed0121"  # noqa: S105
    webhook_token: str = "wxdsandboxtoken"  # noqa: S105
    encoding_aes_key: str = "PXYmB2ahY85nkU1Stt09pUeQMQ53BTEZebkI7BHpVo4"
    oa_original_id: str = "gh_fb2b7fce0940"


@dataclass(eq=False, slots=True)
class Person:
    """One simulated WeChat user, as seen by both apps. Mutable: follows, used_mp, session_key.

    `unionid` is None when the person has none (the OA/MP is not bound to an Open Platform
    account for them). `subscribe_time` is the unix time of the latest follow, 0 if never.
    `qr_scene`/`qr_scene_str` are set only for ADD_SCENE_QR_CODE follows.
    """

    index: int
    unionid: str | None
    mp_openid: str
    oa_openid: str
    follows: bool
    used_mp: bool
    subscribe_time: int
    subscribe_scene: str
    qr_scene: int = 0
    qr_scene_str: str = ""
    session_key: str | None = None


def openid_prefix(appid: str) -> str:
    """The 6-character prefix shared by every openid of one app.

    Real openids of one app share a short prefix (e.g. "o6_bmj"); it makes an OA openid and an
    MP openid of the same person visibly different, as they are in WeChat.
    """
    digest = _B64(hashlib.sha256(appid.encode("ascii")).digest()).decode("ascii")
    return "o" + digest[:5]


def generate_people(
    count: int,
    seed: int,
    credentials: Credentials,
    follow_ratio: float,
    mp_ratio: float,
    unionid_ratio: float,
) -> list[Person]:
    """Build `count` people from `seed`; the same arguments always give the same people.

    Identifiers are 28 characters of [A-Za-z0-9_-] like WeChat's: OA and MP openids start with
    their app's prefix, unionids with "o". Linear in `count` (a few µs a person).
    """
    rng = random.Random(seed)
    oa_prefix = openid_prefix(credentials.oa_appid)
    mp_prefix = openid_prefix(credentials.mp_appid)
    scene_choices = rng.choices(SUBSCRIBE_SCENES, _SCENE_WEIGHTS, k=count)
    # 54 random bytes a person give 72 base64 characters, of which 22 + 22 + 27 are used: 130+
    # random bits per identifier, so collisions are not a practical concern (FakeWeChat checks).
    text = _B64(rng.randbytes(54 * count)).decode("ascii")
    draw = rng.random
    people: list[Person] = []
    append = people.append
    # A million people are a few million objects: pause the cyclic GC, which would otherwise
    # rescan them repeatedly while they are created (none of them form cycles).
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for index in range(count):
            at = 72 * index
            follows = draw() < follow_ratio
            used_mp = draw() < mp_ratio
            has_unionid = draw() < unionid_ratio
            scene = scene_choices[index]
            qr_scene = 0
            qr_scene_str = ""
            if follows and scene == "ADD_SCENE_QR_CODE":
                if draw() < 0.5:
                    qr_scene = 1 + int(draw() * 99_999)
                else:
                    qr_scene_str = f"campaign_{1 + int(draw() * 999)}"
            append(
                Person(
                    index,
                    "o" + text[at + 44 : at + 71] if has_unionid else None,
                    mp_prefix + text[at + 22 : at + 44],
                    oa_prefix + text[at : at + 22],
                    follows,
                    used_mp,
                    POPULATION_EPOCH - int(draw() * _THREE_YEARS_S) if follows else 0,
                    scene if follows else "",
                    qr_scene,
                    qr_scene_str,
                )
            )
    finally:
        if gc_was_enabled:
            gc.enable()
    return people
