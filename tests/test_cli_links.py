"""`wxd link ...` against a real daemon process (an account without unionid) and a sandbox."""

from __future__ import annotations

import argparse
import json
import pathlib
import signal
import subprocess
import sys
import urllib.parse
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

from tests.helpers import free_port, sandbox_config_text, wait_for_port, wxd_process
from wxd import cli, cliadmin
from wxd.sandbox import FakeWeChat, SandboxThread


class Running:
    def __init__(self, conf: pathlib.Path, sandbox: SandboxThread) -> None:
        self.conf = conf
        self.sandbox = sandbox
        self.fake = sandbox.fake

    def run(self, *argv: str) -> int:
        return cli.main([*argv, "-c", str(self.conf)])

    def control(self, path: str, body: dict[str, Any]) -> Any:
        request = urllib.request.Request(self.sandbox.base_url + path, method="POST",
                                         data=json.dumps(body).encode())
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read())


@pytest.fixture(scope="module")
def running(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    tmp = tmp_path_factory.mktemp("cli-links")
    with SandboxThread(FakeWeChat(users=50, seed=5, unionid_ratio=0.0)) as sandbox:
        admin_port, webhook_port = free_port(), free_port()
        conf = tmp / "wxd.conf"
        conf.write_text(sandbox_config_text(
            str(tmp / "wxd.db"), sandbox.fake.credentials, sandbox.base_url, admin_port,
            webhook_port, {"webhook": {"public_url": f"http://127.0.0.1:{webhook_port}"}}))
        proc = wxd_process(["run", "-c", str(conf)])
        try:
            wait_for_port(admin_port)
            wait_for_port(webhook_port)
            url = f"http://127.0.0.1:{webhook_port}/wechat"
            sandbox.call(lambda: sandbox.fake.configure_webhook(url, mode="safe"))
            yield Running(conf, sandbox)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.communicate(timeout=20)
    assert proc.returncode == 0


def test_qrcode_wait_show_and_remove(running: Running, capsys: pytest.CaptureFixture[str]) -> None:
    person = next(p for p in running.fake.people if not p.follows)
    waiting = subprocess.Popen(
        [sys.executable, "-m", "wxd", "link", "qrcode", "--mp-openid", person.mp_openid,
         "--wait", "--interval", "0.05", "--json", "-c", str(running.conf)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert waiting.stdout is not None
        first = ""
        while not first.rstrip().endswith("}"):  # the code, printed before waiting
            line = waiting.stdout.readline()
            assert line, waiting.stderr.read() if waiting.stderr else ""
            first += line
        code = json.loads(first)
        assert code["image_url"].endswith(urllib.parse.quote(code["ticket"], safe=""))
        running.control("/_sandbox/scan", {"index": person.index, "ticket": code["ticket"]})
        out, err = waiting.communicate(timeout=20)
    finally:
        if waiting.poll() is None:
            waiting.kill()
    assert waiting.returncode == 0, err
    assert json.loads(out)["status"] == "linked"

    assert running.run("link", "show", code["id"]) == 0
    shown = capsys.readouterr().out
    assert "linked" in shown and person.oa_openid in shown
    assert running.run("users", "--mp-openid", person.mp_openid, "--json") == 0
    assert json.loads(capsys.readouterr().out)["link"]["source"] == "qrcode"
    assert running.run("link", "remove", "--mp-openid", person.mp_openid) == 0
    assert "qrcode" in capsys.readouterr().out
    assert running.run("link", "remove", "--mp-openid", person.mp_openid) == 1
    assert "link_not_found" in capsys.readouterr().err


def test_oauth_link_and_usage_errors(running: Running, capsys: pytest.CaptureFixture[str]) -> None:
    person = next(p for p in running.fake.people if p.follows)
    assert running.run("link", "oauth", "--mp-openid", person.mp_openid) == 0
    out = capsys.readouterr().out
    assert "/oauth/start?t=" in out and out.startswith("lo_")
    code_id = out.split()[0]
    assert running.run("link", "show", code_id, "--json") == 0
    assert json.loads(capsys.readouterr().out)["status"] == "pending"
    assert running.run("link", "qrcode") == 2  # --mp-openid missing
    assert running.run("link", "show") == 2
    assert running.run("link", "show", "p_123") == 2
    assert running.run("link", "oauth", "--mp-openid", person.mp_openid,
                       "--return-url", "https://evil.example.com/") == 1
    assert "return_url_not_allowed" in capsys.readouterr().err


class StatusClient:
    """Answers the given statuses in turn (a stand-in for AdminClient in wait_for_link)."""

    def __init__(self, *answers: dict[str, Any]) -> None:
        self.answers = list(answers)
        self.paths: list[str] = []

    def get(self, path: str, **_: Any) -> dict[str, Any]:
        self.paths.append(path)
        return self.answers.pop(0)


def test_wait_ends_at_expiry_with_exit_1(capsys: pytest.CaptureFixture[str]) -> None:
    args = argparse.Namespace(interval=0.0, json=False)
    client = StatusClient({"status": "pending"}, {"status": "pending"}, {"status": "expired"})
    assert cliadmin.wait_for_link(args, client, "lq_x") == 1  # type: ignore[arg-type]
    assert client.paths == ["/v1/links/qrcodes/lq_x"] * 3
    assert "lq_x expired" in capsys.readouterr().err
    linked = StatusClient({"status": "linked", "oa_openid": "oA", "linked_at": 1.0})
    assert cliadmin.wait_for_link(args, linked, "lo_y") == 0  # type: ignore[arg-type]
    assert linked.paths == ["/v1/links/oauth/lo_y"]
    assert "linked to OA openid oA" in capsys.readouterr().out
