"""Memory is bounded: request bodies in flight have a budget per connection and per daemon.

Past a budget the server stops reading (back-pressure, as past
`max_in_flight`); it never drops or fails a request for it, and it reads
again once calls end. After a burst of large calls, the memory comes back.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest

from pair.protocol.client import Client
from pair.testing.daemons import DaemonProcess
from tests.support.proc import vm_kib
from tests.support.raw import RawConnection

pytestmark = pytest.mark.anyio

PAD = 600_000  # bytes of an ignored envelope member: a large request body
BUDGET = 1_000_000


def sleep_call(request_id: int, seconds: float) -> dict[str, Any]:
    return {
        "jsonrpc": "2.0",
        "id": request_id,
        "method": "sleep",
        "params": {"seconds": seconds},
        "pad": "x" * PAD,
    }


def echo_call(request_id: int, pad: int = 0) -> dict[str, Any]:
    call: dict[str, Any] = {"jsonrpc": "2.0", "id": request_id, "method": "echo", "params": {}}
    if pad:
        call["pad"] = "x" * pad
    return call


@contextmanager
def demo(root: Path, *args: str) -> Iterator[DaemonProcess]:
    with DaemonProcess("tests.support.demo_server", root, root, *args) as daemon:
        yield daemon


@pytest.fixture
def per_connection(short_tmp: Path) -> Iterator[DaemonProcess]:
    with demo(short_tmp, "--max-pending-bytes", str(BUDGET)) as daemon:
        yield daemon


@pytest.fixture
def per_daemon(short_tmp: Path) -> Iterator[DaemonProcess]:
    with demo(short_tmp, "--max-pending-bytes-total", str(BUDGET)) as daemon:
        yield daemon


def answer_order(connection: RawConnection, count: int) -> list[int]:
    return [connection.recv_json()["id"] for _ in range(count)]


def test_a_connection_over_its_budget_is_read_again_once_its_calls_end(
    per_connection: DaemonProcess,
) -> None:
    """Two large calls in flight hold more than the budget: the third large frame and the
    echo behind it are read only once they end, and every call is answered."""
    with RawConnection(str(per_connection.runtime_dir / "demo.sock")) as connection:
        for request_id in (1, 2, 3):
            connection.send_json(sleep_call(request_id, 0.5))
        connection.send_json(echo_call(4))
        order = answer_order(connection, 4)
    assert set(order[:2]) == {1, 2}, f"the echo was read past the budget: {order}"
    assert order[2:] == [4, 3]


def test_without_a_budget_in_the_way_the_echo_overtakes_the_sleeps(short_tmp: Path) -> None:
    """The same calls under the default budgets: the echo is read and answered at once (what
    makes the test above a test of the budget)."""
    with (
        demo(short_tmp) as daemon,
        RawConnection(str(daemon.runtime_dir / "demo.sock")) as connection,
    ):
        for request_id in (1, 2, 3):
            connection.send_json(sleep_call(request_id, 0.5))
        connection.send_json(echo_call(4))
        assert answer_order(connection, 4)[0] == 4


async def test_past_the_daemons_budget_other_connections_wait_and_are_then_served(
    per_daemon: DaemonProcess,
) -> None:
    """Two large calls hold more than the daemon's budget: another connection's large echo
    is not read while they run (no answer within a fraction of their sleep), then is."""
    socket_path = str(per_daemon.runtime_dir / "demo.sock")

    def heavy() -> list[int]:
        with RawConnection(socket_path) as connection:
            connection.send_json(sleep_call(1, 2.5))
            connection.send_json(sleep_call(2, 2.5))
            return answer_order(connection, 2)

    async with anyio.create_task_group() as task_group:
        task_group.start_soon(anyio.to_thread.run_sync, heavy)
        with anyio.fail_after(10):
            while "reading paused" not in per_daemon.stderr():
                await anyio.sleep(0.02)
        answered = anyio.Event()

        async def other() -> None:
            def echo() -> Any:
                with RawConnection(socket_path) as connection:
                    return connection.call(echo_call(1, pad=PAD))

            assert (await anyio.to_thread.run_sync(echo))["result"] == {"value": None, "text": ""}
            answered.set()

        task_group.start_soon(other)
        with anyio.move_on_after(0.5):
            await answered.wait()
        assert not answered.is_set(), "another connection was read past the daemon's budget"
    async with Client(socket_path) as client:
        assert (await client.call("echo", {"text": "after"}))["text"] == "after"


async def test_a_burst_of_large_calls_is_bounded_and_its_memory_comes_back(
    assistant: DaemonProcess, assistant_socket: str
) -> None:
    """40 connections each send a 15 MiB string at once (the review saw RSS go up 1.25 GB
    and stay there): the peak stays bounded and RSS returns within 64 MiB of idle."""
    idle = vm_kib(assistant.pid, "VmRSS")
    big = "x" * (15 * 1024 * 1024)

    async def one() -> None:
        async with Client(assistant_socket, timeout=60) as client:
            result = await client.call(
                "db_proxy", {"sql": "SELECT length(?) AS n", "mode": "query", "bind": [big]}
            )
            assert result["rows"] == [{"n": len(big)}]

    async with anyio.create_task_group() as task_group:
        for _ in range(40):
            task_group.start_soon(one)
    peak = vm_kib(assistant.pid, "VmHWM")
    after = vm_kib(assistant.pid, "VmRSS")
    assert peak - idle < 512 * 1024, f"peak {peak} KiB over idle {idle} KiB"
    assert after - idle < 64 * 1024, f"{after} KiB after the burst, {idle} KiB idle"
