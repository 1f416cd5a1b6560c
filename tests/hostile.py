"""Hostile-input campaign: a seeded generator of bad webhook and admin requests, and a sender.

Every generated request must be refused (4xx) and must change nothing. Used by
tests/test_hostile.py against a real `wxd run` process; importable by bench/. Builds requests
with wxd.wechat.crypto/wxd.wechat.messages and pycryptodome; sends them with tornado's AsyncHTTPClient.
"""

from __future__ import annotations

import asyncio
import json
import random
import re
import time
import urllib.parse
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from tornado.httpclient import AsyncHTTPClient, HTTPClientError, HTTPRequest

from tests.hostile_admin import ADMIN_FAMILIES, AdminGen
from tests.hostile_model import Attack, Target, expect
from tests.hostile_oauth import OAUTH_FAMILIES, OAuthGen
from tests.hostile_webhook import WEBHOOK_FAMILIES, WebhookGen

__all__ = ["Attack", "Outcome", "Target", "admin_error_problem", "expect", "generate", "send_all"]

CODE_RE = re.compile(r"[a-z][a-z0-9_]*")


def generate(target: Target, count: int = 10_000, seed: int = 0,
             clock: Callable[[], float] = time.time, admin_share: float = 0.3,
             oauth_share: float = 0.1) -> list[Attack]:
    """At least `count` attacks, seeded: about `admin_share` of them against the admin API and
    `oauth_share` at linking without unionid (the public /oauth/ pages, /v1/links).

    Timestamps are taken from `clock` while generating: send the attacks within the replay
    window (replay_window_s) so that only the intended defect is wrong.
    """
    rng = random.Random(seed)
    hook = WebhookGen(target, rng, clock)
    admin = AdminGen(target, rng)
    oauth = OAuthGen(target, rng)
    w_fams, w_weights = zip(*WEBHOOK_FAMILIES, strict=True)
    a_fams, a_weights = zip(*ADMIN_FAMILIES, strict=True)
    o_fams, o_weights = zip(*OAUTH_FAMILIES, strict=True)
    attacks: list[Attack] = []
    while len(attacks) < count:
        draw = rng.random()
        if draw < oauth_share:
            attacks.extend(rng.choices(o_fams, o_weights)[0](oauth))
        elif draw < oauth_share + admin_share:
            attacks.extend(rng.choices(a_fams, a_weights)[0](admin))
        else:
            attacks.extend(rng.choices(w_fams, w_weights)[0](hook))
    return attacks


# --- sending ---------------------------------------------------------------------------------------

@dataclass(repr=False)
class Outcome:
    """The answers to a campaign: every attack with its status and body (first 64 KB)."""

    answers: list[tuple[Attack, int, bytes]] = field(default_factory=list)
    elapsed_s: float = 0.0

    def __repr__(self) -> str:
        # Short on purpose: asyncio.run's SIGINT clean-up reprs the main task, result included
        # (enum's error message in signal.getsignal), and a full repr here takes seconds.
        return f"Outcome({len(self.answers)} answers in {self.elapsed_s:.1f} s)"

    def by_status(self) -> Counter[int]:
        return Counter(status for _, status, _ in self.answers)

    def problems(self) -> Iterator[str]:
        """Every answer that breaks the campaign's rules, described in one line."""
        for attack, status, body in self.answers:
            where = f"{attack.kind} {attack.method} {attack.path[:120]}"
            if status >= 500 and status != 599:
                yield f"{status} (server error) for {where}: {body[:200]!r}"
            elif status not in attack.expect:
                yield f"{status} not in {sorted(attack.expect)} for {where}: {body[:200]!r}"
            elif attack.server == "admin" and 400 <= status < 500 and attack.method != "HEAD" \
                    and attack.json_error:
                problem = admin_error_problem(body, attack.codes)
                if problem:
                    yield f"{status} {problem} for {where}"
            elif attack.kind == "admin.batch_all_bad" and not _all_items_refused(body):
                yield f"a batch of bad pushes was partly accepted: {body[:300]!r}"


def _all_items_refused(body: bytes) -> bool:
    """A batch of bad pushes answers 202 with one error (4xx http_status) per item."""
    try:
        results = json.loads(body)["results"]
    except (ValueError, KeyError, TypeError):
        return False
    return isinstance(results, list) and all(
        isinstance(r, dict) and "error" in r and r.get("http_status", 0) >= 400 for r in results)


def admin_error_problem(body: bytes, codes: frozenset[str]) -> str | None:
    """None when `body` is {"error": {"code": snake_case (in `codes` if given), "message": str}}."""
    try:
        doc = json.loads(body)
    except ValueError:
        return f"non-JSON error body {body[:80]!r}"
    error = doc.get("error") if isinstance(doc, dict) else None
    if not isinstance(error, dict) or not isinstance(error.get("message"), str):
        return f"error body without error.message: {body[:120]!r}"
    code = error.get("code")
    if not isinstance(code, str) or not CODE_RE.fullmatch(code):
        return f"error code {code!r} is not snake_case"
    if codes and code not in codes:
        return f"error code {code!r} not in {sorted(codes)}"
    return None


async def send_all(attacks: list[Attack], webhook_url: str, admin_url: str, *,
                   concurrency: int = 50, timeout_s: float = 30.0, client: str = "keepalive"
                   ) -> Outcome:
    """Send every attack over HTTP, `concurrency` at a time, wave 0 then wave 1.

    `client` "keepalive": `concurrency` persistent HTTP/1.1 connections per listener (raw
    asyncio streams, paths sent byte for byte; each refusal must leave the connection usable).
    "tornado": AsyncHTTPClient(max_clients=concurrency), one new connection per request.
    Status 599 means no HTTP answer (connection closed or reset); it is acceptable only where
    an attack's `expect` lists it.
    """
    outcome = Outcome()
    bases = {"webhook": webhook_url, "admin": admin_url}
    send = _KeepAlive(bases, timeout_s) if client == "keepalive" else _Tornado(bases, concurrency, timeout_s)
    started = time.perf_counter()
    try:
        for wave in sorted({a.wave for a in attacks}):
            todo = iter([a for a in attacks if a.wave == wave])
            await asyncio.gather(*(_worker(todo, send, outcome) for _ in range(concurrency)))
    finally:
        await send.close()
    outcome.elapsed_s = time.perf_counter() - started
    return outcome


async def _worker(todo: Iterator[Attack], send: _Tornado | _KeepAlive, outcome: Outcome) -> None:
    for attack in todo:  # the iterator is shared: each attack goes to one worker
        status, body = await send.one(attack)
        outcome.answers.append((attack, status, body[:65536]))


class _Tornado:
    def __init__(self, bases: dict[str, str], concurrency: int, timeout_s: float) -> None:
        self.bases, self.timeout_s = bases, timeout_s
        self.client = AsyncHTTPClient(force_instance=True, max_clients=concurrency)

    async def one(self, attack: Attack) -> tuple[int, bytes]:
        request = HTTPRequest(
            self.bases[attack.server] + attack.path, method=attack.method, body=attack.body,
            headers=dict(attack.headers), request_timeout=self.timeout_s,
            connect_timeout=self.timeout_s, allow_nonstandard_methods=True, follow_redirects=False,
            decompress_response=False,
        )
        try:
            response = await self.client.fetch(request, raise_error=False)
        except (OSError, HTTPClientError) as exc:
            # Reset while still sending an oversized body, or closed after an oversized URL.
            return 599, str(exc).encode()
        return response.code, response.body or b""

    async def close(self) -> None:
        self.client.close()


class _KeepAlive:
    """A minimal HTTP/1.1 client: one connection per worker task and listener, reused."""

    def __init__(self, bases: dict[str, str], timeout_s: float) -> None:
        self.addresses = {name: urllib.parse.urlsplit(url) for name, url in bases.items()}
        self.timeout_s = timeout_s
        self.idle: dict[str, list[tuple[asyncio.StreamReader, asyncio.StreamWriter]]] = {
            name: [] for name in bases}

    async def one(self, attack: Attack) -> tuple[int, bytes]:
        address = self.addresses[attack.server]
        pool = self.idle[attack.server]
        # A pooled connection the server closed meanwhile fails before any answer: then (and
        # only then) the request goes again on a fresh connection.
        for reused in ((True, False) if pool else (False,)):
            if reused:
                reader, writer = pool.pop()
            else:
                reader, writer = await asyncio.open_connection(address.hostname, address.port,
                                                               limit=1 << 20)
            try:
                status, body, reusable = await asyncio.wait_for(
                    self._exchange(reader, writer, attack, address.netloc), self.timeout_s)
            except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError,
                    asyncio.TimeoutError) as exc:
                writer.close()
                fresh_failure = isinstance(exc, (ConnectionError, asyncio.IncompleteReadError))
                if reused and fresh_failure and not getattr(exc, "partial", b""):
                    continue
                return 599, repr(exc).encode()
            if reusable:
                pool.append((reader, writer))
            else:
                writer.close()
            return status, body
        raise AssertionError("unreachable")

    async def _exchange(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                        attack: Attack, host: str) -> tuple[int, bytes, bool]:
        lines = [f"{attack.method} {attack.path} HTTP/1.1", f"Host: {host}"]
        lines += [f"{name}: {value}" for name, value in attack.headers.items()]
        if attack.body is not None:
            lines.append(f"Content-Length: {len(attack.body)}")
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        try:
            if attack.body:
                writer.write(attack.body)
            await writer.drain()
        except OSError:
            pass  # the server may answer (and close) before reading an oversized body
        head = await reader.readuntil(b"\r\n\r\n")
        status_line, *header_lines = head.decode("latin-1").split("\r\n")
        status = int(status_line.split(" ", 2)[1])
        headers = {}
        for line in header_lines:
            if ":" in line:
                name, value = line.split(":", 1)
                headers[name.strip().lower()] = value.strip()
        reusable = headers.get("connection", "").lower() != "close" and "content-length" in headers
        if attack.method == "HEAD" or status in (204, 304):
            return status, b"", reusable
        if "content-length" in headers:
            return status, await reader.readexactly(int(headers["content-length"])), reusable
        return status, await reader.read(), False  # no length: the body ends at EOF

    async def close(self) -> None:
        for pool in self.idle.values():
            for _, writer in pool:
                writer.close()
            pool.clear()
