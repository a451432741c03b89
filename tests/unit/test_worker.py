"""runtime.sqlite's pools (Readers, Writer): every job's result reaches the loop, whatever the
timing."""

from __future__ import annotations

import asyncio
import functools
import queue
import threading
import time
from pathlib import Path
from typing import Any

import anyio
import apsw
import pytest

from pair.runtime.sqlite import (
    Conn,
    Deadline,
    Job,
    QueuedPastDeadline,
    Readers,
    Writer,
    WriteTransaction,
    watch_deadline,
)

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


def _memory(count: int) -> list[Conn]:
    return [Conn(apsw.Connection(":memory:"), Deadline()) for _ in range(count)]


def _readers(count: int) -> Readers[Conn]:
    return Readers(
        "test-reader", _memory(count), _memory(1), turns=count, batch_max=1, jobs=_SlowQueue()
    )


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


@pytest.mark.parametrize("batch_max", [1, 64])
async def test_a_thread_stuck_in_one_step_gives_its_turn_and_its_held_results_away(
    batch_max: int,
) -> None:
    """One turn between two threads: a job that never comes back to Python (one long
    SQLite step; a wait here) holds back neither the results its thread finished
    before it nor the jobs queued behind it, taken in its batch or not. The loop
    hands them all on."""
    release = threading.Event()

    def stuck(conn: Conn) -> str:
        release.wait(10)
        return "stuck"

    # Queued before the threads start, so the thread with the turn takes them: it
    # holds the first result back while more jobs wait, then gets stuck on the
    # second, with the third in its batch (batch_max=64) or still queued.
    jobs: queue.SimpleQueue[Any] = queue.SimpleQueue()
    finished_before = _queued(jobs, _answer)
    stuck_call = _queued(jobs, stuck)
    taken_with_it = _queued(jobs, _answer)
    worker = Readers("test-reader", _memory(2), _memory(1), turns=1, batch_max=batch_max, jobs=jobs)
    try:
        queued_behind = asyncio.ensure_future(worker.run(_answer))
        with anyio.fail_after(5):
            assert await finished_before == 42
            assert await taken_with_it == 42
            assert await queued_behind == 42
        assert not stuck_call.done()
        release.set()
        assert await stuck_call == "stuck"
    finally:
        release.set()
        await asyncio.to_thread(worker.stop)


async def test_results_of_a_batch_are_not_held_past_hold_limit_for_the_rest_of_it() -> None:
    """A thread taking a batch hands back what it finished once the first of it has waited
    `HOLD_LIMIT`, without waiting for the end of the batch."""
    release = threading.Event()

    def medium(conn: Conn) -> str:
        time.sleep(0.005)
        return "medium"

    def last(conn: Conn) -> str:
        release.wait(10)
        return "last"

    jobs: queue.SimpleQueue[Any] = queue.SimpleQueue()
    futures = [_queued(jobs, fn) for fn in (_answer, medium, last)]
    worker = Readers("test-reader", _memory(1), _memory(1), turns=1, batch_max=64, jobs=jobs)
    try:
        with anyio.fail_after(5):
            assert await futures[0] == 42
            assert await futures[1] == "medium"
        assert not futures[2].done()
        release.set()
        assert await futures[2] == "last"
    finally:
        release.set()
        await asyncio.to_thread(worker.stop)


async def test_a_slow_job_runs_again_from_the_start_in_the_slow_lane() -> None:
    """A read past `HOLD_LIMIT` is stopped and run again from the start on the slow lane's
    thread; its caller gets the second run's result, once."""
    runs: list[str] = []

    def slow(conn: Conn) -> int:
        runs.append(threading.current_thread().name)
        counting = "WITH RECURSIVE r(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM r WHERE x < ?)"
        return int(conn.execute(f"{counting} SELECT count(*) FROM r", (300_000,))[0][0])

    def watched() -> Conn:
        db = apsw.Connection(":memory:")
        return Conn(db, watch_deadline(db))

    worker = Readers("test-reader", [watched()], [watched()], turns=1, batch_max=64)
    try:
        assert await worker.run(_answer) == 42
        assert runs == []
        assert await worker.run(slow) == 300_000
        assert runs == ["test-reader-0", "test-reader-slow-0"]
        assert worker.failure_counts() == {}
    finally:
        await asyncio.to_thread(worker.stop)


def _queued(jobs: queue.SimpleQueue[Any], fn: Any) -> asyncio.Future[Any]:
    """`fn` queued as a job before a pool's threads start (`Readers(jobs=...)`): its
    result, or its exception's repr."""
    loop = asyncio.get_running_loop()
    future = loop.create_future()
    job: Job[Any] = Job(fn, 0.0, loop)
    job.then(lambda _, ok, value: future.set_result(value if ok else repr(value)), None)
    jobs.put(job)
    return future


def _answer(conn: Conn) -> int:
    return int(conn.execute("SELECT 41 + 1")[0][0])


def _writer(path: str) -> Writer[Conn]:
    db = apsw.Connection(path)
    db.execute("PRAGMA journal_mode = WAL").fetchall()
    db.execute("CREATE TABLE t (id INTEGER PRIMARY KEY)")
    return Writer("test-writer", Conn(db, Deadline()))


def _insert(
    conn: Conn, row: int, *, fail: type[Exception] | None = None, keep: bool = False
) -> int:
    with WriteTransaction(conn) as tx:
        conn.execute("INSERT INTO t (id) VALUES (?)", (row,))
        if keep:
            tx.commit()
        if fail is not None:
            raise fail(f"job {row} failed")
    return row


async def test_a_group_keeps_exactly_what_each_job_committed(short_tmp: Path) -> None:
    path = str(short_tmp / "group.db")
    worker = _writer(path)
    try:
        for failing in (False, True):
            started = threading.Event()
            release = threading.Event()

            def blocker(
                conn: Conn, started: threading.Event = started, release: threading.Event = release
            ) -> int:
                started.set()
                release.wait(5)
                return 0

            first = asyncio.ensure_future(worker.run(blocker))
            await asyncio.to_thread(started.wait, 5)
            base = 10 if failing else 20
            # Queued behind the blocker, so the writer takes them as one group.
            jobs = [
                worker.run(functools.partial(_insert, row=base + 1)),
                worker.run(
                    functools.partial(_insert, row=base + 2, fail=ValueError if failing else None)
                ),
                worker.run(
                    functools.partial(
                        _insert, row=base + 3, fail=RuntimeError if failing else None, keep=True
                    )
                ),
                worker.run(functools.partial(_insert_returning, row=base + 4)),
            ]
            calls = [asyncio.ensure_future(job) for job in jobs]
            await asyncio.sleep(0)  # each job is queued in its task's first step
            release.set()
            outcomes = await asyncio.gather(first, *calls, return_exceptions=True)
            if failing:
                assert [type(o).__name__ for o in outcomes[1:]] == [
                    "int",
                    "ValueError",
                    "RuntimeError",
                    "list",
                ]
            else:
                assert outcomes[1:4] == [21, 22, 23]
        rows = apsw.Connection(path).execute("SELECT id FROM t ORDER BY id").fetchall()
        assert [row[0] for row in rows] == [11, 13, 14, 21, 22, 23, 24]
    finally:
        await asyncio.to_thread(worker.stop)


def _insert_handling(conn: Conn, row: int, seen: list[str]) -> str:
    """Service code that handles any failure of its write, as a careful caller would."""
    try:
        _insert(conn, row, fail=ValueError)
    except Exception as exc:
        seen.append(type(exc).__name__)
        return "handled"
    return "written"


async def test_a_jobs_failure_handler_never_sees_the_groups_own_rerun(short_tmp: Path) -> None:
    """In a group's optimistic pass a job's rollback needs the group run again with
    savepoints: that is the group's affair, caught at the job's boundary, and the job's
    own `except Exception` sees only its real failure, once."""
    worker = _writer(str(short_tmp / "group.db"))
    seen: list[str] = []
    try:
        started, release = threading.Event(), threading.Event()

        def blocker(conn: Conn) -> int:
            started.set()
            release.wait(5)
            return 0

        first = asyncio.ensure_future(worker.run(blocker))
        await asyncio.to_thread(started.wait, 5)
        calls = [
            asyncio.ensure_future(worker.run(functools.partial(_insert, row=1))),
            asyncio.ensure_future(
                worker.run(functools.partial(_insert_handling, row=2, seen=seen))
            ),
        ]
        await asyncio.sleep(0)  # each job is queued in its task's first step
        release.set()
        assert await asyncio.gather(first, *calls) == [0, 1, "handled"]
        assert seen == ["ValueError"]
    finally:
        await asyncio.to_thread(worker.stop)


@pytest.mark.parametrize("slow_fails", [False, True], ids=["slow-commits", "slow-fails"])
async def test_a_call_held_past_its_deadline_by_its_group_is_answered_and_left_out(
    short_tmp: Path, slow_fails: bool
) -> None:
    """The loop answers a call whose deadline passed while a slow job of its group ran;
    the group, when it gets to commit, commits everything but that call."""
    worker = _writer(str(short_tmp / "deadline.db"))
    try:
        started = threading.Event()
        release = threading.Event()

        def blocker(conn: Conn) -> int:
            started.set()
            release.wait(5)
            return 0

        def slow(conn: Conn) -> int:
            with WriteTransaction(conn):
                conn.execute("INSERT INTO t (id) VALUES (2)")
                time.sleep(0.5)
                if slow_fails:
                    raise ValueError("undone")
            return 2

        first = asyncio.ensure_future(worker.run(blocker))
        await asyncio.to_thread(started.wait, 5)
        quick = asyncio.ensure_future(
            worker.run(functools.partial(_insert, row=1), time.monotonic() + 0.1)
        )
        held = asyncio.ensure_future(worker.run(slow))
        after = asyncio.ensure_future(worker.run(functools.partial(_insert, row=3)))
        await asyncio.sleep(0)  # each job is queued in its task's first step
        release.set()
        done, _ = await asyncio.wait([quick, held], return_when=asyncio.FIRST_COMPLETED)
        assert done == {quick}, "the expired call waited for its group"
        assert isinstance(quick.exception(), QueuedPastDeadline)
        outcomes = await asyncio.gather(first, held, after, return_exceptions=True)
        if slow_fails:
            assert isinstance(outcomes[1], ValueError)
        else:
            assert outcomes[1] == 2
        assert outcomes[2] == 3
        assert worker_rows(short_tmp / "deadline.db") == ([3] if slow_fails else [2, 3])
    finally:
        await asyncio.to_thread(worker.stop)


def _insert_returning(conn: Conn, row: int) -> list[Any]:
    return conn.execute("INSERT INTO t (id) VALUES (?)", (row,)) and [row]


def worker_rows(path: Path) -> list[int]:
    return [row[0] for row in apsw.Connection(str(path)).execute("SELECT id FROM t ORDER BY id")]
