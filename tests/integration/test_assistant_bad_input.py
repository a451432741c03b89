"""Every bad input gets its precise error and leaves assistant.db exactly as it was."""

from __future__ import annotations

from typing import Any

import pytest

from pair.protocol.client import Client
from pair.protocol.errors import IpcHandlerError
from pair.testing.daemons import DaemonProcess
from tests.support.raw import RawConnection

pytestmark = pytest.mark.anyio

SNAPSHOT = "SELECT group_concat(id || ':' || quote(v), ',') AS all_rows FROM t"


@pytest.fixture
async def client(shared_assistant: DaemonProcess) -> Any:
    async with Client(str(shared_assistant.runtime_dir / "assistant.sock")) as client:
        await client.call(
            "db_proxy",
            {
                "sql": "CREATE TABLE IF NOT EXISTS t (id INTEGER PRIMARY KEY, v);"
                " INSERT OR IGNORE INTO t VALUES (1, 'one'), (2, 'two');",
                "mode": "exec",
            },
        )
        yield client


async def snapshot(client: Client) -> object:
    return (await client.call("db_proxy", {"sql": SNAPSHOT, "mode": "query"}))["rows"]


def proxy(sql: str, mode: str = "run", **extra: Any) -> tuple[str, dict[str, Any]]:
    return "db_proxy", {"sql": sql, "mode": mode, **extra}


def transaction(*sqls: str, **extra: Any) -> tuple[str, dict[str, Any]]:
    steps = [{"sql": sql} for sql in sqls]
    return "db_proxy_transaction", {"steps": steps, **extra}


BAD_INPUTS = [
    # (call, errorCode, statusCode, path or None, a fragment of the message)
    (proxy("SELECT 1", "fetch"), "INVALID_PARAMS", 400, "$.mode", "Invalid enum value 'fetch'"),
    (("db_proxy", {"sql": 5, "mode": "query"}), "INVALID_PARAMS", 400, "$.sql", "got `int`"),
    (("db_proxy", {"mode": "query"}), "INVALID_PARAMS", 400, "$.sql", "missing required field"),
    (proxy("SELECT 1", "query", limit=3), "INVALID_PARAMS", 400, "$.limit", "unknown field"),
    (proxy("", "query"), "INVALID_PARAMS", 400, "$.sql", "length >= 1"),
    (proxy("SELECT 1;\x00DROP TABLE t", "run"), "INVALID_PARAMS", 400, "$.sql", "NUL"),
    (transaction("SELECT 1", "SELECT 2\x00"), "INVALID_PARAMS", 400, "$.steps[1].sql", "NUL"),
    (proxy("SELECT ?", "query", bind=[1, 2]), "INVALID_PARAMS", 400, "$.bind", "bindings"),
    (proxy("SELECT ?", "query"), "INVALID_PARAMS", 400, "$.bind", "1 bindings"),
    (proxy("SELECT :a", "query", bind={"b": 1}), "INVALID_PARAMS", 400, "$.bind", "'a'"),
    (
        proxy("SELECT :a", "query", bind={"a": 1, "c": 2}),
        "INVALID_PARAMS",
        400,
        "$.bind.c",
        "does not use: 'c'",
    ),
    (proxy("SELECT ?", "query", bind={"a": 1}), "INVALID_PARAMS", 400, "$.bind", "has no name"),
    (proxy("UPDATE t SET v = ?", bind=[2**63]), "INVALID_PARAMS", 400, "$.bind[0]", "<= 9223"),
    (proxy("UPDATE t SET v = ?", bind=[[1]]), "INVALID_PARAMS", 400, "$.bind[0]", "got `array`"),
    (proxy("UPDATE t SET v = ?", bind=[{"x": 1}]), "INVALID_PARAMS", 400, "$.bind[0].x", "unknown"),
    (proxy("UPDATE t SET v = 1", timeoutMs=0), "INVALID_PARAMS", 400, "$.timeoutMs", ">= 1"),
    (
        proxy("UPDATE t SET v = 1", timeoutMs=60001),
        "INVALID_PARAMS",
        400,
        "$.timeoutMs",
        "<= 60000",
    ),
    (proxy("UPDATE t SET v = 1", "query"), "INVALID_PARAMS", 400, "$.sql", "use mode=run"),
    (proxy("DELETE FROM t", "query"), "INVALID_PARAMS", 400, "$.sql", "use mode=run"),
    (proxy("SELECT 1; DELETE FROM t", "query"), "INVALID_PARAMS", 400, "$.sql", "one statement"),
    (proxy("DELETE FROM t; SELECT 1"), "INVALID_PARAMS", 400, "$.sql", "one statement"),
    (
        proxy("DELETE FROM t", "exec", bind=[]),
        "INVALID_PARAMS",
        400,
        "$.bind",
        "exec takes no bind",
    ),
    (proxy("DELETE FROM t WHERE id = ?", "exec"), "INVALID_PARAMS", 400, "$.bind", "1 bindings"),
    (proxy("BEGIN"), "SQL_FORBIDDEN", 403, None, "transaction control"),
    (proxy("BEGIN IMMEDIATE", "query"), "SQL_FORBIDDEN", 403, None, "transaction control"),
    (proxy("COMMIT"), "SQL_FORBIDDEN", 403, None, "transaction control"),
    (proxy("SAVEPOINT s"), "SQL_FORBIDDEN", 403, None, "transaction control"),
    (
        proxy("DELETE FROM t; COMMIT; DELETE FROM t", "exec"),
        "SQL_FORBIDDEN",
        403,
        None,
        "transaction",
    ),
    (proxy("ATTACH DATABASE '/tmp/x.db' AS x"), "SQL_FORBIDDEN", 403, None, "ATTACH"),
    (proxy("SELECT load_extension('x')", "query"), "SQL_FORBIDDEN", 403, None, "extension"),
    (proxy("PRAGMA foreign_keys = OFF"), "SQL_FORBIDDEN", 403, None, "PRAGMA foreign_keys"),
    (proxy("PRAGMA user_version = 99"), "SQL_FORBIDDEN", 403, None, "PRAGMA user_version"),
    (proxy("PRAGMA journal_mode", "query"), "SQL_FORBIDDEN", 403, None, "PRAGMA journal_mode"),
    (proxy("DELETE FROM idempotency_keys"), "SQL_FORBIDDEN", 403, None, "internal"),
    (proxy("DELETE FROM t WHERE id = 1 OR nope"), "DB_PROXY_FAILED", 500, None, "no such column"),
    (proxy("SELEC 1", "query"), "DB_PROXY_FAILED", 500, None, 'near "SELEC": syntax error'),
    (proxy("INSERT INTO t VALUES (1, 'x')"), "DB_PROXY_FAILED", 500, None, "UNIQUE constraint"),
    (transaction("UPDATE t SET v = 'z'", "BEGIN"), "SQL_FORBIDDEN", 403, None, "transaction"),
    (transaction("UPDATE t SET v = 'z'", "COMMIT"), "SQL_FORBIDDEN", 403, None, "transaction"),
    (
        transaction("UPDATE t SET v = 'z'", "DELETE FROM t; DELETE FROM t"),
        "SQL_FORBIDDEN",
        403,
        "$.steps[1].sql",
        "exactly one statement",
    ),
    (
        ("db_proxy_transaction", {"steps": [{"sql": "DELETE FROM t", "requireChanges": -1}]}),
        "INVALID_PARAMS",
        400,
        "$.steps[0].requireChanges",
        ">= 0",
    ),
    (
        ("db_proxy_transaction", {"steps": [{"sql": "DELETE FROM t"}] * 1001}),
        "INVALID_PARAMS",
        400,
        "$.steps",
        "length <= 1000",
    ),
    (
        ("db_proxy_transaction", {"steps": [{"sql": "DELETE FROM t", "bind": [1]}]}),
        "INVALID_PARAMS",
        400,
        "$.steps[0].bind",
        "bindings",
    ),
    (
        ("db_proxy_transaction", {"steps": [{"sql": "DELETE FROM t"}], "idempotencyKey": ""}),
        "INVALID_PARAMS",
        400,
        "$.idempotencyKey",
        "length >= 1",
    ),
    (
        transaction("UPDATE t SET v = 'z'", "SELEC 1"),
        "DB_PROXY_TRANSACTION_FAILED",
        500,
        None,
        "syntax",
    ),
    (
        ("emit_event", {"id": "e", "kind": "party", "payload": {}}),
        "INVALID_PARAMS",
        400,
        "$.kind",
        "Invalid enum value 'party'",
    ),
    (
        ("emit_event", {"id": "e", "kind": "contacts_changed", "payload": []}),
        "INVALID_PARAMS",
        400,
        "$.payload",
        "got `array`",
    ),
]


@pytest.mark.parametrize(("call", "code", "status", "path", "fragment"), BAD_INPUTS)
async def test_bad_input_is_refused_precisely_and_changes_nothing(
    client: Client,
    call: tuple[str, dict[str, Any]],
    code: str,
    status: int,
    path: str | None,
    fragment: str,
) -> None:
    before = await snapshot(client)
    with pytest.raises(IpcHandlerError) as caught:
        await client.call(*call)
    error = caught.value
    assert (error.code, error.status_code) == (code, status), error.message
    assert fragment in error.message
    if path is not None:
        assert error.data["path"] == path
    assert await snapshot(client) == before


async def test_a_nan_literal_in_the_body_is_a_parse_error(client: Client) -> None:
    with RawConnection(client.path) as conn:
        conn.send_frame(
            b'{"jsonrpc":"2.0","id":1,"method":"db_proxy",'
            b'"params":{"sql":"UPDATE t SET v = ?","mode":"run","bind":[NaN]}}'
        )
        answer = conn.recv_json()
    assert answer["error"]["data"]["errorCode"] == "PARSE_ERROR"


async def test_an_overflowing_real_is_invalid_params(client: Client) -> None:
    before = await snapshot(client)
    with RawConnection(client.path) as conn:
        conn.send_frame(
            b'{"jsonrpc":"2.0","id":2,"method":"db_proxy",'
            b'"params":{"sql":"UPDATE t SET v = ?","mode":"run","bind":[1e999]}}'
        )
        answer = conn.recv_json()
    assert answer["error"]["data"]["path"] == "$.bind[0]"
    assert answer["error"]["message"].startswith("Number out of range")
    assert await snapshot(client) == before
