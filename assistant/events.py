"""Events the gateway emits (`emit_event`), stored once per event id."""

from __future__ import annotations

import apsw
from msgspec import Struct

from assistant.db import GuardedConn
from assistant.errors import EventStoreFailed
from assistant.proxy import translate
from runtime.sqlite import now_ms


class EmitEventResult(Struct):
    accepted: bool
    duplicate: bool


def insert_event(conn: GuardedConn, event_id: str, kind: str, payload: str) -> EmitEventResult:
    """Store the event; a duplicate when an event with this id was already stored."""
    before = conn.db.total_changes()
    try:
        conn.execute(
            "INSERT INTO events (id, kind, payload, received_at) VALUES (?, ?, ?, ?)"
            " ON CONFLICT (id) DO NOTHING",
            (event_id, kind, payload, now_ms()),
            cacheable=True,
        )
    except apsw.Error as exc:
        # A locked database is DB_BUSY (retryable), not an internal error the
        # gateway would take for a refusal of the event itself.
        raise translate(exc, conn, EventStoreFailed) from exc
    return EmitEventResult(accepted=True, duplicate=conn.db.total_changes() == before)
