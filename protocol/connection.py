"""One client connection of the server: frames in, answers out, bounded by `max_in_flight`.

The per-frame path lives here: whole chunks from the loop, every complete
frame split out of each, inline methods answered without a task, and the
answers of one loop turn encoded into one buffer and written once.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import time
from collections import deque
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any, cast

from msgspec import UNSET

from protocol.errors import (
    BatchTooLarge,
    Forbidden,
    FrameError,
    InternalError,
    InvalidRequest,
    RouteError,
    RpcError,
    ShuttingDown,
    TooManyConnections,
)
from protocol.framing import FrameDecoder
from protocol.messages import (
    Request,
    RequestId,
    Response,
    append_frame_of,
    decode_batch,
    decode_request,
    error_response,
    is_batch,
    request_id_of,
    success_response,
)

if TYPE_CHECKING:
    from msgspec import Raw

    from protocol.deferred import Deferred
    from protocol.dispatch import Method
    from protocol.server import Server

_UCRED = struct.Struct("3i")
_OPEN_OBJECT = ord("{")


class Connection(asyncio.Protocol):
    """One client connection: frames in, answers out, bounded by `max_in_flight`."""

    def __init__(self, server: Server) -> None:
        self._server = server
        self._limits = server.limits
        self._decoder = FrameDecoder(server.limits.max_frame_bytes)
        self._transport: asyncio.Transport | None = None
        self._loop = asyncio.get_running_loop()
        self._in_flight = 0
        self._backlog: deque[bytes] = deque()
        # Answers are encoded straight into one buffer, written once per turn.
        self._out = bytearray()
        self._flush_scheduled = False
        self._read_paused = False
        self._write_paused = False
        self._closed = False
        self._stall_timer: asyncio.TimerHandle | None = None
        self._peer = "?"
        self._peer_done = False
        self._batch_members = asyncio.Semaphore(server.limits.max_in_flight)
        self._bug_logged = False

    # -- asyncio.Protocol callbacks ---------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self._transport = transport = cast("asyncio.Transport", transport)
        server = self._server
        server.connections.add(self)
        refusal = self._refusal(transport)
        if refusal is not None:
            server.log.warning("refused connection from %s: %s", self._peer, refusal.message)
            self._send_error(None, refusal)
            self._abort_after_flush()

    def data_received(self, data: bytes) -> None:
        if self._closed:
            return
        try:
            frames = self._decoder.feed(data)
        except FrameError as exc:
            self._server.log.warning("bad frame from %s: %s", self._peer, exc.message)
            self._send_error(None, exc)
            self._abort_after_flush()
            return
        # Answers made while handling this chunk go out in one write at the end,
        # with no flush callback scheduled for them.
        self._flush_scheduled = True
        try:
            if frames:
                if self._backlog:
                    self._backlog.extend(frames)
                else:
                    self._handle_frames(frames)
            # Both are no-ops for the usual chunk (whole frames, reading, below
            # the limits); checked here because this runs once per chunk.
            if self._stall_timer is not None or self._decoder.has_partial:
                self._watch_stall(bool(frames))
            if (
                self._read_paused
                or self._write_paused
                or self._backlog
                or self._in_flight >= self._limits.max_in_flight
            ):
                self._update_reading()
        finally:
            self._flush()

    def eof_received(self) -> bool | None:
        # A peer that half-closes after its last request still gets the answers:
        # keep the transport open until the calls in flight are answered.
        if self._decoder.has_partial:
            self._server.log.info("peer %s closed in the middle of a frame", self._peer)
        self._peer_done = True
        self._close_if_finished()
        return True

    def _close_if_finished(self) -> None:
        if self._peer_done and not self._in_flight and not self._backlog:
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        self._cancel_stall_timer()
        self._backlog.clear()
        self._out.clear()
        self._server.connection_lost(self)

    def pause_writing(self) -> None:
        self._write_paused = True
        self._update_reading()

    def resume_writing(self) -> None:
        self._write_paused = False
        self._update_reading()

    # -- frames and requests ----------------------------------------------

    def _handle_frames(self, frames: list[bytes]) -> None:
        limit = self._limits.max_in_flight
        for index, body in enumerate(frames):
            if self._in_flight >= limit:
                self._backlog.extend(frames[index:])
                return
            try:
                self._handle_frame(body)
            except Exception as exc:
                self._frame_failed(body, exc)

    def _drain_backlog(self) -> None:
        limit = self._limits.max_in_flight
        backlog = self._backlog
        while backlog and self._in_flight < limit and not self._closed:
            body = backlog.popleft()
            try:
                self._handle_frame(body)
            except Exception as exc:
                self._frame_failed(body, exc)

    def _frame_failed(self, body: bytes, exc: Exception) -> None:
        """The last resort: a bug met while handling one frame costs that frame only.

        Every failure a frame can cause by what it holds is answered before
        this; reaching here is a bug of ours. The traceback is logged once per
        connection (a peer repeating the frame must not flood the journal), the
        frame answered INTERNAL_ERROR when its id can be read, and the
        connection and its other calls go on.
        """
        if self._bug_logged:
            self._server.log.error("unexpected error handling a frame from %s: %r", self._peer, exc)
        else:
            self._bug_logged = True
            self._server.log.error(
                "unexpected error handling a frame from %s", self._peer, exc_info=exc
            )
        request_id = request_id_of(body)
        if request_id is not UNSET:
            self._send_error(request_id, InternalError("internal error; see the daemon's log"))

    def _handle_frame(self, body: bytes) -> None:
        if body[0] != _OPEN_OBJECT and is_batch(body):
            self._start_batch(body)
            return
        try:
            request = decode_request(body)
        except RpcError as exc:
            self._send_error(exc.request_id, exc)
            return
        try:
            method, params = self._server.resolve(request)
        except RpcError as exc:
            self._answer_error(request, exc)
            return
        if method.inline:
            started = time.perf_counter() if self._server.debug else 0.0
            response = self._call_inline(method, params, request)
            if started:
                self._log_call(request, response, started)
            self._answer(request, response)
        elif method.deferred and not self._server.debug:
            self._start_deferred(request, method, params)
        else:
            self._begin_call()
            self._server.spawn(self._run(request, method, params))

    def _call_inline(self, method: Method, params: Any, request: Request) -> Response | None:
        try:
            result = method.handler(params)
        except Exception as exc:
            return self._error_of(request, exc)
        return success_response(request.id, result)  # type: ignore[arg-type]

    def _start_deferred(self, request: Request, method: Method, params: Any) -> None:
        try:
            then = cast("Deferred[Any]", method.handler(params)).then
        except Exception as exc:
            self._answer(request, self._error_of(request, exc))
            return
        self._begin_call()
        then(self._deferred_done, request)

    def _deferred_done(self, request: Request, ok: bool, value: Any) -> None:
        self._end_call()
        if ok:
            self._answer(request, success_response(request.id, value))  # type: ignore[arg-type]
        else:
            error = value if isinstance(value, Exception) else RuntimeError(repr(value))
            self._answer(request, self._error_of(request, error))

    async def _run(self, request: Request, method: Method, params: Any) -> None:
        started = time.perf_counter() if self._server.debug else 0.0
        try:
            result = await self._server.invoke(method, params)
            response: Response | None = success_response(request.id, result)  # type: ignore[arg-type]
        except Exception as exc:
            response = self._error_of(request, exc)
        finally:
            self._end_call()
        if started:
            self._log_call(request, response, started)
        self._answer(request, response)

    def _member_answer(self, raw: Raw) -> Response | Coroutine[Any, Any, Response | None] | None:
        """One batch member: its answer now, None (a notification), or a coroutine for it."""
        try:
            request = decode_request(raw)
        except RpcError as exc:
            return error_response(exc.request_id, exc)
        try:
            method, params = self._server.resolve(request)
        except RpcError as exc:
            return self._error_of(request, exc)
        if method.inline:
            response = self._call_inline(method, params, request)
            return None if request.is_notification else response
        return self._member_call(request, method, params)

    async def _member_call(self, request: Request, method: Method, params: Any) -> Response | None:
        try:
            result = await self._server.invoke(method, params)
        except Exception as exc:
            return self._error_of(request, exc)
        return None if request.is_notification else success_response(request.id, result)  # type: ignore[arg-type]

    def _start_batch(self, body: bytes) -> None:
        try:
            members = decode_batch(body)
            if not members:
                raise InvalidRequest("a batch must hold at least one request")
            if len(members) > self._limits.max_batch:
                raise BatchTooLarge(
                    f"a batch holds at most {self._limits.max_batch} requests, got {len(members)}"
                )
        except RpcError as exc:
            self._send_error(None, exc)
            return
        self._begin_call()
        self._server.spawn(self._run_batch(members))

    async def _run_batch(self, members: list[Raw]) -> None:
        try:
            answers = [self._member_answer(raw) for raw in members]
            pending = [(i, a) for i, a in enumerate(answers) if asyncio.iscoroutine(a)]
            if pending:
                # A batch is one call of the connection's max_in_flight; its
                # members share one bound per connection, however many batches.
                limit = self._batch_members

                async def bounded(coroutine: Coroutine[Any, Any, Response | None]) -> Any:
                    async with limit:
                        return await coroutine

                results = await asyncio.gather(*(bounded(c) for _, c in pending))
                for (index, _), result in zip(pending, results, strict=True):
                    answers[index] = result
        finally:
            self._end_call()
        responses = [a for a in answers if a is not None and not asyncio.iscoroutine(a)]
        if responses:
            self._send_message(responses)

    # -- answers ----------------------------------------------------------

    def _error_of(self, request: Request, exc: Exception) -> Response | None:
        error = self._server.as_rpc_error(exc, request.method)
        if request.is_notification:
            if not isinstance(error, RouteError | ShuttingDown):
                self._server.log.info("notification %s failed: %s", request.method, error.message)
            return None
        return error_response(request.id, error)  # type: ignore[arg-type]

    def _answer_error(self, request: Request, error: RpcError) -> None:
        response = self._error_of(request, error)
        if self._server.debug:
            self._log_call(request, response, time.perf_counter())
        self._answer(request, response)

    def _answer(self, request: Request, response: Response | None) -> None:
        # `request.id is not UNSET` is `not request.is_notification`, without a
        # property call: this runs once per answered call.
        if response is not None and request.id is not UNSET:
            self._send_message(response)

    def _send_error(self, request_id: RequestId, error: RpcError) -> None:
        self._send_message(error_response(request_id, error))

    def _send_message(self, message: object) -> None:
        if self._closed:
            return
        try:
            append_frame_of(message, self._out)
        except (TypeError, ValueError, OverflowError, RecursionError) as exc:
            self._server.log.error("could not encode an answer", exc_info=exc)
            request_id = getattr(message, "id", None)
            fallback = error_response(request_id, InternalError("unencodable result"))
            append_frame_of(fallback, self._out)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        if self._out and not self._closed and self._transport is not None:
            # bytes: uvloop writes them without a copy of its own.
            self._transport.write(bytes(self._out))
            self._out.clear()

    def _log_call(self, request: Request, response: Response | None, started: float) -> None:
        outcome = "ok"
        if response is not None and hasattr(response, "error"):
            outcome = response.error.data.get("errorCode", "?")
        elapsed_ms = (time.perf_counter() - started) * 1000
        self._server.log.debug(
            "call method=%s id=%r duration_ms=%.2f outcome=%s",
            request.method,
            request.id,
            elapsed_ms,
            outcome,
        )

    # -- flow control, stalls, refusal ------------------------------------

    def _begin_call(self) -> None:
        self._in_flight += 1
        self._server.call_started()

    def _end_call(self) -> None:
        self._in_flight -= 1
        self._server.call_finished()
        if self._backlog:
            self._drain_backlog()
        if self._read_paused:
            self._update_reading()
        if self._peer_done:
            # The call's answer is queued right after this returns; close after it.
            self._loop.call_soon(self._close_if_finished)

    def _update_reading(self) -> None:
        transport = self._transport
        if transport is None or self._closed:
            return
        blocked = self._write_paused or bool(self._backlog)
        blocked = blocked or self._in_flight >= self._limits.max_in_flight
        if blocked and not self._read_paused:
            self._read_paused = True
            transport.pause_reading()
            # A sender we are not reading from is not stalling: stop its clock.
            self._cancel_stall_timer()
        elif not blocked and self._read_paused:
            self._read_paused = False
            transport.resume_reading()
            self._watch_stall(True)

    def _watch_stall(self, frame_completed: bool) -> None:
        if not self._decoder.has_partial or self._read_paused:
            self._cancel_stall_timer()
            return
        if self._stall_timer is None or frame_completed:
            self._cancel_stall_timer()
            self._stall_timer = self._loop.call_later(self._limits.frame_timeout, self._stalled)

    def _cancel_stall_timer(self) -> None:
        if self._stall_timer is not None:
            self._stall_timer.cancel()
            self._stall_timer = None

    def _stalled(self) -> None:
        self._stall_timer = None
        self._server.log.warning(
            "peer %s stalled mid-frame for %.1fs; disconnecting",
            self._peer,
            self._limits.frame_timeout,
        )
        self.close()

    def _refusal(self, transport: asyncio.Transport) -> RpcError | None:
        server = self._server
        sock = transport.get_extra_info("socket")
        pid, uid, _gid = _UCRED.unpack(
            sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
        )
        self._peer = f"pid={pid} uid={uid}"
        if server.allowed_uids is not None and uid not in server.allowed_uids:
            return Forbidden(f"uid {uid} may not use this socket")
        if len(server.connections) > server.limits.max_connections:
            return TooManyConnections(
                f"too many connections (limit {server.limits.max_connections}); retry later"
            )
        return None

    def _abort_after_flush(self) -> None:
        self._flush()
        self.close()

    def close(self) -> None:
        """Close after the answers already queued are written."""
        if self._transport is not None and not self._closed:
            self._flush()
            self._closed = True
            self._transport.close()
