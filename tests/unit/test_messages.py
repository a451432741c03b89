from __future__ import annotations

import contextlib

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from pair.protocol.dispatch import Router
from pair.protocol.errors import InvalidRequest, ParseError, RpcError
from pair.protocol.messages import decode_batch, decode_request, request_id_of
from pair.protocol.values import WireValue


def test_a_request_keeps_its_params_raw_until_the_method_is_known() -> None:
    request = decode_request(b'{"jsonrpc":"2.0","id":7,"method":"m","params":{"a":[1]}}')
    assert (request.id, request.method, bytes(request.params)) == (7, "m", b'{"a":[1]}')
    assert not request.is_notification


def test_a_missing_id_is_a_notification_and_a_null_id_is_not() -> None:
    assert decode_request(b'{"jsonrpc":"2.0","method":"m"}').is_notification
    request = decode_request(b'{"jsonrpc":"2.0","method":"m","id":null}')
    assert not request.is_notification
    assert request.id is None


def test_unknown_envelope_members_are_ignored() -> None:
    request = decode_request(b'{"jsonrpc":"2.0","id":"x","method":"m","extra":{"k":1}}')
    assert request.id == "x"


def test_invalid_utf8_is_a_parse_error() -> None:
    with pytest.raises(ParseError, match="invalid JSON"):
        decode_request(b'{"jsonrpc":"2.0","method":"\xff\xfe"}')


def test_truncated_json_is_a_parse_error() -> None:
    with pytest.raises(ParseError, match="invalid JSON: Input data was truncated"):
        decode_request(b'{"jsonrpc":"2.0","id":1')


def test_a_type_mismatch_before_broken_json_is_still_a_parse_error() -> None:
    with pytest.raises(ParseError):
        decode_request(b'{"jsonrpc":2,"id":1,,,')


@pytest.mark.parametrize(
    ("body", "message", "echoed_id"),
    [
        (b'{"jsonrpc":"2.0","id":true,"method":"m"}', "got `bool` - at `$.id`", None),
        (b'{"jsonrpc":"2.0","id":1.5,"method":"m"}', "got `float` - at `$.id`", None),
        (b'{"jsonrpc":"2.0","id":{},"method":"m"}', "got `object` - at `$.id`", None),
        (b'{"jsonrpc":"1.0","id":4,"method":"m"}', '"jsonrpc" must be "2.0"', 4),
        (b'{"id":5,"method":"m"}', "missing required field `jsonrpc`", 5),
        (b'{"jsonrpc":"2.0","id":"a","method":3}', "got `int` - at `$.method`", "a"),
        (b'{"jsonrpc":"2.0","id":6,"method":"m","params":3}', "object or an array", 6),
        (b'{"jsonrpc":"2.0","id":6,"method":"m","params":"s"}', "object or an array", 6),
        (b"42", "Expected `object`, got `int`", None),
    ],
)
def test_invalid_requests_name_the_problem_and_keep_a_readable_id(
    body: bytes, message: str, echoed_id: object
) -> None:
    with pytest.raises(InvalidRequest) as caught:
        decode_request(body)
    assert message in caught.value.message
    assert caught.value.request_id == echoed_id
    assert caught.value.error_data()["errorCode"] == "INVALID_REQUEST"


@given(st.binary(max_size=200))
def test_arbitrary_bodies_decode_or_raise_a_protocol_error(body: bytes) -> None:
    with contextlib.suppress(ParseError, InvalidRequest):
        decode_request(body)


class _Params(msgspec.Struct, forbid_unknown_fields=True):
    value: WireValue = None
    items: list[dict[str, int]] = []


def _handler(params: _Params) -> None:
    return None


_router = Router("unit", "0")
_router.add("m", _handler, inline=True)
_found = _router.get("m")
assert _found is not None
_method = _found


@given(
    prefix=st.sampled_from([b"", b'{"jsonrpc":"2.0","id":1,"method":"m","params":', b'[{"x":']),
    depth=st.integers(0, 5000),
    middle=st.binary(max_size=40),
    suffix=st.sampled_from([b"", b"}", b"]}"]),
)
def test_any_bytes_at_any_depth_raise_only_protocol_errors(
    prefix: bytes, depth: int, middle: bytes, suffix: bytes
) -> None:
    """Every stage that parses bytes: a result or an RpcError, never another exception."""
    body = prefix + b"[" * depth + middle + b"]" * depth + suffix
    with contextlib.suppress(RpcError):
        decode_request(body)
    with contextlib.suppress(RpcError):
        decode_batch(body)
    with contextlib.suppress(RpcError):
        _method.decode_params(msgspec.Raw(b"[" * depth + middle + b"]" * depth))
    request_id_of(body)


@pytest.mark.parametrize(
    "body",
    [
        b'{"jsonrpc":"2.0","id":1,"method":"m","x":"\xed\xa0\x80"}',
        b'{"jsonrpc":"2.0","id":1,"method":"m","params":{"value":"\xff"}}',
        b'[{"jsonrpc":"2.0","id":1,"method":"m","params":["\xc0\xaf"]}]',
    ],
)
def test_invalid_utf8_skipped_by_the_decoder_is_still_a_parse_error(body: bytes) -> None:
    decode = decode_batch if body.startswith(b"[") else decode_request
    with pytest.raises(ParseError, match="not UTF-8"):
        decode(body)


def test_params_nested_too_deeply_are_a_parse_error_not_a_recursion_error() -> None:
    with pytest.raises(ParseError, match="nested too deeply"):
        _method.decode_params(msgspec.Raw(b"[" * 100_000 + b"]" * 100_000))
