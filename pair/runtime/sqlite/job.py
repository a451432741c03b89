"""A unit of work for a connection thread, and how its outcome reaches the loop."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable
from typing import Any, Generic, TypeVar, cast

T = TypeVar("T")
U = TypeVar("U")

log = logging.getLogger("runtime.sqlite")

PENDING, KEPT, EXPIRED = 0, 1, 2
# Guards every job's state: the thread keeps a job (it is about to commit it)
# and the loop expires one (its caller has been answered DB_TIMEOUT) under it,
# so a job is never both committed and answered as timed out.
_STATE = threading.Lock()

OnDone = Callable[[Any, bool, Any], None]  # (context, ok, result or exception)


class Job(Generic[T]):
    """A job queued for a connection thread. Its outcome goes to `then`'s callback on the
    loop: `on_done(context, True, result)` or `on_done(context, False, exception)`.

    `then` must be called right after `ConnectionPool.submit`, before the loop runs
    anything else: the outcome is delivered by a loop callback, never earlier.
    """

    __slots__ = ("after", "context", "deadline", "expiry", "fn", "loop", "on_done", "state")

    def __init__(
        self, fn: Callable[[Any], T], deadline: float, loop: asyncio.AbstractEventLoop
    ) -> None:
        self.fn = fn
        self.deadline = deadline
        self.loop = loop
        self.on_done: OnDone | None = None
        self.context: Any = None
        self.after: Callable[[Any], Any] | None = None
        self.state = PENDING
        self.expiry: asyncio.TimerHandle | None = None

    def keep(self) -> bool:
        """On the thread, before committing the job's writes: False once the loop has expired
        the job (its writes must be rolled back); after True, the loop no longer can."""
        with _STATE:
            if self.state == PENDING:
                self.state = KEPT
            return self.state == KEPT

    def expire(self) -> bool:
        """On the loop: True if the job was not kept, and is now answered by its caller's
        timeout; whatever the thread makes of it later is dropped."""
        with _STATE:
            if self.state == PENDING:
                self.state = EXPIRED
            return self.state == EXPIRED

    def withdraw(self, error: BaseException) -> bool:
        """On the loop: answer the job's caller with `error` now, unless its thread has
        kept it (it is being committed). A queued job is then skipped, a running one's
        result dropped and its writes rolled back. True when withdrawn."""
        if self.on_done is None or not self.expire():
            return False
        on_done, context = self.on_done, self.context
        self.on_done = self.context = None
        if self.expiry is not None:
            self.expiry.cancel()
            self.expiry = None
        on_done(context, False, error)
        return True

    def then(self, on_done: Callable[[Any, bool, T | BaseException], None], context: Any) -> None:
        self.on_done = on_done
        self.context = context

    def map(self, after: Callable[[T], U]) -> Job[U]:
        """This job, its result passed through `after` on the loop before it is delivered."""
        before = self.after
        self.after = after if before is None else lambda value: after(before(value))
        return cast("Job[U]", self)


def keep_all(jobs: list[Job[Any]]) -> bool:
    """Keep every one of `jobs` (a group about to commit their writes), or none: False, and
    none kept, if the loop has expired any of them."""
    with _STATE:
        if any(job.state == EXPIRED for job in jobs):
            return False
        for job in jobs:
            job.state = KEPT
        return True


def release_all(jobs: list[Job[Any]]) -> None:
    """The kept `jobs` were not committed after all (their group's COMMIT failed and they
    run again): the loop may expire them again."""
    with _STATE:
        for job in jobs:
            if job.state == KEPT:
                job.state = PENDING


Outcome = tuple[bool, Any]  # (ok, result or exception)


def settle_all(settled: list[tuple[Job[Any], Outcome]]) -> None:
    """On the loop: deliver each finished job's outcome to its callback."""
    for job, (ok, value) in settled:
        if job.state == EXPIRED:
            continue  # its caller was answered by the loop (`ConnectionPool._expire`)
        if job.expiry is not None:
            job.expiry.cancel()
        if job.on_done is None:
            log.error("a database job finished with nobody waiting for it")
            continue
        try:
            if ok and job.after is not None:
                try:
                    value = job.after(value)
                except Exception as exc:
                    ok, value = False, exc
            job.on_done(job.context, ok, value)
        except Exception:
            # One caller's broken callback must not strand the others' results.
            log.exception("a database job's callback failed")
