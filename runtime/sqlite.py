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
import logging
import os
import queue
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar, cast

import apsw

from protocol.deferred import outcome_of
from runtime.errors import EX_CANTCREAT, EX_DATAERR, DbOpenError

T = TypeVar("T")
U = TypeVar("U")

log = logging.getLogger("runtime.sqlite")

BUSY_TIMEOUT_MS = 5000
PROGRESS_STEPS = 1000
# A thread hands results back in one wake-up of the loop when jobs queued up
# behind each other: at most HOLD_MAX of them, and none held longer than a
# running job's HOLD_LIMIT seconds (checked by the progress handler).
HOLD_MAX = 16
HOLD_LIMIT = 0.001
STATEMENT_CACHE_SIZE = 256
# FULL: an acknowledged write survives power loss. NORMAL (WAL): it survives a
# crash of the process but the last commits may be lost on power loss.
SYNCHRONOUS = {"FULL": "FULL", "NORMAL": "NORMAL"}


class NeedsSavepoint(Exception):
    """A job in an optimistic group pass had to roll back; the group runs again with savepoints."""


class QueuedPastDeadline(Exception):
    """A job's deadline passed while it waited for its connection; it never ran."""


@dataclass(slots=True)
class Deadline:
    """The running job's deadline (monotonic seconds; 0 = none), read by the progress handler.

    The progress handler also hands back results the thread is holding for a
    batched wake-up once the running job has taken longer than `HOLD_LIMIT`:
    quick calls finished earlier never wait out a slow one.
    """

    at: float = 0.0
    started: float = 0.0
    release_held: Callable[[], None] | None = None

    def expired(self) -> bool:
        now = time.monotonic()
        if self.release_held is not None and now - self.started > HOLD_LIMIT:
            self.release_held()
        return bool(self.at) and now >= self.at


@dataclass(slots=True)
class Conn:
    """A connection, the deadline of the job running on it, and whether that job runs
    inside a group commit: `grouped`, its write transaction is a savepoint of the
    group's; `optimistic`, it is part of the group's with no savepoint, and a
    rollback it needs sends the whole group back to be run with savepoints."""

    db: apsw.Connection
    deadline: Deadline
    grouped: bool = False
    optimistic: bool = False
    needs_savepoint: bool = False
    busy_timeout_ms: int = BUSY_TIMEOUT_MS

    def execute(
        self, sql: str, bind: tuple[Any, ...] | None = None, *, cacheable: bool = True
    ) -> list[Any]:
        """Run one of our own statements; all its rows."""
        return list(self.db.execute(sql, bind, can_cache=cacheable))

    def changes_of(self, sql: str, bind: tuple[Any, ...] | None = None) -> int:
        """Run one of our own INSERT, UPDATE or DELETE statements; how many rows it changed."""
        before = self.db.total_changes()
        self.execute(sql, bind)
        return self.db.total_changes() - before


C = TypeVar("C", bound=Conn)


# Our own transaction control carries a per-process nonce so it can be cached:
# the statement policy is checked when a statement is prepared, and a caller's
# identical text would otherwise be served our prepared, unchecked BEGIN.
_NONCE = secrets.token_hex(8)
BEGIN = f"BEGIN IMMEDIATE /* {_NONCE} */"
COMMIT = f"COMMIT /* {_NONCE} */"
ROLLBACK = f"ROLLBACK /* {_NONCE} */"
SAVEPOINT = f"SAVEPOINT job_{_NONCE}"
RELEASE = f"RELEASE job_{_NONCE}"
ROLLBACK_TO = f"ROLLBACK TO job_{_NONCE}"


class WriteTransaction:
    """One job's write transaction: BEGIN IMMEDIATE ... COMMIT, or a savepoint of the
    group's transaction when the job runs inside a group commit.

    Rolled back when the block raises or on `rollback()`.
    """

    def __init__(self, conn: Conn) -> None:
        self.conn = conn
        self.done = False

    def __enter__(self) -> WriteTransaction:
        if not self.conn.optimistic:
            self.conn.execute(SAVEPOINT if self.conn.grouped else BEGIN, cacheable=True)
        return self

    def commit(self) -> None:
        if not self.conn.optimistic:
            self.conn.execute(RELEASE if self.conn.grouped else COMMIT, cacheable=True)
        self.done = True

    def rollback(self) -> None:
        self.done = True
        if self.conn.optimistic:
            self.conn.needs_savepoint = True
            raise NeedsSavepoint("this job's rollback needs the group run with savepoints")
        if not self.conn.db.in_transaction:
            return
        if self.conn.grouped:
            self.conn.execute(ROLLBACK_TO, cacheable=True)
            self.conn.execute(RELEASE, cacheable=True)
        else:
            self.conn.execute(ROLLBACK, cacheable=True)

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if self.done:
            return
        if exc_type is not None:
            self.rollback()
            return
        try:
            self.commit()
        except BaseException:
            self.rollback()
            raise


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
    pragmas = [
        f"synchronous = {SYNCHRONOUS[synchronous.upper()]}",
        "foreign_keys = ON",
        "temp_store = MEMORY",
    ]
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


GROUP_MAX = 64
CAREFUL_GROUPS = 8

OnDone = Callable[[Any, bool, Any], None]  # (context, ok, result or exception)


class Job(Generic[T]):
    """A job queued for a connection thread. Its outcome goes to `then`'s callback on the
    loop: `on_done(context, True, result)` or `on_done(context, False, exception)`.

    `then` must be called right after `Worker.submit`, before the loop runs
    anything else: the outcome is delivered by a loop callback, never earlier.
    """

    __slots__ = ("after", "context", "deadline", "fn", "loop", "on_done")

    def __init__(
        self, fn: Callable[[Any], T], deadline: float, loop: asyncio.AbstractEventLoop
    ) -> None:
        self.fn = fn
        self.deadline = deadline
        self.loop = loop
        self.on_done: OnDone | None = None
        self.context: Any = None
        self.after: Callable[[Any], Any] | None = None

    def then(self, on_done: Callable[[Any, bool, T | BaseException], None], context: Any) -> None:
        self.on_done = on_done
        self.context = context

    def map(self, after: Callable[[T], U]) -> Job[U]:
        """This job, its result passed through `after` on the loop before it is delivered."""
        before = self.after
        self.after = after if before is None else lambda value: after(before(value))
        return cast("Job[U]", self)


class Worker(Generic[C]):
    """Threads that each own one connection and run jobs from a shared queue, in order.

    Jobs that queued up while one ran are taken together (up to `batch_max`)
    and their results handed back to the loop in one wake-up. With
    `group_commit` (the writer), such a batch runs in one transaction, each
    job in a savepoint of it, and is committed once: one WAL sync for many
    calls. No result is handed back before that commit. If the group's
    transaction is lost under a job (an interrupt or I/O error rolls all of
    it back), nothing of it was committed and the other jobs run again alone.

    A thread taking one job at a time (`batch_max=1`, the readers, so no
    query waits behind a slow one while another reader is free) holds its
    results while more jobs wait in the queue, up to `HOLD_MAX` and
    `HOLD_LIMIT` (see `Deadline`), and hands them back together.

    A job whose deadline passed while it waited fails with `late_error()`.
    """

    def __init__(
        self,
        name: str,
        connections: list[C],
        *,
        group_commit: bool = False,
        batch_max: int = GROUP_MAX,
        late_error: Callable[[], BaseException] | None = None,
    ) -> None:
        self.name = name
        self.group_commit = group_commit
        self.batch_max = batch_max
        self.late_error = late_error or _queued_past_deadline
        self._careful_groups = 0
        self._queue: queue.SimpleQueue[Job[Any] | None] = queue.SimpleQueue()
        self._threads = [
            threading.Thread(target=self._serve, args=(conn,), name=f"{name}-{i}", daemon=True)
            for i, conn in enumerate(connections)
        ]
        for thread in self._threads:
            thread.start()

    def submit(self, fn: Callable[[C], T], deadline: float = 0.0) -> Job[T]:
        """Queue `fn(conn)` for one of the threads; call `then` on the job at once."""
        job: Job[T] = Job(fn, deadline, asyncio.get_running_loop())
        self._queue.put(job)
        return job

    async def run(self, fn: Callable[[C], T], deadline: float = 0.0) -> T:
        """`fn(conn)` on one of the threads: its result or its exception.

        Cancelling the caller does not stop a job that has started; its
        deadline does.
        """
        return await outcome_of(self.submit(fn, deadline))

    def _serve(self, conn: C) -> None:
        held: list[tuple[Job[Any], tuple[bool, Any]]] = []

        def release_held() -> None:
            if held:
                held[0][0].loop.call_soon_threadsafe(_settle_all, held.copy())
                held.clear()

        conn.deadline.release_held = release_held
        stop = False
        while not stop:
            jobs, stop = self._take(release_held if held else None)
            try:
                if self.group_commit and len(jobs) > 1:
                    outcomes = self._run_group(conn, jobs)
                else:
                    outcomes = [self._run_one(conn, job) for job in jobs]
            except BaseException as exc:
                # A failure outside the jobs (the group's ROLLBACK itself failing):
                # their callers get it, and the thread keeps serving the queue.
                outcomes = [(False, exc)] * len(jobs)
            held.extend(zip(jobs, outcomes, strict=True))
            if self.batch_max > 1 or len(held) >= HOLD_MAX:
                release_held()
        release_held()
        conn.db.close()

    def _take(self, release_held: Callable[[], None] | None) -> tuple[list[Job[Any]], bool]:
        """The next job and those queued behind it; True once the stop sentinel came.

        With results held, the thread never blocks before handing them back:
        checking for an empty queue and then blocking would let another thread
        take the last job in between, and the results would wait for the next.
        """
        if release_held is None:
            first = self._queue.get()
        else:
            try:
                first = self._queue.get_nowait()
            except queue.Empty:
                release_held()
                first = self._queue.get()
        if first is None:
            return [], True
        jobs = [first]
        while len(jobs) < self.batch_max:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            if job is None:
                return jobs, True
            jobs.append(job)
        return jobs, False

    def _run_one(self, conn: C, job: Job[Any]) -> tuple[bool, Any]:
        deadline = job.deadline
        watch = conn.deadline
        watch.at = deadline
        watch.started = time.monotonic()
        try:
            if deadline and watch.started >= deadline:
                return False, self.late_error()
            return True, job.fn(conn)
        except BaseException as exc:  # the job's failure belongs to its caller
            return False, exc
        finally:
            watch.at = 0.0

    def _run_group(self, conn: C, items: list[Job[Any]]) -> list[tuple[bool, Any]]:
        """The jobs in one transaction: first with no savepoints at all, which holds
        while none of them needs to roll back its own writes (the common case);
        else rolled back and run again, each job in a savepoint.

        After such a second run the next `CAREFUL_GROUPS` groups go straight to
        savepoints, so a stream of failing calls (a guesser's redemptions)
        does not make every group run twice. A job run twice gets the time the
        first run took added to its deadline.
        """
        if self._careful_groups:
            self._careful_groups -= 1
            return self._run_savepoint_group(conn, items)
        try:
            conn.execute(BEGIN, cacheable=True)
        except apsw.Error as exc:
            return self._run_alone(conn, items, exc)
        started = time.monotonic()
        outcomes: list[tuple[bool, Any]] = []
        conn.optimistic = True
        conn.needs_savepoint = False
        try:
            for item in items:
                outcomes.append(self._run_one(conn, item))
                if conn.needs_savepoint or not conn.db.in_transaction:
                    break
            else:
                conn.execute(COMMIT, cacheable=True)
                return outcomes
        except apsw.Error:
            pass
        finally:
            conn.optimistic = False
            conn.needs_savepoint = False
        if conn.db.in_transaction:
            conn.execute(ROLLBACK, cacheable=True)
        first_run = time.monotonic() - started
        for item in items[: len(outcomes)]:
            if item.deadline:
                item.deadline += first_run
        self._careful_groups = CAREFUL_GROUPS
        log.debug("%s: a group of %d calls runs again with savepoints", self.name, len(items))
        return self._run_savepoint_group(conn, items)

    def _run_alone(
        self, conn: C, items: list[Job[Any]], begin_error: apsw.Error
    ) -> list[tuple[bool, Any]]:
        """The group's BEGIN failed: each job runs on its own."""
        if not isinstance(begin_error, apsw.BusyError):
            if conn.db.in_transaction:
                # Left open by a failed ROLLBACK: bare statements must not land in it.
                conn.execute(ROLLBACK, cacheable=True)
            return [self._run_one(conn, item) for item in items]
        # Another process held the lock through a whole busy timeout: the
        # jobs queued behind answer busy now rather than each wait as long.
        conn.db.set_busy_timeout(0)
        try:
            return [self._run_one(conn, item) for item in items]
        finally:
            conn.db.set_busy_timeout(conn.busy_timeout_ms)

    def _run_savepoint_group(self, conn: C, items: list[Job[Any]]) -> list[tuple[bool, Any]]:
        try:
            conn.execute(BEGIN, cacheable=True)
        except apsw.Error as exc:
            return self._run_alone(conn, items, exc)
        conn.grouped = True
        try:
            outcomes: list[tuple[bool, Any]] = []
            for index, item in enumerate(items):
                outcomes.append(self._run_one(conn, item))
                if not conn.db.in_transaction:
                    conn.grouped = False
                    return self._redo(conn, items, outcomes, index)
            conn.execute(COMMIT, cacheable=True)
            return outcomes
        except apsw.Error:
            conn.grouped = False
            if conn.db.in_transaction:
                conn.execute(ROLLBACK, cacheable=True)
            return [self._run_one(conn, item) for item in items]
        finally:
            conn.grouped = False

    def _redo(
        self, conn: C, items: list[Job[Any]], outcomes: list[tuple[bool, Any]], lost_at: int
    ) -> list[tuple[bool, Any]]:
        """The group's transaction vanished during job `lost_at`: run the others alone."""
        ok, _ = outcomes[lost_at]
        redo_through = lost_at + 1 if ok else lost_at
        redone = [self._run_one(conn, item) for item in items[:redo_through]]
        kept = [] if ok else [outcomes[lost_at]]
        rest = [self._run_one(conn, item) for item in items[lost_at + 1 :]]
        return redone + kept + rest

    def stop(self) -> None:
        """Finish the queued jobs, then close the connections (blocking; call off the loop)."""
        for _ in self._threads:
            self._queue.put(None)
        for thread in self._threads:
            thread.join()


def _queued_past_deadline() -> QueuedPastDeadline:
    return QueuedPastDeadline("the call's deadline passed before it could start")


def _settle_all(settled: list[tuple[Job[Any], tuple[bool, Any]]]) -> None:
    for job, (ok, value) in settled:
        if job.on_done is None:
            log.error("a database job finished with nobody waiting for it")
            continue
        try:
            if ok and job.after is not None:
                try:
                    value = job.after(value)
                except Exception as exc:
                    ok, value = False, exc
            job.on_done(job.context, ok, value)
        except Exception:
            # One caller's broken callback must not strand the others' results.
            log.exception("a database job's callback failed")
