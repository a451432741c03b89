"""The pytest plugin (SPEC.md section 9): real daemons for socket-level tests.

Registered through the `pytest11` entry point, so installing the
distribution is all a test suite needs. Fixtures: `pair`, `pair_factory`,
`assistant_client`, `gateway_client`; option `--pair-keep`.

A daemon is ready when it has sent READY=1 to the `NOTIFY_SOCKET` its handle
owns. After the test, each is stopped with SIGTERM and must exit 0; one
that crashed during the test fails it, with the end of its log.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import AsyncIterator, Generator, Iterator
from pathlib import Path

import pytest

from pair.protocol.client import Client
from pair.testing.daemons import Pair

_PAIRS = pytest.StashKey[list[Pair]]()
_FAILED = pytest.StashKey[bool]()
_KEPT = pytest.StashKey[list[str]]()


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.getgroup("pair").addoption(
        "--pair-keep",
        action="store_true",
        help="keep the runtime and state directories of the daemons of a failed test,"
        " and print where they are",
    )


def pytest_configure(config: pytest.Config) -> None:
    config.stash[_KEPT] = []


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    if report.when == "call":
        for pair in item.stash.get(_PAIRS, []):
            for daemon in pair.daemons:
                if daemon.proc is None or daemon.running() or daemon.expected_down:
                    continue
                line = f"{daemon.name}d exited with {daemon.proc.returncode} during the test"
                report.sections.append((f"pair: {daemon.name}d log", daemon.log_tail()))
                if report.passed:
                    report.outcome = "failed"
                    report.longrepr = f"{line}; see 'pair: {daemon.name}d log' below"
                # Reported once: the teardown does not report it again.
                daemon.expected_down = True
    if report.failed:
        item.stash[_FAILED] = True
    return report


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    kept = terminalreporter.config.stash.get(_KEPT, [])
    if kept:
        terminalreporter.section("pair: directories kept (--pair-keep)")
        for line in kept:
            terminalreporter.write_line(line)


class PairFactory:
    """`pair_factory(assistant_args=(), gateway_args=())`: another pair, started and ready,
    stopped and removed after the test like `pair`."""

    def __init__(self, request: pytest.FixtureRequest) -> None:
        self._request = request
        self.pairs: list[Pair] = []
        request.node.stash[_PAIRS] = self.pairs

    def __call__(
        self, assistant_args: tuple[str, ...] = (), gateway_args: tuple[str, ...] = ()
    ) -> Pair:
        # AF_UNIX paths are at most 107 bytes: pytest's tmp_path is often longer.
        root = Path(tempfile.mkdtemp(prefix="pair-", dir=_short_temp_base()))
        pair = Pair(root, tuple(gateway_args), assistant_args=tuple(assistant_args))
        self.pairs.append(pair)
        pair.start()
        return pair

    def finish(self) -> None:
        node = self._request.node
        problems: list[str] = []
        for pair in self.pairs:
            try:
                problems += pair.stop_checked()
            except Exception as exc:  # one pair's trouble must not strand the others
                pair.close()
                problems.append(f"stopping the pair in {pair.root} failed: {exc!r}")
        failed = node.stash.get(_FAILED, False) or bool(problems)
        keep = self._request.config.getoption("--pair-keep") and failed
        for pair in self.pairs:
            if keep:
                self._request.config.stash[_KEPT].append(f"{node.nodeid}: {pair.root}")
            else:
                shutil.rmtree(pair.root, ignore_errors=True)
        if problems:
            pytest.fail("\n\n".join(problems), pytrace=False)


def _short_temp_base() -> str | None:
    return "/tmp" if Path("/tmp").is_dir() else None


@pytest.fixture
def pair_factory(request: pytest.FixtureRequest) -> Iterator[PairFactory]:
    """Start pairs with flags of their own; each is checked and cleaned up like `pair`."""
    factory = PairFactory(request)
    yield factory
    factory.finish()


@pytest.fixture
def pair(pair_factory: PairFactory) -> Pair:
    """assistantd and gatewayd as real processes on fresh directories, both ready."""
    return pair_factory()


@pytest.fixture
async def assistant_client(pair: Pair) -> AsyncIterator[Client]:
    """A connected strict client of the pair's assistant (for `@pytest.mark.anyio` tests)."""
    async with Client(pair.assistant.socket_path) as client:
        yield client


@pytest.fixture
async def gateway_client(pair: Pair) -> AsyncIterator[Client]:
    """A connected strict client of the pair's gateway (for `@pytest.mark.anyio` tests)."""
    async with Client(pair.gateway.socket_path) as client:
        yield client
