"""One client connection of the server: frames in, answers out, bounded by `max_in_flight`.

The per-frame path lives here: whole chunks from the loop, every complete
frame split out of each, its call started through `protocol.calls`, and the
answers of one loop turn encoded into one buffer and written once. What the
connection needs of its server is a `host.CallHost`; it does not import the
server. When it reads is its `flow.ReadGate`'s.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from enum import IntEnum
from typing import TYPE_CHECKING, Any, cast

from msgspec import UNSET, Raw

from pair.protocol.deferred import Deferred
from pair.protocol.errors import (
    AnswersUnread,
    BatchTooLarge,
    FrameError,
    InternalError,
    InvalidRequest,
    ResultTooLarge,
    RpcError,
)
from pair.protocol.flow import ReadGate
from pair.protocol.framing import (
    HEADER_SIZE,
    FrameDecoder,
    append_frame_of,
)
from pair.protocol.messages import (
    Request,
    RequestId,
    Response,
    decode_batch,
    decode_request,
    error_response,
    is_batch,
    request_id_of,
)

if TYPE_CHECKING:
    from pair.protocol.host import CallHost


# What a batch member costs besides its bytes (decoded, a coroutine and a task):
# charged to the byte budgets with the batch's body.
BATCH_MEMBER_COST = 2048
# A connection hands the loop back after this long (seconds) handling the frames of one
# turn; the rest wait for the next turn, after every other connection's of this one. A
# chunk of 64 point queries answered on the loop took 0.9 ms, and a `health` on another
# connection waited all of it. With this, `health` beside 64 point queries in flight
# took 0.37-0.39 ms at the median (0.2 ms when the queries ran on threads); with 100 us
# 0.15-0.19 ms, but the point-query rate fell 5-10% (a turn more per slice).
TURN_SLICE = 0.0002


class State(IntEnum):
    """Where a connection is in its life; ordered, so `>= CLOSING` is "no more answers"."""

    OPEN = 0
    # The peer half-closed after its last request: its calls are still answered.
    PEER_DONE = 1
    # close() was called: the answers queued are written, then the transport closes.
    CLOSING = 2
    # connection_lost: gone.
    CLOSED = 3


CLOSING = State.CLOSING


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
        # Body sizes of the calls in flight, by id() of their request (a batch's is
        # passed along with it), and their sum.
        self._sizes: dict[int, int] = {}
        # The pending calls whose answers a thread is making, by id() of their request.
        self._deferred: dict[int, Deferred[Any]] = {}
        self._backlog: deque[bytes] = deque()
        # Answers are encoded straight into one buffer, written once per turn.
        self._out = bytearray()
        self._flush_scheduled = False
        self._resume_scheduled = False
        self.state = State.OPEN
        self.peer = "?"
        self._batch_members = asyncio.Semaphore(host.limits.max_in_flight)
        self.last_active = self._loop.time()
        self._bug_logged = False
        self.heard = False
        self.admin = False
        self._gate = ReadGate(self, host, host.limits, self._decoder, host.log)

    # -- asyncio.Protocol callbacks ---------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self._transport = transport = cast("asyncio.Transport", transport)
        self._gate.attach(transport)
        refusal = self._host.admit(self, transport)
        if refusal is not None:
            self._log.warning("refused connection from %s: %s", self.peer, refusal.message)
            self._send_error(None, refusal)
            self._abort_after_flush()

    def data_received(self, data: bytes) -> None:
        if self.state >= CLOSING:
            return
        self.last_active = self._loop.time()
        if not self.heard:
            self.heard = True
            self._host.heard_from(self)
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
            gate = self._gate
            if gate.stall_watched or self._decoder.has_partial:
                gate.watch_stall(bool(frames))
            if gate.reserved or self._decoder.has_partial:
                gate.admit_frame_in_progress()
            if (
                gate.read_paused
                or gate.write_paused
                or self._backlog
                or self._in_flight >= self._limits.max_in_flight
                or gate.pending_bytes >= self._limits.max_pending_bytes
                or self._host.pending_bytes >= self._limits.max_pending_bytes_total
            ):
                self.update_reading()
        finally:
            self._end_turn()

    def eof_received(self) -> bool | None:
        # A peer that half-closes after its last request still gets the answers:
        # keep the transport open until the calls in flight are answered.
        try:
            self._decoder.check_eof()
        except FrameError as exc:
            self._log.info("peer %s: %s", self.peer, exc.message)
        if self.state is State.OPEN:
            self.state = State.PEER_DONE
        self._close_if_finished()
        return True

    def _close_if_finished(self) -> None:
        if self.state is State.PEER_DONE and not self._in_flight and not self._backlog:
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.state = State.CLOSED
        self._gate.lost()
        self._backlog.clear()
        self._out.clear()
        self._host.connection_lost(self)

    def pause_writing(self) -> None:
        self._gate.pause_writing()
        self.update_reading()

    def resume_writing(self) -> None:
        self._gate.resume_writing()
        self._resume_backlog()

    def _resume_next_turn(self) -> None:
        if not self._resume_scheduled:
            self._resume_scheduled = True
            self._loop.call_soon(self._resume_backlog)

    def _resume_backlog(self) -> None:
        self._resume_scheduled = False
        # Also with no backlog left (a call's end took it meanwhile): answers held back
        # for this turn are written now.
        self._flush_scheduled = True
        try:
            if self._backlog:
                self._drain_backlog()
        finally:
            self._end_turn()
        self.update_reading()

    def _end_turn(self) -> None:
        """Write the answers of this turn, unless the rest of its chunk runs next turn
        (`TURN_SLICE`): theirs go with them, in one write. A write per slice cost 4-8%
        of the point-query rate (each wakes the peer)."""
        if self._resume_scheduled and len(self._out) <= self._limits.max_unsent_bytes:
            return
        self._flush()

    # -- frames and requests ----------------------------------------------

    def _handle_frames(self, frames: list[bytes]) -> None:
        limit, unsent = self._limits.max_in_flight, self._limits.max_unsent_bytes
        clock = time.perf_counter
        slice_ends = clock() + TURN_SLICE
        for index, body in enumerate(frames):
            if self._in_flight >= limit or len(self._out) > unsent:
                self._backlog.extend(frames[index:])
                return
            if clock() > slice_ends:
                self._backlog.extend(frames[index:])
                self._resume_next_turn()
                return
            try:
                self._handle_frame(body)
            except Exception as exc:
                self._frame_failed(body, exc)

    def _drain_backlog(self) -> None:
        """Handle waiting frames while a slot of `max_in_flight` is free and the answers
        are being written: a peer that does not read its answers gets no new ones."""
        limit, unsent = self._limits.max_in_flight, self._limits.max_unsent_bytes
        backlog = self._backlog
        clock = time.perf_counter
        slice_ends = clock() + TURN_SLICE
        while (
            backlog
            and self._in_flight < limit
            and not self._gate.write_paused
            and len(self._out) <= unsent
            and self.state < CLOSING
        ):
            if clock() > slice_ends:
                self._resume_next_turn()
                return
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
            size = len(body)
            self._sizes[id(request)] = size
            self._begin_call(size)

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
        # A batch is one call of the connection's max_in_flight; its members share
        # one bound per connection, however many batches. What it holds is more than
        # its body: each member it runs costs a task, so each is charged to the budgets.
        cost = len(body) + BATCH_MEMBER_COST * len(members)
        self._begin_call(cost)
        limit = self._limits.max_frame_bytes
        self._calls.start_batch(members, self, self._batch_members, cost, limit)

    # -- answers (protocol.calls.Answers) ---------------------------------

    def answer(self, request: Request, response: Response | None) -> None:
        # `request.id is not UNSET` is `not request.is_notification`, without a
        # property call: this runs once per answered call.
        if response is not None and request.id is not UNSET:
            self._send_message(response)

    def waiting_on(self, request: Request, deferred: Deferred[Any]) -> None:
        self._deferred[id(request)] = deferred

    def finish(self, request: Request, response: Response | None) -> None:
        key = id(request)
        self._deferred.pop(key, None)
        self._end_call(self._sizes.pop(key, 0))
        self.answer(request, response)

    def finish_batch(self, responses: list[Raw], size: int) -> None:
        self._end_call(size)
        if responses:
            self._send_message(responses)

    def _send_error(self, request_id: RequestId, error: RpcError) -> None:
        self._send_message(error_response(request_id, error))

    def _send_message(self, message: object) -> None:
        if self.state >= CLOSING:
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

    def _withdraw_if_unread(self) -> None:
        """Past `max_unread_bytes` of answers the peer has not read, its calls still in a
        thread are withdrawn (answered ANSWERS_UNREAD, retryable): 40 queries of 8 MB
        results from a peer that never read held 443 MiB until it closed."""
        assert self._transport is not None
        if self._transport.get_write_buffer_size() <= self._limits.max_unread_bytes:
            return
        error = AnswersUnread(
            f"answers of over {self._limits.max_unread_bytes} bytes wait to be read on"
            " this connection; this call was not run: read them, then send it again"
        )
        withdrawn = sum(deferred.withdraw(error) for deferred in list(self._deferred.values()))
        if withdrawn:
            self._log.warning(
                "peer %s reads no answers: %d call(s) withdrawn", self.peer, withdrawn
            )

    def _send_too_large(self, message: object) -> None:
        """No peer is sent a frame over the limit: the answer becomes RESULT_TOO_LARGE for
        its id. (A batch's answers are kept within the limit as they come: `calls._Answers`.)
        """
        limit = self._limits.max_frame_bytes
        too_large = ResultTooLarge(f"the answer is larger than the frame limit of {limit} bytes")
        self._log.warning("an answer over %d bytes was replaced by an error", limit)
        append_frame_of(error_response(getattr(message, "id", None), too_large), self._out)

    def _flush(self) -> None:
        self._flush_scheduled = False
        if self._out and self.state < CLOSING and self._transport is not None:
            # bytes: uvloop writes them without a copy of its own.
            self._transport.write(bytes(self._out))
            self._out.clear()
            if self._deferred and self._gate.write_paused:
                self._withdraw_if_unread()
            if self._backlog and not self._gate.write_paused:
                # Frames left waiting for these answers to be written: they were.
                self._resume_next_turn()

    # -- flow control and stalls ------------------------------------

    def _begin_call(self, size: int) -> None:
        self._in_flight += 1
        self._gate.charge(size)
        self._host.call_started(size)

    def _end_call(self, size: int) -> None:
        self._in_flight -= 1
        self._gate.release(size)
        self._host.call_finished(size)
        if self._backlog:
            self._drain_backlog()
        if self._gate.read_paused:
            self.update_reading()
        if self.state is State.PEER_DONE:
            # The call's answer is queued right after this returns; close after it.
            self._loop.call_soon(self._close_if_finished)

    def update_reading(self) -> None:
        """Pause or resume reading (`flow.ReadGate`); busy while frames wait for a slot of
        `max_in_flight`."""
        if self.state < CLOSING:
            self._gate.update(bool(self._backlog) or self._in_flight >= self._limits.max_in_flight)

    def _abort_after_flush(self) -> None:
        self._flush()
        self.close()

    def close_if_idle(self, idle_since: float) -> bool:
        """Close when nothing was received since `idle_since` and no call is running."""
        if (
            self.state >= CLOSING
            or self._in_flight
            or self._backlog
            or self.last_active > idle_since
        ):
            return False
        self._log.info("closing connection from %s: idle", self.peer)
        self.close()
        return True

    def close(self) -> None:
        """Close after the answers already queued are written."""
        if self._transport is not None and self.state < CLOSING:
            self._flush()
            self.state = State.CLOSING
            self._transport.close()
