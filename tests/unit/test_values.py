from __future__ import annotations

import math

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from pair.protocol.dispatch import invalid_params
from pair.protocol.errors import InvalidParams
from pair.protocol.values import INT64_MAX, INT64_MIN, SqlValue, WireBind, bind_from_wire, to_wire


class Params(msgspec.Struct, forbid_unknown_fields=True):
    bind: WireBind


_decoder = msgspec.json.Decoder(Params)


def wire_round_trip(value: SqlValue) -> SqlValue:
    body = msgspec.json.encode({"bind": [to_wire(value)]})
    bound = bind_from_wire(_decoder.decode(body).bind)
    assert isinstance(bound, tuple)
    return bound[0]


def decode_bind(body: bytes) -> object:
    try:
        return bind_from_wire(_decoder.decode(body).bind)
    except msgspec.ValidationError as exc:
        raise invalid_params(exc) from exc


@given(st.integers(min_value=INT64_MIN, max_value=INT64_MAX))
def test_every_int64_survives_the_wire_exactly(value: int) -> None:
    assert wire_round_trip(value) == value


@given(st.binary(max_size=512))
def test_every_blob_survives_the_wire(value: bytes) -> None:
    assert wire_round_trip(value) == value


@given(st.floats(allow_nan=False, allow_infinity=False))
def test_reals_stay_reals(value: float) -> None:
    result = wire_round_trip(value)
    assert isinstance(result, float)
    assert result == value or (math.isclose(result, value) and result == 0.0)


@given(st.text())
def test_text_survives_the_wire(value: str) -> None:
    assert wire_round_trip(value) == value


def test_a_real_with_a_fraction_is_encoded_as_a_real() -> None:
    assert msgspec.json.encode(to_wire(1.0)) == b"1.0"


def test_booleans_bind_as_integers_and_null_as_null() -> None:
    assert decode_bind(b'{"bind":[true,false,null]}') == (1, 0, None)


def test_named_binds_become_a_dict() -> None:
    assert decode_bind(b'{"bind":{"a":1,"b":{"$blob":"AAE="}}}') == {"a": 1, "b": b"\x00\x01"}


@pytest.mark.parametrize(
    ("body", "message", "path"),
    [
        (b'{"bind":[9223372036854775808]}', "Expected `int` <= 9223372036854775807", "$.bind[0]"),
        (
            b'{"bind":[1,-9223372036854775809]}',
            "Expected `int` >= -9223372036854775808",
            "$.bind[1]",
        ),
        (b'{"bind":[1e999]}', "Number out of range", "$.bind[0]"),
        (b'{"bind":[{"$blob":"not base64!"}]}', "Invalid base64 encoded string", "$.bind[0].$blob"),
        (b'{"bind":[{"blob":"AA=="}]}', "unknown field `blob`", "$.bind[0].blob"),
        (b'{"bind":[[1]]}', "got `array`", "$.bind[0]"),
        (b'{"bind":[{"$real":"Inf"}]}', "Invalid enum value 'Inf'", "$.bind[0].$real"),
        (b'{"bind":[{}]}', 'exactly one of "$blob" or "$real"', "$.bind[0]"),
        (b'{"bind":[{"$real":"NaN","$blob":""}]}', 'exactly one of "$blob"', "$.bind[0]"),
        (b'{"bind":3}', "Expected `object | array`, got `int`", "$.bind"),
    ],
)
def test_bad_values_are_invalid_params_with_the_path(body: bytes, message: str, path: str) -> None:
    with pytest.raises(InvalidParams) as caught:
        decode_bind(body)
    assert message in caught.value.message
    assert caught.value.path == path


@pytest.mark.parametrize("value", [math.inf, -math.inf])
def test_a_non_finite_real_survives_the_wire_as_real(value: float) -> None:
    assert msgspec.json.encode(to_wire(value)) in (
        b'{"$real":"Infinity"}',
        b'{"$real":"-Infinity"}',
    )
    assert wire_round_trip(value) == value


def test_nan_survives_the_wire() -> None:
    assert to_wire(math.nan) == {"$real": "NaN"}
    assert math.isnan(float(wire_round_trip(math.nan) or 0))
