"""Callbacks to the backend against a real local HTTP receiver that fails on command (5xx, hang,
reset, slow, redirect, a huge answer): signed (checked by the README's own snippet), retried
with backoff, dead after max_age_s by the injected clock, retried from dead; then every type
produced by its real trigger in a whole daemon (webhook events, an MP login, push outcomes,
user messages)."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import pathlib
import random
import tempfile
import time
from collections.abc import Callable
from typing import Any

import pytest
from tornado.httpclient import AsyncHTTPClient, HTTPRequest
from tornado.testing import AsyncTestCase, gen_test

from bench.receiver import Receiver
from tests.helpers import (
    ADMIN_TOKEN,
    FakeClock,
    config_text,
    eventually,
    fetchall,
    fetchone,
    free_port,
    sandbox_config_text,
)
from wxd import config
from wxd.callbacks import Callbacks, CallbackWorkers, signature
from wxd.daemon import Daemon
from wxd.errors import ConfigError
from wxd.metrics import Registry
from wxd.pacing import YIELD_MAX_S, YIELD_STEP_S
from wxd.sandbox import NOTICE_TEMPLATE_ID, FakeWeChat, SandboxServer, WebhookSender
from wxd.store import callbacks as cb
from wxd.store.db import Database
from wxd.webhook import BUSY_HOLD_S, BUSY_WAITING, Webhook
from wxd.wechat.messages import parse_message

ROOT = pathlib.Path(__file__).resolve().parent.parent
SECRET = "callback-secret-0123456789"
Verify = Callable[[str, str, bytes], bool]


def readme_snippet() -> Verify:
    """verify_signature as README.md shows it: the exact code block after its marker, run."""
    text = (ROOT / "README.md").read_text()
    after = text[text.index("<!-- callback-receiver-example"):]
    code = after.split("```python\n", 1)[1].split("```", 1)[0]
    namespace: dict[str, Any] = {}
    exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102 - the README's own code
    verify: Verify = namespace["verify_signature"]
    return verify


VERIFY = readme_snippet()


def receiver() -> Receiver:
    return Receiver(lambda header, body: VERIFY(SECRET, header, body), slow_s=0.05)


class DeliveryCase(AsyncTestCase):
    """CallbackWorkers on a file database, a receiver in the test's loop, a fake clock that
    starts at the real time (the README snippet checks `t` against time.time())."""

    timeout_s = 0.5
    max_age_s = 3600.0

    def setUp(self) -> None:
        super().setUp()
        self.tmp = tempfile.TemporaryDirectory()
        self.clock = FakeClock(float(int(time.time())))
        self.metrics = Registry()
        self.receiver = receiver()
        self.io_loop.run_sync(self.receiver.start)
        self.db = self.io_loop.run_sync(
            lambda: Database.open(os.path.join(self.tmp.name, "wxd.db")))
        self.workers = CallbackWorkers(
            self.db, self.receiver.url, SECRET, concurrency=2, timeout_s=self.timeout_s,
            retry_base_s=5, retry_max_s=60, max_age_s=self.max_age_s, clock=self.clock,
            rng=random.Random(7), metrics=self.metrics, drain_timeout_s=1)
        self.outbox = cb.Outbox(frozenset(cb.TYPES), notify=self.workers.notify)
        self.callbacks = Callbacks(self.db, enabled=True, clock=self.clock,
                                   on_retry=self.workers.ring)

    def tearDown(self) -> None:
        self.io_loop.run_sync(self.workers.stop)
        self.io_loop.run_sync(self.receiver.stop)
        self.io_loop.run_sync(self.db.close)
        self.tmp.cleanup()
        super().tearDown()

    async def emit(self, *subjects: str, kind: str = "push.sent") -> list[str]:
        items = [cb.NewCallback(cb.new_id(), kind, subject, json.dumps({"n": subject}))
                 for subject in subjects]
        await self.db.write(lambda conn: self.outbox.emit(conn, items, self.clock.now()))
        return [item.id for item in items]

    async def row(self, callback_id: str) -> dict[str, Any]:
        found = await self.callbacks.get(callback_id)
        assert found is not None
        return found

    async def settled(self, callback_id: str, attempts: int) -> dict[str, Any]:
        """The row once attempt number `attempts` is recorded (not leased any more)."""
        await eventually(
            lambda: fetchone(self.db, "SELECT * FROM callbacks WHERE id = ?", (callback_id,)),
            f"attempt {attempts} of {callback_id} recorded", timeout=10,
            until=lambda row: row is not None and row["attempts"] >= attempts
            and row["leased_until"] is None)
        return await self.row(callback_id)


class SignedDeliveryTest(DeliveryCase):
    @gen_test(timeout=20)
    async def test_signed_bodies_verified_by_the_readme_snippet(self) -> None:
        await self.workers.start()
        ids = await self.emit("p_1", "p_2", "p_1")
        await eventually(lambda: len(self.receiver.deliveries()) == 3, "3 deliveries")
        got = {item.id: item for item in self.receiver.received}
        assert set(got) == set(ids)
        for item in got.values():
            body = item.json()
            assert item.verified is True
            assert item.headers["Wxd-Event-Id"] == body["id"] == item.id
            assert item.headers["Wxd-Event-Type"] == body["type"] == "push.sent"
            assert item.headers["Content-Type"].startswith("application/json")
            assert set(body) == {"id", "type", "created_at", "subject", "seq", "data"}
            assert body["data"] == {"n": body["subject"]}
        assert sorted((got[i].json()["subject"], got[i].json()["seq"]) for i in ids) == [
            ("p_1", 1), ("p_1", 2), ("p_2", 1)]
        for callback_id in ids:
            assert (await self.settled(callback_id, 1))["status"] == "done"

        # The README snippet refuses a tampered body, another secret, a stale or garbled header.
        item = got[ids[0]]
        header = item.headers["Wxd-Signature"]
        assert not VERIFY(SECRET, header, item.body.replace(b'"p_1"', b'"p_9"'))
        assert not VERIFY(SECRET, header, item.body + b" ")
        assert not VERIFY("another-secret-0123456789", header, item.body)
        stale = int(time.time()) - 301
        assert not VERIFY(SECRET, signature(SECRET.encode(), stale, item.body), item.body)
        assert VERIFY(SECRET, signature(SECRET.encode(), stale + 2, item.body), item.body)
        for garbled in ("", "t=,v1=", "v1=abc", "t=12,v1", header.replace("v1=", "v2=")):
            assert not VERIFY(SECRET, garbled, item.body)
        assert self.metrics.counter("wxd_callbacks_total", "", ("type", "outcome")).get(
            type="push.sent", outcome="done") == 3

    @gen_test(timeout=20)
    async def test_a_huge_answer_is_cut_and_a_redirect_never_followed(self) -> None:
        self.receiver.fail_next("big", "redirect")
        await self.workers.start()
        big, moved = await self.emit("p_1"), await self.emit("p_2")
        shown = await self.settled(big[0], 1)
        assert shown["status"] == "done" and shown["last_status"] == 200
        assert shown["last_answer"] == "x" * cb.ANSWER_EXCERPT_CHARS
        shown = await self.settled(moved[0], 1)
        assert (shown["status"], shown["last_status"]) == ("pending", 302)
        assert self.receiver.redirected == 0


class RetryTest(DeliveryCase):
    @gen_test(timeout=30)
    async def test_every_failure_is_retried_with_backoff_until_a_2xx(self) -> None:
        # A reset on a kept-alive connection may be a stale connection: the client sends the
        # request once more at once on a new one (the receiver deduplicates on the id), so it
        # takes two resets to fail an attempt.
        self.receiver.fail_next("500", "reset", "reset", "hang", "redirect", "slow")
        self.receiver.slow_s = 2 * self.timeout_s  # slower than the timeout: a failure too
        await self.workers.start()
        [callback_id] = await self.emit("p_1")
        errors: list[tuple[int | None, str]] = []
        delays: list[float] = []
        for attempt in range(1, 6):
            shown = await self.settled(callback_id, attempt)
            assert shown["status"] == "pending", (attempt, shown)
            errors.append((shown["last_status"], shown["last_error"]))
            delays.append(shown["next_attempt_at"] - self.clock.now())
            self.clock.advance(delays[-1])
        assert (await self.settled(callback_id, 6))["status"] == "done"
        assert errors[0] == (500, "HTTP 500 Internal Server Error")
        assert errors[1][0] is None and "connection" in errors[1][1]
        assert errors[2][0] is None and "timed out" in errors[2][1]
        assert errors[3][0] == 302
        assert errors[4][0] is None and "timed out" in errors[4][1]
        # retry_base_s·2^(n-1), at most 50 % shorter, capped at retry_max_s (60).
        for n, delay in enumerate(delays, start=1):
            full = min(5 * 2 ** (n - 1), 60)
            assert full / 2 <= delay <= full, (n, delays)
        assert [r.answer for r in self.receiver.received] == [
            "500", "reset", "reset", "hang", "redirect", "slow", "ok"]
        assert self.receiver.redirected == 0
        assert [r.verified for r in self.receiver.received] == [True] * 7
        # The same body every time; a fresh signature (the clock moved) every attempt.
        assert len({r.body for r in self.receiver.received}) == 1
        assert len({r.headers["Wxd-Signature"] for r in self.receiver.received}) == 6
        retried = self.metrics.counter("wxd_callbacks_total", "", ("type", "outcome"))
        assert retried.get(type="push.sent", outcome="retried") == 5

    @gen_test(timeout=20)
    async def test_a_slow_answer_within_the_timeout_is_a_success(self) -> None:
        self.receiver.fail_next("slow")
        await self.workers.start()
        [callback_id] = await self.emit("p_1")
        assert (await self.settled(callback_id, 1))["status"] == "done"

    @gen_test(timeout=30)
    async def test_dead_after_max_age_then_retried_by_the_operator(self) -> None:
        self.receiver.mode = "500"
        await self.workers.start()
        [callback_id] = await self.emit("p_1")
        written = self.clock.now()
        attempt = 1
        while True:
            shown = await self.settled(callback_id, attempt)
            if shown["status"] == "dead":
                break
            assert shown["next_attempt_at"] <= written + self.max_age_s
            self.clock.set(shown["next_attempt_at"])
            attempt += 1
        # The last attempt fell on the deadline; then dead, with what the receiver answered.
        assert self.clock.now() == written + self.max_age_s
        assert (shown["attempts"], shown["last_status"]) == (attempt, 500)
        assert shown["last_answer"] == "receiver failed on command"
        assert shown["finished_at"] == written + self.max_age_s
        # Backoff, not a tight loop: 5 s doubling to the 60 s cap (at most 50 % less) for an hour.
        assert self.max_age_s / 60 <= attempt <= 5 + self.max_age_s / 30
        self.clock.advance(10 * self.max_age_s)
        await asyncio.sleep(0.1)
        assert self.receiver.attempts[callback_id] == attempt  # dead stays dead

        # The operator's retry: due at once, a fresh window, attempts from 1 again.
        self.receiver.mode = "ok"
        outcome, found = await self.callbacks.retry(callback_id)
        assert outcome == "ok" and found is not None and found["status"] == "pending"
        assert (await self.callbacks.retry(callback_id))[0] == "invalid_state"
        shown = await self.settled(callback_id, 1)
        assert shown["status"] == "done" and shown["retry_since"] == self.clock.now()
        assert len(self.receiver.deliveries()) == 1

    @gen_test(timeout=30)
    async def test_retry_dead_since_a_time(self) -> None:
        self.receiver.mode = "reset"
        await self.workers.start()
        first = await self.emit("p_1")
        shown = await self.settled(first[0], 1)
        self.clock.advance(self.max_age_s)
        shown = await self.settled(first[0], 2)
        assert shown["status"] == "dead"
        dead_at = shown["finished_at"]
        self.clock.advance(100)
        second = await self.emit("p_2")
        await self.settled(second[0], 1)
        self.clock.advance(self.max_age_s)
        assert (await self.settled(second[0], 2))["status"] == "dead"
        self.receiver.mode = "ok"
        assert await self.callbacks.retry_dead(dead_at + 1) == 1
        assert (await self.settled(second[0], 1))["status"] == "done"
        assert (await self.row(first[0]))["status"] == "dead"
        assert await self.callbacks.retry_dead(0) == 1
        assert (await self.settled(first[0], 1))["status"] == "done"


class LifecycleTest(DeliveryCase):
    timeout_s = 5.0

    @gen_test(timeout=30)
    async def test_stop_cuts_a_hanging_post_and_the_next_start_delivers_it(self) -> None:
        self.receiver.fail_next("hang")
        await self.workers.start()
        [callback_id] = await self.emit("p_1")
        await eventually(lambda: self.receiver.attempts[callback_id] == 1, "the hanging POST")
        started = time.monotonic()
        await self.workers.stop()
        assert time.monotonic() - started < 3  # drain_timeout_s, not the 5 s request timeout
        row = await fetchone(self.db, "SELECT * FROM callbacks WHERE id = ?", (callback_id,))
        assert row is not None
        assert (row["status"], row["leased_until"], row["attempts"]) == ("pending", None, 1)
        assert row["next_attempt_at"] == self.clock.now()
        again = CallbackWorkers(self.db, self.receiver.url, SECRET, clock=self.clock,
                                timeout_s=self.timeout_s)
        await again.start()
        try:
            assert (await self.settled(callback_id, 2))["status"] == "done"
        finally:
            await again.stop()

    @gen_test(timeout=30)
    async def test_leases_of_a_killed_process_are_due_at_start(self) -> None:
        [callback_id] = await self.emit("p_1")
        await self.db.write(lambda conn: cb.lease(conn, self.clock.now(), 10, 3600))
        await self.workers.start()
        assert (await self.settled(callback_id, 2))["status"] == "done"

    @gen_test(timeout=30)
    async def test_the_secret_never_reaches_a_log_line_or_a_repr(self) -> None:
        records: list[logging.LogRecord] = []

        class Keep(logging.Handler):
            def emit(self, record: logging.LogRecord) -> None:
                records.append(record)

        handler = Keep(level=logging.DEBUG)
        logging.getLogger("wxd").addHandler(handler)
        logging.getLogger("wxd").setLevel(logging.DEBUG)
        self.addCleanup(logging.getLogger("wxd").removeHandler, handler)
        self.receiver.mode = "500"
        await self.workers.start()
        [callback_id] = await self.emit("p_1")
        await self.settled(callback_id, 1)
        self.clock.advance(self.max_age_s)
        assert (await self.settled(callback_id, 2))["status"] == "dead"
        text = "\n".join(r.getMessage() for r in records) + repr(self.workers)
        assert "HTTP 500" in text and SECRET not in text
        rows = await fetchall(self.db, "SELECT * FROM callbacks")
        assert SECRET not in json.dumps([dict(r) for r in rows])


class HoldBackTest(DeliveryCase):
    @gen_test(timeout=20)
    async def test_senders_hold_back_while_the_webhook_is_busy(self) -> None:
        busy = [True]
        clock = FakeClock(self.clock.now(), autojump=True)
        workers = CallbackWorkers(self.db, self.receiver.url, SECRET, concurrency=1,
                                  clock=clock, yield_to=lambda: busy[0])
        await workers.start()
        try:
            [first] = await self.emit("p_1")
            workers.ring()
            # Busy all along: held back YIELD_MAX_S (in YIELD_STEP_S steps), then sent anyway.
            assert (await self.settled(first, 1))["status"] == "done"
            held = [s for s in clock.sleeps if s == YIELD_STEP_S]
            assert len(held) == round(YIELD_MAX_S / YIELD_STEP_S)
            busy[0] = False
            clock.sleeps.clear()
            [second] = await self.emit("p_2")
            workers.ring()
            assert (await self.settled(second, 1))["status"] == "done"
            assert YIELD_STEP_S not in clock.sleeps
        finally:
            await workers.stop()

    @gen_test(timeout=20)
    async def test_the_webhook_is_busy_while_requests_wait_for_their_commit(self) -> None:
        hook = Webhook("token", None, self.db, clock=self.clock)
        messages = [parse_message({"ToUserName": "gh_1", "FromUserName": "oA",
                                   "CreateTime": "1700000000", "MsgType": "text",
                                   "Content": "hi", "MsgId": str(n)})
                    for n in range(BUSY_WAITING)]
        stores = [asyncio.ensure_future(hook.store(m)) for m in messages]
        await asyncio.sleep(0)  # each store is now waiting for the group commit
        assert hook.waiting == BUSY_WAITING and hook.busy()
        assert await asyncio.gather(*stores) == [True] * BUSY_WAITING
        # The commit answered them all at once; a burst's next requests come right after.
        assert hook.waiting == 0 and hook.busy()
        self.clock.advance(BUSY_HOLD_S)
        assert not hook.busy()


class ConfigTest(AsyncTestCase):
    def test_callbacks_keys_are_checked(self) -> None:
        def problems(values: dict[str, object]) -> list[str]:
            try:
                config.load_text(config_text("/tmp/x.db", {"callbacks": values}))
            except ConfigError as exc:
                return exc.problems
            return []

        assert problems({}) == []
        assert problems({"url": "https://backend.example/hooks/wxd", "secret": SECRET}) == []
        assert problems({"url": "https://backend.example/"}) == [
            "[callbacks] secret: required when url is set"]
        assert problems({"url": "ftp://x/", "secret": SECRET})[0].startswith("[callbacks] url:")
        assert problems({"url": "http://x:99999/", "secret": SECRET})[0].startswith(
            "[callbacks] url:")
        assert problems({"url": "http://x/", "secret": "short"})[0].startswith(
            "[callbacks] secret:")
        assert problems({"events": "push.sent, nope"})[0].startswith("[callbacks] events:")
        loaded = config.load_text(config_text("/tmp/x.db", {"callbacks": {
            "events": "push.sent, user.unlinked"}}))
        assert loaded.callbacks.events == {"push.sent", "user.unlinked"}
        assert not loaded.callbacks.enabled
        assert config.load_text(config_text("/tmp/x.db")).callbacks.events == set(cb.TYPES)
        admin = {"admin": {"listen": "127.0.0.1:18081"}}
        for url in ("http://127.0.0.1:18081/", "http://localhost:18081/x", "http://[::1]:18081/",
                    "http://127.0.0.5:18081/", "http://0.0.0.0:18081/"):
            text = config_text("/tmp/x.db", {**admin, "callbacks": {"url": url, "secret": SECRET}})
            try:
                config.load_text(text)
            except ConfigError as exc:
                assert exc.problems == ["[callbacks] url: points at wxd's own admin listener"]
            else:
                raise AssertionError(url)
        ok = config_text("/tmp/x.db", {**admin, "callbacks": {"url": "http://127.0.0.1:18082/",
                                                               "secret": SECRET}})
        assert config.load_text(ok).callbacks.url.endswith(":18082/")
        # The secret stays out of reprs and error lines.
        shown = config.load_text(config_text("/tmp/x.db", {"callbacks": {
            "url": "http://127.0.0.1:18082/", "secret": SECRET}}))
        assert SECRET not in repr(shown)
        assert not any(SECRET[:10] in p for p in problems({"url": "x", "secret": SECRET}))

    @gen_test(timeout=20)
    async def test_the_daemon_refuses_a_url_on_its_own_bound_admin_port(self) -> None:
        # A config file cannot say it (the admin port may be 0, chosen at bind): build one.
        tmp = tempfile.TemporaryDirectory()
        self.addCleanup(tmp.cleanup)
        loaded = config.load_text(config_text(str(pathlib.Path(tmp.name) / "x.db")))
        port = free_port()
        cfg = dataclasses.replace(
            loaded, admin=dataclasses.replace(loaded.admin, listen=config.Listen("127.0.0.1", port)),
            callbacks=dataclasses.replace(loaded.callbacks, url=f"http://localhost:{port}/hook",
                                          secret=SECRET))
        daemon = Daemon(cfg)
        with pytest.raises(ConfigError, match="admin listener"):
            await daemon.start()
        assert daemon.state == "stopped"


class EveryTypeTest(AsyncTestCase):
    """A whole daemon in this loop, the sandbox (WeChat) and the receiver (the backend)."""

    async def admin(self, method: str, path: str, body: Any = None) -> Any:
        assert self.daemon.admin is not None
        response = await self.http.fetch(HTTPRequest(
            f"http://127.0.0.1:{self.daemon.admin.port}{path}", method=method,
            body=json.dumps(body) if body is not None else None,
            headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}))
        return json.loads(response.body) if path != "/metrics" else response.body.decode()

    async def wait_types(self, wanted: dict[str, int]) -> None:
        def enough() -> bool:
            return all(len(self.receiver.deliveries(kind)) >= n for kind, n in wanted.items())

        await eventually(enough, f"callbacks {wanted}", timeout=30)

    @gen_test(timeout=90)
    async def test_every_type_from_its_real_trigger(self) -> None:
        tmp = tempfile.TemporaryDirectory()
        self.addCleanup(tmp.cleanup)
        fake = FakeWeChat(users=30, seed=5, follow_ratio=0.0, mp_ratio=1.0)
        sandbox = SandboxServer(fake)
        await sandbox.start()
        self.receiver = receiver()
        await self.receiver.start()
        self.http = AsyncHTTPClient(force_instance=True)
        text = sandbox_config_text(
            str(pathlib.Path(tmp.name) / "wxd.db"), fake.credentials, sandbox.base_url, 0, 0,
            {"callbacks": {"url": self.receiver.url, "secret": SECRET, "retry_base_s": 0.05}})
        self.daemon = Daemon(config.load_text(text))
        await self.daemon.start()
        try:
            await self._run(fake)
        finally:
            await self.daemon.stop()
            self.http.close()
            await self.receiver.stop()
            await sandbox.stop()

    async def _run(self, fake: FakeWeChat) -> None:
        assert self.daemon.webhook is not None
        url = f"http://127.0.0.1:{self.daemon.webhook.port}/wechat"
        fake.configure_webhook(url, mode="safe")  # TEMPLATESENDJOBFINISH reports
        sender = WebhookSender(url, fake.credentials, "safe")
        self.addCleanup(sender.close)
        alice, bob = fake.people[0], fake.people[1]
        self.receiver.fail_next("500", "reset")  # the first two attempts fail: retried

        # Follows (webhook events) → follower.subscribed; user/info then learns the unionids.
        for person in (alice, bob):
            fake.follow(person)
            assert (await sender.subscribe(person.oa_openid, scene="spring")).body == b"success"
        await self.wait_types({"follower.subscribed": 2})

        # Alice logs in to the Mini Program: her MP openid and OA openid link → user.linked.
        identity = await self.admin("POST", "/v1/mp/login", {"code": fake.issue_login_code(alice)})
        assert identity["oa_openid"] == alice.oa_openid
        await self.wait_types({"user.linked": 1})

        # A push WeChat accepts and reports delivered; one to Bob, who left meanwhile (43004).
        fake.unfollow(bob)
        push = {"template_id": NOTICE_TEMPLATE_ID,
                "data": {"thing1": "callbacks", "time2": "2026-12-01 10:00"}}
        sent = await self.admin("POST", "/v1/pushes", {**push, "to": {"unionid": alice.unionid}})
        failed = await self.admin("POST", "/v1/pushes", {**push, "to": {"oa_openid": bob.oa_openid}})
        await self.wait_types({"push.sent": 1, "push.delivered": 1, "push.failed": 1})

        # An explicit link: Dave scans the QR link code made for Carol's MP openid (no unionid
        # joins them) → user.linked (source qrcode); the operator removes it → user.unlinked.
        carol, dave = fake.people[2], fake.people[3]
        code = await self.admin("POST", "/v1/links/qrcodes", {"mp_openid": carol.mp_openid})
        scanned = fake.scan(dave, code["ticket"])
        assert scanned is not None and scanned.scene is not None
        delivery = await sender.subscribe(dave.oa_openid, scene=scanned.scene,
                                          ticket=scanned.ticket)
        assert delivery.status == 200
        await self.wait_types({"user.linked": 2})
        await self.admin("DELETE", f"/v1/links?mp_openid={carol.mp_openid}")
        await self.wait_types({"user.unlinked": 1})

        # What wxd stores but does not act on is relayed: a text message and a menu click.
        assert (await sender.text(alice.oa_openid, "你好 wxd")).body == b"success"
        click = sender._header(alice.oa_openid, "event", None)
        click.update(Event="CLICK", EventKey="MENU_HELP")
        assert (await sender.post_fields(click)).body == b"success"
        assert (await sender.unsubscribe(bob.oa_openid)).body == b"success"
        await self.wait_types({"message.received": 2, "follower.unsubscribed": 1})

        got: dict[str, dict[str, Any]] = {item.id: item.json()
                                          for item in self.receiver.deliveries()}
        by_type: dict[str, list[dict[str, Any]]] = {}
        for body in got.values():
            by_type.setdefault(str(body["type"]), []).append(body)
        assert sorted((t, len(v)) for t, v in by_type.items()) == [
            ("follower.subscribed", 3), ("follower.unsubscribed", 1), ("message.received", 2),
            ("push.delivered", 1), ("push.failed", 1), ("push.sent", 1), ("user.linked", 2),
            ("user.unlinked", 1)]
        assert all(item.verified for item in self.receiver.received)
        assert self.receiver.answers["500"] == self.receiver.answers["reset"] == 1

        follows = {b["data"]["oa_openid"]: b["data"] for b in by_type["follower.subscribed"]}
        assert follows[alice.oa_openid]["scene"] == "spring"
        assert by_type["follower.unsubscribed"][0]["data"]["oa_openid"] == bob.oa_openid
        assert by_type["follower.unsubscribed"][0]["subject"] == bob.unionid
        linked = {b["data"]["source"]: b["data"] for b in by_type["user.linked"]}
        assert linked["unionid"] == {
            "mp_openid": alice.mp_openid, "oa_openid": alice.oa_openid,
            "unionid": alice.unionid, "source": "unionid",
            "linked_at": linked["unionid"]["linked_at"]}
        assert (linked["qrcode"]["mp_openid"], linked["qrcode"]["oa_openid"]) == (
            carol.mp_openid, dave.oa_openid)
        unlinked = by_type["user.unlinked"][0]["data"]
        assert (unlinked["mp_openid"], unlinked["source"], unlinked["reason"]) == (
            carol.mp_openid, "qrcode", "removed")
        assert by_type["push.sent"][0]["data"]["id"] == sent["id"]
        assert by_type["push.delivered"][0]["data"]["status"] == "delivered"
        assert by_type["push.delivered"][0]["subject"] == sent["id"]
        assert by_type["push.failed"][0]["data"]["errcode"] == 43004
        assert by_type["push.failed"][0]["data"]["id"] == failed["id"]
        texts = {b["data"]["msg_type"]: b["data"] for b in by_type["message.received"]}
        assert texts["text"]["fields"]["Content"] == "你好 wxd"
        assert texts["event"]["event"] == "CLICK" and texts["event"]["fields"]["EventKey"] == "MENU_HELP"
        # Alice's callbacks after user/info carry her unionid as subject, numbered 1, 2, 3, ...
        seqs: dict[str, list[int]] = {}
        for body in got.values():
            seqs.setdefault(str(body["subject"]), []).append(int(body["seq"]))
        assert all(sorted(v) == list(range(1, len(v) + 1)) for v in seqs.values()), seqs
        assert len(seqs[str(alice.unionid)]) >= 3  # linked, text, click (the follow if known)

        # The operator's view: all done, nothing secret in it; /metrics and /v1/stats count them.
        listed = await self.admin("GET", "/v1/callbacks?status=done&limit=100")
        assert {c["id"] for c in listed["callbacks"]} == set(got)
        shown = await self.admin("GET", f"/v1/callbacks/{by_type['push.failed'][0]['id']}")
        assert shown["data"]["errcode"] == 43004 and shown["status"] == "done"
        assert SECRET not in json.dumps(listed) + json.dumps(shown)
        only = await self.admin("GET", "/v1/callbacks?type=message.received")
        assert len(only["callbacks"]) == 2
        stats = await self.admin("GET", "/v1/stats")
        assert stats["callbacks"]["enabled"] is True
        assert stats["callbacks"]["by_status"] == {"pending": 0, "done": len(got), "dead": 0}
        metrics = await self.admin("GET", "/metrics")
        assert 'wxd_callbacks_total{type="push.delivered",outcome="done"} 1' in metrics
        assert 'wxd_callbacks{status="done"}' in metrics
        assert "wxd_callback_oldest_pending_seconds 0" in metrics
        assert SECRET not in metrics
