"""The daemon as systemd runs it: an inherited listening socket, sd_notify, the watchdog."""

from __future__ import annotations

import signal
import socket
import time
from pathlib import Path

from pair.testing.daemons import DaemonProcess
from tests.support.raw import RawConnection

DEMO = "tests.support.demo_server"


def listening_socket(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    sock.listen(128)
    return sock


def pid_call(conn: RawConnection) -> int:
    return int(conn.call({"jsonrpc": "2.0", "id": 1, "method": "pid"})["result"])


def test_an_inherited_socket_is_served_never_unlinked_and_queues_across_a_restart(
    short_tmp: Path,
) -> None:
    path = short_tmp / "demo.sock"
    held = listening_socket(path)
    try:
        with DaemonProcess(
            DEMO, short_tmp, short_tmp, inherit=(held.fileno(), "demo.sock")
        ) as daemon:
            assert "inherited from systemd" in daemon.stderr()
            with RawConnection(str(path)) as conn:
                first = pid_call(conn)
            assert first == daemon.pid
            assert daemon.stop() == 0
            assert path.exists(), "the daemon removed a socket it did not create"
            with RawConnection(str(path)) as waiting:
                waiting.send_json({"jsonrpc": "2.0", "id": 7, "method": "pid"})
                daemon.restart()
                answer = waiting.recv_json()
            assert answer["id"] == 7
            assert answer["result"] == daemon.pid != first
    finally:
        held.close()


def test_watchdog_pings_at_half_the_interval_and_stopping_follows_sigterm(short_tmp: Path) -> None:
    with DaemonProcess(DEMO, short_tmp, short_tmp, env={"WATCHDOG_USEC": "400000"}) as daemon:
        ready_at = time.monotonic()
        for _ in range(4):
            daemon.messages.clear()
            daemon.wait_for("WATCHDOG=1", timeout=2)
        elapsed = time.monotonic() - ready_at
        assert 0.4 <= elapsed < 2.0
        daemon.signal(signal.SIGTERM)
        daemon.wait_for("STOPPING=1")
        assert daemon.stop() == 0


def test_ready_carries_a_status_line(short_tmp: Path) -> None:
    with DaemonProcess(DEMO, short_tmp, short_tmp) as daemon:
        ready = next(message for message in daemon.messages if "READY=1" in message)
        assert "STATUS=demo ready" in ready.split("\n")
        assert f"MAINPID={daemon.pid}" in ready.split("\n")
