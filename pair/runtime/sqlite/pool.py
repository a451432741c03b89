"""Connection threads: no apsw call runs on the event loop.

Each connection is owned by one thread that takes jobs from a queue; a whole
transaction is one job, so a call costs one thread hop. A job's result comes
back to the loop with `call_soon_threadsafe`. Chosen over
`anyio.to_thread.run_sync`, which hands each call to whichever pooled thread
is free (a connection would hop threads and need a lock) and costs more:
measured here with uvloop, a `SELECT 1` round trip took 28.8 us through a
pool thread and 130 us through `to_thread.run_sync`. apsw's async mode was
not chosen because it gives no pool of readers beside the writer.

`ConnectionPool` is what every role shares: the queue, the threads, the
results handed back in batches, expiry and stop. The roles are its
subclasses: `writer.Writer` (one thread, jobs in one transaction) and
`readers.Readers` with its `readers.SlowLane`.

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
import collections
import contextlib
import functools
import logging
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Generic, TypeVar, cast

import apsw

from pair.protocol.deferred import outcome_of
from pair.runtime.sqlite.deadline import HOLD_LIMIT
from pair.runtime.sqlite.errors import DatabaseFailure
from pair.runtime.sqlite.job import EXPIRED, Job, Outcome, settle_all
from pair.runtime.sqlite.transaction import Conn, GroupAbort

T = TypeVar("T")
C = TypeVar("C", bound=Conn)

STOP_TIMEOUT = 2.0
# A thread hands the results of a batch back in one wake-up of the loop: at most
# HOLD_MAX of them (as many as a client keeps in flight: measured with 64 in
# flight, point queries went from 35k to 42k/s when this went from 16 to 64), and
# none held once HOLD_LIMIT seconds old or while the running job has taken longer
# (checked by the progress handler).
HOLD_MAX = 64
INTERRUPT_WAIT = 0.5
# The progress handler answers a timeout within a few ms of the deadline; the
# loop steps in only when it could not (SPEC.md: by timeoutMs + 100 ms).
EXPIRY_SLACK = 0.05
EXPIRY_RECHECK = 0.01

log = logging.getLogger("runtime.sqlite")


class QueuedPastDeadline(Exception):
    """A job's deadline passed while it waited for its connection; it never ran."""


class Worker:
    """A pool thread's share of the pool: whether it holds a turn (`readers.Readers`), and
    the finished jobs it holds back for one batched wake-up of the loop (guarded by
    `lock`: the loop takes them from a thread stuck in SQLite)."""

    __slots__ = ("conn", "held", "held_since", "holding", "lock", "ran_since", "rest")

    def __init__(self, conn: Conn) -> None:
        self.conn = conn
        self.holding = False
        self.held: list[tuple[Job[Any], Outcome]] = []
        self.held_since = 0.0
        self.ran_since = 0.0
        self.lock = threading.Lock()
        # The jobs of the batch being run that have not started.
        self.rest: collections.deque[Job[Any]] = collections.deque()


class ConnectionPool(Generic[C]):
    """Threads that each own one connection and run jobs from a shared queue, in order.

    A thread takes the jobs that queued up while it ran (up to `batch_max`)
    and hands their results back to the loop in one wake-up: each hand-back
    wakes the loop, which then competes for the GIL with the thread's next
    job. Within a batch, results are handed back early once `HOLD_MAX` are
    held or the first has waited `HOLD_LIMIT`, and whenever the running job
    turns slow (`_on_slow`).

    A job whose deadline passed while it waited fails with `late_error()`.
    """

    batch_max = 1

    def __init__(
        self,
        name: str,
        connections: list[C],
        *,
        late_error: Callable[[], BaseException] | None = None,
        jobs: queue.SimpleQueue[Job[Any] | None] | None = None,
    ) -> None:
        self.name = name
        self.late_error = late_error or _queued_past_deadline
        # `jobs`: a queue of the caller's, for tests that widen its races.
        self._queue: queue.SimpleQueue[Job[Any] | None] = (
            queue.SimpleQueue() if jobs is None else jobs
        )
        self._workers = [Worker(conn) for conn in connections]
        self._stopping = False
        # Database failures answered by errorCode (metrics); counted by the threads and
        # the loop, read by the loop.
        self._failures: Counter[str] = Counter()
        self._failures_lock = threading.Lock()
        self._threads = [
            threading.Thread(target=self._serve, args=(worker,), name=f"{name}-{i}", daemon=True)
            for i, worker in enumerate(self._workers)
        ]
        # Last: a role sets what its threads read before it calls this.
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

    async def run(self, fn: Callable[[C], T], deadline: float = 0.0) -> T:
        """`fn(conn)` on one of the threads: its result or its exception.

        Cancelling the caller does not stop a job that has started; its
        deadline does.
        """
        return await outcome_of(self.submit(fn, deadline))

    def busy(self) -> bool:
        """Whether a job of this pool runs or waits (a racy look, from any thread)."""
        return not self._queue.empty() or any(
            worker.rest or worker.conn.deadline.job is not None for worker in self._workers
        )

    def running(self, job: Job[Any]) -> bool:
        """Whether one of this pool's threads is running `job` now."""
        return any(worker.conn.deadline.job is job for worker in self._workers)

    def failure_counts(self) -> dict[str, int]:
        """Database failures of this pool's jobs so far, by errorCode."""
        with self._failures_lock:
            return dict(self._failures)

    def parts(self) -> list[ConnectionPool[Any]]:
        """The pools that stop with this one, in the order they stop."""
        return [self]

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """Finish the queued jobs, then close the connections (blocking; call off the loop)."""
        stop_pools([self], timeout)

    def _expire(self, job: Job[Any]) -> None:
        """The job's deadline passed while its thread was stuck: answer its caller now."""
        if job.on_done is None:
            return
        if not job.expire():
            # Kept: being committed, or kept by a group that may yet roll back and
            # release it. Looked at again until its outcome arrives (which cancels this).
            job.expiry = job.loop.call_later(EXPIRY_RECHECK, self._expire, job)
            return
        if self.running(job):
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

    def _serve(self, worker: Worker) -> None:
        conn = cast("C", worker.conn)
        conn.deadline.on_slow = functools.partial(self._on_slow, worker)
        stop = False
        while not stop:
            self._before_batch(worker)
            jobs, stop = self._take()
            self._run_batch(worker, jobs)
            # Not kept while this thread waits for the next jobs: a job holds its
            # call's parameters (a bound blob of up to the frame limit).
            del jobs
            self._hand_back(worker)
        self._after_last(worker)
        conn.db.close()

    def _before_batch(self, worker: Worker) -> None:
        """On the thread, before it takes its next jobs."""

    def _after_last(self, worker: Worker) -> None:
        """On the thread, once it has served its last job."""

    def _run_batch(self, worker: Worker, jobs: list[Job[Any]]) -> None:
        conn = cast("C", worker.conn)
        for job in jobs:
            self._hold(worker, ((job, self._run_one(conn, job)),))

    def _on_slow(self, worker: Worker) -> bool:
        """The progress handler, once the running job is past `HOLD_LIMIT`: the results
        finished before it do not wait for it. True: stop the job (`Deadline.demoted`)."""
        self._hand_back(worker)
        return False

    def _hold(self, worker: Worker, finished: Iterable[tuple[Job[Any], Outcome]]) -> None:
        """Keep finished jobs for one batched wake-up of the loop, counting their failures;
        hand them back once `HOLD_MAX` are held or the first has waited `HOLD_LIMIT`."""
        now = time.monotonic()
        with worker.lock:
            held = worker.held
            if not held:
                worker.held_since = now
            for job, outcome in finished:
                # Once per answer: not in a group's first run, and not for a job the
                # loop has answered already (`_expire` counted it).
                if not outcome[0] and job.state != EXPIRED:
                    self._count(outcome[1])
                held.append((job, outcome))
            due = len(held) >= HOLD_MAX or now - worker.held_since > HOLD_LIMIT
        if due:
            self._hand_back(worker)

    def _hand_back(self, worker: Worker) -> None:
        """Deliver the results `worker` holds (from its thread, or from the loop)."""
        if not worker.held:
            return
        with worker.lock:
            settled, worker.held = worker.held, []
        if settled:
            settled[0][0].loop.call_soon_threadsafe(settle_all, settled)

    def _take(self) -> tuple[list[Job[Any]], bool]:
        """The next job and those queued behind it; True once the stop sentinel came."""
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
        watch.demoted = False
        try:
            fn = job.fn  # before the state: the loop replaces it when it expires the job
            if job.state == EXPIRED or (deadline and watch.started >= deadline):
                return False, self.late_error()
            return True, fn(conn)
        except GroupAbort:
            raise  # the group's, not the job's: `GroupCommit.run` runs it again
        except BaseException as exc:  # the job's failure belongs to its caller
            if watch.demoted:
                return DEMOTED
            if isinstance(exc, DatabaseFailure):
                conn.health.failed(exc)
            return False, exc
        finally:
            watch.at = 0.0
            watch.job = None

    def _begin_stop(self) -> None:
        self._stopping = True
        for _ in self._threads:
            self._queue.put(None)

    def _join(self, deadline: float) -> bool:
        """Wait for the threads until `deadline` (monotonic); True when all have ended."""
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        return not any(thread.is_alive() for thread in self._threads)

    def _interrupt(self) -> None:
        for worker, thread in zip(self._workers, self._threads, strict=True):
            if thread.is_alive():
                # Its thread may close it at any moment: then there is nothing to stop.
                with contextlib.suppress(apsw.ConnectionClosedError):
                    worker.conn.db.interrupt()

    def _left_behind(self) -> None:
        busy = sum(thread.is_alive() for thread in self._threads)
        if busy:
            log.warning("%s: %d thread(s) still in SQLite at exit; left behind", self.name, busy)


def stop_pools(pools: Sequence[ConnectionPool[Any]], timeout: float) -> None:
    """Stop `pools` (each with its `parts()`) within `timeout` seconds in all (blocking;
    call off the loop).

    Each finishes its queued jobs and closes its connections, all at once, in
    the order given (the stop markers are queued in that order). What still runs
    `INTERRUPT_WAIT` before the end (or half the time, when that is shorter) is
    interrupted. A thread still busy at the end, such as one stuck inside a
    single long SQLite step that no interrupt reaches, is left to end with the
    process: its transaction was never committed, so nothing of it is kept. So
    the daemon's exit never waits past its `--grace` on a statement.
    """
    end = time.monotonic() + timeout
    every = [part for pool in pools for part in pool.parts()]
    for pool in every:
        pool._begin_stop()
    interrupt_at = end - min(INTERRUPT_WAIT, timeout / 2)
    ended = [pool._join(interrupt_at) for pool in every]
    if all(ended):
        return
    for pool in every:
        pool._interrupt()
    for pool in every:
        pool._join(end)
        pool._left_behind()


# A job stopped by its progress handler for being slow, to run again in the slow lane.
DEMOTED: Outcome = (False, None)


def _abandoned(conn: Any) -> Any:
    raise AssertionError("a job the loop expired was run")


def _queued_past_deadline() -> QueuedPastDeadline:
    return QueuedPastDeadline("the call's deadline passed before it could start")
