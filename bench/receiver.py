"""A local callback receiver that fails on command: it records every POST (headers, body, whether
the signature verified) and answers by plan: ok, 500, hang, reset, slow, redirect or big.

Used by tests/test_callbacks.py (in the test's loop), the kill -9 loop (bench.killloop, with a
seeded fault rate) and bench.bench_callbacks (`python -m bench.receiver` serves one in a
process of its own, counting ids only, and answers GET /_stats).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import socket
import sys
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import tornado.httpserver
import tornado.netutil
import tornado.web

MODES = ("ok", "500", "hang", "reset", "slow", "redirect", "big")
Verify = Callable[[str, bytes], bool]  # (Wxd-Signature header, raw body) -> valid


@dataclass
class Received:
    """One POST as it arrived, and how it was answered."""

    id: str
    type: str
    body: bytes
    headers: dict[str, str]
    verified: bool | None
    answer: str
    at: float = field(default_factory=time.time)

    def json(self) -> dict[str, object]:
        value: dict[str, object] = json.loads(self.body)
        return value


class Receiver:
    """`await start()`, then POST callbacks to `url`; `await stop()` releases hanging requests.

    Each request takes the next mode of `plan` (see fail_next), else a fault drawn with
    `fault_rate` from `fault_kinds` (seeded), else `mode`. ok → 200 "ok"; 500 → 500; hang →
    no answer until stop(); reset → the connection is closed unanswered; slow → 200 after
    slow_s; redirect → 302 to /elsewhere (hits there are counted in `redirected`: a client that
    follows redirects shows up); big → 200 with a 1 MB body. `verify`, when given, checks
    Wxd-Signature on every request (recorded; the answer does not depend on it). With
    `keep_bodies` False only ids are kept (`accepted`, `attempts`), for benchmarks; `latency_s`
    delays every answer (a backend that stores the callback before answering).
    """

    def __init__(self, verify: Verify | None = None, *, mode: str = "ok", seed: int = 0,
                 fault_rate: float = 0.0, fault_kinds: Iterable[str] = ("500", "hang", "reset"),
                 slow_s: float = 0.2, keep_bodies: bool = True, latency_s: float = 0.0) -> None:
        self.verify = verify
        self.mode = mode
        self.plan: deque[str] = deque()
        self.fault_rate = fault_rate
        self.fault_kinds = tuple(fault_kinds)
        self.slow_s = slow_s
        self.keep_bodies = keep_bodies
        self.latency_s = latency_s
        self._rng = random.Random(f"receiver:{seed}")
        self.received: list[Received] = []
        self.attempts: Counter[str] = Counter()   # id -> requests
        self.accepted: Counter[str] = Counter()   # id -> 2xx answers
        self.answers: Counter[str] = Counter()    # mode -> requests answered so
        self.redirected = 0
        self.port = 0
        self._released = asyncio.Event()
        self._server: tornado.httpserver.HTTPServer | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hooks/wxd"

    def fail_next(self, *modes: str) -> None:
        """Answer the next requests with these modes, in order."""
        for mode in modes:
            if mode not in MODES:
                raise ValueError(f"unknown mode {mode!r}")
        self.plan.extend(modes)

    def next_mode(self) -> str:
        if self.plan:
            return self.plan.popleft()
        if self.fault_rate and self._rng.random() < self.fault_rate:
            return self._rng.choice(self.fault_kinds)
        return self.mode

    def deliveries(self, kind: str | None = None) -> list[Received]:
        """Requests answered 2xx, first per id, optionally of one type."""
        seen: set[str] = set()
        found: list[Received] = []
        for item in self.received:
            if item.answer in ("ok", "slow", "big") and item.id not in seen \
                    and (kind is None or item.type == kind):
                seen.add(item.id)
                found.append(item)
        return found

    async def start(self, port: int = 0) -> None:
        app = tornado.web.Application([
            (r"/_stats", _StatsHandler, {"receiver": self}),
            (r"/elsewhere", _ElsewhereHandler, {"receiver": self}),
            (r"/.*", _CallbackHandler, {"receiver": self}),
        ], log_function=lambda _handler: None)
        sockets = tornado.netutil.bind_sockets(port, "127.0.0.1", family=socket.AF_INET)
        self.port = sockets[0].getsockname()[1]
        self._server = tornado.httpserver.HTTPServer(app, idle_connection_timeout=60)
        self._server.add_sockets(sockets)

    async def stop(self) -> None:
        self._released.set()
        if self._server is not None:
            self._server.stop()
            await asyncio.wait_for(self._server.close_all_connections(), timeout=10)
            self._server = None


class _Base(tornado.web.RequestHandler):
    def initialize(self, receiver: Receiver) -> None:
        self.receiver = receiver

    def check_xsrf_cookie(self) -> None:
        pass


class _CallbackHandler(_Base):
    async def post(self) -> None:
        r = self.receiver
        mode = r.next_mode()
        headers = self.request.headers
        event_id = headers.get("Wxd-Event-Id", "")
        r.attempts[event_id] += 1
        r.answers[mode] += 1
        if r.keep_bodies:
            verified = (r.verify(headers.get("Wxd-Signature", ""), self.request.body)
                        if r.verify is not None else None)
            r.received.append(Received(event_id, headers.get("Wxd-Event-Type", ""),
                                       self.request.body, dict(headers.get_all()), verified,
                                       mode))
        if mode in ("reset", "hang"):
            if mode == "hang":
                await r._released.wait()
            self.detach().close()  # no answer at all: the client sees the connection drop
            return
        if mode == "slow":
            await asyncio.sleep(r.slow_s)
        elif r.latency_s:
            await asyncio.sleep(r.latency_s)
        if mode == "500":
            self.set_status(500)
            self.finish("receiver failed on command")
            return
        if mode == "redirect":
            self.redirect("/elsewhere", status=302)
            return
        r.accepted[event_id] += 1
        self.finish(b"x" * 1_000_000 if mode == "big" else b"ok")


class _ElsewhereHandler(_Base):
    def post(self) -> None:
        self.receiver.redirected += 1
        self.finish("ok")

    get = post


class _StatsHandler(_Base):
    def get(self) -> None:
        r = self.receiver
        self.finish({"requests": sum(r.attempts.values()), "accepted": sum(r.accepted.values()),
                     "distinct": len(r.accepted)})


async def _serve(args: argparse.Namespace) -> None:
    receiver = Receiver(keep_bodies=False, seed=args.seed, fault_rate=args.fault_rate,
                        latency_s=args.latency_ms / 1000)
    await receiver.start(args.port)
    print(f"READY {receiver.port}", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    await receiver.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fault-rate", type=float, default=0.0)
    parser.add_argument("--latency-ms", type=float, default=0.0, help="delay of every answer")
    asyncio.run(_serve(parser.parse_args(argv)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
