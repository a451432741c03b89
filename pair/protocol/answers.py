"""What a client makes of an answer: its result, decoded to the type asked for, or the
peer's error rebuilt as `IpcHandlerError` (by `errorCode`, never by position)."""

from __future__ import annotations

import re
from typing import Any

import msgspec
from msgspec import UNSET, Raw

from pair.protocol.errors import IpcHandlerError, IpcTransportError
from pair.protocol.messages import ClientResponse, ErrorObject

# What PROTOCOL.md's error object carries: an HTTP-like status and an upper-case code.
# Anything else a peer sends is read as a 500 named UNKNOWN, so that neither a crash
# nor a megabyte or a terminal escape gets in through them (they reach logs and pairctl).
STATUSES = range(100, 600)
UNKNOWN_STATUS = 500
ERROR_CODE = re.compile(r"[A-Z][A-Z0-9_]{0,63}")
UNKNOWN_CODE = "UNKNOWN"

_any_decoder = msgspec.json.Decoder()
_typed_decoders: dict[Any, msgspec.json.Decoder[Any]] = {}


def _decoder_for(result_type: Any) -> msgspec.json.Decoder[Any]:
    decoder = _typed_decoders.get(result_type)
    if decoder is None:
        decoder = _typed_decoders[result_type] = msgspec.json.Decoder(result_type)
    return decoder


def handler_error(error: ErrorObject) -> IpcHandlerError:
    """Rebuild the peer's error from its error object, keyed by `errorCode`.

    Never raises, whatever the peer put in `data`: a `statusCode` that is not an
    HTTP-like status is a 500, an `errorCode` that is not a code's name is
    `UNKNOWN`, and a `retryable` that is not a bool is false.
    """
    data = error.data if isinstance(error.data, dict) else {}
    if not isinstance(data.get("retryable", False), bool):
        data = {**data, "retryable": False}
    return IpcHandlerError(
        error.message,
        _status_of(data.get("statusCode")),
        _code_of(data.get("errorCode")),
        data,
        rpc_code=error.code,
    )


def _status_of(value: object) -> int:
    # `type() is int`: a bool is an int to Python, never a status to a peer.
    return value if type(value) is int and value in STATUSES else UNKNOWN_STATUS


def _code_of(value: object) -> str:
    return value if isinstance(value, str) and ERROR_CODE.fullmatch(value) else UNKNOWN_CODE


def result_of(response: ClientResponse, result_type: Any) -> Any:
    if response.error is not UNSET:
        raise handler_error(response.error)
    raw: Raw = response.result
    if not raw:
        raise IpcTransportError("answer has neither result nor error", sent=True)
    decoder = _any_decoder if result_type is None else _decoder_for(result_type)
    try:
        return decoder.decode(raw)
    except msgspec.ValidationError as exc:
        raise IpcTransportError(
            f"answer does not match the expected type: {exc}", sent=True
        ) from exc
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError) as exc:
        # The envelope skipped `result` unchecked: this is where bad bytes show.
        raise IpcTransportError(f"protocol violation by the peer: {exc!r}", sent=True) from exc
