"""A connection as a job sees it, and the job's write transaction (alone or in a group)."""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import apsw

from pair.runtime.sqlite.deadline import Deadline
from pair.runtime.sqlite.errors import WriteHealth, timeout_error

BUSY_TIMEOUT_MS = 5000


class GroupAbort(BaseException):
    """A job of an OPTIMISTIC group pass has to roll back its own writes, which it cannot
    alone: the group (`GroupCommit`) catches this at the job's boundary, rolls back and
    runs again with a savepoint per job. A BaseException, like a cancellation: it is the
    group's own signal, and no `except Exception` in service code may take it for the
    job's failure."""


class TxMode(Enum):
    """How the running job's `WriteTransaction` maps onto SQLite's transaction.

    ALONE: its own BEGIN IMMEDIATE ... COMMIT. SAVEPOINT: a savepoint of the
    group commit's transaction. OPTIMISTIC: part of the group's transaction
    with no savepoint of its own (its rollback raises `GroupAbort`).
    """

    ALONE = "alone"
    SAVEPOINT = "savepoint"
    OPTIMISTIC = "optimistic"


@dataclass(slots=True)
class Conn:
    """A connection, the deadline of the job running on it, and how that job's write
    transaction maps onto SQLite's (`TxMode`, set by the group commit)."""

    db: apsw.Connection
    deadline: Deadline
    tx_mode: TxMode = TxMode.ALONE
    busy_timeout_ms: int = BUSY_TIMEOUT_MS
    health: WriteHealth = field(default_factory=WriteHealth)
    # Commits made on this connection so far, counted once each is visible to readers:
    # the loop's reader starts a new snapshot when it moves (`assistant.loop_reader`).
    commits: int = 0

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
        self.commits += 1
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
BEGIN_READ = f"BEGIN DEFERRED /* {_NONCE} */"
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
            raise GroupAbort
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
