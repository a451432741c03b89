"""A call's deadline, followed through one call: its one home.

1. `timeoutMs` becomes a deadline (monotonic seconds) in the route
   (`assistant.routes`: `time.monotonic() + timeoutMs / 1000`), handed with the
   job to `ConnectionPool.submit`.
2. Queued: the pool arms a loop timer at the deadline plus `EXPIRY_SLACK`
   (`pool._expire`): a job still unanswered then is expired (`Job.expire`) and
   its caller answered DB_TIMEOUT, whatever its thread is doing. A thread that
   takes a job already past its deadline skips it (`QueuedPastDeadline`).
3. Running: the thread sets the connection's `Deadline` (`at`, `started`,
   `job`). SQLite's progress handler (`on_progress`, every `PROGRESS_STEPS` VM
   steps) interrupts the statement once `at` has passed: `apsw.InterruptError`,
   which `errors.database_failure` answers as DB_TIMEOUT. Statements quick in VM
   steps never reach the handler, so a job of several checks `passed()` between
   them (a transaction's steps, a script's statements).
4. Committing: `keep_job()` (`Job.keep`) before COMMIT; once the loop has
   expired the job, its writes are rolled back instead, so a caller answered
   DB_TIMEOUT never finds them applied.
5. Slow, not late: past `HOLD_LIMIT` the handler also calls `on_slow`, so the
   pool's quick calls never wait behind a slow one (`ConnectionPool._on_slow`,
   and the readers' `SlowLane`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import apsw

from pair.runtime.sqlite.job import Job

PROGRESS_STEPS = 1000
# A running job is slow once past this (seconds): see `Deadline.on_progress`.
HOLD_LIMIT = 0.001


@dataclass(slots=True)
class Deadline:
    """The running job's deadline (monotonic seconds; 0 = none), read by the progress handler.

    Once the running job has taken longer than `HOLD_LIMIT`, the progress
    handler also calls `on_slow` (`ConnectionPool._on_slow`), so quick calls never wait
    out a slow one: the thread hands back the results it holds for a batched
    wake-up and lets another thread take jobs; or, when `on_slow` says so, the
    job is interrupted (`demoted`) to run again from the start elsewhere.
    """

    at: float = 0.0
    started: float = 0.0
    on_slow: Callable[[], bool] | None = None
    job: Job[Any] | None = None
    demoted: bool = False
    # Past this the job is slow (the loop's own reader has a far tighter one).
    hold_limit: float = HOLD_LIMIT

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
        if self.on_slow is not None and now - self.started > self.hold_limit and self.on_slow():
            self.demoted = True
            return True
        return bool(self.at) and now >= self.at


def watch_deadline(db: apsw.Connection) -> Deadline:
    """The deadline of the jobs run on `db`, enforced by its progress handler."""
    deadline = Deadline()
    db.set_progress_handler(deadline.on_progress, PROGRESS_STEPS)
    return deadline
