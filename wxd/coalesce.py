"""Coalescer: upstream lookups waiting at the same moment share one batched call.

The upstream counterpart of the store's batched write: a burst of follows asks user/info once
per event, yet WeChat's batchget answers 100 openids in one call (and counts once against the
account's daily quota). Service level; imports only the standard library.
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
