"""The loop's own reader: a query it answers, and the ones it passes to the readers unrun
or stopped within its budget, on a real assistant.db in tmp_path."""

from __future__ import annotations

import functools
import itertools
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import apsw
import pytest

from pair.assistant import loop_reader, proxy
from pair.assistant.db import GuardedConn, open_guarded
from pair.assistant.errors import DbProxyFailed, SqlForbidden
from pair.assistant.loop_reader import BUDGET, MAX_BUDGET, VALUE_BYTES, LoopReader
from pair.assistant.policy import Denial
from pair.assistant.proxy import QueryResult
from pair.protocol.deferred import Done
from pair.runtime.sqlite import DatabaseFailure, timeout_error
from tests.support.sqlite import assistant_writer

COUNT_TO = "WITH RECURSIVE c(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM c WHERE n < ?)"
SLOW = f"{COUNT_TO} SELECT max(n) AS n FROM c"


pytestmark = pytest.mark.anyio


@pytest.fixture
def path(tmp_path: Path) -> str:
    return str(tmp_path / "assistant.db")


@pytest.fixture
def writer(path: str) -> Iterator[GuardedConn]:
    """The one writer, as in the daemon: the loop's reader counts its commits."""
    with assistant_writer(path) as conn:
        yield conn


def loop_reader_on(path: str, writer: GuardedConn, budget: float) -> Iterator[LoopReader]:
    conn = open_guarded(path, readonly=True, busy_timeout_ms=5000)
    reader = LoopReader(conn, writer, timeout_error, budget)
    try:
        yield reader
    finally:
        reader.close()


@pytest.fixture
def loop(path: str, writer: GuardedConn) -> Iterator[LoopReader]:
    """A loop reader with a budget no machine misses (with 100 us, a quick query the
    machine's own load holds up is stopped too, by design): what it passes on, it passes
    for what the query is. `slow_loop` has the daemon's budget."""
    yield from loop_reader_on(path, writer, MAX_BUDGET)


@pytest.fixture
def slow_loop(path: str, writer: GuardedConn) -> Iterator[LoopReader]:
    yield from loop_reader_on(path, writer, BUDGET)


def rows_of(done: Done[Any] | None) -> list[dict[str, Any]]:
    assert done is not None
    assert done.ok, done.value
    assert isinstance(done.value, QueryResult)
    return done.value.rows


def answered(loop: LoopReader, fn: Any, sql: str, deadline: float = 0.0) -> Done[Any]:
    done = loop.attempt(fn, sql, deadline)
    assert done is not None, "passed to the readers"
    return done


def query(sql: str, *bind: Any) -> Any:
    return functools.partial(proxy.query, sql=sql, bind=bind, max_rows=1000)


async def test_a_quick_query_is_answered_and_sees_every_commit_before_it(
    writer: GuardedConn, loop: LoopReader
) -> None:
    for value in ("a", "b"):
        proxy.run(writer, "INSERT INTO t (v) VALUES (?)", (value,), 10)
        rows = rows_of(answered(loop, query("SELECT v FROM t ORDER BY id"), "q"))
        assert [row["v"] for row in rows] == ["a", "b"][: len(rows)]
        assert rows[-1]["v"] == value


def warmed(loop: LoopReader) -> None:
    """Once the schema read a stop started on its thread is over (`LoopReader._warm`)."""
    if loop.warmer is not None:
        loop.warmer.join()
    assert not loop.warming


async def test_a_slow_query_is_stopped_within_the_budget_then_passed_on_unrun(
    slow_loop: LoopReader,
) -> None:
    loop = slow_loop
    waits = []
    for _ in range(6):
        loop.too_slow.clear()
        for _ in range(2):
            assert loop.attempt(query(SLOW, 10_000_000), SLOW, 0.0) is None
            warmed(loop)
        # Twice in a row: passed on unrun for a while, however quick its binds; a while
        # twice as long each time it is found too slow again, up to RETRY_AFTER.
        assert loop.attempt(query(SLOW, 10), SLOW, 0.0) is None
        waits.append(loop.too_slow[hash(SLOW)] - time.monotonic())
    assert waits[0] <= loop_reader.FIRST_RETRY
    assert all(later > earlier for earlier, later in itertools.pairwise(waits[:5]))
    assert loop_reader.RETRY_AFTER / 2 < waits[5] <= loop_reader.RETRY_AFTER
    assert loop.passed == 18
    assert loop.failures == {}
    # Then tried again: answered here if its run fits the budget; the connection is as
    # good after, whichever.
    loop.too_slow = dict.fromkeys(loop.too_slow, time.monotonic())
    done = loop.attempt(query(SLOW, 10), SLOW, 0.0)
    assert done is None or rows_of(done) == [{"n": 10}]
    loop.conn.deadline.hold_limit = MAX_BUDGET
    assert rows_of(answered(loop, query("SELECT 1 AS one"), "SELECT 1 AS one")) == [{"one": 1}]


async def test_a_failure_is_the_callers_answer_not_a_retry(loop: LoopReader) -> None:
    done = answered(loop, query("SELECT nope FROM t"), "bad")
    assert done is not None
    assert not done.ok
    assert isinstance(done.value, DbProxyFailed)


async def test_a_query_past_its_deadline_is_db_timeout_as_on_the_readers(
    loop: LoopReader,
) -> None:
    done = loop.attempt(query("SELECT 1"), "SELECT 1", time.monotonic() - 1)
    assert done is not None
    assert isinstance(done.value, DatabaseFailure)
    assert done.value.error_code == "DB_TIMEOUT"
    assert loop.failures == {"DB_TIMEOUT": 1}


async def test_a_query_refused_for_a_lock_is_passed_on_never_waited_for(
    loop: LoopReader,
) -> None:
    """A reader of a WAL database meets SQLITE_BUSY only while another connection recovers
    the WAL or holds it in exclusive mode; what the proxy raises then is passed on."""

    def locked(conn: GuardedConn) -> None:
        busy = apsw.BusyError("database is locked")
        raise proxy.translate(busy, conn, DbProxyFailed) from busy

    assert loop.conn.execute("PRAGMA busy_timeout") == [(0,)]
    assert loop.attempt(locked, "locked", 0.0) is None
    assert loop.passed == 1
    assert loop.failures == {}


STUCK = "SELECT length(trim(printf('%.*c', 150000, 'a'), printf('%.*c', 150000, 'b') || 'a')) AS n"


@pytest.mark.parametrize(
    "sql",
    [
        STUCK,  # one SQLite step of minutes: no progress handler would stop it
        "SELECT max(id) AS n FROM t WHERE v LIKE '%a%'",
        "PRAGMA integrity_check",
        "SELECT count(*) AS n FROM t",  # one step over the whole table
        "SELECT key FROM json_each('[1, 2]')",  # its argument parsed in one step
        f"SELECT 1 AS one WHERE 0 IN ({', '.join(['1'] * 2000)})",  # a long text to prepare
    ],
)
async def test_a_statement_that_could_stall_the_loop_is_passed_on_before_it_runs(
    loop: LoopReader, sql: str
) -> None:
    assert loop.attempt(query(sql), sql, 0.0) is None
    # Refused before it ran, not stopped by the budget after it did.
    assert not loop.stops
    assert loop.failures == {}


async def test_functions_of_bounded_work_are_answered_on_the_loop_and_refusals_too(
    loop: LoopReader,
) -> None:
    sql = "SELECT coalesce(max(id), 0) AS top, typeof(max(v)) AS t FROM t"
    assert rows_of(answered(loop, query(sql), sql)) == [{"top": 0, "t": "null"}]
    refused = answered(loop, query("SELECT load_extension('x')"), "ext")
    assert refused is not None
    assert isinstance(refused.value, SqlForbidden)


@pytest.mark.parametrize(
    ("schema", "sql", "denial"),
    [
        # The expression is compiled with the schema, where no authorizer is asked: a
        # second of one SQLite step per row on the loop, without the refusal.
        (
            "CREATE TABLE g (id INTEGER PRIMARY KEY, a TEXT, s TEXT GENERATED ALWAYS AS"
            " (trim(printf('%.*c', 20000, a), printf('%.*c', 20000, 'b') || a)) VIRTUAL);"
            " INSERT INTO g (a) VALUES ('a')",
            "SELECT s IS NOT NULL AS n FROM g",
            Denial.NOT_QUICK,
        ),
        # A virtual table's module runs code of its own in a step (FTS5 searches in one).
        (
            "CREATE VIRTUAL TABLE r USING rtree(id, x0, x1); INSERT INTO r VALUES (1, 0, 5)",
            "SELECT id AS n FROM r WHERE x0 < 3",
            None,
        ),
    ],
)
async def test_what_the_schema_compiles_in_is_passed_on_before_it_runs(
    writer: GuardedConn, loop: LoopReader, schema: str, sql: str, denial: Denial | None
) -> None:
    proxy.execute_script(writer, schema)
    rows_of(answered(loop, query("SELECT id FROM t"), "SELECT id FROM t"))
    assert loop.attempt(query(sql), sql, 0.0) is None
    assert loop.conn.guard.denial is denial
    assert not loop.stops
    assert hash(sql) in loop.too_slow
    # Refused midway, the statement left no read open: the loop still sees each commit.
    proxy.run(writer, "INSERT INTO t (v) VALUES ('after')", None, 10)
    assert rows_of(answered(loop, query("SELECT v FROM t"), "SELECT v FROM t")) == [{"v": "after"}]


async def test_a_value_too_long_for_one_quick_step_is_passed_on_and_shorter_ones_answered(
    writer: GuardedConn, loop: LoopReader
) -> None:
    proxy.run(writer, "INSERT INTO t (id, v) VALUES (1, ?), (2, 'short')", ("x" * 10**6,), 10)
    short = "SELECT v FROM t WHERE id = 2"
    assert rows_of(answered(loop, query(short), short)) == [{"v": "short"}]
    half = "x" * (VALUE_BYTES // 2 + 1)
    stored, made = "SELECT v FROM t WHERE id = 1", "SELECT ? || ? AS vv"
    for sql, bind in ((stored, ()), (made, (half, half))):
        assert loop.attempt(query(sql, *bind), sql, 0.0) is None
        assert hash(sql) in loop.too_slow
    assert loop.failures == {}


async def test_queries_share_one_snapshot_until_the_writer_commits(
    path: str, writer: GuardedConn, loop: LoopReader, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(loop_reader, "SNAPSHOT_AGE", 60.0)
    sql = "SELECT v FROM t ORDER BY id"
    assert rows_of(answered(loop, query(sql), sql)) == []
    # A writer of another process's (not counted): not seen while the snapshot lasts.
    other = open_guarded(path, readonly=False, busy_timeout_ms=100)
    try:
        proxy.run(other, "INSERT INTO t (v) VALUES ('other')", None, 10)
    finally:
        other.db.close()
    assert rows_of(answered(loop, query(sql), sql)) == []
    # A commit of the writer's, before its answer goes out: the next query sees it all.
    proxy.run(writer, "INSERT INTO t (v) VALUES ('ours')", None, 10)
    assert rows_of(answered(loop, query(sql), sql)) == [{"v": "other"}, {"v": "ours"}]


async def test_an_idle_loop_lets_its_snapshot_go_and_the_wal_be_checkpointed_to_its_end(
    writer: GuardedConn, loop: LoopReader
) -> None:
    sql = "SELECT v FROM t WHERE id = 1"
    assert rows_of(answered(loop, query(sql), sql)) == []
    proxy.run(writer, "INSERT INTO t (v) VALUES ('x')", None, 10)
    frames, copied = writer.db.wal_checkpoint(mode=apsw.SQLITE_CHECKPOINT_PASSIVE)
    assert copied < frames, "the loop's snapshot holds the WAL"
    await anyio.sleep(loop_reader.SNAPSHOT_AGE * 2)
    assert not loop.conn.db.in_transaction
    assert writer.db.wal_checkpoint(mode=apsw.SQLITE_CHECKPOINT_TRUNCATE) == (0, 0)


async def test_stop_leaves_no_snapshot_and_no_timer(writer: GuardedConn, loop: LoopReader) -> None:
    sql = "SELECT v FROM t WHERE id = 1"
    assert rows_of(answered(loop, query(sql), sql)) == []
    loop.stop()
    assert not loop.conn.db.in_transaction
    assert loop.expiry is None
    assert loop.attempt(query(sql), sql, 0.0) is None
