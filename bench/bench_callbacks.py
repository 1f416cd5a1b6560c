"""Callbacks to the backend: delivery throughput against a bare POST loop, and what callbacks
cost the webhook's ingest.

Delivery: N callbacks (10,000; 2,000 with --quick) written to a fresh database file, then
delivered by CallbackWorkers (lease, sign, POST, record: every attempt and outcome durable) to
a local receiver in its own process (bench.receiver), against a bare async loop POSTing the
same bodies over the same keep-alive transport (KeepAliveClient) at the same concurrency: no
database, no signing. Deliveries/s = N / wall time until the last is recorded done (wxd) or
answered (bare); the sides alternate over the rounds, median reported. Two receivers: one
that stores before answering (RECEIVER_LATENCY_S per answer, as bench_pushes gives the
sandbox 20 ms: the target row), and one that answers at once, which makes both sides
CPU-bound, so that row's ratio is the cost of wxd's work per callback (CPU per callback in
its notes; no target).

Ingest: the webhook benchmark's `wxd` server (bench.bench_webhook: the same wrk load generator,
Lua script and HTTPServer settings) fed with distinct safe-mode user text messages, with
callbacks off (inbox row only) and on (inbox row + its message.received callback in the same
transaction, and CallbackWorkers in the same process delivering them to the receiver while
the load runs). The notes say how many callbacks were delivered during the window.
`python -m bench.bench_callbacks [--quick]`.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import os
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from typing import Any

from bench import bench_webhook
from bench.common import Result, format_table, wrk_path
from wxd.callbacks import CallbackWorkers
from wxd.metrics import Registry
from wxd.store import callbacks as callback_store
from wxd.store.db import Database
from wxd.wechat.transport import KeepAliveClient

N, QUICK_N = 10_000, 2_000
CONCURRENCY = 8      # [callbacks] concurrency's default
RECEIVER_LATENCY_S = 0.010
SECRET = "bench-callback-secret-0123"
LOAD_GENERATOR = (
    f"delivery: a receiver process answering 200 after {1000 * RECEIVER_LATENCY_S:g} ms (and one "
    f"answering at once); CallbackWorkers vs a bare POST loop over KeepAliveClient, both at "
    f"{CONCURRENCY} in flight. Ingest: bench_webhook's wrk + Lua cycling through distinct "
    "signed, encrypted text messages, callbacks off vs on (a receiver answering at once)")


class ReceiverProcess:
    """`python -m bench.receiver` in a child process: `url`, `stats()`, `cpu_s()`."""

    def __init__(self, latency_s: float = 0.0) -> None:
        self.latency_s = latency_s

    def __enter__(self) -> ReceiverProcess:
        self.proc = subprocess.Popen([sys.executable, "-m", "bench.receiver",
                                      "--latency-ms", str(1000 * self.latency_s)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line.startswith("READY "):
            self.proc.kill()
            raise RuntimeError(f"the receiver did not start: {line!r}")
        self.port = int(line.split()[1])
        self.url = f"http://127.0.0.1:{self.port}/hooks/wxd"
        return self

    def stats(self) -> dict[str, int]:
        url = f"http://127.0.0.1:{self.port}/_stats"
        with urllib.request.urlopen(url, timeout=30) as answer:
            value: dict[str, int] = json.load(answer)
            return value

    def cpu_s(self) -> float:
        with open(f"/proc/{self.proc.pid}/stat", encoding="ascii") as handle:
            fields = handle.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def __exit__(self, *_exc: object) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _callbacks(n: int, tag: str) -> list[callback_store.NewCallback]:
    """Push-shaped callbacks (a push row as GET /v1/pushes/{id} shows it is ~600 bytes)."""
    data = {"status": "delivered", "attempts": 1, "msgid": "2453000000000000000",
            "error": None, "errcode": None, "error_code": None,
            "to": {"unionid": "oBench-unionid-0000000000000"}, "oa_openid": "oBench0000000000000",
            "template_id": "TPL_bench_notice_0000000000000000", "idempotency_key": None,
            "created_at": 1_700_000_000.0, "updated_at": 1_700_000_001.0,
            "last_attempt_at": 1_700_000_000.5, "next_attempt_at": None,
            "sent_at": 1_700_000_000.6, "finished_at": 1_700_000_001.0}
    return [callback_store.NewCallback(
        callback_store.new_id(), "push.delivered", f"p_{tag}{i:08d}",
        callback_store.encode_data({"id": f"p_{tag}{i:08d}", **data})) for i in range(n)]


async def _wxd_side(tmp: str, url: str, n: int, round_no: int) -> tuple[float, float, int]:
    """(wall s, CPU s, delivered) for CallbackWorkers to deliver n callbacks written before."""
    db = await Database.open(os.path.join(tempfile.mkdtemp(dir=tmp), "delivery.db"))
    try:
        items = _callbacks(n, f"r{round_no}-")
        now = time.time()
        for start in range(0, n, 2000):
            await db.write(functools.partial(callback_store.emit,
                                             callbacks=items[start:start + 2000], now=now))
        metrics = Registry()
        workers = CallbackWorkers(db, url, SECRET, concurrency=CONCURRENCY, metrics=metrics)
        done = metrics.counter("wxd_callbacks_total", "", ("type", "outcome"))
        started, cpu = time.perf_counter(), time.process_time()
        await workers.start()
        while done.get(type="push.delivered", outcome="done") < n:
            await asyncio.sleep(0.005)
            if time.perf_counter() - started > 300:
                raise RuntimeError("callbacks not delivered within 300 s")
        wall, used = time.perf_counter() - started, time.process_time() - cpu
        await workers.stop()
        counts = await db.read(callback_store.counts)
        if counts["done"] != n:
            raise RuntimeError(f"{counts} after delivering {n}")
        return wall, used, counts["done"]
    finally:
        await db.close()


async def _bare_side(url: str, n: int) -> tuple[float, float, int]:
    """(wall s, CPU s, answered 2xx) for a bare loop POSTing the same kind of bodies."""
    leased = [callback_store.Leased(c.id, c.type, c.subject, 1, c.data, time.time(), 1, 0.0)
              for c in _callbacks(n, "bare-")]
    bodies = [item.body() for item in leased]
    headers = {"Content-Type": "application/json; charset=utf-8"}
    client = KeepAliveClient(CONCURRENCY)
    position = iter(range(n))
    answered = 0

    async def worker() -> None:
        nonlocal answered
        for index in position:
            answer = await client.fetch("POST", url, headers=headers, body=bodies[index],
                                        replay_safe=True)
            answered += 200 <= answer.code < 300

    started, cpu = time.perf_counter(), time.process_time()
    try:
        await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
    finally:
        client.close()
    return time.perf_counter() - started, time.process_time() - cpu, answered


def _delivery(quick: bool, tmp: str, receiver: ReceiverProcess, target: bool) -> Result:
    n = QUICK_N if quick else N
    rounds = 1 if quick else 3
    runs: dict[str, list[tuple[float, float, int]]] = {"wxd": [], "bare": []}
    receiver_cpu: dict[str, float] = {"wxd": 0.0, "bare": 0.0}
    for round_no in range(rounds):
        order = ("wxd", "bare") if round_no % 2 == 0 else ("bare", "wxd")
        for side in order:
            before = receiver.cpu_s()
            if side == "wxd":
                runs[side].append(asyncio.run(_wxd_side(tmp, receiver.url, n, round_no)))
            else:
                runs[side].append(asyncio.run(_bare_side(receiver.url, n)))
            receiver_cpu[side] += receiver.cpu_s() - before
    rate = {side: statistics.median(n / wall for wall, _, _ in r) for side, r in runs.items()}
    ratio = rate["wxd"] / rate["bare"]
    notes: dict[str, object] = {
        "callbacks": n, "concurrency": CONCURRENCY, "rounds": rounds,
        "receiver_latency_ms": 1000 * receiver.latency_s,
        "per_round": [round((n / w[0]) / (n / b[0]), 2)
                      for w, b in zip(runs["wxd"], runs["bare"], strict=True)],
        "cpu_ms_per_callback": {side: round(1000 * statistics.median(c for _, c, _ in r) / n, 3)
                                for side, r in runs.items()},
        "receiver_cpu_s": {side: round(v, 1) for side, v in receiver_cpu.items()},
        "delivered": {side: [d for _, _, d in r] for side, r in runs.items()},
    }
    if target:
        return Result(f"callbacks: {n:,} to a local receiver ({1000 * receiver.latency_s:g} ms "
                      "per answer)", "callbacks/s", rate["wxd"], "bare async POST loop",
                      rate["bare"], target=">= 0.8x bare", met=ratio >= 0.8, notes=notes)
    return Result(f"callbacks: {n:,} to a receiver answering at once (CPU-bound)", "callbacks/s",
                  rate["wxd"], "bare async POST loop", rate["bare"], notes=notes)


def _ingest_round(tmp: str, requests: str, lua: str, duration_s: float, connections: int,
                  round_no: int, receiver: ReceiverProcess | None) -> dict[str, Any]:
    on = receiver is not None
    db_path = os.path.join(tmp, f"ingest-{'on' if on else 'off'}-{round_no}.db")
    extra = ("--callbacks-url", receiver.url) if receiver is not None else ()
    before = receiver.stats()["accepted"] if receiver is not None else 0
    proc, port = bench_webhook._start_server("wxd", db_path, extra)
    try:
        rate, total, failed = bench_webhook._wrk(port, requests, lua, duration_s, connections)
        during = receiver.stats()["accepted"] - before if receiver is not None else 0
    finally:
        proc.send_signal(15)
        proc.wait(timeout=60)
    conn = sqlite3.connect(db_path)
    try:
        stored = conn.execute("SELECT COUNT(*) FROM inbox").fetchone()[0]
        written = conn.execute("SELECT COUNT(*) FROM callbacks").fetchone()[0]
    finally:
        conn.close()
    if on and written != stored:
        raise RuntimeError(f"{stored} messages stored but {written} callbacks written")
    return {"rate": rate, "total": total, "failed": failed, "stored": stored,
            "callbacks": written, "delivered_during": during}


def _ingest(quick: bool, tmp: str, receiver: ReceiverProcess) -> Result:
    if wrk_path() is None:
        raise RuntimeError("wrk is not installed (apt-get install -y wrk)")
    duration_s = 3.0 if quick else 6.0
    rounds = 1 if quick else 5
    count = 40_000 if quick else 120_000
    connections = bench_webhook.CONNECTIONS
    requests = os.path.join(tmp, "texts.tsv")
    lua = os.path.join(tmp, "cycle.lua")
    with open(lua, "w", encoding="utf-8") as handle:
        handle.write(bench_webhook.LUA)
    bench_webhook.generate(requests, count, kind="text")
    runs: dict[str, list[dict[str, Any]]] = {"off": [], "on": []}
    for round_no in range(rounds):
        order = ("off", "on") if round_no % 2 == 0 else ("on", "off")
        for side in order:
            runs[side].append(_ingest_round(tmp, requests, lua, duration_s, connections,
                                            round_no, receiver if side == "on" else None))
    rate = {side: statistics.median(r["rate"] for r in rs) for side, rs in runs.items()}
    ratio = rate["on"] / rate["off"]
    notes: dict[str, object] = {
        "connections": connections, "duration_s": duration_s, "rounds": rounds,
        "per_round": [round(a["rate"] / b["rate"], 2)
                      for a, b in zip(runs["on"], runs["off"], strict=True)],
        "stored_on": [r["stored"] for r in runs["on"]],
        "callbacks_written": [r["callbacks"] for r in runs["on"]],
        "delivered_during_load": [r["delivered_during"] for r in runs["on"]],
        "failed": {side: sum(r["failed"] for r in rs) for side, rs in runs.items()},
    }
    return Result("webhook ingest (text messages), callbacks on vs off", "messages/s", rate["on"],
                  "callbacks off", rate["off"], target=">= 0.9x off", met=ratio >= 0.9,
                  notes=notes)


def run(quick: bool, only: str | None = None) -> list[Result]:
    results: list[Result] = []
    with tempfile.TemporaryDirectory(dir=os.getcwd(), prefix=".bench-callbacks-") as tmp:
        if only in (None, "delivery"):
            with ReceiverProcess(RECEIVER_LATENCY_S) as receiver:
                results.append(_delivery(quick, tmp, receiver, target=True))
            with ReceiverProcess() as receiver:
                results.append(_delivery(quick, tmp, receiver, target=False))
        if only in (None, "ingest"):
            with ReceiverProcess() as receiver:
                results.append(_ingest(quick, tmp, receiver))
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="2,000 callbacks, one round")
    parser.add_argument("--only", choices=("delivery", "ingest"))
    args = parser.parse_args(argv)
    print(format_table(run(args.quick, args.only)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
