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


def _assistant(root: Path) -> Iterator[DaemonProcess]:
    (root / "run").mkdir()
    daemon = DaemonProcess("assistant", root / "run", root / "state")
    daemon.start()
    try:
        yield daemon
    finally:
        daemon.close()


@pytest.fixture
def assistant(short_tmp: Path) -> Iterator[DaemonProcess]:
    """A real assistantd, ready (READY=1 received)."""
    yield from _assistant(short_tmp)


@pytest.fixture(scope="module")
def shared_assistant(module_tmp: Path) -> Iterator[DaemonProcess]:
    """One assistantd for a module whose tests change nothing (bad input)."""
    yield from _assistant(module_tmp)


@pytest.fixture
def assistant_socket(assistant: DaemonProcess) -> str:
    return str(assistant.runtime_dir / "assistant.sock")


class Pair:
    """Both daemons on one runtime dir, as `make run` starts them; each may be given a
    state dir of its own (one on a small disk, say)."""

    def __init__(
        self,
        root: Path,
        gateway_args: tuple[str, ...] = (),
        *,
        assistant_state: Path | None = None,
        gateway_state: Path | None = None,
    ) -> None:
        self.runtime = root / "run"
        self.state = root / "state"
        self.runtime.mkdir(exist_ok=True)
        self.assistant = DaemonProcess("assistant", self.runtime, assistant_state or self.state)
        gateway_state = gateway_state or self.state
        self.gateway = DaemonProcess("gateway", self.runtime, gateway_state, *gateway_args)
        self.gateway_db = gateway_state / "gateway.db"

    @property
    def gateway_socket(self) -> str:
        return str(self.runtime / "gateway.sock")

    @property
    def assistant_socket(self) -> str:
        return str(self.runtime / "assistant.sock")

    def close(self) -> None:
        self.gateway.close()
        self.assistant.close()


def _pair(root: Path) -> Iterator[Pair]:
    both = Pair(root)
    both.assistant.start()
    both.gateway.start()
    try:
        yield both
    finally:
        both.close()


@pytest.fixture
def pair(short_tmp: Path) -> Iterator[Pair]:
    """assistantd then gatewayd, both ready."""
    yield from _pair(short_tmp)


@pytest.fixture(scope="module")
def shared_pair(module_tmp: Path) -> Iterator[Pair]:
    """One pair for a module whose tests change nothing (bad input)."""
    yield from _pair(module_tmp)
