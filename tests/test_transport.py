"""wxd.wechat.transport.KeepAliveClient over real loopback sockets: reuse, bounds, stale retry, errors.

Well-behaved origins are tornado HTTPServers; misbehaving ones (close without answering, hang,
HTTP/1.0, oversized answers) are raw asyncio servers that write exactly the bytes given.
"""

from __future__ import annotations

import asyncio
import functools
import gzip
import ssl
import subprocess
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import tornado.httpserver
import tornado.netutil
import tornado.web
from tornado.testing import AsyncTestCase, bind_unused_port, gen_test

from wxd.metrics import Registry
from wxd.wechat.transport import FetchError, KeepAliveClient


class Echo(tornado.web.RequestHandler):
    """Answers with the client's port, so a test sees which connection carried a request."""

    def check_xsrf_cookie(self) -> None:
        pass

    async def get(self) -> None:
        delay = float(self.get_query_argument("delay", "0"))
        if delay:
            await asyncio.sleep(delay)
        if self.get_query_argument("close", ""):
            self.set_header("Connection", "close")
        if self.get_query_argument("gzip", ""):
            self.set_header("Content-Encoding", "gzip")
            self.finish(gzip.compress(b"compressed " * 100))
            return
        if self.get_query_argument("chunked", ""):
            self.write(b"part1-")
            await self.flush()
            self.finish(b"part2")
            return
        self.finish(str(self.request.connection.stream.socket.getpeername()[1]))  # type: ignore

    async def post(self) -> None:
        self.finish(b"got " + self.request.body + b" " + self.request.headers["Host"].encode())


RawHandler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def read_request(reader: asyncio.StreamReader) -> bytes:
    """One request head plus its Content-Length body."""
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":", 1)[1])
    return head + (await reader.readexactly(length) if length else b"")


class Case(AsyncTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.servers: list[tornado.httpserver.HTTPServer] = []
        self.raw: list[asyncio.Server] = []
        self.writers: list[asyncio.StreamWriter] = []
        self.client = KeepAliveClient(4)

    def tearDown(self) -> None:
        self.client.close()
        for server in self.servers:
            server.stop()
        for raw in self.raw:
            raw.close()
        for writer in self.writers:
            writer.close()
        # Let the closes (and handlers woken by them) run before the loop goes away.
        self.io_loop.run_sync(lambda: asyncio.sleep(0.05))
        super().tearDown()

    def serve(self, **server_args: object) -> str:
        sock, port = bind_unused_port()
        server = tornado.httpserver.HTTPServer(
            tornado.web.Application([(r"/.*", Echo)]), **server_args)
        server.add_sockets([sock])
        self.servers.append(server)
        return f"http://127.0.0.1:{port}"

    async def serve_raw(self, handler: RawHandler) -> str:
        async def closing(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.writers.append(writer)
            try:
                await handler(reader, writer)
            except (ConnectionError, asyncio.IncompleteReadError):
                pass
            finally:
                writer.close()

        raw = await asyncio.start_server(closing, "127.0.0.1", 0)
        self.raw.append(raw)
        return f"http://127.0.0.1:{raw.sockets[0].getsockname()[1]}"


class TestReuse(Case):
    @gen_test
    async def test_sequential_requests_share_one_connection(self) -> None:
        base = self.serve()
        ports = {(await self.client.fetch("GET", base + "/a?x=1")).body for _ in range(20)}
        assert len(ports) == 1
        assert (self.client.stats.opened, self.client.stats.reused) == (1, 19)

    @gen_test
    async def test_pool_events_are_counted_in_metrics(self) -> None:
        registry = Registry()
        client = KeepAliveClient(2, metrics=registry)
        base = self.serve()
        try:
            for _ in range(3):
                await client.fetch("GET", base + "/")
        finally:
            client.close()
        counter = registry.counter("wxd_upstream_connections_total", "", ("event",))
        assert (counter.get(event="opened"), counter.get(event="reused")) == (1, 2)
        assert 'wxd_upstream_connections_total{event="reused"} 2' in registry.render()

    @gen_test
    async def test_concurrency_is_bounded_by_max_connections(self) -> None:
        base = self.serve()
        client = KeepAliveClient(2)
        try:
            answers = await asyncio.gather(*(client.fetch("GET", base + "/?delay=0.02")
                                             for _ in range(12)))
        finally:
            client.close()
        assert len({a.body for a in answers}) <= 2 and client.stats.opened == 2
        assert client.idle_connections() == 0  # closed

    @gen_test
    async def test_connection_close_answer_is_not_reused(self) -> None:
        base = self.serve()
        first = await self.client.fetch("GET", base + "/?close=1")
        second = await self.client.fetch("GET", base + "/")
        assert first.body != second.body and self.client.stats.opened == 2

    @gen_test
    async def test_connection_closed_by_the_server_while_idle_is_dropped(self) -> None:
        base = self.serve(idle_connection_timeout=0.1)
        first = await self.client.fetch("GET", base + "/")
        assert self.client.idle_connections() == 1
        await asyncio.sleep(0.4)  # the server closes it; the idle watch notices
        assert self.client.idle_connections() == 0
        second = await self.client.fetch("GET", base + "/")
        assert first.body != second.body and self.client.stats.retried_stale == 0

    @gen_test
    async def test_idle_timeout_retires_old_connections(self) -> None:
        now = [0.0]
        client = KeepAliveClient(2, idle_timeout_s=30, clock=lambda: now[0])
        base = self.serve()
        try:
            first = await client.fetch("GET", base + "/")
            now[0] = 31.0
            second = await client.fetch("GET", base + "/")
        finally:
            client.close()
        assert first.body != second.body and client.stats.opened == 2

    @gen_test
    async def test_post_body_host_header_gzip_and_chunked(self) -> None:
        base = self.serve()
        answer = await self.client.fetch("POST", base + "/p", body=b"payload",
                                         headers={"Content-Type": "text/plain"})
        assert answer.code == 200 and answer.body == f"got payload {base[7:]}".encode()
        assert (await self.client.fetch("GET", base + "/?gzip=1")).body == b"compressed " * 100
        assert (await self.client.fetch("GET", base + "/?chunked=1")).body == b"part1-part2"
        assert self.client.stats.opened == 1

    @gen_test
    async def test_any_status_is_returned(self) -> None:
        base = self.serve()
        answer = await self.client.fetch("PUT", base + "/", body=b"")
        assert answer.code == 405
        assert (await self.client.fetch("GET", base + "/")).code == 200
        assert self.client.stats.opened == 1


class TestStale(Case):
    async def closing_after_first(self) -> str:
        """An origin that answers the first request of each connection and then, on the next
        request, reads it and closes without a byte (the idle-close race)."""
        self.requests: list[bytes] = []

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.requests.append(await read_request(reader))
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            await writer.drain()
            try:
                self.requests.append(await read_request(reader))
            except asyncio.IncompleteReadError:
                pass
            writer.close()

        return await self.serve_raw(handle)

    @gen_test
    async def test_get_is_resent_once_on_a_new_connection(self) -> None:
        base = await self.closing_after_first()
        first = await self.client.fetch("GET", base + "/")
        answer = await self.client.fetch("GET", base + "/again")
        assert answer.body == b"ok" and self.client.stats.retried_stale == 1
        assert [r.split(b" ")[1] for r in self.requests] == [b"/", b"/again", b"/again"]
        assert answer.resent and not first.resent  # the answer says it was sent twice

    @gen_test
    async def test_post_is_not_resent_unless_replay_safe(self) -> None:
        base = await self.closing_after_first()
        await self.client.fetch("GET", base + "/")
        with pytest.raises(FetchError, match="closed before an answer"):
            await self.client.fetch("POST", base + "/send", body=b"{}")
        await self.client.fetch("GET", base + "/")
        answer = await self.client.fetch("POST", base + "/send", body=b"{}", replay_safe=True)
        assert answer.body == b"ok" and self.client.stats.retried_stale == 1

    @gen_test
    async def test_fresh_connection_closed_without_answer_is_an_error(self) -> None:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await read_request(reader)
            writer.close()

        base = await self.serve_raw(handle)
        with pytest.raises(FetchError, match="closed before an answer"):
            await self.client.fetch("GET", base + "/")
        assert self.client.stats.retried_stale == 0

    @gen_test
    async def test_answer_cut_short_is_an_error_and_not_resent(self) -> None:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await read_request(reader)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nshort")
            await writer.drain()
            writer.close()

        base = await self.serve_raw(handle)
        with pytest.raises(FetchError):
            await self.client.fetch("GET", base + "/")
        assert self.client.idle_connections() == 0 and self.client.stats.retried_stale == 0


async def hang(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Read the request, never answer; return when the client closes the connection."""
    await read_request(reader)
    await reader.read()


async def slow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Answer each request after 0.3 s."""
    while True:
        await read_request(reader)
        await asyncio.sleep(0.3)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nslow")
        await writer.drain()


class TestErrors(Case):
    @gen_test
    async def test_connection_refused(self) -> None:
        sock, port = bind_unused_port()
        sock.close()
        with pytest.raises(FetchError, match="connect failed") as info:
            await self.client.fetch("GET", f"http://127.0.0.1:{port}/x?access_token=SECRET")
        assert "SECRET" not in str(info.value) and not info.value.timed_out

    @gen_test
    async def test_timeout_closes_the_connection_and_releases_the_slot(self) -> None:
        base = await self.serve_raw(hang)
        client = KeepAliveClient(1)
        try:
            with pytest.raises(FetchError, match="timed out") as info:
                await client.fetch("GET", base + "/?access_token=SECRET", request_timeout_s=0.2)
            assert info.value.timed_out and "SECRET" not in str(info.value)
            assert client.idle_connections() == 0
            with pytest.raises(FetchError, match="timed out"):  # the slot was released
                await client.fetch("GET", base + "/", request_timeout_s=0.2)
            assert client.stats.opened == 2
        finally:
            client.close()

    @gen_test
    async def test_waiting_for_a_slot_counts_against_the_timeout(self) -> None:
        base = await self.serve_raw(slow)
        client = KeepAliveClient(1)
        try:
            first = asyncio.ensure_future(client.fetch("GET", base + "/"))
            await asyncio.sleep(0.05)
            with pytest.raises(FetchError, match="free connection"):
                await client.fetch("GET", base + "/", request_timeout_s=0.1)
            assert (await first).body == b"slow"
        finally:
            client.close()

    @gen_test
    async def test_cancelled_request_closes_its_connection(self) -> None:
        base = await self.serve_raw(slow)
        client = KeepAliveClient(1)
        try:
            task = asyncio.ensure_future(client.fetch("GET", base + "/"))
            await asyncio.sleep(0.1)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert client.idle_connections() == 0
            assert (await client.fetch("GET", base + "/", request_timeout_s=1)).body == b"slow"
            assert client.stats.opened == 2
        finally:
            client.close()

    @gen_test
    async def test_cancel_as_a_slot_is_granted_is_never_lost(self) -> None:
        # asyncio.wait_for on 3.11 returns normally when the cancel lands just after the inner
        # wait finished: the caller (a backfill being stopped) would carry on with its call.
        gate = asyncio.Event()

        async def gated(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            while True:
                await read_request(reader)
                await gate.wait()
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                await writer.drain()

        base = await self.serve_raw(gated)
        loop = asyncio.get_running_loop()
        landed: list[int] = []

        def cancel_after(task: asyncio.Future[Any], depth: int, steps: int, *_: Any) -> None:
            if steps:
                loop.call_soon(cancel_after, task, depth, steps - 1)
            elif task.cancel():  # False: the call had already finished
                landed.append(depth)

        for depth in range(6):  # the cancel lands 0..5 loop steps after the slot is released
            client = KeepAliveClient(1)
            try:
                gate.clear()
                first = asyncio.ensure_future(client.fetch("GET", base + "/first"))
                await asyncio.sleep(0.05)
                second = asyncio.ensure_future(client.fetch("GET", base + "/second"))
                await asyncio.sleep(0.01)  # waiting for the only slot
                first.add_done_callback(functools.partial(cancel_after, second, depth, depth))
                gate.set()
                assert (await first).body == b"ok"
                outcome = await asyncio.gather(second, return_exceptions=True)
                if landed[-1:] == [depth]:
                    assert isinstance(outcome[0], asyncio.CancelledError), depth
            finally:
                client.close()
        assert landed[:3] == [0, 1, 2]

    @gen_test
    async def test_oversized_and_malformed_answers(self) -> None:
        async def big(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await read_request(reader)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5000\r\n\r\n" + b"x" * 5000)
            await writer.drain()
            writer.close()

        async def garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await read_request(reader)
            writer.write(b"NOT HTTP AT ALL\r\n\r\n")
            await writer.drain()
            writer.close()

        client = KeepAliveClient(1, max_body_bytes=1000)
        try:
            with pytest.raises(FetchError):
                await client.fetch("GET", await self.serve_raw(big) + "/")
            with pytest.raises(FetchError, match="malformed"):
                await client.fetch("GET", await self.serve_raw(garbage) + "/")
        finally:
            client.close()

    @gen_test
    async def test_truncate_body_cuts_an_oversized_answer_instead_of_failing(self) -> None:
        sizes = (b"Content-Length: 5000\r\n", b"Transfer-Encoding: chunked\r\n")

        async def big(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            framing = sizes[len(self.writers) - 1]
            await read_request(reader)
            body = b"x" * 5000 if b"Length" in framing else b"1388\r\n" + b"x" * 5000 + b"\r\n"
            writer.write(b"HTTP/1.1 201 Created\r\n" + framing + b"\r\n" + body)
            await writer.drain()
            await reader.read()  # hold the connection open: the client must not wait for it

        client = KeepAliveClient(1, max_body_bytes=1000, truncate_body=True)
        try:
            for _ in sizes:
                answer = await client.fetch("POST", await self.serve_raw(big) + "/", body=b"{}")
                assert (answer.code, answer.body, answer.truncated) == (201, b"x" * 1000, True)
            assert client.idle_connections() == 0  # the unread rest: never reused
            small = await client.fetch("POST", self.serve() + "/", body=b"hi")
            assert small.truncated is False and small.body.startswith(b"got hi")
        finally:
            client.close()

    @gen_test
    async def test_a_redirect_is_an_answer_not_followed(self) -> None:
        async def moved(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await read_request(reader)
            writer.write(b"HTTP/1.1 302 Found\r\nLocation: " + elsewhere.encode() +
                         b"/\r\nContent-Length: 0\r\n\r\n")
            await writer.drain()

        elsewhere = self.serve()
        answer = await self.client.fetch("POST", await self.serve_raw(moved) + "/", body=b"x")
        assert answer.code == 302 and answer.headers["Location"] == elsewhere + "/"
        assert self.client.stats.opened == 1  # nothing went to `elsewhere`

    @gen_test
    async def test_http10_answer_without_keep_alive_is_not_reused(self) -> None:
        async def old(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await read_request(reader)
            writer.write(b"HTTP/1.0 200 OK\r\nContent-Length: 3\r\n\r\nold")
            await writer.drain()

        base = await self.serve_raw(old)
        assert (await self.client.fetch("GET", base + "/")).body == b"old"
        assert self.client.idle_connections() == 0

    @gen_test
    async def test_bad_urls_and_closed_client(self) -> None:
        with pytest.raises(FetchError, match="not an http"):
            await self.client.fetch("GET", "ftp://example.com/")
        self.client.close()
        with pytest.raises(FetchError, match="closed"):
            await self.client.fetch("GET", "http://127.0.0.1:1/")


def make_certificate(directory: Path) -> tuple[Path, Path] | None:
    """A self-signed certificate for 127.0.0.1 (openssl CLI), or None without openssl."""
    cert, key = directory / "cert.pem", directory / "key.pem"
    try:
        subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
             "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
             "-keyout", str(key), "-out", str(cert)],
            check=True, capture_output=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    return cert, key


class TestTLS(Case):
    @gen_test(timeout=60)
    async def test_https_is_verified_and_reused(self) -> None:
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            pair = make_certificate(Path(tmp))
            if pair is None:
                pytest.skip("openssl is not available")
            cert, key = pair
            server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            server_ctx.load_cert_chain(str(cert), str(key))
            port = self.serve(ssl_options=server_ctx).rsplit(":", 1)[1]
            base = f"https://127.0.0.1:{port}"
            untrusting = KeepAliveClient(1)
            try:
                with pytest.raises(FetchError, match="connect failed"):
                    await untrusting.fetch("GET", base + "/")
            finally:
                untrusting.close()
            trusting = KeepAliveClient(1, ssl_context=ssl.create_default_context(
                cafile=str(cert)))
            try:
                bodies = {(await trusting.fetch("GET", base + "/")).body for _ in range(3)}
            finally:
                trusting.close()
            assert len(bodies) == 1 and trusting.stats.opened == 1
