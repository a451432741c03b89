"""Waiting for a condition the daemons reach on their own (a link coming up, an outbox draining)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import anyio

DEFAULT_TIMEOUT = 20.0


async def eventually(
    check: Callable[[], Awaitable[bool]], timeout: float = DEFAULT_TIMEOUT, what: str = ""
) -> None:
    """Poll `check` until it holds; fail after `timeout` seconds."""
    with anyio.fail_after(timeout):
        while not await check():
            await anyio.sleep(0.05)


async def gateway_health_reaches(
    socket_path: str, check: Callable[[dict[str, Any]], bool], timeout: float = DEFAULT_TIMEOUT
) -> None:
    """Poll the gateway's `health` until `check` holds for it (its outbox drained, ...)."""
    from protocol.client import Client

    async def reached() -> bool:
        async with Client(socket_path) as client:
            return check(await client.call("health"))

    await eventually(reached, timeout)


def outbox_drained(health: dict[str, Any]) -> bool:
    return bool(health["outbox"]["pending"] == 0)


def migrations_done(health: dict[str, Any]) -> bool:
    return bool(health["migrations"]["pending"] == 0)
