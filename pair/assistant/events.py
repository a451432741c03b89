"""Events the gateway emits (`emit_event`, `emit_events`), stored once per event id."""

from __future__ import annotations

from collections.abc import Sequence

import apsw
from msgspec import Struct

from pair.assistant.db import GuardedConn
from pair.assistant.errors import EventStoreFailed
from pair.assistant.proxy import translate
from pair.runtime.failpoints import failpoint
from pair.runtime.sqlite import WriteTransaction, now_ms, ours

# Marked as ours: it is cached on the writer, which callers' statements share,
# and a caller sending the same text must not get our prepared statement.
_INSERT = ours(
    "INSERT INTO main.events (id, kind, payload, received_at) VALUES (?, ?, ?, ?)"
    " ON CONFLICT (id) DO NOTHING"
)


class EmitEventResult(Struct):
    accepted: bool
    duplicate: bool


class EmitEventsResult(Struct):
    """`accepted`: how many of the call's events this call stored; `duplicates`: the ids
    that were already stored (by an earlier call, or earlier in this one), in call order."""

    accepted: int
    duplicates: list[str]


Event = tuple[str, str, str]  # (id, kind, payload as JSON text)


def insert_event(conn: GuardedConn, event_id: str, kind: str, payload: str) -> EmitEventResult:
    """Store the event; a duplicate when an event with this id was already stored."""
    stored = insert_events(conn, [(event_id, kind, payload)])
    return EmitEventResult(accepted=True, duplicate=bool(stored.duplicates))


def insert_events(conn: GuardedConn, events: Sequence[Event]) -> EmitEventsResult:
    """Store the events in order in one transaction, skipping ids already stored."""
    duplicates = []
    now = now_ms()
    try:
        with WriteTransaction(conn):
            for index, (event_id, kind, payload) in enumerate(events):
                if index == len(events) // 2:
                    failpoint("mid_emit_events")
                before = conn.db.total_changes()
                conn.execute(_INSERT, (event_id, kind, payload, now), cacheable=True)
                if conn.db.total_changes() == before:
                    duplicates.append(event_id)
    except apsw.Error as exc:
        # A locked or full database answers by its result code (retryable), not
        # as a refusal of the events themselves.
        raise translate(exc, conn, EventStoreFailed) from exc
    return EmitEventsResult(accepted=len(events) - len(duplicates), duplicates=duplicates)
