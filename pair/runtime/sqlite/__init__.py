"""SQLite through apsw, as both daemons use it.

connect.py       open a database: pragmas, the state directory, migrations
deadline.py      a call's deadline through queue, statement and commit: its one home
transaction.py   a connection as a job sees it; the job's write transaction
job.py           a unit of work for a thread, and its way back to the loop
pool.py          the connection threads (no apsw call runs on the loop): what all roles share
writer.py        the writer's thread, with group commit
group_commit.py  queued write jobs in one transaction
readers.py       the readers' threads, taking turns, and their slow lane
errors.py        database failures as callers hear them (SPEC.md section 3)
"""

from pair.runtime.sqlite.connect import (
    STATEMENT_CACHE_SIZE,
    commits_durable,
    connect,
    make_state_dir,
    migrate,
    now_ms,
    open_migrated,
)
from pair.runtime.sqlite.deadline import Deadline, watch_deadline
from pair.runtime.sqlite.errors import (
    DatabaseFailure,
    WriteHealth,
    database_failure,
    sqlite_codes,
    timeout_error,
)
from pair.runtime.sqlite.job import Job
from pair.runtime.sqlite.pool import STOP_TIMEOUT, ConnectionPool, QueuedPastDeadline, stop_pools
from pair.runtime.sqlite.readers import Readers, SlowLane
from pair.runtime.sqlite.transaction import (
    BUSY_TIMEOUT_MS,
    Conn,
    TxMode,
    WriteTransaction,
    ours,
)
from pair.runtime.sqlite.writer import Writer

__all__ = [
    "BUSY_TIMEOUT_MS",
    "STATEMENT_CACHE_SIZE",
    "STOP_TIMEOUT",
    "Conn",
    "ConnectionPool",
    "DatabaseFailure",
    "Deadline",
    "Job",
    "QueuedPastDeadline",
    "Readers",
    "SlowLane",
    "TxMode",
    "WriteHealth",
    "WriteTransaction",
    "Writer",
    "commits_durable",
    "connect",
    "database_failure",
    "make_state_dir",
    "migrate",
    "now_ms",
    "open_migrated",
    "ours",
    "sqlite_codes",
    "stop_pools",
    "timeout_error",
    "watch_deadline",
]
