"""Coalescer: waiting lookups share batched calls, within max_batch and max_in_flight."""

from __future__ import annotations

import asyncio

import pytest

from tests.helpers import eventually
from wxd.coalesce import Coalescer, split_refused


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


class Refused(Exception):
    pass


class Batches:
    """An upstream that refuses every batch holding a bad key (as batchget does for 40003)."""

    def __init__(self, bad: set[int], alone_ok: set[int] | None = None) -> None:
        self.bad, self.alone_ok = bad, alone_ok or set()
        self.calls: list[list[int]] = []
        self.singles: list[int] = []

    async def call(self, keys: list[int]) -> list[int]:
        self.calls.append(keys)
        if self.bad & set(keys):
            raise Refused(keys)
        return [k * 10 for k in keys]

    async def single(self, key: int) -> int:
        self.singles.append(key)
        if key in self.bad and key not in self.alone_ok:
            raise Refused(key)
        return key * 10


def split(upstream: Batches, keys: list[int], single: bool = True
          ) -> tuple[list[int], list[tuple[int, Exception]]]:
    async def main() -> tuple[list[int], list[tuple[int, Exception]]]:
        return await split_refused(keys, Refused(keys), upstream.call,
                                   lambda exc: isinstance(exc, Refused),
                                   single=upstream.single if single else None)
    return asyncio.run(main())


def test_split_refused_isolates_one_bad_key_in_about_2_log2_n_calls() -> None:
    upstream = Batches({37})
    values, failures = split(upstream, list(range(100)))
    assert sorted(values) == [k * 10 for k in range(100) if k != 37]
    assert [key for key, _ in failures] == [37] and isinstance(failures[0][1], Refused)
    assert len(upstream.calls) + len(upstream.singles) <= 2 * 7  # after the refused call


def test_split_refused_asks_a_lone_key_with_single() -> None:
    upstream = Batches({5}, alone_ok={5})  # refused in a batch, answered alone (user/info)
    values, failures = split(upstream, [5])
    assert (values, failures, upstream.singles, upstream.calls) == ([50], [], [5], [])
    values, failures = split(Batches({5}), [5], single=False)
    assert values == [] and [key for key, _ in failures] == [5]
    upstream = Batches({3})
    values, failures = split(upstream, [1, 2, 3, 4], single=False)
    assert sorted(values) == [10, 20, 40] and [key for key, _ in failures] == [3]
    assert [3] in upstream.calls  # no `single`: a lone key is a batch of one


def test_split_refused_with_many_bad_keys_falls_back_to_one_by_one() -> None:
    upstream = Batches(set(range(0, 100, 2)))  # half the keys
    values, failures = split(upstream, list(range(100)))
    assert sorted(values) == [k * 10 for k in range(1, 100, 2)]
    assert len(failures) == 50
    assert len(upstream.calls) <= 50 and len(upstream.singles) <= 100
    assert len(set(upstream.singles)) == len(upstream.singles)  # each key asked alone once


def test_split_refused_lets_other_errors_through() -> None:
    class Upstream(Batches):
        async def call(self, keys: list[int]) -> list[int]:
            if len(keys) < 50:
                raise RuntimeError("transient")
            return await super().call(keys)

    with pytest.raises(RuntimeError):
        split(Upstream({7}), list(range(100)))
