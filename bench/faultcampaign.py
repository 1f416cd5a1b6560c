"""The fault campaign: one `wxd run` process, never restarted, under webhook events, pushes and a
follower backfill meets two faults in turn, and afterwards every promise still holds.

1. WeChat unreachable: the emulator answers 40164 ("invalid ip ..., not in whitelist") to every
   call, token fetches and business calls alike (FakeWeChat.refuse_tokens(40164, business=True,
   seconds=outage_s)), then recovers by itself. A first sync stores the followers unpaced
   before the load starts (pushes go to known followers); the re-sync that runs through the
   campaign is slowed by a "delay:" rule on batchget, so that it is running when the outage
   starts and is still running when the disk fills (its one page write comes after).
2. The database filesystem fills and empties again: the database lives on a small tmpfs the
   campaign mounts (ScratchFilesystem; root only, else the campaign is skipped); a ballast
   file fills it to the last page and is deleted `disk_full_s` after the first write refused.

Meanwhile the load (bench.proof.LoadGenerator) keeps sending events and pushes and resends
whatever was not answered. Then the load stops, the last unanswered requests are resent, and
once the queues are drained and the backfill has ended the campaign checks, with the daemon
still running (no restart): every acknowledged event stored once and its job done, every
acknowledged push sent/delivered exactly once per the emulator's inbox (bench.proof.check_run),
the backfill `done` with every follower, nothing left `leased`/`sending`, `integrity_check`
ok; then SIGTERM must exit 0 and the file must still pass integrity_check.

The CI form (8 s outage, 4 s disk full; wxd with a 10 s lease and a 2 s unreachable probe, so
that recovering takes seconds) runs in the normal suite (tests/test_faultcampaign.py); the full
form (60 s outage, 20 s disk full; wxd's default 120 s lease and 60 s probe) with `-m slow` /
WXD_SLOW_TESTS=1, or
`python -m bench.faultcampaign [--quick] [--seed S] [--keep DIR]` (exit 0: every promise held,
1: a problem, 77: skipped because a tmpfs cannot be mounted). Loopback traffic only; bounded:
every wait has a deadline, and a missed deadline is reported as a problem.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import logging
import math
import os
import pathlib
import random
import re
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

from bench.common import Result, format_table
from bench.proof import (
    DbState,
    Ledger,
    LoadCounts,
    Ports,
    Rig,
    check_run,
    queue_drained,
    read_db,
    run_backfill,
    wait_until,
)
from wxd.pacing import LEASE_S
from wxd.push_workers import UNREACHABLE_PROBE_S
from wxd.sandbox import FakeWeChat, FaultRule, SandboxThread

SEND = "/cgi-bin/message/template/send"
BATCHGET = "/cgi-bin/user/info/batchget"
TOKEN_PATHS = ("/cgi-bin/token", "/cgi-bin/stable_token")
OUTAGE_ERRCODE = 40164
SKIP_EXIT_CODE = 77  # automake's "skipped"


# The database filesystem ----------------------------------------------------------------------


class MountUnavailable(RuntimeError):
    """A tmpfs cannot be mounted here (not root, no CAP_SYS_ADMIN, no mount(8))."""


class ScratchFilesystem:
    """A tmpfs of `size_mb` MiB mounted at `path` (created, must not exist) for the daemon's
    database. fill() writes a ballast file until the filesystem refuses more (ENOSPC, down to
    the last 4 KiB page), empty() deletes it; close() unmounts (lazily if something still holds
    it) and removes the mount point. A context manager; MountUnavailable when mount is refused.

    A tmpfs rather than a loop-mounted ext4: nothing to format, nothing left on disk, and root
    meets ENOSPC like anyone else (ext4 reserves blocks for root). Only a harness killed with
    SIGKILL leaves the mount behind (`umount /tmp/wxd-faultcampaign-*/disk`)."""

    BALLAST = "ballast"

    def __init__(self, path: pathlib.Path, size_mb: int = 64) -> None:
        self.path = path
        self.size_mb = size_mb
        self.mounted = False
        self.filled_bytes = 0

    def __enter__(self) -> ScratchFilesystem:
        if not self.mounted:
            self.mount()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def mount(self) -> None:
        if os.geteuid() != 0:
            raise MountUnavailable("mounting a tmpfs needs root (run as root, as CI does)")
        mount = shutil.which("mount")
        if mount is None:
            raise MountUnavailable("no mount(8) on this machine")
        self.path.mkdir()
        done = subprocess.run(
            [mount, "-t", "tmpfs", "-o", f"size={self.size_mb}m,mode=0700", "wxd-faultcampaign",
             str(self.path)], capture_output=True, text=True, check=False)
        if done.returncode != 0:
            self.path.rmdir()
            raise MountUnavailable(f"mount -t tmpfs refused: {done.stderr.strip() or done.returncode}")
        self.mounted = True

    def free_bytes(self) -> int:
        stats = os.statvfs(self.path)
        return stats.f_bavail * stats.f_frsize

    def fill(self) -> int:
        """Write the ballast until the filesystem is full; returns the bytes written."""
        chunk = b"\0" * (1 << 20)
        fd = os.open(self.path / self.BALLAST, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            size = len(chunk)
            while size >= 4096:
                try:
                    self.filled_bytes += os.write(fd, chunk[:size])
                except OSError as exc:
                    if exc.errno != errno.ENOSPC:
                        raise
                    size //= 2
        finally:
            os.close(fd)
        return self.filled_bytes

    def empty(self) -> None:
        (self.path / self.BALLAST).unlink(missing_ok=True)
        self.filled_bytes = 0

    def close(self) -> None:
        """Unmount and remove the mount point. Idempotent."""
        if self.mounted:
            done = subprocess.run(["umount", str(self.path)], capture_output=True, check=False)
            if done.returncode != 0:
                subprocess.run(["umount", "-l", str(self.path)], capture_output=True, check=False)
            self.mounted = False
        with contextlib.suppress(OSError):
            self.path.rmdir()


def checkpoint_truncate(db_path: pathlib.Path, tries: int = 20) -> bool:
    """A TRUNCATE checkpoint from a second connection, as a backup tool makes: the WAL's pages go
    into the database file and the WAL shrinks to nothing. Done just before the ballast, so
    that the daemon's next commit needs new space at once (otherwise it reuses the WAL's old
    space and the first refused write may come megabytes of writes later). True when done."""
    conn = sqlite3.connect(db_path, timeout=5.0, isolation_level=None)
    try:
        for _ in range(tries):
            busy, _, _ = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
            if busy == 0:
                return True
            time.sleep(0.05)
        return False
    finally:
        conn.close()


# Settings and figures --------------------------------------------------------------------------


@dataclass
class Settings:
    outage_s: float = 8.0            # the emulator answers 40164 this long (its clock: real time)
    disk_full_s: float = 4.0         # the ballast stays this long after the first refused write
    seed: int = 1
    users: int = 5000                # ~3,000 followers: 30 batchget chunks for the backfill
    warmup_s: float = 2.0            # load and backfill before the outage
    tail_s: float = 2.0              # load after the disk emptied
    batchget_delay_s: float = 0.4    # the re-sync's pace (one batchget at a time): ~12 s of calls
    latency_s: tuple[float, float] = (0.005, 0.03)
    event_rate: float = 10.0
    push_rate: float = 15.0
    event_lanes: int = 2
    push_lanes: int = 3
    fs_size_mb: int = 64
    # wxd's [wxd] lease_s and [wechat] unreachable_probe_s (None: wxd's defaults). A push whose
    # outcome write met the full disk is sent again when its lease has passed; after a business
    # call's 40164 the paused work tries again after the probe time.
    lease_s: float | None = 10.0
    probe_s: float | None = 2.0
    bite_timeout_s: float = 15.0      # the ballast to the first refused write

    @property
    def recovery_timeout_s(self) -> float:
        """The outage's end to the first push sent again."""
        return (self.probe_s or UNREACHABLE_PROBE_S) + 30.0

    @property
    def settle_timeout_s(self) -> float:
        """The load's end to drained queues and an ended backfill."""
        return (self.lease_s or LEASE_S) + 60.0

    @classmethod
    def ci(cls, seed: int = 1) -> Settings:
        return cls(seed=seed)

    @classmethod
    def full(cls, seed: int = 1) -> Settings:
        return cls(outage_s=60.0, disk_full_s=20.0, seed=seed, warmup_s=5.0, tail_s=5.0,
                   batchget_delay_s=1.5, event_rate=12.0, push_rate=20.0, lease_s=None,
                   probe_s=None)

    @property
    def form(self) -> str:
        lease, probe = self.lease_s or LEASE_S, self.probe_s or UNREACHABLE_PROBE_S
        return (f"{self.outage_s:g} s outage, {self.disk_full_s:g} s disk full; lease {lease:g} s, "
                f"probe {probe:g} s")

    def daemon_config(self) -> dict[str, dict[str, object]]:
        timers: dict[str, dict[str, object]] = {"wxd": {}, "wechat": {}}
        if self.lease_s is not None:
            timers["wxd"]["lease_s"] = self.lease_s
        if self.probe_s is not None:
            timers["wechat"]["unreachable_probe_s"] = self.probe_s
        return {
            "wxd": {"shutdown_timeout_s": 5, "log_level": "info", **timers["wxd"]},
            "wechat": {"request_timeout_s": 5, "connect_timeout_s": 2, **timers["wechat"]},
            "pushes": {"workers": 4, "max_attempts": 20, "backoff_base_s": 0.1,
                       "backoff_max_s": 2},
            "events": {"workers": 2, "max_attempts": 10, "backoff_base_s": 0.2,
                       "backoff_max_s": 2},
            "backfill": {"rate_per_s": 0, "concurrency": 1, "backoff_base_s": 0.2,
                         "backoff_max_s": 2},
        }


@dataclass
class Figures(LoadCounts):
    """What happened in one campaign (printed by the bench, asserted by the tests). Times in
    `timeline` are seconds from the daemon being ready."""

    settings: Settings = field(default_factory=Settings)
    skipped: str | None = None
    duration_s: float = 0.0
    starts: int = 0
    timeline: dict[str, float] = field(default_factory=dict)
    backfill_at: dict[str, str] = field(default_factory=dict)  # timeline mark -> backfill state
    refused_calls: Counter[str] = field(default_factory=Counter)  # path -> 40164 answers
    ballast_mb: float = 0.0
    answers_503: Counter[str] = field(default_factory=Counter)  # channel -> 503 answers
    healthz_full: Counter[str] = field(default_factory=Counter)  # /healthz status on the full disk
    events_processed: int = 0
    final_statuses: Counter[str] = field(default_factory=Counter)
    failed_by_errcode: Counter[str] = field(default_factory=Counter)
    messages_accepted: int = 0
    duplicates: int = 0
    backfill: dict[str, Any] = field(default_factory=dict)
    followers_stored: int = 0
    sandbox_followers: int = 0
    leftover: dict[str, int] = field(default_factory=dict)
    integrity: str = "-"
    integrity_after_stop: str = "-"
    stop_exit_code: int | None = None
    problems: list[str] = field(default_factory=list)

    def summary(self) -> str:
        if self.skipped is not None:
            return f"fault campaign skipped: {self.skipped}"
        statuses = self.final_statuses
        b = self.backfill
        marks = sorted(self.timeline.items(), key=lambda item: item[1])
        lines = [
            f"fault campaign ({self.settings.form}, seed {self.settings.seed}): run time "
            f"{self.duration_s:.1f} s, daemon starts {self.starts}, final SIGTERM exit "
            f"{self.stop_exit_code}",
            f"events: {self.events_sent} sent, {self.events_acked} acknowledged, "
            f"{self.events_processed} processed (job done), {self.event_resends} resends",
            f"pushes: {self.pushes_acked} acknowledged, {statuses['sent']} sent, "
            f"{statuses['delivered']} delivered, {statuses['failed']} failed "
            f"{dict(self.failed_by_errcode) or ''}, {self.duplicates} received twice; "
            f"{self.push_resends} resends, rejected {dict(self.pushes_rejected)}; the emulator "
            f"accepted {self.messages_accepted} messages",
            f"backfill: {b.get('state')} (run {b.get('run')}, {b.get('followers_done')} "
            f"followers done, seen {b.get('seen')} of {b.get('total')}, skipped "
            f"{b.get('skipped')}, last_error {b.get('last_error')!r}); followers subscribed in "
            f"the db {self.followers_stored}, in the emulator {self.sandbox_followers}",
            f"leftover: {self.leftover}; integrity_check {self.integrity} (after the stop: "
            f"{self.integrity_after_stop})",
            f"faults: {sum(self.refused_calls.values())} calls answered {OUTAGE_ERRCODE} "
            f"{dict(self.refused_calls)}; ballast {self.ballast_mb:.1f} MB; 503 answers "
            f"{dict(self.answers_503)}; /healthz polled on the full disk "
            f"{dict(self.healthz_full)}",
            "timeline:",
            *(f"  {at:7.2f} s  {name}" + (f"  (backfill {self.backfill_at[name]})"
                                          if name in self.backfill_at else "")
              for name, at in marks),
            f"problems: {len(self.problems)}",
            *(f"  {n:5d} x {kind}" for kind, n in digest(self.problems).most_common(12)),
            *(f"  - {p}" for p in self.problems[:30]),
            *([f"  ... and {len(self.problems) - 30} more"] if len(self.problems) > 30 else []),
        ]
        return "\n".join(lines)


def digest(problems: list[str]) -> Counter[str]:
    """Problems by kind: ids, openids, numbers and times blanked (5-digit errcodes kept), the
    first 90 characters of the first line."""
    return Counter(_VARYING.sub("*", p.splitlines()[0] if p else p)[:90] for p in problems)


_VARYING = re.compile(r"o[\w-]{20,}|p_[\w-]+|\b(?!\d{5}\b)[\w:.+-]*\d[\w:.+-]*")  # errcodes stay


# The campaign ----------------------------------------------------------------------------------


class FaultCampaign:
    """One run: `await run()` returns the Figures (problems empty when every promise held).
    Raises MountUnavailable before anything starts when the tmpfs cannot be mounted."""

    def __init__(self, settings: Settings, workdir: pathlib.Path,
                 keep: pathlib.Path | None = None) -> None:
        self.s = settings
        self.workdir = workdir
        self.keep = keep
        self.rng = random.Random(f"faultcampaign:{settings.seed}")
        self.fig = Figures(settings=settings)
        self.fake = FakeWeChat(users=settings.users, seed=settings.seed,
                               latency_s=settings.latency_s)
        self.ledger = Ledger([p.follows for p in self.fake.people])
        self.t0 = time.time()
        self._outage_window = (math.inf, math.inf)  # (start, end), time.time()
        self._disk_window = (math.inf, math.inf)

    async def run(self) -> Figures:
        started = time.monotonic()
        fs = ScratchFilesystem(self.workdir / "disk", self.s.fs_size_mb)
        with fs, SandboxThread(self.fake) as sandbox:
            self.fs, self.sandbox = fs, sandbox
            self.db_path = fs.path / "wxd.db"
            rig = Rig.start(self.workdir, sandbox, self.ledger, self.rng, f"fc{self.s.seed}-",
                            self.fig, self.s.daemon_config(), self.s.seed,
                            database=self.db_path)
            self.daemon, self.admin, self.sender, self.load = (rig.daemon, rig.admin,
                                                               rig.sender, rig.load)
            try:
                await self._run(rig.ports)
            finally:
                rig.close()
                self._keep_files()
        self.fig.duration_s = time.monotonic() - started
        return self.fig

    # Timeline -----------------------------------------------------------------------------

    def _since(self, at: float) -> float:
        return round(at - self.t0, 2)

    async def _mark(self, name: str, at: float | None = None) -> float:
        at = time.time() if at is None else at
        self.fig.timeline[name] = self._since(at)
        status, body = await self.admin.call("GET", "/v1/backfill")
        if status == 200 and isinstance(body, dict):
            self.fig.backfill_at[name] = str(body.get("state"))
        return at

    def _first_answer(self, status: int, since: float, channels: tuple[str, ...]) -> float | None:
        return next((a.at for a in self.load.answers
                     if a.at >= since and a.status == status and a.channel in channels), None)

    # The run ------------------------------------------------------------------------------

    async def _run(self, ports: Ports) -> None:
        fake, sandbox, s = self.fake, self.sandbox, self.s
        sandbox.call(lambda: fake.configure_webhook(ports.webhook_url, mode="safe", retries=True))
        self.daemon.spawn()
        await self.daemon.wait_ready()
        await run_backfill(self.admin)  # the first sync, unpaced: pushes need known followers
        self.pace = sandbox.call(lambda: fake.script_fault(
            BATCHGET, f"delay:{s.batchget_delay_s}", None))
        self.t0 = time.time()
        await self.admin.ok("POST", "/v1/backfill")
        await self._mark("backfill re-sync started")
        self.load.start(s.event_lanes, s.event_rate, s.push_lanes, s.push_rate)
        try:
            await asyncio.sleep(s.warmup_s)
            await self._outage()
            await self._disk_full()
            await asyncio.sleep(s.tail_s)
        finally:
            await self.load.stop()
        await self._mark("load stopped")
        await self._settle()
        self._check()
        if not self.daemon.running:
            self.fig.problems.append(f"the daemon exited on its own:\n{self.daemon.log_tail()}")
        else:
            self.fig.stop_exit_code, _ = self.daemon.terminate()
            if self.fig.stop_exit_code != 0:
                self.fig.problems.append(f"SIGTERM exit code {self.fig.stop_exit_code}:\n"
                                         f"{self.daemon.log_tail()}")
        self.fig.starts = self.daemon.starts
        self.fig.integrity_after_stop = read_db(self.db_path).integrity
        if self.fig.integrity_after_stop != "ok":
            self.fig.problems.append(f"integrity_check after the stop: "
                                     f"{self.fig.integrity_after_stop}")

    async def _outage(self) -> None:
        fake = self.fake

        def refuse() -> FaultRule:
            # The refusal must come before the pace rule (the first live rule fires): the pace
            # rule is added again behind it.
            fake.clear_faults(rule_id=self.pace.id)
            rule = fake.refuse_tokens(OUTAGE_ERRCODE, business=True, seconds=self.s.outage_s)
            self.pace = fake.script_fault(BATCHGET, f"delay:{self.s.batchget_delay_s}", None)
            return rule

        rule = self.sandbox.call(refuse)
        begun = await self._mark(f"outage start ({OUTAGE_ERRCODE} to every call)")
        assert rule.until is not None
        await asyncio.sleep(max(0.0, rule.until - time.time()))
        await wait_until(lambda: self._rule_over(rule.id), 10.0, "the emulator to recover")
        ended = await self._mark("outage end (the emulator recovers)", rule.until)

        def sent_since() -> float | None:
            return next((c.at for c in fake.calls if c.path == SEND and c.at >= ended
                         and c.errcode == 0 and c.fault is None), None)

        async def pushes_flow() -> float | None:
            return self.sandbox.call(sent_since)

        try:
            at = await wait_until(pushes_flow, self.s.recovery_timeout_s,
                                  "a push sent after the outage", 0.2)
            await self._mark("outage recovery: first push sent again", at)
        except TimeoutError as exc:
            self.fig.problems.append(f"{exc} (outage ended at +{self._since(ended)} s)")
        self._outage_window = (begun, ended)

    async def _rule_over(self, rule_id: int) -> bool:
        return all(r.id != rule_id for r in self.sandbox.call(self.fake.faults.live))

    async def _disk_full(self) -> None:
        if not checkpoint_truncate(self.db_path):
            self.fig.problems.append("the TRUNCATE checkpoint before the ballast stayed busy")
        self.fig.ballast_mb = self.fs.fill() / 2**20
        full = await self._mark("disk full start (ballast written)")

        async def refused() -> float | None:
            return self._first_answer(503, full, ("webhook", "push"))

        try:
            first = await wait_until(refused, self.s.bite_timeout_s, "a 503 on the full disk")
            await self._mark("first 503", first)
            # /healthz says storage_unavailable until a write succeeds, and on a full disk a
            # small one sometimes does (in space a failed larger one allocated): a figure only.
            until = time.monotonic() + self.s.disk_full_s
            while time.monotonic() < until:
                _, health = await self.admin.call("GET", "/healthz")
                self.fig.healthz_full[str(health.get("status") if isinstance(health, dict)
                                          else health)] += 1
                await asyncio.sleep(0.25)
        except TimeoutError as exc:
            self.fig.problems.append(f"{exc}: the fault did not bite (free "
                                     f"{self.fs.free_bytes()} bytes)")
        self.fs.empty()
        emptied = await self._mark("disk full end (ballast deleted)")

        async def recovered() -> float | None:
            at = self._first_answer(200, emptied, ("webhook",))
            if at is None:
                return None
            status, _ = await self.admin.call("GET", "/healthz")
            return at if status == 200 else None

        try:
            at = await wait_until(recovered, self.s.bite_timeout_s,
                                  "an event acknowledged and /healthz ok after the disk emptied")
            await self._mark("disk recovery: first event acknowledged", at)
        except TimeoutError as exc:
            self.fig.problems.append(str(exc))
        self._disk_window = (full, emptied)

    async def _settle(self) -> None:
        """Resend what is unanswered, then wait until the queues are drained and the backfill
        has ended (done or failed; a paused backfill resumes by itself), twice in a row."""
        deadline = time.monotonic() + self.s.settle_timeout_s
        try:
            await wait_until(self.load.resend_all, self.s.settle_timeout_s,
                             "every request answered")
        except TimeoutError as exc:
            self.fig.problems.append(str(exc))
        stable = [0]

        async def settled() -> bool:
            drained = await queue_drained(self.admin)
            status, backfill = await self.admin.call("GET", "/v1/backfill")
            ended = status == 200 and backfill.get("state") in ("done", "failed")
            stable[0] = stable[0] + 1 if drained is not None and ended else 0
            return stable[0] >= 2

        try:
            await wait_until(settled, max(5.0, deadline - time.monotonic()),
                             "drained queues and an ended backfill", 0.5)
            await self._mark("settled: queues drained, backfill ended")
        except TimeoutError as exc:
            _, stats = await self.admin.call("GET", "/v1/stats")
            _, backfill = await self.admin.call("GET", "/v1/backfill")
            self.fig.problems.append(f"{exc}: stats {stats}; backfill {backfill}")

    # Accounting ---------------------------------------------------------------------------

    def _check(self) -> None:
        """Every promise, read while the daemon still runs (the file read-only, WAL)."""
        fig, fake = self.fig, self.fake
        state, received, problems = check_run(self.db_path, self.sandbox, self.ledger)
        fig.problems.extend(problems)
        fig.integrity = state.integrity
        fig.final_statuses = state.push_statuses()
        fig.failed_by_errcode = Counter(str(row["errcode"]) for row in state.pushes.values()
                                        if row["status"] == "failed")
        fig.messages_accepted = sum(len(v) for v in received.values())
        fig.duplicates = sum(len(v) - 1 for v in received.values() if len(v) > 1)
        fig.events_processed = sum(1 for e in self.ledger.events if e.acked and
                                   state.event_jobs.get(e.dedupe_key, ("-", None))[0] == "done")
        fig.followers_stored = sum(1 for row in state.followers.values() if row["subscribed"])
        fig.sandbox_followers = sum(1 for p in fake.people if p.follows)
        fig.leftover = self._leftover(state)
        if any(fig.leftover.values()):
            fig.problems.append(f"left over: {fig.leftover}")
        fig.backfill = state.backfill or {}
        if fig.backfill.get("state") != "done":
            fig.problems.append(f"the backfill ended {fig.backfill.get('state')}: "
                                f"{fig.backfill.get('last_error')}")
        elif not fig.backfill.get("complete") or fig.backfill.get("run") != 2:
            fig.problems.append(f"the backfill re-sync is done but not a complete run 2: "
                                f"{fig.backfill}")
        if fig.followers_stored != fig.sandbox_followers:
            fig.problems.append(f"{fig.followers_stored} followers subscribed in the db, "
                                f"{fig.sandbox_followers} in the emulator")
        calls = self.sandbox.call(lambda: list(fake.calls))
        fig.refused_calls = Counter(c.path for c in calls if c.fault == str(OUTAGE_ERRCODE))
        first = min((c.at for c in calls if c.fault == str(OUTAGE_ERRCODE)), default=None)
        if first is not None:
            fig.timeline[f"first call answered {OUTAGE_ERRCODE}"] = self._since(first)
        else:
            fig.problems.append(f"no call met the outage: nothing was answered {OUTAGE_ERRCODE}")
        _, ended = self._outage_window
        token = min((c.at for c in calls if c.path in TOKEN_PATHS and c.at >= ended
                     and c.errcode == 0 and c.fault is None), default=None)
        if token is not None:
            fig.timeline["first token fetch after the outage"] = self._since(token)
        fig.answers_503 = Counter(a.channel for a in self.load.answers if a.status == 503)
        full, emptied = self._disk_window
        stray = [a for a in self.load.answers if a.status is not None and a.status >= 500
                 and not full <= a.at <= emptied + 2.0]
        if stray:
            fig.problems.append(f"{len(stray)} 5xx answers outside the disk-full window, the "
                                f"first: {stray[0].channel} {stray[0].status} at "
                                f"+{self._since(stray[0].at)} s")

    @staticmethod
    def _leftover(state: DbState) -> dict[str, int]:
        statuses = state.push_statuses()
        return {"pushes sending": statuses["sending"], "pushes queued": statuses["queued"],
                "jobs leased": state.jobs["leased"], "jobs queued": state.jobs["queued"],
                "backfill running": int((state.backfill or {}).get("state") == "running")}

    def _keep_files(self) -> None:
        """With --keep: the database files (before the tmpfs goes) and the log."""
        if self.keep is None:
            return
        self.keep.mkdir(parents=True, exist_ok=True)
        for path in [*self.fs.path.glob("wxd.db*"), self.workdir / "wxd.log",
                     self.workdir / "wxd.conf"]:
            with contextlib.suppress(OSError):
                shutil.copy2(path, self.keep / path.name)


def run_campaign(settings: Settings, workdir: pathlib.Path,
                 keep: pathlib.Path | None = None) -> Figures:
    """One campaign in `workdir`; Figures with `skipped` set when a tmpfs cannot be mounted."""
    try:
        return asyncio.run(FaultCampaign(settings, workdir, keep).run())
    except MountUnavailable as exc:
        return Figures(settings=settings, skipped=str(exc))


@contextlib.contextmanager
def _workdir() -> Iterator[pathlib.Path]:
    with tempfile.TemporaryDirectory(prefix="wxd-faultcampaign-") as tmp:
        yield pathlib.Path(tmp)


def results(fig: Figures) -> list[Result]:
    name = f"fault campaign ({fig.settings.form})"
    if fig.skipped is not None:
        return [Result(name, "skipped", 0, notes={"reason": fig.skipped})]
    notes: dict[str, object] = {"problems": fig.problems[:5]} if fig.problems else {}
    return [
        Result(name, "events acknowledged", fig.events_acked),
        Result(name, "pushes acknowledged", fig.pushes_acked),
        Result(name, "run time s", fig.duration_s, higher_is_better=False),
        Result(name, "promises broken", len(fig.problems), higher_is_better=False,
               target="0 (no restart, nothing lost, none doubled)", met=not fig.problems,
               notes=notes),
    ]


def run(quick: bool) -> list[Result]:
    settings = Settings.ci() if quick else Settings.full()
    with _workdir() as tmp:
        fig = run_campaign(settings, tmp)
    print(fig.summary())
    return results(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="the CI form: 8 s outage, 4 s disk full, short wxd timers "
                             "(default: 60 s and 20 s, wxd's default timers)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--keep", metavar="DIR", help="copy the db, log and config to DIR")
    args = parser.parse_args(argv)
    # The sandbox logs every refused delivery report; only errors matter here.
    logging.basicConfig(level=logging.ERROR, format="%(levelname)s %(name)s: %(message)s")
    settings = Settings.ci(args.seed) if args.quick else Settings.full(args.seed)
    with _workdir() as tmp:
        fig = run_campaign(settings, tmp, pathlib.Path(args.keep) if args.keep else None)
    print(fig.summary())
    if fig.skipped is not None:
        return SKIP_EXIT_CODE
    print()
    print(format_table(results(fig)))
    return 1 if fig.problems else 0


if __name__ == "__main__":
    sys.exit(main())
