"""The strict client: one persistent multiplexed connection, three possible endings per call.

A call returns its result, raises `IpcHandlerError` (the peer answered an
error object) or raises `IpcTransportError` (no answer was obtained; `sent`
says whether the request reached the socket). There is no lenient variant.

The connection opens lazily on the first call and again after a failure.
When it drops, every pending call fails at once with `sent=True`.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import math
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar, overload

import anyio
import msgspec
from msgspec import UNSET

from pair.protocol.answers import handler_error, result_of
from pair.protocol.calls import loggable
from pair.protocol.client_connection import ClientConnection
from pair.protocol.errors import IpcHandlerError, IpcTransportError
from pair.protocol.framing import DEFAULT_MAX_FRAME_BYTES, encode_frame_of
from pair.protocol.messages import ClientResponse, is_batch

T = TypeVar("T")

DEFAULT_CALL_TIMEOUT = 30.0
DEFAULT_CONNECT_TIMEOUT = 5.0

log = logging.getLogger("protocol.client")

_response_decoder = msgspec.json.Decoder(ClientResponse)
_batch_response_decoder = msgspec.json.Decoder(list[ClientResponse])


# A call waiting for its answer: its future, the connection it was sent on, its
# deadline (loop time), and the method and timeout its expiry message names. A
# tuple, unpacked by name where read: a class cost the client 0.13 us a call.
_Pending = tuple[asyncio.Future[ClientResponse], "ClientConnection", float, str, float | None]


class _Call(msgspec.Struct, omit_defaults=True, gc=False):
    jsonrpc: str
    method: str
    id: int | msgspec.UnsetType = UNSET
    params: Any = UNSET


@dataclass(frozen=True, slots=True)
class BatchCall:
    """One member of a batch; `notify` members get no answer."""

    method: str
    params: object = None
    notify: bool = False


# What `Client.on_connect` is given: `call(method, params, timeout)` on the new connection.
Handshake = Callable[..., Awaitable[Any]]


class Client:
    """A strict JSON-RPC client for one Unix socket path."""

    def __init__(
        self,
        path: str,
        *,
        timeout: float = DEFAULT_CALL_TIMEOUT,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
        max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
        on_connect: Callable[[Handshake], Awaitable[None]] | None = None,
        prepare: Callable[[Any], Any] | None = None,
    ) -> None:
        self.path = path
        # Run on each new connection before any other call goes out on it (a handshake:
        # `pair.hello`), with a way to call on that connection only; what it raises
        # fails the calls waiting for the connection, and the connection is closed.
        self.on_connect = on_connect
        # What `call` sends in place of the params it is given, decided once the
        # connection it goes on is open and its handshake done (the gateway adds `_meta`
        # for an assistant whose `pair.hello` named the capability).
        self.prepare = prepare
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self.max_frame_bytes = max_frame_bytes
        self._protocol: ClientConnection | None = None
        self._connect_lock = anyio.Lock()
        self._pending: dict[int, _Pending] = {}
        self._ids = itertools.count(1)
        # One timer for every pending call, armed at the earliest deadline: a
        # timer per call cost about a fifth of the client's CPU per call.
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = math.inf
        self._timer_loop: asyncio.AbstractEventLoop | None = None

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    @overload
    async def call(
        self, method: str, params: object = None, *, timeout: float | None = None
    ) -> Any: ...

    @overload
    async def call(
        self,
        method: str,
        params: object = None,
        *,
        timeout: float | None = None,
        result_type: type[T],
    ) -> T: ...

    async def call(
        self,
        method: str,
        params: object = None,
        *,
        timeout: float | None = None,
        result_type: Any = None,
    ) -> Any:
        """Call `method`; the result (decoded as `result_type` when given) or an Ipc error."""
        request_id = next(self._ids)
        loop = asyncio.get_running_loop()
        protocol = self._protocol
        if protocol is None or protocol.transport is None or protocol.transport.is_closing():
            protocol = await self._writable_protocol()
        # Encoded for the connection it is written to, with no await between: `prepare`
        # sees what that connection's handshake learnt.
        if self.prepare is not None:
            params = self.prepare(params)
        frame = encode_frame_of(_Call("2.0", method, request_id, _params(params)))
        future = loop.create_future()
        deadline = loop.time() + (self.timeout if timeout is None else timeout)
        self._pending[request_id] = (future, protocol, deadline, method, timeout)
        self._expire_at(deadline, loop)
        try:
            await self._write(protocol, frame, timeout)
            response = await future
        finally:
            del self._pending[request_id]
            _settled(future)
        return result_of(response, result_type)

    async def notify(self, method: str, params: object = None) -> None:
        """Send a notification: executed by the peer, never answered."""
        frame = encode_frame_of(_Call("2.0", method, params=_params(params)))
        await self._write(await self._writable_protocol(), frame, None)

    async def batch(
        self, calls: Sequence[BatchCall], *, timeout: float | None = None
    ) -> list[Any | IpcHandlerError]:
        """Send `calls` as one batch frame; per call, its result or its `IpcHandlerError`.

        Notifications are left out of the returned list. An error answered for
        the batch as a whole (too large) raises `IpcHandlerError`; a transport
        failure raises `IpcTransportError`.
        """
        if not calls:
            raise ValueError("a batch needs at least one call")
        loop = asyncio.get_running_loop()
        members: list[_Call] = []
        futures: list[asyncio.Future[ClientResponse]] = []
        ids: list[int] = []
        for call in calls:
            if call.notify:
                members.append(_Call("2.0", call.method, params=_params(call.params)))
                continue
            request_id = next(self._ids)
            ids.append(request_id)
            futures.append(loop.create_future())
            members.append(_Call("2.0", call.method, request_id, _params(call.params)))
        frame = encode_frame_of(members)
        protocol = await self._writable_protocol()
        deadline = loop.time() + (self.timeout if timeout is None else timeout)
        for request_id, future in zip(ids, futures, strict=True):
            self._pending[request_id] = (future, protocol, deadline, "batch", timeout)
        self._expire_at(deadline, loop)
        if ids:
            protocol.batches.append(ids)
        try:
            await self._write(protocol, frame, timeout)
            results: list[Any | IpcHandlerError] = []
            for future in futures:
                response = await future
                try:
                    results.append(result_of(response, None))
                except IpcHandlerError as exc:
                    results.append(exc)
            return results
        finally:
            for request_id in ids:
                del self._pending[request_id]
            for future in futures:
                _settled(future)
            if ids in protocol.batches:
                protocol.batches.remove(ids)

    def peer_uid(self) -> int:
        """The uid of the process at the other end of the open connection, as the kernel
        says (SO_PEERCRED): who answered, whatever owns the socket's path."""
        protocol = self._protocol
        if protocol is None or protocol.transport is None or protocol.transport.is_closing():
            raise IpcTransportError(f"{self.path}: not connected", sent=False, path=self.path)
        return protocol.peer_uid()

    async def aclose(self) -> None:
        """Close the connection; pending calls fail with `IpcTransportError`."""
        protocol = self._protocol
        if protocol is not None and protocol.transport is not None:
            protocol.transport.close()
            with anyio.move_on_after(1), anyio.CancelScope(shield=True):
                await protocol.lost

    # -- internals --------------------------------------------------------

    async def _writable_protocol(self) -> ClientConnection:
        """The connection to write on, opened (again) when there is none or it is closing."""
        protocol = self._protocol or await self._connect()
        transport = protocol.transport
        if transport is None or transport.is_closing():
            # The peer is closing this connection (a drain): nothing was sent
            # on it, so a fresh connection is as good.
            if self._protocol is protocol:
                self._protocol = None
            protocol = await self._connect()
            transport = protocol.transport
        if transport is None or transport.is_closing():
            raise IpcTransportError(f"connection to {self.path} is closed", sent=False)
        return protocol

    async def _write(self, protocol: ClientConnection, frame: bytes, timeout: float | None) -> None:
        """Write `frame`, then wait while the peer is not reading, up to the timeout."""
        assert protocol.transport is not None
        protocol.transport.write(frame)
        if protocol.can_write.is_set():
            return
        try:
            with anyio.fail_after(timeout or self.timeout):
                await protocol.can_write.wait()
        except TimeoutError as exc:
            raise IpcTransportError(
                f"{self.path}: the peer stopped reading; the request may be partly sent",
                sent=True,
            ) from exc

    def _expire_at(self, deadline: float, loop: asyncio.AbstractEventLoop) -> None:
        if loop is not self._timer_loop:
            # A client used from a new loop: the old loop's timer will never fire.
            self._timer, self._timer_at, self._timer_loop = None, math.inf, loop
        if deadline >= self._timer_at:
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = deadline
        self._timer = loop.call_at(deadline, self._expire)

    def _expire(self) -> None:
        """Fail the calls past their deadline; re-arm for the earliest one left."""
        self._timer = None
        self._timer_at = math.inf
        loop = asyncio.get_running_loop()
        now = loop.time()
        earliest = math.inf
        for future, _protocol, deadline, method, timeout in self._pending.values():
            if future.done():
                continue
            if deadline <= now:
                limit = self.timeout if timeout is None else timeout
                future.set_exception(
                    IpcTransportError(f"{method}: no answer within {limit:g}s", sent=True)
                )
            elif deadline < earliest:
                earliest = deadline
        if earliest < math.inf:
            # uvloop's clock moves in whole milliseconds: a timer for a deadline
            # within the current one would fire again at once, and again.
            self._expire_at(max(earliest, now + 0.001), loop)

    async def connect(self) -> None:
        """Connect now (and run `on_connect`) unless connected."""
        await self._writable_protocol()

    async def _connect(self) -> ClientConnection:
        async with self._connect_lock:
            if self._protocol is not None:
                return self._protocol
            loop = asyncio.get_running_loop()
            try:
                with anyio.fail_after(self.connect_timeout):
                    _, protocol = await loop.create_unix_connection(self._new_protocol, self.path)
            except (OSError, TimeoutError) as exc:
                raise IpcTransportError(
                    f"cannot connect to {self.path}: {_describe(exc)}", sent=False, path=self.path
                ) from exc
            if self.on_connect is not None:
                try:
                    await self.on_connect(functools.partial(self._call_on, protocol))
                except BaseException:
                    if protocol.transport is not None:
                        protocol.transport.close()
                    raise
            self._protocol = protocol
            return protocol

    async def _call_on(
        self, protocol: ClientConnection, method: str, params: object = None, timeout: float = 5.0
    ) -> Any:
        """`call` on `protocol` alone, never another connection (the handshake's). Kept
        apart from `call`, whose fast path would pay a coroutine a call to share it."""
        transport = protocol.transport
        if transport is None or transport.is_closing():
            raise IpcTransportError(f"{self.path}: closed during the handshake", sent=False)
        request_id = next(self._ids)
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        deadline = loop.time() + timeout
        self._pending[request_id] = (future, protocol, deadline, method, timeout)
        self._expire_at(deadline, loop)
        try:
            await self._write(
                protocol,
                encode_frame_of(_Call("2.0", method, request_id, _params(params))),
                timeout,
            )
            response = await future
        finally:
            del self._pending[request_id]
            _settled(future)
        return result_of(response, None)

    def _new_protocol(self) -> ClientConnection:
        return ClientConnection(self.max_frame_bytes, self._on_frame, self._fail_connection)

    def _on_frame(self, protocol: ClientConnection, body: bytes) -> None:
        if is_batch(body):
            for response in _batch_response_decoder.decode(body):
                self._resolve(protocol, response)
        else:
            self._resolve(protocol, _response_decoder.decode(body))

    def _resolve(self, protocol: ClientConnection, response: ClientResponse) -> None:
        if isinstance(response.id, int):
            pending = self._pending.get(response.id)
            if pending is not None:
                future = pending[0]
                if not future.done():
                    future.set_result(response)
            return
        if response.error is UNSET:
            log.warning("answer with unknown id %s ignored", loggable(response.id))
            return
        # An error with no id answers a whole batch (too large) or the connection
        # itself (FORBIDDEN, too many connections, a bad frame). The server
        # refuses a batch the moment it reads it, before answering any batch
        # still running, so the newest batch is the likely one; else every call.
        if protocol.batches:
            self._fail(protocol.batches.pop(), handler_error(response.error))
        else:
            self._fail(self._ids_on(protocol), handler_error(response.error))

    def _ids_on(self, protocol: ClientConnection) -> list[int]:
        return [key for key, (_, on, *_) in self._pending.items() if on is protocol]

    def _fail(self, ids: list[int], error: Exception) -> None:
        for request_id in ids:
            pending = self._pending.get(request_id)
            if pending is not None and not pending[0].done():
                pending[0].set_exception(error)

    def _fail_connection(self, protocol: ClientConnection, reason: str) -> None:
        if protocol.transport is not None:
            protocol.transport.abort()
        if self._protocol is protocol:
            self._protocol = None
        self._fail(self._ids_on(protocol), IpcTransportError(f"{self.path}: {reason}", sent=True))
        protocol.batches.clear()


def _settled(future: asyncio.Future[ClientResponse]) -> None:
    """Mark a failure nobody awaited as seen (asyncio logs unseen ones), or cancel the wait."""
    if not future.done():
        future.cancel()
    elif not future.cancelled():
        future.exception()


def _params(params: object) -> object:
    """Params as sent: omitted when None; only an object or an array is valid JSON-RPC."""
    if params is None:
        return UNSET
    if type(params) is dict:
        return params
    if isinstance(params, str | bytes | int | float | bool):
        raise TypeError(f"params must be an object or an array, not {type(params).__name__}")
    return params


def _describe(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, FileNotFoundError):
        return "no such socket (is the daemon running?)"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused (is the daemon running?)"
    return str(exc)
