"""Database failures as callers hear them: by SQLite's primary result code (SPEC.md section 3).

One table for both daemons and every method that touches a database, so a
caller can tell "try again later" (a lock, a full disk, an unreachable
file) from "this call is wrong" (its own code, e.g. DB_PROXY_FAILED).
"""

from __future__ import annotations

from typing import Any

import apsw

from pair.protocol.errors import RouteError

# (errorCode, statusCode, retryable) by apsw exception class, i.e. primary result code.
_BY_RESULT: tuple[tuple[tuple[type[apsw.Error], ...], str, int, bool], ...] = (
    ((apsw.BusyError, apsw.LockedError), "DB_BUSY", 503, True),
    ((apsw.FullError,), "DB_FULL", 507, True),
    (
        (apsw.IOError, apsw.ReadOnlyError, apsw.CantOpenError, apsw.NoMemError),
        "DB_UNAVAILABLE",
        503,
        True,
    ),
    ((apsw.CorruptError, apsw.NotADBError), "DB_CORRUPT", 500, False),
)


class DatabaseFailure(RouteError):
    """SQLite failed for a reason of the table (locked, full, unreachable, corrupt, interrupted).

    A RouteError, so a method answers it as it is; background work catches it
    (and bare `apsw.Error`) to wait and try again instead of exiting.
    """


# The failures that make a daemon "degraded": its writes fail whatever the caller sends.
DEGRADING = frozenset({"DB_FULL", "DB_UNAVAILABLE", "DB_CORRUPT"})


class WriteHealth:
    """Whether a database's last write failed for a reason of its own (SPEC.md section 3).

    Set by the connection pool when a job fails with DB_FULL, DB_UNAVAILABLE
    or DB_CORRUPT, cleared by the first commit that writes rows
    (`Conn.note_commit`); `health` reads `last_error`.
    Written by the database thread, read on the loop: one attribute, no lock.
    """

    __slots__ = ("last_error",)

    def __init__(self) -> None:
        self.last_error: str | None = None

    def failed(self, failure: DatabaseFailure) -> None:
        if failure.error_code in DEGRADING:
            self.last_error = f"{failure.error_code}: {failure.message}"

    def committed(self) -> None:
        if self.last_error is not None:
            self.last_error = None


TIMEOUT_MESSAGE = "the statement ran past timeoutMs and was interrupted; nothing was applied"


def sqlite_codes(exc: apsw.Error) -> dict[str, Any]:
    """`data.sqlite`: SQLite's primary and extended result codes and the extended code's name."""
    extended = getattr(exc, "extendedresult", 0)
    result_code = getattr(exc, "result", 0)
    name = apsw.mapping_extended_result_codes.get(extended) or apsw.mapping_result_codes.get(
        result_code, "SQLITE_ERROR"
    )
    return {"code": result_code, "extendedCode": extended, "name": name}


def timeout_error(data: dict[str, Any] | None = None) -> DatabaseFailure:
    """DB_TIMEOUT: the call's `timeoutMs` passed, in the queue or in SQLite; nothing was applied."""
    return DatabaseFailure(TIMEOUT_MESSAGE, 504, "DB_TIMEOUT", data=data)


def database_failure(exc: apsw.Error, data: dict[str, Any] | None = None) -> DatabaseFailure | None:
    """The table's answer for `exc`, or None when the method's own code applies.

    SQLite's message is kept in `message` and its codes in `data.sqlite`.
    """
    if isinstance(exc, apsw.InterruptError):
        return timeout_error(data)
    for classes, error_code, status_code, retryable in _BY_RESULT:
        if isinstance(exc, classes):
            return DatabaseFailure(
                str(exc),
                status_code,
                error_code,
                data={**(data or {}), "sqlite": sqlite_codes(exc)},
                retryable=retryable,
            )
    return None
