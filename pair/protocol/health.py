"""The parts of `health` both daemons answer alike."""

from __future__ import annotations

import time

from msgspec import Struct


class DbInfo(Struct, rename="camel"):
    path: str
    schema_version: int
    last_error: str | None = None


class Health(Struct, rename="camel", kw_only=True):
    """What every daemon's `health` answers; a daemon's own result adds to it."""

    status: str
    version: str
    pid: int
    uptime_ms: int
    db: DbInfo


def uptime_ms(started: float) -> int:
    """Milliseconds since `started` (a `time.monotonic()` reading)."""
    return int((time.monotonic() - started) * 1000)
