"""`wxd doctor -c FILE`: the day-one checklist, one line per check, ✓ or ✗ with the fix.

Top level beside cli.py (which reads the file, prints and picks the exit code). The checks, in
this order and no others: the config; the database (writable, integrity_check, schema
version); each app's token fetch; the OA's templates; the webhook's own signed GET verification
on [webhook] listen and [webhook] public_url; unionid availability; clock skew against WeChat's
Date header. Nothing is changed anywhere: the token is fetched in stable_token's normal mode,
which hands out the token WeChat already holds.
"""

from __future__ import annotations

import email.utils
import os
import re
import secrets
import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from wxd.clock import SYSTEM_CLOCK, Clock
from wxd.config import AppConfig, Config
from wxd.errors import TransportError, WeChatAPIError
from wxd.store.diagnose import DatabaseReport, check_database
from wxd.wechat.client import WeChatClient
from wxd.wechat.crypto import sign
from wxd.wechat.oa import OfficialAccountAPI
from wxd.wechat.transport import FetchError, KeepAliveClient

OK, FAIL, SKIP = "ok", "fail", "skip"
MARKS = {OK: "✓", FAIL: "✗", SKIP: "–"}
SKEW_LIMIT_S = 30.0
TIMEOUT_S = 10.0
ERRCODES_URL = "https://developers.weixin.qq.com/doc/offiaccount/Getting_Started/Global_Return_Code.html"
# Where each app's console keeps its IP whitelist and AppSecret.
CONSOLE = {
    "official_account": "mp.weixin.qq.com → 设置与开发 → 基本配置",
    "mini_program": "mp.weixin.qq.com → 开发 → 开发管理 → 开发设置",
}
_IP_RE = re.compile(r"invalid ip ([0-9A-Fa-f.:]+)")


@dataclass(frozen=True)
class Check:
    """One line of the checklist: `status` is OK, FAIL or SKIP (not checked: an earlier
    problem stands in the way); `fix` says what to do about a FAIL."""

    name: str
    status: str
    detail: str
    fix: str = ""

    def line(self) -> str:
        text = f"{MARKS[self.status]} {self.name}: {self.detail}"
        return f"{text} — {self.fix}" if self.fix else text

    def to_json(self) -> dict[str, str]:
        return {"name": self.name, "status": self.status, "detail": self.detail, "fix": self.fix}


def exit_code(checks: Sequence[Check]) -> int:
    """0 when nothing failed, 1 when a check found a problem."""
    return 1 if any(check.status == FAIL for check in checks) else 0


def config_failed(path: str, problems: Sequence[str]) -> list[Check]:
    """The checklist of a config that does not load: one line per problem, nothing else runs."""
    return [Check("config", FAIL, problem, f"edit {path} (see wxd.conf.example)")
            for problem in problems]


# Fixes for the answers of a token fetch (the refusals that say nothing about the request):
# https://developers.weixin.qq.com/doc/offiaccount/Basic_Information/Get_access_token.html
# https://developers.weixin.qq.com/community/develop/doc/000e067cac4100bd739c10fe55b000
def token_problem(section: str, exc: WeChatAPIError | TransportError,
                  api_base: str) -> tuple[str, str]:
    """(what happened, the fix) for a failed token fetch of the app in [section]."""
    console = CONSOLE.get(section, "the WeChat console")
    if isinstance(exc, TransportError):
        return (f"cannot reach {api_base} ({exc})",
                f"let this host reach {api_base} (network, DNS, proxy), or check [wechat] api_base")
    code = exc.errcode
    if code in (40164, 61004):
        match = _IP_RE.search(exc.errmsg)
        ip = match.group(1).removeprefix("::ffff:") if match else ""
        if ip:
            return (f"WeChat refused our IP {ip} ({code})",
                    f"add IP {ip} to the IP whitelist ({console} → IP白名单)")
        return (f"WeChat refused this server's IP ({code})",
                f"add this server's public IP to the IP whitelist ({console} → IP白名单)")
    if code in (40125, 40001):
        return (f"WeChat refused the AppSecret ({code})",
                f"set [{section}] secret to the current AppSecret ({console} → AppSecret; "
                "reset it there if it is lost)")
    if code == 40013:
        return (f"WeChat does not know the AppID ({code})",
                f"set [{section}] appid to the AppID shown at {console}")
    if code in (89501, 89503):
        return (f"WeChat wants the account admin to confirm this server's IP ({code})",
                "the admin must confirm: WeChat sent the admin a message about this IP; "
                "confirm it there, then run wxd doctor again")
    if code in (89506, 89507):
        wait = "24 hours" if code == 89506 else "an hour"
        return (f"the account admin refused this server's IP ({code})",
                f"wait {wait}, then fetch again and ask the admin to confirm the IP")
    if code == 40243:
        return (f"the AppSecret is frozen ({code})", f"unfreeze the AppSecret at {console}")
    if code == 45009:
        return (f"the daily token quota is spent ({code})",
                "wait for the daily reset (midnight Beijing time) or clear the quota in the console")
    return (f"WeChat answered errcode {code}: {exc.errmsg}", f"look up {code} at {ERRCODES_URL}")


def webhook_url(base: str, path: str) -> str:
    """`base` with the webhook path appended, unless it already ends with it."""
    parts = urllib.parse.urlsplit(base)
    if parts.path.rstrip("/").endswith(path.rstrip("/")) and parts.path not in ("", "/"):
        return base
    return base.rstrip("/") + path


class _HeldToken:
    """A TokenSource over one fetched token (the doctor never refreshes)."""

    def __init__(self, token: str) -> None:
        self._token = token

    async def get(self) -> str:
        return self._token

    async def invalidate(self, token: str) -> None:
        """Nothing to refresh: the second refusal reaches the check."""


class Doctor:
    """Runs the checks for one Config. `await run()` returns the checklist; close the HTTP
    client it was given yourself (it closes the one it made)."""

    def __init__(self, cfg: Config, *, clock: Clock = SYSTEM_CLOCK,
                 http: KeepAliveClient | None = None, skew_limit_s: float = SKEW_LIMIT_S,
                 timeout_s: float = TIMEOUT_S) -> None:
        self._cfg = cfg
        self._clock = clock
        self._http = http if http is not None else KeepAliveClient(8, idle_timeout_s=0)
        self._owns_http = http is None
        self._skew_limit_s = skew_limit_s
        self._timeout_s = timeout_s
        self._client = WeChatClient(self._http, cfg.wechat.api_base, min(timeout_s, 5.0),
                                    timeout_s)

    async def run(self) -> list[Check]:
        try:
            checks = [Check("config", OK, "valid")]
            checks.extend(self.database())
            oa_token: str | None = None
            apps = (("official_account", self._cfg.official_account),
                    ("mini_program", self._cfg.mini_program))
            for section, creds in apps:
                if creds is None:
                    continue
                check, token = await self.token(section, creds)
                checks.append(check)
                if section == "official_account":
                    oa_token = token
            checks.append(await self.templates(oa_token))
            checks.extend(await self.webhooks())
            checks.append(await self.unionid(oa_token))
            checks.append(await self.clock_skew())
            return checks
        finally:
            if self._owns_http:
                self._http.close()

    # The database ----------------------------------------------------------------------------

    def database(self) -> list[Check]:
        """Three lines: writable, integrity_check, schema version."""
        report = check_database(self._cfg.wxd.database)
        return [_writable(report), *_intact(report)]

    # Tokens and templates --------------------------------------------------------------------

    async def token(self, section: str, creds: AppConfig) -> tuple[Check, str | None]:
        name = f"{section} token"
        try:
            token, expires_in = await self._client.fetch_token(creds.appid, creds.secret,
                                                               "stable")
        except (WeChatAPIError, TransportError) as exc:
            detail, fix = token_problem(section, exc, self._cfg.wechat.api_base)
            return Check(name, FAIL, detail, fix), None
        return Check(name, OK, f"fetched for {creds.appid} (valid {expires_in:.0f} s more)"), token

    def _oa(self, token: str) -> OfficialAccountAPI:
        return OfficialAccountAPI(self._client, _HeldToken(token))

    async def templates(self, token: str | None) -> Check:
        if token is None:
            return Check("templates", SKIP, "not checked without an official_account token")
        try:
            templates = await self._oa(token).templates()
        except WeChatAPIError as exc:
            if exc.errcode == 48001:
                return Check("templates", FAIL, "the OA may not use template messages (48001)",
                             "template messages need a verified service account (服务号) with "
                             "the 模板消息 feature added in the console")
            return Check("templates", FAIL, f"WeChat answered errcode {exc.errcode}: "
                         f"{exc.errmsg}", f"look up {exc.errcode} at {ERRCODES_URL}")
        except TransportError as exc:
            return Check("templates", FAIL, f"cannot read the template list ({exc})",
                         f"let this host reach {self._cfg.wechat.api_base}")
        if not templates:
            return Check("templates", OK, "readable; the OA has no template yet (add one in "
                         "the console before pushing)")
        return Check("templates", OK, f"{len(templates)} readable")

    # The webhook -----------------------------------------------------------------------------

    async def webhooks(self) -> list[Check]:
        w = self._cfg.webhook
        host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(w.listen.host, w.listen.host)
        netloc = f"[{host}]" if ":" in host else host
        local = f"http://{netloc}:{w.listen.port}{w.path}"
        checks = [await self.verify("webhook", local, public=False)]
        if w.public_url:
            checks.append(await self.verify("webhook public_url",
                                            webhook_url(w.public_url, w.path), public=True))
        return checks

    async def verify(self, name: str, url: str, *, public: bool) -> Check:
        """WeChat's URL verification, signed with [webhook] token: the echostr must come back."""
        token = self._cfg.webhook.token
        timestamp = str(int(self._clock.now()))
        nonce = str(secrets.randbelow(10**9))
        echostr = str(secrets.randbelow(10**18))
        query = urllib.parse.urlencode({"signature": sign(token, timestamp, nonce),
                                        "timestamp": timestamp, "nonce": nonce,
                                        "echostr": echostr})
        where = "make it reach [webhook] listen (DNS, the TLS terminator's proxy_pass)" \
            if public else "start wxd (systemctl start wxd, or wxd run -c FILE), or check " \
            "[webhook] listen"
        try:
            response = await self._http.fetch(
                "GET", url + ("&" if "?" in url else "?") + query,
                connect_timeout_s=min(self._timeout_s, 5.0), request_timeout_s=self._timeout_s)
        except FetchError as exc:
            return Check(name, FAIL, f"nothing answers at {url} ({exc.reason})", where)
        if response.code == 200 and response.body == echostr.encode():
            port = urllib.parse.urlsplit(url).port
            if public and port not in (None, 80, 443):
                return Check(name, FAIL, f"{url} answers, but WeChat calls only ports 80 and "
                             "443", "serve it on port 443 (or 80) and set public_url to match")
            return Check(name, OK, f"{url} answers its signed verification")
        if response.code == 403:
            return Check(name, FAIL, f"{url} refused the signed verification (403)",
                         "the server answering there uses another [webhook] token than this "
                         "file (or its clock is off)")
        if response.code == 404:
            return Check(name, FAIL, f"{url} answered 404",
                         "set [webhook] path to the path WeChat calls (and the proxy forwards)")
        return Check(name, FAIL, f"{url} answered HTTP {response.code}, not the echostr",
                     "another program answers there: point it at wxd's [webhook] listen")

    # unionid and the clock -------------------------------------------------------------------

    async def unionid(self, token: str | None) -> Check:
        """Whether followers carry a unionid, i.e. the OA is bound to an Open Platform account."""
        name = "unionid"
        if token is None:
            return Check(name, SKIP, "not checked without an official_account token")
        oa = self._oa(token)
        try:
            page = await oa.user_get()
            openids = _first_openids(page)
            if not openids:
                return Check(name, SKIP, "the OA has no follower yet to tell whether it is bound "
                             "to an Open Platform account")
            info = await oa.user_info(openids[0])
        except (WeChatAPIError, TransportError) as exc:
            return Check(name, FAIL, f"cannot read a follower ({exc})",
                         "the OA needs the user management permission (verified service account)")
        if info.get("unionid"):
            return Check(name, OK, "the OA is bound to an Open Platform account: MP users are "
                         "linked by unionid (qrcode and oauth links apply too)")
        return Check(name, FAIL, "followers carry no unionid: the OA is not bound to an Open "
                     "Platform account, so MP users cannot be linked by unionid",
                     "bind the OA and the MP to one Open Platform account (open.weixin.qq.com "
                     "→ 管理中心); until then only explicit links apply: qrcode (parametric QR) "
                     "and oauth (web authorization)")

    async def clock_skew(self) -> Check:
        name = "clock"
        base = self._cfg.wechat.api_base
        try:
            response = await self._http.fetch("GET", base.rstrip("/") + "/",
                                              connect_timeout_s=min(self._timeout_s, 5.0),
                                              request_timeout_s=self._timeout_s)
        except FetchError as exc:
            return Check(name, SKIP, f"cannot reach {base} for its Date header ({exc.reason})")
        now = self._clock.now()
        header = response.headers.get("Date")
        try:
            theirs = email.utils.parsedate_to_datetime(header).timestamp() if header else None
        except (TypeError, ValueError):
            theirs = None
        if theirs is None:
            return Check(name, SKIP, f"{base} sent no usable Date header")
        skew = now - theirs
        if abs(skew) <= self._skew_limit_s:
            return Check(name, OK, f"within {abs(skew):.0f} s of WeChat's")
        side = "ahead of" if skew > 0 else "behind"
        return Check(name, FAIL, f"this clock is {abs(skew):.0f} s {side} WeChat's Date",
                     "synchronise it (timedatectl set-ntp true, or chrony); webhook calls more "
                     f"than {self._cfg.webhook.replay_window_s:.0f} s off are refused "
                     "([webhook] replay_window_s)")


def _first_openids(page: dict[str, Any]) -> list[str]:
    data = page.get("data")
    openids = data.get("openid") if isinstance(data, dict) else None
    return [o for o in openids if isinstance(o, str)] if isinstance(openids, list) else []


def _writable(report: DatabaseReport) -> Check:
    directory = os.path.dirname(os.path.abspath(report.path))
    if report.error is None:
        detail = (f"{report.path} is writable" if report.exists else
                  f"{report.path} does not exist yet; wxd run creates it ({directory} is "
                  "writable)")
        return Check("database", OK, detail)
    if not report.exists and "does not exist" in report.error:
        fix = (f"create {directory}, writable by the user wxd runs as (systemd's "
               "StateDirectory=wxd creates /var/lib/wxd), or set [wxd] database")
    else:
        fix = (f"give the user wxd runs as write access to {report.path} and to {directory} "
               "(SQLite writes -wal and -shm files beside it), or set [wxd] database")
    return Check("database", FAIL, f"{report.path}: {report.error}", fix)


def _intact(report: DatabaseReport) -> list[Check]:
    if not report.exists:
        return [Check("database integrity", SKIP, "no database yet"),
                Check("database schema", SKIP, f"no database yet (wxd run creates version "
                      f"{report.current})")]
    restore = ("stop wxd, copy the latest `wxd backup` over it, remove its -wal and -shm "
               "files, start wxd")
    if report.integrity is None:
        unread = f"not checked: it cannot be opened ({report.read_error})"
        return [Check("database integrity", SKIP, unread), Check("database schema", SKIP, unread)]
    if report.integrity == "ok":
        integrity = Check("database integrity", OK, "integrity_check ok")
    else:
        integrity = Check("database integrity", FAIL, f"integrity_check: {report.integrity}",
                          restore)
    if report.version is None:
        schema = Check("database schema", SKIP, "version not readable")
    elif report.version > report.current:
        schema = Check("database schema", FAIL, f"version {report.version} is newer than this "
                       f"wxd's {report.current}", "upgrade wxd, or restore a backup this "
                       "version made")
    elif report.version < report.current:
        schema = Check("database schema", OK, f"version {report.version}; wxd run migrates it "
                       f"to {report.current} (take a backup first)")
    else:
        schema = Check("database schema", OK, f"version {report.version} (current)")
    return [integrity, schema]
