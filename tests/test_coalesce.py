"""Coalescer: waiting lookups share batched calls, within max_batch and max_in_flight."""

from __future__ import annotations

import asyncio

import pytest

from tests.helpers import eventually
from wxd.coalesce import Coalescer


class Upstream:
    """A batch call that records its batches and holds each until released."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []
        self.running = 0
        self.most_running = 0
        self.release = asyncio.Event()

    async def __call__(self, keys: list[int]) -> list[int | BaseException]:
        self.batches.append(keys)
        self.running += 1
        self.most_running = max(self.most_running, self.running)
        try:
            await self.release.wait()
        finally:
            self.running -= 1
        return [ValueError(f"bad {k}") if k < 0 else k * 10 for k in keys]


def test_keys_waiting_together_share_calls_within_the_bounds() -> None:
    async def main() -> None:
        upstream = Upstream()
        coalescer: Coalescer[int, int] = Coalescer(upstream, max_batch=3, max_in_flight=2)
        waiters = [asyncio.ensure_future(coalescer.submit(k)) for k in range(10)]
        await eventually(lambda: upstream.running, "two calls in flight", until=lambda n: n == 2)
        assert upstream.batches == [[0, 1, 2], [3, 4, 5]]  # two in flight, the rest wait
        upstream.release.set()
        assert await asyncio.gather(*waiters) == [k * 10 for k in range(10)]
        assert upstream.batches[2:] == [[6, 7, 8], [9]] and upstream.most_running == 2

    asyncio.run(main())


def test_an_error_for_one_key_is_that_waiters_alone() -> None:
    async def main() -> None:
        upstream = Upstream()
        upstream.release.set()
        coalescer: Coalescer[int, int] = Coalescer(upstream, max_batch=10, max_in_flight=1)
        results = await asyncio.gather(*(coalescer.submit(k) for k in (1, -2, 3)),
                                       return_exceptions=True)
        assert results[0] == 10 and results[2] == 30 and isinstance(results[1], ValueError)
        assert upstream.batches == [[1, -2, 3]]

    asyncio.run(main())


def test_a_failed_call_fails_each_of_its_waiters() -> None:
    async def failing(keys: list[int]) -> list[int | BaseException]:
        raise ConnectionError("upstream down")

    async def main() -> None:
        coalescer: Coalescer[int, int] = Coalescer(failing, max_batch=10, max_in_flight=1)
        results = await asyncio.gather(*(coalescer.submit(k) for k in range(3)),
                                       return_exceptions=True)
        assert all(isinstance(r, ConnectionError) for r in results)

    asyncio.run(main())


def test_a_cancelled_waiter_does_not_cancel_the_shared_call() -> None:
    async def main() -> None:
        upstream = Upstream()
        coalescer: Coalescer[int, int] = Coalescer(upstream, max_batch=10, max_in_flight=1)
        first = asyncio.ensure_future(coalescer.submit(1))
        second = asyncio.ensure_future(coalescer.submit(2))
        await eventually(lambda: upstream.running, "the shared call in flight")
        first.cancel()
        upstream.release.set()
        assert await second == 20
        with pytest.raises(asyncio.CancelledError):
            await first
        assert upstream.batches == [[1, 2]]

    asyncio.run(main())


def test_bounds_are_checked() -> None:
    with pytest.raises(ValueError):
        Coalescer(Upstream(), max_batch=0, max_in_flight=1)
