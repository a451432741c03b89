"""One client connection of the server: frames in, answers out, bounded by `max_in_flight`.

The per-frame path lives here: whole chunks from the loop, every complete
frame split out of each, its call started through `protocol.calls`, and the
answers of one loop turn encoded into one buffer and written once. What the
connection needs of its server is the `CallHost` below; it does not import
the server.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, cast

from msgspec import UNSET

from protocol.errors import (
    BatchTooLarge,
    FrameError,
    InternalError,
    InvalidRequest,
    ResultTooLarge,
    RpcError,
)
from protocol.framing import (
    DEFAULT_FRAME_TIMEOUT,
    DEFAULT_MAX_FRAME_BYTES,
    HEADER_SIZE,
    FrameDecoder,
)
from protocol.messages import (
    Request,
    RequestId,
    Response,
    append_frame_of,
    decode_batch,
    decode_request,
    encode_frame_of,
    error_response,
    is_batch,
    request_id_of,
)

if TYPE_CHECKING:
    from protocol.calls import Calls


DEFAULT_IDLE_TIMEOUT = 600.0


@dataclass(frozen=True, slots=True)
class ServerLimits:
    """Per-server tunables; the defaults are PROTOCOL.md's."""

    max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES
    frame_timeout: float = DEFAULT_FRAME_TIMEOUT
    max_in_flight: int = 256
    max_batch: int = 1000
    max_connections: int = 2048
    grace: float = 10.0
    idle_timeout: float = DEFAULT_IDLE_TIMEOUT
    backlog: int = socket.SOMAXCONN


class CallHost(Protocol):
    """What a connection needs of the server that accepted it."""

    limits: ServerLimits
    log: logging.Logger
    calls: Calls

    def admit(self, connection: Connection, transport: asyncio.Transport) -> RpcError | None:
        """Register the connection; the reason to refuse it (then closed), or None."""

    def connection_lost(self, connection: Connection) -> None: ...

    def call_started(self) -> None: ...

    def call_finished(self) -> None: ...


class Connection(asyncio.Protocol):
    """One client connection: frames in, answers out, bounded by `max_in_flight`."""

    def __init__(self, host: CallHost) -> None:
        self._host = host
        self._calls = host.calls
        self._limits = host.limits
        self._log = host.log
        self._decoder = FrameDecoder(host.limits.max_frame_bytes)
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
        self.peer = "?"
        self._peer_done = False
        self._batch_members = asyncio.Semaphore(host.limits.max_in_flight)
        self.last_active = self._loop.time()
        self._bug_logged = False

    # -- asyncio.Protocol callbacks ---------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self._transport = transport = cast("asyncio.Transport", transport)
        refusal = self._host.admit(self, transport)
        if refusal is not None:
            self._log.warning("refused connection from %s: %s", self.peer, refusal.message)
            self._send_error(None, refusal)
            self._abort_after_flush()

    def data_received(self, data: bytes) -> None:
        if self._closed:
            return
        self.last_active = self._loop.time()
        try:
            frames = self._decoder.feed(data)
        except FrameError as exc:
            self._log.warning("bad frame from %s: %s", self.peer, exc.message)
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
        try:
            self._decoder.check_eof()
        except FrameError as exc:
            self._log.info("peer %s: %s", self.peer, exc.message)
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
        self._host.connection_lost(self)

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
            self._log.error("unexpected error handling a frame from %s: %r", self.peer, exc)
        else:
            self._bug_logged = True
            self._log.error("unexpected error handling a frame from %s", self.peer, exc_info=exc)
        request_id = request_id_of(body)
        if request_id is not UNSET:
            self._send_error(request_id, InternalError("internal error; see the daemon's log"))

    def _handle_frame(self, body: bytes) -> None:
        if is_batch(body):
            self._start_batch(body)
            return
        try:
            request = decode_request(body)
        except RpcError as exc:
            self._send_error(exc.request_id, exc)
            return
        if self._calls.start(request, self):
            self._begin_call()

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
        # A batch is one call of the connection's max_in_flight; its members
        # share one bound per connection, however many batches.
        self._calls.start_batch(members, self, self._batch_members)

    # -- answers (protocol.calls.Answers) ---------------------------------

    def answer(self, request: Request, response: Response | None) -> None:
        # `request.id is not UNSET` is `not request.is_notification`, without a
        # property call: this runs once per answered call.
        if response is not None and request.id is not UNSET:
            self._send_message(response)

    def finish(self, request: Request, response: Response | None) -> None:
        self._end_call()
        self.answer(request, response)

    def finish_batch(self, responses: list[Response]) -> None:
        self._end_call()
        if responses:
            self._send_message(responses)

    def _send_error(self, request_id: RequestId, error: RpcError) -> None:
        self._send_message(error_response(request_id, error))

    def _send_message(self, message: object) -> None:
        if self._closed:
            return
        out = self._out
        start = len(out)
        try:
            append_frame_of(message, out)
        except (TypeError, ValueError, OverflowError, RecursionError) as exc:
            self._log.error("could not encode an answer", exc_info=exc)
            request_id = getattr(message, "id", None)
            fallback = error_response(request_id, InternalError("unencodable result"))
            append_frame_of(fallback, out)
        if len(out) - start - HEADER_SIZE > self._limits.max_frame_bytes:
            del out[start:]
            self._send_too_large(message)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    def _send_too_large(self, message: object) -> None:
        """No peer is sent a frame over the limit: the answer becomes RESULT_TOO_LARGE for
        its id; in a batch, the largest answers do, until the batch fits."""
        limit = self._limits.max_frame_bytes
        too_large = ResultTooLarge(f"the answer is larger than the frame limit of {limit} bytes")
        if not isinstance(message, list):
            self._log.warning("an answer over %d bytes was replaced by an error", limit)
            append_frame_of(error_response(getattr(message, "id", None), too_large), self._out)
            return
        members = list(message)
        sizes = [len(encode_frame_of(member)) for member in members]
        total = sum(sizes)
        for index in sorted(range(len(members)), key=sizes.__getitem__, reverse=True):
            if total + len(members) + 1 <= limit:
                break
            members[index] = error_response(members[index].id, too_large)
            total -= sizes[index] - len(encode_frame_of(members[index]))
        self._log.warning("answers in a batch over %d bytes were replaced by errors", limit)
        append_frame_of(members, self._out)

    def _flush(self) -> None:
        self._flush_scheduled = False
        if self._out and not self._closed and self._transport is not None:
            # bytes: uvloop writes them without a copy of its own.
            self._transport.write(bytes(self._out))
            self._out.clear()

    # -- flow control and stalls ------------------------------------

    def _begin_call(self) -> None:
        self._in_flight += 1
        self._host.call_started()

    def _end_call(self) -> None:
        self._in_flight -= 1
        self._host.call_finished()
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
        self._log.warning(
            "peer %s stalled mid-frame for %.1fs; disconnecting",
            self.peer,
            self._limits.frame_timeout,
        )
        self.close()

    def _abort_after_flush(self) -> None:
        self._flush()
        self.close()

    def close_if_idle(self, idle_since: float) -> bool:
        """Close when nothing was received since `idle_since` and no call is running."""
        if self._closed or self._in_flight or self._backlog or self.last_active > idle_since:
            return False
        self._log.info("closing connection from %s: idle", self.peer)
        self.close()
        return True

    def close(self) -> None:
        """Close after the answers already queued are written."""
        if self._transport is not None and not self._closed:
            self._flush()
            self._closed = True
            self._transport.close()
