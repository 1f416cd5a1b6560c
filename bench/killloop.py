"""The kill -9 loop: `wxd run` under a steady mix of webhook events and pushes against a sandbox
with injected faults is SIGKILLed at seeded random moments and restarted on the same database;
at the end every acknowledged event and push is accounted for, and so is every callback those
facts owe the backend (a receiver in this process, with its own injected faults).

Load generator (this process, one asyncio loop): event lanes POST signed, AES-encrypted
subscribe/unsubscribe events as WeChat would (the sandbox's follow state is changed first, so
user/info agrees), resending an unanswered event unchanged until it gets `success` (more
persistently than WeChat's three retries, so that every event ends acknowledged and the follower
table can be checked exactly); push lanes POST /v1/pushes with a unique idempotency_key to people
who follow, resending an unanswered one with the same key; a share of the event steps are user
text messages (relayed as message.received), resent until answered too. The sandbox
(SandboxThread, in this process) keeps its state across restarts; the callback receiver
(bench.receiver, in this loop) answers 5xx, hangs or resets at `receiver_fault_rate`.
`python -m bench.killloop [--kills 50] [--seed S] [--quick]`; tests/test_killloop.py runs it.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import pathlib
import random
import re
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from bench.callback_proof import CallbackFigures, Fact, check_callbacks, read_callbacks, verifier
from bench.common import Result, format_table
from bench.proof import (
    AdminClient,
    DaemonProcess,
    Ledger,
    Ports,
    SentEvent,
    check_run,
    notice_push,
    queue_drained,
    run_backfill,
    wait_until,
    write_config,
)
from bench.receiver import Receiver
from wxd.sandbox import FakeWeChat, SandboxThread, SignedRequest, WebhookSender
from wxd.wechat.messages import parse_message, parse_xml

# Issue 10's kinds plus "reset_after": WeChat processed the call and the answer was lost,
# which is what client_msg_id is for (a kill mid-send is the other way to get there).
FAULT_KINDS = ("-1", "45011", "http500", "hang", "reset", "reset_after")
SEND = "/cgi-bin/message/template/send"
CALLBACK_SECRET = "kill-loop-callback-secret"


@dataclass
class Settings:
    kills: int = 5
    seed: int = 1
    users: int = 300
    fault_rate: float = 0.1
    latency_s: tuple[float, float] = (0.01, 0.08)  # per API call: keeps sends in flight at a kill
    uptime_s: tuple[float, float] = (0.8, 3.0)   # time between ready and the next kill
    early_kill_p: float = 0.2                    # chance the next kill hits during start-up
    event_rate: float = 12.0                     # new webhook events per second (all lanes)
    push_rate: float = 20.0                      # new pushes per second (all lanes)
    event_lanes: int = 2
    push_lanes: int = 3
    text_share: float = 0.25                     # event steps that send a user text message
    receiver_fault_rate: float = 0.1             # callback POSTs answered 500, hung or reset
    settle_timeout_s: float = 120.0              # final resends + drain, bounded

    def daemon_config(self) -> dict[str, dict[str, object]]:
        return {
            "wxd": {"shutdown_timeout_s": 5, "log_level": "info"},
            # Short, so that a "hang" fault costs 2 s, not 10.
            "wechat": {"request_timeout_s": 2, "connect_timeout_s": 2},
            # Many attempts: a push may be in flight at several kills (each counts an attempt).
            "pushes": {"workers": 4, "max_attempts": 50, "backoff_base_s": 0.1,
                       "backoff_max_s": 2, "stale_sending": "resend"},
            "events": {"workers": 2, "max_attempts": 10},
            "backfill": {"rate_per_s": 0},
            # Short, so that a hanging receiver costs 1 s and retries come quickly.
            "callbacks": {"secret": CALLBACK_SECRET, "timeout_s": 1, "retry_base_s": 0.1,
                          "retry_max_s": 1, "concurrency": 4},
        }


@dataclass
class SentText:
    """A user text message POSTed to the webhook; resent unchanged until `success`."""

    person: int
    fields: dict[str, str | int]
    request: SignedRequest
    dedupe_key: str
    built_at: float
    acked: bool = False
    in_flight: bool = False


@dataclass
class Figures:
    """What happened in one run (printed by the bench, asserted by the tests)."""

    kills: int = 0
    early_kills: int = 0
    starts: int = 0
    crashes: int = 0
    duration_s: float = 0.0
    ready_s: list[float] = field(default_factory=list)
    events_sent: int = 0
    events_acked: int = 0
    event_resends: int = 0
    pushes_acked: int = 0
    push_resends: int = 0
    pushes_rejected: Counter[str] = field(default_factory=Counter)
    final_statuses: Counter[str] = field(default_factory=Counter)
    recovered_pushes: int = 0
    recovered_jobs: int = 0
    template_send_calls: int = 0
    dedupe_answers: int = 0
    messages_accepted: int = 0
    stop_exit_code: int | None = None
    texts_acked: int = 0
    callbacks: CallbackFigures = field(default_factory=CallbackFigures)
    problems: list[str] = field(default_factory=list)

    def summary(self) -> str:
        ready = (f"{sum(self.ready_s) / len(self.ready_s):.2f} s mean, {max(self.ready_s):.2f} s "
                 "max") if self.ready_s else "-"
        lines = [
            f"kills {self.kills} ({self.early_kills} during start-up), starts {self.starts}, "
            f"crashes {self.crashes}, run time {self.duration_s:.1f} s, restart to ready {ready}",
            f"events: {self.events_sent} sent, {self.events_acked} acknowledged, "
            f"{self.event_resends} resends of unanswered ones",
            f"pushes: {self.pushes_acked} acknowledged, {self.push_resends} resends, rejected "
            f"{dict(self.pushes_rejected)}; final {dict(self.final_statuses)}",
            f"recovered at start: {self.recovered_pushes} pushes left sending, "
            f"{self.recovered_jobs} event jobs left leased",
            f"sandbox: {self.template_send_calls} template/send calls, "
            f"{self.messages_accepted} messages accepted, {self.dedupe_answers} repeats answered "
            f"from the client_msg_id dedupe; final SIGTERM exit {self.stop_exit_code}",
            f"text messages acknowledged: {self.texts_acked}; {self.callbacks.summary()}",
            f"problems: {len(self.problems)}",
            *(f"  - {p}" for p in self.problems[:30]),
            *([f"  ... and {len(self.problems) - 30} more"] if len(self.problems) > 30 else []),
        ]
        return "\n".join(lines)


class KillLoop:
    """One run: `await run()` returns the Figures (problems empty when every promise held)."""

    def __init__(self, settings: Settings, workdir: pathlib.Path) -> None:
        self.s = settings
        self.workdir = workdir
        self.rng = random.Random(f"killloop:{settings.seed}")
        # The kill schedule has a stream of its own, so it depends on the seed only.
        self.kill_rng = random.Random(f"killloop-kills:{settings.seed}")
        self.fig = Figures()
        self.fake = FakeWeChat(users=settings.users, seed=settings.seed, fault_rate=0.0,
                               latency_s=settings.latency_s,
                               fault_kinds=FAULT_KINDS)
        self.ledger = Ledger([p.follows for p in self.fake.people])
        self.texts: list[SentText] = []
        self.receiver = Receiver(verifier(CALLBACK_SECRET), seed=settings.seed,
                                 fault_rate=settings.receiver_fault_rate)
        self._stopping = False

    async def run(self) -> Figures:
        started = time.monotonic()
        await self.receiver.start()
        with SandboxThread(self.fake) as sandbox:
            self.sandbox = sandbox
            ports = Ports.free()
            extra = self.s.daemon_config()
            extra["callbacks"]["url"] = self.receiver.url
            conf = write_config(self.workdir, sandbox, ports, extra)
            self.daemon = DaemonProcess(conf, ports, self.workdir / "wxd.log")
            self.admin = AdminClient(ports.admin_url)
            # A seed of its own: the sandbox's report sender draws nonces from seed:webhook.
            self.sender = WebhookSender(ports.webhook_url, self.fake.credentials, "safe",
                                        clock=self.fake.clock, seed=self.s.seed + 7919)
            try:
                await self._run(ports)
            finally:
                self.sender.close()
                self.admin.close()
                self.daemon.close()
                await self.receiver.stop()
        self.fig.duration_s = time.monotonic() - started
        return self.fig

    async def _run(self, ports: Ports) -> None:
        fake, sandbox = self.fake, self.sandbox
        sandbox.call(lambda: fake.configure_webhook(ports.webhook_url, mode="safe", retries=True))
        self.daemon.spawn()
        await self.daemon.wait_ready()
        await run_backfill(self.admin)
        sandbox.call(lambda: setattr(fake, "fault_rate", self.s.fault_rate))

        lanes = [asyncio.create_task(self._lane(self._event_step, self.s.event_lanes,
                                                self.s.event_rate)) for _ in range(self.s.event_lanes)]
        lanes += [asyncio.create_task(self._lane(self._push_step, self.s.push_lanes,
                                                 self.s.push_rate)) for _ in range(self.s.push_lanes)]
        try:
            await self._killer()
        finally:
            self._stopping = True
            await asyncio.gather(*lanes, return_exceptions=True)
        for lane in lanes:
            if lane.exception() is not None:
                raise lane.exception()  # type: ignore[misc]

        # Settle: faults off, the daemon up, every unanswered request resent until answered.
        sandbox.call(lambda: setattr(fake, "fault_rate", 0.0))
        self.receiver.fault_rate = 0.0
        if not self.daemon.running:
            self.fig.crashes += 1
            self.fig.problems.append(f"the daemon died on its own:\n{self.daemon.log_tail()}")
            self.daemon.spawn()
        await self.daemon.wait_ready()
        deadline = time.monotonic() + self.s.settle_timeout_s
        await wait_until(self._resend_all, self.s.settle_timeout_s, "every request answered")
        try:
            await wait_until(lambda: queue_drained(self.admin),
                             max(5.0, deadline - time.monotonic()), "the queues to drain", 0.2)
            await wait_until(self._callbacks_delivered, max(5.0, deadline - time.monotonic()),
                             "the callbacks to be delivered", 0.2)
        except TimeoutError as exc:
            _, stats = await self.admin.call("GET", "/v1/stats")
            self.fig.problems.append(f"{exc}: {stats}")
        code, _ = self.daemon.terminate()
        self.fig.stop_exit_code = code
        self.fig.starts = self.daemon.starts
        self._collect(sandbox)

    # Load ---------------------------------------------------------------------------------

    async def _lane(self, step: Callable[[], Awaitable[None]], lanes: int, rate: float) -> None:
        interval = lanes / rate
        while not self._stopping:
            began = time.monotonic()
            await step()
            await asyncio.sleep(max(0.0, interval - (time.monotonic() - began)))

    async def _callbacks_delivered(self) -> bool:
        status, stats = await self.admin.call("GET", "/v1/stats")
        return status == 200 and stats["callbacks"]["by_status"]["pending"] == 0

    async def _event_step(self) -> None:
        pending = self.ledger.next_pending_event()
        if pending is not None:
            self.fig.event_resends += 1
            await self._deliver(pending)
            return
        text = self._next_pending_text()
        if text is not None:
            self.fig.event_resends += 1
            await self._deliver_text(text)
            return
        if self.rng.random() < self.s.text_share:
            await self._text_step()
            return
        person = self.ledger.pick_event_person(self.rng, int(self.fake.clock()))
        if person is None:
            return
        subscribe = not self.ledger.follows[person]
        who = self.fake.people[person]
        self.sandbox.call(lambda: self.fake.follow(who) if subscribe else self.fake.unfollow(who))
        create_time = int(self.fake.clock())
        fields = (self.sender.subscribe_fields(who.oa_openid, create_time=create_time) if subscribe
                  else self.sender.unsubscribe_fields(who.oa_openid, create_time=create_time))
        request = self.sender.build(fields)
        key = parse_message(parse_xml(request.xml)).dedupe_key
        event = SentEvent(person, subscribe, create_time, fields, request, key, time.time())
        self.ledger.add_event(event, time.time())
        self.fig.events_sent += 1
        await self._deliver(event)

    async def _deliver(self, event: SentEvent) -> None:
        if time.time() - event.built_at > 200:  # keep the timestamp inside the replay window
            event.request, event.built_at = self.sender.build(event.fields), time.time()
        event.in_flight = True
        try:
            delivery = await self.sender.send(event.request)
        finally:
            event.in_flight = False
        if delivery.status == 200 and delivery.body == b"success":
            self.ledger.event_acked(event)
            self.fig.events_acked += 1

    def _next_pending_text(self) -> SentText | None:
        return next((t for t in self.texts if not t.acked and not t.in_flight), None)

    async def _text_step(self) -> None:
        person = self.rng.randrange(len(self.fake.people))
        fields = self.sender.text_fields(self.fake.people[person].oa_openid,
                                         f"kill loop text {len(self.texts)}",
                                         create_time=int(self.fake.clock()))
        request = self.sender.build(fields)
        key = parse_message(parse_xml(request.xml)).dedupe_key
        text = SentText(person, fields, request, key, time.time())
        self.texts.append(text)
        await self._deliver_text(text)

    async def _deliver_text(self, text: SentText) -> None:
        if time.time() - text.built_at > 200:  # keep the timestamp inside the replay window
            text.request, text.built_at = self.sender.build(text.fields), time.time()
        text.in_flight = True
        try:
            delivery = await self.sender.send(text.request)
        finally:
            text.in_flight = False
        if delivery.status == 200 and delivery.body == b"success":
            text.acked = True
            self.fig.texts_acked += 1

    async def _push_step(self) -> None:
        push = self.ledger.next_pending_push()
        if push is not None:
            self.fig.push_resends += 1
        else:
            person = self.ledger.pick_push_person(self.rng)
            if person is None:
                return
            push = self.ledger.add_push(f"kl{self.s.seed}-{len(self.ledger.pushes)}", person,
                                        time.time())
        push.in_flight = True
        try:
            status, body = await self.admin.call(
                "POST", "/v1/pushes",
                notice_push(self.fake.people[push.person].oa_openid, push.key))
        finally:
            push.in_flight = False
        if status in (200, 202) and isinstance(body, dict) and "id" in body:
            push.push_id = str(body["id"])
            self.fig.pushes_acked += 1
        elif status is not None and 400 <= status < 500:
            code = body["error"]["code"] if isinstance(body, dict) and "error" in body else "?"
            push.rejected = f"{status} {code}"
            self.fig.pushes_rejected[f"{status} {code}"] += 1

    async def _resend_all(self) -> bool:
        """One round of resends; True when nothing is left unanswered."""
        while (event := self.ledger.next_pending_event()) is not None:
            self.fig.event_resends += 1
            await self._deliver(event)
            if not event.acked:
                return False
        while (text := self._next_pending_text()) is not None:
            self.fig.event_resends += 1
            await self._deliver_text(text)
            if not text.acked:
                return False
        while self.ledger.next_pending_push() is not None:
            await self._push_step()
            if self.ledger.next_pending_push() is not None:
                return False
        return True

    # Kills --------------------------------------------------------------------------------

    async def _killer(self) -> None:
        ready = True
        while self.fig.kills < self.s.kills:
            if ready:
                await asyncio.sleep(self.kill_rng.uniform(*self.s.uptime_s))
            else:
                await asyncio.sleep(self.kill_rng.uniform(0.0, 0.6))
            if not self.daemon.running:
                self.fig.crashes += 1
                self.fig.problems.append(f"the daemon died on its own:\n{self.daemon.log_tail()}")
            self.daemon.kill()
            self.fig.kills += 1
            self.fig.early_kills += 0 if ready else 1
            self.daemon.spawn()
            if self.fig.kills < self.s.kills and self.kill_rng.random() < self.s.early_kill_p:
                ready = False
                continue
            self.fig.ready_s.append(await self.daemon.wait_ready())
            ready = True

    # Accounting ---------------------------------------------------------------------------

    def _collect(self, sandbox: SandboxThread) -> None:
        fig = self.fig
        if fig.stop_exit_code != 0:
            fig.problems.append(f"SIGTERM exit code {fig.stop_exit_code}:\n{self.daemon.log_tail()}")
        log = self.daemon.log_text()
        # Informational only (read from the log lines of workers.py and events.py).
        fig.recovered_pushes = sum(int(n) for n in re.findall(
            r"left sending[^:\n]*: (\d+) requeued", log))
        fig.recovered_jobs = sum(int(n) for n in re.findall(r"requeued (\d+) event jobs", log))
        fig.template_send_calls = sandbox.call(lambda: self.fake.count_calls(SEND))
        state, received, problems = check_run(self.workdir / "wxd.db", sandbox, self.ledger)
        fig.final_statuses = state.push_statuses()
        fig.messages_accepted = sum(len(v) for v in received.values())
        answered_ok = sandbox.call(lambda: sum(
            1 for c in self.fake.calls if c.path == SEND and c.errcode == 0 and c.fault is None))
        fig.dedupe_answers = answered_ok - fig.messages_accepted
        fig.problems.extend(problems)
        facts = [Fact("follower.subscribed" if e.subscribe else "follower.unsubscribed",
                      e.dedupe_key, superseded=self.ledger.last_event[e.person] is not e)
                 for e in self.ledger.events if e.acked]
        facts += [Fact("message.received", t.dedupe_key) for t in self.texts if t.acked]
        unverified = sum(1 for r in self.receiver.received if r.verified is False)
        fig.callbacks, callback_problems = check_callbacks(
            read_callbacks(self.workdir / "wxd.db"), facts, state.pushes, self.receiver.accepted,
            sum(self.receiver.attempts.values()), unverified)
        fig.problems.extend(callback_problems)


def run_kill_loop(settings: Settings, workdir: pathlib.Path) -> Figures:
    return asyncio.run(KillLoop(settings, workdir).run())


def results(fig: Figures, settings: Settings) -> list[Result]:
    name = f"kill -9 loop ({settings.kills} kills)"
    notes: dict[str, object] = {"problems": fig.problems[:5]} if fig.problems else {}
    return [
        Result(name, "kills", fig.kills, target=f">= {settings.kills}",
               met=fig.kills >= settings.kills),
        Result(name, "events acknowledged", fig.events_acked),
        Result(name, "pushes acknowledged", fig.pushes_acked),
        Result(name, "callbacks delivered", fig.callbacks.delivered),
        Result(name, "callback duplicates", fig.callbacks.duplicates, higher_is_better=False,
               notes={"written": fig.callbacks.written, "posts": fig.callbacks.requests}),
        Result(name, "run time s", fig.duration_s, higher_is_better=False),
        Result(name, "promises broken", len(fig.problems), higher_is_better=False,
               target="0 (nothing lost, none doubled)", met=not fig.problems, notes=notes),
    ]


def run(quick: bool) -> list[Result]:
    settings = Settings(kills=5 if quick else 50)
    with tempfile.TemporaryDirectory(prefix="wxd-killloop-") as tmp:
        fig = run_kill_loop(settings, pathlib.Path(tmp))
    print(fig.summary())
    return results(fig, settings)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=50)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="the CI form: 5 kills")
    parser.add_argument("--keep", metavar="DIR", help="work in DIR and keep the db and log")
    args = parser.parse_args(argv)
    # The sandbox logs every refused delivery report while wxd is down; only errors matter here.
    logging.basicConfig(level=logging.ERROR, format="%(levelname)s %(name)s: %(message)s")
    settings = Settings(kills=5 if args.quick else args.kills, seed=args.seed)
    if args.keep:
        workdir = pathlib.Path(args.keep)
        workdir.mkdir(parents=True, exist_ok=True)
        fig = run_kill_loop(settings, workdir)
    else:
        with tempfile.TemporaryDirectory(prefix="wxd-killloop-") as tmp:
            fig = run_kill_loop(settings, pathlib.Path(tmp))
    print(fig.summary())
    print()
    print(format_table(results(fig, settings)))
    return 1 if fig.problems else 0


if __name__ == "__main__":
    sys.exit(main())
