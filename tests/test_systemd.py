"""The systemd unit: the settings the daemon relies on, and `systemd-analyze verify` if present."""

from __future__ import annotations

import configparser
import pathlib
import shutil
import subprocess
import sys

import pytest

from wxd import config

UNIT = pathlib.Path(__file__).resolve().parent.parent / "systemd" / "wxd.service"


def unit() -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read(UNIT)
    return parser


def test_unit_matches_the_daemon() -> None:
    service = unit()["Service"]
    assert service["Type"] == "notify"  # wxd sends READY=1 after both listeners accept
    assert service["KillSignal"] == "SIGTERM"
    assert service["Restart"] == "on-failure"
    assert service["StateDirectory"] == "wxd"
    assert "wxd run -c /etc/wxd/wxd.conf" in service["ExecStart"]
    drain = float(config.SECTIONS["wxd"].keys["shutdown_timeout_s"].default or 0)
    # The daemon allows the drain bound plus 5 s for the rest of the stop.
    assert float(service["TimeoutStopSec"]) > drain + 5
    for setting in ("NoNewPrivileges", "ProtectHome", "PrivateTmp"):
        assert service[setting] == "yes"
    assert service["ProtectSystem"] == "strict"
    assert service["RestrictAddressFamilies"].split() == ["AF_INET", "AF_INET6", "AF_UNIX"]


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_systemd_analyze_verify(tmp_path: pathlib.Path) -> None:
    # Point ExecStart at this interpreter's wxd so verify can resolve the executable.
    wxd = pathlib.Path(sys.executable).parent / "wxd"
    text = UNIT.read_text().replace("/usr/local/bin/wxd", str(wxd))
    copy = tmp_path / "wxd.service"
    copy.write_text(text)
    result = subprocess.run(["systemd-analyze", "verify", str(copy)], capture_output=True,
                            text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
