"""Socket activation (systemd/wxd.socket): LISTEN_FDS parsing, socket assignment, and restarts
under load where the test plays systemd — it holds the listening sockets and passes them to each
new `python -m wxd run` — so that nothing a client sends is refused or lost."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import pathlib
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

from bench.proof import Ports, write_config
from wxd.config import Listen
from wxd.sandbox import FakeWeChat, SandboxThread, SignedRequest, WebhookSender
from wxd.sdlisten import Passed, assign, passed_fds

# What systemd does after fork: the sockets become fds 3, 4, ... and LISTEN_PID names the
# process that exec()s wxd (exec keeps the pid).
EXEC_WITH_FDS = """
import fcntl, os, sys
fds = [int(x) for x in sys.argv[1].split(",")]
names = sys.argv[2]
high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 100) for fd in fds]
for i, fd in enumerate(high):
    os.dup2(fd, 3 + i)
    os.close(fd)
for fd in fds:
    if fd >= 3 + len(fds):
        os.close(fd)
os.environ.update(LISTEN_FDS=str(len(fds)), LISTEN_PID=str(os.getpid()), LISTEN_FDNAMES=names)
os.execv(sys.executable, [sys.executable, "-m", "wxd", "run", "-c", sys.argv[3]])
"""


def test_passed_fds_follows_the_protocol() -> None:
    env = {"LISTEN_PID": "42", "LISTEN_FDS": "2", "LISTEN_FDNAMES": "webhook:admin"}
    assert passed_fds(env, 42) == [Passed(3, "webhook"), Passed(4, "admin")]
    assert passed_fds(env, 43) == []  # meant for another process (inherited environment)
    assert passed_fds({**env, "LISTEN_FDS": "x"}, 42) == []
    assert passed_fds({**env, "LISTEN_FDS": "0"}, 42) == []
    assert passed_fds({"LISTEN_PID": "42", "LISTEN_FDS": "2"}, 42) == [Passed(3, ""), Passed(4, "")]
    assert passed_fds({}, 42) == []


@pytest.fixture
def listening() -> Iterator[list[socket.socket]]:
    socks = []
    for _ in range(3):
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        socks.append(sock)
    yield socks
    for sock in socks:
        sock.close()


def test_assign_by_name_then_by_address(listening: list[socket.socket]) -> None:
    ports = [s.getsockname()[1] for s in listening]
    wanted = {"webhook": Listen("0.0.0.0", ports[0]), "admin": Listen("127.0.0.1", ports[1])}
    # One .socket unit gives every socket the same name: told apart by address.
    passed = [Passed(os.dup(s.fileno()), "wxd.socket") for s in reversed(listening)]
    found = assign(passed, wanted)
    try:
        assert {n: s.getsockname()[1] for n, s in found.items()} == {
            "webhook": ports[0], "admin": ports[1]}
        assert all(not s.get_inheritable() and not s.getblocking() for s in found.values())
    finally:
        for sock in found.values():
            sock.close()
    # Names win over addresses.
    passed = [Passed(os.dup(listening[2].fileno()), "admin"),
              Passed(os.dup(listening[0].fileno()), "webhook")]
    found = assign(passed, wanted)
    try:
        assert found["admin"].getsockname()[1] == ports[2]
    finally:
        for sock in found.values():
            sock.close()


def test_assign_ignores_what_is_not_a_listening_socket(tmp_path: pathlib.Path) -> None:
    with open(tmp_path / "f", "wb") as handle, socket.socket() as unbound:
        passed = [Passed(os.dup(handle.fileno()), "webhook"), Passed(os.dup(unbound.fileno()), "admin")]
        assert assign(passed, {"webhook": Listen("127.0.0.1", 1), "admin": Listen("127.0.0.1", 2)}) == {}
        for item in passed:
            os.close(item.fd)


@dataclass
class Load:
    """A client sending signed webhook messages without pause, one connection each, resending
    any that got no answer (as WeChat does). Counts what happened."""

    port: int
    sender: WebhookSender
    people: list[str]
    sent: dict[int, SignedRequest] = field(default_factory=dict)
    answered: Counter[int] = field(default_factory=Counter)
    refused: int = 0
    lost: list[str] = field(default_factory=list)
    next_id: int = 1_000_000
    running: bool = True
    slowest_s: float = 0.0

    async def post(self, request: SignedRequest) -> int | None:
        """One POST on a new connection; the status, or None when no answer came."""
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        except ConnectionRefusedError:
            self.refused += 1
            return None
        phase = "write"
        try:
            target = request.url.split("/", 3)[3]
            head = (f"POST /{target} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
                    f"Content-Type: text/xml\r\nContent-Length: {len(request.body)}\r\n\r\n")
            writer.write(head.encode() + request.body)
            await writer.drain()
            phase = "read"
            answer = await asyncio.wait_for(reader.read(), timeout=60)
        except (OSError, asyncio.TimeoutError) as exc:
            self.lost.append(f"{type(exc).__name__} on {phase} at {time.time():.3f}")
            return None
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
        if not answer.startswith(b"HTTP/1.1 "):
            self.lost.append("no answer")
            return None
        return int(answer[9:12])

    async def run(self, worker: int) -> None:
        while self.running:
            self.next_id += 1
            msg_id = self.next_id
            openid = self.people[msg_id % len(self.people)]
            request = self.sender.build(self.sender.text_fields(openid, f"m{msg_id}", msg_id))
            self.sent[msg_id] = request
            while True:
                started = time.monotonic()
                status = await self.post(request)
                self.slowest_s = max(self.slowest_s, time.monotonic() - started)
                if status == 200:
                    self.answered[msg_id] += 1
                    break
                assert status is None, (msg_id, status)
                await asyncio.sleep(0.05)


class Systemd:
    """Holds the listening sockets and (re)starts `python -m wxd run` with them as fds 3, 4."""

    def __init__(self, conf: pathlib.Path, webhook: socket.socket, admin: socket.socket,
                 log: pathlib.Path) -> None:
        self.conf = conf
        self.sockets = [webhook, admin]
        self.log = open(log, "ab")  # closed in close()
        self.proc: subprocess.Popen[bytes] | None = None
        self.admin_port = admin.getsockname()[1]

    def start(self) -> None:
        fds = [s.fileno() for s in self.sockets]
        self.proc = subprocess.Popen(
            [sys.executable, "-c", EXEC_WITH_FDS, ",".join(map(str, fds)), "webhook:admin",
             str(self.conf)], pass_fds=fds, stdout=self.log, stderr=self.log)

    async def ready(self, timeout_s: float = 60.0) -> None:
        """Until /healthz answers (connecting alone proves nothing: the backlog accepts)."""
        deadline = time.monotonic() + timeout_s
        while True:
            assert self.proc is not None and self.proc.poll() is None, "wxd exited"
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", self.admin_port)
            except OSError:
                answer = b""
            else:
                try:
                    writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                    answer = await asyncio.wait_for(reader.read(), timeout=10)
                except (OSError, asyncio.TimeoutError):
                    answer = b""
                finally:
                    writer.close()
                    with contextlib.suppress(OSError):
                        await writer.wait_closed()
            if answer.startswith(b"HTTP/1.1 200"):
                return
            assert time.monotonic() < deadline, "wxd not ready"
            await asyncio.sleep(0.1)

    def stop(self, signum: int) -> int:
        assert self.proc is not None
        self.proc.send_signal(signum)
        return self.proc.wait(timeout=60)

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)
        self.log.close()


PER_STAGE = 100  # answered events between two restarts


def listen_socket() -> socket.socket:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(1024)
    return sock


def stored_msg_ids(db: pathlib.Path) -> Counter[int]:
    conn = sqlite3.connect(db)
    try:
        rows = conn.execute("SELECT message FROM inbox WHERE msg_type = 'text'").fetchall()
    finally:
        conn.close()
    return Counter(int(json.loads(row[0])["raw"]["MsgId"]) for row in rows)


def restart_under_load(tmp: pathlib.Path, signals: list[int]) -> tuple[Load, list[int]]:
    """Restart wxd once per signal in `signals` while the load runs; (load, exit codes)."""
    webhook, admin = listen_socket(), listen_socket()
    with SandboxThread(FakeWeChat(users=50, seed=5)) as sandbox:
        ports = Ports(admin.getsockname()[1], webhook.getsockname()[1])
        conf = write_config(tmp, sandbox, ports, {"webhook": {"require_encryption": "true"}})
        systemd = Systemd(conf, webhook, admin, tmp / "wxd.log")
        sender = WebhookSender(ports.webhook_url, sandbox.fake.credentials, "safe")
        load = Load(ports.webhook, sender, [p.oa_openid for p in sandbox.fake.people])
        codes: list[int] = []
        gaps: list[float] = []

        async def scenario() -> None:
            systemd.start()
            await systemd.ready()
            workers = [asyncio.create_task(load.run(i)) for i in range(4)]
            try:
                for signum in signals:
                    before = sum(load.answered.values())
                    while sum(load.answered.values()) < before + PER_STAGE:
                        await asyncio.sleep(0.02)
                    stopped = time.monotonic()
                    # In a thread: the clients go on connecting and sending meanwhile.
                    codes.append(await asyncio.get_running_loop().run_in_executor(
                        None, systemd.stop, signum))
                    systemd.start()
                    await systemd.ready()
                    gaps.append(time.monotonic() - stopped)
                before = sum(load.answered.values())
                while sum(load.answered.values()) < before + PER_STAGE:
                    await asyncio.sleep(0.02)
            finally:
                load.running = False
                await asyncio.wait_for(asyncio.gather(*workers), timeout=120)
            codes.append(systemd.stop(signal.SIGTERM))

        try:
            asyncio.run(scenario())
            print(f"{len(load.sent)} events, {len(signals)} restarts: stop-to-ready "
                  f"{max(gaps):.2f} s at most, slowest answer {load.slowest_s:.2f} s, "
                  f"{load.refused} refused, {len(load.lost)} unanswered")
        finally:
            systemd.close()
            sender.close()
            webhook.close()
            admin.close()
    return load, codes


def test_five_restarts_under_load_refuse_and_lose_nothing(tmp_path: pathlib.Path) -> None:
    load, codes = restart_under_load(tmp_path, [signal.SIGTERM] * 5)
    log = (tmp_path / "wxd.log").read_text(errors="replace")
    assert log.count("socket passed by the service manager") == 2 * 6, log[-3000:]
    assert codes == [0] * 6, log[-3000:]
    assert load.refused == 0
    warnings = [line for line in log.splitlines() if " WARNING " in line or " ERROR " in line]
    # Every request begun was answered by its process.
    assert load.lost == [], (load.lost, warnings[-20:])
    assert set(load.answered) == set(load.sent) and set(load.answered.values()) == {1}
    stored = stored_msg_ids(tmp_path / "wxd.db")
    assert stored == Counter(dict.fromkeys(load.sent, 1))  # every event stored, once


def test_crash_restarts_refuse_nothing_and_resends_store_once(tmp_path: pathlib.Path) -> None:
    load, codes = restart_under_load(tmp_path, [signal.SIGKILL, signal.SIGKILL])
    assert codes[:2] == [-signal.SIGKILL] * 2 and codes[2] == 0
    assert load.refused == 0  # the kernel kept queueing while no wxd ran
    # A request the killed process had begun gets no answer: the client resends it, as WeChat
    # does, and the dedupe key makes the resend harmless.
    assert set(load.answered) == set(load.sent)
    assert stored_msg_ids(tmp_path / "wxd.db") == Counter(dict.fromkeys(load.sent, 1))
