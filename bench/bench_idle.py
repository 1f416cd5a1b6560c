"""Idle footprint of `wxd run` vs a bare Tornado "hello" process with two listeners.

Both run as subprocesses started the same way (`python -m ...`), each told to report readiness
over a NOTIFY_SOCKET datagram socket this benchmark creates (sd_notify READY=1; wxd sends it after
both listeners accept). Measured per side, in the same run:
  start→ready   seconds from Popen to READY=1 (median of several starts; includes the interpreter)
  RSS           VmRSS one second after READY=1
  wake-ups/s    voluntary + nonvoluntary context switches summed over /proc/<pid>/task/*/status,
                over an idle window (no requests; wxd's token refresh is hours away)
wxd runs against a SandboxThread (tokens fetched at start, then nothing to do).
`python -m bench.bench_idle [--quick]`.
"""

from __future__ import annotations

import argparse
import asyncio
import glob
import os
import socket
import statistics
import sys
import tempfile
import time

import tornado.httpserver
import tornado.netutil
import tornado.web

from bench.common import Result, Started, format_table, rss_mb
from wxd.sandbox import FakeWeChat, SandboxThread

ADMIN_TOKEN = "bench-admin-token-0123456789"


class HelloHandler(tornado.web.RequestHandler):
    def get(self) -> None:
        self.finish("hello")


async def _serve_hello() -> None:
    """The reference: two listeners (like wxd's webhook and admin), READY=1, then wait."""
    app = tornado.web.Application([(r"/", HelloHandler)])
    for _ in range(2):
        server = tornado.httpserver.HTTPServer(app)
        server.add_sockets(tornado.netutil.bind_sockets(0, "127.0.0.1"))
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.connect(os.environ["NOTIFY_SOCKET"])
        sock.sendall(b"READY=1")
    await asyncio.Event().wait()


def _config(tmp: str, sandbox: SandboxThread, run: int) -> str:
    c = sandbox.fake.credentials
    path = os.path.join(tmp, f"wxd-{run}.conf")
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(
            f"[wxd]\ndatabase = {tmp}/wxd-{run}.db\nlog_level = warning\n"
            f"[webhook]\nlisten = 127.0.0.1:0\ntoken = {c.webhook_token}\n"
            f"encoding_aes_key = {c.encoding_aes_key}\n"
            f"[admin]\nlisten = 127.0.0.1:0\ntoken = {ADMIN_TOKEN}\n"
            f"[official_account]\nappid = {c.oa_appid}\nsecret = {c.oa_secret}\n"
            f"[mini_program]\nappid = {c.mp_appid}\nsecret = {c.mp_secret}\n"
            f"[wechat]\napi_base = {sandbox.base_url}\n")
    return path


def switches(pid: int) -> int:
    """Context switches (voluntary + nonvoluntary) summed over the process's live threads."""
    total = 0
    for status in glob.glob(f"/proc/{pid}/task/*/status"):
        try:
            with open(status, encoding="ascii") as handle:
                for line in handle:
                    if line.startswith(("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches")):
                        total += int(line.split()[1])
        except (OSError, ValueError):
            continue  # a thread that ended while we read
    return total


def threads(pid: int) -> int:
    return len(glob.glob(f"/proc/{pid}/task/*"))


def _measure(argv_for: list[list[str]], tmp: str, name: str, idle_s: float) -> dict[str, float]:
    """Start len(argv_for) times (median ready time); idle-measure the last start."""
    ready: list[float] = []
    figures: dict[str, float] = {}
    for run, argv in enumerate(argv_for):
        process = Started(argv, tmp, f"{name}-{run}")
        try:
            ready.append(process.ready_s)
            if run == len(argv_for) - 1:
                time.sleep(1.0)  # let start-up work (token persistence, first timers) settle
                pid = process.proc.pid
                figures["rss_mb"] = rss_mb(pid)
                before, t0 = switches(pid), time.perf_counter()
                time.sleep(idle_s)
                figures["wakeups_per_s"] = (switches(pid) - before) / (time.perf_counter() - t0)
                figures["threads"] = threads(pid)
        finally:
            process.stop()
    figures["ready_s"] = statistics.median(ready)
    return figures


def run(quick: bool) -> list[Result]:
    starts = 3 if quick else 7
    idle_s = 5.0 if quick else 10.0
    with tempfile.TemporaryDirectory(prefix="wxd-idle-") as tmp:
        hello_argv = [sys.executable, "-m", "bench.bench_idle", "--serve-hello"]
        hello = _measure([hello_argv] * starts, tmp, "hello", idle_s)
        with SandboxThread(FakeWeChat(users=100, seed=1)) as sandbox:
            argvs = [[sys.executable, "-m", "wxd", "run", "-c", _config(tmp, sandbox, n)]
                     for n in range(starts)]
            wxd = _measure(argvs, tmp, "wxd", idle_s)
    notes: dict[str, object] = {
        "starts": starts, "idle_window_s": idle_s, "wxd_threads": wxd["threads"],
        "hello_threads": hello["threads"],
        "reference": "tornado hello, two listeners, READY=1 on NOTIFY_SOCKET",
    }
    return [
        Result("idle: start to ready (READY=1)", "s", wxd["ready_s"], "bare tornado hello",
               hello["ready_s"], higher_is_better=False, notes=notes),
        Result("idle: RSS after start", "MB", wxd["rss_mb"], "bare tornado hello", hello["rss_mb"],
               higher_is_better=False),
        Result("idle: wake-ups while idle", "switches/s", wxd["wakeups_per_s"], "bare tornado hello",
               hello["wakeups_per_s"], higher_is_better=False),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="3 starts and a 5 s idle window")
    parser.add_argument("--serve-hello", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve_hello:
        asyncio.run(_serve_hello())
        return 0
    print(format_table(run(args.quick)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
