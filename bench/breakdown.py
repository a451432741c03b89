"""Where a point query's server CPU goes: each stage timed alone, in process.

`python -m bench.breakdown` builds an assistant.db like `make bench`'s (10k rows in
`kv`), then times each stage the assistant runs for `db_proxy` `SELECT v FROM kv
WHERE id = ?` with the daemon's own functions, a stage at a time, beside what a
bare server (`bench.bare`) does for the same answer. Stages that need a socket
(reading the frame, the write) are the floor's and are left to the bench's
`srv cpu us` column; this is the rest, in microseconds per call (best of 5 runs of
20k calls: what the stage costs, not what it waits).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import apsw
import msgspec

from pair.assistant import proxy
from pair.assistant.db import Database, open_guarded
from pair.assistant.policy import Mode
from pair.assistant.routes import DbProxyParams, _check_statement
from pair.assistant.statement import Statement
from pair.protocol.calls import Calls
from pair.protocol.deferred import outcome_of
from pair.protocol.dispatch import Router
from pair.protocol.framing import encode_frame_of
from pair.protocol.messages import decode_request, success_response
from pair.protocol.metrics import MethodCounts
from pair.protocol.values import bind_from_wire

CALLS = 20_000
SQL = "SELECT v FROM kv WHERE id = ?"
BODY = msgspec.json.encode(
    {"jsonrpc": "2.0", "id": 7, "method": "db_proxy", "params": {"sql": SQL, "mode": "query",
                                                                 "bind": [4242]}}
)  # fmt: skip


def per_call(stage: Callable[[], Any], calls: int = CALLS) -> float:
    """Microseconds of CPU per call of `stage`, best of 5 runs."""
    best = float("inf")
    for _ in range(5):
        started = time.thread_time()
        for _ in range(calls):
            stage()
        best = min(best, time.thread_time() - started)
    return best / calls * 1e6


def hop(db: Database, job: Callable[[Any], Any]) -> float:
    """CPU of the loop thread and the reader thread per job handed over and back, as the
    assistant does (`Readers.submit`, its result settled on the loop), minus the job."""

    async def run() -> float:
        cpu_before = time.process_time()
        for _ in range(CALLS // 4):
            await outcome_of(db.submit_read(job))
        return (time.process_time() - cpu_before) / (CALLS // 4) * 1e6

    return asyncio.run(run())


def main() -> None:
    with tempfile.TemporaryDirectory() as where:
        path = str(Path(where) / "assistant.db")
        db = Database(path, loop_reads=True)
        db.open()
        setup = apsw.Connection(path)
        setup.execute(
            "CREATE TABLE kv (id INTEGER PRIMARY KEY, v TEXT);"
            " WITH RECURSIVE s(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM s WHERE n < 10000)"
            " INSERT INTO kv (id, v) SELECT n, 'value-' || n FROM s;"
        )
        setup.close()
        try:
            report(db, path)
        finally:
            db.stop_loop_reads()
            db.close()


def report(db: Database, path: str) -> None:
    router = Router("assistantd", "0")

    def db_proxy(params: DbProxyParams) -> None:
        return None

    router.add("db_proxy", db_proxy, inline=True)
    method = router.get("db_proxy")
    assert method is not None
    request = decode_request(BODY)
    params = method.decode_params(request.params)
    calls = Calls(router, logging.getLogger("bench"))
    reader = db.loop_reader
    assert reader is not None
    # A reader's connection of its own (the loop reader's stops what runs past its budget
    # outside an attempt).
    conn = open_guarded(path, readonly=True, busy_timeout_ms=5000)
    bind = bind_from_wire(params.bind)
    query = functools.partial(proxy.query, sql=SQL, bind=bind, max_rows=1000)
    result = query(conn)
    counts = MethodCounts()
    plain = apsw.Connection(path, flags=apsw.SQLITE_OPEN_READONLY)

    def statement_alone() -> None:
        plain.execute(SQL, (4242,)).fetchall()

    def statement_in_snapshot() -> float:
        plain.execute("BEGIN")
        try:
            return per_call(statement_alone)
        finally:
            plain.execute("COMMIT")

    async def on_the_loop() -> float:
        # The loop's reader keeps its snapshot with a timer of the running loop's. Its first
        # tries read the schema kv was added to, may be stopped and read it on a thread.
        while reader.attempt(query, SQL, time.monotonic() + 10) is None:
            if reader.warmer is not None:
                reader.warmer.join()
            reader.too_slow.clear()
        passed = reader.passed
        micros = per_call(lambda: reader.attempt(query, SQL, time.monotonic() + 10))
        if reader.passed != passed:
            print(f"({reader.passed - passed} loop attempts were passed to the readers)")
        return micros

    def statement_guarded() -> None:
        statement = Statement(conn, SQL, bind)
        cursor = statement.open(Mode.READ)
        for _ in cursor:
            pass

    def rows() -> None:
        statement = Statement(conn, SQL, bind)
        statement.read_rows(statement.open(Mode.READ), 1000)

    def checks() -> None:
        _check_statement(SQL, params.bind)
        bind_from_wire(params.bind)

    def bare_answer() -> None:
        cursor = plain.execute(SQL, (4242,))
        columns = [column[0] for column in cursor.description]
        rows = [dict(zip(columns, row, strict=True)) for row in cursor]
        msgspec.json.encode(
            {"jsonrpc": "2.0", "id": 7, "result": {"columns": columns, "rows": rows}}
        )
        msgspec.json.decode(BODY)

    stages: list[tuple[str, float]] = [
        ("envelope: decode_request", per_call(lambda: decode_request(BODY))),
        ("params: decode and validate", per_call(lambda: method.decode_params(request.params))),
        ("dispatch: look up, resolve", per_call(lambda: calls.resolve(request, method, True))),
        ("bind and sql checks", per_call(checks)),
        ("statement: apsw alone", per_call(statement_alone)),
        ("statement: apsw alone, in an open read transaction", statement_in_snapshot()),
        ("statement: policy, single check, cursor", per_call(statement_guarded)),
        ("statement, rows and size accounting", per_call(rows)),
        ("proxy.query whole", per_call(lambda: query(conn))),
        ("loop attempt: proxy.query, snapshot, deadline", asyncio.run(on_the_loop())),
        (
            "answer: response + encode frame",
            per_call(lambda: encode_frame_of(success_response(7, result))),
        ),
        ("metrics: count and time", per_call(lambda: counts.record(0.0001, None))),
        ("bare server's own work for the answer", per_call(bare_answer)),
    ]
    query_alone = dict(stages)["proxy.query whole"]
    stages.append(("the hop (reader thread and back), both threads", hop(db, query) - query_alone))
    width = max(len(name) for name, _ in stages)
    print(f"{'stage':<{width}}  us/call")
    for name, micros in stages:
        print(f"{name:<{width}}  {micros:7.2f}")


if __name__ == "__main__":
    main()
