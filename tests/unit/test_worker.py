"""protocol.sqlite.Worker: every job's result reaches the loop, whatever the threads' timing."""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from typing import Any

import apsw
import pytest

from protocol.sqlite import Conn, Deadline, Worker

pytestmark = pytest.mark.anyio


class _SlowQueue(queue.SimpleQueue[Any]):
    """Widens the gap between looking at the queue and taking from it, as a GIL switch can."""

    def empty(self) -> bool:
        answer = super().empty()
        time.sleep(0.005)
        return answer

    def get_nowait(self) -> Any:
        time.sleep(0.005)
        return super().get_nowait()


def _readers(count: int) -> Worker[Conn]:
    connections = [Conn(apsw.Connection(":memory:"), Deadline()) for _ in range(count)]
    worker = Worker("test-reader", connections, batch_max=1)
    # Swap in the slow queue before any job: retire the started threads first.
    for _ in connections:
        worker._queue.put(None)
    for thread in worker._threads:
        thread.join()
    worker._queue = _SlowQueue()
    worker._threads = [
        threading.Thread(target=worker._serve, args=(conn,), daemon=True)
        for conn in [Conn(apsw.Connection(":memory:"), Deadline()) for _ in range(count)]
    ]
    for thread in worker._threads:
        thread.start()
    return worker


def _query(conn: Conn) -> int:
    time.sleep(0.01)
    return int(conn.execute("SELECT 41 + 1")[0][0])


async def test_no_result_is_held_while_its_thread_waits_for_more_jobs() -> None:
    worker = _readers(2)
    try:
        for _ in range(5):
            calls = [asyncio.ensure_future(worker.run(_query)) for _ in range(3)]
            done, pending = await asyncio.wait(calls, timeout=2)
            assert not pending, "a finished job's result was held back"
            assert [call.result() for call in done] == [42, 42, 42]
    finally:
        await asyncio.to_thread(worker.stop)
