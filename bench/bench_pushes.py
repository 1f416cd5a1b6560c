"""Push pipeline throughput: wxd's queue + workers against a bare async client and wechatpy.

N pushes (10,000; 2,000 with --quick) through the sandbox answering template/send after 20 ms.
Deliveries/s = pushes durably recorded `sent` per second (wxd) or answered errcode 0
(references), all at the same concurrency:
  (a) ceiling: a bare async client posting the same bodies over the same keep-alive
      transport as wxd (wxd.wechat.transport.KeepAliveClient), no queue, no database — so the ratio
      is the cost of the queue, the database and the workers;
  (b) wechatpy: client.message.send_template in a ThreadPoolExecutor of the same size;
  (info) tornado's AsyncHTTPClient as the bare client (a new connection per request).
Batch enqueue: pushes/s through POST /v1/pushes/batch (real HTTP, real SQLite file, fsync).
The sides run interleaved in rounds so that load from other processes falls on all alike.
The sandbox runs in a child process (its own GIL, as WeChat is another machine); --thread
runs it as a SandboxThread in this process instead.
`python -m bench.bench_pushes [--quick] [--thread]`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import tornado.httpclient
import tornado.httpserver
import tornado.netutil

from bench.common import Result, SandboxProcess, format_table
from wxd.admin import common_kwargs, make_app
from wxd.admin import pushes as pushes_admin
from wxd.metrics import Registry
from wxd.push_workers import PushWorkers
from wxd.pushes import PushService
from wxd.sandbox import NOTICE_TEMPLATE_ID, FakeWeChat, Person, SandboxThread
from wxd.store import ingest
from wxd.store.db import Database
from wxd.tokens import TokenManager
from wxd.wechat.client import WeChatClient
from wxd.wechat.oa import OfficialAccountAPI
from wxd.wechat.transport import KeepAliveClient

N, QUICK_N = 10_000, 2_000
CONCURRENCY = 32
LATENCY_S = 0.020
BATCH = 500
BATCHES_IN_FLIGHT = 4  # a backend with a few workers posting batches at once
USERS = 3000
ADMIN_TOKEN = "bench-admin-token"
DATA = {"thing1": "您的预约已确认", "time2": "2024-01-01 09:30"}
SEND = "/cgi-bin/message/template/send"


def sandbox_process(fake: FakeWeChat) -> SandboxProcess:
    """The same seeded emulator as `fake` (a local replica for picking recipients) in a child
    process; the child keeps the real state."""
    latency = fake.latency_s if isinstance(fake.latency_s, float | int) else fake.latency_s[0]
    return SandboxProcess(len(fake.people), fake.seed, float(latency), fake)


def _people(fake: FakeWeChat) -> list[Person]:
    return [p for p in fake.people if p.follows and p.unionid]


def _bodies(people: list[Person], n: int, tag: str) -> list[dict[str, Any]]:
    """The template/send bodies wxd sends (touser, template_id, data, client_msg_id)."""
    return [{"touser": people[i % len(people)].oa_openid, "template_id": NOTICE_TEMPLATE_ID,
             "data": {k: {"value": v} for k, v in DATA.items()},
             "client_msg_id": f"{tag}{i:08d}"} for i in range(n)]


async def _token(base_url: str, fake: FakeWeChat) -> str:
    http = KeepAliveClient(1)
    try:
        client = WeChatClient(http, base_url, 5, 10)
        token, _ = await client.fetch_token(fake.credentials.oa_appid,
                                            fake.credentials.oa_secret, "stable")
        return token
    finally:
        http.close()


async def _ceiling(base_url: str, token: str, bodies: list[dict[str, Any]],
                   concurrency: int, keep_alive: bool = True) -> tuple[float, float]:
    """(wall, CPU) seconds for a bare client to post every body, `concurrency` at a time:
    wxd's KeepAliveClient, or tornado's AsyncHTTPClient when not `keep_alive`."""
    url = f"{base_url}{SEND}?access_token={token}"
    payloads = [json.dumps(b, ensure_ascii=False).encode() for b in bodies]
    position = iter(range(len(payloads)))
    failures = 0
    if keep_alive:
        keepalive = KeepAliveClient(concurrency)
        close = keepalive.close

        async def post(payload: bytes) -> bytes:
            return (await keepalive.fetch("POST", url, body=payload)).body
    else:
        tornado_client = tornado.httpclient.AsyncHTTPClient(force_instance=True,
                                                            max_clients=concurrency)
        close = tornado_client.close

        async def post(payload: bytes) -> bytes:
            return (await tornado_client.fetch(url, method="POST", body=payload)).body

    async def worker() -> None:
        nonlocal failures
        for index in position:
            if json.loads(await post(payloads[index])).get("errcode", 0) != 0:
                failures += 1

    started, cpu = time.perf_counter(), time.process_time()
    try:
        await asyncio.gather(*(worker() for _ in range(concurrency)))
    finally:
        close()
    if failures:
        raise RuntimeError(f"ceiling run: {failures} sends failed")
    return time.perf_counter() - started, time.process_time() - cpu


def _wechatpy(base_url: str, fake: FakeWeChat, token: str, bodies: list[dict[str, Any]],
              concurrency: int) -> tuple[float, float]:
    """(wall, CPU) seconds for wechatpy's send_template in a pool of `concurrency` threads."""
    import requests.adapters  # test/bench-only peers
    from wechatpy import WeChatClient as WechatpyClient

    # wechatpy hard-codes api.weixin.qq.com for the token, so it is fetched above and handed in.
    client = WechatpyClient(fake.credentials.oa_appid, fake.credentials.oa_secret,
                            access_token=token)
    client.API_BASE_URL = f"{base_url}/cgi-bin/"
    # Give requests a pool as large as the thread pool (its default of 10 would discard
    # connections and understate wechatpy).
    client._http.mount("http://", requests.adapters.HTTPAdapter(pool_maxsize=concurrency))

    def send(body: dict[str, Any]) -> None:
        # wechatpy 1.8 has no client_msg_id argument; the rest of the body is the same.
        answer = client.message.send_template(body["touser"], body["template_id"], body["data"])
        if answer.get("errcode", 0) != 0:
            raise RuntimeError(f"wechatpy send failed: {answer}")

    started, cpu = time.perf_counter(), time.process_time()
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        list(pool.map(send, bodies))
    elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
    client._http.close()
    return elapsed, cpu


class WxdStack:
    """wxd's push side over a real SQLite file: admin API (batch route) on a loopback port,
    PushService, and a fresh PushWorkers per delivery round (so enqueue and delivery are timed
    apart). `await open()`, then `enqueue()` / `deliver()` per round, then `await close()`."""

    def __init__(self, sandbox: SandboxThread | SandboxProcess, concurrency: int,
                 directory: str) -> None:
        self.sandbox = sandbox
        self.concurrency = concurrency
        self.path = os.path.join(directory, "wxd.db")
        self.people = _people(sandbox.fake)
        self.metrics = Registry()
        self.sent = self.metrics.counter("wxd_pushes_total",
                                         "Push status transitions by new status.", ("status",))
        self.enqueue_commits = 0
        self.delivery_commits = 0
        self.queued = 0

    async def open(self) -> None:
        self.db = await Database.open(self.path, metrics=self.metrics)
        self.upstream = KeepAliveClient(self.concurrency)
        self.admin_client = tornado.httpclient.AsyncHTTPClient(force_instance=True)
        now, people = time.time(), self.people
        await self.db.write(lambda conn: ingest.apply_user_infos(conn, [
            {"subscribe": 1, "openid": p.oa_openid, "unionid": p.unionid} for p in people
        ], now, now))
        client = WeChatClient(self.upstream, self.sandbox.base_url, 5, 10, self.metrics)
        creds = self.sandbox.fake.credentials
        self.tokens = TokenManager("oa", creds.oa_appid, creds.oa_secret, client, self.db)
        self.oa = OfficialAccountAPI(client, self.tokens)
        self.service = PushService(self.db, self.oa, mp_appid=creds.mp_appid,
                                   template_cache_s=3600, metrics=self.metrics)
        common = common_kwargs(ADMIN_TOKEN, self.metrics)
        sockets = tornado.netutil.bind_sockets(0, "127.0.0.1")
        self.server = tornado.httpserver.HTTPServer(
            make_app(common, [pushes_admin.routes(common, self.service)]),
            max_body_size=64 << 20)
        self.server.add_sockets(sockets)
        self.url = f"http://127.0.0.1:{sockets[0].getsockname()[1]}/v1/pushes/batch"
        await self.service.refresh_templates()  # fetched once, not timed

    async def enqueue(self, first: int, count: int) -> float:
        """Seconds to queue `count` pushes through POST /v1/pushes/batch (BATCH per request,
        BATCHES_IN_FLIGHT requests at a time)."""
        people = self.people
        requests = [{"to": {"unionid": people[i % len(people)].unionid},
                     "template_id": NOTICE_TEMPLATE_ID, "data": DATA}
                    for i in range(first, first + count)]
        bodies = iter([json.dumps({"pushes": requests[o:o + BATCH]}, ensure_ascii=False).encode()
                       for o in range(0, count, BATCH)])
        headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"}

        async def sender() -> None:
            for body in bodies:
                response = await self.admin_client.fetch(self.url, method="POST",
                                                         headers=headers, body=body)
                results = json.loads(response.body)["results"]
                if any("error" in r for r in results):
                    raise RuntimeError(f"batch enqueue refused items: {results[:2]}")

        commits = self.db.commits
        started = time.perf_counter()
        await asyncio.gather(*(sender() for _ in range(BATCHES_IN_FLIGHT)))
        self.enqueue_commits += self.db.commits - commits
        self.queued += count
        return time.perf_counter() - started

    async def deliver(self) -> tuple[float, float]:
        """(wall, CPU) seconds for fresh PushWorkers to record every queued push as sent."""
        workers = PushWorkers(self.db, self.oa, workers=self.concurrency,
                              metrics=self.metrics)
        commits = self.db.commits
        started, cpu = time.perf_counter(), time.process_time()
        await workers.start()
        while self.sent.get(status="sent") < self.queued:
            await asyncio.sleep(0.005)
        elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
        await workers.stop()
        self.delivery_commits += self.db.commits - commits
        # "queued" counts the enqueues plus any retry.
        failed = self.sent.get(status="failed") + self.sent.get(status="queued") - self.queued
        if failed:
            raise RuntimeError(f"wxd run: {failed} pushes failed or were retried")
        return elapsed, cpu

    async def close(self) -> None:
        await self.tokens.stop()
        self.server.stop()
        await self.server.close_all_connections()
        self.admin_client.close()
        self.upstream.close()
        await self.db.close()


async def _measure(sandbox: SandboxThread | SandboxProcess, n: int, rounds: int,
                   directory: str) -> dict[str, float | int]:
    """The three sides interleaved in `rounds` rounds of n/rounds pushes each, so that load
    from other processes on the host falls on all of them alike; times are summed."""
    fake, chunk = sandbox.fake, n // rounds
    people = _people(fake)
    token = await _token(sandbox.base_url, fake)
    loop = asyncio.get_running_loop()
    stack = WxdStack(sandbox, CONCURRENCY, directory)
    await stack.open()
    totals = dict.fromkeys(("ceiling", "ceiling_cpu", "tornado", "wechatpy", "wechatpy_cpu",
                            "enqueue", "deliver", "deliver_cpu"), 0.0)
    try:
        for number in range(rounds):
            wall, cpu = await _ceiling(sandbox.base_url, token,
                                       _bodies(people, chunk, f"c{number}-"), CONCURRENCY)
            totals["ceiling"] += wall
            totals["ceiling_cpu"] += cpu
            wall, _ = await _ceiling(sandbox.base_url, token,
                                     _bodies(people, chunk, f"t{number}-"), CONCURRENCY,
                                     keep_alive=False)
            totals["tornado"] += wall
            # The thread pool blocks; run it off the loop (which is idle meanwhile).
            wall, cpu = await loop.run_in_executor(None, _wechatpy, sandbox.base_url, fake, token,
                                                   _bodies(people, chunk, f"w{number}-"),
                                                   CONCURRENCY)
            totals["wechatpy"] += wall
            totals["wechatpy_cpu"] += cpu
            totals["enqueue"] += await stack.enqueue(number * chunk, chunk)
            wall, cpu = await stack.deliver()
            totals["deliver"] += wall
            totals["deliver_cpu"] += cpu
    finally:
        await stack.close()
    return {**totals, "pushes": chunk * rounds, "enqueue_commits": stack.enqueue_commits,
            "delivery_commits": stack.delivery_commits}


def run(quick: bool, thread: bool = False) -> list[Result]:
    n, rounds = (QUICK_N, 2) if quick else (N, 5)
    fake = FakeWeChat(users=USERS, seed=5, follow_ratio=1.0, latency_s=LATENCY_S)
    runner = SandboxThread(fake) if thread else sandbox_process(fake)
    with runner as sandbox, tempfile.TemporaryDirectory() as directory:
        m = asyncio.run(_measure(sandbox, n, rounds, directory))
        sends = (runner.count_calls(SEND) if isinstance(runner, SandboxProcess)
                 else fake.count_calls(SEND))
    n = int(m["pushes"])
    wxd_rate, ceiling_rate, pool_rate = n / m["deliver"], n / m["ceiling"], n / m["wechatpy"]

    def cpu_ms(key: str) -> float:
        return round(m[key] / n * 1000, 3)

    notes: dict[str, object] = {
        "pushes": n, "rounds": rounds, "concurrency": CONCURRENCY,
        "latency_ms": LATENCY_S * 1000, "theoretical_max": CONCURRENCY / LATENCY_S,
        "sandbox": "thread (shares the GIL)" if thread else "child process",
        "sandbox_sends": sends, "delivery_commits": m["delivery_commits"],
        "cpu_ms_per_push": {"wxd": cpu_ms("deliver_cpu"), "bare": cpu_ms("ceiling_cpu"),
                            "wechatpy": cpu_ms("wechatpy_cpu")},
    }
    return [
        Result("pushes: deliveries vs bare client", "pushes/s", wxd_rate,
               "bare keep-alive client", ceiling_rate, target=">= 0.8x ceiling",
               met=wxd_rate >= 0.8 * ceiling_rate, notes=notes),
        Result("pushes: deliveries vs bare tornado client", "pushes/s", wxd_rate,
               "bare AsyncHTTPClient", n / m["tornado"]),
        Result("pushes: deliveries vs wechatpy", "pushes/s", wxd_rate,
               "wechatpy ThreadPoolExecutor", pool_rate, target=">= 2x thread pool",
               met=wxd_rate >= 2 * pool_rate),
        Result("pushes: batch enqueue", "pushes/s", n / m["enqueue"], target=">= 5,000/s",
               met=n / m["enqueue"] >= 5000,
               notes={"batch": BATCH, "in_flight": BATCHES_IN_FLIGHT,
                      "enqueue_commits": m["enqueue_commits"]}),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_N} pushes instead of {N}")
    parser.add_argument("--thread", action="store_true",
                        help="run the sandbox as a SandboxThread in this process (shares the GIL)")
    args = parser.parse_args()
    print(format_table(run(args.quick, args.thread)))


if __name__ == "__main__":
    main()
