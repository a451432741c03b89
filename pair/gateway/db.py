"""gateway.db: its schema and the one connection thread every gateway statement runs on.

Everything the gateway stores is small and local, so one writer thread
serves reads and writes alike: redemptions are serialised by it, and each
is atomic, on its own or as part of a group commit (several calls' jobs in
one BEGIN IMMEDIATE transaction, each undone alone when it fails). See
`runtime.sqlite` for the thread model.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

import apsw

from pair.runtime.sqlite import (
    BUSY_TIMEOUT_MS,
    STOP_TIMEOUT,
    Conn,
    Job,
    WriteHealth,
    Writer,
    WriteTransaction,
    connect,
    database_failure,
    open_migrated,
    watch_deadline,
)

T = TypeVar("T")

log = logging.getLogger("gateway.db")

MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE contacts (
        id TEXT PRIMARY KEY,
        display_name TEXT NOT NULL,
        role TEXT NOT NULL DEFAULT 'contact',
        principal_id TEXT,
        created_at INTEGER NOT NULL,
        updated_at INTEGER NOT NULL
    );
    CREATE TABLE contact_channels (
        id TEXT PRIMARY KEY,
        contact_id TEXT NOT NULL REFERENCES contacts (id) ON DELETE CASCADE,
        type TEXT NOT NULL,
        address TEXT NOT NULL,
        is_primary INTEGER NOT NULL DEFAULT 0,
        external_user_id TEXT,
        external_chat_id TEXT,
        status TEXT NOT NULL DEFAULT 'unverified',
        policy TEXT NOT NULL DEFAULT 'allow',
        verified_at INTEGER,
        verified_via TEXT,
        invite_id TEXT,
        revoked_reason TEXT,
        blocked_reason TEXT,
        last_seen_at INTEGER,
        interaction_count INTEGER NOT NULL DEFAULT 0,
        last_interaction INTEGER,
        created_at INTEGER NOT NULL,
        updated_at INTEGER
    );
    CREATE INDEX idx_contact_channels_type_user ON contact_channels (type, external_user_id);
    CREATE INDEX idx_contact_channels_type_chat ON contact_channels (type, external_chat_id);
    CREATE INDEX idx_contact_channels_contact ON contact_channels (contact_id);
    CREATE TABLE ingress_invites (
        id TEXT PRIMARY KEY,
        source_channel TEXT NOT NULL,
        invite_code_hash TEXT NOT NULL,
        note TEXT,
        max_uses INTEGER NOT NULL DEFAULT 1,
        use_count INTEGER NOT NULL DEFAULT 0,
        expires_at INTEGER NOT NULL,
        status TEXT NOT NULL DEFAULT 'active',
        redeemed_by_external_user_id TEXT,
        redeemed_by_external_chat_id TEXT,
        redeemed_at INTEGER,
        contact_id TEXT NOT NULL REFERENCES contacts (id) ON DELETE CASCADE,
        created_at INTEGER NOT NULL,
        updated_at INTEGER NOT NULL
    );
    CREATE INDEX idx_ingress_invites_code_lookup
        ON ingress_invites (invite_code_hash, source_channel);
    CREATE INDEX idx_ingress_invites_contact ON ingress_invites (contact_id);
    CREATE TABLE one_time_migrations (
        key TEXT PRIMARY KEY,
        ran_at INTEGER NOT NULL
    );
    CREATE TABLE redeem_failures (
        scope TEXT NOT NULL,
        at INTEGER NOT NULL
    );
    CREATE INDEX idx_redeem_failures_scope_at ON redeem_failures (scope, at);
    CREATE TABLE outbox (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        event_id TEXT NOT NULL UNIQUE,
        kind TEXT NOT NULL,
        payload TEXT NOT NULL,
        created_at INTEGER NOT NULL,
        attempts INTEGER NOT NULL DEFAULT 0,
        last_error TEXT
    );
    """,
    """
    CREATE TABLE outbox_dead (
        seq INTEGER PRIMARY KEY,
        event_id TEXT NOT NULL,
        kind TEXT NOT NULL,
        payload TEXT NOT NULL,
        created_at INTEGER NOT NULL,
        attempts INTEGER NOT NULL,
        last_error TEXT,
        dead_at INTEGER NOT NULL
    );
    """,
)


class Database:
    """gateway.db on one connection thread."""

    def __init__(
        self, path: str, synchronous: str = "FULL", busy_timeout_ms: int = BUSY_TIMEOUT_MS
    ) -> None:
        self.path = path
        self.synchronous = synchronous
        self.busy_timeout_ms = busy_timeout_ms
        self.schema_version = 0
        self.write_health = WriteHealth()
        self._worker: Writer[Conn] | None = None

    def open(self) -> None:
        """Open, migrate and start the thread (blocking; call off the loop)."""

        def writer() -> Conn:
            db = connect(
                self.path, synchronous=self.synchronous, busy_timeout_ms=self.busy_timeout_ms
            )
            return Conn(
                db, watch_deadline(db), busy_timeout_ms=self.busy_timeout_ms,
                health=self.write_health,
            )  # fmt: skip

        conn, self.schema_version = open_migrated(self.path, writer, MIGRATIONS, log=log.info)
        self._worker = Writer("gateway-db", conn)

    def close(self, timeout: float = STOP_TIMEOUT) -> None:
        """Stop the thread and close the connection within `timeout` (blocking)."""
        if self._worker is not None:
            self._worker.stop(timeout)
            self._worker = None

    async def run(self, job: Callable[[Conn], T]) -> T:
        """`job(conn)` on the database thread; a database failure raises `RouteError` by
        SPEC.md's table (DB_BUSY, DB_FULL, ...), any other apsw error is our bug."""
        assert self._worker is not None, "database is not open"
        return await self._worker.run(functools.partial(_translated, job=job))

    def failure_counts(self) -> dict[str, int]:
        """Database failures so far (calls and background work), by errorCode."""
        return self._worker.failure_counts() if self._worker is not None else {}

    def submit(self, job: Callable[[Conn], T]) -> Job[T]:
        """`run` without a task: the job, answered through `then`."""
        assert self._worker is not None, "database is not open"
        return self._worker.submit(functools.partial(_translated, job=job))


def _translated(conn: Conn, job: Callable[[Conn], T]) -> T:
    # The gateway runs only its own SQL, so a failure outside the table (a
    # constraint, a syntax error) is a bug: it stays an apsw error, answered
    # INTERNAL_ERROR with its traceback in the log.
    try:
        return job(conn)
    except apsw.Error as exc:
        failure = database_failure(exc)
        if failure is None:
            raise
        raise failure from exc


@contextmanager
def transaction(conn: Conn) -> Iterator[None]:
    """A write transaction, rolled back when the block raises anything but `CommitThenRaise`.

    A domain error that must still keep what the block wrote (a failed
    redemption attempt is recorded, then refused) raises `CommitThenRaise(error)`.
    """
    with WriteTransaction(conn) as tx:
        try:
            yield
        except CommitThenRaise as keep:
            tx.commit()
            raise keep.error from None


class CommitThenRaise(Exception):
    """Raised inside `transaction`: commit what it wrote, then raise `error` to the caller."""

    def __init__(self, error: Exception) -> None:
        super().__init__(str(error))
        self.error = error


def high_water(db: apsw.Connection) -> dict[str, int]:
    """What a snapshot of gateway.db holds, for a backup's manifest: the outbox's last
    sequence number (events up to it not still in the outbox were delivered), its
    backlog, and the counts an operator checks a restore by."""

    def one(sql: str) -> int:
        rows = db.execute(sql).fetchall()
        return int(rows[0][0]) if rows and rows[0][0] is not None else 0

    return {
        "outboxSeq": one("SELECT seq FROM sqlite_sequence WHERE name = 'outbox'"),
        "outboxPending": one("SELECT count(*) FROM outbox"),
        "outboxDead": one("SELECT count(*) FROM outbox_dead"),
        "contacts": one("SELECT count(*) FROM contacts"),
        "invites": one("SELECT count(*) FROM ingress_invites"),
    }
