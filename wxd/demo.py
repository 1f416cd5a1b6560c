"""`wxd demo`: the sandbox and the daemon in one process on a temporary database, walking
through the whole job (tokens, backfill, follow, MP login + link, push + delivery, refusal),
then a second account without unionid (no Open Platform): linking by QR code and by OAuth.

Composes the daemon with the sandbox; talks to the daemon only through its public
interfaces (admin API over HTTP, webhook over HTTP), as a real deployment would.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
import socket
import tempfile
import time
import urllib.parse
from collections.abc import Callable
from typing import Any

from tornado.httpclient import AsyncHTTPClient, HTTPClientError

from wxd import config
from wxd.daemon import Daemon
from wxd.sandbox import ORDER_TEMPLATE_ID, FakeWeChat, Person, SandboxServer, WebhookSender

ADMIN_TOKEN = "demo-admin-token-change-me"  # noqa: S105 - a throwaway demo daemon on loopback


class DemoFailed(Exception):
    """A step of the demo did not produce what it should have."""


class Admin:
    """Async JSON calls to the daemon's admin API (the demo must not block the event loop)."""

    def __init__(self, base_url: str, token: str) -> None:
        self.base_url = base_url
        self._token = token
        self._http = AsyncHTTPClient(force_instance=True)

    async def page(self, url: str) -> tuple[int, str | None]:
        """GET a public page as a browser would, without following a redirect: (status,
        Location)."""
        response = await self._http.fetch(url, follow_redirects=False, raise_error=False)
        return response.code, response.headers.get("Location")

    async def call(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        try:
            response = await self._http.fetch(
                self.base_url + path, method=method, raise_error=True,
                headers={"Authorization": f"Bearer {self._token}",
                         "Content-Type": "application/json"},
                body=json.dumps(body if body is not None else {}, ensure_ascii=False)
                if method == "POST" else None,
            )
        except HTTPClientError as exc:
            if exc.response is None:
                raise
            return exc.code, json.loads(exc.response.body)
        return response.code, json.loads(response.body)

    async def ok(self, method: str, path: str, body: Any = None) -> Any:
        status, value = await self.call(method, path, body)
        if status >= 400:
            raise DemoFailed(f"{method} {path} answered {status}: {value}")
        return value

    def close(self) -> None:
        self._http.close()


async def eventually(check: Callable[[], Any], what: str, timeout_s: float = 15.0) -> Any:
    """Poll an async check until it returns a truthy value."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = await check()
        if value:
            return value
        await asyncio.sleep(0.1)
    raise DemoFailed(f"timed out waiting for {what}")


def demo_config(database: str, fake: FakeWeChat, api_base: str, admin_port: int,
                webhook_port: int, public_url: str = "") -> config.Config:
    creds = fake.credentials
    text = f"""
[wxd]
database = {database}
shutdown_timeout_s = 5
log_level = warning
[webhook]
listen = 127.0.0.1:{webhook_port}
token = {creds.webhook_token}
encoding_aes_key = {creds.encoding_aes_key}
public_url = {public_url}
[admin]
listen = 127.0.0.1:{admin_port}
token = {ADMIN_TOKEN}
[official_account]
appid = {creds.oa_appid}
secret = {creds.oa_secret}
[mini_program]
appid = {creds.mp_appid}
secret = {creds.mp_secret}
[wechat]
api_base = {api_base}
[backfill]
rate_per_s = 0
[linking]
qrcode_reply = 绑定成功
"""
    return config.load_text(text)


def free_port() -> int:
    """A loopback port nobody listens on now (the public URL must name it before start)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def pick(fake: FakeWeChat, follows: bool, used_mp: bool) -> Person:
    for person in fake.people:
        if person.unionid and person.follows == follows and person.used_mp == used_mp:
            return person
    raise DemoFailed("the simulated population has nobody suitable")


class Demo:
    """The walkthrough; `say` prints one line (injected so tests can capture it)."""

    def __init__(self, say: Callable[[str], None], users: int, admin_port: int,
                 webhook_port: int) -> None:
        self.say = say
        self.users = users
        self.admin_port = admin_port
        self.webhook_port = webhook_port

    async def run(self, keep_running: bool) -> int:
        workdir = tempfile.mkdtemp(prefix="wxd-demo-")
        fake = FakeWeChat(users=self.users, seed=2026, follow_ratio=0.6, mp_ratio=0.5)
        sandbox = SandboxServer(fake)
        await sandbox.start()
        cfg = demo_config(f"{workdir}/wxd.db", fake, sandbox.base_url, self.admin_port,
                          self.webhook_port)
        daemon = Daemon(cfg)
        admin: Admin | None = None
        try:
            await daemon.start()
            assert daemon.admin is not None and daemon.webhook is not None
            webhook_url = f"http://127.0.0.1:{daemon.webhook.port}{cfg.webhook.path}"
            fake.configure_webhook(webhook_url, mode="safe", report_delay_s=0.3)
            admin = Admin(f"http://127.0.0.1:{daemon.admin.port}", ADMIN_TOKEN)
            self.say(f"wxd demo: sandbox WeChat with {len(fake.people):,} simulated people at "
                     f"{sandbox.base_url}; wxd admin API at {admin.base_url}, webhook {webhook_url}")
            await self.walk(fake, admin, webhook_url)
            await self.without_unionid(workdir)
            if keep_running:
                await self.wait_for_interrupt(admin.base_url)
            return 0
        finally:
            if admin is not None:
                admin.close()
            await daemon.stop()
            await sandbox.stop()
            shutil.rmtree(workdir, ignore_errors=True)

    async def walk(self, fake: FakeWeChat, admin: Admin, webhook_url: str) -> None:
        say = self.say
        # 1. Tokens: one upstream fetch per app, then served from SQLite/memory.
        for _ in range(3):
            await admin.ok("GET", "/v1/tokens/oa")
        say(f"1. tokens: OA token handed out 3 times; stable_token fetches from WeChat: "
            f"{fake.count_calls('/cgi-bin/stable_token')} (one per app, OA and MP)")

        # 2. Backfill the followers who predate wxd.
        status = await admin.ok("POST", "/v1/backfill")
        while status.get("state") == "running":
            await asyncio.sleep(0.2)
            status = await admin.ok("GET", "/v1/backfill")
        if status.get("state") != "done":
            raise DemoFailed(f"backfill ended {status.get('state')}: {status.get('last_error')}")
        say(f"2. backfill: {status['followers_done']:,} existing followers synced in "
            f"{status['pages_done']} page(s) ({status.get('calls', '?')} WeChat calls)")

        # 3. A new follow arrives on the webhook, encrypted (safe mode).
        person = pick(fake, follows=False, used_mp=False)
        fake.follow(person)
        sender = WebhookSender(webhook_url, fake.credentials, mode="safe")
        try:
            delivery = await sender.subscribe(person.oa_openid)
        finally:
            sender.close()
        if delivery.status != 200:
            raise DemoFailed(f"webhook answered {delivery.status}")
        follower = await eventually(lambda: self.user(admin, "oa_openid", person.oa_openid,
                                                      lambda u: u.get("unionid")),
                                    "the follow event to be processed")
        say(f"3. webhook: encrypted subscribe from {person.oa_openid} answered "
            f"'{delivery.body.decode(errors='replace')}'; user/info gave unionid "
            f"{follower['unionid']}")

        # 4. The same person opens the Mini Program: login links both identities.
        code = fake.issue_login_code(person)
        identity = await admin.ok("POST", "/v1/mp/login", {"code": code})
        if identity.get("oa_openid") != person.oa_openid:
            raise DemoFailed(f"login did not link: {identity}")
        say(f"4. MP login: mp_openid {identity['mp_openid']} -> unionid {identity['unionid']} "
            f"-> oa_openid {identity['oa_openid']} (subscribed={identity['subscribed']})")

        # 5. Push to the MP user; wxd sends it to the linked OA openid with a MP jump.
        push = await admin.ok("POST", "/v1/pushes", {
            "to": {"mp_openid": identity["mp_openid"]},
            "template_id": ORDER_TEMPLATE_ID,
            "data": self.order_data(fake),
            "miniprogram": {"pagepath": "pages/order/detail?id=42"},
            "idempotency_key": "demo-order-42",
        })
        final = await eventually(lambda: self.push_in(admin, push["id"], ("delivered", "failed")),
                                 "the delivery report")
        received = fake.inbox(person.oa_openid)
        jump = received[-1].get("miniprogram") if received else None
        say(f"5. push {push['id']}: {final['status']} (msgid {final['msgid']}); WeChat got it "
            f"{len(received)} time(s) with miniprogram {jump}")
        if final["status"] != "delivered":
            raise DemoFailed(f"push ended {final['status']}: {final.get('error')}")

        # 6. A Mini Program user who never followed the OA cannot be reached: refused at once.
        stranger = pick(fake, follows=False, used_mp=True)
        other = await admin.ok("POST", "/v1/mp/login", {"code": fake.issue_login_code(stranger)})
        status_code, refused = await admin.call("POST", "/v1/pushes", {
            "to": {"mp_openid": other["mp_openid"]}, "template_id": ORDER_TEMPLATE_ID,
            "data": self.order_data(fake)})
        if status_code < 400:
            raise DemoFailed(f"push to a non-follower was accepted: {refused}")
        say(f"6. push to non-follower {other['mp_openid']}: refused {status_code} "
            f"{refused['error']['code']} ({refused['error']['message']})")

        # 7. Final figures.
        stats = await admin.ok("GET", "/v1/stats")
        by_status = {k: v for k, v in stats["pushes"]["by_status"].items() if v}
        say(f"7. stats: followers {stats['followers']:,} (subscribed {stats['subscribed']:,}), "
            f"MP users {stats['mp_users']}, linked {stats['linked']}, pushes {by_status}, "
            f"token fetches today {stats['token_fetches_today']}")

    async def without_unionid(self, workdir: str) -> None:
        """Steps 8-9: an account whose OA and MP are not bound to one Open Platform account
        (nobody has a unionid), on a second sandbox and daemon."""
        fake = FakeWeChat(users=200, seed=2027, follow_ratio=0.5, mp_ratio=0.0,
                          unionid_ratio=0.0)
        sandbox = SandboxServer(fake)
        await sandbox.start()
        port = free_port()
        public = f"http://127.0.0.1:{port}"
        daemon = Daemon(demo_config(f"{workdir}/second.db", fake, sandbox.base_url, 0, port,
                                    public_url=public))
        admin: Admin | None = None
        try:
            await daemon.start()
            assert daemon.admin is not None
            fake.configure_webhook(f"{public}/wechat", mode="safe")  # delivery reports
            admin = Admin(f"http://127.0.0.1:{daemon.admin.port}", ADMIN_TOKEN)
            self.say(f"second account without Open Platform ({len(fake.people)} people, no "
                     f"unionid): wxd public listener {public}")
            scanner = next(p for p in fake.people if not p.follows)
            browser = next(p for p in fake.people if p.follows)
            await self.qrcode_walk(fake, admin, f"{public}/wechat", scanner)
            await self.oauth_walk(fake, admin, browser)
        finally:
            if admin is not None:
                admin.close()
            await daemon.stop()
            await sandbox.stop()

    async def qrcode_walk(self, fake: FakeWeChat, admin: Admin, webhook_url: str,
                          person: Person) -> None:
        say = self.say
        code = await admin.ok("POST", "/v1/links/qrcodes", {"mp_openid": person.mp_openid})
        say(f"8. QR link code {code['id']} for MP user {person.mp_openid}: show {code['image_url']}")
        result = fake.scan(person, code["ticket"])
        sender = WebhookSender(webhook_url, fake.credentials, mode="safe")
        try:
            if result is None or result.event != "subscribe":
                raise DemoFailed(f"the scan did not make a follow event: {result}")
            delivery = await sender.subscribe(person.oa_openid, result.scene, result.ticket)
        finally:
            sender.close()
        status = await eventually(lambda: self.linked(admin, "qrcodes", code["id"]),
                                  "the QR link")
        identity = await admin.ok("GET", f"/v1/users?mp_openid={person.mp_openid}")
        reply = "an encrypted passive reply" if b"<Encrypt>" in delivery.body else \
            delivery.body.decode(errors="replace")
        say(f"   the person scans it and follows: webhook answered {reply}; linked by "
            f"{identity['link']['source']} to oa_openid {status['oa_openid']}")
        await self.push_by_mp_openid(fake, admin, person)

    async def oauth_walk(self, fake: FakeWeChat, admin: Admin, person: Person) -> None:
        say = self.say
        link = await admin.ok("POST", "/v1/links/oauth", {"mp_openid": person.mp_openid})
        say(f"9. OAuth link {link['id']} for MP user {person.mp_openid}: the MP opens {link['url']}")
        status, authorize = await admin.page(link["url"])
        if status != 302 or authorize is None:
            raise DemoFailed(f"/oauth/start answered {status}")
        callback = fake.webauth.authorize(person, authorize)
        if not isinstance(callback, str):
            raise DemoFailed(f"WeChat's authorize page refused: {callback}")
        status, _ = await admin.page(callback)
        say(f"   302 to WeChat's authorize page (snsapi_base, silent), back to "
            f"{urllib.parse.urlsplit(callback).path}: {status}")
        linked = await eventually(lambda: self.linked(admin, "oauth", link["id"]), "the OAuth link")
        identity = await admin.ok("GET", f"/v1/users?mp_openid={person.mp_openid}")
        say(f"   linked by {identity['link']['source']} to oa_openid {linked['oa_openid']}")
        # The follower's row comes from the backfill or a follow event; here a backfill.
        backfill = await admin.ok("POST", "/v1/backfill")
        while backfill.get("state") == "running":
            await asyncio.sleep(0.1)
            backfill = await admin.ok("GET", "/v1/backfill")
        await self.push_by_mp_openid(fake, admin, person)

    async def push_by_mp_openid(self, fake: FakeWeChat, admin: Admin, person: Person) -> None:
        push = await admin.ok("POST", "/v1/pushes", {
            "to": {"mp_openid": person.mp_openid}, "template_id": ORDER_TEMPLATE_ID,
            "data": self.order_data(fake)})
        final = await eventually(lambda: self.push_in(admin, push["id"], ("delivered", "failed")),
                                 "the delivery report")
        if final["status"] != "delivered":
            raise DemoFailed(f"push ended {final['status']}: {final.get('error')}")
        self.say(f"   push by mp_openid {push['id']}: {final['status']} to {person.oa_openid}")

    @staticmethod
    async def linked(admin: Admin, kind: str, code_id: str) -> Any:
        status = await admin.ok("GET", f"/v1/links/{kind}/{code_id}")
        if status.get("status") == "expired":
            raise DemoFailed(f"link {code_id} expired")
        return status if status.get("status") == "linked" else None

    @staticmethod
    def order_data(fake: FakeWeChat) -> dict[str, str]:
        keys = fake.templates[ORDER_TEMPLATE_ID].keys
        samples = {"thing": "巧克力礼盒", "character_string": "ORDER42", "amount": "39.8元",
                   "time": "2026年11月29日 12:00", "phrase": "配送中"}
        data = {}
        for key in keys:
            kind = key.rstrip("0123456789")
            data[key] = samples.get(kind, "ok")
        return data

    @staticmethod
    async def user(admin: Admin, key: str, value: str, ready: Callable[[Any], Any]) -> Any:
        status, body = await admin.call("GET", f"/v1/users?{key}={value}")
        return body if status == 200 and ready(body) else None

    @staticmethod
    async def push_in(admin: Admin, push_id: str, states: tuple[str, ...]) -> Any:
        body = await admin.ok("GET", f"/v1/pushes/{push_id}")
        return body if body.get("status") in states else None

    async def wait_for_interrupt(self, admin_url: str) -> None:
        self.say("")
        self.say(f"wxd is still running. Try the admin API, e.g.:\n"
                 f"  curl -s -H 'Authorization: Bearer {ADMIN_TOKEN}' {admin_url}/v1/stats\n"
                 f"Press Ctrl-C to stop.")
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        await stop.wait()


def run(keep_running: bool, users: int, admin_port: int | None, webhook_port: int | None,
        say: Callable[[str], None] = print) -> int:
    """Entry point of `wxd demo`; fixed ports 8081/8080 with --keep-running (for the README)."""
    default_admin, default_webhook = (8081, 8080) if keep_running else (0, 0)
    demo = Demo(say, users,
                admin_port if admin_port is not None else default_admin,
                webhook_port if webhook_port is not None else default_webhook)
    try:
        return asyncio.run(demo.run(keep_running))
    except DemoFailed as exc:
        say(f"demo failed: {exc}")
        return 1
