"""What a server counts of its calls and connections (SPEC.md section 10), in process.

Each method's counts live on its `Method` (no lookup by name per call);
calls that name no known method are counted under `UNKNOWN_METHOD`, so a
caller cannot grow the label set. The `metrics` method of each daemon
answers `snapshot()` of these counts with what the daemon adds of its own;
`pairctl metrics` turns that into Prometheus' text format.
"""

from __future__ import annotations

from bisect import bisect_left
from collections import Counter
from collections.abc import Callable
from typing import Any, TypeVar

from msgspec import Struct

# Upper bounds (seconds) of the duration histogram's buckets; a last one is +Inf.
DURATION_BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
)
UNKNOWN_METHOD = "(unknown)"
OK = "ok"


class MethodCounts:
    """One method's calls: by outcome (`ok` or the answer's errorCode) and by duration.

    `observe`, when set, also sees each answer (result or error code): a daemon
    counting something of its own by outcome (the gateway's redemptions).
    """

    __slots__ = ("buckets", "errors", "observe", "ok", "seconds")

    def __init__(self) -> None:
        self.observe: Callable[[Any, str | None], None] | None = None
        self.ok = 0
        self.errors: Counter[str] = Counter()
        self.buckets = [0] * (len(DURATION_BUCKETS) + 1)
        self.seconds = 0.0

    def record(self, seconds: float, error_code: str | None) -> None:
        if error_code is None:
            self.ok += 1
        else:
            self.errors[error_code] += 1
        self.buckets[bisect_left(DURATION_BUCKETS, seconds)] += 1
        self.seconds += seconds


class CallCount(Struct, forbid_unknown_fields=True):
    method: str
    outcome: str
    count: int


class CallDurations(Struct, forbid_unknown_fields=True, rename="camel"):
    """A method's duration histogram: `counts[i]` calls took at most `bounds[i]` seconds and
    more than the bound before it (not cumulative); the last count is past every bound."""

    method: str
    bounds: list[float]
    counts: list[int]
    sum_seconds: float


class Connections(Struct, forbid_unknown_fields=True):
    open: int
    refused: dict[str, int]


class ProtocolMetrics(Struct, forbid_unknown_fields=True, rename="camel", kw_only=True):
    """The part of a daemon's `metrics` answer every daemon has."""

    calls: list[CallCount]
    call_durations: list[CallDurations]
    connections: Connections


class ServerCounts:
    """A server's counters: connections refused by reason, and its open connections."""

    __slots__ = ("open", "refused")

    def __init__(self) -> None:
        self.open = 0
        self.refused: Counter[str] = Counter({"forbidden": 0, "limit": 0})


M = TypeVar("M", bound=ProtocolMetrics)


def snapshot(
    methods: dict[str, MethodCounts], server: ServerCounts, kind: type[M], **extra: Any
) -> M:
    """The counts as `kind`: `ProtocolMetrics` or a daemon's subclass of it, whose own
    fields are `extra`."""
    calls = []
    durations = []
    for name, counts in sorted(methods.items()):
        total = counts.ok + sum(counts.errors.values())
        if not total:
            continue
        if counts.ok:
            calls.append(CallCount(name, OK, counts.ok))
        calls.extend(CallCount(name, code, n) for code, n in sorted(counts.errors.items()))
        durations.append(
            CallDurations(name, list(DURATION_BUCKETS), list(counts.buckets), counts.seconds)
        )
    return kind(
        calls=calls,
        call_durations=durations,
        connections=Connections(server.open, dict(server.refused)),
        **extra,
    )
