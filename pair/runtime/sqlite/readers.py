"""The readers: quick queries take turns on few threads; slow ones move to a lane of their own.

Every thread running Python beside the loop competes for the GIL, and apsw
hands the GIL over around each SQLite step: measured with 64 point queries
in flight, one reader taking them served 50k/s where two took 44k/s. So only
`turns` of the readers' threads take jobs at once; another joins only while
one runs a slow job.

A query still running after `HOLD_LIMIT` is stopped by its progress handler
and queued again in the `SlowLane`, to run from the start (a read has no side
effects). The lane's queries pause `PAUSE` after each `PAUSE` they run while
the readers have work, so a heavy query takes about half of a core from quick
calls, not all of it. Not a lower thread priority: a thread preempted while it
holds the GIL would stall the loop.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar, cast

from pair.runtime.sqlite.deadline import HOLD_LIMIT
from pair.runtime.sqlite.job import Job
from pair.runtime.sqlite.pool import DEMOTED, ConnectionPool, Worker
from pair.runtime.sqlite.transaction import Conn

T = TypeVar("T")
C = TypeVar("C", bound=Conn)

# How often the loop looks for a reader stuck in one long SQLite step, where its
# progress handler cannot give its turn away (`Readers._spill_stuck`).
SPILL_CHECK = 0.005
PAUSE = 0.001


class SlowLane(ConnectionPool[C]):
    """Threads for the queries the readers stopped for being slow, one at a time, each
    pausing while `others_busy()` says quick calls wait."""

    def __init__(
        self,
        name: str,
        connections: list[C],
        *,
        others_busy: Callable[[], bool],
        late_error: Callable[[], BaseException] | None = None,
    ) -> None:
        self._others_busy = others_busy
        super().__init__(name, connections, late_error=late_error)

    def requeue(self, job: Job[Any]) -> None:
        """Run a job another pool submitted (and keeps the expiry of)."""
        self._queue.put(job)

    def _on_slow(self, worker: Worker) -> bool:
        """Sleep `PAUSE` (without the GIL) after each `PAUSE` of running while the readers
        have work: on the thread, from the progress handler."""
        self._hand_back(worker)
        now = time.monotonic()
        if now - max(worker.ran_since, worker.conn.deadline.started) >= PAUSE:
            if self._others_busy():
                time.sleep(PAUSE)
            worker.ran_since = time.monotonic()
        return False


class Readers(ConnectionPool[C]):
    """Read-only connections taking `turns` at a time, in batches of up to `batch_max`,
    with a `SlowLane` of `slow` connections for what turns out slow.

    A thread holding a turn keeps it across batches. It gives it away (with the
    jobs of its batch that have not started) only when its job is slow: from
    the progress handler, which also demotes the job to the lane, or from the
    loop (`_spill_stuck`) for a thread stuck in one long SQLite step.
    """

    def __init__(
        self,
        name: str,
        connections: list[C],
        slow: list[C],
        *,
        turns: int,
        batch_max: int,
        late_error: Callable[[], BaseException] | None = None,
        jobs: queue.SimpleQueue[Job[Any] | None] | None = None,
        also_busy: Callable[[], bool] | None = None,
    ) -> None:
        self.batch_max = batch_max
        self._also_busy = also_busy
        self._turns_free = turns
        self._turn_freed = threading.Condition()
        self._watch: asyncio.TimerHandle | None = None
        self.slow = SlowLane(
            f"{name}-slow", slow, others_busy=self._quick_work_waits, late_error=late_error
        )
        super().__init__(name, connections, late_error=late_error, jobs=jobs)

    def _quick_work_waits(self) -> bool:
        """For the slow lane: quick queries are queued or running here, or elsewhere
        (`also_busy`: the loop's own reader answering them)."""
        return self.busy() or (self._also_busy is not None and self._also_busy())

    def submit(self, fn: Callable[[C], T], deadline: float = 0.0) -> Job[T]:
        job = super().submit(fn, deadline)
        if self._watch is None:
            self._watch = job.loop.call_later(SPILL_CHECK, self._spill_stuck)
        return job

    def running(self, job: Job[Any]) -> bool:
        return super().running(job) or self.slow.running(job)

    def failure_counts(self) -> dict[str, int]:
        counts = super().failure_counts()
        for code, count in self.slow.failure_counts().items():
            counts[code] = counts.get(code, 0) + count
        return counts

    def parts(self) -> list[ConnectionPool[Any]]:
        """The readers stop first: a query they stop for being slow goes to the lane."""
        return [self, self.slow]

    def _before_batch(self, worker: Worker) -> None:
        """Wait until this thread may take jobs."""
        if worker.holding:
            return
        with self._turn_freed:
            while not self._turns_free:
                self._turn_freed.wait()
            self._turns_free -= 1
            worker.holding = True

    def _after_last(self, worker: Worker) -> None:
        self._give_up_turn(worker)

    def _give_up_turn(self, worker: Worker) -> None:
        with self._turn_freed:
            if worker.holding:
                worker.holding = False
                self._turns_free += 1
                self._turn_freed.notify()

    def _run_batch(self, worker: Worker, jobs: list[Job[Any]]) -> None:
        """Run the jobs one by one, each held as it finishes; those a slow one ahead of them
        sends back to the queue (`_hand_back_rest`) are not run here."""
        rest = worker.rest
        rest.extend(jobs)
        conn = cast("C", worker.conn)
        while True:
            try:
                job = rest.popleft()
            except IndexError:
                return
            outcome = self._run_one(conn, job)
            if outcome is DEMOTED:
                self.slow.requeue(job)
            else:
                self._hold(worker, ((job, outcome),))

    def _on_slow(self, worker: Worker) -> bool:
        """Past `HOLD_LIMIT`: stop the query, to run it again from the start in the lane."""
        return True

    def _spill_stuck(self) -> None:
        """On the loop: a thread that has run one job past `HOLD_LIMIT` without its progress
        handler noticing (one long SQLite step) gives its turn and the jobs of its batch to
        another thread, and the results it holds to their callers. Looked at while any
        thread is busy."""
        self._watch = None
        now = time.monotonic()
        busy = False
        for worker in self._workers:
            watch = worker.conn.deadline
            busy = busy or bool(worker.rest or worker.held) or watch.job is not None
            if watch.job is not None and now - watch.started > HOLD_LIMIT:
                self._hand_back(worker)
                self._hand_back_rest(worker)
                self._give_up_turn(worker)
        if (busy or not self._queue.empty()) and not self._stopping:
            self._watch = asyncio.get_running_loop().call_later(SPILL_CHECK, self._spill_stuck)

    def _hand_back_rest(self, worker: Worker) -> None:
        """Queue again the jobs of `worker`'s batch that have not started: another thread
        takes them while this one runs a slow job."""
        rest = worker.rest
        # Once stopping, the threads' sentinels are queued: a job queued behind them would
        # never run. The stuck thread runs its batch when it comes out, or the process ends.
        while rest and not self._stopping:
            try:
                job = rest.popleft()
            except IndexError:
                return
            self._queue.put(job)
