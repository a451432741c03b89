"""Generated SQL against a live assistant: it stays up, and its own tables stay its own.

Statements, scripts and transaction steps are put together from fragments a
careless or hostile caller would use (triggers, TEMP objects, DDL on the
daemon's tables, foreign keys to them, functions with bound blobs, rows whose
text is not UTF-8, comments, stray semicolons), while other peers stall in the
middle of frames that declare the largest length.
After each call: the daemon answers `health`, `events` and `idempotency_keys`
hold exactly what the daemon itself stored, and no TEMP object is left on
the writer.
"""

from __future__ import annotations

import base64
import contextlib
import struct
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pair.testing.daemons import DaemonProcess
from tests.support.raw import RawConnection

TABLES = ["events", "idempotency_keys", "main.events", "temp.f1", "f1", "f2", "EVENTS"]
FUNCTIONS = [
    "fts3_tokenizer",
    "load_extension",
    "randomblob",
    "zeroblob",
    "hex",
    "length",
    "quote",
    "typeof",
    "unhex",
    "printf",
    "json",
]
TAILS = ["", ";", "; -- c", " /* c */", ";;", "; /* x */ ;"]
INTERNAL = ["events", "idempotency_keys", "EVENTS", '"Idempotency_Keys"']
# Frames that stall after declaring the largest length: 12 of them are more than the
# daemon's whole budget of request bodies.
STALLED_LENGTH = 16 * 1024 * 1024

table = st.sampled_from(TABLES)
value = st.one_of(
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.text(max_size=20),
    st.binary(max_size=16).map(lambda b: {"$blob": base64.b64encode(b).decode()}),
    st.none(),
)


@st.composite
def statement(draw: st.DrawFn) -> str:
    t = draw(table)
    kind = draw(st.integers(0, 16))
    inner = f"INSERT INTO {draw(table)} (rowid) VALUES (1)"
    return [
        f"CREATE TABLE IF NOT EXISTS {t} (a, b)",
        f"CREATE TEMP TABLE IF NOT EXISTS {t.split('.')[-1]} (a)",
        f"INSERT INTO {t} VALUES (?, ?)",
        f"SELECT * FROM {t}",
        f"DELETE FROM {t}",
        f"UPDATE {t} SET rowid = rowid",
        f"DROP TABLE IF EXISTS {t}",
        f"ALTER TABLE {t} ADD COLUMN c",
        f"CREATE INDEX IF NOT EXISTS ix ON {t} (rowid)",
        f"CREATE TRIGGER IF NOT EXISTS tr AFTER INSERT ON {t} BEGIN {inner}; END",
        f"CREATE TEMP TRIGGER IF NOT EXISTS tt AFTER INSERT ON {t} BEGIN {inner}; END",
        f"CREATE TEMP VIEW IF NOT EXISTS {t.split('.')[-1]} AS SELECT 1",
        f"SELECT {draw(st.sampled_from(FUNCTIONS))}(?, ?)",
        "BEGIN",
        f"CREATE TABLE IF NOT EXISTS {t.split('.')[-1]}_k"
        f" (k REFERENCES {draw(st.sampled_from(INTERNAL))} ON DELETE CASCADE)",
        f"INSERT INTO {t} (rowid) VALUES (1), (2)"
        " RETURNING CASE WHEN rowid = 2 THEN CAST(x'80' AS TEXT) ELSE rowid END",
        "SELECT CAST(x'ff' AS TEXT), ?, ?",
    ][kind]


@st.composite
def call(draw: st.DrawFn) -> tuple[str, dict[str, Any]]:
    sql = draw(statement()) + draw(st.sampled_from(TAILS))
    bind = draw(st.lists(value, min_size=2, max_size=2))
    shape = draw(st.integers(0, 3))
    if shape == 0:
        return "db_proxy", {"sql": sql, "mode": "query", "bind": bind}
    if shape == 1:
        return "db_proxy", {"sql": sql, "mode": "run", "bind": bind}
    if shape == 2:
        script = "; ".join(draw(st.lists(statement(), min_size=1, max_size=3)))
        return "db_proxy", {"sql": script.replace("?", "1"), "mode": "exec"}
    steps = [
        {"sql": s.replace("?", "1")} for s in draw(st.lists(statement(), min_size=1, max_size=3))
    ]
    key = draw(st.sampled_from([None, "k1", "k2", "k3"]))
    return "db_proxy_transaction", {"steps": steps, **({"idempotencyKey": key} if key else {})}


class Ledger:
    """What the daemon itself stored: the events it accepted and the keys it kept."""

    def __init__(self) -> None:
        self.events: list[str] = []
        self.keys: set[str] = set()


@pytest.fixture(scope="module")
def live(shared_assistant: DaemonProcess) -> Iterator[tuple[RawConnection, Ledger]]:
    with RawConnection(str(shared_assistant.runtime_dir / "assistant.sock")) as conn:
        yield conn, Ledger()


def answer(conn: RawConnection, method: str, params: dict[str, Any]) -> dict[str, Any]:
    reply = conn.call({"jsonrpc": "2.0", "id": 1, "method": method, "params": params})
    assert isinstance(reply, dict)
    return reply


def scalar(conn: RawConnection, sql: str) -> Any:
    reply = answer(conn, "db_proxy", {"sql": sql, "mode": "run"})
    return reply["result"]["rows"][0]["n"]


@settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    calls=st.lists(call(), min_size=1, max_size=4),
    emit=st.booleans(),
    stalled=st.integers(0, 12),
)
def test_generated_sql_never_crashes_the_daemon_or_reaches_its_own_tables(
    live: tuple[RawConnection, Ledger],
    calls: list[tuple[str, dict[str, Any]]],
    emit: bool,
    stalled: int,
) -> None:
    conn, ledger = live
    with contextlib.ExitStack() as stack:
        for _ in range(stalled):
            squatter = stack.enter_context(RawConnection(conn.path))
            squatter.send_bytes(struct.pack(">I", STALLED_LENGTH))
        run_calls(conn, ledger, calls, emit)
    assert_only_the_daemon_wrote(conn, ledger)


def run_calls(
    conn: RawConnection, ledger: Ledger, calls: list[tuple[str, dict[str, Any]]], emit: bool
) -> None:
    for method, params in calls:
        reply = answer(conn, method, params)
        assert "result" in reply or reply["error"]["data"]["errorCode"] != "INTERNAL_ERROR", reply
        key = params.get("idempotencyKey")
        if key and "result" in reply and reply["result"]["ok"]:
            ledger.keys.add(key)
        if emit:
            event_id = f"fuzz-{len(ledger.events)}"
            emitted = answer(
                conn, "emit_event", {"id": event_id, "kind": "contacts_changed", "payload": {}}
            )
            assert emitted["result"] == {"accepted": True, "duplicate": False}
            ledger.events.append(event_id)


def assert_only_the_daemon_wrote(conn: RawConnection, ledger: Ledger) -> None:
    assert answer(conn, "health", {})["result"]["status"] == "ok"
    stored = answer(
        conn,
        "db_proxy",
        {"sql": "SELECT id FROM main.events ORDER BY rowid", "mode": "query", "maxRows": 100_000},
    )
    assert [row["id"] for row in stored["result"]["rows"]] == ledger.events
    assert scalar(conn, "SELECT count(*) AS n FROM main.idempotency_keys") == len(ledger.keys)
    assert scalar(conn, "SELECT count(*) AS n FROM temp.sqlite_master") == 0
    internal = ", ".join(f"'{name}'" for name in ("events", "idempotency_keys"))
    referencing = (
        "SELECT count(*) AS n FROM sqlite_schema AS m, pragma_foreign_key_list(m.name) AS k"
        f" WHERE m.type = 'table' AND lower(k.\"table\") IN ({internal})"
    )
    assert scalar(conn, referencing) == 0
