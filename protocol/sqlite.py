"""SQLite through apsw, as both daemons use it: pragmas, migrations, and connection threads.

No apsw call runs on the event loop. Each connection is owned by one thread
that takes jobs from a queue (`Worker`); a whole transaction is one job, so
a call costs one thread hop. A job's result comes back to the loop with
`call_soon_threadsafe`. Chosen over `anyio.to_thread.run_sync`, which hands
each call to whichever pooled thread is free (a connection would hop threads
and need a lock) and costs more: measured here with uvloop, a `SELECT 1`
round trip took 28.8 us through a `Worker` and 130 us through
`to_thread.run_sync`. apsw's async mode was not chosen because it gives no
pool of readers beside the writer.

Timeouts: each job carries a deadline, checked by a progress handler on the
job's own connection; SQLite then stops with SQLITE_INTERRUPT and the
transaction rolls back. That is `interrupt()` from inside the job, so it can
never hit the next job the way an interrupt sent from the loop thread can.
"""

from __future__ import annotations

import asyncio
import os
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import apsw

T = TypeVar("T")

BUSY_TIMEOUT_MS = 5000
PROGRESS_STEPS = 1000
STATEMENT_CACHE_SIZE = 256
# FULL: an acknowledged write survives power loss. NORMAL (WAL): it survives a
# crash of the process but the last commits may be lost on power loss.
SYNCHRONOUS = {"FULL": "FULL", "NORMAL": "NORMAL"}
EX_DATAERR = 65
EX_CANTCREAT = 73


class DbOpenError(Exception):
    """The database cannot be opened or migrated; the daemon must not start."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class QueuedPastDeadline(Exception):
    """A job's deadline passed while it waited for its connection; it never ran."""


@dataclass(slots=True)
class Deadline:
    """The running job's deadline (monotonic seconds; 0 = none), read by the progress handler."""

    at: float = 0.0

    def expired(self) -> bool:
        return bool(self.at) and time.monotonic() >= self.at


@dataclass(slots=True)
class Conn:
    """A connection and the deadline of the job running on it."""

    db: apsw.Connection
    deadline: Deadline

    def execute(
        self, sql: str, bind: tuple[Any, ...] | None = None, *, cacheable: bool = True
    ) -> list[Any]:
        """Run one of our own statements; all its rows."""
        return list(self.db.execute(sql, bind, can_cache=cacheable))


C = TypeVar("C", bound=Conn)


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def connect(
    path: str,
    *,
    readonly: bool = False,
    busy_timeout_ms: int = BUSY_TIMEOUT_MS,
    synchronous: str = "FULL",
) -> apsw.Connection:
    """A connection with the pragmas both daemons rely on.

    WAL (readers beside the writer), synchronous=FULL (an acknowledged write
    survives power loss), foreign keys, a busy timeout, defensive mode,
    trusted_schema off, and no double-quoted string literals (they turn a
    typo'd column name into a string).
    """
    flags = apsw.SQLITE_OPEN_READONLY if readonly else apsw.SQLITE_OPEN_READWRITE
    if not readonly:
        flags |= apsw.SQLITE_OPEN_CREATE
    db = apsw.Connection(path, flags=flags, statementcachesize=STATEMENT_CACHE_SIZE)
    db.set_busy_timeout(busy_timeout_ms)
    db.config(apsw.SQLITE_DBCONFIG_DEFENSIVE, 1)
    db.config(apsw.SQLITE_DBCONFIG_TRUSTED_SCHEMA, 0)
    db.config(apsw.SQLITE_DBCONFIG_DQS_DML, 0)
    db.config(apsw.SQLITE_DBCONFIG_DQS_DDL, 0)
    pragmas = [f"synchronous = {SYNCHRONOUS[synchronous.upper()]}", "foreign_keys = ON"]
    if not readonly:
        pragmas.insert(0, "journal_mode = WAL")
    for pragma in pragmas:
        db.execute(f"PRAGMA {pragma}", can_cache=False)
    return db


def watch_deadline(db: apsw.Connection) -> Deadline:
    deadline = Deadline()
    db.set_progress_handler(deadline.expired, PROGRESS_STEPS)
    return deadline


def migrate(conn: Conn, migrations: tuple[str, ...], *, log: Callable[[str], None]) -> int:
    """Apply pending DDL (keyed on `user_version`) in one transaction; the schema version.

    A database newer than `migrations` is refused, never touched.
    """
    current = int(conn.execute("PRAGMA user_version", cacheable=False)[0][0])
    target = len(migrations)
    if current > target:
        raise DbOpenError(
            f"{conn.db.filename} has schema version {current}, newer than this program's "
            f"{target}; refusing to touch it (upgrade the program)",
            EX_DATAERR,
        )
    if current == target:
        return current
    conn.execute("BEGIN IMMEDIATE", cacheable=False)
    try:
        for version in range(current, target):
            conn.execute(migrations[version], cacheable=False)
        conn.execute(f"PRAGMA user_version = {target}", cacheable=False)
        conn.execute("COMMIT", cacheable=False)
    except BaseException:
        conn.execute("ROLLBACK", cacheable=False)
        raise
    log(f"migrated {conn.db.filename} from schema version {current} to {target}")
    return target


def make_state_dir(path: str) -> None:
    try:
        os.makedirs(os.path.dirname(path) or ".", mode=0o700, exist_ok=True)
    except OSError as exc:
        raise DbOpenError(f"cannot open database {path}: {exc}", EX_CANTCREAT) from exc


class Worker(Generic[C]):
    """Threads that each own one connection and run jobs from a shared queue, in order."""

    def __init__(self, name: str, connections: list[C]) -> None:
        self.name = name
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._threads = [
            threading.Thread(target=self._serve, args=(conn,), name=f"{name}-{i}", daemon=True)
            for i, conn in enumerate(connections)
        ]
        for thread in self._threads:
            thread.start()

    async def run(self, job: Callable[[C], T], deadline: float = 0.0) -> T:
        """`job(conn)` on one of the threads: its result or its exception.

        Cancelling the caller does not stop a job that has started; its
        deadline does.
        """
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._queue.put((job, deadline, future, loop))
        return await future

    def _serve(self, conn: C) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                break
            job, deadline, future, loop = item
            conn.deadline.at = deadline
            try:
                if deadline and time.monotonic() >= deadline:
                    raise QueuedPastDeadline("the call's deadline passed before it could start")
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
