"""FaultSwitches: FakeWeChat's fault switches, one method per real-WeChat behaviour to produce.

Pure: stdlib and the sandbox's pure modules only; must not import tornado.

Every switch adds one rule to the one fault mechanism (faults.FaultBook, see faults.py) and
returns it (a FaultRule: its `id` clears it, its `fired` counts the answers it faulted). Each
takes a lifetime: until cleared (the default of the shorthands), `times` answers, or `seconds`
by the emulator's clock, after which the emulator recovers by itself. The HTTP form of every
switch is POST /_sandbox/faults with the same fields (control.py lists them).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from types import EllipsisType

from wxd.sandbox.faults import (
    ALL_PATHS,
    BATCHGET_PATH,
    SEND_PATH,
    USER_GET_PATH,
    FaultBook,
    FaultRule,
)
from wxd.sandbox.token_book import next_beijing_midnight

# The refusals a token fetch can meet that say nothing about the request itself: IP whitelist
# (40164, 61004), risky-IP confirmation (89501 waiting, 89503 needs the admin, 89506 refused
# twice in 24 h, 89507 refused once in 1 h), a frozen AppSecret (40243), a bad secret or appid.
# https://developers.weixin.qq.com/doc/offiaccount/Basic_Information/Get_access_token.html
# https://developers.weixin.qq.com/doc/offiaccount/Getting_Started/Global_Return_Code.html
# https://developers.weixin.qq.com/community/personal/oCJUsw-s_Z-CWgXaLXfwgmwB41xI/answer
# https://developers.weixin.qq.com/community/develop/doc/000e067cac4100bd739c10fe55b000
# https://developers.weixin.qq.com/community/minihome/doc/00026e3d380f1818352acf32456000
TOKEN_REFUSALS = (40164, 61004, 89501, 89503, 89506, 89507, 40243, 40125, 40013)


class FaultSwitches:
    """Mixed into FakeWeChat, which sets `clock` and `faults`."""

    clock: Callable[[], float]
    faults: FaultBook

    def script_fault(
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
        """Calls to `path` ("token" = both token endpoints, "*" = every API path) answer `kind`:
        an errcode as a string ("-1", "40001", "45009", ...), "http500", "hang", "reset",
        "hang_after", "reset_after", "delay:<seconds>", or a path-specific kind (faults.py).

        Lifetime: the next `times` matching calls (default 1), or with `seconds` (from now) or
        `until` (emulator time) every matching call until then (at most `times` if given);
        times=None without a time limit lasts until clear_faults(). The conditions (`app`,
        `openids`, `next_openid`), the allowance (`allow` calls per `per`, `per_openid`),
        `ips` and `errmsg` are described in wxd/sandbox/faults.py. Scripted faults come before
        random ones, in the order they were added. ValueError for bad arguments.
        """
        return self.faults.add(
            path, kind, times, seconds=seconds, until=until, app=app, openids=openids,
            next_openid=next_openid, ips=ips, errmsg=errmsg, allow=allow, per=per,
            per_openid=per_openid,
        )

    def clear_faults(self, path: str | None = None, rule_id: int | None = None) -> int:
        """Drop every scripted fault, or those scripted for `path`, or one by id; the count."""
        return self.faults.clear(path, rule_id)

    def next_beijing_midnight(self) -> float:
        """When today's daily quotas reset (Beijing midnight), by this emulator's clock."""
        return next_beijing_midnight(self.clock())

    # Shorthands for the reported real-WeChat behaviours (each one script_fault rule).

    def refuse_tokens(
        self,
        errcode: int = 40164,
        *,
        business: bool = False,
        seconds: float | None = None,
        times: int | None = None,
        app: str | None = None,
        ips: Iterable[str] = (),
        errmsg: str | None = None,
    ) -> FaultRule:
        """Every token fetch (/cgi-bin/token, /cgi-bin/stable_token), and with `business`
        every API call, answers `errcode` (one of TOKEN_REFUSALS, or any other) until cleared,
        for `seconds` by the emulator's clock, or for `times` answers; then recovers by itself.
        40164's errmsg names the caller's address ("invalid ip 1.2.3.4 ipv6 ::ffff:1.2.3.4,
        not in whitelist"), or `ips` in turn (behind NAT it changes from call to call).
        The OA IP whitelist guards every OA API, hence `business`."""
        return self.script_fault(
            ALL_PATHS if business else "token", str(errcode), times, seconds=seconds,
            app=app, ips=ips, errmsg=errmsg,
        )

    def stale_cursor(
        self,
        next_openid: str = "*",
        kind: str = "40003",
        *,
        seconds: float | None = None,
        times: int | None = None,
    ) -> FaultRule:
        """user/get resumed at `next_openid` ("*" = any cursor) answers `kind`: "40003", "empty"
        (the end-of-list answer {"total": N, "count": 0, "next_openid": ""} before the list is
        complete) or "empty_bare" ({"total": N, "count": 0}).
        https://developers.weixin.qq.com/doc/offiaccount/User_Management/Getting_a_User_List.html
        https://developers.weixin.qq.com/community/minihome/doc/000a2ead4dcd18784d3f5617851c00
        https://developers.weixin.qq.com/community/develop/doc/00004a44da0088b5c171180f66bc00"""
        return self.script_fault(
            USER_GET_PATH, kind, times, seconds=seconds, next_openid=next_openid
        )

    def poison_openid(
        self,
        openids: str | Iterable[str],
        errcode: int = 50005,
        *,
        path: str = BATCHGET_PATH,
        seconds: float | None = None,
        times: int | None = None,
    ) -> FaultRule:
        """Every batchget chunk (or call to `path`) naming one of `openids` fails as a whole
        with `errcode`: 50005 (reported for a lone unfollowed openid), 40003 (repeatably, for
        an openid user/get itself listed) or 40032 (invalid openid list size, reported for
        exactly 100 entries).
        https://developers.weixin.qq.com/doc/offiaccount/User_Management/Get_users_basic_information_UnionID.html
        https://developers.weixin.qq.com/community/develop/doc/000882d36a45e80b796be46be5b800
        https://developers.weixin.qq.com/community/develop/doc/0004e25a390b58e0419b79efd51400"""
        return self.script_fault(path, str(errcode), times, seconds=seconds, openids=openids)

    def answer_duplicates(
        self, mode: str, *, seconds: float | None = None, times: int | None = None
    ) -> FaultRule:
        """A template/send repeating an openid + client_msg_id within 10 minutes is answered
        per `mode` (faults.DUPLICATE_MODES) instead of 0 with the first msgid. The message is
        still delivered only once.
        https://developers.weixin.qq.com/doc/offiaccount/Message_Management/Template_Message_Interface.html"""
        return self.script_fault(SEND_PATH, f"dup:{mode}", times, seconds=seconds)

    def daily_quota(self, path: str, limit: int, errcode: int = 45009) -> FaultRule:
        """`path` allows `limit` calls a Beijing day; further calls answer `errcode` until
        Beijing midnight by the emulator's clock (the reset hour is an assumption: WeChat does
        not publish it). Lasts until cleared. A real account's user/info quota may be far
        below the documented one (the second link).
        https://developers.weixin.qq.com/doc/offiaccount/Message_Management/API_Call_Limits.html
        https://developers.weixin.qq.com/community/develop/doc/00086e6eb48f30040fba1a2cc56000"""
        return self.script_fault(path, str(errcode), None, allow=limit, per="day")

    def exhaust_daily_quota(self, path: str, errcode: int = 45009) -> FaultRule:
        """`path` answers `errcode` from now until the next Beijing midnight, then recovers."""
        return self.script_fault(path, str(errcode), until=self.next_beijing_midnight())

    def throttle_openid(
        self,
        openids: str | Iterable[str],
        *,
        seconds: float | None = None,
        times: int | None = None,
        errcode: int = 43117,
    ) -> FaultRule:
        """template/send to these openids answers 43117 ("sending to this openid too
        frequently"; no published threshold) until cleared, for `seconds` or `times` answers.
        https://developers.weixin.qq.com/community/develop/doc/00086e6eb48f30040fba1a2cc56000"""
        return self.script_fault(SEND_PATH, str(errcode), times, seconds=seconds, openids=openids)

    def frequency_limit(
        self, limit: int, per_s: float, path: str = SEND_PATH, errcode: int = 43117
    ) -> FaultRule:
        """Each openid gets `limit` calls to `path` per `per_s`-second window of the clock;
        more answer `errcode` (43117: template/send's per-user limit). Lasts until cleared."""
        return self.script_fault(
            path, str(errcode), None, allow=limit, per=per_s, per_openid=True
        )

    def mangle_reports(
        self, mode: str, *, seconds: float | None = None, times: int | None = None
    ) -> FaultRule:
        """The TEMPLATESENDJOBFINISH of an accepted message carries MsgID 0 ("msgid0"), no
        MsgID ("no_msgid"), or is never sent ("lost"). MsgID 0 was reported with client_msg_id
        set: https://developers.weixin.qq.com/community/personal/oCJUswwJ54BzNN0XkUvQKH5XOkCk/question"""
        return self.script_fault(SEND_PATH, f"report:{mode}", times, seconds=seconds)
