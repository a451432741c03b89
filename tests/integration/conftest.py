from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.proc import DaemonProcess


@pytest.fixture
def demo(short_tmp: Path) -> Iterator[DaemonProcess]:
    """The protocol demo daemon, ready, with a short frame timeout for stall tests."""
    daemon = DaemonProcess(
        "tests.support.demo_server", short_tmp, short_tmp, "--frame-timeout", "0.5"
    )
    daemon.start()
    try:
        yield daemon
    finally:
        daemon.close()


@pytest.fixture
def demo_socket(demo: DaemonProcess) -> str:
    return str(demo.runtime_dir / "demo.sock")


@pytest.fixture
def assistant(short_tmp: Path) -> Iterator[DaemonProcess]:
    """A real assistantd, ready (READY=1 received)."""
    (short_tmp / "run").mkdir()
    daemon = DaemonProcess("assistant", short_tmp / "run", short_tmp / "state")
    daemon.start()
    try:
        yield daemon
    finally:
        daemon.close()


@pytest.fixture
def assistant_socket(assistant: DaemonProcess) -> str:
    return str(assistant.runtime_dir / "assistant.sock")
