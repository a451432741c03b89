"""Waiting for a condition the daemons reach on their own (a link coming up, an outbox draining)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import anyio

DEFAULT_TIMEOUT = 20.0


async def eventually(
    check: Callable[[], Awaitable[bool]], timeout: float = DEFAULT_TIMEOUT, what: str = ""
) -> None:
    """Poll `check` until it holds; fail after `timeout` seconds."""
    with anyio.fail_after(timeout):
        while not await check():
            await anyio.sleep(0.05)
