"""The gateway's only way to the assistant: one strict call over one persistent connection.

`call_assistant` returns a result or raises `IpcHandlerError` (the assistant
answered an error: a SQL failure is that, never "not ready") or
`IpcTransportError` (no answer). There is no lenient variant. The link's
state (connected / down / unknown, since when, last error) is what `health`
reports, updated by every call without extra traffic.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import anyio

from pair.protocol.client import Client
from pair.protocol.errors import IpcHandlerError, IpcTransportError

log = logging.getLogger("gateway.link")

HEALTH_TIMEOUT = 1.0
DB_TIMEOUT = 10.0
CALL_TIMEOUT = 10.0
WAIT_BACKOFF_START = 0.05
WAIT_BACKOFF_CAP = 2.0


class LinkState:
    def __init__(self) -> None:
        self.state = "unknown"
        self.since = int(time.time() * 1000)
        self.last_error: str | None = None

    def update(self, state: str, error: str | None = None) -> None:
        if error is not None:
            self.last_error = error
        if state != self.state:
            self.state = state
            self.since = int(time.time() * 1000)
            if state == "down":
                log.warning("assistant link down: %s", error)
            else:
                log.info("assistant link %s", state)


class AssistantLink:
    """The strict client to assistant.sock, and what the gateway knows of the link."""

    def __init__(self, socket_path: str) -> None:
        self.socket_path = socket_path
        self.client = Client(socket_path, timeout=CALL_TIMEOUT, connect_timeout=HEALTH_TIMEOUT)
        self.status = LinkState()

    async def call_assistant(
        self, method: str, params: object = None, *, timeout: float = CALL_TIMEOUT
    ) -> Any:
        """A result, or `IpcHandlerError`, or `IpcTransportError(sent=...)`."""
        try:
            result = await self.client.call(method, params, timeout=timeout)
        except IpcTransportError as exc:
            self.status.update("down", exc.message)
            raise
        except IpcHandlerError:
            self.status.update("connected")
            raise
        self.status.update("connected")
        return result

    async def assistant_db_query(self, sql: str, bind: object = None) -> Any:
        params = {"sql": sql, "mode": "query", "bind": bind}
        return await self.call_assistant("db_proxy", params, timeout=DB_TIMEOUT)

    async def assistant_db_run(self, sql: str, bind: object = None) -> Any:
        params = {"sql": sql, "mode": "run", "bind": bind}
        return await self.call_assistant("db_proxy", params, timeout=DB_TIMEOUT)

    async def assistant_db_exec(self, sql: str) -> Any:
        return await self.call_assistant(
            "db_proxy", {"sql": sql, "mode": "exec"}, timeout=DB_TIMEOUT
        )

    async def assistant_db_transaction(
        self, steps: list[dict[str, Any]], idempotency_key: str | None = None
    ) -> Any:
        params: dict[str, Any] = {"steps": steps}
        if idempotency_key is not None:
            params["idempotencyKey"] = idempotency_key
        return await self.call_assistant("db_proxy_transaction", params, timeout=DB_TIMEOUT)

    async def wait_until_up(self) -> None:
        """Poll `health` with capped backoff until the assistant answers.

        Transport errors are the assistant being away: retried. A handler
        error from `health` is a bug over there: reported in the link state
        and the log, and retried too, never a crash.
        """
        delay = WAIT_BACKOFF_START
        while True:
            try:
                await self.call_assistant("health", timeout=HEALTH_TIMEOUT)
            except IpcTransportError:
                pass
            except IpcHandlerError as exc:
                self.status.update("connected", f"health answered {exc.code}: {exc.message}")
                log.error("assistant health failed: %s %s", exc.code, exc.message)
            else:
                return
            await anyio.sleep(delay)
            delay = min(delay * 2, WAIT_BACKOFF_CAP)

    async def aclose(self) -> None:
        await self.client.aclose()
