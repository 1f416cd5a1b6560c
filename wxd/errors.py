"""The exception tree of wxd. Pure: imports nothing from wxd or any third-party package.

    WxdError
    ├── ConfigError            one or more config problems, each naming [section] key
    ├── StorageError           database unusable, lock held by another process
    │   └── LockedError
    ├── WebhookError           the webhook edge; never reaches event code
    │   ├── DecryptError       bad base64, bad padding, wrong appid, bad length
    │   └── MessageError       malformed/oversized XML, DTD/entities, missing fields
    ├── MiniProgramError       MP encryptedData problems
    │   ├── SessionKeyError    stale session_key: padding/JSON failure → caller runs wx.login again
    │   └── WatermarkError     watermark.appid differs from the MP appid
    ├── TransportError         network error, timeout, non-200 from WeChat (retryable)
    │   └── NoMsgidError       template/send answered errcode 0 without a msgid
    ├── WeChatAPIError         WeChat answered errcode != 0 (errcode, errmsg, path)
    ├── TokenUnavailable       no usable access_token: the last fetch failed (cause, errcode, ip,
    │                          retry_at); WeChat is unreachable for wxd, whatever was asked
    ├── TokenBudgetError       the local daily budget of token fetches is spent
    └── CallbackError          the backend's callback receiver did not answer 2xx (retryable)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


class WxdError(Exception):
    """Base of every error wxd raises on purpose."""


class ConfigError(WxdError):
    """Invalid configuration. `problems` holds one line per problem, each naming [section] key."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = list(problems)


class StorageError(WxdError):
    """The database cannot be used."""


class LockedError(StorageError):
    """Another wxd process holds the database's lock file."""


class WebhookError(WxdError):
    """Rejected webhook input. The message is safe to log (never contains the body or secrets)."""


class DecryptError(WebhookError):
    """The Encrypt payload cannot be decrypted into a message for this appid."""


class MessageError(WebhookError):
    """The XML body is malformed, oversized, uses DTDs/entities, or lacks required fields."""


class MiniProgramError(WxdError):
    """A Mini Program encryptedData problem."""


class SessionKeyError(MiniProgramError):
    """Decryption failed (padding/JSON): the stored session_key is stale; call wx.login again."""


class WatermarkError(MiniProgramError):
    """The decrypted data's watermark.appid is not this Mini Program's appid."""


class TransportError(WxdError):
    """A network-level failure talking to WeChat (timeout, reset, HTTP non-200). Retryable."""

    def __init__(self, message: str, path: str, status: int | None = None) -> None:
        super().__init__(message)
        self.path = path
        self.status = status


class NoMsgidError(TransportError):
    """template/send answered errcode 0 without a msgid. On a first send of a client_msg_id it
    is retried like a transport failure; on a resend it is one of WeChat's answers to a
    duplicate (wxd.retry.duplicate_send). `answer` is the JSON object answered."""

    def __init__(self, message: str, path: str, answer: Mapping[str, Any]) -> None:
        super().__init__(message, path, 200)
        self.answer = answer


class WeChatAPIError(WxdError):
    """WeChat answered with a non-zero errcode.

    `errmsg` never contains the access_token (WeChat does not echo it; the client strips the
    query string from the path it records). `kind` is the class from wechat/errcodes.py's
    table: "token", "transient", "quota", "unreachable" or "terminal". `answer` is the whole
    JSON object answered (an error body may name more than errcode/errmsg, e.g. the msg_id of a
    duplicate), its strings scrubbed of the call's secrets like errmsg. `resent`: the transport sent this
    request twice (a stale keep-alive connection), so WeChat may have seen it before.
    """

    def __init__(self, errcode: int, errmsg: str, path: str, kind: str = "terminal", *,
                 answer: Mapping[str, Any] | None = None, resent: bool = False) -> None:
        super().__init__(f"{path}: errcode {errcode}: {errmsg}")
        self.errcode = errcode
        self.errmsg = errmsg
        self.path = path
        self.kind = kind
        self.answer: Mapping[str, Any] = (
            answer if answer is not None else {"errcode": errcode, "errmsg": errmsg})
        self.resent = resent

    @property
    def token_invalid(self) -> bool:
        return self.kind == "token"


class TokenUnavailable(WxdError):
    """No usable access_token for `app`: the last token fetch failed and no unexpired token is
    held. Says nothing about the call that needed the token (WeChat refuses or cannot be
    reached from this server: IP whitelist 40164/61004, risky-IP confirmation 89501..89507, a
    frozen or wrong AppSecret/AppID, HTTP errors, timeouts), so callers wait for a fetch to
    succeed again instead of failing their work.

    `cause` is the fetch's error (a TransportError or WeChatAPIError), `errcode` its errcode
    (None for HTTP and network failures), `ip` the address WeChat reported seeing (40164's
    errmsg), `retry_at` the unix time before which the token manager fetches no token.
    """

    def __init__(self, app: str, cause: WxdError, retry_at: float,
                 ip: str | None = None) -> None:
        super().__init__(f"{app}: no access_token: {cause}")
        self.app = app
        self.cause = cause
        self.errcode = cause.errcode if isinstance(cause, WeChatAPIError) else None
        self.ip = ip
        self.retry_at = retry_at


class TokenBudgetError(WxdError):
    """The configured daily budget of upstream token fetches for an app is used up."""


class CallbackError(WxdError):
    """A callback delivery failed: the receiver answered `status` (not 2xx), or no answer came
    (`status` None: refused, reset, timeout, TLS). The message never holds the URL's query or
    the secret."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status
