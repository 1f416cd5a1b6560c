"""FakeWeChat: the emulator's whole state (people, tokens, templates, inboxes, calls, faults).

Pure and synchronous: stdlib and the sandbox's own pure modules only; must not import tornado.
Not thread-safe: mutate it only on the loop that serves it (SandboxThread.call does that).

Fault switches (methods from switches.FaultSwitches; each adds one rule to the one mechanism,
faults.FaultBook, returns it, and takes a lifetime: `times` answers, `seconds` from now or
`until` an emulator time; the HTTP form is POST /_sandbox/faults, see control.py):
- script_fault(path, kind, times, ...): the general switch; every other one is a shorthand.
- refuse_tokens(errcode, business=...): token fetches (and business calls) answer 40164 (errmsg
  with the caller's IP), 61004, 89501/89503/89506/89507, 40243, 40125 or 40013.
- stale_cursor(next_openid, kind): user/get resumed at that cursor answers 40003 or an empty page.
- poison_openid(openid, errcode): a batchget chunk holding that openid answers 50005/40003/40032.
- answer_duplicates(mode): how a repeated openid + client_msg_id is answered (faults.DUPLICATE_MODES).
- daily_quota(path, limit) / exhaust_daily_quota(path): 45009 past a daily quota, until Beijing
  midnight by the clock.
- throttle_openid(openid) / frequency_limit(limit, per_s): template/send's per-user 43117.
- mangle_reports(mode): TEMPLATESENDJOBFINISH with MsgID 0, without MsgID, or never sent.
unfollow() never notifies the webhook by itself: it is the silent unfollow (template/send then
answers 43004 although no unsubscribe event was delivered).

Linking without unionid: `qrcodes` (qrcodes.QrBook: /cgi-bin/qrcode/create, showqrcode) and
scan(person, ticket) (what a scan does: follow or not, which event); `webauth`
(webauth.WebAuthBook: the authorize page and /sns/oauth2/access_token); `kefu`
(kefu.KefuBook: custom/send's windows, opened by follow(), scan() and text messages). A
population with unionid_ratio=0.0 is an account without Open Platform.
"""

from __future__ import annotations

import base64
import bisect
import gc
import json
import logging
import random
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from wxd.sandbox.faults import (
    DEFAULT_FAULT_KINDS,
    CallFacts,
    FaultBook,
    FaultRule,
    check_fault_kind,
)
from wxd.sandbox.kefu import KefuBook
from wxd.sandbox.population import Credentials, Person, generate_people
from wxd.sandbox.qrcodes import QrBook
from wxd.sandbox.switches import FaultSwitches
from wxd.sandbox.templates import DEFAULT_TEMPLATES, Template
from wxd.sandbox.token_book import TokenBook
from wxd.sandbox.webauth import WebAuthBook

logger = logging.getLogger(__name__)

# wx.login codes live 5 minutes and are single use:
# https://developers.weixin.qq.com/miniprogram/dev/api/open-api/login/wx.login.html
LOGIN_CODE_LIFETIME_S = 300
# template/send dedupes openid + client_msg_id for 10 minutes:
# https://developers.weixin.qq.com/doc/offiaccount/Message_Management/Template_Message_Interface.html
CLIENT_MSG_ID_WINDOW_S = 600

MODES = ("plain", "compat", "safe")
# Template msgids are large int64s, like real ones (community samples; the API's page:
# https://developers.weixin.qq.com/doc/offiaccount/Message_Management/Template_Message_Interface.html).
_MSGID_BASE = 3_487_542_469_355_618_313
# From this many people on, FakeWeChat ends its set-up with a full GC collection (its cost grows
# with the population; small set-ups skip it). Cost measured: docs/internals.md.
_COLLECT_FROM_USERS = 100_000


def decode_body(raw: bytes) -> Any:
    """A request body's JSON value; its text (undecodable bytes replaced) when it is not JSON;
    None when it is empty."""
    if not raw:
        return None
    try:
        return json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return raw.decode("utf-8", "replace")


@dataclass(frozen=True)
class Call:
    """One API call as the emulator saw it. Secrets (access_token, secret) are redacted.

    `raw_body` is the request body as received, except that a JSON object with a "secret" is
    logged re-encoded with that secret redacted. `body` is decode_body(raw_body), decoded on
    first use: the log keeps bytes, not a long run's worth of parsed objects.
    `app` is "oa"/"mp" when the token or appid named a known app. `errcode` is 0 for a success
    without errcode, None when no JSON was answered (HTTP 500, hang, reset).
    """

    method: str
    path: str
    query: dict[str, str]
    raw_body: bytes
    status: int
    errcode: int | None
    at: float
    app: str | None = None
    fault: str | None = None

    @cached_property
    def body(self) -> Any:
        """The request body: its JSON value, its text if it is not JSON, None if empty."""
        return decode_body(self.raw_body)


@dataclass(frozen=True)
class WebhookConfig:
    """Where and how the emulator pushes events (delivery reports) to the integrator."""

    url: str
    mode: str = "plain"
    report_delay_s: float = 0.0
    report_status: Callable[[Person], str] | str = "success"
    retries: bool = False


@dataclass(frozen=True)
class ScanResult:
    """What a scan made WeChat push: `event` "subscribe" (the person now follows; `scene` is
    None when the code had expired: a plain follow), "SCAN" (already following) or None
    (an expired code scanned by a follower: no event), with the code's ticket."""

    event: str | None
    scene: str | None
    ticket: str | None


@dataclass(slots=True)
class _LoginCode:
    index: int
    issued_at: float
    used: bool = False


class FakeWeChat(FaultSwitches):
    """The emulated WeChat platform for one OA and one MP.

    Everything random (population, tokens, codes, msgids, faults, latency) comes from `seed`;
    time comes from `clock` (unix seconds), so a test can move time instead of sleeping.
    `latency_s` is a fixed delay per call or a (min, max) range drawn per call.
    `call_log_limit` keeps only about the newest N calls in `calls` (for huge benchmarks);
    count_calls() still counts every call.
    """

    def __init__(
        self,
        users: int = 1000,
        seed: int = 0,
        credentials: Credentials | None = None,
        clock: Callable[[], float] = time.time,
        follow_ratio: float = 0.6,
        mp_ratio: float = 0.5,
        unionid_ratio: float = 1.0,
        token_daily_quota: int = 2000,
        latency_s: float | tuple[float, float] = 0.0,
        fault_rate: float = 0.0,
        fault_kinds: Iterable[str] = DEFAULT_FAULT_KINDS,
        call_log_limit: int | None = None,
    ) -> None:
        self.credentials = credentials if credentials is not None else Credentials()
        self.clock = clock
        self.seed = seed
        self.latency_s = latency_s
        self.fault_rate = fault_rate
        self.fault_kinds = tuple(check_fault_kind(kind) for kind in fault_kinds)
        if fault_rate > 0 and not self.fault_kinds:
            raise ValueError("fault_rate > 0 needs at least one fault kind")
        # Separate streams, so that e.g. enabling latency does not change which calls fault.
        self._rng = random.Random(f"{seed}:runtime")
        self._fault_rng = random.Random(f"{seed}:faults")
        self._latency_rng = random.Random(f"{seed}:latency")
        self.tokens = TokenBook(clock, self._rng, token_daily_quota)
        self.people: list[Person] = generate_people(
            users, seed, self.credentials, follow_ratio, mp_ratio, unionid_ratio
        )
        self._by_oa = {p.oa_openid: p for p in self.people}
        self._by_mp = {p.mp_openid: p for p in self.people}
        self._by_unionid = {p.unionid: p for p in self.people if p.unionid is not None}
        if len(self._by_oa) != users or len(self._by_mp) != users:
            raise RuntimeError("openid collision in the generated population")
        # user/get lists followers ordered by openid; kept sorted so paging is a bisect.
        self._followers: list[str] = sorted(p.oa_openid for p in self.people if p.follows)
        if users >= _COLLECT_FROM_USERS:
            # The people were created with the GC paused: they and the indexes above are all in
            # the youngest generation, and the first collections while serving would scan them
            # all (again as they age). One full collection now files them as long-lived.
            gc.collect()
        self.templates: dict[str, Template] = {t.template_id: t for t in DEFAULT_TEMPLATES}
        self.calls: list[Call] = []
        self.call_log_limit = call_log_limit
        self._call_counts: Counter[str] = Counter()
        self.webhook: WebhookConfig | None = None
        self._codes: dict[str, _LoginCode] = {}
        self._inbox: dict[str, list[dict[str, Any]]] = {}
        self._sent: dict[tuple[str, str], tuple[int, float]] = {}
        self.faults = FaultBook(clock)
        self.qrcodes = QrBook(clock, random.Random(f"{seed}:qrcodes"))
        self.webauth = WebAuthBook(clock, random.Random(f"{seed}:webauth"), self.credentials)
        self.kefu = KefuBook(clock)
        self._next_msgid = _MSGID_BASE + self._rng.randrange(1_000_000)
        self._rid = 0

    # People -------------------------------------------------------------------------------

    def person(self, index: int) -> Person:
        """The person with this index (IndexError when out of range)."""
        return self.people[index]

    def by_oa_openid(self, openid: str) -> Person | None:
        return self._by_oa.get(openid)

    def by_mp_openid(self, openid: str) -> Person | None:
        return self._by_mp.get(openid)

    def by_unionid(self, unionid: str) -> Person | None:
        return self._by_unionid.get(unionid)

    @property
    def follower_openids(self) -> list[str]:
        """Current followers' OA openids, sorted. Do not mutate."""
        return self._followers

    def follow(
        self,
        person: Person,
        scene: str = "ADD_SCENE_SEARCH",
        qr_scene: int = 0,
        qr_scene_str: str = "",
    ) -> None:
        """Make `person` follow the OA now. WeChat keeps the OA openid on re-follow and reports
        the latest follow's time and scene. Following twice changes nothing. Opens the
        customer-service window of a follow."""
        if person.follows:
            return
        self.kefu.open(person.oa_openid, "follow")
        person.follows = True
        person.subscribe_time = int(self.clock())
        person.subscribe_scene = scene
        person.qr_scene = qr_scene
        person.qr_scene_str = qr_scene_str
        bisect.insort(self._followers, person.oa_openid)

    def unfollow(self, person: Person) -> None:
        """Make `person` stop following. user/info then answers the subscribe=0 shape and
        template/send 43004. Silent: no unsubscribe event is sent (the control route's
        /_sandbox/unfollow sends one unless "notify" is false)."""
        if not person.follows:
            return
        person.follows = False
        position = bisect.bisect_left(self._followers, person.oa_openid)
        del self._followers[position]

    def scan(self, person: Person, ticket: str) -> ScanResult | None:
        """`person` scans the QR code of `ticket` in WeChat (None: no such ticket).

        Not following: the person follows (subscribe with the code's scene; ADD_SCENE_QR_CODE
        with qr_scene/qr_scene_str as user/info reports them). Following: a SCAN event. An
        expired temporary code carries no scene (assumed, unconfirmed: a plain subscribe, or
        no event for a follower). Opens the customer-service window of a scan.
        """
        code = self.qrcodes.find(ticket)
        if code is None:
            return None
        valid = self.qrcodes.valid(ticket) is not None
        if not person.follows:
            if valid:
                self.follow(person, "ADD_SCENE_QR_CODE",
                            qr_scene=0 if code.string_scene else int(code.scene),
                            qr_scene_str=code.scene if code.string_scene else "")
                self.kefu.open(person.oa_openid, "scan")
                return ScanResult("subscribe", code.scene, ticket)
            self.follow(person)
            return ScanResult("subscribe", None, None)
        if not valid:
            return ScanResult(None, None, None)
        self.kefu.open(person.oa_openid, "scan")
        return ScanResult("SCAN", code.scene, ticket)

    # Mini Program login --------------------------------------------------------------------

    def issue_login_code(self, person: Person) -> str:
        """A wx.login code for `person`: single use, valid LOGIN_CODE_LIFETIME_S by the clock."""
        code = f"0{self._rng.getrandbits(124):031x}"
        self._codes[code] = _LoginCode(person.index, self.clock())
        return code

    def exchange_login_code(self, code: str) -> Person | int:
        """code2Session's state change: 40029 unknown/expired, 40163 reused; else the person,
        now marked used_mp with a fresh session_key (base64 of 16 bytes)."""
        entry = self._codes.get(code)
        if entry is None:
            return 40029
        if entry.used:
            return 40163
        if self.clock() - entry.issued_at >= LOGIN_CODE_LIFETIME_S:
            return 40029
        entry.used = True
        person = self.people[entry.index]
        person.used_mp = True
        key = self._rng.randbytes(16)
        person.session_key = base64.b64encode(key).decode("ascii")
        return person

    # Templates and delivery ------------------------------------------------------------------

    def add_template(self, template_id: str, title: str, content: str) -> Template:
        """Add (or replace) a template; `content` uses {{key.DATA}} placeholders."""
        template = Template(template_id, title, content)
        self.templates[template_id] = template
        return template

    def inbox(self, oa_openid: str) -> list[dict[str, Any]]:
        """Template messages accepted for this OA openid, oldest first (a copy of the list)."""
        return list(self._inbox.get(oa_openid, ()))

    def deduped_msgid(self, oa_openid: str, client_msg_id: str) -> int | None:
        """The msgid of a message accepted with this client_msg_id in the last 10 minutes."""
        hit = self._sent.get((oa_openid, client_msg_id))
        if hit is None or self.clock() - hit[1] >= CLIENT_MSG_ID_WINDOW_S:
            return None
        return hit[0]

    def accept_message(
        self,
        person: Person,
        template_id: str,
        data: dict[str, Any],
        url: str | None,
        miniprogram: dict[str, Any] | None,
        client_msg_id: str | None,
    ) -> int:
        """Record an accepted template message in the person's inbox; return its new msgid."""
        self._next_msgid += self._rng.randrange(1, 5000)
        msgid = self._next_msgid
        now = self.clock()
        self._inbox.setdefault(person.oa_openid, []).append(
            {
                "msgid": msgid,
                "client_msg_id": client_msg_id,
                "template_id": template_id,
                "data": data,
                "url": url,
                "miniprogram": miniprogram,
                "at": now,
            }
        )
        if client_msg_id:
            self._sent[(person.oa_openid, client_msg_id)] = (msgid, now)
        return msgid

    def configure_webhook(
        self,
        url: str | None,
        mode: str = "plain",
        report_delay_s: float = 0.0,
        report_status: Callable[[Person], str] | str = "success",
        retries: bool = False,
    ) -> None:
        """Send TEMPLATESENDJOBFINISH reports (and control-route events) to `url`; None stops.

        `report_status` is "success", "failed:user block", "failed: system failed" (note the
        inconsistent spaces, as WeChat sends them) or a function of the person.
        """
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if url is None:
            self.webhook = None
            return
        self.webhook = WebhookConfig(url, mode, report_delay_s, report_status, retries)

    def report_status_for(self, person: Person) -> str:
        """The TEMPLATESENDJOBFINISH Status the configured webhook gets for `person`."""
        status = self.webhook.report_status if self.webhook is not None else "success"
        return status if isinstance(status, str) else status(person)

    # Faults, latency and the call log ----------------------------------------------------------

    def next_fault(self, path: str) -> str | None:
        """Draw the fault kind (if any) for the next call to `path` (unconditional rules only)."""
        rule = self.draw_fault(path)
        return rule.kind if rule is not None else None

    def draw_fault(
        self, path: str, facts: Callable[[], CallFacts] | None = None, stage: str = "call"
    ) -> FaultRule | None:
        """The fault for this call at `stage`: a scripted rule first, then (at the "call"
        stage) a random one drawn with `fault_rate` (returned as a one-off rule, id 0)."""
        rule = self.faults.draw(path, facts, stage)
        if rule is not None or stage != "call":
            return rule
        if self.fault_rate > 0 and self._fault_rng.random() < self.fault_rate:
            return FaultRule(0, path, self._fault_rng.choice(self.fault_kinds), None, None, fired=1)
        return None

    def next_latency(self) -> float:
        if isinstance(self.latency_s, tuple):
            low, high = self.latency_s
            return self._latency_rng.uniform(low, high)
        return self.latency_s

    def next_rid(self) -> str:
        """A request id for errmsg suffixes (" rid: ..."), as current WeChat errors carry."""
        self._rid += 1
        return f"{int(self.clock()) & 0xFFFFFFFF:08x}-{self._rid:08x}-{self.seed & 0xFFFFFFFF:08x}"

    def record(self, call: Call) -> None:
        self.calls.append(call)
        self._call_counts[call.path] += 1
        limit = self.call_log_limit
        if limit is not None and len(self.calls) >= 2 * limit:
            del self.calls[: len(self.calls) - limit]  # amortised O(1) a call

    def count_calls(self, path: str) -> int:
        """How many calls `path` received (answered or faulted), since the start."""
        return self._call_counts[path]

    def app_for_appid(self, appid: str) -> tuple[str, str] | None:
        """("oa"|"mp", secret) for a known appid."""
        creds = self.credentials
        if appid == creds.oa_appid:
            return "oa", creds.oa_secret
        if appid == creds.mp_appid:
            return "mp", creds.mp_secret
        return None

