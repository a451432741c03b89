"""How a call runs: resolve the method, run it by its kind, turn any failure into an answer.

The one place that decides how a request becomes a response. A method's
`Kind` (protocol.dispatch) says how its handler runs:

    INLINE    a plain function that never blocks: called on the loop, answered at once
    DEFERRED  a plain function returning `Deferred[T]` (a database job): called on the
              loop, answered from the job's callback; no task, no future (or `Done`,
              an outcome it had at once: answered as an inline call is)
    TASK      a coroutine: run in an asyncio task the `Calls` own and the drain awaits
    THREAD    a blocking plain function: run in anyio's worker threads

Batch members run by the same kinds, inside one task per batch. Every call
is timed and counted by method and outcome (`protocol.metrics`), on
whatever path it takes, and logged at DEBUG. Unexpected exceptions stop
here: logged with their traceback and answered INTERNAL_ERROR without it.

Handler tasks are plain asyncio tasks in a set, awaited and cancelled at the
drain like a task group's children: measured here, anyio's
`TaskGroup.start_soon` cost 54 us per spawn against 4.7 us for
`loop.create_task`, and a coroutine handler paid that on every call.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Coroutine
from typing import Any, Protocol, cast

import anyio.to_thread
import msgspec
from msgspec import UNSET, Raw

from pair.protocol import trace
from pair.protocol.deferred import Deferred, Done, outcome_of
from pair.protocol.dispatch import Kind, Method, Router
from pair.protocol.errors import (
    AdminOnly,
    InternalError,
    MethodNotFound,
    ResultTooLarge,
    RouteError,
    RpcError,
    ShuttingDown,
)
from pair.protocol.messages import (
    ErrorResponse,
    Request,
    Response,
    decode_request,
    error_response,
    success_response,
)
from pair.protocol.metrics import OK, MethodCounts

# How much of a peer's text (a method name, an id, a message echoing them) a log line
# carries: quoted by repr, so a newline cannot forge a line, and cut to this length.
LOGGED_CHARS = 80


def loggable(text: object, limit: int = LOGGED_CHARS) -> str:
    """A peer's text as a log line may hold it: quoted, escaped, and cut."""
    shown = repr(text)
    return shown if len(shown) <= limit else f"{shown[:limit]}...({len(shown) - limit} more)"


class Answers(Protocol):
    """Where a call's answer goes: the connection it came on."""

    # Whether the peer may call `admin` methods (its uid is the daemon's own or root).
    admin: bool

    def answer(self, request: Request, response: Response | None) -> None:
        """The answer of a call that finished without being pending (inline, refused)."""

    def waiting_on(self, request: Request, deferred: Deferred[Any]) -> None:
        """A pending call's answer comes from `deferred` (which `withdraw` can cut short)."""

    def finish(self, request: Request, response: Response | None) -> None:
        """The answer of a pending call (`Calls.start` returned True)."""

    def finish_batch(self, responses: list[Raw], size: int) -> None:
        """The answers of a batch (`Calls.start_batch` of a `size`-byte body), notifications
        left out."""


class Calls:
    """Runs the requests of every connection of one server."""

    def __init__(self, router: Router, log: logging.Logger) -> None:
        self.router = router
        self.log = log
        self.draining = False
        self.debug = log.isEnabledFor(logging.DEBUG)
        self._tasks: set[asyncio.Task[None]] = set()

    # -- one request --------------------------------------------------------

    def start(self, request: Request, to: Answers) -> bool:
        """Run `request`; True while its answer is pending (it goes to `to.finish`),
        False when it was answered (through `to.answer`) before this returned."""
        started = time.perf_counter()
        method = self.router.get(request.method)
        counts = self.router.unknown_counts if method is None else method.counts
        try:
            params = self.resolve(request, method, to.admin)
        except RpcError as exc:
            self._answer_now(request, self.error_of(request, exc), to, started, counts)
            return False
        assert method is not None
        span = trace.span_of(params.meta)
        if span is None:
            return self._start(request, method, params, to, started)
        # The caller's trace: the call's log lines, and what it queues or calls, are of
        # it (a task spawned here keeps it; a job's callback is given it by name).
        token = trace.enter(span)
        try:
            return self._start(request, method, params, to, started)
        finally:
            trace.leave(token)

    def _start(
        self, request: Request, method: Method, params: Any, to: Answers, started: float
    ) -> bool:
        kind = method.kind
        if kind is Kind.INLINE:
            response = self._inline(request, method, params)
            self._answer_now(request, response, to, started, method.counts)
            return False
        if kind is Kind.DEFERRED:
            try:
                deferred = cast("Deferred[Any]", method.handler(params))
            except Exception as exc:
                self._answer_now(request, self.error_of(request, exc), to, started, method.counts)
                return False
            if type(deferred) is Done:
                response = self._outcome_response(request, deferred.ok, deferred.value)
                self._answer_now(request, response, to, started, method.counts)
                return False
            deferred.then(self._deferred_done, (request, to, started, method.counts))
            to.waiting_on(request, deferred)
            return True
        self.spawn(self._run(request, method, params, to, started))
        return True

    def resolve(self, request: Request, method: Method | None, admin: bool) -> Any:
        """The call's params, or the RpcError that answers it (shutting down, no such
        method, not for this peer, params invalid)."""
        if self.draining:
            raise ShuttingDown("the daemon is shutting down; retry shortly")
        if method is None:
            raise MethodNotFound(f"method not found: {request.method}")
        if method.admin and not admin:
            raise AdminOnly(
                f"{request.method} is only for the daemon's own uid and root"
                " (run pairctl as that user or with sudo)"
            )
        return method.decode_params(request.params)

    def _inline(self, request: Request, method: Method, params: Any) -> Response | None:
        try:
            result = method.handler(params)
        except Exception as exc:
            return self.error_of(request, exc)
        return success_response(request.id, result)  # type: ignore[arg-type]

    def _answer_now(
        self,
        request: Request,
        response: Response | None,
        to: Answers,
        started: float,
        counts: MethodCounts,
    ) -> None:
        self.record(request, response, started, counts)
        to.answer(request, response)

    def _deferred_done(
        self, context: tuple[Request, Answers, float, MethodCounts], ok: bool, value: Any
    ) -> None:
        request, to, started, counts = context
        response = self._outcome_response(request, ok, value)
        self.record(request, response, started, counts)
        to.finish(request, response)

    def _outcome_response(self, request: Request, ok: bool, value: Any) -> Response | None:
        if ok:
            return success_response(request.id, value)  # type: ignore[arg-type]
        error = value if isinstance(value, Exception) else RuntimeError(repr(value))
        return self.error_of(request, error)

    async def _run(
        self, request: Request, method: Method, params: Any, to: Answers, started: float
    ) -> None:
        response: Response | None = None
        try:
            result = await self.invoke(method, params)
            response = success_response(request.id, result)  # type: ignore[arg-type]
        except Exception as exc:
            response = self.error_of(request, exc)
        finally:
            # Also when cancelled at the drain: the call leaves the in-flight count.
            self.record(request, response, started, method.counts)
            to.finish(request, response)

    async def invoke(self, method: Method, params: Any) -> Any:
        """The handler's result, whatever its kind (batch members and tasks await this)."""
        kind = method.kind
        if kind is Kind.TASK:
            return await method.handler(params)
        if kind is Kind.INLINE:
            return method.handler(params)
        if kind is Kind.DEFERRED:
            return await outcome_of(cast("Deferred[Any]", method.handler(params)))
        return await anyio.to_thread.run_sync(method.handler, params)

    # -- batches ------------------------------------------------------------

    def start_batch(
        self,
        members: list[Raw],
        to: Answers,
        bound: asyncio.Semaphore,
        size: int,
        max_bytes: int,
    ) -> None:
        """Run a batch's members; their answers go to `to.finish_batch` in one frame.

        `bound` limits how many members run at once, shared by a connection's
        batches; `size` (the body's) is handed back with the answers, which
        together stay within `max_bytes` (`_Answers`).
        """
        self.spawn(self._run_batch(members, to, bound, size, max_bytes))

    async def _run_batch(
        self,
        members: list[Raw],
        to: Answers,
        bound: asyncio.Semaphore,
        size: int,
        max_bytes: int,
    ) -> None:
        """Members are taken one by one, each started only once `bound` has a slot for it:
        given a task each up front, 11.5 MB of batches of tiny calls took 240 MiB."""
        answers = _Answers(len(members), max_bytes, self.log)
        running: set[asyncio.Task[Response | None]] = set()
        loop = asyncio.get_running_loop()
        try:
            for index, raw in enumerate(members):
                answer = self._member_answer(raw, to.admin)
                if not asyncio.iscoroutine(answer):
                    answers.keep(index, answer)
                    continue
                try:
                    await bound.acquire()
                except BaseException:
                    answer.close()
                    raise
                task = loop.create_task(answer)
                running.add(task)
                task.add_done_callback(
                    functools.partial(_member_done, answers, index, bound, running)
                )
            while running:
                await asyncio.wait(set(running))
        finally:
            for task in running:
                task.cancel()
            # Also when cancelled, or on a bug: the batch leaves the in-flight count
            # with the answers it has.
            to.finish_batch(answers.kept(), size)

    def _member_answer(
        self, raw: Raw, admin: bool
    ) -> Response | Coroutine[Any, Any, Response | None] | None:
        """One member: its answer now, None (a notification), or a coroutine for it."""
        try:
            request = decode_request(raw)
        except RpcError as exc:
            return error_response(exc.request_id, exc)
        started = time.perf_counter()
        method = self.router.get(request.method)
        counts = self.router.unknown_counts if method is None else method.counts
        try:
            params = self.resolve(request, method, admin)
        except RpcError as exc:
            refused = self.error_of(request, exc)
            self.record(request, refused, started, counts)
            return None if request.is_notification else refused
        assert method is not None
        if method.kind is Kind.INLINE:
            span = trace.span_of(params.meta)
            token = None if span is None else trace.enter(span)
            try:
                response = self._inline(request, method, params)
            finally:
                if token is not None:
                    trace.leave(token)
            self.record(request, response, started, counts)
            return None if request.is_notification else response
        return self._member_call(request, method, params, started)

    async def _member_call(
        self, request: Request, method: Method, params: Any, started: float
    ) -> Response | None:
        span = trace.span_of(params.meta)
        if span is not None:
            trace.enter(span)  # this member's own task's context
        try:
            result = await self.invoke(method, params)
            response: Response | None = success_response(request.id, result)  # type: ignore[arg-type]
        except Exception as exc:
            response = self.error_of(request, exc)
        self.record(request, response, started, method.counts)
        return None if request.is_notification else response

    # -- answers and the error boundary -------------------------------------

    def error_of(self, request: Request, exc: Exception) -> Response:
        """The error answer of `request`. A notification's is counted, never sent (the
        connection sends nothing for a request without an id), and its failure logged."""
        error = self.as_rpc_error(exc, request.method)
        if request.id is UNSET and not isinstance(error, RouteError | ShuttingDown):
            self.log.info(
                "notification %s failed: %s", loggable(request.method), loggable(error.message)
            )
        return error_response(None if request.id is UNSET else request.id, error)

    def as_rpc_error(self, exc: Exception, method: str) -> RpcError:
        """The error boundary: unexpected exceptions are logged with traceback, answered bare."""
        if isinstance(exc, RpcError):
            return exc
        self.log.error("unexpected error in %s", loggable(method), exc_info=exc)
        return InternalError("internal error; see the daemon's log")

    def record(
        self, request: Request, response: Response | None, started: float, counts: MethodCounts
    ) -> None:
        """Count the call by its outcome and duration; log it at DEBUG."""
        seconds = time.perf_counter() - started
        code = None
        if type(response) is ErrorResponse:
            code = response.error.data.get("errorCode", "?")
        counts.record(seconds, code)
        if counts.observe is not None:
            try:
                counts.observe(getattr(response, "result", None), code)
            except Exception:
                # Counting must never cost the caller its answer.
                self.log.exception("counting a %s call failed", loggable(request.method))
        if self.debug:
            self.log.debug(
                "call method=%s id=%s duration_ms=%.2f outcome=%s",
                loggable(request.method),
                loggable(request.id),
                seconds * 1000,
                code or OK,
            )

    # -- tasks --------------------------------------------------------------

    def spawn(self, coroutine: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def cancel_tasks(self) -> None:
        """Cancel the calls still running in tasks and wait for them to end."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)


class _Answers:
    """A batch's answers, each encoded as it comes: together they stay within one frame.

    Kept whole until the batch's frame was encoded, 1000 members of large results
    held many frames' worth first. An answer that would pass the frame is replaced
    at once by RESULT_TOO_LARGE for its id (the others are kept, in order).
    """

    __slots__ = ("_answers", "_frame_bytes", "_limit", "_log", "_used")

    def __init__(self, count: int, max_bytes: int, log: logging.Logger) -> None:
        self._answers: list[Raw | None] = [None] * count
        self._frame_bytes = max_bytes
        # Room is kept for every member's RESULT_TOO_LARGE, so the frame always fits.
        self._limit = max_bytes - REPLACED_ANSWER_BYTES * count
        self._used = 2  # the array's brackets
        self._log = log

    def keep(self, index: int, response: Response | None) -> None:
        if response is None:
            return
        body = _encode_answer(response)
        if self._used + len(body) + 1 > self._limit and len(body) > REPLACED_ANSWER_BYTES:
            too_large = ResultTooLarge(
                f"the batch's answers would pass the frame limit of {self._frame_bytes} bytes"
            )
            body = _encode_answer(error_response(response.id, too_large))
            self._log.warning("an answer in a batch was replaced: the frame was full")
        self._used += len(body) + 1
        self._answers[index] = Raw(body)

    def kept(self) -> list[Raw]:
        return [answer for answer in self._answers if answer is not None]


def _encode_answer(response: Response) -> bytes:
    try:
        return _encoder.encode(response)
    except (TypeError, ValueError, OverflowError, RecursionError):
        return _encoder.encode(error_response(response.id, InternalError("unencodable result")))


_encoder = msgspec.json.Encoder()
# About what a member's RESULT_TOO_LARGE takes in the batch's frame, its id aside
# (ids as long as a frame could still overflow it: the whole answer is then one
# RESULT_TOO_LARGE, `Connection._send_too_large`).
REPLACED_ANSWER_BYTES = 256


def _member_done(
    answers: _Answers,
    index: int,
    bound: asyncio.Semaphore,
    running: set[asyncio.Task[Response | None]],
    task: asyncio.Task[Response | None],
) -> None:
    running.discard(task)
    bound.release()
    if not task.cancelled() and task.exception() is None:
        answers.keep(index, task.result())
