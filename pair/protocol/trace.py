"""W3C trace context across the hop: `params._meta.traceparent` in, `TRACE_ID` out.

A call may carry `params._meta` (PROTOCOL.md reserves it): `traceparent` and
`tracestate` as W3C Trace Context defines them. A daemon that is given one runs
the call as a new span of that trace (its parent the caller's span); its log
lines of the call carry `trace_id` and `span_id` (`TRACE_ID`, `SPAN_ID` in the
journal). A call given none gets a trace only where one is needed, when a line
must be followed later: a redemption, the event it queues, that event's
delivery and storing. Making one for every call would cost every `health` the
ids and a context switch for lines it never writes.

A malformed `traceparent` is `INVALID_PARAMS` at `$._meta.traceparent`, not a
silent new trace: our callers are programs whose authors want to hear of it.
Members of `_meta` other than these two are accepted and ignored (MCP puts its
own there).
"""

from __future__ import annotations

import contextvars
import logging
import random
from typing import Annotated

import msgspec
from msgspec import Meta, Struct

# The capability a daemon names in `pair.hello` when every method takes `params._meta`.
CAPABILITY = "params._meta"

# Version 00 exactly; a later version by its first four fields (W3C: parse what you
# know of a newer version). Trace and parent ids of all zeros are invalid.
_TRACEPARENT = (
    r"^(?:00-(?!0{32})[0-9a-f]{32}-(?!0{16})[0-9a-f]{16}-[0-9a-f]{2}"
    r"|(?!ff|00)[0-9a-f]{2}-(?!0{32})[0-9a-f]{32}-(?!0{16})[0-9a-f]{16}-[0-9a-f]{2}(?:-.*)?)\Z"
)
# What INVALID_PARAMS says of a traceparent that is not one (msgspec would show the regex).
TRACEPARENT_FORMAT = (
    "a W3C traceparent: 00-<32 hex digits: trace id>-<16 hex digits: parent id>-<2 hex"
    " digits: flags>, lower case, neither id all zeros"
)
# W3C's bound for tracestate (32 members of up to 256 characters fit).
TRACESTATE_CHARS = 512


class TraceMeta(Struct, omit_defaults=True):
    """`params._meta`: the caller's trace context; other members are ignored."""

    traceparent: Annotated[str, Meta(pattern=_TRACEPARENT, max_length=512)] | None = None
    tracestate: Annotated[str, Meta(max_length=TRACESTATE_CHARS)] | None = None


# A params' `_meta` as decoded: absent (UNSET), null, or the caller's trace context.
Traced = TraceMeta | None | msgspec.UnsetType


def new_span_id() -> str:
    return f"{_bits(64) or 1:016x}"


# Ids need to be unique, not secret: Python's generator (seeded from the kernel's at
# start) costs a tenth of a `getrandom` call, which measured 3 us here.
_bits = random.getrandbits


class Span:
    """One daemon's part of a trace: the trace, its own span id, the caller's span."""

    __slots__ = ("parent_id", "span_id", "state", "trace_id")

    def __init__(
        self, trace_id: str, parent_id: str | None = None, state: str | None = None
    ) -> None:
        self.trace_id = trace_id
        self.span_id = new_span_id()
        self.parent_id = parent_id
        self.state = state

    @classmethod
    def new(cls) -> Span:
        """The first span of a new trace."""
        return cls(f"{_bits(128) or 1:032x}")

    @classmethod
    def of(cls, meta: TraceMeta) -> Span:
        """Our span under the caller's (a new trace when it sent no `traceparent`)."""
        if meta.traceparent is None:
            return cls.new()
        _, trace_id, parent_id = meta.traceparent.split("-", 3)[:3]
        return cls(trace_id, parent_id, meta.tracestate)

    def child(self) -> Span:
        """A span under this one, for a call this one makes."""
        return Span(self.trace_id, self.span_id, self.state)

    @property
    def traceparent(self) -> str:
        # Sampled: both daemons write every traced line they make.
        return f"00-{self.trace_id}-{self.span_id}-01"

    def meta(self) -> dict[str, str]:
        """This span as the `_meta` of a call it makes."""
        if self.state is None:
            return {"traceparent": self.traceparent}
        return {"traceparent": self.traceparent, "tracestate": self.state}


_CURRENT: contextvars.ContextVar[Span | None] = contextvars.ContextVar("span", default=None)


def current() -> Span | None:
    """The span of the call this code runs in, if its caller gave a trace."""
    return _CURRENT.get()


def current_or_new() -> Span:
    """The call's span, or the first span of a new trace (a call given none that must be
    followed later)."""
    return _CURRENT.get() or Span.new()


def enter(span: Span) -> contextvars.Token[Span | None]:
    return _CURRENT.set(span)


def leave(token: contextvars.Token[Span | None]) -> None:
    _CURRENT.reset(token)


def span_of(meta: Traced) -> Span | None:
    """The span a call runs in from its params' `meta` (None: its caller gave none)."""
    return Span.of(meta) if type(meta) is TraceMeta else None


def record_span(record: logging.LogRecord) -> Span | None:
    """The span a log line belongs to: the one it names (`extra={"span": ...}`, for a line
    written outside its call: a job's callback, a delivery) or its call's."""
    span = record.__dict__.get("span")
    return span if type(span) is Span else _CURRENT.get()


def traced_params(params_type: type[Struct]) -> type[Struct]:
    """`params_type` that also takes `_meta` (as `.meta`), for decoding a call; itself when
    it declares `_meta` already (a method that reads it: `emit_events`'s events)."""
    fields = msgspec.structs.fields(params_type)
    if any(field.encode_name == "_meta" for field in fields):
        return params_type
    # UNSET when absent, so that a handler that answers with its params (an echo) does not
    # add `_meta` to them; a required field may follow `meta` only as a keyword.
    return msgspec.defstruct(
        params_type.__name__,
        [("meta", Traced, msgspec.field(default=msgspec.UNSET, name="_meta"))],
        bases=(params_type,),
        kw_only=True,
        module=params_type.__module__,
    )
