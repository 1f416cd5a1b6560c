"""Listener.stop(): stop accepting, answer every request begun and every connection accepted
before the stop, close idle keep-alive connections at once."""

from __future__ import annotations

import asyncio
import socket
import time

import tornado.web
from tornado import iostream
from tornado.testing import AsyncTestCase, gen_test

from wxd.config import Listen
from wxd.listener import DrainingServer, Listener


class Slow(tornado.web.RequestHandler):
    async def get(self) -> None:
        await asyncio.sleep(float(self.get_query_argument("s", "0")))
        self.finish("done")


def app() -> tornado.web.Application:
    return tornado.web.Application([(r"/", Slow)])


def request(path: str = "/", close: bool = True) -> bytes:
    connection = "Connection: close\r\n" if close else ""
    return f"GET {path} HTTP/1.1\r\nHost: x\r\n{connection}\r\n".encode()


class ListenerStopTest(AsyncTestCase):
    @gen_test(timeout=20)
    async def test_stop_answers_what_it_accepted_and_closes_idle_connections(self) -> None:
        listener = Listener("test", app(), Listen("127.0.0.1", 0), 1 << 20, drain_timeout_s=5)
        await listener.start()
        port = listener.port
        # busy: a request in its handler; fresh: accepted, its request sent after the stop;
        # idle: a kept-alive connection between requests.
        busy_r, busy_w = await asyncio.open_connection("127.0.0.1", port)
        busy_w.write(request("/?s=0.5"))
        idle_r, idle_w = await asyncio.open_connection("127.0.0.1", port)
        idle_w.write(request(close=False))
        first = await idle_r.readuntil(b"done")
        assert first.startswith(b"HTTP/1.1 200")
        fresh_r, fresh_w = await asyncio.open_connection("127.0.0.1", port)
        await asyncio.sleep(0.1)  # all three accepted
        started = time.monotonic()
        stopping = asyncio.ensure_future(listener.stop())
        await asyncio.sleep(0.2)
        fresh_w.write(request())
        answers = await asyncio.gather(busy_r.read(), fresh_r.read(), idle_r.read())
        await stopping
        assert answers[0].startswith(b"HTTP/1.1 200") and answers[0].endswith(b"done")
        assert answers[1].startswith(b"HTTP/1.1 200") and answers[1].endswith(b"done")
        assert answers[2] == b""  # closed between requests
        assert time.monotonic() - started < 4  # nobody waited for the bound
        with socket.socket() as probe:
            assert probe.connect_ex(("127.0.0.1", port)) != 0  # no longer listening
        for writer in (busy_w, idle_w, fresh_w):
            writer.close()

    @gen_test
    async def test_a_connection_first_served_during_the_drain_is_not_cut(self) -> None:
        """Tornado may start serving a connection it accepted just before the stop only once
        the drain has begun: its first start_request must not close it."""
        server = DrainingServer(app())
        ours, theirs = socket.socketpair()
        stream = iostream.IOStream(ours)
        conn = type("Conn", (), {"stream": stream})()
        try:
            server._draining = True
            server.start_request(conn, None)  # type: ignore[arg-type]
            assert not stream.closed()
            server.start_request(conn, None)  # type: ignore[arg-type]  # after its request
            assert stream.closed()
        finally:
            stream.close()
            theirs.close()
