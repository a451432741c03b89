"""SQLite values on the wire (PROTOCOL.md, "SQLite values on the wire").

Bind parameters are declared with `WireValue`, so msgspec rejects bad shapes
while decoding, with the exact `$.path`: integers outside signed 64 bits,
numbers that overflow to infinity, objects other than `{"$blob": base64}`.
"""

from __future__ import annotations

import base64
from typing import Annotated

from msgspec import Meta, Struct

INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1

Int64 = Annotated[int, Meta(ge=INT64_MIN, le=INT64_MAX)]
SqlValue = int | float | str | bytes | None


class Blob(Struct, forbid_unknown_fields=True, rename={"data": "$blob"}, gc=False):
    """`{"$blob": "<standard base64>"}` on the wire; bytes in SQLite."""

    data: bytes


WireValue = Int64 | float | str | bool | None | Blob
WireBind = list[WireValue] | dict[str, WireValue]
SqlBind = tuple[SqlValue, ...] | dict[str, SqlValue]


def from_wire(value: WireValue) -> SqlValue:
    """A decoded wire value as apsw binds it (`true`/`false` become 1/0)."""
    if type(value) is Blob:
        return value.data
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


_CONVERTED = frozenset({Blob, bool})


def to_wire(value: SqlValue) -> object:
    """A result cell as JSON: bytes become `{"$blob": base64}`, the rest passes through."""
    if type(value) is bytes:
        return {"$blob": base64.b64encode(value).decode("ascii")}
    return value
