"""What a client makes of an answer: its result, decoded to the type asked for, or the
peer's error rebuilt as `IpcHandlerError` (by `errorCode`, never by position)."""

from __future__ import annotations

from typing import Any

import msgspec
from msgspec import UNSET, Raw

from pair.protocol.errors import IpcHandlerError, IpcTransportError
from pair.protocol.messages import ClientResponse, ErrorObject

_any_decoder = msgspec.json.Decoder()
_typed_decoders: dict[Any, msgspec.json.Decoder[Any]] = {}


def _decoder_for(result_type: Any) -> msgspec.json.Decoder[Any]:
    decoder = _typed_decoders.get(result_type)
    if decoder is None:
        decoder = _typed_decoders[result_type] = msgspec.json.Decoder(result_type)
    return decoder


def handler_error(error: ErrorObject) -> IpcHandlerError:
    """Rebuild the peer's error from its error object, keyed by `errorCode`."""
    data = error.data if isinstance(error.data, dict) else {}
    return IpcHandlerError(
        error.message,
        int(data.get("statusCode", 500)),
        str(data.get("errorCode", "UNKNOWN")),
        data,
        rpc_code=error.code,
    )


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
