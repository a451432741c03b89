"""The gateway's only way to the assistant: one strict call over one persistent connection.

`call_assistant` returns a result or raises `IpcHandlerError` (the assistant
answered an error: a SQL failure is that, never "not ready") or
`IpcTransportError` (no answer). There is no lenient variant. The link's
state (connected / down / incompatible / unknown, since when, last error) and
what the assistant said of itself (`pair.hello` on every connect: its
release, protocol range and capabilities) are what `health` reports, updated
by every call without extra traffic.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import anyio
import msgspec

from pair.protocol import __version__
from pair.protocol.client import Client, Handshake
from pair.protocol.errors import IncompatiblePeer, IpcHandlerError, IpcTransportError
from pair.protocol.hello import (
    PRODUCT,
    PROTOCOL,
    Peer,
    peer_before_hello,
    peer_of,
    peer_refusing,
    refusal,
)

log = logging.getLogger("gateway.link")

HEALTH_TIMEOUT = 1.0
DB_TIMEOUT = 10.0
CALL_TIMEOUT = 10.0
WAIT_BACKOFF_START = 0.05
WAIT_BACKOFF_CAP = 2.0
HELLO = {"product": PRODUCT, "version": __version__, "protocol": PROTOCOL}


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
            if state in ("down", "incompatible"):
                log.warning("assistant link %s: %s", state, error)
            else:
                log.info("assistant link %s", state)


class AssistantLink:
    """The strict client to assistant.sock, and what the gateway knows of the link."""

    def __init__(self, socket_path: str) -> None:
        self.socket_path = socket_path
        self.client = Client(
            socket_path,
            timeout=CALL_TIMEOUT,
            connect_timeout=HEALTH_TIMEOUT,
            on_connect=self._hello,
        )
        self.status = LinkState()
        # What the assistant said of itself on the last connection the gateway kept.
        self.peer: Peer | None = None

    async def _hello(self, call: Handshake) -> None:
        """The handshake of each new connection: who the assistant is and what it can do.
        An assistant before `pair.hello` (0.1.0) is read from its `rpc.discover`."""
        try:
            answer = await call("pair.hello", HELLO, HEALTH_TIMEOUT)
            peer = _read(peer_of, answer, "its pair.hello answer")
        except IpcHandlerError as exc:
            if exc.code == "METHOD_NOT_FOUND":
                peer = await self._before_hello(call)
            elif exc.code == "PROTOCOL_UNSUPPORTED":
                peer = _read(peer_refusing, exc.data, "PROTOCOL_UNSUPPORTED's data")
            else:
                # Never a handler error to the caller: delivery would take it for a
                # refusal of its events.
                raise IncompatiblePeer(f"pair.hello answered {exc.code}: {exc.message}") from exc
        problem = refusal(PROTOCOL, peer, "gateway")
        if problem is not None:
            raise IncompatiblePeer(problem)
        if self.peer != peer:
            log.info(
                "assistant is %s; capabilities: %s", peer, ", ".join(sorted(peer.capabilities))
            )
        self.peer = peer

    async def _before_hello(self, call: Handshake) -> Peer:
        """A release before `pair.hello` (0.1.0), read from its `rpc.discover`."""
        try:
            document = await call("rpc.discover", None, HEALTH_TIMEOUT)
        except IpcHandlerError as exc:
            raise IncompatiblePeer(f"rpc.discover answered {exc.code}: {exc.message}") from exc
        return _read(peer_before_hello, document, "its rpc.discover answer")

    async def can(self, capability: str) -> bool:
        """Whether the assistant has `capability` (connecting first to learn it)."""
        try:
            await self.client.connect()
        except IpcTransportError as exc:
            self._lost(exc)
            raise
        return self.peer is not None and self.peer.has(capability)

    def _lost(self, exc: IpcTransportError) -> None:
        state = "incompatible" if isinstance(exc, IncompatiblePeer) else "down"
        self.status.update(state, exc.message)

    async def call_assistant(
        self, method: str, params: object = None, *, timeout: float = CALL_TIMEOUT
    ) -> Any:
        """A result, or `IpcHandlerError`, or `IpcTransportError(sent=...)`."""
        try:
            result = await self.client.call(method, params, timeout=timeout)
        except IpcTransportError as exc:
            self._lost(exc)
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


def _read(reader: Callable[[Any], Peer], answer: Any, what: str) -> Peer:
    """The peer `answer` describes; an answer no release of ours gives is an
    `IncompatiblePeer`, never an error that would end delivery."""
    try:
        return reader(answer)
    except (msgspec.ValidationError, AttributeError, KeyError, TypeError, ValueError) as exc:
        raise IncompatiblePeer(f"the assistant's {what} cannot be read: {exc}") from exc
