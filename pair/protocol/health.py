"""The parts of `health` both daemons answer alike."""

from __future__ import annotations

import time
from typing import Any, TypeVar

from msgspec import Struct

from pair import __version__


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


H = TypeVar("H", bound=Health)


def health_of(kind: type[H], *, pid: int, started: float, db: DbInfo, **extra: Any) -> H:
    """`kind` (`Health`, or a daemon's own result) with what every daemon answers alike:
    "degraded" while its database's writes fail for their own reason (`db.lastError`
    says which), else "ok"; its release, pid and uptime. `extra`: the daemon's own fields."""
    status = "ok" if db.last_error is None else "degraded"
    return kind(
        status=status, version=__version__, pid=pid, uptime_ms=uptime_ms(started), db=db, **extra
    )
