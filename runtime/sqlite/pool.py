"""Connection threads: no apsw call runs on the event loop.

Each connection is owned by one thread that takes jobs from a queue; a whole
transaction is one job, so a call costs one thread hop. A job's result comes
back to the loop with `call_soon_threadsafe`. Chosen over
`anyio.to_thread.run_sync`, which hands each call to whichever pooled thread
is free (a connection would hop threads and need a lock) and costs more:
measured here with uvloop, a `SELECT 1` round trip took 28.8 us through a
pool thread and 130 us through `to_thread.run_sync`. apsw's async mode was
not chosen because it gives no pool of readers beside the writer.

Timeouts: each job carries a deadline, checked by a progress handler on the
job's own connection; SQLite then stops with SQLITE_INTERRUPT and the
transaction rolls back. That is `interrupt()` from inside the job, so it can
never hit the next job the way an interrupt sent from the loop thread can.
No handler runs inside one long SQLite step (a quadratic `trim`, a huge
`randomblob`), so the loop also expires the job `EXPIRY_SLACK` after its
deadline: its caller is answered then, and the thread, when it comes out,
rolls the job back instead of committing it (`Job.keep`, `Job.expire`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any, Generic, TypeVar

import apsw

from protocol.deferred import outcome_of
from runtime.sqlite.errors import DatabaseFailure
from runtime.sqlite.group_commit import GROUP_MAX, GroupCommit
from runtime.sqlite.job import EXPIRED, Job, Outcome, settle_all
from runtime.sqlite.transaction import HOLD_LIMIT, HOLD_MAX, Conn

T = TypeVar("T")
C = TypeVar("C", bound=Conn)

STOP_TIMEOUT = 2.0
INTERRUPT_WAIT = 0.5
# The progress handler answers a timeout within a few ms of the deadline; the
# loop steps in only when it could not (SPEC.md: by timeoutMs + 100 ms).
EXPIRY_SLACK = 0.05
EXPIRY_RECHECK = 0.01

log = logging.getLogger("runtime.sqlite")


class QueuedPastDeadline(Exception):
    """A job's deadline passed while it waited for its connection; it never ran."""


class ConnectionPool(Generic[C]):
    """Threads that each own one connection and run jobs from a shared queue, in order.

    Jobs that queued up while one ran are taken together (up to `batch_max`)
    and their results handed back to the loop in one wake-up. With
    `group_commit` (the writer), such a batch is one `GroupCommit`: one
    transaction and one WAL sync for many calls.

    A thread taking one job at a time (`batch_max=1`, the readers, so no
    query waits behind a slow one while another reader is free) holds its
    results while more jobs wait in the queue, up to `HOLD_MAX` of them and
    none longer than about `HOLD_LIMIT` (see `Deadline`), and hands them back
    together: each hand-back wakes the loop, which then competes for the GIL
    with the thread's next query.

    A job whose deadline passed while it waited fails with `late_error()`.
    """

    def __init__(
        self,
        name: str,
        connections: list[C],
        *,
        group_commit: bool = False,
        batch_max: int = GROUP_MAX,
        late_error: Callable[[], BaseException] | None = None,
        jobs: queue.SimpleQueue[Job[Any] | None] | None = None,
    ) -> None:
        self.name = name
        self.group = GroupCommit(name, self._run_one) if group_commit else None
        self.batch_max = batch_max
        self.late_error = late_error or _queued_past_deadline
        # `jobs`: a queue of the caller's, for tests that widen its races.
        self._queue: queue.SimpleQueue[Job[Any] | None] = (
            queue.SimpleQueue() if jobs is None else jobs
        )
        self._connections = list(connections)
        # Database failures answered by errorCode (metrics); counted by the threads and
        # the loop, read by the loop.
        self._failures: Counter[str] = Counter()
        self._failures_lock = threading.Lock()
        self._threads = [
            threading.Thread(target=self._serve, args=(conn,), name=f"{name}-{i}", daemon=True)
            for i, conn in enumerate(connections)
        ]
        for thread in self._threads:
            thread.start()

    def submit(self, fn: Callable[[C], T], deadline: float = 0.0) -> Job[T]:
        """Queue `fn(conn)` for one of the threads; call `then` on the job at once."""
        loop = asyncio.get_running_loop()
        job: Job[T] = Job(fn, deadline, loop)
        if deadline:
            delay = deadline - time.monotonic() + EXPIRY_SLACK
            job.expiry = loop.call_later(delay, self._expire, job)
        self._queue.put(job)
        return job

    def _expire(self, job: Job[Any]) -> None:
        """The job's deadline passed while its thread was stuck: answer its caller now."""
        if job.on_done is None:
            return
        if not job.expire():
            # Kept: being committed, or kept by a group that may yet roll back and
            # release it. Looked at again until its outcome arrives (which cancels this).
            job.expiry = job.loop.call_later(EXPIRY_RECHECK, self._expire, job)
            return
        if any(conn.deadline.job is job for conn in self._connections):
            log.warning(
                "%s: a statement is still running past its deadline (one long SQLite step);"
                " its caller is answered DB_TIMEOUT and its work will be rolled back",
                self.name,
            )
        on_done, context = job.on_done, job.context
        # What the caller sent (up to a frame's worth) is not held while the thread
        # stays stuck: the job keeps only what it needs to be dropped.
        job.on_done = job.context = job.expiry = None
        job.fn = _abandoned
        on_done(context, False, self._count(self.late_error()))

    def _count(self, exc: BaseException) -> BaseException:
        if isinstance(exc, DatabaseFailure):
            with self._failures_lock:
                self._failures[exc.error_code] += 1
        return exc

    def _count_failures(self, jobs: list[Job[Any]], outcomes: list[Outcome]) -> None:
        """Once per answer: not in a group's first run, and not for a job the loop has
        answered already (`_expire` counted it)."""
        for job, (ok, value) in zip(jobs, outcomes, strict=True):
            if not ok and job.state != EXPIRED:
                self._count(value)

    def failure_counts(self) -> dict[str, int]:
        """Database failures of this pool's jobs so far, by errorCode."""
        with self._failures_lock:
            return dict(self._failures)

    async def run(self, fn: Callable[[C], T], deadline: float = 0.0) -> T:
        """`fn(conn)` on one of the threads: its result or its exception.

        Cancelling the caller does not stop a job that has started; its
        deadline does.
        """
        return await outcome_of(self.submit(fn, deadline))

    def _serve(self, conn: C) -> None:
        held: list[tuple[Job[Any], Outcome]] = []

        def release_held() -> None:
            if held:
                held[0][0].loop.call_soon_threadsafe(settle_all, held.copy())
                held.clear()

        conn.deadline.release_held = release_held
        held_since = 0.0
        stop = False
        while not stop:
            jobs, stop = self._take(release_held if held else None)
            try:
                if self.group is not None and len(jobs) > 1:
                    outcomes = self.group.run(conn, jobs)
                else:
                    outcomes = [self._run_one(conn, job) for job in jobs]
            except BaseException as exc:
                # A failure outside the jobs (the group's ROLLBACK itself failing):
                # their callers get it, and the thread keeps serving the queue.
                outcomes = [(False, exc)] * len(jobs)
            self._count_failures(jobs, outcomes)
            now = time.monotonic()
            if not held:
                held_since = now
            held.extend(zip(jobs, outcomes, strict=True))
            # Not kept while this thread waits for the next jobs: a job holds its
            # call's parameters (a bound blob of up to the frame limit).
            del jobs, outcomes
            if self.batch_max > 1 or len(held) >= HOLD_MAX or now - held_since > HOLD_LIMIT:
                release_held()
        release_held()
        conn.db.close()

    def _take(self, release_held: Callable[[], None] | None) -> tuple[list[Job[Any]], bool]:
        """The next job and those queued behind it; True once the stop sentinel came.

        With results held, the thread never blocks before handing them back:
        checking for an empty queue and then blocking would let another thread
        take the last job in between, and the results would wait for the next.
        """
        if release_held is None:
            first = self._queue.get()
        else:
            try:
                first = self._queue.get_nowait()
            except queue.Empty:
                release_held()
                first = self._queue.get()
        if first is None:
            return [], True
        jobs = [first]
        while len(jobs) < self.batch_max:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            if job is None:
                return jobs, True
            jobs.append(job)
        return jobs, False

    def _run_one(self, conn: C, job: Job[Any]) -> Outcome:
        deadline = job.deadline
        watch = conn.deadline
        watch.at = deadline
        watch.started = time.monotonic()
        watch.job = job
        try:
            fn = job.fn  # before the state: the loop replaces it when it expires the job
            if job.state == EXPIRED or (deadline and watch.started >= deadline):
                return False, self.late_error()
            return True, fn(conn)
        except BaseException as exc:  # the job's failure belongs to its caller
            if isinstance(exc, DatabaseFailure):
                conn.health.failed(exc)
            return False, exc
        finally:
            watch.at = 0.0
            watch.job = None

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """Finish the queued jobs, then close the connections (blocking; call off the loop).

        Waits at most `timeout`, then interrupts what still runs and waits
        `INTERRUPT_WAIT` more: a statement stuck inside one long SQLite step
        must not hold the daemon's exit past its drain. A thread still busy
        after that is left to end with the process (its transaction was never
        committed, so nothing of it is kept).
        """
        for _ in self._threads:
            self._queue.put(None)
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        if not any(thread.is_alive() for thread in self._threads):
            return
        for conn, thread in zip(self._connections, self._threads, strict=True):
            if thread.is_alive():
                # Its thread may close it at any moment: then there is nothing to stop.
                with contextlib.suppress(apsw.ConnectionClosedError):
                    conn.db.interrupt()
        for thread in self._threads:
            thread.join(INTERRUPT_WAIT)
        busy = sum(thread.is_alive() for thread in self._threads)
        if busy:
            log.warning("%s: %d thread(s) still in SQLite at exit; left behind", self.name, busy)


def _abandoned(conn: Any) -> Any:
    raise AssertionError("a job the loop expired was run")


def _queued_past_deadline() -> QueuedPastDeadline:
    return QueuedPastDeadline("the call's deadline passed before it could start")
