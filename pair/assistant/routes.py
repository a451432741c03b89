"""assistant.sock's methods: the wire types and the handlers that map them onto the database."""

from __future__ import annotations

import functools
import logging
import os
import time
from collections import Counter
from collections.abc import Callable
from typing import Annotated, Any, Literal, TypeVar

import anyio
import anyio.to_thread
import msgspec
from msgspec import Meta, Struct

from pair import __version__
from pair.assistant import proxy
from pair.assistant.db import Database, GuardedConn
from pair.assistant.events import EmitEventResult, EmitEventsResult, insert_event, insert_events
from pair.assistant.proxy import ExecResult, QueryResult, RunResult, Step, TransactionResult
from pair.assistant.statement import DEFAULT_MAX_BYTES
from pair.protocol import trace
from pair.protocol.deferred import Deferred
from pair.protocol.dispatch import NoParams, Router
from pair.protocol.errors import InvalidParams
from pair.protocol.health import DbInfo, Health, health_of
from pair.protocol.metrics import ProtocolMetrics
from pair.protocol.trace import Traced
from pair.protocol.values import WireBind, bind_from_wire
from pair.runtime.backup import BackupStats, Snapshotter, method_of
from pair.runtime.sqlite import commits_durable

T = TypeVar("T")

MAX_SQL_CHARS = 1024 * 1024
MAX_STEPS = 1000
MAX_PARAMETERS = 32766
DEFAULT_TIMEOUT_MS = 5000
MAX_TIMEOUT_MS = 60_000
DEFAULT_MAX_ROWS = 10_000
MAX_MAX_ROWS = 1_000_000
MAX_EVENTS = 500
MAX_MAX_BYTES = 1024 * 1024 * 1024
EventKind = Literal["invite_redeemed", "contacts_changed"]

Sql = Annotated[str, Meta(min_length=1, max_length=MAX_SQL_CHARS)]
Bind = WireBind | None
TimeoutMs = Annotated[int, Meta(ge=1, le=MAX_TIMEOUT_MS)]
MaxRows = Annotated[int, Meta(ge=1, le=MAX_MAX_ROWS)]
# Of the rows' JSON; the answer's frame must still fit max_frame_bytes.
MaxBytes = Annotated[int, Meta(ge=1, le=MAX_MAX_BYTES)]
Key = Annotated[str, Meta(min_length=1, max_length=200)]

_encoder = msgspec.json.Encoder()
log = logging.getLogger("assistant.events")


class DbProxyParams(Struct, forbid_unknown_fields=True, rename="camel"):
    sql: Sql
    mode: Literal["query", "run", "exec"]
    bind: Bind = None
    timeout_ms: TimeoutMs = DEFAULT_TIMEOUT_MS
    max_rows: MaxRows = DEFAULT_MAX_ROWS
    max_bytes: MaxBytes = DEFAULT_MAX_BYTES


class StepParams(Struct, forbid_unknown_fields=True, rename="camel"):
    sql: Sql
    bind: Bind = None
    require_changes: Annotated[int, Meta(ge=0)] | None = None


class TransactionParams(Struct, forbid_unknown_fields=True, rename="camel"):
    steps: Annotated[list[StepParams], Meta(max_length=MAX_STEPS)]
    idempotency_key: Key | None = None
    timeout_ms: TimeoutMs = DEFAULT_TIMEOUT_MS
    max_rows: MaxRows = DEFAULT_MAX_ROWS
    max_bytes: MaxBytes = DEFAULT_MAX_BYTES


class EmitEventParams(Struct, forbid_unknown_fields=True):
    id: Key
    kind: EventKind
    payload: dict[str, Any]
    # The event's trace (an item of emit_events has its own; emit_event's is the call's).
    meta: Traced = msgspec.field(default=msgspec.UNSET, name="_meta")


class EmitEventsParams(Struct, forbid_unknown_fields=True):
    events: Annotated[list[EmitEventParams], Meta(min_length=1, max_length=MAX_EVENTS)]


class AssistantMetrics(ProtocolMetrics, kw_only=True):
    db_errors: dict[str, int]
    backup: BackupStats
    # db_proxy queries by where they were answered: "loop" (the loop's own reader) or
    # "readers" (passed on: a statement too slow for the loop, or one that could stall it).
    queries: dict[str, int]


class AssistantRoutes:
    """The handlers of assistant.sock over one open `Database`."""

    def __init__(self, db: Database, snapshots: Snapshotter) -> None:
        self.db = db
        self.snapshots = snapshots
        self.started = time.monotonic()
        self.pid = os.getpid()
        self.router = Router("assistantd", __version__)
        self.router.add("health", self.health, inline=True)
        self.router.add("db_proxy", self.db_proxy)
        self.router.add("db_proxy_transaction", self.db_proxy_transaction)
        durable = self.db.synchronous.upper() != "FULL"
        self.router.add("emit_event", self._emit_event_durable if durable else self.emit_event)
        self.router.add("emit_events", self._emit_events_durable if durable else self.emit_events)
        self.router.add("metrics", self.metrics, inline=True)
        self.router.add("backup", method_of(snapshots), thread=True, admin=True)

    def metrics(self, params: NoParams) -> AssistantMetrics:
        """Calls by method and outcome, their durations, connections and database errors
        (`pairctl metrics` prints them for Prometheus)."""
        return self.router.protocol_metrics(
            AssistantMetrics,
            db_errors=self.db.failure_counts(),
            backup=self.snapshots.stats,
            queries=self.db.query_counts(),
        )

    def health(self, params: NoParams) -> Health:
        """Liveness and identity; never touches the database, so it answers during long queries.

        `status` is "degraded" while writes fail for the database's own reason
        (full, unreachable, corrupt): `db.lastError` says which."""
        db = DbInfo(self.db.path, self.db.schema_version, self.db.write_health.last_error)
        return health_of(Health, pid=self.pid, started=self.started, db=db)

    def db_proxy(self, params: DbProxyParams) -> Deferred[QueryResult | RunResult | ExecResult]:
        """One statement (`query` from a reader, `run` in its own write transaction) or a script
        (`exec`, all or nothing), under the statement policy."""
        _check_statement(params.sql, params.bind)
        bind = bind_from_wire(params.bind)
        deadline = time.monotonic() + params.timeout_ms / 1000
        sql, max_rows, max_bytes = params.sql, params.max_rows, params.max_bytes
        if params.mode == "query":
            query = functools.partial(
                proxy.query, sql=sql, bind=bind, max_rows=max_rows, max_bytes=max_bytes
            )
            return self.db.read(query, sql, deadline)
        if params.mode == "run":
            run = functools.partial(
                proxy.run, sql=sql, bind=bind, max_rows=max_rows, max_bytes=max_bytes
            )
            return self.db.submit_write(run, deadline)
        if params.bind is not None:
            raise InvalidParams("exec takes no bind; use mode=run", path="$.bind")
        return self.db.submit_write(functools.partial(proxy.execute_script, sql=sql), deadline)

    def db_proxy_transaction(self, params: TransactionParams) -> Deferred[TransactionResult]:
        """Several statements in one write transaction: all applied or none.

        An unmet `requireChanges` rolls back and answers `ok: false`; an
        `idempotencyKey` already applied answers the stored result."""
        if not params.steps:
            raise InvalidParams("db_proxy_transaction needs at least one step", path="$.steps")
        if sum([len(step.sql) for step in params.steps]) > MAX_SQL_CHARS:
            raise InvalidParams(
                f"the steps hold more than {MAX_SQL_CHARS} characters of SQL", path="$.steps"
            )
        steps = []
        for index, step in enumerate(params.steps):
            _check_statement(step.sql, step.bind, index)
            steps.append(Step(step.sql, bind_from_wire(step.bind), step.require_changes))
        job = functools.partial(
            proxy.transaction,
            steps=steps,
            idempotency_key=params.idempotency_key,
            max_rows=params.max_rows,
            max_bytes=params.max_bytes,
        )
        return self.db.submit_write(job, time.monotonic() + params.timeout_ms / 1000)

    def emit_event(self, params: EmitEventParams) -> Deferred[EmitEventResult]:
        """Store an event once per id; a repeated id is accepted and reported as a duplicate."""
        logged = functools.partial(_one_stored, params, trace.current_or_new())
        return self.db.submit_write(_one_event(params)).map(logged)

    def emit_events(self, params: EmitEventsParams) -> Deferred[EmitEventsResult]:
        """Store 1..500 events in order in one transaction; ids already stored are skipped and
        listed in `duplicates`, so a batch delivered again is harmless. An invalid event
        refuses the whole call (`data.path` names it) and stores nothing."""
        logged = functools.partial(_all_stored, params, trace.current_or_new())
        return self.db.submit_write(_events(params)).map(logged)

    # Under --synchronous normal the events are made durable before they are acknowledged:
    # the gateway forgets what it was told is stored. Registered in place of the two above.
    async def _emit_event_durable(self, params: EmitEventParams) -> EmitEventResult:
        """Store an event once per id; a repeated id is accepted and reported as a duplicate."""
        return _one_stored(params, trace.current_or_new(), await self._stored(_one_event(params)))

    async def _emit_events_durable(self, params: EmitEventsParams) -> EmitEventsResult:
        """Store 1..500 events in order in one transaction; ids already stored are skipped and
        listed in `duplicates`, so a batch delivered again is harmless. An invalid event
        refuses the whole call (`data.path` names it) and stores nothing."""
        return _all_stored(params, trace.current_or_new(), await self._stored(_events(params)))

    async def _stored(self, job: Callable[[GuardedConn], T]) -> T:
        result = await self.db.write(job)
        await anyio.to_thread.run_sync(commits_durable, self.db.path)
        return result


def _one_event(params: EmitEventParams) -> Callable[[GuardedConn], EmitEventResult]:
    payload = msgspec.json.encode(params.payload).decode()
    return functools.partial(insert_event, event_id=params.id, kind=params.kind, payload=payload)


def _events(params: EmitEventsParams) -> Callable[[GuardedConn], EmitEventsResult]:
    events = [(e.id, e.kind, _encoder.encode(e.payload).decode()) for e in params.events]
    return functools.partial(insert_events, events=events)


def _one_stored(
    params: EmitEventParams, span: trace.Span, result: EmitEventResult
) -> EmitEventResult:
    _log_stored(params, span, result.duplicate)
    return result


def _all_stored(
    params: EmitEventsParams, span: trace.Span, result: EmitEventsResult
) -> EmitEventsResult:
    """Each event's line, of its own trace (the call's when it came without). An id sent
    twice in the call was stored at its first (`duplicates` lists it once more)."""
    stored = Counter(event.id for event in params.events)
    stored.subtract(result.duplicates)
    for event in params.events:
        own = trace.span_of(event.meta) or span
        _log_stored(event, own, stored[event.id] <= 0)
        stored[event.id] -= 1
    return result


def _log_stored(event: EmitEventParams, span: trace.Span, duplicate: bool) -> None:
    stored = "was stored already" if duplicate else "stored"
    log.info("event %s (%s) %s", event.id, event.kind, stored, extra={"span": span})


def _check_statement(sql: str, bind: Bind, step: int | None = None) -> None:
    """A statement's text and bind size; `step`: its index in a transaction's steps (the
    path is only spelled out for an answer: this runs per step)."""
    # SQLite would stop reading the text at a NUL: what ran would not be what was sent.
    if "\x00" in sql:
        raise InvalidParams("sql must not contain a NUL character", path=f"{_at(step)}.sql")
    if bind is not None and len(bind) > MAX_PARAMETERS:
        raise InvalidParams(
            f"bind holds more than {MAX_PARAMETERS} parameters", path=f"{_at(step)}.bind"
        )


def _at(step: int | None) -> str:
    return "$" if step is None else f"$.steps[{step}]"
