"""The breaking-change check of rpc.discover documents, on documents generated the way the
daemons generate theirs: two releases of one method, as msgspec Structs."""

from __future__ import annotations

from typing import Annotated, Any, Literal

import pytest
from msgspec import Meta, Struct

from pair.protocol.dispatch import NoParams, Router, openrpc_document
from pair.protocol.evolution import breaking_changes


class Params(Struct, forbid_unknown_fields=True):
    name: Annotated[str, Meta(max_length=100)]
    mode: Literal["a", "b"] = "a"
    limit: int = 10


class Result(Struct):
    id: str
    count: int
    note: str | None = None


def document(params: type[Struct] = Params, result: Any = Result, admin: bool = False) -> Any:
    def method(p: Any) -> Any:
        raise NotImplementedError

    method.__annotations__ = {"p": params, "return": result}
    router = Router("test", "1")
    router.add("m", method, inline=True, admin=admin)
    return openrpc_document(router)


def test_a_release_that_only_adds_is_not_breaking() -> None:
    class MoreParams(Struct, forbid_unknown_fields=True):
        name: Annotated[str, Meta(max_length=200)]
        mode: Literal["a", "b", "c"] = "a"
        limit: int | None = 10
        extra: bool = False

    class MoreResult(Struct):
        id: str
        count: int
        note: str | None = None
        added: list[int] = []

    def other(p: NoParams) -> int:
        raise NotImplementedError

    other.__annotations__ = {"p": NoParams, "return": int}

    new = document(MoreParams, MoreResult)
    router = Router("test", "2")
    router.add("other", other, inline=True)
    new["methods"] += [m for m in openrpc_document(router)["methods"] if m["name"] == "other"]
    assert breaking_changes(document(), new) == []


class Removed(Struct, forbid_unknown_fields=True):
    name: Annotated[str, Meta(max_length=100)]
    mode: Literal["a", "b"] = "a"


class Required(Struct, forbid_unknown_fields=True):
    name: Annotated[str, Meta(max_length=100)]
    limit: int
    mode: Literal["a", "b"] = "a"


class Narrowed(Struct, forbid_unknown_fields=True):
    name: Annotated[str, Meta(max_length=50)]
    mode: Literal["a"] = "a"
    limit: int = 10


class Retyped(Struct, forbid_unknown_fields=True):
    name: Annotated[str, Meta(max_length=100)]
    mode: Literal["a", "b"] = "a"
    limit: str = "10"


class LostCount(Struct):
    id: str
    note: str | None = None


class OptionalCount(Struct):
    id: str
    count: int | None = None
    note: str | None = None


class WiderCount(Struct):
    id: str
    count: int | str
    note: str | None = None


@pytest.mark.parametrize(
    ("params", "result", "expected"),
    [
        (Removed, Result, ["m params $.limit: the member was removed"]),
        (Required, Result, ["m params $.limit: the member became required"]),
        (Narrowed, Result, ['m params $.mode: no longer accepts "b"',
                            "m params $.name: maxLength tightened to 50"]),
        (Retyped, Result, ["m params $.limit: the type narrowed (\"integer\")"]),
        (Params, LostCount, ["m result $.count: the member was removed"]),
        (Params, OptionalCount, ["m result $.count: the member became optional",
                                 "m result $.count: alternative 1 is new to its readers"]),
        (Params, WiderCount, ["m result $.count: alternative 1 is new to its readers"]),
    ],
    ids=["param removed", "param required", "params narrowed", "param retyped",
         "result member removed", "result member optional", "result type widened"],
)  # fmt: skip
def test_each_breaking_change_is_named(
    params: type[Struct], result: Any, expected: list[str]
) -> None:
    assert sorted(breaking_changes(document(), document(params, result))) == sorted(expected)


def test_a_removed_method_and_one_made_admin_only_are_breaking() -> None:
    old = document()
    without = [method for method in old["methods"] if method["name"] != "m"]
    assert breaking_changes(old, {**old, "methods": without}) == ["m: the method was removed"]
    assert breaking_changes(old, document(admin=True)) == ["m: the method became admin only"]
