"""Composition root: builds every component from Config, starts them in order, stops in reverse.

The only module that knows every concrete class. Components get only their own values.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sqlite3
from collections.abc import Mapping
from typing import Any, Protocol

from wxd import admin, oauth_web, sdlisten, webhook
from wxd.admin import backfill as admin_backfill
from wxd.admin import callbacks as admin_callbacks
from wxd.admin import jssdk, openapi, ops, stats, users
from wxd.admin import keys as admin_keys
from wxd.admin import links as admin_links
from wxd.admin import pushes as admin_pushes
from wxd.admin import tokens as admin_tokens
from wxd.apikeys import ApiKeys
from wxd.backfill import FollowerBackfill
from wxd.callbacks import Callbacks, CallbackWorkers
from wxd.clock import SYSTEM_CLOCK, Clock
from wxd.config import Config, Listen, targets_listener
from wxd.errors import ConfigError
from wxd.events import EventRouter, EventWorkers
from wxd.linking import Linking
from wxd.listener import Listener
from wxd.metrics import Registry
from wxd.oauth_links import OAuthLinks, public_base
from wxd.push_workers import PushWorkers
from wxd.pushes import PushService
from wxd.qrlinks import CARD_JOB, CardSettings, QrLinks
from wxd.sdnotify import Notifier
from wxd.store import jobs as job_store
from wxd.store import pushes as push_store
from wxd.store import tokens as token_store
from wxd.store.callbacks import OFF, Outbox
from wxd.store.db import Database
from wxd.tokens import TokenManager
from wxd.webhook import Webhook
from wxd.wechat.client import WeChatClient
from wxd.wechat.crypto import MessageCrypto
from wxd.wechat.mp import MiniProgramAPI
from wxd.wechat.oa import OfficialAccountAPI, WebAuthAPI
from wxd.wechat.transport import KeepAliveClient
from wxd.wechat.weburls import web_bases

log = logging.getLogger(__name__)


class Component(Protocol):
    async def start(self) -> None: ...
    async def stop(self) -> None: ...


class HttpClient:
    """The upstream keep-alive client as a component, closed after everything that uses it."""

    def __init__(self, max_clients: int, metrics: Registry) -> None:
        self.client = KeepAliveClient(max_clients, metrics=metrics)

    async def start(self) -> None:
        """Nothing to start; created in __init__ so components can be built with it."""

    async def stop(self) -> None:
        self.client.close()


class Daemon:
    """Every wxd component in one process. `await start()`, then `await stop()` (idempotent).

    Start order: database → upstream client → tokens (persisted token reused, refreshed only if
    stale) → push recovery + workers → event workers → backfill (resumes) → admin listener
    (loopback) → callback delivery (when [callbacks] url is set; refused if it points at the
    admin listener) → webhook listener last. Stop runs the same list in reverse. With callbacks
    on, every service writes its facts' callbacks through one Outbox.
    """

    def __init__(self, config: Config, *, clock: Clock = SYSTEM_CLOCK,
                 environ: Mapping[str, str] | None = None) -> None:
        self.config = config
        self.clock = clock
        self.metrics = Registry()
        self.notifier = Notifier(environ or {})
        self._environ = environ or {}
        self.db: Database | None = None
        self.tokens: dict[str, TokenManager] = {}
        self.jsapi_ticket: TokenManager | None = None
        self.api_keys: ApiKeys | None = None
        self.linking: Linking | None = None
        self.qrlinks: QrLinks | None = None
        self.oauth: OAuthLinks | None = None
        self.pushes: PushService | None = None
        self.workers: PushWorkers | None = None
        self.events: EventWorkers | None = None
        self.backfill: FollowerBackfill | None = None
        self.callback_workers: CallbackWorkers | None = None
        self._hook: Webhook | None = None
        self.callbacks: Callbacks | None = None
        self.admin: Listener | None = None
        self.webhook: Listener | None = None
        self._started: list[Component] = []
        self._watchdog: asyncio.Task[None] | None = None
        self._started_at = clock.monotonic()
        self._state = "new"

    @property
    def state(self) -> str:
        """"new" | "running" | "stopping" | "stopped"."""
        return self._state

    async def start(self) -> None:
        """Start every component in order (a failure stops those started and raises), then tell
        systemd READY=1 and start the watchdog pings. Idempotent."""
        if self._state != "new":
            return
        self._state = "running"
        try:
            await self._build_and_start()
        except BaseException:
            await self.stop()
            raise
        self.notifier.notify("READY=1")
        interval = self.notifier.watchdog_interval_s
        if interval:
            self._watchdog = asyncio.create_task(self._ping(interval), name="wxd-watchdog")

    async def _ping(self, interval_s: float) -> None:
        while True:
            await self.clock.sleep(interval_s)
            self.notifier.notify("WATCHDOG=1")

    async def _build_and_start(self) -> None:
        cfg, clock, metrics = self.config, self.clock, self.metrics
        self.db = db = await Database.open(cfg.wxd.database, metrics=metrics, clock=clock)
        http = HttpClient(cfg.wechat.max_clients, metrics)
        await self._start(http)
        client = WeChatClient(http.client, cfg.wechat.api_base, cfg.wechat.connect_timeout_s,
                              cfg.wechat.request_timeout_s, metrics=metrics)

        apps = {"oa": cfg.official_account, "mp": cfg.mini_program}
        for app, creds in apps.items():
            if creds is None:
                continue
            manager = TokenManager(
                app, creds.appid, creds.secret, client, db, mode=cfg.wechat.token_mode,
                refresh_margin_s=cfg.wechat.token_refresh_margin_s,
                check_interval_s=cfg.wechat.token_check_interval_s,
                daily_budget=cfg.wechat.token_daily_budget,
                backoff_base_s=cfg.wechat.token_backoff_base_s,
                backoff_max_s=cfg.wechat.token_backoff_max_s,
                quota_pause_s=cfg.wechat.token_quota_pause_s, clock=clock, metrics=metrics)
            self.tokens[app] = manager
            await self._start(manager)
        oa_api = OfficialAccountAPI(client, self.tokens["oa"])
        # Started by its first use (GET /v1/tickets/jsapi, POST /v1/jssdk/signature): an OA
        # that never uses the JS-SDK never calls getticket.
        self.jsapi_ticket = TokenManager(
            "jsapi", cfg.official_account.appid, "", client, db, fetch=oa_api.jsapi_ticket,
            refresh_margin_s=cfg.wechat.token_refresh_margin_s,
            check_interval_s=cfg.wechat.token_check_interval_s,
            daily_budget=cfg.wechat.token_daily_budget,
            backoff_base_s=cfg.wechat.token_backoff_base_s,
            backoff_max_s=cfg.wechat.token_backoff_max_s,
            quota_pause_s=cfg.wechat.token_quota_pause_s, clock=clock, metrics=metrics)
        self._started.append(self.jsapi_ticket)
        self.api_keys = ApiKeys(db, clock=clock)
        await self._start(self.api_keys)
        mp = cfg.mini_program
        mp_api = MiniProgramAPI(client, mp.appid, mp.secret) if mp else None
        mp_appid = mp.appid if mp else None

        cb = cfg.callbacks
        outbox = OFF
        if cb.enabled:
            self.callback_workers = CallbackWorkers(
                db, cb.url, cb.secret, concurrency=cb.concurrency, timeout_s=cb.timeout_s,
                retry_base_s=cb.retry_base_s, retry_max_s=cb.retry_max_s,
                max_age_s=cb.max_age_s, clock=clock, metrics=metrics,
                drain_timeout_s=cfg.wxd.shutdown_timeout_s, yield_to=self._webhook_busy)
            outbox = Outbox(cb.events, notify=self.callback_workers.notify)
        self.callbacks = Callbacks(db, enabled=cb.enabled, clock=clock,
                                   on_retry=self._ring_callbacks)

        self.linking = Linking(db, mp_api, oa_api, mp_appid=mp_appid, clock=clock, metrics=metrics,
                               outbox=outbox)
        self._build_links(db, client, oa_api, outbox)
        p = cfg.pushes
        self.pushes = PushService(db, oa_api, mp_appid=mp_appid, template_cache_s=p.template_cache_s,
                                  clock=clock, metrics=metrics, on_enqueued=self._ring_workers)
        self.workers = PushWorkers(
            db, oa_api, workers=p.workers, rate_per_s=p.rate_per_s, max_attempts=p.max_attempts,
            backoff_base_s=p.backoff_base_s, backoff_max_s=p.backoff_max_s,
            quota_resume_s=p.quota_resume_time.seconds,
            frequency_backoff_base_s=p.frequency_backoff_base_s,
            frequency_backoff_max_s=p.frequency_backoff_max_s, stale_sending=p.stale_sending,
            clock=clock,
            metrics=metrics, on_template_invalid=self.pushes.invalidate_templates,
            drain_timeout_s=cfg.wxd.shutdown_timeout_s, lease_s=cfg.wxd.lease_s,
            unreachable_probe_s=cfg.wechat.unreachable_probe_s, outbox=outbox)
        await self._start(self.workers)

        assert self.qrlinks is not None
        router = EventRouter(db, self.linking,
                             purge_on_unsubscribe=cfg.followers.purge_on_unsubscribe,
                             clock=clock, metrics=metrics, scans=self.qrlinks,
                             outbox=outbox)
        e = cfg.events
        self.events = EventWorkers(db, router, workers=e.workers, max_attempts=e.max_attempts,
                                   backoff_base_s=e.backoff_base_s, backoff_max_s=e.backoff_max_s,
                                   quota_resume_s=e.quota_resume_time.seconds,
                                   frequency_backoff_base_s=e.frequency_backoff_base_s,
                                   frequency_backoff_max_s=e.frequency_backoff_max_s,
                                   clock=clock, metrics=metrics,
                                   drain_timeout_s=cfg.wxd.shutdown_timeout_s,
                                   handlers={CARD_JOB: self.qrlinks.send_card},
                                   lease_s=cfg.wxd.lease_s,
                                   unreachable_probe_s=cfg.wechat.unreachable_probe_s,
                                   yield_to=self._webhook_busy)
        await self._start(self.events)

        b = cfg.backfill
        self.backfill = FollowerBackfill(db, oa_api, concurrency=b.concurrency,
                                         rate_per_s=b.rate_per_s,
                                         resync_interval_s=b.resync_interval_s,
                                         defer_index=b.defer_unionid_index,
                                         max_attempts=b.max_attempts,
                                         backoff_base_s=b.backoff_base_s,
                                         backoff_max_s=b.backoff_max_s,
                                         quota_resume_s=b.quota_resume_time.seconds, clock=clock,
                                         metrics=metrics,
                                         drain_timeout_s=cfg.wxd.shutdown_timeout_s,
                                         unreachable_probe_s=cfg.wechat.unreachable_probe_s,
                                         outbox=outbox)
        await self._start(self.backfill)
        # WeChat reachable again (an OA token fetch succeeded): paused work resumes at once.
        oa_tokens = self.tokens["oa"]
        for resume in (self.workers.reachable, self.events.reachable, self.backfill.reachable):
            oa_tokens.on_available(resume)
            if oa_tokens.current() is not None:  # had before they listened: try now
                resume()

        metrics.add_collector(self._collect_process)
        # Sockets systemd passes (wxd.socket) are used as they are; otherwise each binds its own.
        passed = sdlisten.assign(sdlisten.passed_fds(self._environ, os.getpid()),
                                 {"webhook": cfg.webhook.listen, "admin": cfg.admin.listen})
        common = admin.common_kwargs(cfg.admin.token, metrics, cfg.admin.max_body_bytes,
                                     keys=self.api_keys)
        # The server's cap is looser, so that JsonHandler answers an oversized body with JSON 413.
        self.admin = Listener("admin", admin.make_app(common, self._admin_routes(common)),
                              cfg.admin.listen, cfg.admin.max_body_bytes * 4,
                              sock=passed.get("admin"))
        await self._start(self.admin)
        if self.callback_workers is not None:
            bound = Listen(cfg.admin.listen.host, self.admin.port)
            if targets_listener(cb.url, bound):
                raise ConfigError([f"[callbacks] url: points at wxd's own admin listener {bound}"])
            await self._start(self.callback_workers)

        w = cfg.webhook
        crypto = (MessageCrypto(w.token, w.encoding_aes_key, cfg.official_account.appid,
                                w.previous_encoding_aes_key or None)
                  if w.encoding_aes_key else None)
        hook = Webhook(w.token, crypto, db, require_encryption=w.require_encryption,
                       replay_window_s=w.replay_window_s,
                       max_body_bytes=w.max_body_bytes, clock=clock, metrics=metrics,
                       on_stored=self.events.ring, replier=self.qrlinks, outbox=outbox)
        self._hook = hook
        pages = oauth_web.routes(self.oauth) if self.oauth is not None else []
        # The HTTP server's own cap is looser, so that the handler can answer 413 itself.
        self.webhook = Listener("webhook", webhook.make_app(w.path, hook, pages), w.listen,
                                max(w.max_body_bytes * 4, 1 << 20), sock=passed.get("webhook"))
        await self._start(self.webhook)

    def _build_links(self, db: Database, client: WeChatClient, oa_api: OfficialAccountAPI,
                     outbox: Outbox) -> None:
        """QR link codes always; OAuth links when [webhook] public_url is set."""
        cfg = self.config
        bases = web_bases(cfg.wechat.api_base)
        lk, mp = cfg.linking, cfg.mini_program
        card = (CardSettings(lk.qrcode_card_thumb_media_id, lk.qrcode_card_pagepath,
                             lk.qrcode_card_title, mp.appid)
                if lk.qrcode_card_thumb_media_id and mp is not None else None)
        self.qrlinks = QrLinks(db, oa_api, image_base=bases.mp,
                               reply_text=lk.qrcode_reply, card=card, clock=self.clock,
                               metrics=self.metrics, on_job=self._ring_events, outbox=outbox)
        w = cfg.webhook
        if not w.public_url:
            return
        public = public_base(w.public_url, w.path)
        if public.startswith("http://") and not _local_host(public):
            log.warning("[webhook] public_url is http://: WeChat's web authorization needs "
                        "https outside local development")
        oa = cfg.official_account
        self.oauth = OAuthLinks(db, WebAuthAPI(client, oa.appid, oa.secret),
                                public=public, authorize_base=bases.open,
                                return_hosts=lk.oauth_return_hosts, clock=self.clock,
                                metrics=self.metrics, outbox=outbox)

    def _ring_workers(self) -> None:
        if self.workers is not None:
            self.workers.ring()

    def _ring_events(self) -> None:
        if self.events is not None:
            self.events.ring()

    def _webhook_busy(self) -> bool:
        return self._hook is not None and self._hook.busy()

    def _ring_callbacks(self) -> None:
        if self.callback_workers is not None:
            self.callback_workers.ring()

    def _admin_routes(self, common: dict[str, Any]) -> list[list[admin.Route]]:
        assert self.db and self.linking and self.pushes and self.backfill and self.qrlinks
        assert self.jsapi_ticket and self.api_keys
        assert self.callbacks
        return [
            ops.routes(common, self.db, self.metrics),
            openapi.routes(common),
            stats.routes(common, self.stats),
            admin_tokens.routes(common, self.tokens),
            jssdk.routes(common, self.jsapi_ticket, self.config.official_account.appid,
                         self.clock),
            admin_keys.routes(common, self.api_keys),
            users.routes(common, self.linking),
            admin_links.routes(common, self.qrlinks, self.oauth, self.linking),
            admin_pushes.routes(common, self.pushes),
            admin_backfill.routes(common, self.backfill),
            admin_callbacks.routes(common, self.callbacks),
        ]

    async def stats(self) -> dict[str, Any]:
        """The figures of GET /v1/stats (also used by `wxd stats` and the demo)."""
        assert self.db and self.linking and self.backfill and self.callbacks
        now = self.clock.now()

        def read(conn: sqlite3.Connection) -> dict[str, Any]:
            return {
                "pushes": push_store.push_stats(conn),
                "token_fetches_today": token_store.fetch_counts(conn, token_store.utc_day(now)),
                "event_jobs": job_store.counts(conn),
            }

        figures: dict[str, Any] = dict(await self.linking.counts())
        figures.update(await self.db.read(read))
        figures["backfill"] = self.backfill.status()
        figures["callbacks"] = await self.callbacks.stats()
        return figures

    async def _collect_process(self) -> None:
        self.metrics.gauge("wxd_process_resident_memory_bytes", "Resident set size.").set(
            _rss_bytes())
        self.metrics.gauge("wxd_process_uptime_seconds", "Seconds since the daemon started.").set(
            self.clock.monotonic() - self._started_at)

    async def _start(self, component: Component) -> None:
        await component.start()
        self._started.append(component)

    @staticmethod
    async def _stop_one(component: Component) -> None:
        try:
            await component.stop()
        except Exception:
            log.exception("error while stopping %s", type(component).__name__)

    async def stop(self) -> None:
        """Reverse order: listeners stop accepting, workers drain, the database closes last."""
        if self._state != "running":
            if self._state == "new":
                self._state = "stopped"
            return
        self._state = "stopping"
        self.notifier.notify("STOPPING=1")
        if self._watchdog is not None:
            self._watchdog.cancel()
            await asyncio.gather(self._watchdog, return_exceptions=True)
            self._watchdog = None
        try:
            # Listeners first (stop accepting), then every draining worker together (each
            # bounded by its own drain timeout), then the rest (tokens, HTTP client) in reverse.
            drainers = [c for c in self._started if c in (self.workers, self.events, self.backfill,
                                                          self.callback_workers)]
            rest = [c for c in self._started if c not in drainers]
            listeners: list[Component] = [c for c in rest if isinstance(c, Listener)]
            for listener in reversed(listeners):
                await self._stop_one(listener)
            await asyncio.gather(*(self._stop_one(c) for c in drainers))
            for other in reversed(rest):
                if other not in listeners:
                    await self._stop_one(other)
            self._started.clear()
            if self.callback_workers is not None and self.callback_workers.state == "new":
                await self.callback_workers.stop()  # built, never started: closes its client
        finally:
            if self.db is not None:
                await self.db.close()
            self._state = "stopped"
            log.info("wxd stopped")


def _local_host(url: str) -> bool:
    host = url.split("/")[2].rsplit(":", 1)[0].strip("[]")
    return host in ("localhost", "127.0.0.1", "::1") or host.endswith(".localhost")


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm", encoding="ascii") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


async def run(config: Config, environ: Mapping[str, str]) -> int:
    """`wxd run`: start, wait for SIGTERM/SIGINT, stop within [wxd] shutdown_timeout_s. Exit code."""
    stop_requested = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop_requested.set)
    daemon = Daemon(config, environ=environ)
    await daemon.start()
    log.info("wxd running (admin %s, webhook %s)", config.admin.listen, config.webhook.listen)
    await stop_requested.wait()
    log.info("stop requested; draining for at most %.1f s", config.wxd.shutdown_timeout_s)
    try:
        await asyncio.wait_for(daemon.stop(), timeout=config.wxd.shutdown_timeout_s + 5)
    except asyncio.TimeoutError:
        log.error("stop did not finish within the bound")
        return 1
    return 0
