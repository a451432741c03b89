"""Start-up as an operator sees it: sockets, stale files, bad configuration."""

from __future__ import annotations

import signal
import socket
from pathlib import Path

from pair.testing.daemons import DaemonProcess, run_once
from tests.support.raw import RawConnection

DEMO = "tests.support.demo_server"


def test_a_second_daemon_on_a_live_socket_exits_75(demo: DaemonProcess) -> None:
    result = run_once(
        DEMO, "--runtime-dir", str(demo.runtime_dir), "--state-dir", str(demo.state_dir)
    )
    assert result.returncode == 75
    assert f"another demod is listening on {demo.runtime_dir}/demo.sock" in result.stderr
    with RawConnection(str(demo.runtime_dir / "demo.sock")) as conn:
        assert "result" in conn.call({"jsonrpc": "2.0", "id": 1, "method": "pid"})


def test_a_stale_socket_file_is_replaced(short_tmp: Path) -> None:
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(short_tmp / "demo.sock"))
    stale.close()
    with (
        DaemonProcess(DEMO, short_tmp, short_tmp) as daemon,
        RawConnection(str(short_tmp / "demo.sock")) as conn,
    ):
        assert conn.call({"jsonrpc": "2.0", "id": 1, "method": "pid"})["result"] == daemon.pid


def test_runtime_dir_and_socket_permissions(short_tmp: Path) -> None:
    runtime = short_tmp / "run"
    with DaemonProcess(DEMO, short_tmp, short_tmp, "--socket", str(runtime / "demo.sock")):
        assert (runtime.stat().st_mode & 0o777) == 0o700
        assert ((runtime / "demo.sock").stat().st_mode & 0o777) == 0o600


def test_a_socket_path_over_the_af_unix_limit_is_refused_with_the_limit(short_tmp: Path) -> None:
    deep = short_tmp / ("d" * 120)
    result = run_once(DEMO, "--runtime-dir", str(deep), "--state-dir", str(short_tmp))
    assert result.returncode == 78
    assert "above the AF_UNIX limit of 107" in result.stderr
    assert not deep.exists()


def test_a_regular_file_where_the_socket_goes_is_not_deleted(short_tmp: Path) -> None:
    (short_tmp / "demo.sock").write_text("precious")
    result = run_once(DEMO, "--runtime-dir", str(short_tmp), "--state-dir", str(short_tmp))
    assert result.returncode == 78
    assert "exists and is not a socket" in result.stderr
    assert (short_tmp / "demo.sock").read_text() == "precious"


def test_bad_flags_are_a_usage_error(short_tmp: Path) -> None:
    result = run_once(DEMO, "--runtime-dir", str(short_tmp), "--grace", "-1")
    assert result.returncode == 78
    assert "--grace must be positive" in result.stderr
    assert result.stderr.count("\n") == 1


def test_a_loop_budget_out_of_its_range_is_a_usage_error(short_tmp: Path) -> None:
    for micros in ("0", "1000001"):
        result = run_once(
            "pair.assistant",
            *("--runtime-dir", str(short_tmp), "--state-dir", str(short_tmp)),
            *("--loop-budget-us", micros),
        )
        assert result.returncode == 78
        assert f"--loop-budget-us must be from 1 to 1000000, got {micros}" in result.stderr
        assert not (short_tmp / "assistant.db").exists()


def test_sigterm_when_idle_exits_zero_and_removes_only_its_socket(short_tmp: Path) -> None:
    neighbour = short_tmp / "other.sock"
    neighbour.write_text("not ours")
    with DaemonProcess(DEMO, short_tmp, short_tmp) as daemon:
        daemon.signal(signal.SIGTERM)
        daemon.wait_for("STOPPING=1")
        assert daemon.stop() == 0
    assert not (short_tmp / "demo.sock").exists()
    assert neighbour.read_text() == "not ours"
