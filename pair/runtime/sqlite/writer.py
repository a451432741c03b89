"""The writer: one thread, and the write jobs that queued up behind each other in one
transaction (`GroupCommit`): one WAL sync for many calls."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar, cast

from pair.runtime.sqlite.group_commit import GROUP_MAX, GroupCommit
from pair.runtime.sqlite.job import Job
from pair.runtime.sqlite.pool import ConnectionPool, Worker
from pair.runtime.sqlite.transaction import Conn

C = TypeVar("C", bound=Conn)


class Writer(ConnectionPool[C]):
    """The one connection that writes, taking up to `GROUP_MAX` queued jobs at a time."""

    batch_max = GROUP_MAX

    def __init__(
        self, name: str, conn: C, *, late_error: Callable[[], BaseException] | None = None
    ) -> None:
        self.group: GroupCommit[C] = GroupCommit(name, self._run_one)
        super().__init__(name, [conn], late_error=late_error)

    def _run_batch(self, worker: Worker, jobs: list[Job[Any]]) -> None:
        if len(jobs) == 1:
            super()._run_batch(worker, jobs)
            return
        try:
            outcomes = self.group.run(cast("C", worker.conn), jobs)
        except BaseException as exc:
            # A failure outside the jobs (the group's ROLLBACK itself failing): their
            # callers get it, and the thread keeps serving the queue.
            outcomes = [(False, exc)] * len(jobs)
        self._hold(worker, zip(jobs, outcomes, strict=True))
