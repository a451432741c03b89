"""assistant.db: its schema, and the connections db_proxy runs on.

One writer thread serialises every write in arrival order; reader threads
serve `query` beside it (WAL): one at a time, another joining while one is
stuck; a query past 1 ms runs again in the slow lane. See `runtime.sqlite`
for the thread model and how deadlines interrupt a statement.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import apsw

from pair.assistant.loop_reader import BUDGET, LoopReader
from pair.assistant.policy import Guard, Mode
from pair.protocol.deferred import Done
from pair.protocol.framing import DEFAULT_MAX_FRAME_BYTES
from pair.runtime.errors import EX_CANTCREAT, DbOpenError
from pair.runtime.sqlite import (
    BUSY_TIMEOUT_MS,
    STOP_TIMEOUT,
    Conn,
    Job,
    Readers,
    WriteHealth,
    Writer,
    connect,
    open_migrated,
    stop_pools,
    timeout_error,
    watch_deadline,
)

T = TypeVar("T")

log = logging.getLogger("assistant.db")

READERS = 2
# One reader takes queries while the other waits, unless the first runs a slow
# one (`Readers` turns): two busy readers cost each other the GIL.
READER_TURNS = 1
# The reader with the turn takes the queries queued up, up to this many at a
# time (one wake-up of the loop for their answers). With 64 point queries in
# flight, 64 at a time served 56k/s where one at a time served 47k/s.
READER_BATCH = 64
# A query still running after HOLD_LIMIT (1 ms) is stopped and run again from
# the start (a read has no side effects) in the slow lane, whose queries pause
# half the time while quick ones wait (`SlowLane`).
SLOW_READERS = 2

MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE events (
        id TEXT PRIMARY KEY,
        kind TEXT NOT NULL,
        payload TEXT NOT NULL,
        received_at INTEGER NOT NULL
    );
    -- The pre-gateway shape of invites, which older installs carry. The
    -- assistant never reads it: the gateway's one-time migration imports the
    -- live rows through db_proxy and deletes them (SPEC.md section 4).
    CREATE TABLE assistant_ingress_invites (
        id TEXT PRIMARY KEY,
        source_channel TEXT NOT NULL,
        token_hash TEXT NOT NULL,
        source_conversation_id TEXT,
        note TEXT,
        max_uses INTEGER NOT NULL DEFAULT 1,
        use_count INTEGER NOT NULL DEFAULT 0,
        expires_at INTEGER NOT NULL,
        status TEXT NOT NULL DEFAULT 'active',
        redeemed_by_external_user_id TEXT,
        redeemed_by_external_chat_id TEXT,
        redeemed_at INTEGER,
        expected_external_user_id TEXT,
        voice_code_hash TEXT,
        voice_code_digits INTEGER,
        invite_code_hash TEXT,
        friend_name TEXT,
        guardian_name TEXT,
        contact_id TEXT,
        created_at INTEGER NOT NULL,
        updated_at INTEGER NOT NULL
    );
    CREATE TABLE idempotency_keys (
        key TEXT PRIMARY KEY,
        result TEXT NOT NULL,
        created_at INTEGER NOT NULL
    );
    """,
)
# The daemon's own tables: a caller may read them, never write them (SPEC.md section 3).
INTERNAL_TABLES = frozenset({"events", "idempotency_keys"})


class CallerObjectRefused(apsw.AuthError):
    """One of our own statements would have run a caller's trigger: it did not run."""


@dataclass(slots=True)
class GuardedConn(Conn):
    """A connection whose caller statements are held to the statement policy."""

    guard: Guard = field(kw_only=True)
    # The largest answer a frame can carry: rows past it are not read at all.
    frame_bytes: int = field(default=DEFAULT_MAX_FRAME_BYTES, kw_only=True)
    # Caller statement texts already checked to be one statement (a property of
    # the text, whatever the schema), and whether they have result columns:
    # they run without the per-statement trace callback (see assistant.proxy).
    checked_sql: dict[str, bool] = field(default_factory=dict, kw_only=True)

    def execute(
        self, sql: str, bind: tuple[Any, ...] | None = None, *, cacheable: bool = False
    ) -> list[Any]:
        """Run one of our own statements, exempt from the caller policy.

        Only statements the policy would also allow a caller may be
        `cacheable`: the policy is checked when a statement is prepared, so a
        cached BEGIN of ours would let a caller's identical BEGIN skip it.
        """
        self.guard.begin(Mode.TRUSTED)
        try:
            return Conn.execute(self, sql, bind, cacheable=cacheable)
        except apsw.AuthError as exc:
            if self.guard.denial is None:
                raise
            raise CallerObjectRefused(f"{exc}: {self.guard.reason}") from exc


def open_guarded(
    path: str,
    *,
    readonly: bool,
    busy_timeout_ms: int,
    synchronous: str = "FULL",
    max_length: int = DEFAULT_MAX_FRAME_BYTES,
) -> GuardedConn:
    db = connect(path, readonly=readonly, busy_timeout_ms=busy_timeout_ms, synchronous=synchronous)
    # No string or blob may be larger than a frame can carry: a caller's
    # randomblob(2e9) fails at once (SQLITE_TOOBIG) instead of taking the memory.
    db.limit(apsw.SQLITE_LIMIT_LENGTH, max_length)
    guard = Guard(INTERNAL_TABLES)
    conn = GuardedConn(
        db, watch_deadline(db), busy_timeout_ms=busy_timeout_ms, guard=guard, frame_bytes=max_length
    )
    db.authorizer = guard.authorize
    return conn


class Database:
    """assistant.db: one writer thread and `READERS` reader threads, one taking queries at a
    time."""

    def __init__(
        self,
        path: str,
        busy_timeout_ms: int = BUSY_TIMEOUT_MS,
        synchronous: str = "FULL",
        max_length: int = DEFAULT_MAX_FRAME_BYTES,
        *,
        loop_reads: bool = True,
        loop_budget: float = BUDGET,
    ) -> None:
        self.path = path
        self.loop_reads = loop_reads
        self.loop_budget = loop_budget
        self.busy_timeout_ms = busy_timeout_ms
        self.synchronous = synchronous
        self.max_length = max_length
        self.schema_version = 0
        self.writer: Writer[GuardedConn] | None = None
        self.write_health = WriteHealth()
        self.readers: Readers[GuardedConn] | None = None
        self.loop_reader: LoopReader | None = None

    def open(self) -> None:
        """Open, migrate and start the threads (blocking; call off the loop)."""
        writer, self.schema_version = open_migrated(
            self.path, functools.partial(self._open, readonly=False), MIGRATIONS, log=log.info
        )
        try:
            count = READERS + SLOW_READERS + (1 if self.loop_reads else 0)
            readers = [self._open(readonly=True) for _ in range(count)]
        except apsw.Error as exc:
            writer.db.close()
            raise DbOpenError(f"cannot open database {self.path}: {exc}", EX_CANTCREAT) from exc
        writer.health = self.write_health
        self.writer = Writer("db-writer", writer, late_error=timeout_error)
        if self.loop_reads:
            self.loop_reader = LoopReader(readers.pop(), writer, timeout_error, self.loop_budget)
        self.readers = Readers(
            "db-reader",
            readers[:READERS],
            readers[READERS:],
            turns=READER_TURNS,
            batch_max=READER_BATCH,
            late_error=timeout_error,
            also_busy=None if self.loop_reader is None else self.loop_reader.busy,
        )

    def _open(self, *, readonly: bool) -> GuardedConn:
        return open_guarded(
            self.path,
            readonly=readonly,
            busy_timeout_ms=self.busy_timeout_ms,
            synchronous=self.synchronous,
            max_length=self.max_length,
        )

    def stop_loop_reads(self) -> None:
        """On the loop, once the server has stopped: before `close`."""
        if self.loop_reader is not None:
            self.loop_reader.stop()

    def close(self, timeout: float = STOP_TIMEOUT) -> None:
        """Stop the threads and close the connections within `timeout` (blocking; call
        off the loop)."""
        if self.loop_reader is not None:
            # The server has stopped: the loop runs no query on it any more. Closed before
            # the writer, which then checkpoints and removes the WAL as the last one out.
            self.loop_reader.close()
            self.loop_reader = None
        pools = [self.readers, self.writer]
        stop_pools([pool for pool in pools if pool is not None], timeout)
        self.readers = self.writer = None

    def failure_counts(self) -> dict[str, int]:
        """Database failures of the calls so far, by errorCode (the `metrics` method)."""
        counts = {} if self.loop_reader is None else dict(self.loop_reader.failures)
        for pool in (self.writer, self.readers):
            for code, count in (pool.failure_counts() if pool is not None else {}).items():
                counts[code] = counts.get(code, 0) + count
        return counts

    def query_counts(self) -> dict[str, int]:
        """db_proxy queries by where they were answered (the `metrics` method)."""
        reader = self.loop_reader
        if reader is None:
            return {}
        return {"loop": reader.answered, "readers": reader.passed}

    def submit_write(self, job: Callable[[GuardedConn], T], deadline: float = 0.0) -> Job[T]:
        assert self.writer is not None, "database is not open"
        return self.writer.submit(job, deadline)

    def submit_read(self, job: Callable[[GuardedConn], T], deadline: float = 0.0) -> Job[T]:
        assert self.readers is not None, "database is not open"
        return self.readers.submit(job, deadline)

    def read(
        self, job: Callable[[GuardedConn], T], sql: str, deadline: float = 0.0
    ) -> Done[T] | Job[T]:
        """A query: first on the loop (`LoopReader`), where it is answered at once unless it
        turns out slow; else, or then, from the readers. On the loop thread only."""
        if self.loop_reader is None:
            return self.submit_read(job, deadline)
        done = self.loop_reader.attempt(job, sql, deadline)
        return self.submit_read(job, deadline) if done is None else done

    async def write(self, job: Callable[[GuardedConn], T], deadline: float = 0.0) -> T:
        assert self.writer is not None, "database is not open"
        return await self.writer.run(job, deadline)


def high_water(db: apsw.Connection) -> dict[str, int]:
    """What a snapshot of assistant.db holds, for a backup's manifest: its events."""
    row: Any = db.execute("SELECT count(*), coalesce(max(rowid), 0) FROM events").fetchall()[0]
    return {"events": int(row[0]), "lastEventRowid": int(row[1])}
