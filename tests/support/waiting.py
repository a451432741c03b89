"""Waiting for a condition the daemons reach on their own (a link coming up, an outbox draining)."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

import anyio

DEFAULT_TIMEOUT = 20.0


def until(check: Callable[[], bool], what: str, timeout: float = DEFAULT_TIMEOUT) -> None:
    """Poll `check` from a synchronous test until it holds; fail naming `what`."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout:.0f} s: {what}")
        time.sleep(0.05)


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
    from pair.protocol.client import Client

    async def reached() -> bool:
        async with Client(socket_path) as client:
            return check(await client.call("health"))

    await eventually(reached, timeout)


async def dispatched(client: Any, probe: str = "health") -> None:
    """Return once the daemon has read every call this client started before this one.

    Calls started with `start_soon` write their frame in their first step, and
    asyncio runs the ready tasks in order, so one yield lets them all write;
    a daemon reads one connection's frames in order, so the answer to `probe`
    sent after them on the same connection means theirs are in flight.
    """
    await anyio.sleep(0)
    await client.call(probe)


def outbox_drained(health: dict[str, Any]) -> bool:
    return bool(health["outbox"]["pending"] == 0)


def migrations_done(health: dict[str, Any]) -> bool:
    return bool(health["migrations"]["pending"] == 0)
