"""Whether a database's schema is the one this build's migrations make at its version.

The expected schema is made, not written down: the daemon's own migrations run
on an empty in-memory database up to the file's `user_version`, and every
table, index, trigger and view they make must be in the file with the same
definition (SQLite keeps each one's CREATE text, which ALTER TABLE edits in
place, so equal text is an equal table). gateway.db holds nothing else.
assistant.db also holds what db_proxy callers made (their tables, indexes,
views and triggers): anything on the daemon's internal tables that the
migrations did not make (a trigger on `events`) is refused, as the statement
policy refuses it over the socket.
"""

from __future__ import annotations

from typing import Any

import apsw

Objects = dict[tuple[str, str], tuple[str, str | None]]


def migrations_of(daemon: str) -> tuple[str, ...]:
    if daemon == "gateway":
        from pair.gateway.db import MIGRATIONS as GATEWAY

        return GATEWAY
    from pair.assistant.db import MIGRATIONS as ASSISTANT

    return ASSISTANT


def _guarded_tables(daemon: str) -> frozenset[str]:
    """The tables nothing but the migrations may put anything on (the policy's)."""
    if daemon == "gateway":
        return frozenset()
    from pair.assistant.db import INTERNAL_TABLES

    return INTERNAL_TABLES


def newest_version(daemon: str) -> int:
    return len(migrations_of(daemon))


def expected_objects(daemon: str, version: int) -> Objects:
    db = apsw.Connection(":memory:")
    try:
        for migration in migrations_of(daemon)[:version]:
            db.execute(migration)
        return objects_of(db)
    finally:
        db.close()


def objects_of(db: Any) -> Objects:
    """Each schema object by (type, name): its table (lower case, as SQLite compares
    names) and its CREATE text. Only SQLite's own bookkeeping is left out: its
    sequence and statistics tables, and the indexes it makes for a constraint (they
    have no CREATE text); a trigger or view named `sqlite_...` is kept, and refused."""
    rows = db.execute("SELECT type, name, tbl_name, sql FROM sqlite_schema").fetchall()
    return {
        (str(kind), str(name)): (str(table).lower(), None if sql is None else str(sql))
        for kind, name, table, sql in rows
        if not _sqlites_own(str(kind), str(name), sql)
    }


def _sqlites_own(kind: str, name: str, sql: object) -> bool:
    if kind == "table" and (name == "sqlite_sequence" or name.startswith("sqlite_stat")):
        return True
    return kind == "index" and name.startswith("sqlite_autoindex_") and sql is None


def schema_problems(db: Any, daemon: str, version: int) -> list[str]:
    """How the schema of `db` differs from what the migrations make at `version`."""
    expected, found = expected_objects(daemon, version), objects_of(db)
    problems = []
    for (kind, name), definition in expected.items():
        if (kind, name) not in found:
            problems.append(f"{kind} {name} is missing")
        elif found[(kind, name)] != definition:
            problems.append(f"{kind} {name} is not as this build makes it")
    guarded = {table.lower() for table in _guarded_tables(daemon)}
    for (kind, name), (table, _) in found.items():
        if (kind, name) not in expected and (daemon == "gateway" or table in guarded):
            problems.append(f"{kind} {name!r} (on {table!r}) is not one pair makes")
    problems += _sequence_problems(db)
    return problems[:10]


# An AUTOINCREMENT counter this high stops every insert ("database or disk is full").
SEQUENCE_LIMIT = 1 << 53


def _sequence_problems(db: Any) -> list[str]:
    exists = db.execute("SELECT 1 FROM sqlite_schema WHERE name = 'sqlite_sequence'").fetchall()
    if not exists:
        return []
    rows = db.execute("SELECT name, seq FROM sqlite_sequence").fetchall()
    return [
        f"sqlite_sequence of {str(name)!r} is {seq!r}, past what pair ever counts to"
        for name, seq in rows
        if not isinstance(seq, int) or not 0 <= seq < SEQUENCE_LIMIT
    ]
