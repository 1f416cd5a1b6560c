"""Shared benchmark plumbing: result rows, the table printer, process RSS, free ports,
load-generator lookup."""

from __future__ import annotations

import json
import os
import resource
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Result:
    """One comparison: wxd's figure against a reference measured in the same run."""

    benchmark: str
    metric: str                 # e.g. "events/s", "pushes/s", "s", "MB"
    wxd: float
    reference_name: str = ""
    reference: float | None = None
    higher_is_better: bool = True
    target: str = ""            # e.g. ">= 0.6x bare tornado"
    met: bool | None = None
    notes: dict[str, object] = field(default_factory=dict)

    @property
    def ratio(self) -> float | None:
        if self.reference in (None, 0):
            return None
        assert self.reference is not None
        return self.wxd / self.reference


def format_table(results: list[Result]) -> str:
    header = ("benchmark", "metric", "wxd", "reference", "ref value", "ratio", "target", "met")
    rows = [header]
    for r in results:
        rows.append((
            r.benchmark, r.metric, f"{r.wxd:,.1f}", r.reference_name or "-",
            f"{r.reference:,.1f}" if r.reference is not None else "-",
            f"{r.ratio:.2f}x" if r.ratio is not None else "-",
            r.target or "-", {True: "yes", False: "NO", None: "-"}[r.met],
        ))
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(header))]
    lines = ["  ".join(str(cell).ljust(w) for cell, w in zip(row, widths, strict=True))
             for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    notes = [f"  {r.benchmark}: {r.notes}" for r in results if r.notes]
    return "\n".join(lines + (["", "notes:", *notes] if notes else []))


def peak_rss_mb() -> float:
    """Peak resident set size of this process image so far, in MB: VmHWM from /proc.

    Not getrusage's ru_maxrss: Linux carries that across fork + exec, so a child started by a
    big parent (`python -m bench` after the other benchmarks) reports the parent's peak.
    """
    with open("/proc/self/status", encoding="ascii") as handle:
        for line in handle:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rss_mb(pid: int | None = None) -> float:
    """Current RSS of a process (default: this one) in MB, from /proc."""
    with open(f"/proc/{pid or os.getpid()}/status", encoding="ascii") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def free_port() -> int:
    """A TCP port on 127.0.0.1 free right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wrk_path() -> str | None:
    """The wrk load generator if installed (`apt-get install wrk`), else None."""
    return shutil.which("wrk")


# The sandbox in its own process (its own GIL, like the real WeChat on another machine): prints
# its base URL, serves until its stdin closes.
_SANDBOX_SCRIPT = """
import asyncio, sys
from wxd.sandbox import FakeWeChat, SandboxServer

async def main() -> None:
    fake = FakeWeChat(users=int(sys.argv[1]), seed=int(sys.argv[2]), follow_ratio=1.0,
                      latency_s=float(sys.argv[3]))
    server = SandboxServer(fake)
    await server.start()
    print(server.base_url, flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    await server.stop()

asyncio.run(main())
"""


class SandboxProcess:
    """`with SandboxProcess(users, seed, latency_s) as sandbox:` — a seeded emulator in a child
    process (everyone follows); `base_url`, `cpu_s()`, `stats()`, `count_calls(path)`."""

    def __init__(self, users: int, seed: int, latency_s: float, fake: Any = None) -> None:
        self.args = [str(users), str(seed), str(latency_s)]
        self.fake = fake  # optional local replica (same seed) for picking people
        self.proc: subprocess.Popen[str] | None = None
        self.base_url = ""

    def __enter__(self) -> SandboxProcess:
        self.proc = subprocess.Popen([sys.executable, "-c", _SANDBOX_SCRIPT, *self.args],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        self.base_url = self.proc.stdout.readline().strip()
        if not self.base_url.startswith("http"):
            raise RuntimeError("the sandbox did not start")
        return self

    def cpu_s(self) -> float:
        """CPU seconds (user + system) the sandbox process has used so far."""
        assert self.proc is not None
        with open(f"/proc/{self.proc.pid}/stat", encoding="ascii") as handle:
            fields = handle.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stats(self) -> dict[str, Any]:
        with urllib.request.urlopen(self.base_url + "/_sandbox/stats", timeout=30) as answer:
            value: dict[str, Any] = json.load(answer)
            return value

    def count_calls(self, path: str) -> int:
        url = f"{self.base_url}/_sandbox/calls?path={path}"
        with urllib.request.urlopen(url, timeout=60) as answer:
            return int(json.load(answer)["count"])

    def __exit__(self, *_exc: object) -> None:
        if self.proc is not None:
            assert self.proc.stdin is not None
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class Started:
    """One subprocess started with NOTIFY_SOCKET; `ready_s` is Popen → READY=1."""

    def __init__(self, argv: list[str], tmp: str, name: str) -> None:
        address = os.path.join(tmp, f"notify-{name}.sock")
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind(address)
        self._sock.settimeout(0.1)
        env = {**os.environ, "NOTIFY_SOCKET": address}
        started = time.perf_counter()
        self._log = open(os.path.join(tmp, f"{name}.log"), "w")  # closed in stop()
        self.proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=self._log)
        deadline = started + 30
        while True:
            try:
                if self._sock.recv(4096).split(b"\n")[0] == b"READY=1":
                    break
            except TimeoutError:
                pass
            if self.proc.poll() is not None or time.perf_counter() > deadline:
                self.stop()
                with open(self._log.name, encoding="utf-8", errors="replace") as handle:
                    tail = handle.read()[-2000:]
                raise RuntimeError(f"{name} sent no READY=1 (exit {self.proc.returncode}):\n{tail}")
        self.ready_s = time.perf_counter() - started

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._sock.close()
        self._log.close()
