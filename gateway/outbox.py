"""The event outbox: events are queued in the transaction that caused them, then delivered.

Delivery sends them to the assistant's `emit_event` one at a time, oldest
first, and removes a row only once the assistant has acknowledged it; the
event id makes a re-delivery after a lost answer harmless.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import anyio
import apsw
import msgspec

from gateway.db import Database, transaction
from gateway.link import AssistantLink
from gateway.records import new_id
from protocol.errors import IpcError, IpcHandlerError
from runtime.sqlite import Conn, DatabaseFailure, now_ms

log = logging.getLogger("gateway.outbox")

BATCH = 100
DEAD_AFTER = 5
DELIVERY_BACKOFF_START = 0.05
DELIVERY_BACKOFF_CAP = 5.0
IDLE_POLL = 5.0

_encoder = msgspec.json.Encoder()


class PendingEvent(msgspec.Struct, gc=False):
    seq: int
    event_id: str
    kind: str
    payload: str


def queue_event(conn: Conn, kind: str, payload: dict[str, Any]) -> str:
    """Add an event inside the caller's transaction; its id."""
    event_id = new_id("ev")
    conn.execute(
        "INSERT INTO outbox (event_id, kind, payload, created_at) VALUES (?, ?, ?, ?)",
        (event_id, kind, _encoder.encode(payload).decode(), now_ms()),
    )
    return event_id


def pending_events(conn: Conn, limit: int = BATCH) -> list[PendingEvent]:
    rows = conn.execute(
        "SELECT seq, event_id, kind, payload FROM outbox ORDER BY seq LIMIT ?", (limit,)
    )
    return [PendingEvent(*row) for row in rows]


def queued_through(conn: Conn) -> int:
    """The highest sequence number the outbox has given out (0 before the first event)."""
    rows = conn.execute("SELECT seq FROM main.sqlite_sequence WHERE name = 'outbox'")
    return int(rows[0][0]) if rows else 0


def backlog_bounds(conn: Conn) -> tuple[int, int]:
    """`(done_through, queued_through)` as the table stands: every row above the first is there."""
    queued = queued_through(conn)
    first = conn.execute("SELECT min(seq) FROM outbox")[0][0]
    return (queued if first is None else int(first) - 1), queued


def mark_delivered(conn: Conn, through_seq: int) -> None:
    conn.execute("DELETE FROM outbox WHERE seq <= ?", (through_seq,))


def mark_failed(conn: Conn, seq: int, error: str, set_aside: bool) -> None:
    """Count a failed delivery; with `set_aside`, move the event to `outbox_dead`."""
    with transaction(conn):
        conn.execute(
            "UPDATE outbox SET attempts = attempts + 1, last_error = ? WHERE seq = ?", (error, seq)
        )
        if not set_aside:
            return
        conn.execute(
            "INSERT INTO outbox_dead SELECT seq, event_id, kind, payload, created_at, attempts,"
            " last_error, ? FROM outbox WHERE seq = ?",
            (now_ms(), seq),
        )
        conn.execute("DELETE FROM outbox WHERE seq = ?", (seq,))


def dead_count(conn: Conn) -> int:
    return int(conn.execute("SELECT count(*) FROM outbox_dead")[0][0])


class WakeUp:
    """Wakes the delivery task when a transaction queued something."""

    def __init__(self) -> None:
        self._event = anyio.Event()

    def set(self) -> None:
        self._event.set()

    async def wait(self, timeout: float) -> None:
        with anyio.move_on_after(timeout):
            await self._event.wait()
        self._event = anyio.Event()


class Backlog:
    """How many events wait, exactly, from two watermarks on the outbox's sequence numbers.

    `seq` is AUTOINCREMENT (never reused, and a rolled-back insert takes none)
    and events leave oldest first (delivered, or set aside at the head), so
    the waiting rows are exactly those in `(done_through, queued_through]`.
    Both marks only move up: a report that reaches the loop late (a commit's
    callback after the delivery that already took its event, an empty read
    after a commit) can never undo a newer one, as a counter set to "0" or
    "the count when my transaction ran" could.
    """

    __slots__ = ("done_through", "queued_through")

    def __init__(self) -> None:
        self.done_through = 0
        self.queued_through = 0

    def queued(self, through: int) -> None:
        if through > self.queued_through:
            self.queued_through = through

    def done(self, through: int) -> None:
        if through > self.done_through:
            self.done_through = through

    @property
    def pending(self) -> int:
        return max(0, self.queued_through - self.done_through)


class Delivery:
    """Sends queued events to the assistant in order, retrying with backoff while it is away."""

    def __init__(self, db: Database, link: AssistantLink) -> None:
        self._db = db
        self._link = link
        self._wake = WakeUp()
        self.backlog = Backlog()
        self.dead = 0
        self.last_error: str | None = None
        self._refusals: dict[int, int] = {}

    @property
    def pending(self) -> int:
        return self.backlog.pending

    def wake(self, queued_through: int) -> None:
        """A transaction that may have queued events committed; `queued_through` as it saw it."""
        self.backlog.queued(queued_through)
        self._wake.set()

    async def run_forever(self) -> None:
        delay = DELIVERY_BACKOFF_START
        while True:
            try:
                events = await self._db.run(pending_events)
                if not events:
                    await self._wake.wait(IDLE_POLL)
                    continue
                delivered = await self._deliver(events)
            except (apsw.Error, DatabaseFailure) as exc:
                # gateway.db refused us (a lock held by another process, a full
                # disk): the events stay queued, and one the assistant already
                # stored is recognised by its id when it is sent again.
                self.last_error = f"gateway.db: {exc}"
                log.warning("outbox delivery paused: gateway.db: %s", exc)
                delivered = False
            if delivered:
                delay = DELIVERY_BACKOFF_START
                continue
            await anyio.sleep(delay)
            delay = min(delay * 2, DELIVERY_BACKOFF_CAP)

    async def _deliver(self, events: list[PendingEvent]) -> bool:
        """Deliver in order; False at the first event the assistant did not take.

        Delivered rows are removed together after the run (one commit, not
        one per event); a crash before that re-delivers them, which the
        assistant recognises by event id.
        """
        delivered = 0
        through = 0
        try:
            for event in events:
                params = {
                    "id": event.event_id,
                    "kind": event.kind,
                    "payload": msgspec.Raw(event.payload.encode()),
                }
                try:
                    await self._link.call_assistant("emit_event", params)
                except IpcError as exc:
                    if not await self._failed(event, exc):
                        return False
                    continue
                delivered += 1
                through = event.seq
                self._refusals.pop(event.seq, None)
                self.last_error = None
            return True
        finally:
            if delivered:
                await self._db.run(functools.partial(mark_delivered, through_seq=through))
                self.backlog.done(through)

    async def _failed(self, event: PendingEvent, exc: IpcError) -> bool:
        """Record the failure; True when the event was set aside and delivery goes on.

        Only an outright refusal (a non-retryable error) counts towards setting
        an event aside, and only `DEAD_AFTER` of them in a row: the assistant
        being away or busy never does.
        """
        self.last_error = str(exc)
        refusals = 0
        if isinstance(exc, IpcHandlerError) and not exc.retryable:
            refusals = self._refusals.get(event.seq, 0) + 1
        self._refusals[event.seq] = refusals
        set_aside = refusals >= DEAD_AFTER
        failed = functools.partial(mark_failed, seq=event.seq, error=str(exc), set_aside=set_aside)
        await self._db.run(failed)
        if not set_aside:
            return False
        del self._refusals[event.seq]
        log.error("event %s (%s) set aside in outbox_dead: %s", event.event_id, event.kind, exc)
        self.dead += 1
        self.backlog.done(event.seq)
        return True
