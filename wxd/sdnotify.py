"""systemd notification protocol (sd_notify) over a plain AF_UNIX datagram socket, no dependency.

Pure: standard library only. Does nothing when NOTIFY_SOCKET is absent.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping

log = logging.getLogger(__name__)


class Notifier:
    """Sends READY=1 / STOPPING=1 / WATCHDOG=1 to systemd when it asked for them."""

    def __init__(self, environ: Mapping[str, str]) -> None:
        address = environ.get("NOTIFY_SOCKET", "")
        # An abstract-namespace socket is written with a leading '@'.
        self._address = "\0" + address[1:] if address.startswith("@") else address
        usec = environ.get("WATCHDOG_USEC", "")
        pid = environ.get("WATCHDOG_PID", "")
        wanted = usec.isdigit() and int(usec) > 0 and (not pid or pid == str(os.getpid()))
        self.watchdog_interval_s: float | None = int(usec) / 2e6 if wanted else None

    def notify(self, state: str) -> None:
        if not self._address:
            return
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.connect(self._address)
                sock.sendall(state.encode())
        except OSError as exc:
            log.warning("sd_notify %s failed: %s", state.split("=")[0], exc)
