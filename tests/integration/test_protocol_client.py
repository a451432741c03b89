"""The strict client against a real daemon process: multiplexing, failures, reconnection."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import signal
import time
from pathlib import Path

import anyio
import pytest

from pair.protocol.client import BatchCall, Client
from pair.protocol.errors import IpcHandlerError, IpcTransportError
from pair.testing.daemons import DaemonProcess
from tests.support.waiting import dispatched, eventually

pytestmark = pytest.mark.anyio


async def test_a_thousand_pipelined_calls_on_one_connection(demo_socket: str) -> None:
    results: dict[int, object] = {}
    async with Client(demo_socket) as client:

        async def one(n: int) -> None:
            method = ("echo", "echo_async", "echo_thread")[n % 3]
            results[n] = (await client.call(method, {"value": n}))["value"]

        async with anyio.create_task_group() as task_group:
            for n in range(1000):
                task_group.start_soon(one, n)
    assert results == {n: n for n in range(1000)}


async def test_answers_arrive_out_of_order_and_are_matched_by_id(demo_socket: str) -> None:
    order: list[str] = []
    async with Client(demo_socket) as client:

        async def slow() -> None:
            await client.call("sleep", {"seconds": 0.3})
            order.append("slow")

        async def fast() -> None:
            await client.call("echo", {"text": "fast"})
            order.append("fast")

        async with anyio.create_task_group() as task_group:
            task_group.start_soon(slow)
            await dispatched(client, "pid")
            task_group.start_soon(fast)
    assert order == ["fast", "slow"]


async def test_a_handler_error_keeps_status_code_and_data(demo_socket: str) -> None:
    async with Client(demo_socket) as client:
        with pytest.raises(IpcHandlerError) as caught:
            await client.call("fail", {"statusCode": 422, "errorCode": "NOPE"})
    assert (caught.value.status_code, caught.value.code, caught.value.message) == (
        422,
        "NOPE",
        "demo failure",
    )
    assert caught.value.data["x"] == 1


async def test_a_missing_socket_is_a_transport_error_not_sent(short_tmp: Path) -> None:
    async with Client(str(short_tmp / "absent.sock")) as client:
        with pytest.raises(IpcTransportError) as caught:
            await client.call("echo")
    assert caught.value.sent is False
    assert "no such socket" in caught.value.message


async def test_a_daemon_killed_mid_call_fails_the_call_at_once_then_the_client_reconnects(
    demo: DaemonProcess, demo_socket: str
) -> None:
    async with Client(demo_socket, timeout=30) as client:
        first_pid = await client.call("pid")
        failure: list[IpcTransportError] = []

        async def stuck() -> None:
            try:
                await client.call("sleep", {"seconds": 20})
            except IpcTransportError as exc:
                failure.append(exc)

        started = time.monotonic()
        async with anyio.create_task_group() as task_group:
            task_group.start_soon(stuck)
            await dispatched(client, "pid")
            demo.kill()
        assert failure
        assert failure[0].sent is True
        assert time.monotonic() - started < 10
        with pytest.raises(IpcTransportError) as caught:
            await client.call("pid")
        assert caught.value.sent is False
        demo.restart()
        assert await client.call("pid") not in (first_pid, None)


async def test_a_call_past_its_timeout_is_a_transport_error_sent(demo_socket: str) -> None:
    async with Client(demo_socket) as client:
        with pytest.raises(IpcTransportError) as caught:
            await client.call("sleep", {"seconds": 2}, timeout=0.1)
        assert caught.value.sent is True
        assert "no answer within 0.1s" in caught.value.message
        assert (await client.call("echo", {"value": 3}))["value"] == 3


async def test_each_pending_call_expires_at_its_own_timeout(demo_socket: str) -> None:
    async with Client(demo_socket) as client:
        outcomes: dict[int, float | str] = {}

        async def expiry(index: int, seconds: float, timeout: float) -> None:
            started = time.monotonic()
            try:
                await client.call("sleep", {"seconds": seconds}, timeout=timeout)
            except IpcTransportError as exc:
                outcomes[index] = time.monotonic() - started if exc.sent else "unsent"
            else:
                outcomes[index] = "answered"

        # A long timeout first, then shorter ones: each still ends at its own.
        async with anyio.create_task_group() as group:
            for index, (seconds, timeout) in enumerate(
                [(0.8, 5.0), (3.0, 0.6), (3.0, 0.2), (0.1, 5.0)]
            ):
                group.start_soon(expiry, index, seconds, timeout)
        assert outcomes[0] == "answered"
        assert outcomes[3] == "answered"
        assert isinstance(outcomes[1], float)
        assert 0.55 <= outcomes[1] < 2.5
        assert isinstance(outcomes[2], float)
        assert 0.15 <= outcomes[2] < 0.55
        assert (await client.call("echo", {"value": 3}))["value"] == 3


async def test_timed_out_calls_leave_no_unread_failure_behind(short_tmp: Path) -> None:
    async def never_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while await reader.read(65536):
            pass
        writer.close()

    path = str(short_tmp / "silent.sock")
    server = await asyncio.start_unix_server(never_answer, path)
    loop = asyncio.get_running_loop()
    reported: list[str] = []
    loop.set_exception_handler(lambda _loop, context: reported.append(context["message"]))
    try:
        async with Client(path) as client:
            for _ in range(2):
                with pytest.raises(IpcTransportError):
                    await client.batch(
                        [BatchCall("a"), BatchCall("b"), BatchCall("c")], timeout=0.1
                    )
            with pytest.raises(IpcTransportError):
                await client.call("a", timeout=0.1)
        gc.collect()
        await anyio.sleep(0.05)
    finally:
        loop.set_exception_handler(None)
        server.close()
    assert reported == []


async def test_batches_and_notifications_through_the_client(demo_socket: str) -> None:
    async with Client(demo_socket) as client:
        await client.notify("echo", {"value": 1})
        results = await client.batch(
            [
                BatchCall("echo", {"value": 1}),
                BatchCall("echo", {"value": 2}, notify=True),
                BatchCall("fail", {"errorCode": "BAD"}),
            ]
        )
        assert results[0] == {"value": 1, "text": ""}
        assert isinstance(results[1], IpcHandlerError)
        assert results[1].code == "BAD"
        too_many = [BatchCall("echo") for _ in range(1001)]
        with pytest.raises(IpcHandlerError) as caught:
            await client.batch(too_many)
        assert caught.value.code == "BATCH_TOO_LARGE"


def test_sigterm_after_sigterm_never_kills_a_daemon_on_its_way_out(demo: DaemonProcess) -> None:
    # Ops may signal again while a daemon exits (systemctl stop, then kill): no moment of
    # its exit may fall back to SIGTERM's default action (exit -15). Five exits, each
    # under a stream of SIGTERMs, so a short such moment is hit.
    for _ in range(5):
        if not demo.running():
            demo.start()
        assert demo.proc is not None
        demo.expected_down = True
        while demo.proc.poll() is None:
            demo.proc.send_signal(signal.SIGTERM)
            time.sleep(0)
        assert demo.proc.wait() == 0


async def test_sigterm_lets_in_flight_calls_finish_and_refuses_new_ones(
    demo: DaemonProcess, demo_socket: str
) -> None:
    async with Client(demo_socket) as client:
        answers: list[object] = []

        async def slow() -> None:
            answers.append(await client.call("sleep", {"seconds": 0.5}))

        async with anyio.create_task_group() as task_group:
            for _ in range(5):
                task_group.start_soon(slow)
            await dispatched(client, "pid")
            demo.signal(signal.SIGTERM)
            await anyio.to_thread.run_sync(demo.wait_for, "STOPPING=1")
            with pytest.raises(IpcHandlerError) as caught:
                await client.call("echo")
            assert caught.value.code == "SHUTTING_DOWN"
            assert caught.value.retryable
    assert answers == [0.5] * 5
    assert demo.stop() == 0
    assert not (demo.runtime_dir / "demo.sock").exists()


MALFORMED_RESULTS = {
    "invalid UTF-8 in the result": b'"\xed\xa0\x80"',
    "a result nested too deeply": b"[" * 100_000 + b"]" * 100_000,
}


@pytest.mark.parametrize("result", MALFORMED_RESULTS.values(), ids=MALFORMED_RESULTS.keys())
async def test_a_malformed_answer_is_a_transport_error_and_the_client_goes_on(
    short_tmp: Path, result: bytes
) -> None:
    """A peer that answers its first call with bad bytes, later ones properly.

    A result the envelope decode cannot skip costs the connection (no id can
    be read); one it can skip costs the call. Either way the next call works.
    """
    bodies = iter([b'{"jsonrpc":"2.0","id":%d,"result":' + result + b"}"])

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(asyncio.IncompleteReadError):
            while True:
                length = int.from_bytes(await reader.readexactly(4), "big")
                request = json.loads(await reader.readexactly(length))
                frame = next(bodies, b'{"jsonrpc":"2.0","id":%d,"result":1}') % request["id"]
                writer.write(len(frame).to_bytes(4, "big") + frame)
        writer.close()

    path = str(short_tmp / "peer.sock")
    server = await asyncio.start_unix_server(answer, path)
    try:
        async with Client(path) as client:
            with pytest.raises(IpcTransportError, match="protocol violation") as caught:
                await client.call("a", timeout=5)
            assert caught.value.sent
            assert await client.call("b", timeout=5) == 1
    finally:
        server.close()


async def test_an_idle_connection_is_closed_and_the_client_reconnects_on_its_own(
    short_tmp: Path,
) -> None:
    with DaemonProcess(
        "tests.support.demo_server", short_tmp, short_tmp, "--idle-timeout", "0.5"
    ) as demo:
        async with Client(str(short_tmp / "demo.sock")) as client:
            # A call running longer than the idle timeout keeps its connection.
            assert await client.call("sleep", {"seconds": 1.0}) == 1.0
            first = client._protocol

            async def closed_as_idle() -> bool:
                return "idle" in demo.stderr() and client._protocol is None

            await eventually(closed_as_idle)
            assert await client.call("pid") == demo.pid
            assert client._protocol is not first
        assert demo.stop() == 0
