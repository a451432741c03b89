"""JSON-RPC 2.0 envelopes as msgspec Structs, with their encoders and decoders built once.

Requests are decoded in two stages: the envelope here (with `params` kept as
raw JSON), then the method's own params type in `protocol.dispatch`, so that
each failure maps to exactly one JSON-RPC code.
"""

from __future__ import annotations

from typing import Any

import msgspec
from msgspec import UNSET, Raw, Struct, UnsetType

from pair.protocol.errors import InvalidRequest, ParseError, RpcError

RequestId = int | str | None

JSONRPC_VERSION = "2.0"


class Request(Struct, gc=False):
    """A request or, when `id` is UNSET, a notification. Unknown members are ignored."""

    jsonrpc: str
    method: str
    id: RequestId | UnsetType = UNSET
    params: Raw = Raw()

    @property
    def is_notification(self) -> bool:
        return self.id is UNSET


class ErrorObject(Struct, gc=False):
    code: int
    message: str
    data: dict[str, Any]


class SuccessResponse(Struct, gc=False):
    jsonrpc: str
    id: RequestId
    result: Any


class ErrorResponse(Struct, gc=False):
    jsonrpc: str
    id: RequestId
    error: ErrorObject


class ClientResponse(Struct, gc=False):
    """A response as a client reads it: exactly one of `result` / `error` is set."""

    id: RequestId
    jsonrpc: str = JSONRPC_VERSION
    result: Raw = Raw()
    error: ErrorObject | UnsetType = UNSET


Response = SuccessResponse | ErrorResponse

_request_decoder = msgspec.json.Decoder(Request)
_batch_decoder = msgspec.json.Decoder(list[Raw])
_any_decoder = msgspec.json.Decoder()


def error_response(request_id: RequestId, error: RpcError) -> ErrorResponse:
    return ErrorResponse(
        JSONRPC_VERSION,
        request_id,
        ErrorObject(error.code, error.message, error.error_data()),
    )


def success_response(request_id: RequestId, result: Any) -> SuccessResponse:
    return SuccessResponse(JSONRPC_VERSION, request_id, result)


_OPEN_ARRAY = ord("[")
_OPEN_OBJECT = ord("{")
_BLANKS = frozenset(b" \t\r\n")


def is_batch(body: bytes) -> bool:
    """True when the body's first non-blank byte opens a JSON array (without copying it)."""
    # The usual body is one request object, told by its first byte with no loop.
    if body[0] == _OPEN_OBJECT:
        return False
    for byte in body:
        if byte not in _BLANKS:
            return byte == _OPEN_ARRAY
    return False


def decode_request(body: bytes | Raw) -> Request:
    """Decode one request envelope.

    Raises `ParseError` when the body is not UTF-8 JSON (bytes anywhere in
    it, or nesting too deep to decode) and `InvalidRequest` when it is JSON
    but not a request; the latter carries the request's id in `request_id`
    when one could be read, so the answer can echo it. A batch member (`Raw`)
    is not checked again: its batch was.
    """
    if type(body) is bytes:
        check_utf8(body)
    try:
        request = _request_decoder.decode(body)
    except msgspec.ValidationError as exc:
        raise _invalid_request(body, str(exc)) from exc
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:
        raise ParseError(f"invalid JSON: {exc}") from exc
    except RecursionError as exc:
        raise _too_deep() from exc
    if request.jsonrpc != JSONRPC_VERSION:
        raise _with_id(
            InvalidRequest(f'"jsonrpc" must be "2.0", got {request.jsonrpc!r}'), request.id
        )
    first = bytes(request.params)[:1]
    if first and first not in (b"{", b"["):
        raise _with_id(InvalidRequest('"params" must be an object or an array'), request.id)
    return request


def request_id_of(body: bytes) -> RequestId | UnsetType:
    """The id of the request in `body` as far as it can be read: UNSET for a
    notification, None when there is no readable id (a batch, broken JSON)."""
    try:
        request = decode_request(body)
    except RpcError as exc:
        return exc.request_id
    except Exception:
        return None
    return request.id


def _with_id(error: RpcError, request_id: RequestId | UnsetType) -> RpcError:
    # An invalid request is answered even without an id (JSON-RPC 2.0, section
    # 5: the id is then null); only valid notifications go unanswered.
    if request_id is not UNSET:
        error.request_id = request_id
    return error


def _invalid_request(body: bytes | Raw, reason: str) -> RpcError:
    # msgspec validates while it parses, so a body that is broken JSON after a
    # type mismatch reports the mismatch; re-parse untyped to classify it.
    try:
        value = _any_decoder.decode(body)
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:
        return ParseError(f"invalid JSON: {exc}")
    except RecursionError:
        return _too_deep()
    error = InvalidRequest(f"not a valid JSON-RPC 2.0 request: {reason}")
    if isinstance(value, dict):
        request_id = value.get("id")
        if isinstance(request_id, str | int) and not isinstance(request_id, bool):
            error.request_id = request_id
    return error


def decode_batch(body: bytes) -> list[Raw]:
    """Decode a batch body into its members, each still raw JSON; `ParseError` as above."""
    check_utf8(body)
    try:
        return _batch_decoder.decode(body)
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:
        raise ParseError(f"invalid JSON: {exc}") from exc
    except RecursionError as exc:
        raise _too_deep() from exc


def check_utf8(body: bytes) -> None:
    """Raise `ParseError` unless the whole body is UTF-8.

    msgspec checks only the strings it decodes: a member it skips, or one kept
    as `Raw` (like `params`, until its method decodes it), is not looked at.
    """
    if body.isascii():
        return
    try:
        body.decode()
    except UnicodeDecodeError as exc:
        raise ParseError(
            f"invalid JSON: the body is not UTF-8 ({exc.reason} at byte {exc.start})"
        ) from exc


def _too_deep() -> ParseError:
    # msgspec raises RecursionError past Python's recursion limit, which counts
    # the frames already on the stack: the depth refused is about 1000 less them.
    return ParseError("invalid JSON: nested too deeply to decode")
