"""SQLite values on the wire (PROTOCOL.md, "SQLite values on the wire").

Bind parameters are declared with `WireValue`, so msgspec rejects bad shapes
while decoding, with the exact `$.path`: integers outside signed 64 bits,
numbers that overflow to infinity, objects other than `{"$blob": base64}` and
`{"$real": "Infinity" | "-Infinity" | "NaN"}`.
"""

from __future__ import annotations

import base64
import math
from typing import Annotated, Literal

from msgspec import UNSET, Meta, Struct, UnsetType

INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1

Int64 = Annotated[int, Meta(ge=INT64_MIN, le=INT64_MAX)]
SqlValue = int | float | str | bytes | None


NonFinite = Literal["Infinity", "-Infinity", "NaN"]
_NON_FINITE: dict[str, float] = {"Infinity": math.inf, "-Infinity": -math.inf, "NaN": math.nan}


class Tagged(
    Struct, forbid_unknown_fields=True, rename={"blob": "$blob", "real": "$real"}, gc=False
):
    """A value JSON has no plain form for: `{"$blob": "<standard base64>"}` (bytes in
    SQLite) or `{"$real": "Infinity" | "-Infinity" | "NaN"}` (a non-finite REAL).

    One object type for both: msgspec allows one object-shaped type per union.
    """

    blob: bytes | UnsetType = UNSET
    real: NonFinite | UnsetType = UNSET

    def __post_init__(self) -> None:
        if (self.blob is UNSET) == (self.real is UNSET):
            raise ValueError('an object value holds exactly one of "$blob" or "$real"')

    @property
    def value(self) -> bytes | float:
        if self.blob is not UNSET:
            return self.blob
        assert self.real is not UNSET
        return _NON_FINITE[self.real]


WireValue = Int64 | float | str | bool | None | Tagged
WireBind = list[WireValue] | dict[str, WireValue]
SqlBind = tuple[SqlValue, ...] | dict[str, SqlValue]


def from_wire(value: WireValue) -> SqlValue:
    """A decoded wire value as apsw binds it (`true`/`false` become 1/0)."""
    if type(value) is Tagged:
        return value.value
    if type(value) is bool:
        return int(value)
    return value  # type: ignore[return-value]


def bind_from_wire(bind: WireBind | None) -> SqlBind | None:
    """Positional binds become a tuple, named binds a dict, as apsw takes them."""
    if bind is None:
        return None
    if isinstance(bind, list):
        if _CONVERTED.isdisjoint(map(type, bind)):
            return tuple(bind)  # type: ignore[arg-type]
        return tuple(from_wire(value) for value in bind)
    return {name: from_wire(value) for name, value in bind.items()}


_CONVERTED = frozenset({Tagged, bool})


def to_wire(value: SqlValue) -> object:
    """A result cell as JSON: bytes become `{"$blob": base64}`, a non-finite REAL
    `{"$real": ...}`, the rest passes through."""
    if type(value) is bytes:
        return {"$blob": base64.b64encode(value).decode("ascii")}
    if type(value) is float and not math.isfinite(value):
        return {"$real": "NaN" if value != value else "Infinity" if value > 0 else "-Infinity"}
    return value
