"""Every errorCode an assistant method answers besides the protocol's and the database's.

The database failures by result code (DB_BUSY, DB_FULL, DB_TIMEOUT, ...) are
`pair.runtime.sqlite.errors`'s, shared with the gateway; the classes here are the
"method's own code" of that table and the statement policy's refusal.
"""

from __future__ import annotations

from pair.protocol.errors import DomainError


class SqlForbidden(DomainError):
    """The statement policy refuses the SQL (transaction control, ATTACH, our own tables...)."""

    default_status = 403
    default_error_code = "SQL_FORBIDDEN"


class DbProxyFailed(DomainError):
    """A `db_proxy` statement failed in SQLite (constraint, syntax, mismatch...)."""

    default_status = 500
    default_error_code = "DB_PROXY_FAILED"


class DbProxyTransactionFailed(DomainError):
    """A step of `db_proxy_transaction` failed in SQLite; nothing of it was applied."""

    default_status = 500
    default_error_code = "DB_PROXY_TRANSACTION_FAILED"


class EventStoreFailed(DomainError):
    """An event could not be stored for a reason outside the database-failure table."""

    default_status = 500
    default_error_code = "EVENT_STORE_FAILED"
