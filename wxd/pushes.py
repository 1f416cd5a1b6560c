"""PushService: validates push requests, resolves recipients, caches the OA's templates, enqueues.

Imports base modules, wxd.wechat.templates and the store (pushes, templates, identity, db) only;
never push_workers.py (the doorbell arrives as a callback) and never tornado.web.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from wxd.clock import SYSTEM_CLOCK, Clock
from wxd.errors import WxdError
from wxd.metrics import Registry
from wxd.store import paging
from wxd.store import pushes as push_store
from wxd.store import templates as template_store
from wxd.store.db import Database
from wxd.store.identity import find_identity
from wxd.wechat.templates import (
    PushRejected,
    PushRequest,
    check_against_template,
    parse_request,
    placeholders,
)

log = logging.getLogger(__name__)

# An unknown template_id triggers a refetch of the list at most this often (seconds), so a
# client sending a wrong id cannot make wxd hammer get_all_private_template.
UNKNOWN_REFRESH_S = 60.0
MAX_LIST_LIMIT = 500


class TemplateSource(Protocol):
    """What PushService needs from wechat.OfficialAccountAPI."""

    async def templates(self) -> list[dict[str, Any]]:
        """get_all_private_template's template_list items (template_id, title, content, ...)."""
        ...


@dataclass(frozen=True)
class Enqueued:
    """One accepted push: `push` is {"id", "status"} for a new one, or the stored push when
    its idempotency_key was already known (`created` False: answer 200, not 202)."""

    push: dict[str, Any]
    created: bool


@dataclass(frozen=True)
class _Prepared:
    request: PushRequest
    push_id: str


class PushService:
    """The enqueue side of the push pipeline (the admin API's collaborator).

    Nothing is queued that cannot be sent: the recipient must be a known, subscribed OA follower
    (directly, or through the unionid link), the template must exist with exactly these keys
    (when the template list can be fetched), and the values must obey WeChat's type rules.
    A 202 is answered only after the row is committed (db.write returns after COMMIT).
    `on_enqueued` (e.g. PushWorkers.ring) is called after new pushes are committed.
    """

    def __init__(self, db: Database, oa_api: TemplateSource, *, mp_appid: str | None,
                 template_cache_s: float = 3600.0, clock: Clock = SYSTEM_CLOCK,
                 metrics: Registry | None = None,
                 on_enqueued: Callable[[], None] | None = None) -> None:
        self._db = db
        self._api = oa_api
        self._mp_appid = mp_appid or None
        self._cache_s = template_cache_s
        self._clock = clock
        self._on_enqueued = on_enqueued
        self._templates: dict[str, dict[str, Any]] | None = None
        self._fetched_at: float | None = None
        self._last_attempt = float("-inf")
        self._last_ok = False
        self._stale = False
        self._lock = asyncio.Lock()
        registry = metrics if metrics is not None else Registry()
        self._transitions = registry.counter(
            "wxd_pushes_total", "Push status transitions by new status.", ("status",))
        self._rejected = registry.counter(
            "wxd_push_rejected_total", "Push requests refused before queueing.", ("code",))

    # Templates ------------------------------------------------------------------------------

    def invalidate_templates(self) -> None:
        """WeChat answered 40037 for a send: refetch the template list before the next check."""
        self._stale = True

    async def refresh_templates(self) -> list[dict[str, Any]]:
        """Fetch get_all_private_template now and replace the cache (table `templates`).
        Raises WxdError (TransportError / WeChatAPIError) when WeChat cannot be asked."""
        async with self._lock:
            return await self._refresh_locked()

    async def _refresh_locked(self) -> list[dict[str, Any]]:
        self._last_attempt = self._clock.now()
        try:
            items = await self._api.templates()
        except WxdError:
            self._last_ok = False
            raise
        rows: list[tuple[str, str, str, tuple[str, ...]]] = []
        for item in items:
            template_id, content = item.get("template_id"), item.get("content")
            if isinstance(template_id, str) and isinstance(content, str):
                title = item.get("title")
                rows.append((template_id, title if isinstance(title, str) else "", content,
                             placeholders(content)))
        now = self._clock.now()
        await self._db.write(lambda conn: template_store.save(conn, rows, now))
        self._templates = {tid: {"title": title, "content": content, "keys": keys}
                           for tid, title, content, keys in rows}
        self._fetched_at, self._last_ok, self._stale = now, True, False
        log.info("template list refreshed: %d templates", len(rows))
        return self.cached_templates()

    def cached_templates(self) -> list[dict[str, Any]]:
        """The cached templates: [{"template_id", "title", "content", "keys"}] (may be empty)."""
        return [{"template_id": tid, "title": t["title"], "content": t["content"],
                 "keys": list(t["keys"])} for tid, t in sorted((self._templates or {}).items())]

    async def templates(self) -> dict[str, Any]:
        """{"templates": [...], "fetched_at"} after loading the cache (fetching if needed)."""
        await self._template_keys(set())
        return {"templates": self.cached_templates(), "fetched_at": self._fetched_at}

    async def _template_keys(self, wanted: set[str]) -> tuple[dict[str, tuple[str, ...]], bool]:
        """(keys by template id, authoritative). Not authoritative = the list could not be
        fetched: unknown ids are then accepted unverified (WeChat will judge them)."""
        async with self._lock:
            if self._templates is None:
                cached, fetched = await self._db.read(template_store.load)
                self._templates, self._fetched_at = cached, fetched
                self._last_ok = fetched is not None
            now = self._clock.now()
            fresh = (self._fetched_at is not None and not self._stale
                     and now - self._fetched_at < self._cache_s)
            missing = wanted - set(self._templates)
            if not fresh or (missing and now - self._last_attempt >= UNKNOWN_REFRESH_S):
                try:
                    await self._refresh_locked()
                except WxdError as exc:
                    log.warning("cannot fetch the template list (%s); pushes with an unknown "
                                "template_id are queued unverified", exc)
            keys = {tid: t["keys"] for tid, t in self._templates.items()}
            return keys, self._last_ok

    # Enqueue --------------------------------------------------------------------------------

    async def enqueue(self, raw: Any) -> Enqueued:
        """Validate and queue one push (POST /v1/pushes). Raises PushRejected."""
        [result] = await self.enqueue_batch([raw])
        if isinstance(result, PushRejected):
            raise result
        return result

    async def enqueue_batch(self, items: Sequence[Any]) -> list[Enqueued | PushRejected]:
        """Validate every item, then queue all valid ones in ONE write (one group commit).
        Returns one result per item, in order: Enqueued, or the PushRejected for that item."""
        parsed: list[PushRequest | PushRejected] = []
        for raw in items:
            try:
                parsed.append(parse_request(raw, self._mp_appid))
            except PushRejected as exc:
                parsed.append(exc)
        wanted = {p.template_id for p in parsed if isinstance(p, PushRequest)}
        keys, authoritative = await self._template_keys(wanted) if wanted else ({}, True)
        prepared: list[_Prepared | PushRejected] = []
        for item in parsed:
            if isinstance(item, PushRejected):
                prepared.append(item)
                continue
            try:
                template_keys = keys.get(item.template_id)
                if template_keys is None and authoritative:
                    raise PushRejected(
                        "template_unknown", f"template {item.template_id} is not one of the "
                        "Official Account's templates (get_all_private_template)",
                        "template_id", 422)
                check_against_template(item, template_keys)
            except PushRejected as exc:
                prepared.append(exc)
                continue
            prepared.append(_Prepared(item, push_store.new_push_id()))
        now = self._clock.now()
        if any(isinstance(p, _Prepared) for p in prepared):
            results = await self._db.write(lambda conn: _insert_all(conn, prepared, now))
        else:
            results = [p for p in prepared if isinstance(p, PushRejected)]
        created = sum(1 for r in results if isinstance(r, Enqueued) and r.created)
        self._count(results)
        if created and self._on_enqueued is not None:
            self._on_enqueued()
        return results

    def _count(self, results: Sequence[Enqueued | PushRejected]) -> None:
        for result in results:
            if isinstance(result, PushRejected):
                self._rejected.inc(code=result.code)
            elif result.created:
                self._transitions.inc(status="queued")

    # Operator -------------------------------------------------------------------------------

    async def get(self, push_id: str) -> dict[str, Any] | None:
        return await self._db.read(lambda conn: push_store.get(conn, push_id))

    async def list(self, status: str | None, limit: int = 50, cursor: str | None = None
                   ) -> tuple[list[dict[str, Any]], str | None]:
        """Newest first. ValueError for an unknown status, a bad limit or a bad cursor."""
        if status is not None and status not in push_store.STATUSES:
            raise ValueError(f"status must be one of {', '.join(push_store.STATUSES)}")
        if not 1 <= limit <= MAX_LIST_LIMIT:
            raise ValueError(f"limit must be 1..{MAX_LIST_LIMIT}")
        if cursor is not None:
            paging.decode_cursor(cursor)
        return await self._db.read(
            lambda conn: push_store.list_pushes(conn, status, limit, cursor))

    async def retry(self, push_id: str) -> tuple[str, dict[str, Any] | None]:
        """failed → queued. ("ok" | "not_found" | "invalid_state", the push or None); after
        "ok" the push also says whether its client_msg_id was kept (`client_msg_id_reused`)
        and, when the retry may deliver the message twice, a `warning` (also logged)."""
        now = self._clock.now()

        def run(conn: sqlite3.Connection) -> tuple[push_store.OperatorRetry,
                                                   dict[str, Any] | None]:
            return push_store.operator_retry(conn, push_id, now), push_store.get(conn, push_id)

        retried, push = await self._db.write(run)
        if retried.outcome == "ok" and push is not None:
            self._transitions.inc(status="queued")
            if self._on_enqueued is not None:
                self._on_enqueued()
            push["client_msg_id_reused"] = retried.client_msg_id_reused
            if retried.warning is not None:
                push["warning"] = retried.warning
                log.warning("operator retry of push %s: %s", push_id, retried.warning)
            else:
                log.info("operator retry of push %s with %s client_msg_id %s", push_id,
                         "the same" if retried.client_msg_id_reused else "a new",
                         push["client_msg_id"])
        return retried.outcome, push

    async def cancel(self, push_id: str) -> tuple[str, dict[str, Any] | None]:
        """queued → cancelled. ("ok" | "not_found" | "invalid_state", the push or None)."""
        now = self._clock.now()

        def run(conn: sqlite3.Connection) -> tuple[str, dict[str, Any] | None]:
            outcome, _ = push_store.cancel(conn, push_id, now)
            return outcome, push_store.get(conn, push_id)

        outcome, push = await self._db.write(run)
        if outcome == "ok":
            self._transitions.inc(status="cancelled")
        return outcome, push

    async def stats(self) -> dict[str, Any]:
        """push_store.push_stats: counts by status, total, paused_until."""
        return await self._db.read(push_store.push_stats)


def _insert_all(conn: sqlite3.Connection, prepared: Sequence[_Prepared | PushRejected],
                now: float) -> list[Enqueued | PushRejected]:
    """The batch's single write: idempotency first, then recipient resolution, then insert."""
    results: list[Enqueued | PushRejected] = []
    for item in prepared:
        if isinstance(item, PushRejected):
            results.append(item)
            continue
        request = item.request
        if request.idempotency_key is not None:
            existing = push_store.by_idempotency_key(conn, request.idempotency_key)
            if existing is not None:
                results.append(Enqueued(existing, False))
                continue
        try:
            oa_openid = _recipient(conn, request.to_kind, request.to_value)
        except PushRejected as exc:
            results.append(exc)
            continue
        push_store.insert(conn, push_store.NewPush(
            item.push_id, request.idempotency_key, request.to, oa_openid, request.template_id,
            request.wechat_body(oa_openid)), now)
        results.append(Enqueued({"id": item.push_id, "status": "queued"}, True))
    return results


def _recipient(conn: sqlite3.Connection, kind: str, value: str) -> str:
    """The subscribed OA openid for a `to` key, or PushRejected recipient_unknown /
    recipient_not_following (nothing is queued that cannot be sent: 43004)."""
    lookup: Mapping[str, str] = {kind: value}
    identity = find_identity(conn, **lookup)
    if identity is None:
        raise PushRejected("recipient_unknown", f"no person with {kind} {value} is known to wxd "
                           "(has the follower backfill run? has the user logged in?)", f"to.{kind}",
                           422)
    if identity.oa_openid is None:
        raise PushRejected("recipient_not_following", f"{kind} {value} has no Official Account "
                           "follower: the person never followed the OA (or is not linked: by "
                           "unionid, a QR link code or an OAuth link)", f"to.{kind}", 422)
    if not identity.subscribed:
        raise PushRejected("recipient_not_following", f"{kind} {value} does not follow the "
                           "Official Account now (WeChat would answer 43004)", f"to.{kind}", 422)
    return identity.oa_openid
