"""A query's first attempt on the loop thread, on a connection no other thread touches.

Handing a point query to a reader thread and its answer back costs two thread
wake-ups, more than the query itself (measured: about three quarters of a point
query's cost was ours, the hops and their GIL hand-overs). So a query first runs
here, on the loop, under a budget of `BUDGET` seconds: SQLite's progress handler
(every `STEPS` VM steps) stops it past that, and it is run again from the start
by the readers, as a read may be (it has no side effects). A statement stopped
twice in a row goes to the readers straight away for a while (`too_slow`, of bounded
size): `FIRST_RETRY`, doubled each time it is stopped again up to `RETRY_AFTER`.

The budget is about one thread hop: a call behind a query that turns out slow
waits no longer than it waited behind the hop before. A lock (SQLITE_BUSY: a
checkpoint's, WAL recovery) is never waited for on the loop: the busy timeout is
0, and a busy query goes to the readers, which wait.

A progress handler cannot stop one long SQLite step (a function building or
scanning a large value, a pragma like integrity_check), so the connection's
authorizer lets it prepare only statements whose every step is short: no function
but those of bounded work per row (`policy.QUICK_FUNCTIONS`), no pragma. Any other
is passed to the readers before it runs. A step over one large value (comparing or
joining texts of megabytes) is bounded by this connection's own length limit,
`VALUE_BYTES`: a query meeting a longer value, stored or made, is passed on too.

Its queries share one read transaction (one snapshot) until the writer commits, or for
`SNAPSHOT_AGE` at most: a point query in autocommit took 3.1 us, 1.2 in a transaction
already open (a read transaction's start and end take four fcntl() locks and a look at
the WAL's index). The writer counts its commits once each is visible (`Conn.commits`),
before their answers go out; a query that sees the count moved starts a new snapshot,
so what a write's answer said is there is seen, as on the readers (in autocommit). The
age bounds what a writer in another process leaves unseen, and how long an idle loop
keeps a checkpoint from reaching the WAL's end.

What the schema holds is compiled where the authorizer is not asked: a virtual generated
column's expression (`trim(printf(...))` held the loop 35 ms a row), a virtual table's
module (an FTS5 MATCH does its search in one step). So on this connection every built-in
function not in `QUICK_FUNCTIONS` is replaced by one that refuses (`_refuse_slow_builtins`),
and no virtual table module is loaded: a statement meeting either is passed on, as one
the authorizer refused is.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

import apsw

from pair.assistant.policy import QUICK_FUNCTIONS, Denial
from pair.protocol.deferred import Done
from pair.runtime.sqlite import DatabaseFailure
from pair.runtime.sqlite.transaction import BEGIN_READ, COMMIT, Conn

if TYPE_CHECKING:
    from pair.assistant.db import GuardedConn

T = TypeVar("T")

log = logging.getLogger("assistant.db")

# Wall time, not the thread's CPU time (which costs 2 us a look here): a query waiting on
# the disk holds the loop as surely as one computing. So under CPU contention a quick
# query may be stopped too (then passed on), and the loop answers fewer.
BUDGET = 0.0001
MAX_BUDGET = 1.0
STEPS = 10
# Statements remembered as too slow for the loop; past this many the memory starts over.
TOO_SLOW_KEPT = 1024
# A statement too slow for the loop is tried there again after this (seconds), doubled
# each time up to `RETRY_AFTER`: its binds may make it quick, or it was stopped by what
# happened to run beside it (a collection of the GC, a schema read, the process waiting
# for a core). Measured: with a second at once, two such stops sent every point query of
# a load to the readers for that second (40,000 of them). A statement that is slow each
# time costs the loop two budgets a second; one refused for what it holds goes to the
# readers for `RETRY_AFTER` at once.
FIRST_RETRY = 0.05
RETRY_AFTER = 1.0
# How long a stop waits for a schema read in progress (it holds the connection).
WARM_TIMEOUT = 5.0
# Longer texts are prepared by the readers.
SQL_CHARS = 4096
# No value on this connection is longer (bytes), read or made: one SQLite step over one
# (comparing, concatenating, casting) takes a few us, where 16 MiB took milliseconds.
# A query meeting a longer one (SQLITE_TOOBIG) is passed to the readers.
VALUE_BYTES = 64 * 1024
# The longest a snapshot is kept (seconds) with no commit of the writer's.
SNAPSHOT_AGE = 0.05
# Queries came within this (seconds): the loop is answering them (`busy`).
BUSY_WINDOW = 0.001


def _demote() -> bool:
    return True


class LoopReader:
    """One read connection of the loop thread's own, tried before the readers."""

    def __init__(
        self,
        conn: GuardedConn,
        writes: Conn,
        late_error: Callable[[], BaseException],
        budget: float = BUDGET,
    ) -> None:
        self.conn = conn
        # The writer's connection, read for its count of commits only.
        self.writes = writes
        self.seen_commits = -1
        self.snapshot_at = 0.0
        self.expiry: asyncio.TimerHandle | None = None
        self.last_attempt = 0.0
        self.closed = False
        self.own_failing = False
        conn.guard.quick_only = True
        _refuse_slow_builtins(conn)
        conn.db.drop_modules(None)
        conn.db.limit(apsw.SQLITE_LIMIT_LENGTH, VALUE_BYTES)
        self.late_error = late_error
        watch = conn.deadline
        watch.on_slow = _demote
        watch.hold_limit = budget
        conn.db.set_progress_handler(watch.on_progress, STEPS)
        conn.db.set_busy_timeout(0)
        # By the text's hash: a text may be long, and a collision only sends a query to
        # the readers.
        self.too_slow: dict[int, float] = {}
        # Stops of a statement since it was last answered here: each second one finds it
        # too slow, and doubles its next wait.
        self.stops: dict[int, int] = {}
        self.failures: Counter[str] = Counter()
        # How the attempts went: answered here, or passed to the readers (too slow, busy).
        self.answered = 0
        self.passed = 0
        # The schema is being read on a thread (`_warm`): the loop does not touch the
        # connection meanwhile.
        self.warming = False
        self.warmer: threading.Thread | None = None

    def attempt(self, fn: Callable[[GuardedConn], T], sql: str, deadline: float) -> Done[T] | None:
        """`fn`'s outcome on this connection, or None: run it on the readers."""
        if len(sql) > SQL_CHARS or self.warming or self.closed:
            # Preparing a text of megabytes takes milliseconds, and a new text each time
            # would never be remembered.
            self.passed += 1
            return None
        now = self.last_attempt = time.monotonic()
        if self.too_slow:
            retry_at = self.too_slow.get(hash(sql))
            if retry_at is not None:
                if now < retry_at:
                    self.passed += 1
                    return None
                del self.too_slow[hash(sql)]
        watch = self.conn.deadline
        if deadline and now >= deadline:
            self.answered += 1
            return Done(False, self._count(self.late_error()))
        db = self.conn.db
        if db.in_transaction and (
            self.writes.commits != self.seen_commits or now - self.snapshot_at > SNAPSHOT_AGE
        ):
            self.release()
        # Only the first statement of a snapshot may read the schema (a change commits).
        new_snapshot = not db.in_transaction
        if new_snapshot and not self._begin(now):
            self.passed += 1
            return None
        watch.at = deadline
        watch.started = now
        watch.demoted = False
        try:
            result = fn(self.conn)
        except BaseException as exc:  # the caller's answer, as on the readers
            if self.conn.guard.denial is Denial.NOT_QUICK or _not_for_the_loop(exc):
                self._too_slow(sql, RETRY_AFTER)
                return None
            if watch.demoted:
                self._stopped(sql)
                self.release()
                if new_snapshot:
                    self._warm()
                return None
            if isinstance(exc.__cause__, apsw.BusyError):
                self.passed += 1
                return None
            self.answered += 1
            return Done(False, self._count(exc))
        finally:
            watch.at = 0.0
        self.answered += 1
        if self.stops:
            self.stops.pop(hash(sql), None)
        return Done(True, result)

    def busy(self) -> bool:
        """Whether queries came lately (from any thread: the slow lane pauses for them)."""
        return time.monotonic() - self.last_attempt < BUSY_WINDOW

    def _begin(self, now: float) -> bool:
        # Read before the snapshot is taken: a commit counted after it may or may not be
        # in it, and moves the count for the next query.
        self.seen_commits = self.writes.commits
        self.snapshot_at = now
        if not self._own(BEGIN_READ):
            return False
        if self.expiry is None:
            self.expiry = asyncio.get_running_loop().call_later(SNAPSHOT_AGE, self._expire)
        return True

    def release(self) -> None:
        """End the read transaction (its snapshot); the next query starts another."""
        if self.conn.db.in_transaction:
            self._own(COMMIT)

    def _own(self, sql: str) -> bool:
        """One of our own statements, never stopped by the budget or a caller's deadline
        (the progress handler may still be armed for the query before)."""
        watch = self.conn.deadline
        watch.at = 0.0
        watch.started = time.monotonic()
        try:
            self.conn.execute(sql, cacheable=True)
        except apsw.Error as exc:
            # Not a caller's failure: the query goes to the readers. Logged once until
            # it works again, not once a query.
            if not self.own_failing:
                self.own_failing = True
                log.warning("the loop's reader could not %s: %s", sql.split()[0], exc)
            return False
        self.own_failing = False
        return True

    def _expire(self) -> None:
        self.expiry = None
        if self.closed or self.warming or not self.conn.db.in_transaction:
            return
        age = time.monotonic() - self.snapshot_at
        if age >= SNAPSHOT_AGE:
            self.release()
        else:
            loop = asyncio.get_running_loop()
            self.expiry = loop.call_later(SNAPSHOT_AGE - age, self._expire)

    def _warm(self) -> None:
        """Read the schema on a thread of its own, while the loop passes every query on:
        after a stop in a snapshot's first statement, which may have been reading it.
        (Not after any stop: the thread waits for the GIL while the loop is busy, and every
        query went to the readers meanwhile, thousands under load.)

        Stopped while it was reading the schema (after a caller's CREATE, say), SQLite
        throws the half-read schema away, so with many tables the next try on the loop
        would be stopped again, and every one after it: measured, a CREATE TABLE made
        all the loop's queries go to the readers until a restart."""
        self.warming = True
        self.warmer = threading.Thread(target=self._read_schema, name="db-loop-warm", daemon=True)
        self.warmer.start()

    def _read_schema(self) -> None:
        watch = self.conn.deadline
        watch.on_slow = None
        try:
            self.conn.execute("SELECT 1 FROM main.sqlite_schema LIMIT 1")
        except apsw.Error as exc:
            log.warning("the loop's reader could not read the schema: %s", exc)
        finally:
            watch.on_slow = _demote
            self.warming = False

    def _stopped(self, sql: str) -> None:
        """Stopped for its budget: too slow at the second time in a row. A first run may
        be slow for what it does once (preparing the statement, reading the schema after
        a change), not what it does each time."""
        key = hash(sql)
        if len(self.stops) >= TOO_SLOW_KEPT:
            self.stops.clear()
        stops = self.stops[key] = self.stops.get(key, 0) + 1
        if stops % 2:
            self.passed += 1
            return
        self._too_slow(sql, min(RETRY_AFTER, FIRST_RETRY * 2 ** (stops // 2 - 1)))

    def _too_slow(self, sql: str, retry_after: float) -> None:
        self.passed += 1
        if len(self.too_slow) >= TOO_SLOW_KEPT:
            self.too_slow.clear()
        self.too_slow[hash(sql)] = time.monotonic() + retry_after

    def _count(self, exc: BaseException) -> BaseException:
        if isinstance(exc, DatabaseFailure):
            self.conn.health.failed(exc)
            self.failures[exc.error_code] += 1
        return exc

    def stop(self) -> None:
        """On the loop, once no query comes any more: no timer of ours is left on it, and
        no snapshot is held."""
        self.closed = True
        if self.expiry is not None:
            self.expiry.cancel()
            self.expiry = None
        if not self.warming:
            self.release()

    def close(self) -> None:
        """Off the loop, after `stop`."""
        self.closed = True
        if self.warmer is not None:
            self.warmer.join(WARM_TIMEOUT)
        self.conn.db.close()


def _refuse_slow_builtins(conn: GuardedConn) -> None:
    """Replace each built-in scalar function but the quick ones with one that refuses.

    An application-defined function is found before a built-in of its name whatever its
    number of arguments, in the schema's expressions too, so a generated column over
    printf() calls this one. It is deterministic and innocuous, as a function the schema
    names must be (`trusted_schema` is off)."""
    guard = conn.guard

    def not_quick(*_args: object) -> None:
        guard.deny_not_quick()
        raise NotQuickHere

    rows = conn.execute("SELECT name, type FROM pragma_function_list WHERE builtin")
    # min() and max() are also aggregates, and quick: a scalar override would hide both.
    aggregates = {name for name, kind in rows if kind != "s"}
    for name in {name for name, kind in rows if kind == "s"}:
        if name not in QUICK_FUNCTIONS and name not in aggregates:
            conn.db.create_scalar_function(
                name, not_quick, -1, deterministic=True, flags=apsw.SQLITE_INNOCUOUS
            )


class NotQuickHere(Exception):
    """Raised by a refused built-in on the loop's connection: the readers run the query."""


def _not_for_the_loop(exc: BaseException) -> bool:
    """Refused for what this connection lacks, not the caller's: a virtual table's module,
    or room for a value over `VALUE_BYTES`."""
    cause = exc.__cause__
    if isinstance(cause, apsw.TooBigError):
        return True
    return isinstance(cause, apsw.SQLError) and "no such module" in str(cause)
