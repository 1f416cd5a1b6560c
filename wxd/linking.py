"""MP login, encryptedData and follower refreshes → one identity per person (linked by unionid).

Imports base modules, coalesce, wxd.wechat and the store only; the WeChat APIs arrive as
constructor arguments typed with small Protocols. The session_key never leaves this module's
storage calls: it is not logged, returned or put into an exception.
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from wxd.clock import SYSTEM_CLOCK, Clock
from wxd.coalesce import Coalescer, split_refused
from wxd.errors import (
    SessionKeyError,
    StorageError,
    WatermarkError,
    WeChatAPIError,
    WxdError,
)
from wxd.metrics import Registry
from wxd.store import identity as identity_store
from wxd.store import ingest, links, mp_users
from wxd.store.callbacks import OFF, Outbox
from wxd.store.db import Database
from wxd.store.identity import ExplicitLink, Identity
from wxd.wechat.crypto import decrypt_mp_data
from wxd.wechat.oa import BATCHGET_MAX

log = logging.getLogger(__name__)

# jscode2session errcodes that are the caller's problem, with the API code they map to.
# https://developers.weixin.qq.com/miniprogram/dev/OpenApiDoc/user-login/code2Session.html
_LOGIN_ERRORS: Mapping[int, tuple[str, str]] = {
    40029: ("invalid_code", "the login code is invalid or expired; call wx.login again"),
    40163: ("invalid_code", "the login code was already used; call wx.login again"),
    45011: ("rate_limited", "WeChat's login frequency limit was hit; retry in a minute"),
    40226: ("user_blocked", "WeChat blocked this login as high-risk"),
}


class SessionAPI(Protocol):
    """What login needs from wechat.MiniProgramAPI."""

    async def code2session(self, code: str) -> dict[str, Any]: ...


class UserInfoAPI(Protocol):
    """What refresh_follower needs from wechat.OfficialAccountAPI."""

    async def user_info(self, openid: str) -> dict[str, Any]: ...

    async def batchget(self, openids: Sequence[str]) -> list[dict[str, Any]]: ...


class LinkingError(WxdError):
    """A refusal the caller can act on; `code` is the stable admin API error code.

    Codes: invalid_code, rate_limited, user_blocked, mini_program_not_configured, not_logged_in,
    session_key_expired, watermark_mismatch, openid_mismatch, link_not_found, link_derived.
    The message never holds secrets.
    """

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class Linking:
    """Identity service: MP logins, encryptedData, follower refreshes and lookups.

    `mp_api`/`mp_appid` are None when there is no [mini_program] section; login and decrypt
    then raise LinkingError("mini_program_not_configured"). Every new link writes its
    user.linked callback through `outbox` in the transaction that makes it.
    """

    def __init__(self, db: Database, mp_api: SessionAPI | None, oa_api: UserInfoAPI, *,
                 mp_appid: str | None, clock: Clock = SYSTEM_CLOCK,
                 metrics: Registry | None = None, refresh_in_flight: int = 4,
                 outbox: Outbox = OFF) -> None:
        self._db = db
        self._outbox = outbox
        self._refreshes: Coalescer[str, None] = Coalescer(
            self._refresh_many, max_batch=BATCHGET_MAX, max_in_flight=refresh_in_flight,
            name="follower-refresh")
        self._mp_api = mp_api
        self._oa_api = oa_api
        self._mp_appid = mp_appid
        self._clock = clock
        self._unionid_missing = False
        self._warned_unionid = False
        registry = metrics if metrics is not None else Registry()
        self._logins = registry.counter(
            "wxd_mp_logins_total", "Mini Program logins (jscode2session) by result.",
            ("result",),
        )
        self._links = registry.counter(
            "wxd_links_total", "MP users newly linked to an OA follower through unionid.",
        )
        self._missing = registry.gauge(
            "wxd_unionid_missing",
            "1 when followers were seen but none carries a unionid (OA not bound).",
        )
        registry.add_collector(self._collect)

    async def _collect(self) -> None:
        self._missing.set(1.0 if await self.check_unionid() else 0.0)

    @property
    def unionid_missing(self) -> bool:
        """True when followers were observed but none ever carried a unionid (OA not bound to
        an Open Platform account). Updated by check_unionid() and refresh_follower()."""
        return self._unionid_missing

    def _count_login(self, result: str) -> None:
        self._logins.inc(result=result)

    def _count_links(self, n: int) -> None:
        if n:
            self._links.inc(n)

    async def login(self, code: str) -> Identity:
        """Exchange a wx.login code (jscode2session), store the MP user and its session_key.

        Returns the identity after linking. Raises LinkingError for the caller's problems
        (invalid/used code, frequency limit, blocked user, no Mini Program configured);
        WeChatAPIError/TransportError for upstream failures.
        """
        if self._mp_api is None:
            self._count_login("not_configured")
            raise LinkingError("mini_program_not_configured",
                               "wxd has no [mini_program] section configured")
        try:
            answer = await self._mp_api.code2session(code)
        except WeChatAPIError as exc:
            mapped = _LOGIN_ERRORS.get(exc.errcode)
            if mapped is None:
                self._count_login("upstream_error")
                raise
            self._count_login(mapped[0])
            raise LinkingError(*mapped) from None
        except WxdError:
            self._count_login("upstream_error")
            raise
        mp_openid = answer.get("openid")
        session_key = answer.get("session_key")
        if not isinstance(mp_openid, str) or not mp_openid or not isinstance(session_key, str):
            self._count_login("upstream_error")
            raise WeChatAPIError(-1, "jscode2session answer lacks openid/session_key",
                                 "/sns/jscode2session", kind="transient")
        unionid = answer.get("unionid")
        unionid = unionid if isinstance(unionid, str) and unionid else None
        now = self._clock.now()

        def store(conn: sqlite3.Connection) -> tuple[bool, Identity | None]:
            linked = mp_users.upsert(conn, mp_openid, unionid, session_key, now)
            if linked and unionid is not None:
                self._outbox.linked(conn, [unionid], "unionid", now)
            return linked, identity_store.find_identity(conn, mp_openid=mp_openid)

        linked, identity = await self._db.write(store)
        if identity is None:  # cannot happen: the row was written in the same transaction
            raise StorageError("MP user vanished after its write")
        self._count_login("ok")
        if linked:
            self._count_links(1)
            log.info("linked MP user %s to follower %s (on login)", mp_openid, identity.oa_openid)
        return identity

    async def decrypt(self, mp_openid: str, encrypted_data: str, iv: str) -> dict[str, Any]:
        """Decrypt MP encryptedData with the stored session_key and return its JSON object.

        Records watermark.timestamp; stores unionId (and links) when the data carries one.
        Raises LinkingError: not_logged_in (no session_key stored), session_key_expired (bad
        padding/JSON: the client must run wx.login again), watermark_mismatch (data of another
        app), openid_mismatch (openId of another user), mini_program_not_configured.
        """
        if self._mp_appid is None:
            raise LinkingError("mini_program_not_configured",
                               "wxd has no [mini_program] section configured")
        key = await self._db.read(lambda conn: mp_users.session_key(conn, mp_openid))
        if key is None:
            raise LinkingError("not_logged_in",
                               "no session for this mp_openid; log in (wx.login) first")
        try:
            data = decrypt_mp_data(key, encrypted_data, iv, self._mp_appid)
        except SessionKeyError:
            raise LinkingError(
                "session_key_expired",
                "the data cannot be decrypted with the stored session; call wx.login again",
            ) from None
        except WatermarkError:
            raise LinkingError("watermark_mismatch",
                               "the data's watermark is not this Mini Program's appid") from None
        open_id = data.get("openId")
        if open_id is not None and open_id != mp_openid:
            raise LinkingError("openid_mismatch", "the data belongs to another MP user")
        unionid = data.get("unionId")
        unionid = unionid if isinstance(unionid, str) and unionid else None
        watermark = data.get("watermark")
        stamp = watermark.get("timestamp") if isinstance(watermark, dict) else None
        watermark_at = float(stamp) if isinstance(stamp, (int, float)) else None
        now = self._clock.now()

        def store(conn: sqlite3.Connection) -> bool:
            linked = mp_users.set_unionid(conn, mp_openid, unionid, watermark_at, now)
            if linked and unionid is not None:
                self._outbox.linked(conn, [unionid], "unionid", now)
            return linked

        linked = await self._db.write(store)
        if linked:
            self._count_links(1)
            log.info("linked MP user %s through decrypted unionId", mp_openid)
        return data

    async def lookup(self, *, unionid: str | None = None, mp_openid: str | None = None,
                     oa_openid: str | None = None) -> Identity | None:
        """The identity for exactly one key (ValueError otherwise), None when unknown."""
        return await self._db.read(lambda conn: identity_store.find_identity(
            conn, unionid=unionid, mp_openid=mp_openid, oa_openid=oa_openid))

    async def unlink(self, mp_openid: str) -> ExplicitLink:
        """Remove the explicit (qrcode/oauth) link of an MP user; returns what was removed
        (also one a unionid link overrides).

        LinkingError link_derived when the MP user has no explicit link but is linked through
        unionid (that link is WeChat's fact, not wxd's to remove), link_not_found otherwise.
        """

        def remove(conn: sqlite3.Connection) -> ExplicitLink | Identity | None:
            removed = links.unbind(conn, mp_openid, self._clock.now(), outbox=self._outbox)
            if removed is not None:
                return removed
            identity = identity_store.find_identity(conn, mp_openid=mp_openid)
            return identity if identity is not None and identity.link_source == "unionid" else None

        removed = await self._db.write(remove)
        if isinstance(removed, Identity):
            raise LinkingError("link_derived", "this MP user is linked through unionid; that "
                               "link cannot be removed")
        if removed is None:
            raise LinkingError("link_not_found", "this MP user has no QR-code or OAuth link")
        log.info("removed the %s link of MP user %s (to OA openid %s)", removed.source,
                 mp_openid, removed.oa_openid)
        return removed

    async def refresh_follower(self, oa_openid: str) -> None:
        """Fetch user/info for a follower and store it (unionid → link). Used after subscribe.

        Refreshes waiting at the same moment share one batchget of up to 100 openids (a burst
        of follows costs one call per 100, not one per follower); a lone one is a user/info.
        Upstream errors propagate (the event job retries). "Events win" applies: the data is
        stamped with the time just before the request.
        """
        await self._refreshes.submit(oa_openid)

    async def _refresh_many(self, openids: list[str]) -> list[BaseException | None]:
        observed_at = self._clock.now()
        if len(openids) == 1:
            infos = [await self._oa_api.user_info(openids[0])]
            outcomes: list[BaseException | None] = [None]
        else:
            try:
                infos = await self._oa_api.batchget(openids)
                outcomes = [None] * len(openids)
            except WeChatAPIError as exc:
                if exc.kind != "terminal":
                    raise
                # One openid WeChat refuses (40003, 50005) fails the whole batchget: split it
                # (a lone openid asks user/info), so that only that follower's job sees the error.
                infos, failures = await split_refused(
                    openids, exc, self._oa_api.batchget,
                    lambda error: isinstance(error, WxdError), single=self._oa_api.user_info)
                failed = dict(failures)
                outcomes = [failed.get(openid) for openid in openids]
        now = self._clock.now()

        def store(conn: sqlite3.Connection) -> list[str]:
            linked = ingest.apply_user_infos(conn, infos, observed_at, now)
            self._outbox.linked(conn, linked, "unionid", now)
            return linked

        newly = await self._db.write(store)
        self._count_links(len(newly))
        if newly:
            log.info("linked %d followers (on user/info)", len(newly))
        await self.check_unionid()
        return outcomes

    async def check_unionid(self) -> bool:
        """Recompute unionid_missing from storage; warn once per process when it turns True."""

        self._unionid_missing = await self._db.read(identity_store.unionid_missing)
        if self._unionid_missing and not self._warned_unionid:
            self._warned_unionid = True
            log.warning(
                "WeChat returns no unionid for any follower: the Official Account is probably "
                "not bound to an Open Platform account, so no MP user can be linked through "
                "unionid (QR link codes and OAuth links still work: see the README)"
            )
        return self._unionid_missing

    async def counts(self) -> dict[str, Any]:
        """identity_store.counts(), links (by source) and unionid_missing, for /v1/stats."""
        result: dict[str, Any] = await self._db.read(identity_store.counts)
        result["links"] = await self._db.read(identity_store.links_by_source)
        result["unionid_missing"] = await self.check_unionid()
        return result
