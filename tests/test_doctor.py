"""`wxd doctor` against the emulator: all good, then each failure mode with its exact fix line
(IP not whitelisted, wrong secret, admin confirmation, unwritable database, unreachable webhook,
no unionid, clock skew, public_url), the JSON form and the exit codes."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import pathlib
import shutil
import sqlite3
import subprocess
from collections.abc import Iterator, Mapping

import pytest

from tests.helpers import free_port, sandbox_config_text
from wxd import cli, config
from wxd.clock import SystemClock
from wxd.config import Config
from wxd.daemon import Daemon
from wxd.doctor import FAIL, OK, SKIP, Check, Doctor
from wxd.sandbox import FakeWeChat, SandboxThread

OA_CONSOLE = "mp.weixin.qq.com → 设置与开发 → 基本配置"


class Shifted(SystemClock):
    """The real clock moved by `offset_s` (a host whose clock is off)."""

    def __init__(self, offset_s: float) -> None:
        self.offset_s = offset_s

    def now(self) -> float:
        return super().now() + self.offset_s


def write_conf(tmp: pathlib.Path, sandbox: SandboxThread,
               extra: Mapping[str, Mapping[str, object]] | None = None) -> pathlib.Path:
    path = tmp / "wxd.conf"
    path.write_text(sandbox_config_text(str(tmp / "wxd.db"), sandbox.fake.credentials,
                                        sandbox.base_url, free_port(), free_port(), extra))
    return path


def diagnose(conf: pathlib.Path, *, daemon: bool = True, clock: SystemClock | None = None
             ) -> dict[str, Check]:
    """Run the doctor (with `wxd run` in the same loop when `daemon`); checks by name."""
    cfg = config.load(str(conf))

    async def run() -> list[Check]:
        running = Daemon(cfg) if daemon else None
        if running is not None:
            await running.start()
        try:
            return await Doctor(cfg, clock=clock or SystemClock()).run()
        finally:
            if running is not None:
                await running.stop()

    checks = asyncio.run(run())
    names = [check.name for check in checks]
    assert len(set(names)) == len(names)
    return {check.name: check for check in checks}


def lines(checks: Mapping[str, Check]) -> str:
    return "\n".join(check.line() for check in checks.values())


def test_all_good(tmp_path: pathlib.Path, sandbox: SandboxThread) -> None:
    checks = diagnose(write_conf(tmp_path, sandbox))
    assert list(checks) == ["config", "database", "database integrity", "database schema",
                            "official_account token", "mini_program token", "templates",
                            "webhook", "unionid", "clock"]
    assert all(c.status == OK for c in checks.values()), lines(checks)
    assert all(c.line().startswith("✓ ") and " — " not in c.line() for c in checks.values())
    assert checks["templates"].detail == f"{len(sandbox.fake.templates)} readable"
    assert "bound to an Open Platform account" in checks["unionid"].detail
    # The secrets never show.
    text = lines(checks)
    for secret in (sandbox.fake.credentials.oa_secret, sandbox.fake.credentials.mp_secret,
                   sandbox.fake.credentials.webhook_token):
        assert secret not in text


def test_ip_not_whitelisted(tmp_path: pathlib.Path, sandbox: SandboxThread) -> None:
    sandbox.call(lambda: sandbox.fake.refuse_tokens(40164, app="oa", ips=["203.0.113.7"]))
    checks = diagnose(write_conf(tmp_path, sandbox), daemon=False)
    assert checks["official_account token"].line() == (
        "✗ official_account token: WeChat refused our IP 203.0.113.7 (40164) — add IP "
        f"203.0.113.7 to the IP whitelist ({OA_CONSOLE} → IP白名单)")
    assert checks["mini_program token"].status == OK
    assert checks["templates"].status == SKIP and checks["unionid"].status == SKIP


def test_ip_of_the_caller_and_the_mp_console(tmp_path: pathlib.Path,
                                             sandbox: SandboxThread) -> None:
    sandbox.call(lambda: sandbox.fake.refuse_tokens(40164, app="mp"))
    checks = diagnose(write_conf(tmp_path, sandbox), daemon=False)
    assert checks["mini_program token"].line() == (
        "✗ mini_program token: WeChat refused our IP 127.0.0.1 (40164) — add IP 127.0.0.1 to "
        "the IP whitelist (mp.weixin.qq.com → 开发 → 开发管理 → 开发设置 → IP白名单)")
    assert checks["official_account token"].status == OK
    # 61004 (the newer docs' code for the same refusal) may name no address.
    sandbox.call(lambda: sandbox.fake.clear_faults())
    sandbox.call(lambda: sandbox.fake.refuse_tokens(61004, app="oa"))
    checks = diagnose(write_conf(tmp_path, sandbox), daemon=False)
    assert checks["official_account token"].line() == (
        "✗ official_account token: WeChat refused this server's IP (61004) — add this server's "
        f"public IP to the IP whitelist ({OA_CONSOLE} → IP白名单)")


def test_wrong_secret(tmp_path: pathlib.Path, sandbox: SandboxThread) -> None:
    conf = write_conf(tmp_path, sandbox, {"official_account": {"secret": "0" * 32}})
    checks = diagnose(conf, daemon=False)
    assert checks["official_account token"].line() == (
        "✗ official_account token: WeChat refused the AppSecret (40125) — set "
        f"[official_account] secret to the current AppSecret ({OA_CONSOLE} → AppSecret; reset "
        "it there if it is lost)")


def test_admin_must_confirm(tmp_path: pathlib.Path, sandbox: SandboxThread) -> None:
    sandbox.call(lambda: sandbox.fake.refuse_tokens(89503))
    checks = diagnose(write_conf(tmp_path, sandbox), daemon=False)
    assert checks["official_account token"].line() == (
        "✗ official_account token: WeChat wants the account admin to confirm this server's IP "
        "(89503) — the admin must confirm: WeChat sent the admin a message about this IP; "
        "confirm it there, then run wxd doctor again")


def test_unreachable_webhook(tmp_path: pathlib.Path, sandbox: SandboxThread) -> None:
    conf = write_conf(tmp_path, sandbox)
    checks = diagnose(conf, daemon=False)
    port = config.load(str(conf)).webhook.listen.port
    webhook = checks["webhook"]
    assert webhook.status == FAIL
    assert webhook.detail.startswith(f"nothing answers at http://127.0.0.1:{port}/wechat (")
    assert "Connection refused" in webhook.detail
    assert webhook.fix == ("start wxd (systemctl start wxd, or wxd run -c FILE), or check "
                           "[webhook] listen")
    assert [name for name, c in checks.items() if c.status == FAIL] == ["webhook"]


def test_wrong_webhook_token(tmp_path: pathlib.Path, sandbox: SandboxThread) -> None:
    conf = write_conf(tmp_path, sandbox)
    cfg = config.load(str(conf))

    async def run() -> Check:
        daemon = Daemon(cfg)
        await daemon.start()
        try:
            wrong = config.load(str(conf), {"WXD_WEBHOOK_TOKEN": "SomeoneElsesToken"})
            return (await Doctor(wrong).webhooks())[0]
        finally:
            await daemon.stop()

    check = asyncio.run(run())
    assert check.status == FAIL and check.detail.endswith("refused the signed verification (403)")


@contextlib.contextmanager
def read_only(directory: pathlib.Path) -> Iterator[None]:
    """`directory` and what is in it unwritable, for root too (chattr +i) or by permissions."""
    if os.geteuid() != 0:
        files = list(directory.iterdir())
        for path in files:
            path.chmod(0o444)
        directory.chmod(0o555)
        try:
            yield
        finally:
            directory.chmod(0o755)
            for path in files:
                path.chmod(0o644)
        return
    if shutil.which("chattr") is None:
        pytest.skip("running as root without chattr: cannot make a directory unwritable")
    targets = [str(p) for p in directory.iterdir()] + [str(directory)]
    if subprocess.run(["chattr", "+i", *targets], capture_output=True, check=False).returncode:
        pytest.skip("this file system has no immutable attribute")
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", *targets], check=True)


def test_unwritable_database(tmp_path: pathlib.Path, sandbox: SandboxThread) -> None:
    data = tmp_path / "data"
    data.mkdir()
    conf = write_conf(tmp_path, sandbox, {"wxd": {"database": str(data / "wxd.db")}})
    diagnose(conf)  # creates the database
    with read_only(data):
        checks = diagnose(conf, daemon=False)
    database = checks["database"]
    assert database.status == FAIL and database.detail.startswith(f"{data / 'wxd.db'}: ")
    assert database.fix == (f"give the user wxd runs as write access to {data / 'wxd.db'} and to "
                            f"{data} (SQLite writes -wal and -shm files beside it), or set "
                            "[wxd] database")
    # Unwritable is not damaged: the integrity line never asks for a restore.
    assert checks["database integrity"].status in (OK, SKIP), lines(checks)


def test_missing_database_directory(tmp_path: pathlib.Path, sandbox: SandboxThread) -> None:
    missing = tmp_path / "nowhere"
    conf = write_conf(tmp_path, sandbox, {"wxd": {"database": str(missing / "wxd.db")}})
    checks = diagnose(conf, daemon=False)
    assert checks["database"].line() == (
        f"✗ database: {missing / 'wxd.db'}: the directory {missing} does not exist — create "
        f"{missing}, writable by the user wxd runs as (systemd's StateDirectory=wxd creates "
        "/var/lib/wxd), or set [wxd] database")
    assert checks["database schema"].status == SKIP


def test_new_database_and_newer_schema(tmp_path: pathlib.Path, sandbox: SandboxThread) -> None:
    conf = write_conf(tmp_path, sandbox)
    checks = diagnose(conf, daemon=False)
    assert checks["database"].status == OK and "does not exist yet" in checks["database"].detail
    diagnose(conf)
    with contextlib.closing(sqlite3.connect(tmp_path / "wxd.db")) as conn:
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        conn.execute(f"PRAGMA user_version = {version + 1}")
    checks = diagnose(conf, daemon=False)
    assert checks["database schema"].line() == (
        f"✗ database schema: version {version + 1} is newer than this wxd's {version} — "
        "upgrade wxd, or restore a backup this version made")


def test_damaged_database(tmp_path: pathlib.Path, sandbox: SandboxThread) -> None:
    conf = write_conf(tmp_path, sandbox)
    (tmp_path / "wxd.db").write_bytes(b"SQLite format 3\x00" + bytes(range(256)) * 64)
    checks = diagnose(conf, daemon=False)
    integrity = checks["database integrity"]
    assert integrity.status == FAIL and integrity.fix == (
        "stop wxd, copy the latest `wxd backup` over it, remove its -wal and -shm files, "
        "start wxd")


def test_no_unionid(tmp_path: pathlib.Path) -> None:
    with SandboxThread(FakeWeChat(users=50, seed=3, unionid_ratio=0.0)) as sandbox:
        checks = diagnose(write_conf(tmp_path, sandbox))
    unionid = checks["unionid"]
    assert unionid.status == FAIL
    assert unionid.fix.startswith("bind the OA and the MP to one Open Platform account")
    assert "qrcode (parametric QR) and oauth (web authorization)" in unionid.fix


def test_clock_skew(tmp_path: pathlib.Path, sandbox: SandboxThread) -> None:
    checks = diagnose(write_conf(tmp_path, sandbox), clock=Shifted(-120))
    clock = checks["clock"]
    assert clock.status == FAIL and clock.detail.endswith(" s behind WeChat's Date")
    assert 115 <= int(clock.detail.split()[3]) <= 125  # the Date header has whole seconds
    assert "timedatectl set-ntp true" in clock.fix
    assert checks["webhook"].status == OK  # 120 s is inside the replay window


def test_public_url(tmp_path: pathlib.Path, sandbox: SandboxThread) -> None:
    port = free_port()
    conf = write_conf(tmp_path, sandbox, {"webhook": {
        "listen": f"127.0.0.1:{port}", "public_url": f"http://127.0.0.1:{port}"}})
    checks = diagnose(conf)
    assert checks["webhook public_url"].line() == (
        f"✗ webhook public_url: http://127.0.0.1:{port}/wechat answers, but WeChat calls only "
        "ports 80 and 443 — serve it on port 443 (or 80) and set public_url to match")
    dead = free_port()
    conf = write_conf(tmp_path, sandbox, {"webhook": {"public_url": f"http://127.0.0.1:{dead}/wechat"}})
    check = diagnose(conf)["webhook public_url"]
    assert check.status == FAIL and check.detail.startswith(
        f"nothing answers at http://127.0.0.1:{dead}/wechat (")
    assert check.fix == "make it reach [webhook] listen (DNS, the TLS terminator's proxy_pass)"


def test_cli_json_and_exit_codes(tmp_path: pathlib.Path, sandbox: SandboxThread,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    conf = write_conf(tmp_path, sandbox)
    assert cli.main(["doctor", "-c", str(conf), "--json"]) == 1  # no daemon: the webhook fails
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] is False
    assert {c["name"]: c["status"] for c in report["checks"]}["webhook"] == "fail"
    assert cli.main(["doctor", "-c", str(tmp_path / "missing.conf")]) == 2
    assert "cannot read" in capsys.readouterr().err
    broken = write_conf(tmp_path, sandbox, {"admin": {"listen": "nowhere"}})
    assert cli.main(["doctor", "-c", str(broken)]) == 1
    out = capsys.readouterr().out
    assert out.startswith("✗ config: [admin] listen: ") and f"— edit {broken}" in out


def test_cli_all_good(tmp_path: pathlib.Path, sandbox: SandboxThread,
                      capsys: pytest.CaptureFixture[str]) -> None:
    conf = write_conf(tmp_path, sandbox)
    cfg: Config = config.load(str(conf))

    async def run() -> int:
        daemon = Daemon(cfg)
        await daemon.start()
        try:
            return await asyncio.get_running_loop().run_in_executor(
                None, cli.main, ["doctor", "-c", str(conf)])
        finally:
            await daemon.stop()

    assert asyncio.run(run()) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 10 and all(line.startswith("✓ ") for line in out), out
