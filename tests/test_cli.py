"""The CLI in-process (cli.main(argv)) against a real daemon process and a sandbox."""

from __future__ import annotations

import json
import pathlib
import re
import signal
import sqlite3
import subprocess
import time
from collections.abc import Iterator

import pytest

from tests.helpers import (
    ADMIN_TOKEN,
    free_port,
    sandbox_config_text,
    wait_for_port,
    wxd_process,
)
from wxd import cli
from wxd.sandbox import NOTICE_TEMPLATE_ID, FakeWeChat, SandboxThread
from wxd.store import callbacks as cb


class Running:
    def __init__(self, conf: pathlib.Path, sandbox: SandboxThread, admin_port: int,
                 proc: subprocess.Popen[str]) -> None:
        self.conf = conf
        self.sandbox = sandbox
        self.fake = sandbox.fake
        self.admin_port = admin_port
        self.proc = proc

    def run(self, *argv: str) -> int:
        return cli.main([*argv, "-c", str(self.conf)])


@pytest.fixture(scope="module")
def running(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    tmp = tmp_path_factory.mktemp("cli")
    with SandboxThread(FakeWeChat(users=300, seed=11)) as sandbox:
        admin_port, webhook_port = free_port(), free_port()
        conf = tmp / "wxd.conf"
        conf.write_text(sandbox_config_text(str(tmp / "wxd.db"), sandbox.fake.credentials,
                                            sandbox.base_url, admin_port, webhook_port))
        proc = wxd_process(["run", "-c", str(conf)])
        try:
            wait_for_port(admin_port)
            yield Running(conf, sandbox, admin_port, proc)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.communicate(timeout=20)
    assert proc.returncode == 0


def test_check_config(running: Running, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["check-config", "-c", str(running.conf)]) == 0
    assert "ok" in capsys.readouterr().out


def test_token_command_prints_the_token_and_hides_the_secret(
        running: Running, capsys: pytest.CaptureFixture[str]) -> None:
    assert running.run("token", "oa", "--quiet") == 0
    token = capsys.readouterr().out.strip()
    assert len(token) > 20
    assert running.fake.credentials.oa_secret not in token
    assert running.run("token", "mp", "--json") == 0
    assert set(json.loads(capsys.readouterr().out)) == {"access_token", "expires_at"}


def test_backfill_then_users_then_push_lifecycle(
        running: Running, capsys: pytest.CaptureFixture[str]) -> None:
    assert running.run("backfill") == 0
    out = capsys.readouterr().out
    assert "done" in out and "100.0%" in out  # plain progress lines when not a TTY

    follower = next(p for p in running.fake.people if p.follows and p.unionid)
    assert running.run("users", "--oa-openid", follower.oa_openid, "--json") == 0
    identity = json.loads(capsys.readouterr().out)
    assert identity["unionid"] == follower.unionid and identity["subscribed"] is True

    keys = running.fake.templates[NOTICE_TEMPLATE_ID].keys
    samples = {"thing": "ok", "time": "2026年11月29日 12:00", "character_string": "A1",
               "amount": "1.5元", "phrase": "配送中"}
    data = [f"--data={key}={samples.get(key.rstrip('0123456789'), 'ok')}" for key in keys]
    assert running.run("push", "send", "--to-unionid", str(follower.unionid),
                       "--template-id", NOTICE_TEMPLATE_ID, *data, "--json") == 0
    push_id = json.loads(capsys.readouterr().out)["id"]
    assert running.run("push", "show", push_id) == 0
    assert push_id in capsys.readouterr().out
    assert running.run("push", "list", "--limit", "5") == 0
    assert push_id in capsys.readouterr().out
    # Wait until the workers sent it; then cancelling is refused (only queued pushes cancel).
    deadline = time.monotonic() + 20
    status = ""
    while time.monotonic() < deadline and status not in ("sent", "delivered"):
        assert running.run("push", "show", push_id, "--json") == 0
        status = json.loads(capsys.readouterr().out)["status"]
        time.sleep(0.1)
    assert status in ("sent", "delivered")
    assert running.run("push", "cancel", push_id) == 1
    assert "invalid_state" in capsys.readouterr().err
    assert running.run("stats", "--json") == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["followers"] >= 1 and stats["pushes"]["total"] >= 1


def test_exit_codes(running: Running, capsys: pytest.CaptureFixture[str]) -> None:
    # API error: unknown user → 1
    assert running.run("users", "--unionid", "nobody") == 1
    assert "user_not_found" in capsys.readouterr().err
    # usage error → 2
    assert running.run("users") == 2
    assert cli.main(["push", "send", "--admin-url", "http://127.0.0.1:1"]) == 2
    # bad token → 1 (unauthorized)
    url = f"http://127.0.0.1:{running.admin_port}"
    assert cli.main(["stats", "--admin-url", url, "--token", "not-the-token-at-all"]) == 1
    assert "unauthorized" in capsys.readouterr().err
    # unreachable daemon → 3
    assert cli.main(["stats", "--admin-url", f"http://127.0.0.1:{free_port()}",
                     "--token", ADMIN_TOKEN]) == 3
    # bad config → 2
    assert cli.main(["stats", "-c", "/nonexistent/wxd.conf"]) == 2


def test_metrics_counters_move_after_activity(running: Running) -> None:
    import urllib.request

    request = urllib.request.Request(f"http://127.0.0.1:{running.admin_port}/metrics",
                                     headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
    with urllib.request.urlopen(request, timeout=5) as response:
        text = response.read().decode()
    samples = {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
               for line in text.splitlines() if line and not line.startswith("#")}

    def total(prefix: str) -> float:
        return sum(v for k, v in samples.items() if k.startswith(prefix))

    assert total("wxd_admin_requests_total") > 5
    assert total("wxd_token_fetches_total") >= 1
    assert total("wxd_backfill_followers_total") > 0
    assert total("wxd_db_commit_seconds_count") > 0
    # Token fetches, backfill pages and batchgets share kept-alive upstream connections.
    assert samples['wxd_upstream_connections_total{event="reused"}'] > \
        samples['wxd_upstream_connections_total{event="opened"}'] >= 1
    assert total("wxd_process_resident_memory_bytes") > 1_000_000
    assert any(k.startswith("wxd_token_expires_in_seconds") for k in samples)
    assert any(k.startswith("wxd_push_queue_depth") for k in samples)


def test_backfill_from_start(running: Running, capsys: pytest.CaptureFixture[str]) -> None:
    # A failed run resumes at its cursor with a plain `wxd backfill`; --from-start begins a new
    # run at the head of the list instead.
    def final_status() -> dict[str, object]:
        out = capsys.readouterr().out  # progress lines, then the JSON document
        document: dict[str, object] = json.loads(out[out.index("{\n"):])
        return document

    rule = running.fake.script_fault("/cgi-bin/user/get", "48001", 1)
    assert running.run("backfill", "--json") == 1
    failed = final_status()
    assert failed["state"] == "failed" and rule.fired == 1
    assert running.run("backfill", "--from-start", "--json") == 0
    status = final_status()
    assert isinstance(failed["run"], int)
    assert (status["state"], status["run"], status["complete"]) == ("done", failed["run"] + 1, True)
    assert status["followers_done"] == status["total"] == status["seen"]


def test_keys_commands(running: Running, capsys: pytest.CaptureFixture[str]) -> None:
    assert running.run("keys", "create", "h5", "--scopes", "tokens:read,pushes:write") == 0
    out = capsys.readouterr().out
    key = out.split()[0]
    assert re.fullmatch(r"wxd_[A-Za-z0-9_-]{32,}", key) and "shown once" in out
    assert running.run("keys", "list") == 0
    out = capsys.readouterr().out
    assert "h5" in out and "tokens:read,pushes:write" in out and "never" in out
    assert key not in out
    assert cli.main(["token", "oa", "--admin-url", f"http://127.0.0.1:{running.admin_port}",
                     "--token", key, "-q"]) == 0
    capsys.readouterr()
    assert cli.main(["users", "--unionid", "u", "--admin-url",
                     f"http://127.0.0.1:{running.admin_port}", "--token", key]) == 1
    assert "insufficient_scope" in capsys.readouterr().err
    assert running.run("keys", "create", "h5", "--scopes", "admin") == 1
    assert running.run("keys", "create", "x", "--scopes", "nope") == 1
    assert running.run("keys", "revoke", "h5") == 0
    assert "revoked" in capsys.readouterr().out
    assert running.run("keys", "revoke", "h5") == 1
    assert running.run("keys", "list", "--json") == 0
    assert json.loads(capsys.readouterr().out) == {"keys": []}


def test_callbacks_list_show_retry(running: Running, capsys: pytest.CaptureFixture[str]) -> None:
    # Two callbacks that went dead, written beside the running daemon (its [callbacks] is off,
    # so revived ones stay pending): the operator's commands see and revive them.
    conn = sqlite3.connect(running.conf.parent / "wxd.db", isolation_level=None, timeout=10)
    conn.row_factory = sqlite3.Row
    try:
        now = time.time()
        first, second = (cb.NewCallback(cb.new_id(), "push.failed", f"p_{n}", '{"n": 1}')
                         for n in (1, 2))
        conn.execute("BEGIN IMMEDIATE")
        cb.emit(conn, [first, second], now - 100)
        leased = cb.lease(conn, now - 100, 10, 60)
        cb.record(conn, [cb.Outcome(item.id, item.attempts, "dead", now - 50 + index,
                                    http_status=503, error="HTTP 503 Service Unavailable")
                         for index, item in enumerate(leased)])
        conn.execute("COMMIT")
    finally:
        conn.close()
    assert running.run("callbacks", "list", "--status", "dead", "--json") == 0
    listed = json.loads(capsys.readouterr().out)["callbacks"]
    assert {c["id"] for c in listed} == {first.id, second.id}
    assert running.run("callbacks", "list", "--type", "push.failed") == 0
    table = capsys.readouterr().out
    assert first.id in table and "HTTP 503" in table
    assert running.run("callbacks", "show", first.id) == 0
    assert "last_status" in capsys.readouterr().out
    assert running.run("callbacks", "retry", first.id, "--json") == 0
    assert json.loads(capsys.readouterr().out)["status"] == "pending"
    assert running.run("callbacks", "retry", first.id) == 1  # pending now: not dead
    assert "invalid_state" in capsys.readouterr().err
    assert running.run("callbacks", "retry", "--dead", "--since", str(now + 3600)) == 0
    assert capsys.readouterr().out.startswith("0 dead callbacks")
    assert running.run("callbacks", "retry", "--dead") == 0
    assert capsys.readouterr().out.startswith("1 dead callbacks")
    assert running.run("callbacks", "show", "evt_missing") == 1
    assert running.run("callbacks", "retry") == 2
