"""Batched upstream lookups: Coalescer shares one call among lookups waiting at the same moment;
split_refused isolates the keys that make the upstream refuse a whole batch.

The upstream counterpart of the store's batched write: a burst of follows asks user/info once
per event, yet WeChat's batchget answers 100 openids in one call (and counts once against the
account's daily quota). The other side of batching: one openid WeChat will not describe fails
the whole batchget (50005, 40003, 40032), and must fail only itself. Service level; imports
only the standard library.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

log = logging.getLogger(__name__)
K = TypeVar("K")
V = TypeVar("V")


class Coalescer(Generic[K, V]):
    """`await submit(key)` → the key's result from one `call(keys)` shared with other waiters.

    Keys submitted in the same event-loop step, or while `max_in_flight` calls are running,
    are taken together (up to `max_batch` per call, in arrival order) as soon as a call slot is
    free; a key arriving at an idle coalescer waits one loop step, no longer. `call` returns
    one entry per key, in order: the result, or an exception for that key alone. If `call`
    raises, every key of that call gets the exception. A cancelled waiter does not cancel the
    call the others share.
    """

    def __init__(self, call: Callable[[list[K]], Awaitable[Sequence[V | BaseException]]], *,
                 max_batch: int, max_in_flight: int, name: str = "coalescer") -> None:
        if max_batch < 1 or max_in_flight < 1:
            raise ValueError("max_batch and max_in_flight must be at least 1")
        self._call = call
        self._max_batch = max_batch
        self._max_in_flight = max_in_flight
        self._name = name
        self._waiting: list[tuple[K, asyncio.Future[V]]] = []
        self._running: set[asyncio.Task[None]] = set()
        self._scheduled = False
        self.calls = 0

    async def submit(self, key: K) -> V:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[V] = loop.create_future()
        self._waiting.append((key, future))
        if not self._scheduled:
            self._scheduled = True
            loop.call_soon(self._start_calls)
        return await asyncio.shield(future)

    def _start_calls(self) -> None:
        self._scheduled = False
        self._waiting = [(key, f) for key, f in self._waiting if not f.done()]
        while self._waiting and len(self._running) < self._max_in_flight:
            batch = self._waiting[:self._max_batch]
            del self._waiting[:self._max_batch]
            self.calls += 1
            task = asyncio.create_task(self._run(batch), name=f"wxd-{self._name}")
            self._running.add(task)
            task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._running.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("%s call crashed", self._name, exc_info=task.exception())
        self._start_calls()

    async def _run(self, batch: list[tuple[K, asyncio.Future[V]]]) -> None:
        try:
            results = await self._call([key for key, _ in batch])
            if len(results) != len(batch):
                raise RuntimeError(f"{self._name}: {len(results)} results for {len(batch)} keys")
        except Exception as exc:
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc)
            return
        except BaseException:
            for _, future in batch:
                future.cancel()
            raise
        for (_, future), result in zip(batch, results, strict=True):
            if future.done():
                continue
            if isinstance(result, BaseException):
                future.set_exception(result)
            else:
                future.set_result(result)


async def split_refused(
    keys: Sequence[K], error: Exception,
    call: Callable[[list[K]], Awaitable[Sequence[V]]],
    refused: Callable[[Exception], bool], *,
    single: Callable[[K], Awaitable[V]] | None = None,
) -> tuple[list[V], list[tuple[K, Exception]]]:
    """`keys` were refused as a whole by `call` with `error`, because of some of them (batchget
    answers 40003 for all 100 openids when one is bad): (the answers for every key the upstream
    does answer, in no particular order; the keys refused alone, each with its error).

    Bisection: each half is asked again with `call`, a half refused (`refused(exc)`) is split
    again, so b bad keys among n cost at most about 2·b·log2(n) calls. A part of one key is
    asked with `single(key)` when given (user/info answers where a lone batchget refuses), else
    with call([key]); a key refused alone is returned with its error (a lone key in `keys`
    without `single` is returned with `error` at once). Many bad keys: once the halves have
    cost len(keys) // 2 calls, each key of the parts still to ask is asked alone (never more
    than 1.5·n calls after the refused one). An error `refused` does not accept propagates at once (retries,
    pauses and failures stay the caller's business).
    """
    values: list[V] = []
    failures: list[tuple[K, Exception]] = []
    budget = len(keys) // 2

    async def alone(key: K) -> None:
        try:
            if single is not None:
                values.append(await single(key))
            else:
                values.extend(await call([key]))
        except Exception as exc:
            if not refused(exc):
                raise
            failures.append((key, exc))

    async def split(part: list[K]) -> None:
        nonlocal budget
        middle = (len(part) + 1) // 2
        for half in (part[:middle], part[middle:]):
            if len(half) == 1 or budget <= 0:
                for key in half:
                    await alone(key)
                continue
            budget -= 1
            try:
                values.extend(await call(half))
            except Exception as exc:
                if not refused(exc):
                    raise
                await split(half)

    if len(keys) > 1:
        await split(list(keys))
    elif keys and single is not None:
        await alone(keys[0])
    else:
        failures.extend((key, error) for key in keys)
    return values, failures
