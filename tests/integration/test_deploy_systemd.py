"""The unit files as systemd would take them, and a daemon run by systemd-socket-activate."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pair.testing.daemons import DaemonProcess
from tests.support.raw import RawConnection

UNITS = Path(__file__).resolve().parents[2] / "deploy" / "systemd"
# Where the units run each program from: a side's current release, or pairctl's wrapper.
INSTALLED_BIN = re.compile(r"/opt/pair/(?:(?:gateway|assistant)/current/)?bin/")
SERVICES = ("pair-assistant.service", "pair-gateway.service")
RATED = (*SERVICES, "pair-metrics.service")


def tool(name: str) -> str:
    path = shutil.which(name)
    assert path, f"{name} is missing: install Debian's systemd package (.ci/run does)"
    return path


@pytest.fixture
def units(tmp_path: Path) -> Path:
    """The units with ExecStart pointing at this checkout's venv instead of /opt/pair."""
    bin_dir = str(Path(sys.executable).parent) + "/"
    for unit in UNITS.iterdir():
        (tmp_path / unit.name).write_text(INSTALLED_BIN.sub(bin_dir, unit.read_text()))
    return tmp_path


def test_the_units_pass_systemd_analyze_verify_without_a_word(units: Path) -> None:
    files = sorted(str(path) for path in units.iterdir())
    result = subprocess.run(
        [tool("systemd-analyze"), "verify", *files], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""


@pytest.mark.parametrize("service", RATED)
def test_each_service_is_rated_safe_by_systemd_analyze_security(units: Path, service: str) -> None:
    result = subprocess.run(
        [tool("systemd-analyze"), "security", "--offline=yes", str(units / service)],
        capture_output=True,
        text=True,
        check=False,
    )
    match = re.search(r"Overall exposure level for \S+: ([0-9.]+) (\w+)", result.stdout)
    assert match, result.stdout + result.stderr
    assert float(match[1]) < 1.0
    assert match[2] == "SAFE"


def test_a_service_restart_neither_deletes_the_sockets_nor_cuts_the_drain(units: Path) -> None:
    """RuntimeDirectory= is emptied on restart (taking a socket in it along); a stop
    timeout under the drain grace would SIGKILL calls that were allowed to finish."""
    for service in SERVICES:
        text = (units / service).read_text()
        assert not re.search(r"^RuntimeDirectory=", text, re.M)
        stop = re.search(r"^TimeoutStopSec=(\d+)", text, re.M)
        grace = re.search(r"--grace (\d+)", text)
        assert stop
        assert grace
        assert int(stop[1]) > int(grace[1])


def listening(path: Path) -> bool:
    """Whether a socket bound at `path` listens (__SO_ACCEPTCON in /proc/net/unix)."""
    for line in Path("/proc/net/unix").read_text().splitlines()[1:]:
        fields = line.split()
        if len(fields) >= 8 and fields[7] == str(path) and int(fields[3], 16) & 0x10000:
            return True
    return False


def test_a_daemon_under_systemd_socket_activate_serves_the_inherited_socket(
    short_tmp: Path,
) -> None:
    path = short_tmp / "assistant.sock"
    notify = str(short_tmp / ".assistant-notify")
    launcher = (
        tool("systemd-socket-activate"),
        "-l",
        str(path),
        "--fdname=assistant.sock",
        f"--setenv=NOTIFY_SOCKET={notify}",
    )
    daemon = DaemonProcess(
        "assistant", short_tmp / "elsewhere", short_tmp / "state", launcher=launcher
    )
    daemon.notify_path = notify
    (short_tmp / "elsewhere").mkdir()
    with daemon.checked():
        daemon.start(wait=False)
        deadline = time.monotonic() + 20
        # The path appears at bind(), before listen(): a connect then is refused.
        while not listening(path):
            assert time.monotonic() < deadline, "systemd-socket-activate did not listen"
            time.sleep(0.02)
        with RawConnection(str(path)) as conn:
            health = conn.call({"jsonrpc": "2.0", "id": 1, "method": "health"})["result"]
        assert health["status"] == "ok"
        daemon.wait_for("READY=1")
        assert not (short_tmp / "elsewhere" / "assistant.sock").exists(), "it bound its own socket"
        assert daemon.stop() == 0
        assert path.exists()
