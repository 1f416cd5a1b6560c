"""The kill -9 loop: `wxd run` under a steady mix of webhook events and pushes against a sandbox
with injected faults is SIGKILLed at seeded random moments and restarted on the same database;
at the end every acknowledged event and push is accounted for.

The load is bench.proof.LoadGenerator (this process, one asyncio loop): events and pushes, each
resent until answered. The sandbox (SandboxThread, in this process) keeps its state across
restarts.
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
from dataclasses import dataclass, field

from bench.common import Result, format_table
from bench.proof import (
    Ledger,
    LoadCounts,
    Ports,
    Rig,
    check_run,
    queue_drained,
    run_backfill,
    wait_until,
)
from wxd.sandbox import FakeWeChat, SandboxThread

# Issue 10's kinds plus "reset_after": WeChat processed the call and the answer was lost,
# which is what client_msg_id is for (a kill mid-send is the other way to get there).
FAULT_KINDS = ("-1", "45011", "http500", "hang", "reset", "reset_after")
SEND = "/cgi-bin/message/template/send"


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
        }


@dataclass
class Figures(LoadCounts):
    """What happened in one run (printed by the bench, asserted by the tests)."""

    kills: int = 0
    early_kills: int = 0
    starts: int = 0
    crashes: int = 0
    duration_s: float = 0.0
    ready_s: list[float] = field(default_factory=list)
    final_statuses: Counter[str] = field(default_factory=Counter)
    recovered_pushes: int = 0
    recovered_jobs: int = 0
    template_send_calls: int = 0
    dedupe_answers: int = 0
    messages_accepted: int = 0
    stop_exit_code: int | None = None
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

    async def run(self) -> Figures:
        started = time.monotonic()
        with SandboxThread(self.fake) as sandbox:
            self.sandbox = sandbox
            rig = Rig.start(self.workdir, sandbox, self.ledger, self.rng, f"kl{self.s.seed}-",
                            self.fig, self.s.daemon_config(), self.s.seed)
            self.daemon, self.admin, self.sender, self.load = (rig.daemon, rig.admin,
                                                               rig.sender, rig.load)
            try:
                await self._run(rig.ports)
            finally:
                rig.close()
        self.fig.duration_s = time.monotonic() - started
        return self.fig

    async def _run(self, ports: Ports) -> None:
        fake, sandbox = self.fake, self.sandbox
        sandbox.call(lambda: fake.configure_webhook(ports.webhook_url, mode="safe", retries=True))
        self.daemon.spawn()
        await self.daemon.wait_ready()
        await run_backfill(self.admin)
        sandbox.call(lambda: setattr(fake, "fault_rate", self.s.fault_rate))

        self.load.start(self.s.event_lanes, self.s.event_rate, self.s.push_lanes, self.s.push_rate)
        try:
            await self._killer()
        finally:
            await self.load.stop()

        # Settle: faults off, the daemon up, every unanswered request resent until answered.
        sandbox.call(lambda: setattr(fake, "fault_rate", 0.0))
        if not self.daemon.running:
            self.fig.crashes += 1
            self.fig.problems.append(f"the daemon died on its own:\n{self.daemon.log_tail()}")
            self.daemon.spawn()
        await self.daemon.wait_ready()
        deadline = time.monotonic() + self.s.settle_timeout_s
        await wait_until(self.load.resend_all, self.s.settle_timeout_s,
                         "every request answered")
        try:
            await wait_until(lambda: queue_drained(self.admin),
                             max(5.0, deadline - time.monotonic()), "the queues to drain", 0.2)
        except TimeoutError as exc:
            _, stats = await self.admin.call("GET", "/v1/stats")
            self.fig.problems.append(f"{exc}: {stats}")
        code, _ = self.daemon.terminate()
        self.fig.stop_exit_code = code
        self.fig.starts = self.daemon.starts
        self._collect(sandbox)

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
