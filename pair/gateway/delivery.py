"""Delivery of the outbox to the assistant, in order.

The oldest waiting events go to the assistant's `emit_events` in batches of up
to `BATCH`, one call at a time (so order holds); a batch's rows are removed in
one commit once the assistant has acknowledged it, and the event ids make a
re-delivery after a lost answer harmless. A batch the assistant refuses
outright is split until the one event that causes it is alone: only that event
counts refusals, and goes to `outbox_dead` after `DEAD_AFTER` of them. The
assistant being away, busy or full never counts.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import anyio
import apsw
import msgspec

from pair.gateway.db import Database
from pair.gateway.link import AssistantLink
from pair.gateway.outbox import (
    PendingEvent,
    delivery_span,
    mark_delivered,
    mark_refused,
    pending_events,
)
from pair.protocol import trace
from pair.protocol.errors import IpcError, IpcHandlerError
from pair.runtime.failpoints import failpoint
from pair.runtime.sqlite import DatabaseFailure, commits_durable, now_ms

log = logging.getLogger("gateway.outbox")

DELIVERY_BACKOFF_START = 0.05
DELIVERY_BACKOFF_CAP = 5.0
IDLE_POLL = 5.0
# A batch of 500 small events is well under a second of the assistant's work;
# a call that takes longer than this is treated as lost and sent again.
DELIVERY_TIMEOUT = 30.0

# Non-retryable answers that say nothing about the events sent: delivery waits
# (lastError shows why) instead of narrowing them down to one event.
NOT_ABOUT_THE_EVENTS = frozenset(
    {
        "METHOD_NOT_FOUND",
        "FORBIDDEN",
        "INTERNAL_ERROR",
        "DB_CORRUPT",
        "INVALID_REQUEST",
        "PARSE_ERROR",
        "INVALID_FRAME",
        "FRAME_TOO_LARGE",
    }
)


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

    __slots__ = ("done_through", "oldest_at", "queued_through")

    def __init__(self) -> None:
        self.done_through = 0
        self.queued_through = 0
        # created_at (ms) of the oldest waiting event, as last known: from each
        # read of the head, else the time of the commit that made the backlog
        # non-empty (a few ms after the event's own created_at).
        self.oldest_at: int | None = None

    def queued(self, through: int) -> None:
        if through > self.queued_through:
            if self.oldest_at is None or not self.pending:
                self.oldest_at = now_ms()
            self.queued_through = through

    def done(self, through: int) -> None:
        if through > self.done_through:
            self.done_through = through
        if not self.pending:
            self.oldest_at = None

    @property
    def pending(self) -> int:
        return max(0, self.queued_through - self.done_through)

    def oldest_age_ms(self) -> int | None:
        if self.oldest_at is None or not self.pending:
            return None
        return max(0, now_ms() - self.oldest_at)


class Delivery:
    """Sends queued events to the assistant in order, retrying with backoff while it is away."""

    def __init__(self, db: Database, link: AssistantLink) -> None:
        self._db = db
        self._link = link
        self._wake = WakeUp()
        self.backlog = Backlog()
        self.dead = 0
        self.delivered_total = 0
        self.last_error: str | None = None

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
                # Also learnt from each read: a commit whose wake never came
                # (its job failed after committing) is counted all the same.
                self.backlog.queued(events[-1].seq)
                self.backlog.oldest_at = events[0].created_at
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
        """Deliver `events` in order; False when delivery must wait and try again.

        A batch refused outright is split in two and each half delivered in
        turn, down to the one event that is refused; the events before it
        are delivered (and removed) on the way.
        """
        # Under --synchronous normal, what the assistant stores must not outlive a power cut
        # that takes its redemption away here (under FULL every commit already is durable).
        if self._db.synchronous.upper() != "FULL":
            await anyio.to_thread.run_sync(commits_durable, self._db.path)
        try:
            if await self._link.can("emit_events"):
                spans = self._spans(events)
                wired = [_wire(event, span) for event, span in zip(events, spans, strict=True)]
                await self._link.call_assistant(
                    "emit_events", {"events": wired}, timeout=DELIVERY_TIMEOUT
                )
            else:
                return await self._one_at_a_time(events)
        except IpcError as exc:
            self.last_error = str(exc)
            if not _outright(exc):
                return False
            if len(events) > 1:
                half = len(events) // 2
                return await self._deliver(events[:half]) and await self._deliver(events[half:])
            return await self._refused(events[0], exc)
        failpoint("after_emit_events")
        await self._delivered(events, spans)
        return True

    def _spans(self, events: list[PendingEvent]) -> list[trace.Span]:
        """Each event's delivery span, under the call that queued it: sent with the event,
        and logged with its delivery."""
        return [delivery_span(event.event_id) for event in events]

    async def _one_at_a_time(self, events: list[PendingEvent]) -> bool:
        """For an assistant without `emit_events`: `emit_event` for each, in order, each
        marked delivered as it is stored; one refused outright is set aside alone."""
        for event, span in zip(events, self._spans(events), strict=True):
            try:
                await self._link.call_assistant(
                    "emit_event", _wire(event, span), timeout=DELIVERY_TIMEOUT
                )
            except IpcError as exc:
                self.last_error = str(exc)
                if not _outright(exc) or not await self._refused(event, exc):
                    return False
                continue
            await self._delivered([event], [span])
        return True

    async def _delivered(self, events: list[PendingEvent], spans: list[trace.Span]) -> None:
        through = events[-1].seq
        await self._db.run(functools.partial(mark_delivered, through_seq=through))
        self.backlog.done(through)
        self.delivered_total += len(events)
        self.last_error = None
        for event, span in zip(events, spans, strict=True):
            log.info("event %s (%s) delivered", event.event_id, event.kind, extra={"span": span})

    async def _refused(self, event: PendingEvent, exc: IpcError) -> bool:
        """The assistant refused this event alone; True when it was set aside (go on)."""
        refused = functools.partial(mark_refused, seq=event.seq, error=str(exc))
        if not await self._db.run(refused):
            return False
        log.error("event %s (%s) set aside in outbox_dead: %s", event.event_id, event.kind, exc)
        self.dead += 1
        self.backlog.done(event.seq)
        return True


def _wire(event: PendingEvent, span: trace.Span) -> dict[str, Any]:
    """The event as `emit_event`'s params (an item of `emit_events`), its trace in `_meta`
    (left out by the link for an assistant that does not take it)."""
    return {
        "id": event.event_id,
        "kind": event.kind,
        "payload": msgspec.Raw(event.payload.encode()),
        "_meta": span.meta(),
    }


def _outright(exc: IpcError) -> bool:
    """A refusal of what was sent (not retryable), as opposed to the assistant away, busy,
    out of step with us or broken: those refuse every event alike and must not send the
    whole outbox to outbox_dead one event at a time."""
    return (
        isinstance(exc, IpcHandlerError)
        and not exc.retryable
        and exc.code not in NOT_ABOUT_THE_EVENTS
    )
