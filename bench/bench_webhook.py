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
Event workers do not run (the jobs wait in the durable queue); the figure is ingest.
`python -m bench.bench_webhook [--quick]`.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
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

from bench.common import Result, format_table, wrk_path
from wxd.wechat.crypto import MessageCrypto, sign
from wxd.wechat.messages import render_event_xml

TOKEN = "benchtoken"
AES_KEY = "abcdefghijklmnopqrstuvwxyz0123456789ABCDEFG"
APPID = "wx1234567890abcdef"
PATH = "/wechat"
CONNECTIONS = 64
SERVERS = ("bare", "wechatpy", "wxd")

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


async def _serve(kind: str, db_path: str) -> None:
    from wxd.store.db import Database
    from wxd.webhook import Webhook, make_app

    db = None
    if kind == "wxd":
        db = await Database.open(db_path)
        hook = Webhook(TOKEN, MessageCrypto(TOKEN, AES_KEY, APPID), db)
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
    if db is not None:
        await db.close()


# Driver ---------------------------------------------------------------------------------------


def generate(path: str, count: int, seed: int = 1) -> None:
    """Write `count` distinct signed safe-mode subscribe requests, one "path?query\\tbody" a line."""
    crypto = MessageCrypto(TOKEN, AES_KEY, APPID)
    rng = random.Random(seed)
    ts = str(int(time.time()))
    with open(path, "w", encoding="utf-8") as out:
        for n in range(count):
            nonce = f"{n:07d}{rng.randrange(10**6):06d}"
            xml = render_event_xml({"ToUserName": "gh_0123456789ab",
                                    "FromUserName": f"oBench{n:08d}{rng.randrange(10**6):06d}",
                                    "CreateTime": int(ts) - n % 100, "MsgType": "event",
                                    "Event": "subscribe", "EventKey": ""})
            encrypt = crypto.encrypt(xml, random_prefix=rng.randbytes(16))
            query = urllib.parse.urlencode({
                "signature": sign(TOKEN, ts, nonce), "timestamp": ts, "nonce": nonce,
                "openid": "oBench", "encrypt_type": "aes",
                "msg_signature": sign(TOKEN, ts, nonce, encrypt)})
            body = render_event_xml({"ToUserName": "gh_0123456789ab", "Encrypt": encrypt})
            out.write(f"{PATH}?{query}\t{body}\n")


def _start_server(kind: str, db_path: str) -> tuple[subprocess.Popen[str], int]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench.bench_webhook", "--serve", kind, "--db", db_path],
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
    """Events/s of wxd, bare Tornado and wechatpy+Tornado; ratios against both references."""
    if wrk_path() is None:
        raise RuntimeError("wrk is not installed (apt-get install -y wrk)")
    duration_s = 3.0 if quick else 6.0
    rounds = 1 if quick else 5
    count = 40_000 if quick else 120_000
    results: dict[str, list[dict[str, float]]] = {kind: [] for kind in SERVERS}
    with tempfile.TemporaryDirectory(dir=os.getcwd(), prefix=".bench-webhook-") as tmp:
        requests_file = os.path.join(tmp, "requests.tsv")
        lua = os.path.join(tmp, "cycle.lua")
        with open(lua, "w", encoding="utf-8") as handle:
            handle.write(LUA)
        generate(requests_file, count)
        for round_no in range(rounds):
            # Rotate the order so that no server always runs first (or last) in a round.
            for kind in SERVERS[round_no % 3:] + SERVERS[:round_no % 3]:
                results[kind].append(
                    _measure(kind, tmp, requests_file, lua, duration_s, round_no, connections))
    # Median rate of each server over the rounds; per-round ratios are in the notes.
    rate = {kind: statistics.median(r["rate"] for r in runs) for kind, runs in results.items()}
    wxd_runs = results["wxd"]
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
    for r in wxd_runs:
        if r["total"] > count:
            notes["warning"] = "more requests than distinct ones: some were duplicates"
        if r["failed"]:
            notes["warning"] = "wxd answered some requests with an error"
    label = "webhook: encrypted subscribe events, stored + answered"
    bare_ratio = rate["wxd"] / rate["bare"]
    wechatpy_ratio = rate["wxd"] / rate["wechatpy"]
    return [
        Result(label, "events/s", rate["wxd"], "bare tornado `success`", rate["bare"],
               target=">= 0.6x bare", met=bare_ratio >= 0.6, notes=notes),
        Result(label, "events/s", rate["wxd"], "tornado + wechatpy decrypt/parse",
               rate["wechatpy"], target=">= 1.0x wechatpy", met=wechatpy_ratio >= 1.0),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one 3 s round instead of 5 x 6 s")
    parser.add_argument("--connections", type=int, default=CONNECTIONS,
                        help=f"concurrent connections of the load generator ({CONNECTIONS})")
    parser.add_argument("--serve", choices=SERVERS, help=argparse.SUPPRESS)
    parser.add_argument("--db", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        logging.basicConfig(level=logging.WARNING)
        asyncio.run(_serve(args.serve, args.db))
        return 0
    print(format_table(run(args.quick, args.connections)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
