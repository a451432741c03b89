"""Trace context: what a caller may send in `_meta`, and what an outbox event keeps of it."""

from __future__ import annotations

import json
import re

from hypothesis import given
from hypothesis import strategies as st
from msgspec import Raw, Struct

from pair.gateway.outbox import delivery_span, new_event_id
from pair.protocol import trace
from pair.protocol.dispatch import Method, Router
from pair.protocol.errors import InvalidParams


class Params(Struct, forbid_unknown_fields=True):
    n: int = 0


def handler(params: Params) -> int:
    return params.n


def method() -> Method:
    router = Router("test", "0")
    router.add("m", handler, inline=True)
    found = router.get("m")
    assert found is not None
    return found


METHOD = method()

HEX = "0123456789abcdef"
traceparents = st.one_of(
    st.text(max_size=80),
    st.builds(
        "{}-{}-{}-{}{}".format,
        st.text(HEX + "F", min_size=2, max_size=2),
        st.text(HEX, min_size=31, max_size=33),
        st.text(HEX, min_size=15, max_size=17),
        st.text(HEX, min_size=2, max_size=2),
        st.sampled_from(["", "-", "-x", "\n"]),
    ),
)


@given(traceparents)
def test_any_traceparent_is_a_span_under_it_or_invalid_params_at_its_path(text: str) -> None:
    body = json.dumps({"n": 1, "_meta": {"traceparent": text}}).encode()
    try:
        params = METHOD.decode_params(Raw(body))
    except InvalidParams as exc:
        path = exc.error_data()["path"]
    else:
        path = None
    if path is not None:
        assert path == "$._meta.traceparent"
        return
    span = trace.span_of(params.meta)
    assert span is not None
    assert re.fullmatch("[0-9a-f]{32}", span.trace_id)
    assert span.trace_id != "0" * 32
    assert span.parent_id is not None
    assert span.parent_id != "0" * 16
    assert text.split("-")[1:3] == [span.trace_id, span.parent_id]
    assert re.fullmatch(r"00-[0-9a-f]{32}-[0-9a-f]{16}-01", span.traceparent)


def test_an_event_id_keeps_the_trace_of_the_call_that_queued_it() -> None:
    queued_by = trace.Span.new()
    event_id = new_event_id(queued_by)
    assert re.fullmatch("ev_[0-9a-f]{60}", event_id)
    delivery = delivery_span(event_id)
    assert (delivery.trace_id, delivery.parent_id) == (queued_by.trace_id, queued_by.span_id)
    assert delivery.span_id != queued_by.span_id
    # One queued by 0.1.0 (`ev_` and 32 hex digits) is delivered under a new trace.
    older = delivery_span("ev_0193a5b2c3d4" + "ab" * 10)
    assert older.parent_id is None
    assert older.trace_id != queued_by.trace_id


def test_ids_of_events_queued_in_one_millisecond_of_one_trace_sort_by_time_and_differ() -> None:
    span = trace.Span.new()
    ids = [new_event_id(span.child()) for _ in range(1000)]
    assert len(set(ids)) == 1000
    assert sorted(ids, key=lambda i: i[3:15]) == ids
