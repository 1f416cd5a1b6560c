"""systemd socket activation: the listening sockets a service manager passes (sd_listen_fds).

Base: standard library and wxd.config only. Protocol: LISTEN_PID is our pid, LISTEN_FDS the
count of descriptors from fd 3 on, LISTEN_FDNAMES their colon-separated names
(FileDescriptorName=; systemd gives every socket of one .socket unit the same name).
https://www.freedesktop.org/software/systemd/man/latest/sd_listen_fds.html
"""

from __future__ import annotations

import ipaddress
import logging
import socket
from collections.abc import Mapping
from dataclasses import dataclass

from wxd.config import Listen

log = logging.getLogger(__name__)

SD_LISTEN_FDS_START = 3


@dataclass(frozen=True)
class Passed:
    """One descriptor passed by the service manager and the name it was given ("" if none)."""

    fd: int
    name: str


def passed_fds(environ: Mapping[str, str], pid: int) -> list[Passed]:
    """The descriptors passed to process `pid`: none unless LISTEN_PID is `pid` (the variables
    were meant for us, not inherited from a parent) and LISTEN_FDS is a positive number."""
    if environ.get("LISTEN_PID", "").strip() != str(pid):
        return []
    try:
        count = int(environ.get("LISTEN_FDS", ""))
    except ValueError:
        return []
    if count <= 0:
        return []
    names = environ.get("LISTEN_FDNAMES", "").split(":") if environ.get("LISTEN_FDNAMES") else []
    names += [""] * (count - len(names))
    return [Passed(SD_LISTEN_FDS_START + i, names[i]) for i in range(count)]


def _matches(sock: socket.socket, listen: Listen) -> bool:
    """Whether `sock` is bound where `listen` asks: same port, and the same address unless one
    of them is a wildcard (ListenStream=8080 binds [::] where the file says 0.0.0.0:8080)."""
    try:
        host, port = sock.getsockname()[:2]
    except (OSError, ValueError):
        return False
    if port != listen.port:
        return False
    wanted = "127.0.0.1" if listen.host == "localhost" else listen.host
    try:
        ours, theirs = ipaddress.ip_address(host), ipaddress.ip_address(wanted)
    except ValueError:
        return False
    if isinstance(ours, ipaddress.IPv6Address) and ours.ipv4_mapped is not None:
        ours = ours.ipv4_mapped
    return ours.is_unspecified or theirs.is_unspecified or ours == theirs


def assign(passed: list[Passed], wanted: Mapping[str, Listen]) -> dict[str, socket.socket]:
    """Pick the passed listening socket of each wanted listener (name → its [section] listen).

    A descriptor named like a listener ("webhook", "admin") is that listener's; the others are
    matched by the address they are bound to. Descriptors that are no listening TCP socket or
    match nothing are closed with a warning; a listener without a socket binds its own.
    """
    found: dict[str, socket.socket] = {}
    unnamed: list[socket.socket] = []
    for item in passed:
        try:
            sock = socket.socket(fileno=item.fd)
        except OSError as exc:
            log.warning("passed descriptor %d is not a socket (%s); ignored", item.fd, exc)
            continue
        if sock.type != socket.SOCK_STREAM or not sock.getsockopt(socket.SOL_SOCKET,
                                                                   socket.SO_ACCEPTCONN):
            log.warning("passed descriptor %d is not a listening TCP socket; ignored", item.fd)
            sock.detach()
            continue
        sock.set_inheritable(False)
        sock.setblocking(False)
        if item.name in wanted and item.name not in found:
            found[item.name] = sock
        else:
            unnamed.append(sock)
    for sock in unnamed:
        name = next((n for n, listen in wanted.items() if n not in found and _matches(sock, listen)),
                    None)
        if name is None:
            log.warning("passed socket %s matches no listener; closed", sock.getsockname())
            sock.close()
        else:
            found[name] = sock
    return found
