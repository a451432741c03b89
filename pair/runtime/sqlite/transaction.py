"""A connection as a job sees it, and the job's write transaction (alone or in a group)."""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import apsw

from pair.runtime.sqlite.errors import WriteHealth, timeout_error
from pair.runtime.sqlite.job import Job

BUSY_TIMEOUT_MS = 5000
PROGRESS_STEPS = 1000
# A thread hands results back in one wake-up of the loop when jobs queued up
# behind each other: at most HOLD_MAX of them (as many as a client keeps in
# flight: measured with 64 in flight, point queries went from 35k to 42k/s
# when this went from 16 to 64), none held once HOLD_LIMIT seconds old, and
# none while the running job has taken longer (checked by the progress handler).
HOLD_MAX = 64
HOLD_LIMIT = 0.001


class NeedsSavepoint(Exception):
    """A job in an optimistic group pass had to roll back; the group runs again with savepoints."""


@dataclass(slots=True)
class Deadline:
    """The running job's deadline (monotonic seconds; 0 = none), read by the progress handler.

    Once the running job has taken longer than `HOLD_LIMIT`, the progress
    handler also calls `on_slow` (`ConnectionPool`), so quick calls never wait
    out a slow one: the thread hands back the results it holds for a batched
    wake-up and lets another thread take jobs; or, when `on_slow` says so, the
    job is interrupted (`demoted`) to run again from the start elsewhere.
    """

    at: float = 0.0
    started: float = 0.0
    on_slow: Callable[[], bool] | None = None
    job: Job[Any] | None = None
    demoted: bool = False

    def keep_job(self) -> bool:
        """Before a commit: False when the loop has already answered the running job's caller
        with its timeout, so its writes must be rolled back instead (`Job.keep`)."""
        return self.job is None or self.job.keep()

    def passed(self) -> bool:
        """True once the job's deadline has passed. Checked between the statements of a
        job: one that is quick in SQLite's VM steps (a C function doing the work) never
        reaches the progress handler, and sixty of them would keep the writer for
        seconds after the caller was answered DB_TIMEOUT."""
        return bool(self.at) and time.monotonic() >= self.at

    def on_progress(self) -> bool:
        """SQLite's progress handler: True (interrupt the statement) once the deadline has
        passed, or once the job is slow and `on_slow` demotes it."""
        now = time.monotonic()
        if self.on_slow is not None and now - self.started > HOLD_LIMIT and self.on_slow():
            self.demoted = True
            return True
        return bool(self.at) and now >= self.at


class TxMode(Enum):
    """How the running job's `WriteTransaction` maps onto SQLite's transaction.

    ALONE: its own BEGIN IMMEDIATE ... COMMIT. SAVEPOINT: a savepoint of the
    group commit's transaction. OPTIMISTIC: part of the group's transaction
    with no savepoint of its own. RERUN: an OPTIMISTIC job had to roll back
    its own writes, which it cannot alone, so the group is run again with a
    savepoint per job.
    """

    ALONE = "alone"
    SAVEPOINT = "savepoint"
    OPTIMISTIC = "optimistic"
    RERUN = "rerun"


@dataclass(slots=True)
class Conn:
    """A connection, the deadline of the job running on it, and how that job's write
    transaction maps onto SQLite's (`TxMode`, set by the group commit)."""

    db: apsw.Connection
    deadline: Deadline
    tx_mode: TxMode = TxMode.ALONE
    busy_timeout_ms: int = BUSY_TIMEOUT_MS
    health: WriteHealth = field(default_factory=WriteHealth)

    def execute(
        self, sql: str, bind: tuple[Any, ...] | None = None, *, cacheable: bool = True
    ) -> list[Any]:
        """Run one of our own statements; all its rows. A failure closes its cursor at
        once: one left mid-statement would keep the transaction from committing."""
        cursor = self.db.cursor()
        try:
            return list(cursor.execute(sql, bind, can_cache=cacheable))
        except BaseException:
            cursor.close(True)
            raise

    def note_commit(self, changes_before: int) -> None:
        """A commit just succeeded: it clears a degraded database if it wrote rows (the
        gateway's reads run on its writer too, and an empty COMMIT proves nothing)."""
        if self.db.total_changes() != changes_before:
            self.health.committed()

    def changes_of(self, sql: str, bind: tuple[Any, ...] | None = None) -> int:
        """Run one of our own INSERT, UPDATE or DELETE statements; how many rows it changed."""
        before = self.db.total_changes()
        self.execute(sql, bind)
        return self.db.total_changes() - before


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


def ours(sql: str) -> str:
    """`sql` marked with the nonce, so it can be cached on a connection callers also use."""
    return f"{sql} /* {_NONCE} */"


class WriteTransaction:
    """One job's write transaction: BEGIN IMMEDIATE ... COMMIT, or its part of a group
    commit's transaction (see `TxMode`).

    Rolled back when the block raises or on `rollback()`.
    """

    def __init__(self, conn: Conn) -> None:
        self.conn = conn
        self.done = False
        self._changes_before = 0

    def __enter__(self) -> WriteTransaction:
        mode = self.conn.tx_mode
        if mode is TxMode.ALONE:
            self.conn.execute(BEGIN, cacheable=True)
            self._changes_before = self.conn.db.total_changes()
        elif mode is TxMode.SAVEPOINT:
            self.conn.execute(SAVEPOINT, cacheable=True)
        return self

    def commit(self) -> None:
        mode = self.conn.tx_mode
        if mode is TxMode.ALONE:
            if not self.conn.deadline.keep_job():
                raise timeout_error()
            self.conn.execute(COMMIT, cacheable=True)
            self.conn.note_commit(self._changes_before)
        elif mode is TxMode.SAVEPOINT:
            self.conn.execute(RELEASE, cacheable=True)
        self.done = True

    def rollback(self) -> None:
        self.done = True
        conn = self.conn
        if conn.tx_mode is TxMode.OPTIMISTIC:
            conn.tx_mode = TxMode.RERUN
            raise NeedsSavepoint("this job's rollback needs the group run with savepoints")
        if not conn.db.in_transaction:
            return
        if conn.tx_mode is TxMode.SAVEPOINT:
            conn.execute(ROLLBACK_TO, cacheable=True)
            conn.execute(RELEASE, cacheable=True)
        else:
            conn.execute(ROLLBACK, cacheable=True)

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


def watch_deadline(db: apsw.Connection) -> Deadline:
    """The deadline of the jobs run on `db`, enforced by its progress handler."""
    deadline = Deadline()
    db.set_progress_handler(deadline.on_progress, PROGRESS_STEPS)
    return deadline
