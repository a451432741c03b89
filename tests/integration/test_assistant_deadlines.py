"""`timeoutMs` holds even inside one long SQLite step, where no progress handler runs.

A quadratic `trim()` of two strings is one step that takes seconds; the caller
must hear DB_TIMEOUT while it still runs (the write lock is still held when
the answer arrives), and the work must never be committed when it comes out.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

import anyio
import apsw
import pytest

from pair.protocol.client import Client
from pair.protocol.errors import IpcHandlerError
from pair.testing.daemons import DaemonProcess
from tests.support.calls import failure, rows, sql, tx
from tests.support.waiting import dispatched

pytestmark = pytest.mark.anyio

# Seconds on this machine (40,000 characters: about 2 s), far past the timeouts below.
STUCK = "length(trim(printf('%.*c', 40000, 'a'), printf('%.*c', 40000, 'b') || 'a'))"


@pytest.fixture
def assistant_db(assistant: DaemonProcess) -> Iterator[apsw.Connection]:
    """The daemon's database as another process sees it, with no busy wait."""
    db = apsw.Connection(str(assistant.state_dir / "assistant.db"))
    db.set_busy_timeout(0)
    try:
        yield db
    finally:
        db.close()


@pytest.fixture
async def client(assistant_socket: str) -> AsyncIterator[Client]:
    async with Client(assistant_socket, timeout=30) as client:
        await sql(client, "CREATE TABLE t (id INTEGER PRIMARY KEY, v)", "exec")
        yield client


def write_lock_is_held(db: apsw.Connection) -> bool:
    """Whether some connection (the daemon's writer) is inside a write transaction."""
    try:
        db.execute("BEGIN IMMEDIATE")
    except apsw.BusyError:
        return True
    db.execute("ROLLBACK")
    return False


# Each one SQLite step of seconds here; the LIKE pattern is under SQLite's 50,000 limit.
ONE_LONG_STEP = {
    "trim": STUCK,
    "like": "printf('%.*c', 100000, 'a') LIKE ('%' || printf('%.*c', 40000, 'a') || 'b')",
    "glob": "printf('%.*c', 100000, 'a') GLOB ('*' || printf('%.*c', 40000, 'a') || 'b')",
    "instr": "instr(printf('%.*c', 8000000, 'a'), printf('%.*c', 20000, 'a') || 'b')",
}


@pytest.mark.parametrize("expression", ONE_LONG_STEP.values(), ids=ONE_LONG_STEP.keys())
async def test_a_query_stuck_in_one_step_is_answered_db_timeout(
    client: Client, expression: str
) -> None:
    error = await failure(sql(client, f"SELECT {expression} AS n", "query", timeoutMs=200))
    assert (error.code, error.status_code, error.retryable) == ("DB_TIMEOUT", 504, False)
    assert await rows(client, "SELECT 1 AS one") == [{"one": 1}]


async def test_queries_sent_after_one_stuck_in_one_step_are_answered_while_it_runs(
    client: Client, assistant_socket: str
) -> None:
    await sql(client, "INSERT INTO t (id) VALUES (1)")
    answered: list[str] = []

    async def stuck() -> None:
        assert await rows(client, f"SELECT {STUCK} AS n", timeoutMs=20_000) == [{"n": 0}]
        answered.append("stuck")

    # The reader running the stuck query cannot give its turn away itself (its
    # progress handler never runs): the loop must, or these wait seconds for it.
    async with Client(assistant_socket, timeout=30) as other, anyio.create_task_group() as tg:
        tg.start_soon(stuck)
        await dispatched(client)
        for _ in range(20):
            assert await rows(other, "SELECT id FROM t") == [{"id": 1}]
        answered.append("quick")
    assert answered == ["quick", "stuck"]


@pytest.mark.parametrize(
    "call",
    [
        pytest.param(
            lambda client: sql(client, f"INSERT INTO t (v) SELECT {STUCK}", timeoutMs=200),
            id="run",
        ),
        pytest.param(
            lambda client: sql(client, f"INSERT INTO t (v) SELECT {STUCK};", "exec", timeoutMs=200),
            id="exec",
        ),
        pytest.param(
            lambda client: tx(
                client,
                {"sql": "INSERT INTO t (v) VALUES ('first step')"},
                {"sql": f"INSERT INTO t (v) SELECT {STUCK}"},
                idempotencyKey="stuck",
                timeoutMs=200,
            ),
            id="transaction",
        ),
    ],
)
async def test_a_write_stuck_in_one_step_is_answered_while_it_runs_and_never_committed(
    client: Client, assistant_db: apsw.Connection, call: Any
) -> None:
    error = await failure(call(client))
    assert (error.code, error.status_code) == ("DB_TIMEOUT", 504)
    assert write_lock_is_held(assistant_db), "answered only once the step was over"
    # Queued behind the stuck step, so answered once it has come out.
    await sql(client, "INSERT INTO t (v) VALUES ('after')")
    assert await rows(client, "SELECT v FROM t") == [{"v": "after"}]
    # The key was not stored with the abandoned work: a retry runs.
    retried = await tx(
        client, {"sql": "INSERT INTO t (v) VALUES ('retry')"}, idempotencyKey="stuck"
    )
    assert retried["results"][0]["changes"] == 1


async def test_a_stuck_call_in_a_group_commit_is_left_out_and_the_others_commit(
    client: Client, assistant_db: apsw.Connection
) -> None:
    """Calls queued while the writer waits for a lock run as one group; the one that is
    stuck past its deadline is answered DB_TIMEOUT and the group commits without it."""
    assistant_db.execute("BEGIN IMMEDIATE")
    answers: dict[str, Any] = {}

    async def call(name: str, statement: str, timeout_ms: int = 5000) -> None:
        try:
            answers[name] = (await sql(client, statement, timeoutMs=timeout_ms))["changes"]
        except IpcHandlerError as exc:
            answers[name] = exc
            answers["lock held at the timeout"] = write_lock_is_held(assistant_db)

    async with anyio.create_task_group() as task_group:
        task_group.start_soon(call, "blocked", "INSERT INTO t (v) VALUES ('blocked')")
        await dispatched(client)
        task_group.start_soon(call, "before", "INSERT INTO t (v) VALUES ('before')")
        task_group.start_soon(call, "stuck", f"INSERT INTO t (v) SELECT {STUCK}", 800)
        task_group.start_soon(call, "after", "INSERT INTO t (v) VALUES ('after')")
        await dispatched(client)
        assistant_db.execute("ROLLBACK")
    assert answers["blocked"] == answers["before"] == answers["after"] == 1
    assert getattr(answers["stuck"], "code", None) == "DB_TIMEOUT"
    assert answers["lock held at the timeout"] is True
    assert await rows(client, "SELECT v FROM t ORDER BY id") == [
        {"v": "blocked"},
        {"v": "before"},
        {"v": "after"},
    ]


async def test_calls_queued_behind_a_stuck_write_are_answered_at_their_own_deadlines(
    client: Client, assistant_db: apsw.Connection
) -> None:
    codes: list[str] = []

    async def stuck() -> None:
        await sql(client, f"INSERT INTO t (v) SELECT {STUCK}", timeoutMs=60_000)

    async def queued(index: int) -> None:
        error = await failure(sql(client, f"INSERT INTO t (v) VALUES ({index})", timeoutMs=200))
        codes.append(error.code)

    async with anyio.create_task_group() as task_group:
        task_group.start_soon(stuck)
        await dispatched(client)
        async with anyio.create_task_group() as behind:
            for index in range(20):
                behind.start_soon(queued, index)
        assert write_lock_is_held(assistant_db), "answered only once the stuck step was over"
    assert codes == ["DB_TIMEOUT"] * 20
    assert await rows(client, "SELECT count(*) AS n FROM t") == [{"n": 1}]
