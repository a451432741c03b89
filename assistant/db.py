"""assistant.db: apsw connections, pragmas, migrations, and the threads they live on.

No apsw call runs on the event loop. Each connection is owned by one thread
that takes jobs from a queue (`Worker`): one writer, so writes are
serialised in arrival order and a whole transaction is one job (one thread
hop per call), and a small pool of readers that share a queue and serve
`query` concurrently with the writer (WAL). A job's result comes back with
`call_soon_threadsafe`. Chosen over `anyio.to_thread.run_sync` because that
hands each call to whichever worker thread is free, so a connection would
hop threads and need a lock, and it costs more per call; over apsw's async
mode because that needs apsw >= 3.51 and gives no reader pool.

Timeouts: each job carries a deadline, checked by a progress handler on its
own connection; SQLite then stops with SQLITE_INTERRUPT and the transaction
rolls back. This is `Connection.interrupt()` from inside the job, so it can
never hit the next job the way an interrupt sent from the loop thread can.
"""

from __future__ import annotations

import asyncio
import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import apsw

from assistant.policy import Guard, Mode
from protocol.errors import RouteError

T = TypeVar("T")

log = logging.getLogger("assistant.db")

BUSY_TIMEOUT_MS = 5000
READERS = 2
PROGRESS_STEPS = 1000
STATEMENT_CACHE_SIZE = 256

MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE events (
        id TEXT PRIMARY KEY,
        kind TEXT NOT NULL,
        payload TEXT NOT NULL,
        received_at INTEGER NOT NULL
    );
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
SCHEMA_VERSION = len(MIGRATIONS)
INTERNAL_TABLES = frozenset({"idempotency_keys"})


class DbOpenError(Exception):
    """The database cannot be opened or migrated; the daemon must not start."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


@dataclass(slots=True)
class Deadline:
    """The current job's deadline on one connection (monotonic seconds; 0 = none)."""

    at: float = 0.0

    def expired(self) -> bool:
        return bool(self.at) and time.monotonic() >= self.at


@dataclass(slots=True)
class Conn:
    """A connection with the per-connection state its statement policy and timeouts use."""

    db: apsw.Connection
    deadline: Deadline
    guard: Guard


def timeout_error(data: dict[str, Any] | None = None) -> RouteError:
    """DB_TIMEOUT: the call's `timeoutMs` passed, in the queue or in SQLite; nothing was applied."""
    return RouteError(
        "the statement ran past timeoutMs and was interrupted; nothing was applied",
        504,
        "DB_TIMEOUT",
        data=data,
    )


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def open_connection(path: str, *, readonly: bool) -> Conn:
    flags = apsw.SQLITE_OPEN_READONLY if readonly else apsw.SQLITE_OPEN_READWRITE
    flags |= apsw.SQLITE_OPEN_NOMUTEX
    if not readonly:
        flags |= apsw.SQLITE_OPEN_CREATE
    db = apsw.Connection(path, flags=flags, statementcachesize=STATEMENT_CACHE_SIZE)
    db.set_busy_timeout(BUSY_TIMEOUT_MS)
    db.config(apsw.SQLITE_DBCONFIG_DEFENSIVE, 1)
    db.config(apsw.SQLITE_DBCONFIG_TRUSTED_SCHEMA, 0)
    # Double-quoted string literals silently turn a typo'd column into a string.
    db.config(apsw.SQLITE_DBCONFIG_DQS_DML, 0)
    db.config(apsw.SQLITE_DBCONFIG_DQS_DDL, 0)
    conn = Conn(db, Deadline(), Guard(INTERNAL_TABLES))
    if not readonly:
        trusted(conn, "PRAGMA journal_mode = WAL")
    trusted(conn, "PRAGMA synchronous = FULL")
    trusted(conn, "PRAGMA foreign_keys = ON")
    db.set_progress_handler(conn.deadline.expired, PROGRESS_STEPS)
    db.authorizer = conn.guard.authorize
    return conn


def trusted(
    conn: Conn, sql: str, bind: tuple[Any, ...] | None = None, *, cacheable: bool = False
) -> list[Any]:
    """Run one of our own statements, exempt from the caller policy.

    Only statements the policy would also allow a caller may be `cacheable`:
    the policy is checked when a statement is prepared, so a cached BEGIN of
    ours would let a caller's identical BEGIN skip it.
    """
    conn.guard.begin(Mode.TRUSTED)
    return list(conn.db.execute(sql, bind, can_cache=cacheable))


def migrate(conn: Conn, migrations: tuple[str, ...] = MIGRATIONS) -> int:
    """Apply the pending migrations in one transaction; the resulting schema version."""
    db = conn.db
    current = int(trusted(conn, "PRAGMA user_version")[0][0])
    if current > len(migrations):
        raise DbOpenError(
            f"{db.filename} has schema version {current}, newer than this program's "
            f"{len(migrations)}; refusing to touch it (upgrade the program)",
            65,
        )
    if current == len(migrations):
        return current
    trusted(conn, "BEGIN IMMEDIATE")
    try:
        for version in range(current, len(migrations)):
            trusted(conn, migrations[version])
        trusted(conn, f"PRAGMA user_version = {len(migrations)}")
        trusted(conn, "COMMIT")
    except BaseException:
        trusted(conn, "ROLLBACK")
        raise
    log.info("migrated %s from schema version %d to %d", db.filename, current, len(migrations))
    return len(migrations)


class Worker:
    """Threads that each own one connection and run jobs from a shared queue, in order."""

    def __init__(self, name: str, connections: list[Conn]) -> None:
        self.name = name
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._connections = connections
        self._threads = [
            threading.Thread(target=self._serve, args=(conn,), name=f"{name}-{i}", daemon=True)
            for i, conn in enumerate(connections)
        ]
        for thread in self._threads:
            thread.start()

    async def run(self, job: Callable[[Conn], T], deadline: float = 0.0) -> T:
        """Run `job(conn)` on one of the threads; its result or its exception."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._queue.put((job, deadline, future, loop))
        return await future

    def _serve(self, conn: Conn) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                break
            job, deadline, future, loop = item
            conn.deadline.at = deadline
            try:
                if deadline and time.monotonic() >= deadline:
                    raise timeout_error()
                result = job(conn)
            except BaseException as exc:  # the job's failure belongs to its caller
                loop.call_soon_threadsafe(_settle_exception, future, exc)
            else:
                loop.call_soon_threadsafe(_settle_result, future, result)
            finally:
                conn.deadline.at = 0.0
        conn.db.close()

    def stop(self) -> None:
        """Finish the queued jobs, then close the connections (blocking; call off the loop)."""
        for _ in self._threads:
            self._queue.put(None)
        for thread in self._threads:
            thread.join()


def _settle_result(future: asyncio.Future[T], result: T) -> None:
    if not future.done():
        future.set_result(result)


def _settle_exception(future: asyncio.Future[Any], exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)


class Database:
    """assistant.db: one writer thread and `READERS` reader threads."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.schema_version = 0
        self.writer: Worker | None = None
        self.readers: Worker | None = None

    def open(self) -> None:
        """Open, migrate and start the threads (blocking; call off the loop)."""
        directory = os.path.dirname(self.path) or "."
        try:
            os.makedirs(directory, mode=0o700, exist_ok=True)
            writer = open_connection(self.path, readonly=False)
        except (OSError, apsw.Error) as exc:
            raise DbOpenError(f"cannot open database {self.path}: {exc}", 73) from exc
        try:
            self.schema_version = migrate(writer)
            readers = [open_connection(self.path, readonly=True) for _ in range(READERS)]
        except apsw.Error as exc:
            writer.db.close()
            raise DbOpenError(f"cannot migrate database {self.path}: {exc}", 73) from exc
        self.writer = Worker("db-writer", [writer])
        self.readers = Worker("db-reader", readers)

    def close(self) -> None:
        """Stop the threads and close the connections (blocking; call off the loop)."""
        for worker in (self.readers, self.writer):
            if worker is not None:
                worker.stop()
        self.readers = self.writer = None

    async def write(self, job: Callable[[Conn], T], deadline: float = 0.0) -> T:
        assert self.writer is not None, "database is not open"
        return await self.writer.run(job, deadline)

    async def read(self, job: Callable[[Conn], T], deadline: float = 0.0) -> T:
        assert self.readers is not None, "database is not open"
        return await self.readers.run(job, deadline)
