"""Reading a daemon's database file from a test, as an operator's sqlite3 shell would."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import apsw

from pair.assistant import proxy
from pair.assistant.db import MIGRATIONS, GuardedConn, open_guarded
from pair.runtime.sqlite import migrate


def count(db: apsw.Connection, sql: str, bind: tuple[Any, ...] = ()) -> int:
    """The single integer a `SELECT count(*) ...` or `SELECT <int column> ...` answers."""
    ((value,),) = db.execute(sql, bind).fetchall()
    assert isinstance(value, int), value
    return value


@contextmanager
def assistant_writer(path: str) -> Iterator[GuardedConn]:
    """assistant.db's writer connection, migrated, with a caller's table `t (id, v)`."""
    conn = open_guarded(path, readonly=False, busy_timeout_ms=100)
    migrate(conn, MIGRATIONS, log=lambda _: None)
    proxy.execute_script(conn, "CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT)")
    try:
        yield conn
    finally:
        conn.db.close()
