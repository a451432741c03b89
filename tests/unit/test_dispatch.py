from __future__ import annotations

import msgspec
import pytest
from msgspec import Raw

from pair.protocol import trace
from pair.protocol.deferred import Deferred
from pair.protocol.dispatch import Kind, Method, Router, openrpc_document
from pair.protocol.errors import InvalidParams
from pair.protocol.hello import Hello
from pair.runtime.sqlite import Job


class Step(msgspec.Struct, forbid_unknown_fields=True, rename="camel"):
    sql: str
    require_changes: int | None = None


class TxParams(msgspec.Struct, forbid_unknown_fields=True, rename="camel"):
    steps: list[Step]
    timeout_ms: int = 5000


class TxResult(msgspec.Struct):
    ok: bool


async def transaction(params: TxParams) -> TxResult:
    """Run steps.

    In one transaction."""
    return TxResult(ok=True)


def method_of(router: Router, name: str) -> Method:
    method = router.get(name)
    assert method is not None, name
    return method


def make_router() -> Router:
    router = Router("test", "1.2.3")
    router.add("tx", transaction)
    return router


def decode(raw: bytes) -> object:
    return method_of(make_router(), "tx").decode_params(Raw(raw))


def same(params: object, expected: TxParams) -> bool:
    """`params` is a `TxParams` (with `_meta`, which a handler never reads) equal to it."""
    fields = msgspec.structs.fields(TxParams)
    return isinstance(params, TxParams) and all(
        getattr(params, f.name) == getattr(expected, f.name) for f in fields
    )


def test_named_params_decode_into_the_methods_struct() -> None:
    params = decode(b'{"steps":[{"sql":"x","requireChanges":1}],"timeoutMs":9}')
    assert same(params, TxParams(steps=[Step("x", 1)], timeout_ms=9))


def test_positional_params_map_onto_the_fields_in_order() -> None:
    assert same(decode(b'[[{"sql":"y"}], 7]'), TxParams(steps=[Step("y")], timeout_ms=7))


TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def test_every_method_takes_trace_context_in_meta_and_ignores_what_else_meta_holds() -> None:
    raw = f'{{"steps":[],"_meta":{{"traceparent":"{TRACEPARENT}","progressToken":1}}}}'
    params = decode(raw.encode())
    assert same(params, TxParams(steps=[]))
    span = trace.span_of(params.meta)  # type: ignore[attr-defined]
    assert span is not None
    assert (span.trace_id, span.parent_id) == (
        "4bf92f3577b34da6a3ce929d0e0e4736",
        "00f067aa0ba902b7",
    )
    assert span.span_id != span.parent_id
    # A later version of traceparent is read by its first four fields (W3C).
    later = TRACEPARENT.replace("00-", "01-", 1) + "-more"
    assert decode(f'{{"steps":[],"_meta":{{"traceparent":"{later}"}}}}'.encode())


@pytest.mark.parametrize(
    ("meta", "path"),
    [
        ('{"traceparent":"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7"}', "traceparent"),
        (
            '{"traceparent":"00-00000000000000000000000000000000-00f067aa0ba902b7-01"}',
            "traceparent",
        ),
        (
            '{"traceparent":"00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01"}',
            "traceparent",
        ),
        (
            '{"traceparent":"ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"}',
            "traceparent",
        ),
        (f'{{"traceparent":"{TRACEPARENT}\\n"}}', "traceparent"),
        (f'{{"traceparent":"{TRACEPARENT}-x"}}', "traceparent"),
        ('{"traceparent":7}', "traceparent"),
        (f'{{"traceparent":"{TRACEPARENT}","tracestate":"{"a" * 513}"}}', "tracestate"),
        ("[]", ""),
    ],
)
def test_malformed_trace_context_is_invalid_params_at_its_path(meta: str, path: str) -> None:
    with pytest.raises(InvalidParams) as caught:
        decode(f'{{"steps":[],"_meta":{meta}}}'.encode())
    assert caught.value.error_data()["path"] == "$._meta" + (f".{path}" if path else "")
    if "matching" in caught.value.message or "W3C" in caught.value.message:
        assert "00-<32 hex digits: trace id>" in caught.value.message


def test_hello_names_the_trace_capability() -> None:
    hello = method_of(make_router(), "pair.hello")
    answer = hello.handler(hello.decode_params(Raw(b"{}")))
    assert isinstance(answer, Hello)
    assert trace.CAPABILITY in answer.capabilities


@pytest.mark.parametrize(
    ("raw", "message", "path"),
    [
        (
            b'{"steps":[{"sql":"x","requireChanges":"1"}]}',
            "Expected `int | null`, got `str` - at `$.steps[0].requireChanges`",
            "$.steps[0].requireChanges",
        ),
        (
            b'{"steps":[{"sql":"x"}],"timeout":1}',
            "Object contains unknown field `timeout`",
            "$.timeout",
        ),
        (
            b'{"steps":[{}]}',
            "Object missing required field `sql` - at `$.steps[0]`",
            "$.steps[0].sql",
        ),
        (b"{}", "Object missing required field `steps`", "$.steps"),
        (b"[[], 1, 2]", "tx takes at most 2 positional params, got 3", "$[2]"),
    ],
)
def test_invalid_params_carry_msgspecs_message_and_the_field_path(
    raw: bytes, message: str, path: str
) -> None:
    with pytest.raises(InvalidParams) as caught:
        decode(raw)
    assert caught.value.message == message
    assert caught.value.error_data()["path"] == path


def test_a_method_registered_twice_is_a_programming_error() -> None:
    router = make_router()
    with pytest.raises(ValueError, match="registered twice"):
        router.add("tx", transaction)


def deferred_tx(params: TxParams) -> Deferred[TxResult]:
    """Run steps on a database thread."""
    raise NotImplementedError


def job_tx(params: TxParams) -> Job[TxResult]:
    raise NotImplementedError


def test_a_deferred_method_is_described_by_the_result_it_defers() -> None:
    router = Router("test", "1.2.3")
    router.add("tx", deferred_tx)
    method = method_of(router, "tx")
    assert method.kind is Kind.DEFERRED
    assert method.result_type is TxResult
    described = {m["name"]: m for m in openrpc_document(router)["methods"]}
    result = described["tx"]["result"]["schema"]
    assert result == {"$ref": "#/components/schemas/TxResult"}


def test_a_job_handler_not_annotated_as_deferred_is_refused_at_registration() -> None:
    with pytest.raises(TypeError, match="Deferred"):
        Router("test", "1.2.3").add("tx", job_tx)


def plain_tx(params: TxParams) -> TxResult:
    return TxResult(ok=True)


def test_a_plain_handler_says_whether_it_blocks() -> None:
    router = Router("test", "1.2.3")
    with pytest.raises(TypeError, match=r"inline=True .* or thread=True"):
        router.add("tx", plain_tx)
    router.add("inline", plain_tx, inline=True)
    router.add("thread", plain_tx, thread=True)
    router.add("task", transaction)
    kinds = [method_of(router, name).kind for name in ("inline", "thread", "task")]
    assert kinds == [Kind.INLINE, Kind.THREAD, Kind.TASK]


def test_the_openrpc_document_describes_params_and_result_from_the_types() -> None:
    document = openrpc_document(make_router())
    assert document["info"] == {"title": "test", "version": "1.2.3"}
    tx = next(m for m in document["methods"] if m["name"] == "tx")
    assert tx["summary"] == "Run steps."
    assert [(p["name"], p["required"]) for p in tx["params"]] == [
        ("steps", True),
        ("timeoutMs", False),
    ]
    step = document["components"]["schemas"]["Step"]
    assert set(step["properties"]) == {"sql", "requireChanges"}
    assert tx["result"]["schema"] == {"$ref": "#/components/schemas/TxResult"}
