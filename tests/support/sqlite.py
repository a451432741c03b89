"""Reading a daemon's database file from a test, as an operator's sqlite3 shell would."""

from __future__ import annotations

from typing import Any

import apsw


def count(db: apsw.Connection, sql: str, bind: tuple[Any, ...] = ()) -> int:
    """The single integer a `SELECT count(*) ...` or `SELECT <int column> ...` answers."""
    ((value,),) = db.execute(sql, bind).fetchall()
    assert isinstance(value, int), value
    return value
