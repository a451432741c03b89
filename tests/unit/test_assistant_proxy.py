"""db_proxy's rules on a real assistant.db in tmp_path, with no process or socket.

The policy, requireChanges, idempotency keys and the events table, called as
the assistant's database threads call them.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from pair.assistant import proxy
from pair.assistant.db import GuardedConn
from pair.assistant.errors import DbProxyFailed, DbProxyTransactionFailed, SqlForbidden
from pair.assistant.events import insert_event
from pair.assistant.proxy import Step, TransactionFailed, TransactionOk
from pair.protocol.errors import InvalidParams
from tests.support.sqlite import assistant_writer, count


@pytest.fixture
def conn(tmp_path: Path) -> Iterator[GuardedConn]:
    with assistant_writer(str(tmp_path / "assistant.db")) as connection:
        yield connection


def insert(value: str, require_changes: int | None = None) -> Step:
    return Step("INSERT INTO t (v) VALUES (?)", (value,), require_changes)


def rows_in_t(conn: GuardedConn) -> int:
    return count(conn.db, "SELECT count(*) FROM t")


def test_an_unmet_require_changes_rolls_back_every_step(conn: GuardedConn) -> None:
    steps = [insert("a"), Step("UPDATE t SET v = 'b' WHERE id = 99", None, 1)]
    outcome = proxy.transaction(conn, steps, None, 100)
    assert outcome == TransactionFailed(failed_step=1, actual_changes=0, required_changes=1)
    assert rows_in_t(conn) == 0


def test_a_repeated_idempotency_key_answers_the_stored_result_without_running(
    conn: GuardedConn,
) -> None:
    first = proxy.transaction(conn, [insert("a")], "key-1", 100)
    again = proxy.transaction(conn, [insert("a"), insert("b")], "key-1", 100)
    assert isinstance(first, TransactionOk)
    assert again == first
    assert rows_in_t(conn) == 1


def test_a_failing_step_names_itself_and_leaves_nothing(conn: GuardedConn) -> None:
    steps = [insert("a"), Step("INSERT INTO t (id) VALUES (1)", None, None)]
    with pytest.raises(DbProxyTransactionFailed) as caught:
        proxy.transaction(conn, steps, "key-2", 100)
    assert caught.value.data["failedStep"] == 1
    assert "UNIQUE constraint failed: t.id" in caught.value.message
    assert rows_in_t(conn) == 0
    assert count(conn.db, "SELECT count(*) FROM idempotency_keys") == 0


INTERNAL = ("events", "idempotency_keys")
# Every form of changing a table or something about it, aimed at each internal
# table: its rows, DDL on it, indexes and triggers on it, and TEMP objects
# that would shadow it on the writer.
TOUCHING = (
    "INSERT INTO {t} (rowid) VALUES (1)",
    "UPDATE {t} SET rowid = rowid",
    "DELETE FROM {t}",
    "DROP TABLE {t}",
    "ALTER TABLE {t} RENAME TO x",
    "ALTER TABLE {t} ADD COLUMN x",
    "CREATE INDEX ix ON {t} (rowid)",
    "CREATE TEMP TRIGGER tr BEFORE INSERT ON main.{t} BEGIN SELECT RAISE(IGNORE); END",
    "CREATE TRIGGER tr BEFORE INSERT ON {t} BEGIN SELECT RAISE(IGNORE); END",
    "CREATE TEMP TABLE {t} (x)",
    "CREATE TEMP TABLE {T} (x)",
    "CREATE TEMP VIEW {t} AS SELECT 1 AS x",
)


@pytest.mark.parametrize("sql", [f.format(t=t, T=t.upper()) for t in INTERNAL for f in TOUCHING])
def test_no_form_of_change_reaches_the_daemons_own_tables(conn: GuardedConn, sql: str) -> None:
    with pytest.raises(SqlForbidden, match="internal to the assistant"):
        proxy.execute_script(conn, sql)
    schema = count(conn.db, "SELECT count(*) FROM sqlite_temp_master")
    assert schema == 0, "a TEMP object was left behind"
    assert insert_event(conn, "after", "contacts_changed", "{}").duplicate is False


def test_the_daemons_own_tables_can_be_read(conn: GuardedConn) -> None:
    insert_event(conn, "e1", "contacts_changed", "{}")
    assert proxy.query(conn, "SELECT id FROM events", None, 100).rows == [{"id": "e1"}]


@pytest.mark.parametrize(
    "sql",
    [
        "BEGIN",
        "ATTACH DATABASE ':memory:' AS other",
        "SELECT load_extension('x')",
        "SELECT fts3_tokenizer('simple')",
        "SELECT FTS3_TOKENIZER('simple', x'0000000000000000')",
    ],
)
def test_the_policy_refuses_transaction_control_attach_and_unsafe_functions(
    conn: GuardedConn, sql: str
) -> None:
    with pytest.raises(SqlForbidden):
        proxy.run(conn, sql, None, 100)


def test_a_write_sent_as_a_query_is_invalid_params(conn: GuardedConn) -> None:
    with pytest.raises(InvalidParams, match="use mode=run"):
        proxy.query(conn, "INSERT INTO t (v) VALUES ('x')", None, 100)
    assert rows_in_t(conn) == 0


def test_an_event_is_stored_once_per_id(conn: GuardedConn) -> None:
    first = insert_event(conn, "ev-1", "contacts_changed", "{}")
    again = insert_event(conn, "ev-1", "contacts_changed", '{"other": true}')
    assert (first.duplicate, again.duplicate) == (False, True)
    assert count(conn.db, "SELECT count(*) FROM events") == 1


@pytest.mark.parametrize("tail", [";", "; -- add one row", ";\n/* note */ ;", "  -- trailing"])
def test_a_comment_after_the_statement_changes_nothing_on_any_call(
    conn: GuardedConn, tail: str
) -> None:
    """The second and later calls of a text are served from the checked-text cache."""
    sql = "INSERT INTO t (v) VALUES (?) RETURNING id" + tail
    for n in range(1, 4):
        result = proxy.run(conn, sql, (f"v{n}",), 100)
        assert (result.changes, result.rows) == (1, [{"id": n}])
    step = Step(sql, ("in a transaction",), 1)
    assert isinstance(proxy.transaction(conn, [step], None, 100), TransactionOk)
    read = proxy.query(conn, "SELECT id FROM t WHERE id = 1" + tail, None, 100)
    again = proxy.query(conn, "SELECT id FROM t WHERE id = 1" + tail, None, 100)
    assert (read.columns, again.columns) == (["id"], ["id"])


def temp_objects(conn: GuardedConn) -> int:
    return count(conn.db, "SELECT count(*) FROM temp.sqlite_master")


def test_a_callers_temp_objects_work_within_the_call_and_are_gone_after_it(
    conn: GuardedConn,
) -> None:
    script = (
        "CREATE TEMP TABLE scratch (x); INSERT INTO scratch VALUES (1), (2);"
        " CREATE TEMP VIEW doubled AS SELECT x * 2 AS y FROM scratch;"
        " CREATE TEMP TRIGGER noisy AFTER INSERT ON scratch BEGIN SELECT 1; END;"
        " INSERT INTO t (v) SELECT y FROM doubled"
    )
    for _ in range(2):  # the second time from the statement cache
        proxy.execute_script(conn, script)
        assert temp_objects(conn) == 0
    assert rows_in_t(conn) == 4
    for _ in range(3):  # again and again from apsw's statement cache
        proxy.run(conn, "CREATE TABLE IF NOT EXISTS temp.alone (x)", None, 100)
        assert temp_objects(conn) == 0
    steps = [
        Step("CREATE TEMP TABLE s (x)", None, None),
        insert("a"),
        Step("DELETE FROM s", None, 1),
    ]
    assert isinstance(proxy.transaction(conn, steps, None, 100), TransactionFailed)
    assert temp_objects(conn) == 0
    failing = [
        Step("CREATE TEMP TABLE s (x)", None, None),
        Step("INSERT INTO nope VALUES (1)", None, None),
    ]
    with pytest.raises(DbProxyTransactionFailed):
        proxy.transaction(conn, failing, None, 100)
    assert temp_objects(conn) == 0


def test_text_that_is_not_utf8_is_the_calls_error_not_an_internal_one(conn: GuardedConn) -> None:
    bad = "CAST(x'80' AS TEXT)"
    with pytest.raises(DbProxyFailed, match="not valid UTF-8"):
        proxy.query(conn, f"SELECT {bad} AS t", None, 100)
    with pytest.raises(DbProxyFailed, match="not valid UTF-8"):
        proxy.run(conn, f"INSERT INTO t (v) VALUES ('x') RETURNING {bad} AS t", None, 100)
    with pytest.raises(DbProxyFailed, match="not valid UTF-8"):
        proxy.execute_script(conn, f"INSERT INTO t (v) VALUES ('y'); SELECT {bad}")
    step = Step(f"INSERT INTO t (v) VALUES ('z') RETURNING {bad} AS t", None, None)
    with pytest.raises(DbProxyTransactionFailed) as caught:
        proxy.transaction(conn, [step], None, 100)
    assert caught.value.data["failedStep"] == 0
    assert rows_in_t(conn) == 0
    hexed = proxy.query(conn, f"SELECT CAST({bad} AS BLOB) AS b", None, 100)
    assert hexed.rows == [{"b": {"$blob": "gA=="}}]
