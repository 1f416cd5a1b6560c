"""The one table of WeChat errcode classes, read by WeChatClient and the retry classifier.

Pure: imports nothing but the standard library. Anything absent from the table is terminal
(about the request itself).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

# The one table of errcode classes. Anything absent is terminal.
# https://developers.weixin.qq.com/doc/offiaccount/Getting_Started/Global_Return_Code.html
# https://developers.weixin.qq.com/doc/offiaccount/Message_Management/Template_Message_Interface.html
#   token       - the access_token is invalid, superseded or expired: refresh, retry once.
#   transient   - WeChat is busy or throttling (per minute, or per user for 43117): back off, retry.
#   quota       - a daily quota is spent: stop this kind of call until the quota resets.
#   unreachable - WeChat refuses this server whatever it asks (the IP whitelist guards every
#                 API, token endpoints included): pause all work until a call passes again.
ERROR_KINDS: Mapping[int, str] = {
    40001: "token",  # invalid credential / not latest (superseded by a newer /cgi-bin/token)
    40014: "token",  # invalid access_token
    42001: "token",  # access_token expired
    -1: "transient",  # system error
    45011: "transient",  # api minute-quota reached: retry next minute
    43117: "transient",  # sending to this openid too frequently (per-user throttle)
    45009: "quota",  # daily api quota reached
    40164: "unreachable",  # "invalid ip a.b.c.d ipv6 ..., not in whitelist"
    61004: "unreachable",  # access clientip is not registered
}
KINDS = ("token", "transient", "quota", "unreachable", "terminal")

# What an operator does about a token fetch refused for reasons of the account, not the request
# (any failure of a token fetch leaves wxd without a token: see wxd.errors.TokenUnavailable).
# https://developers.weixin.qq.com/doc/offiaccount/Basic_Information/Get_access_token.html
# https://developers.weixin.qq.com/doc/offiaccount/Getting_Started/Global_Return_Code.html
# https://developers.weixin.qq.com/community/develop/doc/000e067cac4100bd739c10fe55b000
REFUSAL_HINTS: Mapping[int, str] = {
    40164: "add this server's egress IP to the account's IP whitelist",
    61004: "add this server's egress IP to the account's IP whitelist",
    89501: "WeChat is waiting for the account admin to confirm this server's IP",
    89503: "the account admin must confirm this server's IP (WeChat sent them a message)",
    89506: "the admin refused this IP twice in 24 hours: confirm it in the platform",
    89507: "the admin refused this IP within the hour: wait, then confirm it",
    40243: "the AppSecret is frozen: unfreeze or reset it in the platform",
    40125: "the AppSecret is wrong: check the configured secret",
    40013: "the AppID is wrong: check the configured appid",
    45009: "the daily quota of token fetches is spent",
}
_REPORTED_IP = re.compile(r"invalid ip ([0-9A-Fa-f.:]+)")


# What template/send may answer to a resend of an openid + client_msg_id inside WeChat's dedupe
# window, besides errcode 0 with or without the first msgid (undocumented; reported): 45065
# "clientmsgid exist" (with the first message's `msg_id` or `msgid`, or neither), 40241 "The
# message is duplicate in 60 seconds", 45066 "retry too fast". Terminal in ERROR_KINDS: only on
# a resend do they mean "accepted before" (wxd.retry.duplicate_send).
# https://developers.weixin.qq.com/doc/offiaccount/Message_Management/Template_Message_Interface.html
# https://developers.weixin.qq.com/community/personal/oCJUsw8Jav7Un46Mw2Z_nWanCfec/question
# https://developers.weixin.qq.com/community/develop/doc/00022428e988b881172d99bc756000
DUPLICATE_SEND_ERRCODES = frozenset({45065, 40241, 45066})


def classify(errcode: int) -> str:
    """The class of a WeChat errcode: "token" | "transient" | "quota" | "unreachable" |
    "terminal"."""
    return ERROR_KINDS.get(errcode, "terminal")


def reported_ip(errmsg: str) -> str | None:
    """The caller address WeChat names in a whitelist refusal (40164: "invalid ip 1.2.3.4 ipv6
    ::ffff:1.2.3.4, not in whitelist"), or None. Behind NAT it may change from call to call."""
    found = _REPORTED_IP.search(errmsg)
    return found.group(1) if found else None


def refusal_hint(errcode: int | None) -> str:
    """What to do about an account-level refusal with `errcode` (None: no WeChat answer)."""
    if errcode is None:
        return "WeChat's API could not be reached (HTTP error or timeout): check the network"
    return REFUSAL_HINTS.get(errcode, "see WeChat's global return codes")
