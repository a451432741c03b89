"""The one exception hierarchy of the wire protocol.

Server side: every error that can be answered is an `RpcError`; it carries its
JSON-RPC `code`, HTTP-like `status_code`, symbolic `error_code` and
`retryable` flag, so the server maps it to an error object in one place.

Client side: a call ends in a result, an `IpcHandlerError` (the peer answered an
error object) or an `IpcTransportError` (no answer was obtained).
"""

from __future__ import annotations

from typing import Any, ClassVar


class RpcError(Exception):
    """Base of every error a server answers with a JSON-RPC error object."""

    code: ClassVar[int] = -32603
    default_status: ClassVar[int] = 500
    default_error_code: ClassVar[str] = "INTERNAL_ERROR"
    default_retryable: ClassVar[bool] = False

    def __init__(
        self,
        message: str,
        *,
        status_code: int | None = None,
        error_code: str | None = None,
        retryable: bool | None = None,
        data: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status_code = self.default_status if status_code is None else status_code
        self.error_code = self.default_error_code if error_code is None else error_code
        self.retryable = self.default_retryable if retryable is None else retryable
        self.data = data or {}
        # The id of the request being answered, when it could be read from a
        # request that was otherwise invalid.
        self.request_id: int | str | None = None

    def error_data(self) -> dict[str, Any]:
        """The `data` member of the error object: the extras plus the three required keys."""
        return {
            **self.data,
            "statusCode": self.status_code,
            "errorCode": self.error_code,
            "retryable": self.retryable,
        }


class ParseError(RpcError):
    """The frame body is not valid UTF-8 JSON."""

    code = -32700
    default_status = 400
    default_error_code = "PARSE_ERROR"


class InvalidRequest(RpcError):
    """The body is JSON but not a valid JSON-RPC 2.0 request (or the batch is empty)."""

    code = -32600
    default_status = 400
    default_error_code = "INVALID_REQUEST"


class FrameError(InvalidRequest):
    """A length prefix the receiver rejects; the connection is closed after the answer."""


class InvalidFrame(FrameError):
    """A zero-length frame, or a connection that ended in the middle of a frame."""

    default_error_code = "INVALID_FRAME"


class FrameTooLarge(FrameError):
    """A length prefix above `max_frame_bytes`; no buffer of that size is ever allocated."""

    default_status = 413
    default_error_code = "FRAME_TOO_LARGE"


class BatchTooLarge(InvalidRequest):
    """A batch with more members than `max_batch`."""

    default_status = 413
    default_error_code = "BATCH_TOO_LARGE"


class MethodNotFound(RpcError):
    """No handler is registered under the requested method name."""

    code = -32601
    default_status = 404
    default_error_code = "METHOD_NOT_FOUND"


class InvalidParams(RpcError):
    """The params failed validation; `data.path` names the offending field (`$.a.b[0]`)."""

    code = -32602
    default_status = 400
    default_error_code = "INVALID_PARAMS"

    def __init__(self, message: str, *, path: str = "$", data: dict[str, Any] | None = None):
        super().__init__(message, data={"path": path, **(data or {})})
        self.path = path


class InternalError(RpcError):
    """A handler raised something unexpected; the traceback goes to the log, never the wire."""


class Forbidden(RpcError):
    """The peer's uid is not allowed; the connection is closed after the answer."""

    code = -32001
    default_status = 403
    default_error_code = "FORBIDDEN"


class AdminOnly(RpcError):
    """The method is only for the daemon's own uid and root; the connection stays open."""

    code = -32001
    default_status = 403
    default_error_code = "FORBIDDEN"


class ProtocolUnsupported(RpcError):
    """`pair.hello`: the caller's protocol range misses this daemon's (`data.protocol`)."""

    code = -32000
    default_status = 426
    default_error_code = "PROTOCOL_UNSUPPORTED"


class AnswersUnread(RpcError):
    """The connection's answers waiting to be read passed its budget: this call, not yet
    answered, was withdrawn (not run, or its work rolled back). Read, then send it again."""

    code = -32000
    default_status = 503
    default_error_code = "ANSWERS_UNREAD"
    default_retryable = True


class ShuttingDown(RpcError):
    """The daemon is draining for shutdown and takes no new calls; retry against the next one."""

    code = -32002
    default_status = 503
    default_error_code = "SHUTTING_DOWN"
    default_retryable = True


class RouteError(RpcError):
    """Raised by a route handler for a domain failure, with its own status and error code."""

    code = -32000

    def __init__(
        self,
        message: str,
        status_code: int,
        error_code: str,
        *,
        data: dict[str, Any] | None = None,
        retryable: bool = False,
    ) -> None:
        super().__init__(
            message,
            status_code=status_code,
            error_code=error_code,
            retryable=retryable,
            data=data,
        )


class DomainError(RouteError):
    """A route's domain failure whose codes are fixed by its class: one subclass per
    `errorCode`, so a daemon's whole vocabulary is one module (`<daemon>/errors.py`)."""

    def __init__(self, message: str, *, data: dict[str, Any] | None = None) -> None:
        RpcError.__init__(self, message, data=data)


class ResultTooLarge(RpcError):
    """An answer would make a frame over `max_frame_bytes`; it is replaced by this, for its id."""

    code = -32000
    default_status = 413
    default_error_code = "RESULT_TOO_LARGE"


class TooManyConnections(RpcError):
    """A connection arrived while the server held `max_connections`; it is closed after this."""

    code = -32000
    default_status = 503
    default_error_code = "TOO_MANY_CONNECTIONS"
    default_retryable = True


class IpcError(Exception):
    """Base of the two ways a client call can fail."""


class IpcHandlerError(IpcError):
    """The peer received the call and answered an error object.

    `code` is the stable symbolic `errorCode`; `rpc_code` the JSON-RPC integer.
    """

    def __init__(
        self,
        message: str,
        status_code: int,
        code: str,
        data: dict[str, Any],
        *,
        rpc_code: int = -32000,
    ) -> None:
        super().__init__(f"{code}: {message}")
        self.message = message
        self.status_code = status_code
        self.code = code
        self.data = data
        self.rpc_code = rpc_code

    @property
    def retryable(self) -> bool:
        return bool(self.data.get("retryable", False))


class IpcTransportError(IpcError):
    """No answer was obtained: socket missing, refused, reset, closed, timed out, or garbled.

    `sent` is True when the request had been written to the socket, so a
    non-idempotent call may or may not have been applied. `path` is the socket's
    when connecting to it failed.
    """

    def __init__(self, message: str, *, sent: bool, path: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.sent = sent
        self.path = path


class IncompatiblePeer(IpcTransportError):
    """The peer's handshake (`pair.hello`) says it cannot be talked to: its protocol range
    misses ours. Nothing was sent; the connection is closed, and a later call tries again
    (the peer may have been upgraded meanwhile)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, sent=False)
