"""The daemon as a process: listeners, auth, SIGTERM drain, lock, sd_notify, exit codes."""

from __future__ import annotations

import json
import pathlib
import signal
import socket
import sqlite3
import tempfile
import urllib.error
import urllib.request

import pytest
from tornado.httpclient import AsyncHTTPClient, HTTPClientError
from tornado.testing import AsyncTestCase, gen_test

from tests.helpers import (
    ADMIN_TOKEN,
    AES_KEY,
    OA_APPID,
    WEBHOOK_TOKEN,
    config_text,
    free_port,
    wait_for_port,
    wxd_process,
)
from wxd import config
from wxd.daemon import Daemon
from wxd.sandbox import Credentials, WebhookSender


def admin_get(port: int, path: str, token: str | None = ADMIN_TOKEN) -> tuple[int, dict[str, object]]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        body = json.loads(exc.read())
        exc.close()
        return exc.code, body


class InProcessDaemonTest(AsyncTestCase):
    def setUp(self) -> None:
        super().setUp()
        tmp = tempfile.TemporaryDirectory()
        self.addCleanup(tmp.cleanup)
        self.tmp = pathlib.Path(tmp.name)
        self.config = config.load_text(config_text(str(self.tmp / "wxd.db")))
        self.http = AsyncHTTPClient(force_instance=True)

    def tearDown(self) -> None:
        self.http.close()
        super().tearDown()

    async def fetch(self, daemon: Daemon, path: str, token: str | None = ADMIN_TOKEN
                    ) -> tuple[int, dict[str, object]]:
        assert daemon.admin is not None
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        try:
            response = await self.http.fetch(f"http://127.0.0.1:{daemon.admin.port}{path}",
                                              headers=headers)
        except HTTPClientError as exc:
            assert exc.response is not None
            return exc.code, json.loads(exc.response.body)
        return response.code, json.loads(response.body)

    @gen_test(timeout=20)
    async def test_healthz_auth_and_unknown_routes(self) -> None:
        daemon = Daemon(self.config)
        assert daemon.state == "new"
        await daemon.start()
        services = [*daemon.tokens.values(), daemon.workers, daemon.events, daemon.backfill]
        try:
            # One lifecycle vocabulary: every long-running service reports the same states.
            assert daemon.state == "running"
            assert [s.state for s in services] == ["running"] * len(services)  # type: ignore[union-attr]
            assert await self.fetch(daemon, "/healthz", token=None) == (200, {"status": "ok"})
            code, body = await self.fetch(daemon, "/metrics", token="wrong-token-wrong-token")
            assert code == 401 and body["error"]["code"] == "unauthorized"  # type: ignore[index]
            code, body = await self.fetch(daemon, "/v1/nope", token=None)
            assert code == 401  # unknown routes reveal nothing without the token
            code, body = await self.fetch(daemon, "/v1/nope")
            assert code == 404 and body["error"]["code"] == "not_found"  # type: ignore[index]
        finally:
            await daemon.stop()
        assert daemon.state == "stopped"
        assert [s.state for s in services] == ["stopped"] * len(services)  # type: ignore[union-attr]
        await daemon.stop()  # idempotent

    @gen_test(timeout=20)
    async def test_require_encryption_refuses_plaintext_posts(self) -> None:
        cfg = config.load_text(config_text(str(self.tmp / "enc.db"),
                                           {"webhook": {"require_encryption": "true"}}))
        daemon = Daemon(cfg)
        await daemon.start()
        creds = Credentials(oa_appid=OA_APPID, webhook_token=WEBHOOK_TOKEN, encoding_aes_key=AES_KEY)
        try:
            assert daemon.webhook is not None
            url = f"http://127.0.0.1:{daemon.webhook.port}/wechat"
            for seed, (mode, expected) in enumerate((("plain", 400), ("safe", 200))):
                # distinct seeds: the same nonce and second again would be a replay (403)
                sender = WebhookSender(url, creds, mode=mode, http_client=self.http, seed=seed)
                delivery = await sender.subscribe("oOPENID123")
                assert delivery.status == expected, mode
        finally:
            await daemon.stop()

    @gen_test(timeout=20)
    async def test_lease_and_unreachable_probe_come_from_the_config(self) -> None:
        cfg = config.load_text(config_text(str(self.tmp / "knobs.db"), {
            "wxd": {"lease_s": "15"}, "wechat": {"unreachable_probe_s": "3"}}))
        daemon = Daemon(cfg)
        await daemon.start()
        try:
            assert daemon.workers is not None and daemon.events is not None
            assert daemon.backfill is not None
            for service in (daemon.workers, daemon.events, daemon.backfill):
                assert service.policy.unreachable_probe_s == 3.0, service
            assert daemon.workers._lease_s == 15.0 and daemon.events._lease_s == 15.0
        finally:
            await daemon.stop()

    @gen_test(timeout=20)
    async def test_healthz_is_503_when_the_database_is_unusable(self) -> None:
        daemon = Daemon(self.config)
        await daemon.start()
        try:
            assert daemon.db is not None
            await daemon.db._conn.close()  # simulate a dead connection
            code, body = await self.fetch(daemon, "/healthz", token=None)
            assert code == 503 and body == {"status": "unavailable"}
        finally:
            await daemon.stop()


def start_daemon(tmp: pathlib.Path, env: dict[str, str] | None = None,
                 extra: dict[str, dict[str, object]] | None = None) -> tuple[object, int, int]:
    admin, webhook = free_port(), free_port()
    sections: dict[str, dict[str, object]] = {
        "admin": {"listen": f"127.0.0.1:{admin}"},
        "webhook": {"listen": f"127.0.0.1:{webhook}"},
        **(extra or {}),
    }
    conf = tmp / "wxd.conf"
    conf.write_text(config_text(str(tmp / "wxd.db"), sections))
    proc = wxd_process(["run", "-c", str(conf)], env)
    wait_for_port(admin)
    wait_for_port(webhook)
    return proc, admin, webhook


def test_sigterm_exits_zero_with_the_database_closed(tmp_path: pathlib.Path) -> None:
    proc, admin, _ = start_daemon(tmp_path)
    try:
        assert admin_get(admin, "/healthz", token=None) == (200, {"status": "ok"})
        assert admin_get(admin, "/metrics", token="x" * 20)[0] == 401
    finally:
        proc.send_signal(signal.SIGTERM)  # type: ignore[attr-defined]
        _, stderr = proc.communicate(timeout=15)  # type: ignore[attr-defined]
    assert proc.returncode == 0, stderr  # type: ignore[attr-defined]
    assert "wxd stopped" in stderr
    # Closed cleanly: no WAL left behind, lock released, integrity ok.
    assert not (tmp_path / "wxd.db-wal").exists() or (tmp_path / "wxd.db-wal").stat().st_size == 0
    conn = sqlite3.connect(tmp_path / "wxd.db")
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    conn.close()


def test_second_run_on_the_same_database_refuses(tmp_path: pathlib.Path) -> None:
    proc, _, _ = start_daemon(tmp_path)
    try:
        second_dir = tmp_path / "second"
        second_dir.mkdir()
        conf = second_dir / "wxd.conf"
        conf.write_text(config_text(str(tmp_path / "wxd.db")))
        second = wxd_process(["run", "-c", str(conf)])
        _, stderr = second.communicate(timeout=15)
        assert second.returncode == 2
        assert "in use by another wxd process" in stderr
    finally:
        proc.send_signal(signal.SIGINT)  # type: ignore[attr-defined]
        proc.communicate(timeout=15)  # type: ignore[attr-defined]
    assert proc.returncode == 0  # type: ignore[attr-defined]


def test_sd_notify_ready_watchdog_and_stopping(tmp_path: pathlib.Path) -> None:
    sock_path = str(tmp_path / "notify.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(sock_path)
    listener.settimeout(10)
    try:
        proc, _, _ = start_daemon(tmp_path, env={"NOTIFY_SOCKET": sock_path,
                                                 "WATCHDOG_USEC": "200000"})
        messages = [listener.recv(256).decode() for _ in range(3)]
        assert messages[0] == "READY=1"
        assert "WATCHDOG=1" in messages[1:]
        proc.send_signal(signal.SIGTERM)  # type: ignore[attr-defined]
        proc.communicate(timeout=15)  # type: ignore[attr-defined]
        rest = []
        listener.settimeout(0.5)
        try:
            while True:
                rest.append(listener.recv(256).decode())
        except TimeoutError:
            pass
        assert "STOPPING=1" in rest
    finally:
        listener.close()


@pytest.mark.parametrize(("key", "value"), [("listen", "nonsense"), ("token", "short")])
def test_run_with_bad_config_exits_2_naming_the_key(tmp_path: pathlib.Path, key: str,
                                                    value: str) -> None:
    conf = tmp_path / "wxd.conf"
    conf.write_text(config_text(str(tmp_path / "wxd.db"), {"admin": {key: value}}))
    proc = wxd_process(["run", "-c", str(conf)])
    _, stderr = proc.communicate(timeout=15)
    assert proc.returncode == 2
    assert f"[admin] {key}" in stderr
    assert not (tmp_path / "wxd.db").exists()  # nothing was started
