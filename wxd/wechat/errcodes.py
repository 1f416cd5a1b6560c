"""The one table of WeChat errcode classes, read by WeChatClient and the retry classifier.

Pure: imports nothing. Anything absent from the table is terminal (about the request itself).
"""

from __future__ import annotations

from collections.abc import Mapping

# The one table of errcode classes. Anything absent is terminal.
# https://developers.weixin.qq.com/doc/offiaccount/Getting_Started/Global_Return_Code.html
# https://developers.weixin.qq.com/doc/offiaccount/Message_Management/Template_Message_Interface.html
#   token     - the access_token is invalid, superseded or expired: refresh, retry once.
#   transient - WeChat is busy or throttling (per minute, or per user for 43117): back off, retry.
#   quota     - a daily quota is spent: stop this kind of call until the quota resets.
ERROR_KINDS: Mapping[int, str] = {
    40001: "token",  # invalid credential / not latest (superseded by a newer /cgi-bin/token)
    40014: "token",  # invalid access_token
    42001: "token",  # access_token expired
    -1: "transient",  # system error
    45011: "transient",  # api minute-quota reached: retry next minute
    43117: "transient",  # sending to this openid too frequently (per-user throttle)
    45009: "quota",  # daily api quota reached
}
KINDS = ("token", "transient", "quota", "terminal")

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
    """The class of a WeChat errcode: "token" | "transient" | "quota" | "terminal"."""
    return ERROR_KINDS.get(errcode, "terminal")
