"""Calls to the daemons as the tests make them, and the error a call must end in."""

from __future__ import annotations

from typing import Any

import pytest

from pair.protocol.client import Client
from pair.protocol.errors import IpcHandlerError


async def sql(client: Client, statement: str, mode: str = "run", **extra: Any) -> Any:
    """`db_proxy`: one statement (`run`), a query or a script (`exec`)."""
    return await client.call("db_proxy", {"sql": statement, "mode": mode, **extra})


async def rows(client: Client, statement: str, **extra: Any) -> list[dict[str, Any]]:
    result = await sql(client, statement, "query", **extra)
    return result["rows"]  # type: ignore[no-any-return]


async def tx(client: Client, *steps: dict[str, Any], **extra: Any) -> Any:
    """`db_proxy_transaction` of these steps."""
    return await client.call("db_proxy_transaction", {"steps": list(steps), **extra})


async def failure(call: Any) -> IpcHandlerError:
    """The error the awaited call must fail with."""
    with pytest.raises(IpcHandlerError) as caught:
        await call
    return caught.value
