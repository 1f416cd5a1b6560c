"""The systemd units (wxd.service, wxd.socket): the settings the daemon relies on, and
`systemd-analyze verify` on both when it is installed (.ci/run installs it)."""

from __future__ import annotations

import configparser
import pathlib
import shutil
import subprocess
import sys

import pytest

from wxd import config

UNIT = pathlib.Path(__file__).resolve().parent.parent / "systemd" / "wxd.service"
SOCKET = UNIT.with_name("wxd.socket")


def unit(path: pathlib.Path = UNIT) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read(path)
    return parser


def listen_streams() -> list[str]:
    """The ListenStream= values of wxd.socket in order (configparser keeps only the last)."""
    return [line.split("=", 1)[1].strip() for line in SOCKET.read_text().splitlines()
            if line.startswith("ListenStream=")]


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


def test_socket_unit_matches_the_default_listeners() -> None:
    socket_unit = unit(SOCKET)
    assert socket_unit["Socket"]["Service"] == "wxd.service"
    assert int(socket_unit["Socket"]["Backlog"]) >= 128
    assert socket_unit["Install"]["WantedBy"] == "sockets.target"
    # wxd tells the two sockets apart by address: webhook first, then admin, as wxd.conf says.
    defaults = [config.SECTIONS[name].keys["listen"].default for name in ("webhook", "admin")]
    assert listen_streams() == defaults
    assert "wxd.socket" in unit()["Unit"]["After"].split()


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_systemd_analyze_verify(tmp_path: pathlib.Path) -> None:
    # Point ExecStart at this interpreter's wxd so verify can resolve the executable.
    wxd = pathlib.Path(sys.executable).parent / "wxd"
    text = UNIT.read_text().replace("/usr/local/bin/wxd", str(wxd))
    copy = tmp_path / "wxd.service"
    copy.write_text(text)
    (tmp_path / "wxd.socket").write_text(SOCKET.read_text())
    for units in ([copy], [tmp_path / "wxd.socket", copy]):
        result = subprocess.run(["systemd-analyze", "verify", *map(str, units)],
                                capture_output=True, text=True, timeout=60, check=False)
        assert result.returncode == 0, result.stderr
        assert "wxd" not in result.stderr, result.stderr  # no warning about our units
