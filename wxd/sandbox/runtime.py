"""Background work of a running emulator: delivery-report tasks, hanging requests, senders.

Imports asyncio, stdlib and the sandbox's own modules (the sender uses tornado.httpclient);
never tornado.web and never wxd's service layers.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any

from wxd.sandbox.endpoints import Report
from wxd.sandbox.state import FakeWeChat, WebhookConfig
from wxd.sandbox.webhook_sender import WebhookSender

logger = logging.getLogger(__name__)

# A "hang" fault holds the request until the client gives up, the server stops, or this long.
HANG_S = 3600.0


class SandboxRuntime:
    """What the emulator runs besides answering: background delivery reports, held (hanging)
    requests and webhook senders. Shared by the API and control handlers; `aclose()` releases
    everything (SandboxApplication.aclose calls it)."""

    def __init__(self, fake: FakeWeChat) -> None:
        self.fake = fake
        self._tasks: set[asyncio.Task[None]] = set()
        self._hangs: dict[asyncio.Event, asyncio.Future[None]] = {}
        self._senders: dict[int, tuple[WebhookConfig, WebhookSender]] = {}
        self.closed = False

    def sender(self) -> WebhookSender | None:
        """The sender for the current webhook configuration, or None when none is set."""
        config = self.fake.webhook
        if config is None:
            return None
        cached = self._senders.get(id(config))
        if cached is not None and cached[0] is config:
            return cached[1]
        sender = WebhookSender(
            config.url,
            self.fake.credentials,
            config.mode,
            retries=config.retries,
            clock=self.fake.clock,
            seed=self.fake.seed,
        )
        self._senders[id(config)] = (config, sender)
        return sender

    def spawn(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        """Run `coro` in the background; the reference is kept and failures are logged."""
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.error("sandbox task %s failed", task.get_name(), exc_info=task.exception())

    def schedule_report(self, report: Report) -> None:
        """POST the TEMPLATESENDJOBFINISH after the configured delay (in the background)."""
        if self.closed:
            return
        config = self.fake.webhook
        delay = config.report_delay_s if config is not None else 0.0
        self.spawn(self._send_report(report, delay), f"sandbox-report-{report.msgid}")

    async def _send_report(self, report: Report, delay_s: float) -> None:
        if delay_s > 0:
            await asyncio.sleep(delay_s)
        sender = self.sender()
        if sender is None:
            return
        delivery = await sender.template_finished(
            report.oa_openid, report.event_msgid, report.status
        )
        if delivery.status != 200:
            logger.warning(
                "delivery report for msgid %d: webhook answered %s (%s)",
                report.msgid,
                delivery.status,
                delivery.error or delivery.body[:100],
            )

    async def hang(self, released: asyncio.Event) -> None:
        """Wait until `released` is set (client gone), aclose() runs, or HANG_S passes."""
        if self.closed:
            return
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._hangs[released] = done
        try:
            await asyncio.wait_for(released.wait(), HANG_S)
        except asyncio.TimeoutError:
            pass
        finally:
            self._hangs.pop(released, None)
            if not done.done():
                done.set_result(None)

    async def aclose(self) -> None:
        """Release hanging requests, cancel pending reports, close senders. Idempotent."""
        self.closed = True
        waiting = list(self._hangs.values())
        for event in list(self._hangs):
            event.set()
        if waiting:
            await asyncio.gather(*waiting)
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        # Senders of earlier webhook configurations are kept until here, so that a report
        # already on its way is not cut off by a reconfiguration.
        for _config, sender in self._senders.values():
            sender.close()
        self._senders.clear()
