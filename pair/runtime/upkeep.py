"""Periodic database upkeep (sweeps) that a daemon runs beside serving."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import anyio
import apsw

from pair.runtime.sqlite import DatabaseFailure


async def run_periodically(
    what: str, task: Callable[[], Awaitable[None]], interval: float, log: logging.Logger
) -> None:
    """Run `task` now and then every `interval` seconds, until cancelled.

    A database error (a lock another process holds past the busy timeout, a
    full disk) skips that round with a warning: upkeep can always wait for
    the next one, and it must never take the daemon and its callers down.
    """
    while True:
        try:
            await task()
        except (apsw.Error, DatabaseFailure) as exc:
            log.warning("%s failed; trying again in %.0f s: %s", what, interval, exc)
        await anyio.sleep(interval)
