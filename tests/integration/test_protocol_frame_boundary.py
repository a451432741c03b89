"""One boundary per frame: whatever a frame holds, it costs that frame alone (PROTOCOL.md, Framing).

Each malformed frame is sent between a call already in flight and a good call
on the same connection: the bad frame gets its one error, and both others get
their answers on a connection that stays open.
"""

from __future__ import annotations

import json

import pytest

from pair.testing.daemons import DaemonProcess
from tests.support.raw import RawConnection

DEEP = 100_000
IN_FLIGHT_SECONDS = 0.5


def deep_array(depth: int = DEEP) -> bytes:
    return b"[" * depth + b"]" * depth


def deep_object(depth: int = DEEP) -> bytes:
    return b'{"a":' * depth + b"1" + b"}" * depth


def envelope(tail: bytes, request_id: bytes = b"3", method: bytes = b'"echo"') -> bytes:
    return b'{"jsonrpc":"2.0","id":' + request_id + b',"method":' + method + tail + b"}"


TOO_DEEP = {
    "the whole body": deep_array(),
    "an ignored member (array)": envelope(b',"x":' + deep_array()),
    "an ignored member (object)": envelope(b',"x":' + deep_object()),
    "the id": envelope(b"", request_id=deep_array()),
    "the method": envelope(b"", method=deep_object()),
    "params (array)": envelope(b',"params":' + deep_array()),
    "a value inside params": envelope(b',"params":{"value":' + deep_object() + b"}"),
    "a batch member": b'[{"jsonrpc":"2.0","id":3,"method":"echo"},' + deep_array() + b"]",
    "a batch member's params": b"[" + envelope(b',"params":{"value":' + deep_array() + b"}") + b"]",
}

# Each kind of bad UTF-8: a stray continuation byte, a UTF-16 surrogate, an
# overlong form, a sequence cut short, a byte that never occurs.
NOT_UTF8 = {
    "a string in params": envelope(b',"params":{"text":"\xff"}'),
    "an ignored member (surrogate)": envelope(b',"x":"\xed\xa0\x80"'),
    "an ignored member's key": envelope(b',"\xc0\xaf":1'),
    "the method": envelope(b"", method=b'"ec\x80ho"'),
    "the id": envelope(b"", request_id=b'"\xe2\x82"'),
    "a value inside params": envelope(b',"params":{"value":{"$blob":"\xfe"}}'),
    "params kept raw": envelope(b',"params":["\xf8\x88\x80\x80\x80"]'),
    "a batch member's ignored member": b"[" + envelope(b',"x":"\xed\xbf\xbf"') + b"]",
    "a batch member's params": b"[" + envelope(b',"params":{"text":"\xc3"}') + b"]",
}


def answers_by_id(conn: RawConnection, count: int) -> dict[object, list[dict[str, object]]]:
    answers: dict[object, list[dict[str, object]]] = {}
    for _ in range(count):
        answer = conn.recv_json()
        assert isinstance(answer, dict), answer
        answers.setdefault(answer["id"], []).append(answer)
    return answers


def send_between_good_calls(socket_path: str, body: bytes) -> dict[str, object]:
    """Send a slow call, `body`, then a quick call; the error `body` got."""
    with RawConnection(socket_path) as conn:
        conn.send_json(
            {"jsonrpc": "2.0", "id": 1, "method": "sleep", "params": [IN_FLIGHT_SECONDS]}
        )
        conn.send_frame(body)
        conn.send_json({"jsonrpc": "2.0", "id": 2, "method": "echo", "params": {"text": "ok"}})
        answers = answers_by_id(conn, 3)
        assert answers[1] == [{"jsonrpc": "2.0", "id": 1, "result": IN_FLIGHT_SECONDS}]
        assert answers[2] == [{"jsonrpc": "2.0", "id": 2, "result": {"value": None, "text": "ok"}}]
        assert conn.call({"jsonrpc": "2.0", "id": 4, "method": "pid"})["id"] == 4
        (bad,) = [
            answer for key, answers in answers.items() if key not in (1, 2) for answer in answers
        ]
        return bad


def assert_parse_error(answer: dict[str, object]) -> None:
    assert answer["id"] is None
    error = answer["error"]
    assert isinstance(error, dict)
    assert (error["code"], error["data"]["statusCode"], error["data"]["errorCode"]) == (
        -32700,
        400,
        "PARSE_ERROR",
    )
    assert error["data"]["retryable"] is False


@pytest.mark.parametrize("body", TOO_DEEP.values(), ids=TOO_DEEP.keys())
def test_nesting_too_deep_anywhere_is_a_parse_error_and_costs_nothing_else(
    demo_socket: str, body: bytes
) -> None:
    answer = send_between_good_calls(demo_socket, body)
    assert_parse_error(answer)
    assert "nested too deeply" in answer["error"]["message"]  # type: ignore[index]


@pytest.mark.parametrize("body", NOT_UTF8.values(), ids=NOT_UTF8.keys())
def test_invalid_utf8_anywhere_is_a_parse_error_and_costs_nothing_else(
    demo_socket: str, body: bytes
) -> None:
    answer = send_between_good_calls(demo_socket, body)
    assert_parse_error(answer)
    assert "not UTF-8" in answer["error"]["message"]  # type: ignore[index]


def test_nesting_the_decoder_accepts_is_answered_normally(demo_socket: str) -> None:
    with RawConnection(demo_socket) as conn:
        conn.send_frame(envelope(b',"x":' + deep_array(50) + b',"params":{"text":"deep"}'))
        answer = conn.recv_json()
    assert answer == {"jsonrpc": "2.0", "id": 3, "result": {"value": None, "text": "deep"}}


def test_a_bug_met_in_one_frame_is_logged_once_and_answers_that_frame_alone(
    demo: DaemonProcess, demo_socket: str
) -> None:
    buggy = json.dumps({"jsonrpc": "2.0", "id": 7, "method": "buggy", "params": {"bug": True}})
    for _ in range(3):
        answer = send_between_good_calls(demo_socket, buggy.encode())
        assert answer["id"] == 7
        error = answer["error"]
        assert isinstance(error, dict)
        assert (error["code"], error["data"]["errorCode"]) == (-32603, "INTERNAL_ERROR")
        assert "a bug in a params type" not in json.dumps(answer)
    log = demo.stderr()
    # Once per connection: three connections, three tracebacks, no more.
    assert log.count("RuntimeError: a bug in a params type") == 3
    assert log.count("Traceback") == 3


def test_a_repeated_bug_on_one_connection_logs_one_traceback(
    demo: DaemonProcess, demo_socket: str
) -> None:
    buggy = {"jsonrpc": "2.0", "method": "buggy", "params": {"bug": True}}
    with RawConnection(demo_socket) as conn:
        for request_id in range(5):
            conn.send_json({**buggy, "id": request_id})
        conn.send_json(buggy)
        answers = answers_by_id(conn, 5)
        assert conn.call({"jsonrpc": "2.0", "id": "after", "method": "pid"})["id"] == "after"
    assert set(answers) == {0, 1, 2, 3, 4}
    log = demo.stderr()
    assert log.count("Traceback") == 1
    assert log.count("unexpected error handling a frame") == 6
