"""Calls built to break the assistant from its socket: each gets a precise error, and the
daemon, its other callers and its own tables carry on as if it never came."""

from __future__ import annotations

import json
import struct
import threading
from typing import Any

import anyio
import apsw
import pytest

from pair.protocol.client import BatchCall, Client
from pair.protocol.errors import IpcHandlerError
from pair.testing.daemons import DaemonProcess
from tests.support.calls import sql as proxy
from tests.support.proc import vm_kib
from tests.support.raw import RawConnection
from tests.support.waiting import eventually, until

pytestmark = pytest.mark.anyio

# The second returned row holds text that is not UTF-8: the statement fails while its
# rows are read, its cursor mid-statement.
BAD_RETURNING = (
    "INSERT INTO t (v) VALUES (1), (2)"
    " RETURNING CASE WHEN v = 2 THEN CAST(x'80' AS TEXT) ELSE v END AS v"
)
BAD_ROWS = (
    "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 3)"
    " SELECT CASE WHEN x = 2 THEN CAST(x'80' AS TEXT) ELSE x END AS v FROM c"
)


async def count(client: Client) -> int:
    return int((await proxy(client, "SELECT count(*) AS n FROM t", "query"))["rows"][0]["n"])


async def test_invalid_text_in_returned_rows_fails_that_call_alone_and_writes_go_on(
    assistant_socket: str,
) -> None:
    """It wedged every later write ("SQL statements in progress") and left a reader on an
    old snapshot, until the cycle collector happened to run."""
    async with Client(assistant_socket) as client:
        await proxy(client, "CREATE TABLE t (v)")
        for mode in ("run", "exec"):
            with pytest.raises(IpcHandlerError) as caught:
                await proxy(client, BAD_RETURNING, mode)
            if mode == "run":
                assert caught.value.code == "DB_PROXY_FAILED"
                assert "not valid UTF-8" in caught.value.message
        with pytest.raises(IpcHandlerError) as caught:
            await client.call(
                "db_proxy_transaction",
                {"steps": [{"sql": "INSERT INTO t (v) VALUES (0)"}, {"sql": BAD_RETURNING}]},
            )
        assert caught.value.data["failedStep"] == 1
        with pytest.raises(IpcHandlerError, match="not valid UTF-8"):
            await proxy(client, BAD_ROWS, "query")
        assert await count(client) == 0
        await proxy(client, "INSERT INTO t (v) VALUES (3)")
        await client.call("emit_event", {"id": "ev_after", "kind": "contacts_changed",
                                         "payload": {}})  # fmt: skip
        # Every reader sees the write: none was left holding the old snapshot.
        for _ in range(8):
            assert await count(client) == 1


REFERENCING = [
    ("run", "CREATE TABLE c (k TEXT REFERENCES idempotency_keys(key) ON DELETE CASCADE)"),
    ("run", 'CREATE TABLE c (k TEXT, FOREIGN KEY (k) REFERENCES "IDEMPOTENCY_KEYS")'),
    ("run", "CREATE TEMP TABLE c (e TEXT REFERENCES events(id))"),
    ("exec", "CREATE TABLE ok (x); CREATE TABLE c (k REFERENCES events ON DELETE SET NULL);"),
    ("exec", "CREATE TABLE c (x); ALTER TABLE c ADD COLUMN k REFERENCES idempotency_keys;"),
    ("exec", "CREATE TABLE c (k REFERENCES idempotency_keys); ALTER TABLE c RENAME TO c2;"),
]


def referencing(script: str) -> str:
    """The statement of `script` that holds the reference, as a step of its own."""
    statement = next(part for part in script.split(";") if "REFERENCES" in part)
    if statement.lstrip().startswith("ALTER"):
        return "CREATE TABLE c (k REFERENCES idempotency_keys)"
    return statement


@pytest.mark.parametrize(("mode", "sql"), REFERENCING)
async def test_a_foreign_key_to_an_internal_table_is_refused_and_nothing_is_kept(
    assistant_socket: str, mode: str, sql: str
) -> None:
    """Its cascade would fire the caller's triggers inside the daemon's own sweep."""
    async with Client(assistant_socket) as client:
        with pytest.raises(IpcHandlerError) as caught:
            await proxy(client, sql, mode)
        assert (caught.value.code, caught.value.status_code) == ("SQL_FORBIDDEN", 403)
        assert "internal to the assistant" in caught.value.message
        with pytest.raises(IpcHandlerError) as caught:
            await client.call(
                "db_proxy_transaction",
                {"steps": [{"sql": "CREATE TABLE d (x)"}, {"sql": referencing(sql)}]},
            )
        assert caught.value.code == "SQL_FORBIDDEN"
        tables = await proxy(
            client,
            "SELECT name FROM sqlite_schema WHERE type = 'table'"
            " UNION ALL SELECT name FROM temp.sqlite_schema WHERE type = 'table'",
            "query",
        )
        names = {row["name"] for row in tables["rows"]}
        assert names == {"events", "idempotency_keys", "assistant_ingress_invites"}


def test_the_daemons_sweep_never_runs_a_callers_trigger(assistant: DaemonProcess) -> None:
    """A trap made before the foreign-key check existed (or by hand): a caller table whose
    key cascades from idempotency_keys, with a trigger that empties events. The sweep of
    an old key must not fire it with the daemon's rights."""
    assistant.call("emit_event", {"id": "ev_kept", "kind": "contacts_changed", "payload": {}})
    assert assistant.stop() == 0
    db = apsw.Connection(str(assistant.state_dir / "assistant.db"))
    db.execute("PRAGMA foreign_keys = ON")
    db.execute(
        "CREATE TABLE trap (k TEXT REFERENCES idempotency_keys(key) ON DELETE CASCADE);"
        "CREATE TRIGGER sprung AFTER DELETE ON trap BEGIN DELETE FROM events; END;"
        "INSERT INTO idempotency_keys (key, result, created_at) VALUES ('old', '{}', 0);"
        "INSERT INTO trap VALUES ('old');"
    )
    db.close()
    assistant.start()
    # The sweep runs once at start: it either forgot the key or was refused.
    until(lambda: "idempotency key" in assistant.stderr(), "the sweep has run")
    assert "trigger sprung may not run in the daemon's work" in assistant.stderr()
    kept = assistant.call("db_proxy", {"sql": "SELECT id FROM events", "mode": "query"})
    assert kept["rows"] == [{"id": "ev_kept"}]


# About 45 ms of SQLite's C code in very few VM steps: no progress handler runs in it.
HEAVY_STEP = (
    "INSERT INTO t (v) VALUES"
    " (length(trim(printf('%.*c', 4000, 'a'), printf('%.*c', 4000, 'b') || 'a')))"
)
# What the steps would take if each ran: the deadline must stop them well before.
STEPS = 60
STOPPED_WITHIN = 1.0


@pytest.mark.parametrize("shape", ["transaction", "script"])
async def test_a_write_past_its_deadline_gives_the_writer_back_at_once(
    assistant_socket: str, shape: str
) -> None:
    """60 quick-in-VM-steps statements with timeoutMs 100 were answered DB_TIMEOUT at
    about 150 ms, but held the writer about 3 s more: a write sent next waited for it."""
    async with Client(assistant_socket) as client:
        await proxy(client, "CREATE TABLE t (v)")
        if shape == "transaction":
            method = "db_proxy_transaction"
            params: dict[str, Any] = {"steps": [{"sql": HEAVY_STEP}] * STEPS}
        else:
            method = "db_proxy"
            params = {"sql": ";".join([HEAVY_STEP] * STEPS), "mode": "exec"}
        started = anyio.current_time()
        with pytest.raises(IpcHandlerError) as caught:
            await client.call(method, {**params, "timeoutMs": 100})
        assert caught.value.code == "DB_TIMEOUT"
        await proxy(client, "INSERT INTO t (v) VALUES ('next')")
        took = anyio.current_time() - started
        assert took < STOPPED_WITHIN, f"the next write waited until {took:.2f} s"
        assert (await proxy(client, "SELECT v FROM t", "query"))["rows"] == [{"v": "next"}]


FORGED = "2026-12-05 12:00:00,000 assistant INFO assistant: forged by a caller"


def test_a_method_name_can_neither_forge_a_log_line_nor_flood_the_log(
    assistant: DaemonProcess,
) -> None:
    with RawConnection(assistant.socket_path) as conn:
        conn.send_json({"jsonrpc": "2.0", "method": f"nope\n{FORGED}"})
        conn.send_json({"jsonrpc": "2.0", "method": "x" * 1_000_000})
        conn.send_json({"jsonrpc": "2.0", "id": 1, "method": "health"})
        assert conn.recv_json()["result"]["status"] == "ok"
    until(lambda: assistant.stderr().count("notification") == 2, "both notifications logged")
    lines = assistant.stderr().splitlines()
    assert not any(line.startswith(FORGED) for line in lines)
    assert max(len(line) for line in lines) < 1000


def request(request_id: int, method: str, params: dict[str, Any] | None = None) -> bytes:
    message: dict[str, Any] = {"jsonrpc": "2.0", "id": request_id, "method": method}
    if params is not None:
        message["params"] = params
    body = json.dumps(message)
    return struct.pack(">I", len(body)) + body.encode()


# Far above what a health call takes, far below the seconds the floods cost before.
ANSWERED_WITHIN = 1.0


async def test_pipelined_discovers_from_a_peer_that_never_reads_stall_no_one(
    assistant: DaemonProcess,
) -> None:
    """54 KB of rpc.discover frames: each document was built anew (4.3 ms), all in one
    turn of the loop; health on another connection waited 2.7 s."""
    flood = b"".join(request(index, "rpc.discover") for index in range(1000))
    with RawConnection(assistant.socket_path) as greedy:
        greedy.send_bytes(flood)
        async with Client(assistant.socket_path) as client:
            started = anyio.current_time()
            assert (await client.call("health"))["status"] == "ok"
            assert anyio.current_time() - started < ANSWERED_WITHIN
        # Its unread answers are bounded, not 1000 documents.
        assert vm_kib(assistant.pid, "VmRSS") / 1024 < 120
        (length,) = struct.unpack(">I", greedy.recv_exactly(4))
        assert json.loads(greedy.recv_exactly(length))["result"]["openrpc"]


MILLION_ROWS = (
    "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 1000000)"
    " SELECT x, printf('%.*c', 60, 'v') AS pad FROM c"
)


async def test_rows_past_the_frame_limit_are_refused_as_they_come_not_after(
    assistant: DaemonProcess,
) -> None:
    """maxRows 1,000,000 and maxBytes 1 GiB: the answer was built whole (714 MiB) before
    the frame limit refused it."""
    before = vm_kib(assistant.pid, "VmHWM") / 1024
    async with Client(assistant.socket_path, timeout=60) as client:
        with pytest.raises(IpcHandlerError) as caught:
            await proxy(
                client, MILLION_ROWS, "query", maxRows=1_000_000, maxBytes=1024**3, timeoutMs=60_000
            )
        assert (caught.value.code, caught.value.status_code) == ("RESULT_TOO_LARGE", 413)
        # Under the frame limit maxBytes still truncates, by the rows' true size: a blob
        # counts as its base64.
        blobs = await proxy(
            client,
            "SELECT zeroblob(3000) AS b FROM (SELECT 1 UNION ALL SELECT 2 UNION ALL SELECT 3)",
            "query",
            maxBytes=9100,
        )
        assert (len(blobs["rows"]), blobs["truncated"]) == (2, True)
    grown = vm_kib(assistant.pid, "VmHWM") / 1024 - before
    assert grown < 150, f"the refused answer took {grown:.0f} MiB at its peak"


# Nine frames of 16 MiB declared: more than the daemon's 128 MiB of request bodies.
SQUATTERS = 9
DECLARED = 16 * 1024 * 1024
# A body that stops coming gives its budget back after 1 s; frame_timeout is 10 s.
SERVED_WITHIN = 3.0


@pytest.mark.parametrize("sent", [b"", b"{"], ids=["a header alone", "a header and a byte"])
async def test_stalled_frames_cannot_squat_the_daemons_byte_budget(
    assistant: DaemonProcess, sent: bytes
) -> None:
    """Each squatter declares a 16 MiB frame and stalls: every other connection was read
    once a frame_timeout (health 9.3-9.7 s) until the squatters were disconnected."""
    squatters = [RawConnection(assistant.socket_path) for _ in range(SQUATTERS)]
    try:
        for squatter in squatters:
            squatter.send_bytes(struct.pack(">I", DECLARED) + sent)
        # One persistent connection, as the gateway's: read again after each call.
        async with Client(assistant.socket_path) as client:
            for _ in range(3):
                started = anyio.current_time()
                await proxy(client, "SELECT 1", "query")
                took = anyio.current_time() - started
                assert took < SERVED_WITHIN, f"a query waited {took:.1f} s behind the squatters"
    finally:
        for squatter in squatters:
            squatter.close()


def test_batches_of_tiny_calls_hold_bounded_memory(demo: DaemonProcess, demo_socket: str) -> None:
    """11.5 MB of batch frames of tiny calls raised the peak from 33 to 270 MiB: every
    member was given a task up front, and a batch counted only its body's bytes."""
    member = {"jsonrpc": "2.0", "method": "echo_async", "params": {"text": "x"}}
    batches = [
        json.dumps([{**member, "id": batch * 1000 + index} for index in range(1000)]).encode()
        for batch in range(180)
    ]
    assert sum(len(body) for body in batches) > 11_500_000
    before = vm_kib(demo.pid, "VmHWM") / 1024
    with RawConnection(demo_socket, timeout=60) as conn:
        frames = b"".join(struct.pack(">I", len(body)) + body for body in batches)
        sender = threading.Thread(target=conn.send_bytes, args=(frames,))
        sender.start()
        for _ in batches:
            (length,) = struct.unpack(">I", conn.recv_exactly(4))
            assert len(json.loads(conn.recv_exactly(length))) == 1000
        sender.join()
    grown = vm_kib(demo.pid, "VmHWM") / 1024 - before
    assert grown < 100, f"the batches took {grown:.0f} MiB at the peak"


async def test_a_peer_that_never_reads_its_answers_has_its_calls_withdrawn(
    assistant: DaemonProcess,
) -> None:
    """40 queries of 8 MB results, never read: they held 443 MiB until the peer closed."""
    before = vm_kib(assistant.pid, "VmHWM") / 1024
    big = {"sql": "SELECT zeroblob(8000000) AS b", "mode": "query", "maxBytes": 12_000_000}
    with RawConnection(assistant.socket_path, timeout=60) as greedy:
        greedy.send_bytes(b"".join(request(index, "db_proxy", big) for index in range(40)))
        async with Client(assistant.socket_path) as client:

            async def all_answered() -> bool:
                calls = (await client.call("metrics"))["calls"]
                return sum(int(c["count"]) for c in calls if c["method"] == "db_proxy") == 40

            await eventually(all_answered)
        grown = vm_kib(assistant.pid, "VmHWM") / 1024 - before
        outcomes = []
        for _ in range(40):
            (length,) = struct.unpack(">I", greedy.recv_exactly(4))
            answer = json.loads(greedy.recv_exactly(length))
            outcomes.append("ok" if "result" in answer else answer["error"]["data"]["errorCode"])
    assert grown < 200, f"{grown:.0f} MiB held for answers nobody read"
    assert "ok" in outcomes
    assert set(outcomes) == {"ok", "ANSWERS_UNREAD"}


async def test_a_batch_of_large_answers_holds_one_frame_of_them_not_all(
    assistant: DaemonProcess,
) -> None:
    """200 members of 1 MB answers: they were all held (and encoded) before the batch's
    frame was found too large (peak +383 MiB). Now each is encoded as it comes, and past
    the frame limit the rest are RESULT_TOO_LARGE for their ids; what remains is the
    readers' results handed back 64 at a time (+210 MiB here)."""
    before = vm_kib(assistant.pid, "VmHWM") / 1024
    big = {"sql": "SELECT zeroblob(750000) AS b", "mode": "query", "maxBytes": 2_000_000}
    async with Client(assistant.socket_path, timeout=60) as client:
        answers = await client.batch([BatchCall("db_proxy", big) for _ in range(200)])
    grown = vm_kib(assistant.pid, "VmHWM") / 1024 - before
    kept = [answer for answer in answers if not isinstance(answer, IpcHandlerError)]
    refused = [answer for answer in answers if isinstance(answer, IpcHandlerError)]
    assert 10 <= len(kept) <= 16, len(kept)
    assert {error.code for error in refused} == {"RESULT_TOO_LARGE"}
    assert grown < 300, f"the batch took {grown:.0f} MiB at its peak"
