"""Serving the emulator: an in-loop server, a thread-hosted server, and `wxd sandbox`.

Imports tornado, stdlib and the sandbox's own modules; never wxd's service layers.
Only `run` prints (it is the CLI's output).
"""

from __future__ import annotations

import argparse
import asyncio
import inspect
import logging
import signal
import socket
import threading
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Any, TypeVar, overload

import tornado.httpserver
import tornado.netutil

from wxd.sandbox.app import SandboxApplication, make_app
from wxd.sandbox.state import MODES, FakeWeChat

logger = logging.getLogger(__name__)

T = TypeVar("T")
_ThreadT = TypeVar("_ThreadT", bound="SandboxThread")


class SandboxServer:
    """make_app(fake) listening on host:port (0 = a free port) in the running loop.

    `await start()`, then `base_url`; `await stop()` closes the listener, releases hanging
    requests and report tasks, and closes open connections. Both are idempotent.
    """

    def __init__(self, fake: FakeWeChat, host: str = "127.0.0.1", port: int = 0) -> None:
        self.fake = fake
        self.host = host
        self.port = port
        self.app: SandboxApplication = make_app(fake)
        self._server: tornado.httpserver.HTTPServer | None = None

    @property
    def base_url(self) -> str:
        """http://host:port with the bound port; a wildcard host is shown as 127.0.0.1."""
        host = "127.0.0.1" if self.host in ("", "0.0.0.0") else self.host
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.port}"

    async def start(self) -> None:
        if self._server is not None:
            return
        sockets = tornado.netutil.bind_sockets(self.port, self.host, family=socket.AF_INET)
        server = tornado.httpserver.HTTPServer(self.app, xheaders=False)
        server.add_sockets(sockets)
        self.port = sockets[0].getsockname()[1]
        self._server = server
        logger.info("sandbox listening on %s", self.base_url)

    async def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.stop()
        await self.app.aclose()
        await server.close_all_connections()


class SandboxThread:
    """A SandboxServer on its own event loop in a daemon thread, for code that is not async
    (pytest fixtures, subprocess tests, benchmarks).

    `fake` must only be mutated on the sandbox loop: use `call(fn)`, which runs `fn` there
    (awaiting it if it returns an awaitable) and returns its result. Reading is fine anywhere.
    Use as a context manager, or `start()` / `stop()`.
    """

    def __init__(
        self,
        fake: FakeWeChat | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        timeout_s: float = 10.0,
    ) -> None:
        self.fake = fake if fake is not None else FakeWeChat(users=100)
        self.server = SandboxServer(self.fake, host, port)
        self.timeout_s = timeout_s
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._stop_event: asyncio.Event | None = None

    @property
    def base_url(self) -> str:
        return self.server.base_url

    @property
    def port(self) -> int:
        return self.server.port

    def start(self: _ThreadT) -> _ThreadT:
        if self._thread is not None:
            return self
        self._thread = threading.Thread(target=self._main, name="wxd-sandbox", daemon=True)
        self._thread.start()
        if not self._ready.wait(self.timeout_s):
            raise RuntimeError("sandbox thread did not start in time")
        if self._error is not None:
            raise RuntimeError("sandbox thread failed to start") from self._error
        return self

    def _main(self) -> None:
        try:
            asyncio.run(self._amain())
        except BaseException as error:
            if self._ready.is_set():
                logger.exception("sandbox thread failed")
            else:
                self._error = error
                self._ready.set()

    async def _amain(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop_event = asyncio.Event()
        await self.server.start()
        self._ready.set()
        try:
            await self._stop_event.wait()
        finally:
            await self.server.stop()

    @overload
    def call(self, fn: Callable[[], Awaitable[T]]) -> T: ...

    @overload
    def call(self, fn: Callable[[], T]) -> T: ...

    def call(self, fn: Callable[[], Any]) -> Any:
        """Run `fn` on the sandbox loop and return its result, awaited if it is awaitable.
        Thread-safe; waits at most timeout_s."""
        loop = self._loop
        if loop is None or self._thread is None or not self._thread.is_alive():
            raise RuntimeError("sandbox thread is not running")

        async def invoke() -> Any:
            result = fn()
            if inspect.isawaitable(result):
                return await result
            return result

        return asyncio.run_coroutine_threadsafe(invoke(), loop).result(self.timeout_s)

    def stop(self) -> None:
        """Stop the server and the loop and join the thread. Idempotent."""
        thread, loop = self._thread, self._loop
        if thread is None or loop is None:
            return
        stop_event = self._stop_event
        if thread.is_alive() and stop_event is not None:
            loop.call_soon_threadsafe(stop_event.set)
            thread.join(self.timeout_s)
        self._thread = None

    def __enter__(self: _ThreadT) -> _ThreadT:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `wxd sandbox`."""
    parser.add_argument("--host", default="127.0.0.1", help="listen address (127.0.0.1)")
    parser.add_argument("--port", type=int, default=8090, help="listen port, 0 = any (8090)")
    parser.add_argument("--users", type=int, default=1000, help="simulated people (1000)")
    parser.add_argument(
        "--latency-ms",
        default="0",
        help="latency per API call in ms: a number, or MIN-MAX for a random range (0)",
    )
    parser.add_argument(
        "--fault-rate", type=float, default=0.0, help="fraction of API calls that fail (0)"
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed (0)")
    parser.add_argument(
        "--unionid-ratio", type=float, default=1.0,
        help="fraction of people with a unionid (1); 0 = an account without Open Platform, "
             "where only QR link codes and OAuth links can link people")
    parser.add_argument("--webhook", default=None, help="wxd's webhook URL for delivery reports")
    parser.add_argument("--mode", choices=MODES, default="safe", help="webhook mode (safe)")


def parse_latency(text: str) -> float | tuple[float, float]:
    """"20" -> 0.02; "10-50" -> (0.01, 0.05). ValueError for anything else."""
    low, sep, high = text.partition("-")
    if sep:
        return float(low) / 1000, float(high) / 1000
    return float(text) / 1000


def config_snippet(fake: FakeWeChat, base_url: str) -> str:
    """A ready-to-paste wxd config fragment for this sandbox."""
    creds = fake.credentials
    followers = len(fake.follower_openids)
    return "\n".join(
        [
            f"# wxd sandbox: {len(fake.people)} simulated people ({followers} following), "
            f"seed {fake.seed}",
            f"# OA original id {creds.oa_original_id}; control API at {base_url}/_sandbox/",
            "# Paste into your wxd config:",
            "",
            "[webhook]",
            f"token = {creds.webhook_token}",
            f"encoding_aes_key = {creds.encoding_aes_key}",
            "",
            "[official_account]",
            f"appid = {creds.oa_appid}",
            f"secret = {creds.oa_secret}",
            "",
            "[mini_program]",
            f"appid = {creds.mp_appid}",
            f"secret = {creds.mp_secret}",
            "",
            "[wechat]",
            f"api_base = {base_url}",
            "",
        ]
    )


def run(args: argparse.Namespace) -> int:
    """`wxd sandbox`: serve until SIGINT/SIGTERM, then exit 0. Exit 2 for bad options."""
    try:
        latency = parse_latency(str(args.latency_ms))
    except ValueError:
        print(f"wxd sandbox: bad --latency-ms {args.latency_ms!r}")
        return 2
    fake = FakeWeChat(
        users=args.users, seed=args.seed, latency_s=latency, fault_rate=args.fault_rate,
        unionid_ratio=args.unionid_ratio,
    )
    if args.webhook:
        fake.configure_webhook(args.webhook, mode=args.mode)
    return asyncio.run(_serve(fake, args.host, args.port))


async def _serve(fake: FakeWeChat, host: str, port: int) -> int:
    server = SandboxServer(fake, host, port)
    await server.start()
    print(config_snippet(fake, server.base_url), flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    try:
        await stop.wait()
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)
        await server.stop()
    return 0
