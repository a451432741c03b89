from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from pair.testing import DaemonProcess, Pair


@pytest.fixture
def demo(short_tmp: Path) -> Iterator[DaemonProcess]:
    """The protocol demo daemon, ready, with a short frame timeout for stall tests."""
    with DaemonProcess(
        "tests.support.demo_server", short_tmp, short_tmp, "--frame-timeout", "0.5"
    ) as daemon:
        yield daemon


@pytest.fixture
def demo_socket(demo: DaemonProcess) -> str:
    return str(demo.runtime_dir / "demo.sock")


def _assistant(root: Path) -> Iterator[DaemonProcess]:
    (root / "run").mkdir()
    with DaemonProcess("assistant", root / "run", root / "state") as daemon:
        yield daemon


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


def _pair(root: Path) -> Iterator[Pair]:
    with Pair(root) as both:
        yield both


# `pair`, `pair_factory`, `assistant_client` and `gateway_client` are the plugin's
# (pair_testing.plugin), as a user's suite gets them.


@pytest.fixture(scope="module")
def shared_pair(module_tmp: Path) -> Iterator[Pair]:
    """One pair for a module whose tests change nothing (bad input)."""
    yield from _pair(module_tmp)
