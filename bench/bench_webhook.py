"""Encrypted subscribe events per second through the webhook, end to end, vs two references.

Three servers, each in its own subprocess on a free loopback port, same HTTPServer settings,
same load generator (wrk + a Lua script cycling through N pre-generated distinct safe-mode
requests: fresh timestamps, distinct nonces, FromUserName and CreateTime, so none is a replay or
a duplicate), same run:
  wxd       wxd.webhook: signature, replay window, nonce memory, msg_signature, AES, parse,
            inbox row + job committed durably (WAL, synchronous=FULL, group commit), `success`
  bare      a Tornado handler that only answers `success`
  wechatpy  a Tornado handler that checks the signature, decrypts and parses with wechatpy,
            stores nothing
  daemon    the whole daemon as a new user runs it (`wxd run`, every component on, event
            workers calling user/info against a sandbox process with 20 ms latency per call),
            fed with subscribe events of the sandbox's own followers
In the `wxd` row event workers do not run (the jobs wait in the durable queue): ingest alone.
The `daemon` row is ingest while the events are processed too; its notes say how long the
backlog took to drain after the load stopped and how many user/info and batchget calls it took.
`python -m bench.bench_webhook [--quick]`.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import math
import os
import random
import re
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.parse

import tornado.httpserver
import tornado.web

from bench.common import Result, SandboxProcess, Started, format_table, free_port, wrk_path
from wxd.sandbox import FakeWeChat
from wxd.wechat.crypto import MessageCrypto, sign
from wxd.wechat.messages import render_event_xml

TOKEN = "benchtoken"
AES_KEY = "abcdefghijklmnopqrstuvwxyz0123456789ABCDEFG"
APPID = "wx1234567890abcdef"
PATH = "/wechat"
CONNECTIONS = 64
SERVERS = ("bare", "wechatpy", "wxd", "daemon")
DAEMON_USERS = 20_000
FRESH_FOR_S = 120.0  # regenerate the signed requests after this long (replay window: 300 s)
DAEMON_LATENCY_S = 0.02
ADMIN_TOKEN = "bench-admin-token-0123456789"

LUA = r"""
local requests = {}
local counter = 0
local step = 1
local tid = 0
local next_id = 0

function setup(thread)
  thread:set("tid", next_id)
  next_id = next_id + 1
end

function init(args)
  step = tonumber(args[2])
  for line in io.lines(args[1]) do
    local path, body = line:match("^([^\t]*)\t(.*)$")
    requests[#requests + 1] = wrk.format("POST", path, {["Content-Type"] = "text/xml"}, body)
  end
  counter = tid
end

function request()
  local r = requests[(counter % #requests) + 1]
  counter = counter + step
  return r
end
"""


# Servers (run in the subprocess) ------------------------------------------------------------


class BareHandler(tornado.web.RequestHandler):
    def check_xsrf_cookie(self) -> None:
        pass

    def post(self) -> None:
        self.set_header("Content-Type", "text/plain; charset=utf-8")
        self.finish(b"success")


class WechatpyHandler(tornado.web.RequestHandler):
    """What a wechatpy integration does before answering, minus any storage."""

    def initialize(self, crypto: object) -> None:
        self.crypto = crypto

    def check_xsrf_cookie(self) -> None:
        pass

    def post(self) -> None:
        from wechatpy import parse_message
        from wechatpy.exceptions import InvalidSignatureException
        from wechatpy.utils import check_signature

        arg = self.get_query_argument
        try:
            check_signature(TOKEN, arg("signature"), arg("timestamp"), arg("nonce"))
            xml = self.crypto.decrypt_message(  # type: ignore[attr-defined]
                self.request.body, arg("msg_signature"), arg("timestamp"), arg("nonce"))
        except InvalidSignatureException:
            raise tornado.web.HTTPError(403) from None
        parse_message(xml)
        self.set_header("Content-Type", "text/plain; charset=utf-8")
        self.finish(b"success")


async def _serve(kind: str, db_path: str, callbacks_url: str | None = None) -> None:
    """One server until SIGTERM. `callbacks_url` (wxd only, bench_callbacks): the webhook writes
    message.received callbacks in its transactions and CallbackWorkers deliver them there."""
    from wxd.callbacks import CallbackWorkers
    from wxd.store.callbacks import OFF, Outbox
    from wxd.store.db import Database
    from wxd.webhook import Webhook, make_app

    db = None
    workers = None
    if kind == "wxd":
        db = await Database.open(db_path)
        outbox = OFF
        hook: Webhook | None = None
        if callbacks_url:  # wired as daemon.py wires them
            workers = CallbackWorkers(db, callbacks_url, "bench-callback-secret-0123",
                                      yield_to=lambda: hook is not None and hook.busy())
            outbox = Outbox(frozenset({"message.received"}), notify=workers.notify)
            await workers.start()
        hook = Webhook(TOKEN, MessageCrypto(TOKEN, AES_KEY, APPID), db, outbox=outbox)
        app = make_app(PATH, hook)
    elif kind == "wechatpy":
        from wechatpy.crypto import WeChatCrypto

        app = tornado.web.Application(
            [(PATH, WechatpyHandler, {"crypto": WeChatCrypto(TOKEN, AES_KEY, APPID)})],
            log_function=lambda _h: None)
    else:
        app = tornado.web.Application([(PATH, BareHandler)], log_function=lambda _h: None)
    # The daemon's Listener settings, for all three.
    server = tornado.httpserver.HTTPServer(app, max_body_size=1 << 20, idle_connection_timeout=60,
                                           body_timeout=30)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(1024)
    sock.setblocking(False)
    server.add_sockets([sock])
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    print(f"READY {sock.getsockname()[1]}", flush=True)
    await stop.wait()
    server.stop()
    await server.close_all_connections()
    if workers is not None:
        await workers.stop()
    if db is not None:
        await db.close()


# Driver ---------------------------------------------------------------------------------------


def generate(path: str, count: int, seed: int = 1, token: str = TOKEN, aes_key: str = AES_KEY,
             appid: str = APPID, openids: list[str] | None = None, kind: str = "subscribe") -> None:
    """Write `count` distinct signed safe-mode subscribe requests, one "path?query\\tbody" a line.

    With `openids`, the senders cycle through them (each round with another CreateTime, so no
    request is a duplicate of another); otherwise every sender is a new random openid.
    `kind` "text" writes user text messages instead (distinct MsgIds).
    """
    crypto = MessageCrypto(token, aes_key, appid)
    rng = random.Random(seed)
    ts = str(int(time.time()))
    with open(path, "w", encoding="utf-8") as out:
        for n in range(count):
            nonce = f"{n:07d}{rng.randrange(10**6):06d}"
            if openids:
                sender, created = openids[n % len(openids)], int(ts) - n // len(openids)
            else:
                sender, created = f"oBench{n:08d}{rng.randrange(10**6):06d}", int(ts) - n % 100
            fields: dict[str, str | int] = {"ToUserName": "gh_0123456789ab",
                                            "FromUserName": sender, "CreateTime": created}
            if kind == "text":
                fields.update(MsgType="text", Content=f"bench message {n}", MsgId=10**15 + n)
            else:
                fields.update(MsgType="event", Event="subscribe", EventKey="")
            xml = render_event_xml(fields)
            encrypt = crypto.encrypt(xml, random_prefix=rng.randbytes(16))
            query = urllib.parse.urlencode({
                "signature": sign(token, ts, nonce), "timestamp": ts, "nonce": nonce,
                "openid": sender, "encrypt_type": "aes",
                "msg_signature": sign(token, ts, nonce, encrypt)})
            body = render_event_xml({"ToUserName": "gh_0123456789ab", "Encrypt": encrypt})
            out.write(f"{PATH}?{query}\t{body}\n")


def _daemon_config(tmp: str, db_path: str, fake: FakeWeChat, api_base: str, port: int) -> str:
    c = fake.credentials
    text = f"""
[wxd]
database = {db_path}
log_level = warning
[webhook]
listen = 127.0.0.1:{port}
path = {PATH}
token = {c.webhook_token}
encoding_aes_key = {c.encoding_aes_key}
[admin]
listen = 127.0.0.1:{free_port()}
token = {ADMIN_TOKEN}
[official_account]
appid = {c.oa_appid}
secret = {c.oa_secret}
[mini_program]
appid = {c.mp_appid}
secret = {c.mp_secret}
[wechat]
api_base = {api_base}
"""
    path = os.path.join(tmp, "daemon.conf")
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(text)
    return path


def _backlog(db_path: str) -> int:
    conn = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
    try:
        return int(conn.execute(
            "SELECT COUNT(*) FROM jobs WHERE state IN ('queued', 'leased')").fetchone()[0])
    finally:
        conn.close()


def _measure_daemon(tmp: str, requests_file: str, lua: str, duration_s: float, round_no: int,
                    connections: int, sandbox: SandboxProcess, fake: FakeWeChat
                    ) -> dict[str, float]:
    """Ingest of `wxd run` with everything on, then the time its backlog took to drain."""
    db_path = os.path.join(tmp, f"daemon-{round_no}.db")
    port = free_port()
    conf = _daemon_config(tmp, db_path, fake, sandbox.base_url, port)
    calls_before = {p: sandbox.count_calls(p)
                    for p in ("/cgi-bin/user/info", "/cgi-bin/user/info/batchget")}
    daemon = Started([sys.executable, "-m", "wxd", "run", "-c", conf], tmp, f"daemon-{round_no}")
    try:
        rate, total, failed = _wrk(port, requests_file, lua, duration_s, connections)
        stopped = time.perf_counter()
        backlog_at_stop = _backlog(db_path)
        while _backlog(db_path) and time.perf_counter() - stopped < 300:
            time.sleep(0.2)
        drain_s = time.perf_counter() - stopped
    finally:
        daemon.stop()
    conn = sqlite3.connect(db_path)
    try:
        stored = conn.execute("SELECT COUNT(*) FROM inbox").fetchone()[0]
        done = conn.execute("SELECT COUNT(*) FROM jobs WHERE state = 'done'").fetchone()[0]
    finally:
        conn.close()
    calls = {p: sandbox.count_calls(p) - n for p, n in calls_before.items()}
    return {"rate": rate, "total": total, "failed": failed, "stored": stored,
            "jobs_done": done, "backlog_at_stop": backlog_at_stop, "drain_s": drain_s,
            "user_info_calls": calls["/cgi-bin/user/info"],
            "batchget_calls": calls["/cgi-bin/user/info/batchget"]}


def _start_server(kind: str, db_path: str, extra: tuple[str, ...] = ()
                  ) -> tuple[subprocess.Popen[str], int]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench.bench_webhook", "--serve", kind, "--db", db_path, *extra],
        stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line.startswith("READY "):
        proc.kill()
        raise RuntimeError(f"{kind} server did not start: {line!r}")
    return proc, int(line.split()[1])


def _wrk(port: int, requests_file: str, lua: str, duration_s: float,
         connections: int) -> tuple[float, int, int]:
    """(requests/s, requests completed, non-2xx responses + socket errors)."""
    wrk = wrk_path()
    assert wrk is not None
    out = subprocess.run(
        [wrk, "-t1", f"-c{connections}", f"-d{duration_s:g}s", "--latency", "-s", lua,
         f"http://127.0.0.1:{port}{PATH}", "--", requests_file, "1"],
        capture_output=True, text=True, check=True).stdout
    rate = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    total = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    failed = int(bad.group(1)) if bad else 0
    failed += sum(int(g) for g in errors.groups()) if errors else 0
    return rate, total, failed


def _measure(kind: str, tmp: str, requests_file: str, lua: str, duration_s: float,
             round_no: int, connections: int) -> dict[str, float]:
    db_path = os.path.join(tmp, f"{kind}-{round_no}.db")
    proc, port = _start_server(kind, db_path)
    try:
        rate, total, failed = _wrk(port, requests_file, lua, duration_s, connections)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    stored = -1
    if kind == "wxd":
        conn = sqlite3.connect(db_path)
        try:
            stored = conn.execute("SELECT COUNT(*) FROM inbox").fetchone()[0]
            jobs = conn.execute("SELECT COUNT(*) FROM jobs").fetchone()[0]
        finally:
            conn.close()
        if stored != jobs:
            raise RuntimeError(f"{stored} inbox rows but {jobs} jobs")
    return {"rate": rate, "total": total, "failed": failed, "stored": stored}


def run(quick: bool, connections: int = CONNECTIONS) -> list[Result]:
    """Events/s of wxd (ingest), the whole daemon, bare Tornado and wechatpy+Tornado."""
    if wrk_path() is None:
        raise RuntimeError("wrk is not installed (apt-get install -y wrk)")
    duration_s = 3.0 if quick else 6.0
    rounds = 1 if quick else 5
    count = 40_000 if quick else 120_000
    results: dict[str, list[dict[str, float]]] = {kind: [] for kind in SERVERS}
    fake = FakeWeChat(users=DAEMON_USERS, seed=7, follow_ratio=1.0)
    with tempfile.TemporaryDirectory(dir=os.getcwd(), prefix=".bench-webhook-") as tmp, \
            SandboxProcess(DAEMON_USERS, 7, DAEMON_LATENCY_S) as sandbox:
        requests_file = os.path.join(tmp, "requests.tsv")
        daemon_requests = os.path.join(tmp, "daemon-requests.tsv")
        lua = os.path.join(tmp, "cycle.lua")
        with open(lua, "w", encoding="utf-8") as handle:
            handle.write(LUA)
        c = fake.credentials
        generated_at = -math.inf
        for round_no in range(rounds):
            # The requests carry their signing time: make them again before they would leave
            # the replay window (300 s), so that no round measures refusals.
            if time.time() - generated_at > FRESH_FOR_S:
                generated_at = time.time()
                generate(requests_file, count, seed=round_no + 1)
                generate(daemon_requests, count, seed=round_no + 1, token=c.webhook_token,
                         aes_key=c.encoding_aes_key, appid=c.oa_appid,
                         openids=fake.follower_openids)
            # Rotate the order so that no server always runs first (or last) in a round.
            shift = round_no % len(SERVERS)
            for kind in SERVERS[shift:] + SERVERS[:shift]:
                if kind == "daemon":
                    figures = _measure_daemon(tmp, daemon_requests, lua, duration_s, round_no,
                                              connections, sandbox, fake)
                else:
                    figures = _measure(kind, tmp, requests_file, lua, duration_s, round_no,
                                       connections)
                results[kind].append(figures)
    # Median rate of each server over the rounds; per-round ratios are in the notes.
    rate = {kind: statistics.median(r["rate"] for r in runs) for kind, runs in results.items()}
    wxd_runs, daemon_runs = results["wxd"], results["daemon"]
    notes: dict[str, object] = {
        "connections": connections, "duration_s": duration_s, "rounds": rounds,
        "distinct_requests": count,
        "wxd_sent": [int(r["total"]) for r in wxd_runs],
        "wxd_stored": [int(r["stored"]) for r in wxd_runs],
        "failed": {kind: sum(int(r["failed"]) for r in runs) for kind, runs in results.items()},
        "per_round_vs_bare": [round(w["rate"] / b["rate"], 2)
                              for w, b in zip(wxd_runs, results["bare"], strict=True)],
        "per_round_vs_wechatpy": [round(w["rate"] / p["rate"], 2)
                                  for w, p in zip(wxd_runs, results["wechatpy"], strict=True)],
    }
    daemon_notes: dict[str, object] = {
        "sandbox_latency_s": DAEMON_LATENCY_S, "people": DAEMON_USERS,
        "per_round_vs_bare": [round(d["rate"] / b["rate"], 2)
                              for d, b in zip(daemon_runs, results["bare"], strict=True)],
        "stored": [int(r["stored"]) for r in daemon_runs],
        "jobs_done": [int(r["jobs_done"]) for r in daemon_runs],
        "backlog_at_stop": [int(r["backlog_at_stop"]) for r in daemon_runs],
        "drain_s": [round(r["drain_s"], 1) for r in daemon_runs],
        "user_info_calls": [int(r["user_info_calls"]) for r in daemon_runs],
        "batchget_calls": [int(r["batchget_calls"]) for r in daemon_runs],
    }
    for kind, runs in (("wxd", wxd_runs), ("daemon", daemon_runs)):
        for r in runs:
            if r["total"] > count:
                notes["warning"] = f"{kind}: more requests than distinct ones: some were duplicates"
            if r["failed"]:
                notes["warning"] = f"{kind} answered some requests with an error"
            if kind == "daemon" and r["jobs_done"] != r["stored"]:
                daemon_notes["warning"] = "not every stored event was processed"
    label = "webhook: encrypted subscribe events, stored + answered"
    bare_ratio = rate["wxd"] / rate["bare"]
    wechatpy_ratio = rate["wxd"] / rate["wechatpy"]
    daemon_ratio = rate["daemon"] / rate["bare"]
    return [
        Result(label, "events/s", rate["wxd"], "bare tornado `success`", rate["bare"],
               target=">= 0.6x bare", met=bare_ratio >= 0.6, notes=notes),
        Result(label, "events/s", rate["wxd"], "tornado + wechatpy decrypt/parse",
               rate["wechatpy"], target=">= 1.0x wechatpy", met=wechatpy_ratio >= 1.0),
        Result("webhook, whole daemon (event workers on, user/info at 20 ms)", "events/s",
               rate["daemon"], "bare tornado `success`", rate["bare"], target=">= 0.6x bare",
               met=daemon_ratio >= 0.6, notes=daemon_notes),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one 3 s round instead of 5 x 6 s")
    parser.add_argument("--connections", type=int, default=CONNECTIONS,
                        help=f"concurrent connections of the load generator ({CONNECTIONS})")
    parser.add_argument("--serve", choices=("bare", "wechatpy", "wxd"), help=argparse.SUPPRESS)
    parser.add_argument("--db", help=argparse.SUPPRESS)
    parser.add_argument("--callbacks-url", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        logging.basicConfig(level=logging.WARNING)
        asyncio.run(_serve(args.serve, args.db, args.callbacks_url))
        return 0
    print(format_table(run(args.quick, args.connections)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
