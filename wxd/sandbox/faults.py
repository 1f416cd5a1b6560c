"""Scripted faults: rules that make chosen emulated calls answer the way real WeChat sometimes does.

Pure: stdlib and the sandbox's token_book only; must not import tornado.

This is the emulator's one fault mechanism. A FaultRule says which paths it covers, what the
call answers instead (its kind), which calls it applies to (conditions), and how long it lives:

- lifetime: `times` faulted answers (None = no count limit) and/or an end time `until` on the
  emulator's clock (None = no deadline). With neither, the rule lasts until it is cleared.
  A used-up or expired rule is dropped by itself: the emulator recovers on its own.
- paths: an API path, "token" (both /cgi-bin/token and /cgi-bin/stable_token) or "*" (every
  emulated API path, /sns/jscode2session included).
- conditions (all optional; a call must meet every one given): `app` ("oa"/"mp": the app named
  by the appid or the access_token), `openids` (the call names one of them: user/info's openid,
  a batchget entry, template/send's touser), `next_openid` (user/get's cursor; "*" = any
  non-empty cursor).
- allowance: the first `allow` matching calls of each period pass untouched and only the rest
  fault; `per` is "day" (a Beijing day: the counter resets at Beijing midnight by the emulator's
  clock), a number of seconds (fixed windows of the clock) or None (the rule's whole life);
  `per_openid` counts each openid separately. That is how daily quotas and per-user frequency
  limits are modelled.
- `ips` (the addresses a 40164 errmsg shows, taken in turn; none = the caller's address) and
  `errmsg` (an errmsg text instead of the usual one; " rid: ..." is still appended).

Kinds, and when they are drawn ("stage"):
- "call" stage, drawn before the call is processed, replacing its answer: an errcode as a string
  ("-1", "40164", "45009", ...), "http500", "hang", "reset", "hang_after"/"reset_after" (the call
  is processed, then its answer is lost), "delay:<seconds>" (latency only), and on
  /cgi-bin/user/get only "empty" ({"total": N, "count": 0, "next_openid": ""}, the end-of-list
  answer, before the list is complete) or "empty_bare" ({"total": N, "count": 0}).
- "duplicate" stage, template/send only, drawn when a send repeats an openid + client_msg_id
  within the 10-minute window: "dup:<mode>" with mode one of DUPLICATE_MODES. The message is
  never delivered twice.
- "report" stage, template/send only, drawn when an accepted message's TEMPLATESENDJOBFINISH is
  built: "report:msgid0" (MsgID 0), "report:no_msgid" (no MsgID element), "report:lost" (no
  report at all).
Rules are tried in the order they were added; the first live rule that covers the path, meets
its conditions and is past its allowance fires. Random faults (FakeWeChat.fault_rate) are
drawn only at the "call" stage and only when no rule fired.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from types import EllipsisType
from typing import Any

from wxd.sandbox.token_book import beijing_day

TOKEN_PATH = "/cgi-bin/token"  # noqa: S105
STABLE_TOKEN_PATH = "/cgi-bin/stable_token"  # noqa: S105
USER_GET_PATH = "/cgi-bin/user/get"
USER_INFO_PATH = "/cgi-bin/user/info"
BATCHGET_PATH = "/cgi-bin/user/info/batchget"
SEND_PATH = "/cgi-bin/message/template/send"
JSCODE2SESSION_PATH = "/sns/jscode2session"
OAUTH_TOKEN_PATH = "/sns/oauth2/access_token"  # noqa: S105 - a path

TOKEN_PATHS = frozenset({TOKEN_PATH, STABLE_TOKEN_PATH})
ALL_PATHS = "*"
PATH_GROUPS = {"token": TOKEN_PATHS}

DEFAULT_FAULT_KINDS: tuple[str, ...] = ("-1", "45009", "45011", "http500", "hang", "reset")
TRANSPORT_FAULTS = frozenset({"http500", "hang", "reset", "hang_after", "reset_after"})
_FAULT_RE = re.compile(r"-?[0-9]+|delay:[0-9]+(?:\.[0-9]+)?")

EMPTY_PAGE_KINDS = frozenset({"empty", "empty_bare"})
# Answers to a repeated openid + client_msg_id, every one reported or plausible (the doc only
# says "one message per openid + client_msg_id for 10 minutes"):
#   ok            {"errcode": 0, "errmsg": "ok", "msgid": <the first msgid>} (no rule: the default)
#   ok_no_msgid   {"errcode": 0, "errmsg": "ok"}
#   45065         {"errcode": 45065, "errmsg": "clientmsgid exist"}
#   45065_msg_id  ... plus "msg_id": <the first msgid> (the mass-send API's key)
#   45065_msgid   ... plus "msgid": <the first msgid>
#   40241         {"errcode": 40241, "errmsg": "The message is duplicate in 60 seconds"}
#   45066         {"errcode": 45066, "errmsg": "retry too fast"}
# https://developers.weixin.qq.com/doc/offiaccount/Message_Management/Template_Message_Interface.html
# https://developers.weixin.qq.com/community/personal/oCJUsw8Jav7Un46Mw2Z_nWanCfec/question
# https://developers.weixin.qq.com/community/develop/doc/00022428e988b881172d99bc756000
DUPLICATE_MODES = ("ok", "ok_no_msgid", "45065", "45065_msg_id", "45065_msgid", "40241", "45066")
REPORT_MODES = ("msgid0", "no_msgid", "lost")
_STAGED_KINDS = {
    **{f"dup:{mode}": ("duplicate", SEND_PATH) for mode in DUPLICATE_MODES},
    **{f"report:{mode}": ("report", SEND_PATH) for mode in REPORT_MODES},
    **{kind: ("call", USER_GET_PATH) for kind in EMPTY_PAGE_KINDS},
}
STAGES = ("call", "duplicate", "report")


def check_fault_kind(kind: str) -> str:
    """Return `kind` if it is a known fault kind, else raise ValueError."""
    if kind in TRANSPORT_FAULTS or kind in _STAGED_KINDS or _FAULT_RE.fullmatch(kind):
        return kind
    raise ValueError(f"unknown fault kind {kind!r}")


def stage_of(kind: str) -> str:
    """When a rule of this kind is drawn: "call", "duplicate" or "report"."""
    staged = _STAGED_KINDS.get(kind)
    return staged[0] if staged is not None else "call"


@dataclass(frozen=True, slots=True)
class CallFacts:
    """What a rule's conditions may ask about a call (built only when some rule needs it)."""

    app: str | None = None
    openids: frozenset[str] = frozenset()
    next_openid: str = ""


@dataclass(eq=False, slots=True)
class FaultRule:
    """One scripted fault; see the module docstring. `fired` counts the answers it faulted."""

    id: int
    path: str
    kind: str
    times: int | None
    until: float | None
    app: str | None = None
    openids: frozenset[str] | None = None
    next_openid: str | None = None
    ips: tuple[str, ...] = ()
    errmsg: str | None = None
    allow: int = 0
    per: str | float | None = None
    per_openid: bool = False
    fired: int = 0
    _window: int = field(default=-1, repr=False)
    _counts: dict[frozenset[str], int] = field(default_factory=dict, repr=False)

    @property
    def stage(self) -> str:
        return stage_of(self.kind)

    @property
    def conditional(self) -> bool:
        """Whether the rule needs CallFacts to decide (conditions or per-openid counting)."""
        return bool(self.app or self.openids or self.next_openid or self.per_openid)

    def covers(self, path: str) -> bool:
        if self.path == ALL_PATHS:
            return True
        group = PATH_GROUPS.get(self.path)
        return path in group if group is not None else path == self.path

    def alive(self, now: float) -> bool:
        return (self.times is None or self.times > 0) and (self.until is None or now < self.until)

    def meets(self, facts: CallFacts) -> bool:
        if self.app is not None and facts.app != self.app:
            return False
        if self.openids and not (self.openids & facts.openids):
            return False
        if self.next_openid == "*":
            return bool(facts.next_openid)
        return self.next_openid is None or facts.next_openid == self.next_openid

    def admits(self, now: float, facts: CallFacts | None) -> bool:
        """Count one matching call against the allowance; True while it is within it."""
        if self.allow <= 0:
            return False
        if self.per == "day":
            window = beijing_day(now)
        elif isinstance(self.per, (int, float)):
            window = int(now // self.per)
        else:
            window = 0
        if window != self._window:
            self._window = window
            self._counts.clear()
        key = facts.openids if self.per_openid and facts is not None else frozenset()
        used = self._counts.get(key, 0) + 1
        self._counts[key] = used
        return used <= self.allow

    def ip_for_next(self, caller_ip: str) -> str:
        """The address the current faulted answer shows (the rule's ips in turn)."""
        if not self.ips:
            return caller_ip
        return self.ips[(self.fired - 1) % len(self.ips)]

    def as_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "path": self.path,
            "kind": self.kind,
            "times": self.times,
            "until": self.until,
            "app": self.app,
            "openids": sorted(self.openids) if self.openids else None,
            "next_openid": self.next_openid,
            "ips": list(self.ips),
            "errmsg": self.errmsg,
            "allow": self.allow,
            "per": self.per,
            "per_openid": self.per_openid,
            "fired": self.fired,
        }


def _positive(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise ValueError(f"{name} must be a positive number, got {value!r}")
    return float(value)


class FaultBook:
    """The live fault rules of one emulator, in the order they were added."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._rules: list[FaultRule] = []
        self._next_id = 1

    def add(
        self,
        path: str,
        kind: str,
        times: int | EllipsisType | None = ...,
        *,
        seconds: float | None = None,
        until: float | None = None,
        app: str | None = None,
        openids: Iterable[str] | None = None,
        next_openid: str | None = None,
        ips: Iterable[str] = (),
        errmsg: str | None = None,
        allow: int = 0,
        per: str | float | None = None,
        per_openid: bool = False,
    ) -> FaultRule:
        """Add a rule (see the module docstring) and return it; ValueError for bad arguments.

        `times` defaults to 1 when no time limit is given, and to no count limit when `seconds`
        (from now) or `until` (an emulator time) is; pass None explicitly for a rule that lasts
        until cleared.
        """
        check_fault_kind(kind)
        staged = _STAGED_KINDS.get(kind)
        if staged is not None and path != staged[1]:
            raise ValueError(f"fault kind {kind!r} applies to {staged[1]} only, not {path!r}")
        if seconds is not None and until is not None:
            raise ValueError("give seconds or until, not both")
        if seconds is not None:
            until = self._clock() + _positive("seconds", seconds)
        elif until is not None:
            until = float(_positive("until", until))
        if times is ...:
            times = 1 if until is None else None
        if times is not None and (isinstance(times, bool) or not isinstance(times, int) or times < 1):
            raise ValueError(f"times must be a positive integer or None, got {times!r}")
        if app not in (None, "oa", "mp"):
            raise ValueError(f"app must be 'oa', 'mp' or None, got {app!r}")
        if isinstance(allow, bool) or not isinstance(allow, int) or allow < 0:
            raise ValueError(f"allow must be an integer >= 0, got {allow!r}")
        if per is not None and per != "day":
            per = _positive("per", per)
        openid_set = frozenset([openids] if isinstance(openids, str) else openids or ())
        ip_list = (ips,) if isinstance(ips, str) else tuple(ips)
        for ip in ip_list:
            ipaddress.ip_address(ip)  # ValueError for anything but an IPv4/IPv6 address
        rule = FaultRule(
            self._next_id, path, kind, times, until, app, openid_set or None,
            next_openid or None, ip_list, errmsg, allow, per, bool(per_openid),
        )
        self._next_id += 1
        self._rules.append(rule)
        return rule

    def clear(self, path: str | None = None, rule_id: int | None = None) -> int:
        """Drop every rule, or those added for `path`, or the one with `rule_id`; the count."""
        before = len(self._rules)
        self._rules = [
            rule
            for rule in self._rules
            if not ((path is None or rule.path == path) and (rule_id is None or rule.id == rule_id))
        ]
        return before - len(self._rules)

    def live(self) -> list[FaultRule]:
        """The rules still in force (used-up and expired ones are dropped)."""
        now = self._clock()
        self._rules = [rule for rule in self._rules if rule.alive(now)]
        return list(self._rules)

    def draw(
        self, path: str, facts: Callable[[], CallFacts] | None = None, stage: str = "call"
    ) -> FaultRule | None:
        """The rule that faults this call to `path` at `stage`, counted as fired; None if none.
        `facts` builds the call's CallFacts (once, and only if a conditional rule needs them);
        without it, conditional rules do not apply."""
        if not self._rules:
            return None
        known: CallFacts | None = None
        for rule in self.live():
            if rule.stage != stage or not rule.covers(path):
                continue
            if rule.conditional:
                if facts is None:
                    continue
                if known is None:
                    known = facts()
                if not rule.meets(known):
                    continue
            if rule.admits(self._clock(), known):
                continue
            rule.fired += 1
            if rule.times is not None:
                rule.times -= 1
            return rule
        return None
