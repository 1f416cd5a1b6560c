"""OAuth links: an MP user gets a one-time start URL on wxd's public listener; opened in WeChat
(a Mini Program web-view, or a link in the OA), it passes through the OA's web authorization
(snsapi_base, silent) and links the MP user to the OA openid WeChat returns (source "oauth").

Imports base modules, wxd.wechat and the store only; the code exchange arrives as a constructor
argument typed with a Protocol. The HTTP side is wxd/oauth_web.py. Nothing here logs or returns
the authorization code, the state or WeChat's user tokens.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
import urllib.parse
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Protocol

from wxd.clock import SYSTEM_CLOCK, Clock
from wxd.errors import StorageError, WeChatAPIError, WxdError
from wxd.metrics import Registry
from wxd.qrlinks import (
    DEFAULT_EXPIRES_S,
    LINK_CODES_HELP,
    LINK_CODES_METRIC,
    new_code_id,
    new_secret,
)
from wxd.store import links
from wxd.store.callbacks import OFF, Outbox
from wxd.store.db import Database
from wxd.wechat.weburls import AUTHORIZE_BASE, STATE_RE, authorize_url

log = logging.getLogger(__name__)

MIN_EXPIRES_S = 60
MAX_EXPIRES_S = 86_400
MAX_RETURN_URL = 2048
# The authorization code: single use, 5 minutes. A repeated callback (WeChat or the browser
# sometimes hits it twice) is answered from memory for that long, then from the stored digest.
# https://developers.weixin.qq.com/doc/offiaccount/OA_Web_Apps/Wechat_webpage_authorization.html
CODE_LIFETIME_S = 300.0
RECENT_CAPACITY = 10_000
_TOKEN_RE = re.compile(r"[A-Za-z0-9]{1,128}")
_CODE_RE = re.compile(r"[A-Za-z0-9_-]{1,256}")
_OPENID_RE = re.compile(r"[A-Za-z0-9_-]{1,128}")
# Errcodes about the code itself (invalid 40029, used 40163, expired 42003, missing 41008) and
# -1 (retrying the same code only gets 40163): the person has to open the link again.
_CODE_ERRORS = frozenset({40029, 40163, 42003, 41008, -1})


class CodeExchange(Protocol):
    """What OAuthLinks needs from wechat.oa.WebAuthAPI."""

    appid: str

    async def exchange_code(self, code: str) -> dict[str, Any]: ...


@dataclass(frozen=True)
class Page:
    """An answer for the browser: `status` (200, 302 or 4xx/5xx), a human `message` (no
    secrets), `location` for a 302, `outcome` a stable label (metrics, tests)."""

    status: int
    outcome: str
    message: str
    location: str | None = None


def public_base(public_url: str, webhook_path: str) -> str:
    """The public listener's base URL from [webhook] public_url, without a trailing slash and
    without the webhook path when the URL was given with it."""
    base = public_url.rstrip("/")
    path = webhook_path.rstrip("/")
    if path and base.endswith(path) and base[: -len(path)].count("/") == 2:
        base = base[: -len(path)]
    return base


def return_url_allowed(url: str, hosts: tuple[str, ...]) -> bool:
    """True when `url` is an absolute https URL (http on localhost/127.0.0.1 too) whose host
    (or host:port) is in `hosts`, without user info, backslashes, controls or spaces: the
    callback redirects there, so anything else would be an open redirect."""
    if not hosts or len(url) > MAX_RETURN_URL or not url.isascii():
        return False
    if any(c in url for c in "\\ \t\r\n") or any(ord(c) < 32 or ord(c) == 127 for c in url):
        return False
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port
    except ValueError:
        return False
    host = (parts.hostname or "").lower()
    if not host or "@" in parts.netloc or parts.netloc.lower() not in (host, f"{host}:{port}"):
        return False
    if parts.scheme != "https" and not (parts.scheme == "http"
                                        and host in ("localhost", "127.0.0.1")):
        return False
    return host in hosts or (port is not None and f"{host}:{port}" in hosts)


class OAuthLinks:
    """Creates OAuth link codes and runs /oauth/start and /oauth/callback.

    `public` is the public listener's base URL (public_base()); `authorize_base` where the
    authorize page is (wechat.weburls.web_bases); `return_hosts` the allowed return_url hosts.
    A link made (or replaced) writes its user.linked (user.unlinked) callback through `outbox`
    in the link's transaction (links.bind).
    """

    def __init__(self, db: Database, api: CodeExchange, *, public: str,
                 authorize_base: str = AUTHORIZE_BASE, return_hosts: tuple[str, ...] = (),
                 clock: Clock = SYSTEM_CLOCK, metrics: Registry | None = None,
                 outbox: Outbox = OFF) -> None:
        self._db = db
        self._outbox = outbox
        self._api = api
        self._public = public.rstrip("/")
        self._authorize_base = authorize_base
        self._return_hosts = return_hosts
        self._clock = clock
        # digest of (state, code) -> (the shared answer, when it is forgotten; monotonic s)
        self._recent: OrderedDict[str, tuple[asyncio.Future[Page], float]] = OrderedDict()
        registry = metrics if metrics is not None else Registry()
        self._outcomes = registry.counter(LINK_CODES_METRIC, LINK_CODES_HELP, ("kind", "outcome"))

    @property
    def redirect_uri(self) -> str:
        """The callback URL WeChat sends the browser back to (its host must be the OA's
        web-authorization domain)."""
        return f"{self._public}/oauth/callback"

    def return_url_allowed(self, url: str) -> bool:
        return return_url_allowed(url, self._return_hosts)

    async def create(self, mp_openid: str, return_url: str | None = None,
                     expires_in: int = DEFAULT_EXPIRES_S) -> dict[str, Any]:
        """Store a one-time OAuth link for `mp_openid`: the 201 answer {"id", "url",
        "expires_at"} where url = {public}/oauth/start?t=... ValueError for an expires_in
        outside MIN_EXPIRES_S..MAX_EXPIRES_S or a return_url not on the allow-list."""
        if not MIN_EXPIRES_S <= expires_in <= MAX_EXPIRES_S:
            raise ValueError(f"expires_in must be {MIN_EXPIRES_S}..{MAX_EXPIRES_S} seconds")
        if return_url is not None and not self.return_url_allowed(return_url):
            raise ValueError("return_url is not an https URL on [linking] oauth_return_hosts")
        now = self._clock.now()
        code = links.LinkCode(id=new_code_id("lo_"), kind="oauth", mp_openid=mp_openid,
                              token=new_secret(32), state=new_secret(32), created_at=now,
                              expires_at=now + expires_in, return_url=return_url)
        await self._db.write(lambda conn: links.create_code(conn, code))
        self._count("created")
        log.info("OAuth link %s created for MP user %s (valid %d s)", code.id, mp_openid,
                 expires_in)
        return {"id": code.id, "url": f"{self._public}/oauth/start?t={code.token}",
                "expires_at": code.expires_at}

    async def status(self, code_id: str) -> dict[str, Any] | None:
        """{"id", "status": pending|linked|expired, "oa_openid"?, "linked_at"?, ...} or None."""
        found = await self._db.read(lambda conn: links.code(conn, code_id))
        if found is None or found.kind != "oauth":
            return None
        return found.to_json(self._clock.now())

    def _count(self, outcome: str) -> None:
        self._outcomes.inc(kind="oauth", outcome=outcome)

    def _page(self, status: int, outcome: str, message: str,
              location: str | None = None) -> Page:
        self._count(outcome)
        return Page(status, outcome, message, location)

    async def start(self, token: str | None) -> Page:
        """GET /oauth/start?t=...: a 302 to WeChat's authorize page for a pending link; 400
        for a malformed or unknown token, 410 for an expired or used one. Repeatable while
        pending (a reload gets the same redirect)."""
        if token is None or not _TOKEN_RE.fullmatch(token):
            return self._page(400, "bad_token", "This link is not valid.")
        now = self._clock.now()
        try:
            found = await self._db.read(lambda conn: links.code_by_token(conn, "oauth", token))
        except StorageError:
            return self._page(503, "storage_unavailable", "Please try again in a moment.")
        if found is None or found.state is None:
            return self._page(400, "unknown_token", "This link is not valid.")
        status = found.status(now)
        if status == "linked":
            return self._page(410, "start_used", "This link has been used already.")
        if status == "expired":
            return self._page(410, "start_expired", "This link has expired; ask for a new one.")
        location = authorize_url(self._api.appid, self.redirect_uri, found.state,
                                 self._authorize_base)
        return self._page(302, "start", "Continue in WeChat.", location)

    async def callback(self, code: str | None, state: str | None) -> Page:
        """GET /oauth/callback?code&state: exchange the code and link. A bad, unknown, expired
        or used state, a missing code (the person declined), a code WeChat refuses, a snapshot
        (virtual) user or a unionid conflict answer 4xx and link nothing. The same code and
        state again get the same answer without a second exchange."""
        if state is None or not STATE_RE.fullmatch(state):
            return self._page(400, "bad_state", "This authorization is not valid.")
        try:
            found = await self._db.read(lambda conn: links.code_by_state(conn, state))
        except StorageError:
            return self._page(503, "storage_unavailable", "Please try again in a moment.")
        if found is None:
            return self._page(400, "unknown_state", "This authorization is not valid.")
        if not code:
            return self._page(400, "declined", "The authorization was declined; nothing was "
                              "linked. Open the link again to retry.")
        if not _CODE_RE.fullmatch(code):
            return self._page(400, "bad_code", "This authorization is not valid.")
        digest = hashlib.sha256(f"{state}:{code}".encode()).hexdigest()
        if found.linked_at is not None:
            if found.auth_code == digest:
                return self._success(found, "repeat")
            return self._page(410, "used", "This link has already been used.")
        if found.status(self._clock.now()) == "expired":
            return self._page(410, "expired", "This link has expired; ask for a new one.")
        return await self._once(digest, found, code)

    async def _once(self, digest: str, found: links.LinkCode, code: str) -> Page:
        """Exchange one (state, code) pair at most once per CODE_LIFETIME_S in this process:
        a concurrent or later repeat awaits or reuses the first answer."""
        now = self._clock.monotonic()
        while self._recent and next(iter(self._recent.values()))[1] <= now:
            self._recent.popitem(last=False)
        known = self._recent.get(digest)
        if known is not None:
            page = await asyncio.shield(known[0])
            self._count("repeat")
            return page
        future: asyncio.Future[Page] = asyncio.get_running_loop().create_future()
        self._recent[digest] = (future, now + CODE_LIFETIME_S)
        while len(self._recent) > RECENT_CAPACITY:
            self._recent.popitem(last=False)
        try:
            page = await self._exchange(digest, found, code)
        except BaseException as exc:
            self._recent.pop(digest, None)
            if isinstance(exc, Exception):
                future.set_exception(exc)
                future.exception()  # retrieved: a repeat that never came must not warn
            else:
                future.cancel()
            raise
        future.set_result(page)
        return page

    async def _exchange(self, digest: str, found: links.LinkCode, code: str) -> Page:
        try:
            answer = await self._api.exchange_code(code)
        except WeChatAPIError as exc:
            log.info("OAuth link %s: WeChat refused the code exchange (errcode %d)", found.id,
                     exc.errcode)
            if exc.errcode in _CODE_ERRORS:
                return self._page(400, "code_rejected", "WeChat did not accept this "
                                  f"authorization (errcode {exc.errcode}). Open the link again.")
            return self._page(502, "upstream_error", "WeChat refused the authorization "
                              f"(errcode {exc.errcode}); the operator should check wxd's log.")
        except WxdError as exc:
            log.warning("OAuth link %s: the code exchange failed: %s", found.id, exc)
            return self._page(502, "upstream_unavailable", "WeChat could not be reached. "
                              "Open the link again in a moment.")
        openid = answer.get("openid")
        if not isinstance(openid, str) or not _OPENID_RE.fullmatch(openid):
            log.warning("OAuth link %s: the exchange answer has no usable openid", found.id)
            return self._page(502, "upstream_error", "WeChat's answer had no user; nothing "
                              "was linked.")
        if answer.get("is_snapshotuser") in (1, "1", True):
            # A snapshot-page (virtual) user: its openid is not the person's real one.
            log.info("OAuth link %s: WeChat reports a snapshot-mode user; nothing linked",
                     found.id)
            return self._page(403, "snapshot_user", "Tap 使用完整服务 (use the full service) at "
                              "the bottom of the page and open the link again.")
        now = self._clock.now()
        try:
            redeemed = await self._db.write(
                lambda conn: links.redeem(conn, found.id, openid, now, now, auth_code=digest,
                                          outbox=self._outbox))
        except StorageError:
            return self._page(503, "storage_unavailable", "Please try again in a moment.")
        if redeemed is None:
            return self._page(400, "unknown_state", "This authorization is not valid.")
        if redeemed.outcome == "linked":
            bound = redeemed.bound
            replaced = bound.replaced if bound is not None else ()
            log.info("linked MP user %s to OA openid %s by OAuth link %s%s", found.mp_openid,
                     openid, found.id, "".join(
                         f" (replacing the earlier {old.source} link {old.mp_openid} -> "
                         f"{old.oa_openid})" for old in replaced))
            return self._success(redeemed.code, "linked")
        if redeemed.outcome == "repeat":
            return self._success(redeemed.code, "repeat")
        if redeemed.outcome == "conflict":
            reason = redeemed.bound.conflict if redeemed.bound else None
            log.info("OAuth link %s by %s: link_conflict (%s); nothing linked", found.id, openid,
                     reason)
            return self._page(409, "link_conflict", "This WeChat account is already linked "
                              "to another account; nothing was changed.")
        if redeemed.outcome == "expired":
            return self._page(410, "expired", "This link has expired; ask for a new one.")
        return self._page(410, "used", "This link has already been used.")

    def _success(self, found: links.LinkCode, outcome: str) -> Page:
        url = found.return_url
        if url is not None and self.return_url_allowed(url):
            return self._page(302, outcome, "Linked.", url)
        return self._page(200, outcome, "Your accounts are linked. You can close this page.")
