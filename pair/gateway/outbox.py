"""The event outbox in gateway.db: events are queued in the transaction that caused them,
read oldest first, removed once delivered, and set aside after `DEAD_AFTER` refusals
(counted in `outbox.attempts`, so a restart keeps the count). Delivery is
`gateway.delivery`; every function here runs on the database thread.
"""

from __future__ import annotations

import time
from typing import Any

import msgspec

from pair.gateway.db import transaction
from pair.protocol import trace
from pair.runtime.sqlite import Conn, now_ms

BATCH = 500
DEAD_AFTER = 5

_encoder = msgspec.json.Encoder()


class PendingEvent(msgspec.Struct, gc=False):
    seq: int
    event_id: str
    kind: str
    payload: str
    created_at: int


def queue_event(conn: Conn, kind: str, payload: dict[str, Any]) -> str:
    """Add an event inside the caller's transaction; its id (`event_id`)."""
    event_id = new_event_id(trace.current_or_new())
    conn.execute(
        "INSERT INTO outbox (event_id, kind, payload, created_at) VALUES (?, ?, ?, ?)",
        (event_id, kind, _encoder.encode(payload).decode(), now_ms()),
    )
    return event_id


def new_event_id(span: trace.Span) -> str:
    """`ev_`, then milliseconds since the epoch (12 hex digits, so ids sort by time as
    `records.new_id`'s do), the trace id (32) and the span id (16) of the call that
    queued it: the row keeps its trace with no column of its own, so the delivery,
    even after a restart, is logged under that trace, and an older release (which
    refuses a newer schema) still opens the database and delivers the event as it is."""
    return f"ev_{time.time_ns() // 1_000_000:012x}{span.trace_id}{span.span_id}"


def delivery_span(event_id: str) -> trace.Span:
    """The span of an event's delivery: under the span that queued it, or the first of a
    new trace for an event whose id carries none (queued by an older release)."""
    if len(event_id) == _TRACED_ID_CHARS:
        return trace.Span(event_id[15:47], event_id[47:])
    return trace.Span.new()


_TRACED_ID_CHARS = 3 + 12 + 32 + 16


def pending_events(conn: Conn, limit: int = BATCH) -> list[PendingEvent]:
    rows = conn.execute(
        "SELECT seq, event_id, kind, payload, created_at FROM outbox ORDER BY seq LIMIT ?",
        (limit,),
    )
    return [PendingEvent(*row) for row in rows]


def queued_through(conn: Conn) -> int:
    """The highest sequence number the outbox has given out (0 before the first event)."""
    rows = conn.execute("SELECT seq FROM main.sqlite_sequence WHERE name = 'outbox'")
    return int(rows[0][0]) if rows else 0


def backlog_bounds(conn: Conn) -> tuple[int, int, int | None]:
    """`(done_through, queued_through, oldest created_at)` as the table stands: every row
    above the first is there."""
    queued = queued_through(conn)
    rows = conn.execute("SELECT seq, created_at FROM outbox ORDER BY seq LIMIT 1")
    if not rows:
        return queued, queued, None
    first, created_at = rows[0]
    return int(first) - 1, queued, int(created_at)


def mark_delivered(conn: Conn, through_seq: int) -> None:
    conn.execute("DELETE FROM outbox WHERE seq <= ?", (through_seq,))


def mark_refused(conn: Conn, seq: int, error: str) -> bool:
    """Count a refusal of the event; at the `DEAD_AFTER`th, move it to `outbox_dead`.
    True when it was set aside."""
    with transaction(conn):
        rows = conn.execute(
            "UPDATE outbox SET attempts = attempts + 1, last_error = ? WHERE seq = ?"
            " RETURNING attempts",
            (error, seq),
        )
        if not rows or rows[0][0] < DEAD_AFTER:
            return False
        conn.execute(
            "INSERT INTO outbox_dead SELECT seq, event_id, kind, payload, created_at, attempts,"
            " last_error, ? FROM outbox WHERE seq = ?",
            (now_ms(), seq),
        )
        conn.execute("DELETE FROM outbox WHERE seq = ?", (seq,))
        return True


def dead_count(conn: Conn) -> int:
    return int(conn.execute("SELECT count(*) FROM outbox_dead")[0][0])
