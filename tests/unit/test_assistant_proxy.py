"""db_proxy's rules on a real assistant.db in tmp_path, with no process or socket.

The policy, requireChanges, idempotency keys and the events table, called as
the assistant's database threads call them.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from assistant import proxy
from assistant.db import MIGRATIONS, GuardedConn, open_guarded
from assistant.errors import DbProxyTransactionFailed, SqlForbidden
from assistant.events import insert_event
from assistant.proxy import Step, TransactionFailed, TransactionOk
from protocol.errors import InvalidParams
from runtime.sqlite import migrate
from tests.support.sqlite import count


@pytest.fixture
def conn(tmp_path: Path) -> Iterator[GuardedConn]:
    connection = open_guarded(str(tmp_path / "assistant.db"), readonly=False, busy_timeout_ms=100)
    migrate(connection, MIGRATIONS, log=lambda _: None)
    proxy.execute_script(connection, "CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT)")
    try:
        yield connection
    finally:
        connection.db.close()


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


@pytest.mark.parametrize(
    "sql",
    [
        "INSERT INTO idempotency_keys (key, result, created_at) VALUES ('k', '{}', 0)",
        "DELETE FROM events",
        "BEGIN",
        "ATTACH DATABASE ':memory:' AS other",
    ],
)
def test_the_policy_refuses_our_tables_and_transaction_control(conn: GuardedConn, sql: str) -> None:
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
