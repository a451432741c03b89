"""The wire contract (PROTOCOL.md) against a real daemon process, byte by byte."""

from __future__ import annotations

import json
import os
import random
import socket
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pair.testing.daemons import DaemonProcess
from tests.support.proc import vm_kib
from tests.support.raw import RawConnection, as_nobody


def request(method: str, params: object = None, request_id: object = 1) -> dict[str, object]:
    message: dict[str, object] = {"jsonrpc": "2.0", "id": request_id, "method": method}
    if params is not None:
        message["params"] = params
    return message


def error_of(answer: dict[str, object]) -> tuple[int, int, str]:
    error = answer["error"]
    assert isinstance(error, dict)
    data = error["data"]
    return error["code"], data["statusCode"], data["errorCode"]


def test_a_result_of_null_is_present_and_ids_are_echoed(demo_socket: str) -> None:
    with RawConnection(demo_socket) as conn:
        assert conn.call(request("fail", {"statusCode": 409}, "abc"))["id"] == "abc"
        answer = conn.call({"jsonrpc": "2.0", "id": None, "method": "echo", "params": {}})
        assert answer == {"jsonrpc": "2.0", "id": None, "result": {"value": None, "text": ""}}
        big_id = 2**70
        assert conn.call(request("echo", {}, big_id))["id"] == big_id


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (b"not json", (-32700, 400, "PARSE_ERROR")),
        (
            b'{"jsonrpc":"2.0","id":1,"method":"echo","params":{"text":"\xff"}}',
            (-32700, 400, "PARSE_ERROR"),
        ),
        (b'"just a string"', (-32600, 400, "INVALID_REQUEST")),
        (b'{"jsonrpc":"1.0","id":1,"method":"echo"}', (-32600, 400, "INVALID_REQUEST")),
        (b'{"jsonrpc":"2.0","id":true,"method":"echo"}', (-32600, 400, "INVALID_REQUEST")),
        (b'{"jsonrpc":"2.0","id":1,"method":"echo","params":5}', (-32600, 400, "INVALID_REQUEST")),
        (b'{"jsonrpc":"2.0","id":1,"method":"nope"}', (-32601, 404, "METHOD_NOT_FOUND")),
        (b'{"jsonrpc":"2.0","id":1,"method":"rpc.nope"}', (-32601, 404, "METHOD_NOT_FOUND")),
        (
            b'{"jsonrpc":"2.0","id":1,"method":"echo","params":{"x":1}}',
            (-32602, 400, "INVALID_PARAMS"),
        ),
        (b'{"jsonrpc":"2.0","id":1,"method":"boom"}', (-32603, 500, "INTERNAL_ERROR")),
        (
            b'{"jsonrpc":"2.0","id":1,"method":"fail","params":{"statusCode":410,"errorCode":"GONE"}}',
            (-32000, 410, "GONE"),
        ),
    ],
)
def test_each_row_of_the_error_table_and_the_connection_stays_usable(
    demo_socket: str, body: bytes, expected: tuple[int, int, str]
) -> None:
    with RawConnection(demo_socket) as conn:
        conn.send_frame(body)
        answer = conn.recv_json()
        assert error_of(answer) == expected
        assert answer["error"]["data"]["retryable"] is False
        assert (
            conn.call(request("echo", {"text": "still here"}, 2))["result"]["text"] == "still here"
        )


def test_an_internal_error_sends_no_traceback_but_logs_it(
    demo: DaemonProcess, demo_socket: str
) -> None:
    with RawConnection(demo_socket) as conn:
        answer = conn.call(request("boom"))
    assert "secret detail" not in json.dumps(answer)
    assert "Traceback" not in json.dumps(answer)
    assert "ZeroDivisionError: secret detail" in demo.stderr()


def test_invalid_params_name_the_field(demo_socket: str) -> None:
    with RawConnection(demo_socket) as conn:
        answer = conn.call(request("sleep", {"seconds": "soon"}))
    assert answer["error"]["message"] == "Expected `float`, got `str` - at `$.seconds`"
    assert answer["error"]["data"]["path"] == "$.seconds"


def test_an_unreadable_id_is_answered_with_null(demo_socket: str) -> None:
    with RawConnection(demo_socket) as conn:
        answer = conn.call({"jsonrpc": "2.0", "id": [1], "method": "echo"})
    assert answer["id"] is None
    assert error_of(answer)[2] == "INVALID_REQUEST"


@pytest.mark.parametrize(
    ("header", "code", "status"),
    [(b"\x00\x00\x00\x00", "INVALID_FRAME", 400), (b"\xff\xff\xff\xff", "FRAME_TOO_LARGE", 413)],
)
def test_a_rejected_length_gets_one_error_then_the_connection_closes(
    demo_socket: str, header: bytes, code: str, status: int
) -> None:
    with RawConnection(demo_socket) as conn:
        conn.send_bytes(header)
        answer = conn.recv_json()
        assert answer["id"] is None
        assert error_of(answer) == (-32600, status, code)
        assert conn.is_closed_by_peer()


def test_a_peer_that_stalls_mid_frame_is_disconnected(demo_socket: str) -> None:
    with RawConnection(demo_socket) as conn:
        conn.send_bytes(struct.pack(">I", 100) + b'{"jsonrpc"')
        started = time.monotonic()
        assert conn.is_closed_by_peer()
        assert time.monotonic() - started < 5
    with RawConnection(demo_socket) as conn:
        assert conn.call(request("echo", {}))["result"] == {"value": None, "text": ""}


def test_notifications_are_never_answered_not_even_errors(demo_socket: str) -> None:
    with RawConnection(demo_socket) as conn:
        conn.send_json({"jsonrpc": "2.0", "method": "echo", "params": {}})
        conn.send_json({"jsonrpc": "2.0", "method": "nope"})
        conn.send_json({"jsonrpc": "2.0", "method": "boom"})
        conn.send_json({"jsonrpc": "2.0", "method": "echo", "params": {"bad": 1}})
        assert conn.call(request("echo", {"text": "first answer"}, 9)) == {
            "jsonrpc": "2.0",
            "id": 9,
            "result": {"value": None, "text": "first answer"},
        }


def test_a_batch_is_answered_by_one_array_matched_by_id(demo_socket: str) -> None:
    with RawConnection(demo_socket) as conn:
        answers = conn.call(
            [
                request("echo", {"value": 1}, 1),
                {"jsonrpc": "2.0", "method": "echo"},
                request("nope", None, 2),
                42,
                request("sleep", {"seconds": 0.05}, 3),
            ]
        )
    assert isinstance(answers, list)
    by_id = {answer["id"]: answer for answer in answers}
    assert len(answers) == 4
    assert by_id[1]["result"]["value"] == 1
    assert error_of(by_id[2])[2] == "METHOD_NOT_FOUND"
    assert error_of(by_id[None])[2] == "INVALID_REQUEST"
    assert by_id[3]["result"] == 0.05


def test_empty_and_oversized_batches_get_a_single_error(demo_socket: str) -> None:
    with RawConnection(demo_socket) as conn:
        empty = conn.call([])
        assert isinstance(empty, dict)
        assert error_of(empty) == (-32600, 400, "INVALID_REQUEST")
        huge = conn.call([request("echo", {}, n) for n in range(10_000)])
        assert isinstance(huge, dict)
        assert error_of(huge) == (-32600, 413, "BATCH_TOO_LARGE")
        assert conn.call(request("echo", {}, 5))["id"] == 5


def test_a_batch_of_notifications_gets_no_answer(demo_socket: str) -> None:
    with RawConnection(demo_socket) as conn:
        conn.send_json([{"jsonrpc": "2.0", "method": "echo"}, {"jsonrpc": "2.0", "method": "nope"}])
        assert conn.call(request("echo", {}, 77))["id"] == 77


def test_a_client_that_never_reads_does_not_grow_the_server_or_block_others(
    demo: DaemonProcess, demo_socket: str
) -> None:
    rss_before = vm_kib(demo.pid, "VmRSS")
    hog = RawConnection(demo_socket, timeout=0.2)
    hog.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    body = json.dumps(request("echo", {"text": "x" * 4000})).encode()
    frame = struct.pack(">I", len(body)) + body
    sent = 0
    try:
        for _ in range(20_000):
            hog.sock.sendall(frame)
            sent += 1
    except TimeoutError:
        pass
    assert sent < 20_000, "the server kept reading from a peer that never reads"
    with RawConnection(demo_socket) as other:
        assert other.call(request("echo", {"text": "fine"}))["result"]["text"] == "fine"
    assert vm_kib(demo.pid, "VmRSS") - rss_before < 64 * 1024
    hog.close()


def test_a_chunk_of_calls_answered_on_the_loop_does_not_hold_another_connections_call(
    demo_socket: str,
) -> None:
    """Each of these calls holds the loop for a millisecond, as a query answered on the loop
    may: the other connection's call is answered between them, not after the 200."""
    calls = 200
    with RawConnection(demo_socket) as hog, RawConnection(demo_socket) as other:
        frames = []
        for index in range(calls):
            body = json.dumps(request("spin", {"seconds": 0.001}, index)).encode()
            frames.append(struct.pack(">I", len(body)) + body)
        hog.send_bytes(b"".join(frames))
        other.send_json(request("echo", {"text": "fine"}))
        assert other.recv_json()["result"]["text"] == "fine"
        assert answers_waiting(hog) < calls // 2
        answered = 0
        while answered < calls:
            assert hog.recv_json()["result"] == 0.001
            answered += 1


def answers_waiting(conn: RawConnection) -> int:
    """How many whole answers are there to read on `conn` now, none of them read."""
    # Not MSG_DONTWAIT alone: on a socket with a timeout Python waits out the timeout
    # for data all the same.
    timeout = conn.sock.gettimeout()
    conn.sock.setblocking(False)
    try:
        waiting = conn.sock.recv(1 << 20, socket.MSG_PEEK)
    except BlockingIOError:
        return 0
    finally:
        conn.sock.settimeout(timeout)
    count, offset = 0, 0
    while offset + 4 <= len(waiting):
        offset += 4 + struct.unpack_from(">I", waiting, offset)[0]
        count += offset <= len(waiting)
    return count


def test_random_and_mutated_frames_never_stop_the_server(demo_socket: str) -> None:
    rng = random.Random(20261127)
    valid = json.dumps(request("echo", {"value": 1, "text": "fuzz"})).encode()
    for _ in range(200):
        with RawConnection(demo_socket, timeout=2) as conn:
            choice = rng.random()
            if choice < 0.3:
                conn.send_bytes(rng.randbytes(rng.randint(1, 64)))
            elif choice < 0.8:
                body = bytearray(valid)
                for _ in range(rng.randint(1, 6)):
                    body[rng.randrange(len(body))] = rng.randrange(256)
                conn.send_frame(bytes(body))
            else:
                cut = rng.randint(1, len(valid))
                conn.send_frame(valid[:cut])
            conn.sock.shutdown(socket.SHUT_WR)
            drain(conn)
    with RawConnection(demo_socket) as conn:
        assert conn.call(request("echo", {"text": "alive"}))["result"]["text"] == "alive"


ALLOWED_GID = 4242


@pytest.fixture
def open_demo(short_tmp: Path) -> Iterator[str]:
    """A demo daemon whose socket anyone may connect to; it allows members of ALLOWED_GID."""
    with DaemonProcess(
        "tests.support.demo_server", short_tmp, short_tmp, "--socket-mode", "666",
        "--allow-group", str(ALLOWED_GID),
    ):  # fmt: skip
        os.chmod(short_tmp, 0o755)
        yield str(short_tmp / "demo.sock")


@pytest.mark.skipif(os.geteuid() != 0, reason="switching to another uid needs root")
def test_a_peer_with_another_uid_is_forbidden_and_disconnected(open_demo: str) -> None:
    answer, closed = as_nobody(open_demo, [], None)
    assert error_of(answer) == (-32001, 403, "FORBIDDEN")
    assert answer["error"]["message"].endswith(f"members of gids: {ALLOWED_GID})")
    assert closed


@pytest.mark.skipif(os.geteuid() != 0, reason="switching to another uid needs root")
def test_a_peer_in_an_allowed_group_is_served(open_demo: str) -> None:
    """--allow-group: the peer's supplementary groups count (SO_PEERGROUPS), as for a
    member of group pair running pairctl against the installed units."""
    answer, _ = as_nobody(open_demo, [ALLOWED_GID], request("echo", {"text": "hi"}))
    assert answer["result"]["text"] == "hi"


def drain(conn: RawConnection) -> None:
    try:
        while conn.sock.recv(65536):
            pass
    except OSError:
        pass


def test_a_peer_that_half_closes_after_its_requests_still_gets_every_answer(
    demo_socket: str,
) -> None:
    with RawConnection(demo_socket) as conn:
        conn.send_json(request("sleep", {"seconds": 0.2}, 1))
        conn.send_json(request("echo", {"text": "x"}, 2))
        conn.sock.shutdown(socket.SHUT_WR)
        answers = {conn.recv_json()["id"], conn.recv_json()["id"]}
        assert answers == {1, 2}
        assert conn.is_closed_by_peer()


def test_debug_logs_one_line_per_call_whatever_way_it_runs(short_tmp: Path) -> None:
    with DaemonProcess(
        "tests.support.demo_server", short_tmp, short_tmp, "--log-level", "DEBUG"
    ) as daemon:
        with RawConnection(str(short_tmp / "demo.sock")) as conn:
            for request_id, method in enumerate(("echo", "echo_async", "echo_thread", "nope")):
                conn.call(request(method, {"text": "x"}, request_id))
        assert daemon.stop() == 0
    log = daemon.stderr()
    for line in (
        "call method='echo' id=0 ",
        "call method='echo_async' id=1 ",
        "call method='echo_thread' id=2 ",
        "call method='nope' id=3 ",
    ):
        assert line in log
    assert "outcome=METHOD_NOT_FOUND" in log
    assert log.count(" outcome=ok") == 3


def test_a_peer_that_sends_nothing_is_disconnected_after_the_idle_timeout(
    short_tmp: Path,
) -> None:
    with DaemonProcess(
        "tests.support.demo_server", short_tmp, short_tmp, "--idle-timeout", "0.5"
    ) as daemon:
        with RawConnection(str(short_tmp / "demo.sock")) as idle:
            assert idle.is_closed_by_peer()
        assert daemon.stop() == 0
    assert "closing connection from" in daemon.stderr()
