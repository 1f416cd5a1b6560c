"""Token hand-out to 1,000 concurrent callers: wxd's TokenManager vs wechatpy with a shared cache.

Both sides ask the same SandboxThread (/cgi-bin/token, ~LATENCY_S per call) for the OA token:
wxd as 1,000 coroutines awaiting TokenManager.get() (legacy mode, to hit the same endpoint),
wechatpy as 1,000 threads reading WeChatClient(appid, secret, session=MemoryStorage()).access_token.
Cold: the cache is empty and everyone wants a token at once (wechatpy has no lock, so each thread
that finds no token fetches one; every /cgi-bin/token call supersedes the previous token).
Warm: the same callers ask WARM_GETS more times each. `python -m bench.bench_tokens [--quick]`.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from wechatpy import WeChatClient as WeChatPyClient
from wechatpy.session.memorystorage import MemoryStorage

from bench.common import Result, format_table
from wxd.sandbox import FakeWeChat, SandboxThread
from wxd.store.db import Database
from wxd.tokens import TokenManager
from wxd.wechat.client import WeChatClient
from wxd.wechat.transport import KeepAliveClient

CALLERS = 1000
LATENCY_S = 0.03  # a plausible round trip to api.weixin.qq.com
WARM_GETS = 100
TOKEN_PATH = "/cgi-bin/token"


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _fetches(sandbox: SandboxThread) -> int:
    return sandbox.call(lambda: sandbox.fake.count_calls(TOKEN_PATH))


async def _wxd(sandbox: SandboxThread, callers: int, warm_gets: int) -> dict[str, Any]:
    creds = sandbox.fake.credentials
    http = KeepAliveClient(64)
    with tempfile.TemporaryDirectory() as tmp:
        db = await Database.open(os.path.join(tmp, "wxd.db"))
        try:
            client = WeChatClient(http, sandbox.base_url, 5.0, 10.0)
            manager = TokenManager("oa", creds.oa_appid, creds.oa_secret, client, db,
                                   mode="legacy")
            before = _fetches(sandbox)
            latencies: list[float] = []

            async def caller() -> str:
                started = time.perf_counter()
                token = await manager.get()
                latencies.append(time.perf_counter() - started)
                return token

            started = time.perf_counter()
            tokens = await asyncio.gather(*(caller() for _ in range(callers)))
            cold_s = time.perf_counter() - started
            cold = list(latencies)

            async def warm_caller() -> None:
                for _ in range(warm_gets):
                    await manager.get()

            started = time.perf_counter()
            await asyncio.gather(*(warm_caller() for _ in range(callers)))
            warm_s = time.perf_counter() - started
            await manager.stop()
            return {"cold_s": cold_s, "p50": statistics.median(cold),
                    "p99": _percentile(cold, 0.99), "mean": statistics.fmean(cold),
                    "warm_s": warm_s,
                    "fetches": _fetches(sandbox) - before, "distinct": len(set(tokens))}
        finally:
            await db.close()
            http.close()


def _wechatpy(sandbox: SandboxThread, callers: int, warm_gets: int) -> dict[str, Any]:
    base = sandbox.base_url

    class SandboxClient(WeChatPyClient):  # type: ignore[misc]
        """wechatpy's client with its token URL pointed at the sandbox (nothing else changed)."""

        API_BASE_URL = base + "/cgi-bin/"

        def fetch_access_token(self) -> Any:
            return self._fetch_access_token(
                url=base + TOKEN_PATH,
                params={"grant_type": "client_credential", "appid": self.appid,
                        "secret": self.secret},
            )

    creds = sandbox.fake.credentials
    client = SandboxClient(creds.oa_appid, creds.oa_secret, session=MemoryStorage())
    before = _fetches(sandbox)
    barrier = threading.Barrier(callers)

    def caller() -> tuple[str, float]:
        barrier.wait()
        started = time.perf_counter()
        token = client.access_token
        return token, time.perf_counter() - started

    def warm_caller() -> None:
        for _ in range(warm_gets):
            _ = client.access_token

    with ThreadPoolExecutor(max_workers=callers) as pool:
        # Create all the threads first, so the cold figures do not include thread start-up.
        ready = threading.Barrier(callers)
        list(pool.map(lambda _: ready.wait(), range(callers)))
        started = time.perf_counter()
        results = list(pool.map(lambda _: caller(), range(callers)))
        cold_s = time.perf_counter() - started
        started = time.perf_counter()
        list(pool.map(lambda _: warm_caller(), range(callers)))
        warm_s = time.perf_counter() - started
    cold = [latency for _, latency in results]
    client._http.close()
    return {"cold_s": cold_s, "p50": statistics.median(cold), "p99": _percentile(cold, 0.99),
            "mean": statistics.fmean(cold), "warm_s": warm_s, "fetches": _fetches(sandbox) - before,
            "distinct": len({token for token, _ in results})}


def run(quick: bool) -> list[Result]:
    """Cold and warm token hand-out for CALLERS concurrent callers, wxd vs wechatpy."""
    warm_gets = 20 if quick else WARM_GETS
    logging.getLogger("urllib3").setLevel(logging.ERROR)  # "connection pool is full" noise
    fake = FakeWeChat(users=10, seed=1, latency_s=LATENCY_S, token_daily_quota=100_000)
    with SandboxThread(fake) as sandbox:
        mine = asyncio.run(_wxd(sandbox, CALLERS, warm_gets))
        ref = _wechatpy(sandbox, CALLERS, warm_gets)
    label = f"token to {CALLERS:,} concurrent callers"
    warm_total = CALLERS * warm_gets
    settings = {"latency_ms": LATENCY_S * 1000, "cpus": os.cpu_count(),
                "distinct_tokens_wxd": mine["distinct"], "distinct_tokens_wechatpy": ref["distinct"]}
    return [
        Result(f"{label}, cold: upstream fetches", "fetches", mine["fetches"], "wechatpy",
               ref["fetches"], higher_is_better=False, target="== 1",
               met=mine["fetches"] == 1, notes=settings),
        Result(f"{label}, cold: wall", "ms", mine["cold_s"] * 1000, "wechatpy",
               ref["cold_s"] * 1000, higher_is_better=False),
        Result(f"{label}, cold: mean latency", "ms", mine["mean"] * 1000, "wechatpy",
               ref["mean"] * 1000, higher_is_better=False),
        Result(f"{label}, cold: p50 latency", "ms", mine["p50"] * 1000, "wechatpy",
               ref["p50"] * 1000, higher_is_better=False),
        Result(f"{label}, cold: p99 latency", "ms", mine["p99"] * 1000, "wechatpy",
               ref["p99"] * 1000, higher_is_better=False),
        Result(f"{label}, warm: {warm_total:,} gets", "gets/s", warm_total / mine["warm_s"],
               "wechatpy", warm_total / ref["warm_s"]),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="20 warm gets per caller instead of 100")
    args = parser.parse_args(argv)
    print(format_table(run(args.quick)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
