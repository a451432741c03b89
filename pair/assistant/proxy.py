"""db_proxy and db_proxy_transaction: running a caller's SQL under the statement policy.

Every function here runs on a database thread with the connection it owns
(see `assistant.db`); none of them touches the event loop.
"""

from __future__ import annotations

from typing import Any

import apsw
import msgspec
from msgspec import UNSET, Struct, UnsetType

from pair.assistant.db import GuardedConn
from pair.assistant.errors import DbProxyFailed, DbProxyTransactionFailed, SqlForbidden
from pair.assistant.policy import Denial, Mode
from pair.assistant.statement import DEFAULT_MAX_BYTES, NotOneStatement, Statement
from pair.protocol.errors import DomainError, InvalidParams, RpcError
from pair.protocol.values import SqlBind
from pair.runtime.sqlite import (
    WriteTransaction,
    database_failure,
    now_ms,
    sqlite_codes,
    timeout_error,
)

# At most 1024 texts per connection, none over 16 KiB: about 16 MiB at worst.


class QueryResult(Struct, gc=False):
    columns: list[str]
    rows: list[dict[str, Any]]
    truncated: bool = False


class RunResult(Struct, rename="camel", omit_defaults=True, gc=False):
    changes: int
    last_insert_rowid: int
    rows: list[dict[str, Any]] | UnsetType = UNSET
    truncated: bool = False


class ExecResult(Struct, gc=False):
    pass


class TransactionOk(Struct, kw_only=True, gc=False):
    ok: bool = True
    results: list[RunResult]


class TransactionFailed(Struct, kw_only=True, rename="camel", gc=False):
    ok: bool = False
    reason: str = "require_changes_failed"
    failed_step: int
    actual_changes: int
    required_changes: int


TransactionResult = TransactionOk | TransactionFailed


class Step(Struct, gc=False):
    """A statement of a transaction, with its binds already converted for apsw."""

    sql: str
    bind: SqlBind | None
    require_changes: int | None


_stored_result = msgspec.json.Decoder(TransactionOk)
_encoder = msgspec.json.Encoder()


def query(
    conn: GuardedConn,
    sql: str,
    bind: SqlBind | None,
    max_rows: int,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> QueryResult:
    """One read-only statement on a reader connection."""
    statement = Statement(conn, sql, bind)
    try:
        cursor = statement.open(Mode.READ)
        rows, truncated = statement.read_rows(cursor, max_rows, max_bytes)
    except (apsw.Error, UnicodeDecodeError) as exc:
        raise translate(exc, conn, DbProxyFailed) from exc
    return QueryResult(statement.columns, rows, truncated)


def run(
    conn: GuardedConn,
    sql: str,
    bind: SqlBind | None,
    max_rows: int,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> RunResult:
    """One statement in its own write transaction."""
    with _WriteTransaction(conn):
        try:
            result = _run_one(conn, Statement(conn, sql, bind), max_rows, max_bytes)
        except (apsw.Error, UnicodeDecodeError) as exc:
            raise translate(exc, conn, DbProxyFailed) from exc
        _check_references(conn)
        _drop_temp_objects(conn, sql)
        return result


def execute_script(conn: GuardedConn, sql: str) -> ExecResult:
    """A script of statements in one write transaction; all or nothing."""
    with _WriteTransaction(conn):
        try:
            statement = Statement(conn, sql, None)
            statement.run_out(statement.open(Mode.WRITE, single=False))
        except (apsw.Error, UnicodeDecodeError) as exc:
            raise translate(exc, conn, DbProxyFailed) from exc
        _check_references(conn)
        _drop_temp_objects(conn, sql)
    return ExecResult()


def transaction(
    conn: GuardedConn,
    steps: list[Step],
    idempotency_key: str | None,
    max_rows: int,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> TransactionResult:
    """All steps in one write transaction; `requireChanges` unmet -> everything rolled back."""
    with _WriteTransaction(conn) as tx:
        if idempotency_key is not None:
            stored = conn.execute(
                "SELECT result FROM main.idempotency_keys WHERE key = ?",
                (idempotency_key,),
                cacheable=True,
            )
            if stored:
                return _stored_result.decode(stored[0][0])
        results = []
        for index, step in enumerate(steps):
            if conn.deadline.passed():
                raise timeout_error({"failedStep": index})
            result = _run_step(conn, index, step, max_rows, max_bytes)
            required = step.require_changes
            if required is not None and result.changes < required:
                _drop_temp_objects(conn, *(step.sql for step in steps))
                tx.rollback()
                return TransactionFailed(
                    failed_step=index, actual_changes=result.changes, required_changes=required
                )
            results.append(result)
        outcome = TransactionOk(results=results)
        _check_references(conn)
        _drop_temp_objects(conn, *(step.sql for step in steps))
        if idempotency_key is not None:
            conn.execute(
                "INSERT INTO main.idempotency_keys (key, result, created_at) VALUES (?, ?, ?)",
                (idempotency_key, _encoder.encode(outcome).decode(), now_ms()),
            )
        return outcome


def _run_step(
    conn: GuardedConn, index: int, step: Step, max_rows: int, max_bytes: int
) -> RunResult:
    statement = Statement(conn, step.sql, step.bind, index)
    try:
        return _run_one(conn, statement, max_rows, max_bytes)
    except (apsw.Error, UnicodeDecodeError) as exc:
        raise translate(exc, conn, DbProxyTransactionFailed, step=index) from exc
    except NotOneStatement as exc:
        raise SqlForbidden(
            "a transaction step must be exactly one statement",
            data={"failedStep": index, "path": exc.path},
        ) from exc
    except InvalidParams as exc:
        exc.data["failedStep"] = index
        raise


def _run_one(conn: GuardedConn, statement: Statement, max_rows: int, max_bytes: int) -> RunResult:
    db = conn.db
    before = db.total_changes()
    cursor = statement.open(Mode.WRITE)
    if not statement.columns:
        # No result columns: the statement ran to its end in its first step.
        return RunResult(_changes(db, before), db.last_insert_rowid())
    rows, truncated = statement.read_rows(cursor, max_rows, max_bytes)
    return RunResult(_changes(db, before), db.last_insert_rowid(), rows, truncated)


def _changes(db: apsw.Connection, total_before: int) -> int:
    # sqlite3_changes() keeps the last DML's count across SELECT and DDL, so
    # it is only this statement's when the total moved.
    return db.changes() if db.total_changes() != total_before else 0


class _WriteTransaction(WriteTransaction):
    """The job's write transaction, its own failures translated for the caller."""

    conn: GuardedConn

    def __enter__(self) -> _WriteTransaction:
        try:
            super().__enter__()
        except apsw.Error as exc:
            raise translate(exc, self.conn, DbProxyFailed) from exc
        return self

    def commit(self) -> None:
        try:
            super().commit()
        except apsw.Error as exc:
            raise translate(exc, self.conn, DbProxyFailed) from exc


def _check_references(conn: GuardedConn) -> None:
    """Refuse a caller's table with a foreign key to an internal table, before it commits.

    The daemon deletes from its tables (the idempotency-key sweep); a caller's
    key to one would block that delete, or cascade it into the caller's tables
    and fire the caller's triggers inside the daemon's own statement. SQLite's
    authorizer does not see REFERENCES, so after any CREATE or ALTER TABLE of the
    call every caller table's keys are read (a rename keeps a table's keys, so
    all of them, not the one named).
    """
    guard = conn.guard
    if not guard.defined_table:
        return
    guard.defined_table = False
    for schema in ("main", "temp"):
        keys = conn.execute(
            f'SELECT m.name, k."table" FROM {schema}.sqlite_schema AS m,'
            f" pragma_foreign_key_list(m.name, '{schema}') AS k WHERE m.type = 'table'"
        )
        for table, target in keys:
            if str(target).lower() in guard.internal_tables:
                raise SqlForbidden(
                    f"table {table} has a foreign key to {target}, which is internal to the"
                    " assistant: a caller's table may not reference it"
                )


def _drop_temp_objects(conn: GuardedConn, *sql: str) -> None:
    """Drop what the caller created in TEMP during this call, inside its transaction.

    The authorizer flags a TEMP object made by a statement it saw prepared; a
    statement served from apsw's cache is not prepared again, so the text is
    looked at too: every way to make a TEMP object spells "temp" in it.
    """
    if not conn.guard.created_temp and "temp" not in "\n".join(sql).lower():
        return
    conn.guard.created_temp = False
    objects = conn.execute(
        "SELECT type, name FROM temp.sqlite_master WHERE type IN ('view', 'table', 'trigger')"
        " ORDER BY type = 'table'"
    )
    for kind, name in objects:
        quoted = name.replace('"', '""')
        conn.execute(f'DROP {kind.upper()} IF EXISTS temp."{quoted}"')


def translate(
    exc: apsw.Error | UnicodeDecodeError,
    conn: GuardedConn,
    own_error: type[DomainError],
    step: int | None = None,
) -> RpcError:
    """An apsw failure as the RouteError the caller gets, SQLite's message kept."""
    extra: dict[str, Any] = {} if step is None else {"failedStep": step}
    if isinstance(exc, UnicodeDecodeError):
        # SQLite TEXT may hold any bytes (CAST(x'80' AS TEXT)); JSON strings may not.
        return own_error(
            "a text value in the result is not valid UTF-8; CAST it AS BLOB to read its bytes",
            data=extra,
        )
    # A denial recorded while this statement was prepared is why it failed,
    # whatever the code (a denied function is SQLITE_ERROR, not SQLITE_AUTH).
    guard = conn.guard
    if guard.denial is Denial.WRITE_IN_READ:
        return InvalidParams(f"{guard.reason}; use mode=run", path="$.sql")
    if guard.denial is Denial.FORBIDDEN:
        return SqlForbidden(guard.reason, data=extra)
    if isinstance(exc, apsw.BindingsError):
        path = "$.bind" if step is None else f"$.steps[{step}].bind"
        return InvalidParams(str(exc), path=path, data=extra)
    failure = database_failure(exc, extra)
    if failure is not None:
        return failure
    return own_error(str(exc), data={**extra, "sqlite": sqlite_codes(exc)})


def sweep_idempotency_keys(conn: GuardedConn, older_than_ms: int) -> int:
    """Forget idempotency keys stored before `older_than_ms`; how many were removed."""
    return conn.changes_of(
        "DELETE FROM main.idempotency_keys WHERE created_at < ?", (older_than_ms,)
    )
