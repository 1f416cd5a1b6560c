"""Shared test helpers: config text factory, free ports, daemon subprocess runner."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Mapping

ADMIN_TOKEN = "test-admin-token-0123456789"
WEBHOOK_TOKEN = "testtoken"
AES_KEY = "abcdefghijklmnopqrstuvwxyz0123456789ABCDEFG"
OA_APPID = "wx1234567890abcdef"
MP_APPID = "wxfedcba0987654321"


def config_text(database: str, sections: Mapping[str, Mapping[str, object]] | None = None,
                mini_program: bool = True) -> str:
    """A valid wxd.conf for tests; `sections` overrides or adds keys (None value removes a key)."""
    base: dict[str, dict[str, object]] = {
        "wxd": {"database": database, "shutdown_timeout_s": 5, "log_level": "info"},
        "webhook": {"listen": "127.0.0.1:0", "path": "/wechat", "token": WEBHOOK_TOKEN,
                    "encoding_aes_key": AES_KEY},
        "admin": {"listen": "127.0.0.1:0", "token": ADMIN_TOKEN},
        "official_account": {"appid": OA_APPID, "secret": "oa-secret-value"},
        "wechat": {"api_base": "http://127.0.0.1:9"},
    }
    if mini_program:
        base["mini_program"] = {"appid": MP_APPID, "secret": "mp-secret-value"}
    for name, values in (sections or {}).items():
        section = base.setdefault(name, {})
        for key, value in values.items():
            if value is None:
                section.pop(key, None)
            else:
                section[key] = value
    lines: list[str] = []
    for name, values in base.items():
        lines.append(f"[{name}]")
        lines.extend(f"{key} = {value}" for key, value in values.items())
        lines.append("")
    return "\n".join(lines)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wxd_process(args: list[str], env: Mapping[str, str] | None = None) -> subprocess.Popen[str]:
    """Start `python -m wxd ARGS` with stderr captured (text)."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.Popen(
        [sys.executable, "-m", "wxd", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, env=full_env,
    )


def wait_for_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listening on port {port}")


def sandbox_config_text(database: str, creds: object, api_base: str, admin_port: int,
                        webhook_port: int, extra: Mapping[str, Mapping[str, object]] | None = None
                        ) -> str:
    """A wxd.conf pointing at a sandbox with the sandbox's credentials (a Credentials object)."""
    c = creds
    sections: dict[str, dict[str, object]] = {
        "webhook": {"listen": f"127.0.0.1:{webhook_port}", "token": c.webhook_token,  # type: ignore[attr-defined]
                    "encoding_aes_key": c.encoding_aes_key},  # type: ignore[attr-defined]
        "admin": {"listen": f"127.0.0.1:{admin_port}"},
        "official_account": {"appid": c.oa_appid, "secret": c.oa_secret},  # type: ignore[attr-defined]
        "mini_program": {"appid": c.mp_appid, "secret": c.mp_secret},  # type: ignore[attr-defined]
        "wechat": {"api_base": api_base},
        "backfill": {"rate_per_s": 0},
    }
    for name, values in (extra or {}).items():
        sections.setdefault(name, {}).update(values)
    return config_text(database, sections)
