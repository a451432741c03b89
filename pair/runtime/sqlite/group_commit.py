"""Group commit: write jobs that queued up behind each other share one transaction.

One WAL sync for many calls. The group first runs with no savepoints at all,
which holds while no job needs to roll back its own writes (the common
case); when one does (`GroupAbort`), the group is rolled back and run again
with a savepoint per job. If the group's transaction is lost under a job (an
interrupt or an I/O error rolls all of it back), nothing of it was committed
and the other jobs run again alone. No result leaves before the commit, and
no job the loop has expired meanwhile is committed (`Job.keep`): the group
is rolled back and runs again without it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, Generic, TypeVar

import apsw

from pair.runtime.sqlite.errors import timeout_error
from pair.runtime.sqlite.job import EXPIRED, Job, Outcome, keep_all, release_all
from pair.runtime.sqlite.transaction import BEGIN, COMMIT, ROLLBACK, Conn, GroupAbort, TxMode

GROUP_MAX = 64
CAREFUL_GROUPS = 8

log = logging.getLogger("runtime.sqlite")

C = TypeVar("C", bound=Conn)


class GroupCommit(Generic[C]):
    """The writer's way of running several queued jobs in one transaction.

    `run_one(conn, job)` runs one job and returns its outcome. A job's
    deadline is its caller's: a second run of the group does not extend it.
    """

    def __init__(self, name: str, run_one: Callable[[C, Job[Any]], Outcome]) -> None:
        self.name = name
        self._run_one = run_one
        self._careful_groups = 0

    def run(self, conn: C, jobs: list[Job[Any]]) -> list[Outcome]:
        """The jobs' outcomes, in order, once the group's transaction is over.

        After a group had to run again with savepoints, the next
        `CAREFUL_GROUPS` groups go straight to savepoints, so a stream of
        failing calls (a guesser's redemptions) does not make every group
        run twice.
        """
        if self._careful_groups:
            self._careful_groups -= 1
            return self._with_savepoints(conn, jobs)
        try:
            conn.execute(BEGIN, cacheable=True)
        except apsw.Error as exc:
            return self._alone(conn, jobs, exc)
        changes_before = conn.db.total_changes()
        outcomes: list[Outcome] = []
        conn.tx_mode = TxMode.OPTIMISTIC
        expired = False
        try:
            for job in jobs:
                outcomes.append(self._run_one(conn, job))
                if not conn.db.in_transaction:
                    break
            else:
                if _keep_all(jobs, outcomes):
                    conn.execute(COMMIT, cacheable=True)
                    conn.note_commit(changes_before)
                    return outcomes
                expired = True
        except GroupAbort:
            pass
        except apsw.Error:
            release_all(jobs)
        finally:
            conn.tx_mode = TxMode.ALONE
        if conn.db.in_transaction:
            conn.execute(ROLLBACK, cacheable=True)
        if expired:
            return self._without_expired(conn, jobs)
        self._careful_groups = CAREFUL_GROUPS
        log.debug("%s: a group of %d calls runs again with savepoints", self.name, len(jobs))
        return self._with_savepoints(conn, jobs)

    def _alone(self, conn: C, jobs: list[Job[Any]], begin_error: apsw.Error) -> list[Outcome]:
        """The group's BEGIN failed: each job runs on its own."""
        if not isinstance(begin_error, apsw.BusyError):
            if conn.db.in_transaction:
                # Left open by a failed ROLLBACK: bare statements must not land in it.
                conn.execute(ROLLBACK, cacheable=True)
            return [self._run_one(conn, job) for job in jobs]
        # Another process held the lock through a whole busy timeout: the
        # jobs queued behind answer busy now rather than each wait as long.
        conn.db.set_busy_timeout(0)
        try:
            return [self._run_one(conn, job) for job in jobs]
        finally:
            conn.db.set_busy_timeout(conn.busy_timeout_ms)

    def _with_savepoints(self, conn: C, jobs: list[Job[Any]]) -> list[Outcome]:
        if not jobs:
            return []
        try:
            conn.execute(BEGIN, cacheable=True)
        except apsw.Error as exc:
            return self._alone(conn, jobs, exc)
        conn.tx_mode = TxMode.SAVEPOINT
        changes_before = conn.db.total_changes()
        try:
            outcomes: list[Outcome] = []
            for index, job in enumerate(jobs):
                outcomes.append(self._run_one(conn, job))
                if not conn.db.in_transaction:
                    conn.tx_mode = TxMode.ALONE
                    return self._redo(conn, jobs, outcomes, index)
            if not _keep_all(jobs, outcomes):
                conn.tx_mode = TxMode.ALONE
                conn.execute(ROLLBACK, cacheable=True)
                return self._without_expired(conn, jobs)
            conn.execute(COMMIT, cacheable=True)
            conn.note_commit(changes_before)
            return outcomes
        except apsw.Error:
            release_all(jobs)
            conn.tx_mode = TxMode.ALONE
            if conn.db.in_transaction:
                conn.execute(ROLLBACK, cacheable=True)
            return [self._run_one(conn, job) for job in jobs]
        finally:
            conn.tx_mode = TxMode.ALONE

    def _without_expired(self, conn: C, jobs: list[Job[Any]]) -> list[Outcome]:
        """The group was rolled back because the loop expired a job of it: the others run
        again, with savepoints."""
        live = [index for index, job in enumerate(jobs) if job.state != EXPIRED]
        log.debug("%s: %d expired call(s) leave a group", self.name, len(jobs) - len(live))
        outcomes: list[Outcome] = [(False, timeout_error())] * len(jobs)
        redone = self._with_savepoints(conn, [jobs[index] for index in live])
        for index, outcome in zip(live, redone, strict=True):
            outcomes[index] = outcome
        return outcomes

    def _redo(
        self, conn: C, jobs: list[Job[Any]], outcomes: list[Outcome], lost_at: int
    ) -> list[Outcome]:
        """The group's transaction vanished during job `lost_at`: run the others alone."""
        ok, _ = outcomes[lost_at]
        redo_through = lost_at + 1 if ok else lost_at
        redone = [self._run_one(conn, job) for job in jobs[:redo_through]]
        kept = [] if ok else [outcomes[lost_at]]
        rest = [self._run_one(conn, job) for job in jobs[lost_at + 1 :]]
        return redone + kept + rest


def _keep_all(jobs: list[Job[Any]], outcomes: list[Outcome]) -> bool:
    """Keep the jobs whose writes the group is about to commit (`keep_all`); False if the
    loop has expired one. A job that failed left nothing in the transaction."""
    return keep_all([job for job, (ok, _) in zip(jobs, outcomes, strict=True) if ok])
