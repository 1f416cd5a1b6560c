"""The proof harness (bench.killloop, bench.faultcampaign, tests/test_graceful_stop.py,
tests/test_killloop.py, tests/test_faultcampaign.py): `wxd run` as a subprocess with its log in
a file and a config for a sandbox, an async admin client, polling with deadlines, the load
generator (webhook events and pushes, resent until answered, with a Ledger of what was
acknowledged), and read-only checks of the database file and of what the sandbox received.
No fixed sleeps decide anything here. Imports nothing from tests/.
"""

from __future__ import annotations

import asyncio
import json
import os
import pathlib
import random
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import IO, Any, TypeVar

from tornado.httpclient import AsyncHTTPClient, HTTPClientError, HTTPRequest

from bench.common import free_port
from wxd.sandbox import NOTICE_TEMPLATE_ID, SandboxThread, SignedRequest, WebhookSender
from wxd.wechat.messages import parse_message, parse_xml

T = TypeVar("T")

READY_TIMEOUT_S = 30.0  # a loaded 2-core CI machine can take a while to import and migrate
ADMIN_TOKEN = "proof-admin-token-0123456789"


def notice_push(to_oa_openid: str, key: str | None = None) -> dict[str, Any]:
    """A POST /v1/pushes body to an OA openid with the sandbox's NOTICE template."""
    data = {"thing1": f"proof {key or ''}".strip()[:20], "time2": "2026-11-29 12:00"}
    body: dict[str, Any] = {"to": {"oa_openid": to_oa_openid}, "template_id": NOTICE_TEMPLATE_ID,
                            "data": data}
    if key is not None:
        body["idempotency_key"] = key
    return body


@dataclass(frozen=True)
class Ports:
    admin: int
    webhook: int

    @classmethod
    def free(cls) -> Ports:
        return cls(free_port(), free_port())

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.admin}"

    @property
    def webhook_url(self) -> str:
        return f"http://127.0.0.1:{self.webhook}/wechat"


def config_text(database: str, sandbox: SandboxThread, ports: Ports,
                extra: Mapping[str, Mapping[str, object]] | None = None) -> str:
    """wxd.conf text for a daemon against `sandbox` (its credentials and base URL) on `ports`,
    unpaced backfill; `extra` adds or overrides keys per section."""
    c = sandbox.fake.credentials
    sections: dict[str, dict[str, object]] = {
        "wxd": {"database": database, "shutdown_timeout_s": 5, "log_level": "info"},
        "webhook": {"listen": f"127.0.0.1:{ports.webhook}", "path": "/wechat",
                    "token": c.webhook_token, "encoding_aes_key": c.encoding_aes_key},
        "admin": {"listen": f"127.0.0.1:{ports.admin}", "token": ADMIN_TOKEN},
        "official_account": {"appid": c.oa_appid, "secret": c.oa_secret},
        "mini_program": {"appid": c.mp_appid, "secret": c.mp_secret},
        "wechat": {"api_base": sandbox.base_url},
        "backfill": {"rate_per_s": 0},
    }
    for name, values in (extra or {}).items():
        sections.setdefault(name, {}).update(values)
    return "\n".join(f"[{name}]\n" + "".join(f"{key} = {value}\n" for key, value in values.items())
                     for name, values in sections.items())


def write_config(directory: pathlib.Path, sandbox: SandboxThread, ports: Ports,
                 extra: Mapping[str, Mapping[str, object]] | None = None,
                 database: pathlib.Path | None = None) -> pathlib.Path:
    """wxd.conf in `directory` for `sandbox`, fixed ports (restarts reuse them), db `database`
    (default: wxd.db in `directory`)."""
    path = directory / "wxd.conf"
    db = database if database is not None else directory / "wxd.db"
    path.write_text(config_text(str(db), sandbox, ports, extra))
    return path


class DaemonProcess:
    """`python -m wxd run -c CONF`, restartable; stdout and stderr go to `log_path` (appended,
    one marker line per start), so a long run cannot block on a full pipe."""

    def __init__(self, conf: pathlib.Path, ports: Ports, log_path: pathlib.Path) -> None:
        self.conf = conf
        self.ports = ports
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self.kills = 0
        self._log: IO[bytes] | None = None

    def spawn(self) -> None:
        """Start the process (does not wait for it to listen)."""
        if self.proc is not None and self.proc.poll() is None:
            raise RuntimeError("the daemon is already running")
        self.starts += 1
        if self._log is None:
            self._log = open(self.log_path, "ab")  # closed in close()
        self._log.write(f"==== start {self.starts} at {time.time():.3f}\n".encode())
        self._log.flush()
        self.proc = subprocess.Popen([sys.executable, "-m", "wxd", "run", "-c", str(self.conf)],
                                     stdout=self._log, stderr=self._log, env=dict(os.environ))

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def _check_alive(self) -> None:
        if self.proc is None:
            raise RuntimeError("the daemon was never started")
        if self.proc.poll() is not None:
            raise RuntimeError(f"the daemon exited with {self.proc.returncode} while starting:\n"
                               f"{self.log_tail()}")

    async def wait_ready(self, timeout_s: float = READY_TIMEOUT_S) -> float:
        """Wait until the webhook listener (started last) accepts; returns seconds waited.
        Raises RuntimeError if the process exits, TimeoutError at the deadline."""
        started = time.monotonic()
        deadline = started + timeout_s
        while True:
            self._check_alive()
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", self.ports.webhook)
            except OSError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"daemon not ready after {timeout_s} s:\n"
                                       f"{self.log_tail()}") from None
                await asyncio.sleep(0.05)
                continue
            writer.close()
            await writer.wait_closed()
            return time.monotonic() - started

    def kill(self) -> None:
        """SIGKILL and reap (the flock on the database is released with the process)."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.kills += 1
        self.proc.wait(timeout=30)

    def terminate(self, timeout_s: float = 60.0) -> tuple[int, float]:
        """SIGTERM; returns (exit code, seconds from the signal to the exit)."""
        assert self.proc is not None
        started = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout=timeout_s)
        return code, time.monotonic() - started

    def log_text(self) -> str:
        if self._log is not None:
            self._log.flush()
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def close(self) -> None:
        """Kill a process still running (a failed test) and close the log. Idempotent."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)
        if self._log is not None:
            self._log.close()
            self._log = None


class AdminClient:
    """JSON calls to the admin API. `call` never raises for transport problems: the status is
    None when no answer came (daemon down, killed mid-request, timeout)."""

    def __init__(self, base_url: str, token: str = ADMIN_TOKEN, timeout_s: float = 15.0) -> None:
        self.base_url = base_url
        self._token = token
        self._timeout_s = timeout_s
        self._http = AsyncHTTPClient(force_instance=True, max_clients=32)

    async def call(self, method: str, path: str, body: Any = None) -> tuple[int | None, Any]:
        request = HTTPRequest(
            self.base_url + path, method=method,
            body=json.dumps(body).encode() if body is not None else (b"" if method == "POST"
                                                                    else None),
            headers={"Authorization": f"Bearer {self._token}",
                     "Content-Type": "application/json"},
            request_timeout=self._timeout_s, connect_timeout=self._timeout_s)
        try:
            response = await self._http.fetch(request, raise_error=False)
        except (HTTPClientError, OSError):
            return None, None
        if response.code == 599:
            return None, None
        try:
            return response.code, json.loads(response.body or b"null")
        except ValueError:
            return response.code, None

    async def ok(self, method: str, path: str, body: Any = None) -> Any:
        """A call that must answer 2xx; AssertionError otherwise."""
        status, value = await self.call(method, path, body)
        assert status is not None and 200 <= status < 300, (method, path, status, value)
        return value

    def close(self) -> None:
        self._http.close()


async def wait_until(check: Callable[[], Awaitable[T | None]], timeout_s: float, what: str,
                     interval_s: float = 0.1) -> T:
    """Poll `check` until it returns something other than None/False; TimeoutError naming
    `what` at the deadline."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = await check()
        if value is not None and value is not False:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout_s} s waiting for {what}")
        await asyncio.sleep(interval_s)


async def run_backfill(admin: AdminClient, timeout_s: float = 60.0) -> dict[str, Any]:
    """Start the follower backfill and wait until it is done; returns the status document."""
    await admin.ok("POST", "/v1/backfill")

    async def done() -> dict[str, Any] | None:
        status, body = await admin.call("GET", "/v1/backfill")
        return body if status == 200 and body.get("state") == "done" else None

    return await wait_until(done, timeout_s, "the backfill")


async def queue_drained(admin: AdminClient) -> dict[str, Any] | None:
    """The /v1/stats document when no push is queued or sending and no event job is pending."""
    status, stats = await admin.call("GET", "/v1/stats")
    if status != 200:
        return None
    pushes = stats["pushes"]["by_status"]
    jobs = stats.get("event_jobs", {})
    busy = pushes["queued"] + pushes["sending"] + jobs.get("queued", 0) + jobs.get("leased", 0)
    return stats if busy == 0 else None


# After the run: what the database and the sandbox hold -------------------------------------


@dataclass(frozen=True)
class DbState:
    """A read-only snapshot of the database file (read after the daemon exited)."""

    pushes: dict[str, dict[str, Any]]          # id -> row
    inbox_keys: Counter[str]                   # dedupe_key -> rows (the UNIQUE makes it ≤ 1)
    followers: dict[str, dict[str, Any]]       # oa_openid -> row
    jobs: Counter[str]                         # state -> count
    failed_jobs: list[str]                     # last_error of failed jobs
    integrity: str
    event_jobs: dict[str, tuple[str, str | None]] = field(default_factory=dict)
    # ^ inbox dedupe_key -> (its event job's state, last_error)
    backfill: dict[str, Any] | None = None     # the backfill row (None before the first run)

    def push_statuses(self) -> Counter[str]:
        return Counter(row["status"] for row in self.pushes.values())


def read_db(path: pathlib.Path) -> DbState:
    """The snapshot; read-only, so it may also be taken while the daemon runs (WAL)."""
    uri = f"file:{path}?mode=ro"
    conn = sqlite3.connect(uri, uri=True)
    conn.row_factory = sqlite3.Row
    try:
        integrity = str(conn.execute("PRAGMA integrity_check").fetchone()[0])
        pushes = {row["id"]: dict(row) for row in conn.execute("SELECT * FROM pushes")}
        inbox_keys = Counter(str(row[0]) for row in conn.execute("SELECT dedupe_key FROM inbox"))
        followers = {row["oa_openid"]: dict(row) for row in conn.execute("SELECT * FROM followers")}
        jobs = Counter({str(row[0]): int(row[1]) for row in
                        conn.execute("SELECT state, COUNT(*) FROM jobs GROUP BY state")})
        failed = [str(row[0]) for row in
                  conn.execute("SELECT last_error FROM jobs WHERE state = 'failed'")]
        event_jobs = {str(row[0]): (str(row[1]), row[2]) for row in conn.execute(
            "SELECT inbox.dedupe_key, jobs.state, jobs.last_error FROM jobs JOIN inbox"
            " ON inbox.id = CAST(json_extract(jobs.payload, '$.inbox_id') AS INTEGER)")}
        backfill_row = conn.execute("SELECT * FROM backfill WHERE id = 1").fetchone()
    finally:
        conn.close()
    return DbState(pushes, inbox_keys, followers, jobs, failed, integrity, event_jobs,
                   dict(backfill_row) if backfill_row is not None else None)


def sandbox_messages(sandbox: SandboxThread) -> dict[str, list[tuple[str, int]]]:
    """client_msg_id -> [(oa_openid, msgid)] of every template message the sandbox accepted."""
    fake = sandbox.fake

    def collect() -> dict[str, list[tuple[str, int]]]:
        found: dict[str, list[tuple[str, int]]] = {}
        for person in fake.people:
            for message in fake.inbox(person.oa_openid):
                key = str(message.get("client_msg_id"))
                found.setdefault(key, []).append((person.oa_openid, int(message["msgid"])))
        return found

    return sandbox.call(collect)


def check_exactly_once(db: DbState, received: Mapping[str, list[tuple[str, int]]]) -> list[str]:
    """The client_msg_id promise, for every push in the database: a sent/delivered push reached
    its person exactly once with the msgid wxd stored; any other push never reached anyone; and
    WeChat holds no message wxd does not know. Returns the problems found."""
    problems: list[str] = []
    by_client_msg_id = {row["client_msg_id"]: row for row in db.pushes.values()}
    owner = {str(msgid): key for key, got in received.items() for _, msgid in got}
    for push_id, row in db.pushes.items():
        got = received.get(row["client_msg_id"], [])
        if row["status"] in ("sent", "delivered"):
            if len(got) != 1:
                problems.append(f"push {push_id} is {row['status']} but its person received it "
                                f"{len(got)} times (wxd's msgid {row['msgid']} is WeChat's "
                                f"message for client_msg_id {owner.get(str(row['msgid']))})")
            elif got[0] != (row["oa_openid"], int(row["msgid"])):
                problems.append(f"push {push_id}: stored recipient/msgid "
                                f"{(row['oa_openid'], row['msgid'])} != WeChat's {got[0]}")
        elif len(got) > 1:
            problems.append(f"push {push_id} ({row['status']}) was received {len(got)} times")
        elif got and row["status"] == "failed":
            problems.append(f"push {push_id} failed ({row['errcode']}) but WeChat accepted it")
    # Messages no push accounts for (e.g. sent without client_msg_id) first: they explain others.
    strangers = [f"WeChat accepted {len(got)} message(s) with client_msg_id {key} that wxd "
                 "does not know" for key, got in received.items() if key not in by_client_msg_id]
    return strangers + problems


# The ledger and the load generator: what was sent and what was acknowledged ------------------


@dataclass
class SentEvent:
    """A subscribe/unsubscribe POSTed to the webhook; resent unchanged until `success`."""

    person: int
    subscribe: bool
    create_time: int
    fields: dict[str, str | int]
    request: SignedRequest
    dedupe_key: str
    built_at: float
    acked: bool = False
    in_flight: bool = False


@dataclass
class SentPush:
    """A POST /v1/pushes; resent with the same idempotency_key until it gets an answer."""

    key: str
    person: int
    first_try_at: float
    push_id: str | None = None
    rejected: str | None = None
    in_flight: bool = False

    @property
    def pending(self) -> bool:
        return self.push_id is None and self.rejected is None


class Ledger:
    """The load generator's side of the truth (people by sandbox index). It is the only writer
    of the sandbox's follow state, so `follows` mirrors the sandbox and `changes` dates it."""

    def __init__(self, follows: list[bool]) -> None:
        self.follows = list(follows)
        self.changes: dict[int, list[tuple[float, bool]]] = {}
        self.events: list[SentEvent] = []
        self.last_event: dict[int, SentEvent] = {}
        self.pushes: list[SentPush] = []
        self._busy: set[int] = set()  # people with an event not yet acknowledged

    def pick_event_person(self, rng: random.Random, now_s: int) -> int | None:
        """Someone with no unanswered event and no event this second (CreateTime is in whole
        seconds, and it orders a person's events)."""
        candidates = [i for i in range(len(self.follows)) if i not in self._busy
                      and (i not in self.last_event or self.last_event[i].create_time < now_s)]
        return rng.choice(candidates) if candidates else None

    def add_event(self, event: SentEvent, at: float) -> None:
        self.events.append(event)
        self.last_event[event.person] = event
        self._busy.add(event.person)
        self.follows[event.person] = event.subscribe
        self.changes.setdefault(event.person, []).append((at, event.subscribe))

    def event_acked(self, event: SentEvent) -> None:
        event.acked = True
        self._busy.discard(event.person)

    def next_pending_event(self) -> SentEvent | None:
        return next((e for e in self.events if not e.acked and not e.in_flight), None)

    def pick_push_person(self, rng: random.Random) -> int | None:
        for _ in range(50):
            person = rng.randrange(len(self.follows))
            if self.follows[person]:
                return person
        return None

    def add_push(self, key: str, person: int, at: float) -> SentPush:
        push = SentPush(key, person, at)
        self.pushes.append(push)
        return push

    def next_pending_push(self) -> SentPush | None:
        return next((p for p in self.pushes if p.pending and not p.in_flight), None)

    def left_sandbox_since(self, person: int, since: float) -> bool:
        """True if the person did not follow at `since` or unfollowed after it (43004 is then a
        legitimate answer to a push first tried at `since`)."""
        changes = self.changes.get(person, [])
        before = [follows for at, follows in changes if at <= since]
        if before and not before[-1]:
            return True
        if not changes and not self.follows[person]:
            return True
        return any(not follows for at, follows in changes if at > since)


@dataclass(frozen=True)
class Answer:
    """One answer the load generator got: `channel` "webhook" or "push", `status` None when no
    answer came; `at` is time.time()."""

    at: float
    channel: str
    status: int | None


@dataclass
class LoadCounts:
    """What the load generator sent and what was acknowledged (the proofs' figures extend it)."""

    events_sent: int = 0
    events_acked: int = 0
    event_resends: int = 0
    pushes_acked: int = 0
    push_resends: int = 0
    pushes_rejected: Counter[str] = field(default_factory=Counter)


class LoadGenerator:
    """The proofs' load, on the caller's asyncio loop: event lanes POST signed subscribe or
    unsubscribe events to the webhook as WeChat would (the sandbox's follow state is changed
    first, so user/info agrees), resending an unanswered event unchanged until it gets
    `success` (more persistently than WeChat's three retries, so that every event ends
    acknowledged and the follower table can be checked exactly); push lanes POST /v1/pushes
    with a unique idempotency_key (`key_prefix` + a number) to people who follow, resending an
    unanswered one with the same key. Counts go to `counts`; every answer is appended to
    `answers` (the proofs' timelines read it)."""

    def __init__(self, sandbox: SandboxThread, ledger: Ledger, sender: WebhookSender,
                 admin: AdminClient, rng: random.Random, key_prefix: str,
                 counts: LoadCounts) -> None:
        self.sandbox = sandbox
        self.fake = sandbox.fake
        self.ledger = ledger
        self.sender = sender
        self.admin = admin
        self.rng = rng
        self.key_prefix = key_prefix
        self.counts = counts
        self.answers: list[Answer] = []
        self._lanes: list[asyncio.Task[None]] = []
        self._stopping = False

    def start(self, event_lanes: int, event_rate: float, push_lanes: int,
              push_rate: float) -> None:
        """Start the lanes: `event_rate` new events and `push_rate` new pushes per second in
        all (a lane resends its unanswered requests before it sends anything new)."""
        self._stopping = False
        self._lanes = [asyncio.create_task(self._lane(self._event_step, event_lanes, event_rate))
                       for _ in range(event_lanes)]
        self._lanes += [asyncio.create_task(self._lane(self.push_step, push_lanes, push_rate))
                        for _ in range(push_lanes)]

    async def stop(self) -> None:
        """Stop the lanes (each finishes its request in flight); re-raise a lane's exception."""
        self._stopping = True
        await asyncio.gather(*self._lanes, return_exceptions=True)
        for lane in self._lanes:
            if lane.exception() is not None:
                raise lane.exception()  # type: ignore[misc]
        self._lanes = []

    async def resend_all(self) -> bool:
        """One round of resends; True when nothing is left unanswered."""
        while (event := self.ledger.next_pending_event()) is not None:
            self.counts.event_resends += 1
            await self.deliver(event)
            if not event.acked:
                return False
        while self.ledger.next_pending_push() is not None:
            await self.push_step()
            if self.ledger.next_pending_push() is not None:
                return False
        return True

    async def _lane(self, step: Callable[[], Awaitable[None]], lanes: int, rate: float) -> None:
        interval = lanes / rate
        while not self._stopping:
            began = time.monotonic()
            await step()
            await asyncio.sleep(max(0.0, interval - (time.monotonic() - began)))

    async def _event_step(self) -> None:
        pending = self.ledger.next_pending_event()
        if pending is not None:
            self.counts.event_resends += 1
            await self.deliver(pending)
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
        self.counts.events_sent += 1
        await self.deliver(event)

    async def deliver(self, event: SentEvent) -> None:
        """POST the event once (rebuilt with a fresh timestamp when it has grown old)."""
        if time.time() - event.built_at > 200:  # keep the timestamp inside the replay window
            event.request, event.built_at = self.sender.build(event.fields), time.time()
        event.in_flight = True
        try:
            delivery = await self.sender.send(event.request)
        finally:
            event.in_flight = False
        self.answers.append(Answer(time.time(), "webhook", delivery.status))
        if delivery.status == 200 and delivery.body == b"success":
            self.ledger.event_acked(event)
            self.counts.events_acked += 1

    async def push_step(self) -> None:
        """Resend the oldest unanswered push, or POST a new one."""
        push = self.ledger.next_pending_push()
        if push is not None:
            self.counts.push_resends += 1
        else:
            person = self.ledger.pick_push_person(self.rng)
            if person is None:
                return
            push = self.ledger.add_push(f"{self.key_prefix}{len(self.ledger.pushes)}", person,
                                        time.time())
        push.in_flight = True
        try:
            status, body = await self.admin.call(
                "POST", "/v1/pushes",
                notice_push(self.fake.people[push.person].oa_openid, push.key))
        finally:
            push.in_flight = False
        self.answers.append(Answer(time.time(), "push", status))
        if status in (200, 202) and isinstance(body, dict) and "id" in body:
            push.push_id = str(body["id"])
            self.counts.pushes_acked += 1
        elif status is not None and 400 <= status < 500:
            code = body["error"]["code"] if isinstance(body, dict) and "error" in body else "?"
            push.rejected = f"{status} {code}"
            self.counts.pushes_rejected[f"{status} {code}"] += 1


@dataclass
class Rig:
    """One proof's daemon with its clients: the `wxd run` process, an admin API client, a
    WeChat-side signed sender and the load generator. `close()` stops them all."""

    ports: Ports
    daemon: DaemonProcess
    admin: AdminClient
    sender: WebhookSender
    load: LoadGenerator

    @classmethod
    def start(cls, workdir: pathlib.Path, sandbox: SandboxThread, ledger: Ledger,
              rng: random.Random, key_prefix: str, counts: LoadCounts,
              extra: Mapping[str, Mapping[str, object]], seed: int,
              database: pathlib.Path | None = None) -> Rig:
        ports = Ports.free()
        conf = write_config(workdir, sandbox, ports, extra, database=database)
        daemon = DaemonProcess(conf, ports, workdir / "wxd.log")
        admin = AdminClient(ports.admin_url)
        # A seed of its own: the sandbox's report sender draws nonces from seed:webhook.
        sender = WebhookSender(ports.webhook_url, sandbox.fake.credentials, "safe",
                               clock=sandbox.fake.clock, seed=seed + 7919)
        load = LoadGenerator(sandbox, ledger, sender, admin, rng, key_prefix, counts)
        return cls(ports, daemon, admin, sender, load)

    def close(self) -> None:
        self.sender.close()
        self.admin.close()
        self.daemon.close()


def check_run(db_path: pathlib.Path, sandbox: SandboxThread, ledger: Ledger
              ) -> tuple[DbState, dict[str, list[tuple[str, int]]], list[str]]:
    """Every promise of the kill loop, checked against the database file (daemon stopped) and
    the sandbox. Returns (db state, what the sandbox received, problems)."""
    db = read_db(db_path)
    received = sandbox_messages(sandbox)
    people = sandbox.fake.people
    problems: list[str] = []
    if db.integrity != "ok":
        problems.append(f"PRAGMA integrity_check: {db.integrity}")
    # Pushes: acknowledged means stored; nothing stuck; failures only as WeChat decided.
    acked = {p.push_id: p for p in ledger.pushes if p.push_id is not None}
    for push_id, push in acked.items():
        row = db.pushes.get(push_id)
        if row is None:
            problems.append(f"acknowledged push {push_id} ({push.key}) is not in the database")
        elif row["status"] == "failed":
            if row["errcode"] != 43004 or not ledger.left_sandbox_since(push.person,
                                                                        push.first_try_at):
                problems.append(f"push {push_id} ({push.key}) ended failed: errcode "
                                f"{row['errcode']}, error_code {row['error_code']}, after "
                                f"{row['attempts']} attempts: {row['error']}")
        elif row["status"] not in ("sent", "delivered"):
            problems.append(f"push {push_id} ({push.key}) ended {row['status']} (errcode "
                            f"{row['errcode']}, {row['attempts']} attempts)")
    for push_id, row in db.pushes.items():
        if push_id not in acked:
            problems.append(f"push {push_id} ({row['idempotency_key']}) is stored but was never "
                            "acknowledged, even to a resend with its idempotency_key")
    problems += check_exactly_once(db, received)
    # Events: each acknowledged one stored once; the follower row shows the person's last one.
    sent_keys = {e.dedupe_key for e in ledger.events}
    for event in ledger.events:
        if event.acked and db.inbox_keys[event.dedupe_key] != 1:
            problems.append(f"acknowledged event {event.dedupe_key} has "
                            f"{db.inbox_keys[event.dedupe_key]} inbox rows")
        elif event.acked and db.event_jobs.get(event.dedupe_key, ("done", None))[0] != "done":
            state, error = db.event_jobs[event.dedupe_key]
            problems.append(f"acknowledged event {event.dedupe_key}: its job is {state} "
                            f"({error})")
        if not event.acked:
            problems.append(f"event {event.dedupe_key} was never acknowledged")
    problems += [f"inbox row {key} matches no event sent" for key in db.inbox_keys
                 if key.startswith("evt:") and key not in sent_keys]
    for index, person in enumerate(people):
        row = db.followers.get(person.oa_openid)
        last = ledger.last_event.get(index)
        expected = last.subscribe if last is not None else ledger.follows[index]
        if row is None:
            if expected:
                problems.append(f"follower {person.oa_openid} is missing")
            continue
        if bool(row["subscribed"]) != expected or person.follows != expected:
            problems.append(f"follower {person.oa_openid}: subscribed={row['subscribed']}, "
                            f"last event says {expected} (sandbox {person.follows})")
        if last is not None and row["event_at"] != last.create_time:
            problems.append(f"follower {person.oa_openid}: event_at {row['event_at']} != "
                            f"last event's CreateTime {last.create_time}")
        if expected and person.unionid and row["unionid"] != person.unionid:
            problems.append(f"follower {person.oa_openid}: unionid {row['unionid']!r} != "
                            f"{person.unionid!r}")
    if db.jobs["failed"] or db.jobs["queued"] or db.jobs["leased"]:
        problems.append(f"event jobs left: {dict(db.jobs)}; failures: {db.failed_jobs[:3]}")
    return db, received, problems
