"""Graceful stop under load: SIGTERM while the sandbox is slow and many pushes are queued.

`wxd run` must exit 0 within [wxd] shutdown_timeout_s (plus a small margin for the process
itself); every push is then either completed (sent/delivered) or still `queued` — none
`sending`, none lost — and after a restart the rest are delivered, each exactly once.
"""

from __future__ import annotations

import asyncio
import functools
import pathlib
from typing import Any

from bench.proof import (
    AdminClient,
    DaemonProcess,
    DbState,
    Ports,
    check_exactly_once,
    notice_push,
    queue_drained,
    read_db,
    run_backfill,
    sandbox_messages,
    write_config,
)
from tests.helpers import eventually
from wxd.sandbox import FakeWeChat, SandboxThread, WebhookSender

SEND = "/cgi-bin/message/template/send"
WORKERS = 4
EVENT_WORKERS = 2
MARGIN_S = 2.5  # process exit after the drain: closing the database, interpreter teardown


class Scenario:
    """A sandbox, a daemon process on a file database in `tmp`, and an admin client."""

    def __init__(self, tmp: pathlib.Path, sandbox: SandboxThread, shutdown_timeout_s: float,
                 request_timeout_s: float = 10.0) -> None:
        self.sandbox = sandbox
        self.fake = sandbox.fake
        self.shutdown_timeout_s = shutdown_timeout_s
        ports = Ports.free()
        conf = write_config(tmp, sandbox, ports, {
            "wxd": {"shutdown_timeout_s": shutdown_timeout_s},
            "wechat": {"request_timeout_s": request_timeout_s},
            "pushes": {"workers": WORKERS, "backoff_base_s": 0.1, "backoff_max_s": 1},
            "events": {"workers": EVENT_WORKERS},
        })
        self.db_path = tmp / "wxd.db"
        self.daemon = DaemonProcess(conf, ports, tmp / "wxd.log")
        self.admin = AdminClient(ports.admin_url)

    async def start(self) -> None:
        self.daemon.spawn()
        await self.daemon.wait_ready()

    async def enqueue(self, count: int) -> list[str]:
        """`count` pushes to distinct followers in one batch (one commit); their ids."""
        people = [p for p in self.fake.people if p.follows][:count]
        assert len(people) == count
        body = {"pushes": [notice_push(p.oa_openid, f"graceful-{i}") for i, p in enumerate(people)]}
        answer = await self.admin.ok("POST", "/v1/pushes/batch", body)
        ids = [r["id"] for r in answer["results"] if r.get("http_status") == 202]
        assert len(ids) == count, answer
        return ids

    async def stats(self) -> dict[str, Any]:
        stats: dict[str, Any] = await self.admin.ok("GET", "/v1/stats")
        return stats

    def accepted(self) -> int:
        """Template messages the sandbox has accepted so far."""
        return sum(len(v) for v in sandbox_messages(self.sandbox).values())

    def sigterm(self, margin_s: float = MARGIN_S) -> float:
        code, elapsed = self.daemon.terminate()
        print(f"SIGTERM to exit: {elapsed:.2f} s (bound {self.shutdown_timeout_s} s)")
        assert code == 0, self.daemon.log_tail()
        assert elapsed <= self.shutdown_timeout_s + margin_s, (elapsed, self.daemon.log_tail())
        return elapsed

    async def restart_and_drain(self, ids: list[str]) -> DbState:
        """Restart on the same database, wait until nothing is queued, stop; the final state."""
        await self.start()
        await eventually(lambda: queue_drained(self.admin), "the rest to be sent", timeout=60,
                         interval=0.2)
        self.sigterm()
        db = read_db(self.db_path)
        assert sorted(db.pushes) == sorted(ids)
        assert set(db.push_statuses()) <= {"sent", "delivered"}, db.push_statuses()
        assert check_exactly_once(db, sandbox_messages(self.sandbox)) == []
        return db

    def close(self) -> None:
        self.admin.close()
        self.daemon.close()


def test_sigterm_with_a_slow_sandbox_finishes_in_flight_sends_and_keeps_the_rest(
        tmp_path: pathlib.Path) -> None:
    fake = FakeWeChat(users=200, seed=5, follow_ratio=1.0, latency_s=0.3)
    with SandboxThread(fake) as sandbox:
        scenario = Scenario(tmp_path, sandbox, shutdown_timeout_s=3)

        async def run() -> None:
            await scenario.start()
            await run_backfill(scenario.admin)
            ids = await scenario.enqueue(120)
            # Under load: some pushes done, most still to go (120 × 0.3 s / 4 workers ≈ 9 s).
            await eventually(lambda: _at_least(scenario, 2 * WORKERS), "the first sends",
                             timeout=30, interval=0.1)
            scenario.sigterm()

            db = read_db(scenario.db_path)
            assert db.integrity == "ok"
            statuses = db.push_statuses()
            assert sorted(db.pushes) == sorted(ids)                 # none lost
            assert statuses["sending"] == 0, statuses               # none half-done
            assert set(statuses) <= {"queued", "sent", "delivered"}, statuses
            assert statuses["queued"] >= 20, statuses               # the stop came under load
            # In-flight sends finished within the bound (0.3 s each): a queued push never
            # reached WeChat, a completed one exactly once.
            received = sandbox_messages(sandbox)
            assert check_exactly_once(db, received) == []
            assert not [i for i, row in db.pushes.items()
                        if row["status"] == "queued" and received.get(row["client_msg_id"])]

            sandbox.call(lambda: setattr(fake, "latency_s", 0.02))
            await scenario.restart_and_drain(ids)

        try:
            asyncio.run(run())
        finally:
            scenario.close()


def test_sends_longer_than_the_bound_are_cut_requeued_and_not_doubled(
        tmp_path: pathlib.Path) -> None:
    fake = FakeWeChat(users=100, seed=6, follow_ratio=1.0)
    with SandboxThread(fake) as sandbox:
        # WeChat takes the message at once but answers after 20 s; wxd's client would wait.
        scenario = Scenario(tmp_path, sandbox, shutdown_timeout_s=1, request_timeout_s=60)

        async def run() -> None:
            await scenario.start()
            await run_backfill(scenario.admin)
            sandbox.call(lambda: fake.script_fault(SEND, "delay:20", times=WORKERS))
            ids = await scenario.enqueue(3 * WORKERS)

            async def all_workers_busy() -> bool:
                return scenario.accepted() >= WORKERS

            await eventually(all_workers_busy, "every worker to be inside a slow send",
                             timeout=30, interval=0.1)
            elapsed = scenario.sigterm()
            assert elapsed >= 0.9  # it did wait for the in-flight sends, up to the bound

            db = read_db(scenario.db_path)
            statuses = db.push_statuses()
            assert sorted(db.pushes) == sorted(ids)
            assert statuses == {"queued": len(ids)}, statuses       # nothing sent, nothing lost
            received = sandbox_messages(sandbox)
            cut = [row for row in db.pushes.values() if received.get(row["client_msg_id"])]
            assert len(cut) == WORKERS
            # The cut attempts count (WeChat may have the message); never-sent ones do not.
            assert all(row["attempts"] == 1 for row in cut)
            assert sum(row["attempts"] for row in db.pushes.values()) == WORKERS

            # After the restart the cut pushes are sent again with the same client_msg_id:
            # WeChat drops the repeat, so each person still has exactly one message.
            await scenario.restart_and_drain(ids)

        try:
            asyncio.run(run())
        finally:
            scenario.close()


async def _at_least(scenario: Scenario, done: int) -> bool:
    by_status = (await scenario.stats())["pushes"]["by_status"]
    return bool(by_status["sent"] + by_status["delivered"] >= done)


def test_sigterm_while_events_and_pushes_wait_on_a_slow_sandbox(tmp_path: pathlib.Path) -> None:
    fake = FakeWeChat(users=60, seed=8, follow_ratio=0.5)
    with SandboxThread(fake) as sandbox:
        # A 2 s bound with a 1.5 s margin tells both failures apart from success: event workers
        # on their own 5 s default (5 s), or drained after the push workers (2 + 2 s).
        scenario = Scenario(tmp_path, sandbox, shutdown_timeout_s=2, request_timeout_s=60)
        newcomers = [p for p in fake.people if not p.follows][:EVENT_WORKERS + 1]

        async def run() -> None:
            await scenario.start()
            await run_backfill(scenario.admin)
            # WeChat answers the first calls only after 20 s: the user/info of the first
            # subscribes (one per event worker) and the first sends (one per push worker).
            sandbox.call(lambda: fake.script_fault("/cgi-bin/user/info", "delay:20",
                                                   times=EVENT_WORKERS))
            sandbox.call(lambda: fake.script_fault(SEND, "delay:20", times=WORKERS))
            ids = await scenario.enqueue(2 * WORKERS)
            sender = WebhookSender(scenario.daemon.ports.webhook_url, fake.credentials, "safe",
                                   seed=99)
            try:
                for person in newcomers:
                    sandbox.call(functools.partial(fake.follow, person))
                    delivery = await sender.subscribe(person.oa_openid)
                    assert (delivery.status, delivery.body) == (200, b"success")
            finally:
                sender.close()

            async def everyone_waiting() -> bool:
                infos = sandbox.call(lambda: fake.count_calls("/cgi-bin/user/info"))
                return bool(infos >= EVENT_WORKERS and scenario.accepted() >= WORKERS)

            await eventually(everyone_waiting, "event jobs and sends waiting on WeChat",
                             timeout=30, interval=0.1)
            scenario.sigterm(margin_s=1.5)
            db = read_db(scenario.db_path)
            assert db.integrity == "ok"
            assert db.jobs["done"] == 0 and sum(db.jobs.values()) == len(newcomers), db.jobs
            assert db.push_statuses() == {"queued": len(ids)}

            # After a restart the interrupted jobs run again and link the newcomers, and the
            # cut sends are repeated without doubling.
            await scenario.start()

            async def linked() -> bool:
                for person in newcomers:
                    status, body = await scenario.admin.call(
                        "GET", f"/v1/users?oa_openid={person.oa_openid}")
                    if status != 200 or body.get("unionid") != person.unionid:
                        return False
                return True

            await eventually(linked, "the newcomers to be linked", timeout=60, interval=0.1)
            scenario.sigterm()
            await scenario.restart_and_drain(ids)

        try:
            asyncio.run(run())
        finally:
            scenario.close()
