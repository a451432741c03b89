"""The gateway's only way to the assistant: one strict call over one persistent connection.

`call_assistant` returns a result or raises `IpcHandlerError` (the assistant
answered an error: a SQL failure is that, never "not ready") or
`IpcTransportError` (no answer). There is no lenient variant. The link's
state (connected / down / incompatible / unknown, since when, last error) and
what the assistant said of itself (`pair.hello` on every connect: its
release, protocol range and capabilities) are what `health` reports, updated
by every call without extra traffic.

The link is where the assistant's words enter the gateway: whatever it
answers becomes a result, an `IpcHandlerError` whose message is quoted and
cut, or an `IpcTransportError` (`IncompatiblePeer` for a handshake no release
gives), never another exception; and the link's log lines quote what they
carry, so no answer can forge a line or write to a terminal reading the log.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from typing import Any

import anyio

from pair import __version__
from pair.protocol import trace
from pair.protocol.calls import loggable
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
    refused,
)

log = logging.getLogger("gateway.link")

HEALTH_TIMEOUT = 1.0
DB_TIMEOUT = 10.0
CALL_TIMEOUT = 10.0
WAIT_BACKOFF_START = 0.05
WAIT_BACKOFF_CAP = 2.0
HELLO = {"product": PRODUCT, "version": __version__, "protocol": PROTOCOL}
# How much of a message a log line of the link carries (a refusal says which side to
# upgrade at its end), and of the assistant's capabilities.
LOGGED_MESSAGE_CHARS = 400
LOGGED_CAPABILITIES_CHARS = 1000


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
                log.warning("assistant link %s: %s", state, loggable(error, LOGGED_MESSAGE_CHARS))
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
            prepare=self._traced,
        )
        self.status = LinkState()
        # What the assistant said of itself on the last connection the gateway kept.
        self.peer: Peer | None = None

    async def _hello(self, call: Handshake) -> None:
        """The handshake of each new connection: who the assistant is and what it can do.
        An assistant before `pair.hello` (0.1.0) is read from its `rpc.discover`."""
        try:
            answer = await call("pair.hello", HELLO, HEALTH_TIMEOUT)
        except IpcHandlerError as exc:
            peer = await self._hello_refused(call, exc)
        else:
            peer = _read(peer_of, answer, "its pair.hello answer")
        problem = refusal(PROTOCOL, peer, "gateway")
        if problem is not None:
            raise IncompatiblePeer(problem)
        if self.peer != peer:
            _log_peer(peer)
        self.peer = peer

    async def _hello_refused(self, call: Handshake, exc: IpcHandlerError) -> Peer:
        """`pair.hello` answered an error: a release before it (0.1.0), read from its
        `rpc.discover`; else an `IncompatiblePeer`, never a handler error (delivery would
        take it for a refusal of its events)."""
        if exc.code == "METHOD_NOT_FOUND":
            return await self._before_hello(call)
        if exc.code == "PROTOCOL_UNSUPPORTED":
            peer = _read(peer_refusing, exc.data, "PROTOCOL_UNSUPPORTED's data")
            raise IncompatiblePeer(refused(PROTOCOL, peer, "gateway"))
        raise IncompatiblePeer(f"pair.hello answered {_heard(exc)}")

    async def _before_hello(self, call: Handshake) -> Peer:
        """A release before `pair.hello` (0.1.0), read from its `rpc.discover`."""
        try:
            document = await call("rpc.discover", None, HEALTH_TIMEOUT)
        except IpcHandlerError as exc:
            raise IncompatiblePeer(f"rpc.discover answered {_heard(exc)}") from None
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

    def _traced(self, params: dict[str, Any] | None) -> dict[str, Any] | None:
        """`params` for the connection they go on (`Client.prepare`). To an assistant that
        takes it, the call carries `_meta`: a span under the current one (a new trace when
        there is none) unless `params` has its own; to one that does not (0.1.0), no
        `_meta` goes, not even the events' of `emit_events`."""
        if self.peer is None or not self.peer.has(trace.CAPABILITY):
            return _without_meta(params)
        if params is not None and "_meta" in params:
            return params
        span = trace.current()
        span = trace.Span.new() if span is None else span.child()
        return {**(params or {}), "_meta": span.meta()}

    async def call_assistant(
        self, method: str, params: dict[str, Any] | None = None, *, timeout: float = CALL_TIMEOUT
    ) -> Any:
        """A result, or `IpcHandlerError`, or `IpcTransportError(sent=...)`."""
        try:
            result = await self.client.call(method, params, timeout=timeout)
        except IpcTransportError as exc:
            self._lost(exc)
            raise
        except IpcHandlerError as exc:
            self.status.update("connected")
            raise _heard(exc) from None
        self.status.update("connected")
        return result

    async def assistant_db_query(self, sql: str, bind: object = None) -> Any:
        params = {"sql": sql, "mode": "query", "bind": bind}
        return await self.call_assistant("db_proxy", params, timeout=DB_TIMEOUT)

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
                self.status.update("connected", f"health answered {exc}")
                log.error("assistant health failed: %s", exc)
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
        peer = reader(answer)
    except (ValueError, AttributeError, KeyError, TypeError, RecursionError) as exc:
        raise IncompatiblePeer(f"the assistant's {what} cannot be read: {exc}") from None
    # Its name and release go into health, refusals and the log: quoted unless plain.
    return dataclasses.replace(peer, daemon=_shown(peer.daemon), version=_shown(peer.version))


def _shown(text: str) -> str:
    return text if text.isprintable() else loggable(text)


def _heard(exc: IpcHandlerError) -> IpcHandlerError:
    """The assistant's error as the gateway may report it (health, outbox_dead, logs):
    its message quoted and cut; its code is a code's name already (`handler_error`)."""
    quoted = loggable(exc.message, LOGGED_MESSAGE_CHARS)
    return IpcHandlerError(quoted, exc.status_code, exc.code, exc.data, rpc_code=exc.rpc_code)


def _without_meta(params: dict[str, Any] | None) -> dict[str, Any] | None:
    """`params` without `_meta`: the call's, and its events' (`emit_events`)."""
    if params is None:
        return None
    kept = {key: value for key, value in params.items() if key != "_meta"}
    events = kept.get("events")
    if isinstance(events, list):
        kept["events"] = [_without_meta(event) for event in events]
    return kept


def _log_peer(peer: Peer) -> None:
    capabilities = loggable(", ".join(sorted(peer.capabilities)), LOGGED_CAPABILITIES_CHARS)
    dropped = f" ({peer.dropped} more not kept)" if peer.dropped else ""
    log.info("assistant is %s; capabilities: %s%s", loggable(str(peer)), capabilities, dropped)
