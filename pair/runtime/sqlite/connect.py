"""Opening a database as both daemons do: pragmas, the state directory, schema migrations."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import apsw

from pair.runtime import powercut
from pair.runtime.errors import EX_CANTCREAT, EX_DATAERR, DbOpenError
from pair.runtime.files import Dir, fsync
from pair.runtime.sqlite.powercut_vfs import vfs_name
from pair.runtime.sqlite.transaction import BUSY_TIMEOUT_MS, Conn

STATEMENT_CACHE_SIZE = 256
# FULL: an acknowledged write survives power loss. NORMAL (WAL): it survives a
# crash of the process but the last commits may be lost on power loss.
SYNCHRONOUS = {"FULL": "FULL", "NORMAL": "NORMAL"}


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def connect(
    path: str,
    *,
    readonly: bool = False,
    busy_timeout_ms: int = BUSY_TIMEOUT_MS,
    synchronous: str = "FULL",
) -> apsw.Connection:
    """A connection with the pragmas both daemons rely on.

    WAL (readers beside the writer), synchronous=FULL (an acknowledged write
    survives power loss), foreign keys, a busy timeout, defensive mode,
    trusted_schema off, and no double-quoted string literals (they turn a
    typo'd column name into a string).
    """
    flags = apsw.SQLITE_OPEN_READONLY if readonly else apsw.SQLITE_OPEN_READWRITE
    if not readonly:
        flags |= apsw.SQLITE_OPEN_CREATE
    db = apsw.Connection(path, flags=flags, statementcachesize=STATEMENT_CACHE_SIZE, vfs=vfs_name())
    db.set_busy_timeout(busy_timeout_ms)
    db.config(apsw.SQLITE_DBCONFIG_DEFENSIVE, 1)
    db.config(apsw.SQLITE_DBCONFIG_TRUSTED_SCHEMA, 0)
    db.config(apsw.SQLITE_DBCONFIG_DQS_DML, 0)
    db.config(apsw.SQLITE_DBCONFIG_DQS_DDL, 0)
    level = powercut.SYNCHRONOUS or SYNCHRONOUS[synchronous.upper()]
    pragmas = [
        f"synchronous = {level}",
        "foreign_keys = ON",
        "temp_store = MEMORY",
    ]
    if not readonly:
        pragmas.insert(0, "journal_mode = WAL")
    for pragma in pragmas:
        db.execute(f"PRAGMA {pragma}", can_cache=False)
    return db


def migrate(conn: Conn, migrations: tuple[str, ...], *, log: Callable[[str], None]) -> int:
    """Apply pending DDL (keyed on `user_version`) in one transaction; the schema version.

    A database newer than `migrations` is refused, never touched.
    """
    current = int(conn.execute("PRAGMA user_version", cacheable=False)[0][0])
    target = len(migrations)
    if current > target:
        raise DbOpenError(
            f"{conn.db.filename} has schema version {current}, newer than this program's "
            f"{target}; refusing to touch it (upgrade the program)",
            EX_DATAERR,
        )
    if current == target:
        return current
    conn.execute("BEGIN IMMEDIATE", cacheable=False)
    try:
        for version in range(current, target):
            conn.execute(migrations[version], cacheable=False)
        conn.execute(f"PRAGMA user_version = {target}", cacheable=False)
        conn.execute("COMMIT", cacheable=False)
    except BaseException:
        conn.execute("ROLLBACK", cacheable=False)
        raise
    log(f"migrated {conn.db.filename} from schema version {current} to {target}")
    return target


C = TypeVar("C", bound=Conn)


def open_migrated(
    path: str,
    open_writer: Callable[[], C],
    migrations: tuple[str, ...],
    *,
    log: Callable[[str], None],
) -> tuple[C, int]:
    """The writer connection of `path` (its directory made), migrated; its schema version.
    Both daemons open their database so: a failure is a `DbOpenError` naming the path."""
    make_state_dir(path)
    try:
        conn = open_writer()
    except apsw.Error as exc:
        raise DbOpenError(f"cannot open database {path}: {exc}", EX_CANTCREAT) from exc
    try:
        version = migrate(conn, migrations, log=log)
    except apsw.Error as exc:
        conn.db.close()
        raise DbOpenError(f"cannot migrate database {path}: {exc}", EX_CANTCREAT) from exc
    return conn, version


def commits_durable(path: str) -> None:
    """Make every transaction committed so far on `path` survive a power cut: fsync its
    WAL. For synchronous=NORMAL, which syncs the WAL only at a checkpoint (under FULL
    every commit already is): what crosses to the other daemon (an event delivered, an
    event stored and acknowledged) must be durable first, or a cut leaves one database
    holding what the other lost. Blocking: call off the loop."""
    where = Path(path)
    with Dir.open(where.parent) as directory:
        try:
            wal = directory.open_regular(where.name + "-wal")
        except FileNotFoundError:
            return  # checkpointed and removed: its commits are in the synced database file
        with wal:
            fsync(wal)


def make_state_dir(path: str) -> None:
    try:
        os.makedirs(os.path.dirname(path) or ".", mode=0o700, exist_ok=True)
    except OSError as exc:
        raise DbOpenError(f"cannot open database {path}: {exc}", EX_CANTCREAT) from exc
